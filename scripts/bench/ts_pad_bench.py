"""What padding MPEG-TS segments to whole continuity cycles costs (`peerd.media.mpegts`).

Packages the same source into MPEG-TS (libav remux of the top rendition, no ladder) with the
padding and with it switched off (the muxer's bytes as they are), alternating, in one process,
and prints the wall-time ratio, the time spent padding, and the bytes added.

    PYTHONPATH=. .venv/bin/python scripts/bench/ts_pad_bench.py [SRC] [--rounds N] [--seconds S]

SRC defaults to the 120 s 1080p bench file (/tmp/peerd-bench/src_1080p.mp4, made by
../shared/bench/make_media.sh); --seconds cuts it (stream copy, ffmpeg CLI) first.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from peerd.media import mpegts, mux
from peerd.media.options import PackagingOptions
from peerd.media.package import package


class _Sink:
    def __init__(self) -> None:
        self.bytes = 0

    def __call__(self, data: bytes, kind: str, cid: str) -> str:
        self.bytes += len(data)
        return cid


def main() -> None:
    """Run the rounds and print the figures."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", nargs="?", default="/tmp/peerd-bench/src_1080p.mp4")  # noqa: S108
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=30.0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src.mp4"
        subprocess.run(  # noqa: S603 - fixed argument list
            ["ffmpeg", "-nostdin", "-v", "error", "-i", args.src, "-t", str(args.seconds)]
            + ["-c", "copy", str(src)],
            check=True,
        )
        opts = PackagingOptions(container="ts", segment_seconds=4.0)
        pad = mpegts.pad_continuity
        spent = [0.0]

        def timed(data: bytes) -> bytes:
            t = time.perf_counter()
            out = pad(data)
            spent[0] += time.perf_counter() - t
            return out

        walls: dict[str, list[float]] = {"padded": [], "plain": []}
        size: dict[str, int] = {}
        pad_s: list[float] = []
        for _ in range(args.rounds):
            for mode in ("plain", "padded"):
                mux.mpegts.pad_continuity = timed if mode == "padded" else (lambda d: d)  # type: ignore[method-assign]
                spent[0] = 0.0
                sink = _Sink()
                t = time.perf_counter()
                package(src, opts, sink)  # type: ignore[arg-type]
                walls[mode].append(time.perf_counter() - t)
                size[mode] = sink.bytes
                if mode == "padded":
                    pad_s.append(spent[0])
        mux.mpegts.pad_continuity = pad  # type: ignore[method-assign]
    plain, padded = statistics.median(walls["plain"]), statistics.median(walls["padded"])
    print(f"source: {args.src}, first {args.seconds:g} s, TS, 4 s segments, {args.rounds} rounds")
    print(f"plain  median {plain:.3f} s  {walls['plain']}")
    print(f"padded median {padded:.3f} s  {walls['padded']}")
    print(
        f"ratio padded/plain {padded / plain:.3f}; padding itself {statistics.median(pad_s):.3f} s"
    )
    print(f"bytes {size['plain']} -> {size['padded']} (+{size['padded'] / size['plain'] - 1:.4%})")


if __name__ == "__main__":
    main()
