"""What alternate tracks cost at ingest: a multi-track file against its one-audio-track self.

Two sources made with the ffmpeg CLI from the same picture (testsrc2, H.264, MP4): the anchor with
one AAC track, and the same with three AAC tracks and two text subtitle tracks (mov_text). Both
are packaged in this process (`peerd.media.package.package`, fMP4, 4 s segments, no ladder,
blobs hashed and kept in memory: no store, so the ratio is the packager's own). The same run
also times the ffmpeg CLI writing HLS of all streams of the multi-track file (``-c copy``, audio
as separate playlists), for scale. Prints the median wall time of each and the ratios to the
anchor measured in the same run.

Usage: .venv/bin/python scripts/bench/tracks_bench.py [SECONDS (120)] [ROUNDS (3)]
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from peerd.core.ids import Cid
from peerd.media.options import PackagingOptions
from peerd.media.package import package


def _ffmpeg(*args: str) -> None:
    subprocess.run(  # noqa: S603 -- fixed argument list
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args], check=True
    )


def _sources(d: Path, seconds: int) -> tuple[Path, Path]:
    srt = d / "subs.srt"
    stamps = [f"00:{i // 30:02d}:{i * 2 % 60:02d}" for i in range(seconds // 2)]
    srt.write_text(
        "\n".join(f"{i + 1}\n{t},000 --> {t},900\nline {i}\n" for i, t in enumerate(stamps))
    )
    video = ["-f", "lavfi", "-i", f"testsrc2=size=640x360:rate=30:duration={seconds}"]
    tone = [
        ["-f", "lavfi", "-i", f"sine=frequency={f}:sample_rate=48000:duration={seconds}"]
        for f in (440, 550, 660)
    ]
    enc = ["-c:v", "libx264", "-preset", "veryfast", "-g", "60", "-c:a", "aac", "-b:a", "128k"]
    one = d / "one.mp4"
    _ffmpeg(*video, *tone[0], *enc, str(one))
    multi = d / "multi.mp4"
    inputs = [*video, *tone[0], *tone[1], *tone[2], "-i", str(srt), "-i", str(srt)]
    maps = [x for i in range(6) for x in ("-map", str(i))]
    _ffmpeg(*inputs, *maps, *enc, "-c:s", "mov_text", str(multi))
    return one, multi


def _package(src: Path) -> float:
    def sink(data: bytes, kind: str, cid: Cid) -> Cid:
        return cid

    started = time.perf_counter()
    package(src, PackagingOptions(segment_seconds=4.0, ladder=()), sink)
    return time.perf_counter() - started


def _ffmpeg_hls(src: Path, out: Path) -> float:
    out.mkdir(exist_ok=True)
    started = time.perf_counter()
    _ffmpeg(
        "-i", str(src), "-map", "0:v", "-map", "0:a", "-c", "copy", "-f", "hls",
        "-hls_time", "4", "-hls_playlist_type", "vod", "-hls_segment_type", "fmp4",
        "-var_stream_map", "v:0,agroup:aud a:0,agroup:aud a:1,agroup:aud a:2,agroup:aud",
        "-master_pl_name", "master.m3u8", str(out / "v%v.m3u8"),
    )  # fmt: skip
    return time.perf_counter() - started


def main() -> None:
    """Run the benchmark and print the table."""
    seconds = int(sys.argv[1]) if len(sys.argv) > 1 else 120
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with tempfile.TemporaryDirectory(prefix="peerd-tracks-") as tmp:
        d = Path(tmp)
        one, multi = _sources(d, seconds)
        times: dict[str, list[float]] = {"anchor": [], "multi": [], "ffmpeg": []}
        for _ in range(rounds):
            times["anchor"].append(_package(one))
            times["multi"].append(_package(multi))
            times["ffmpeg"].append(_ffmpeg_hls(multi, d / "ffmpeg"))
        anchor = statistics.median(times["anchor"])
        print(f"{seconds} s 640x360 source, {rounds} rounds, medians")
        for name, label in (
            ("anchor", "peerd, 1 audio track (anchor)"),
            ("multi", "peerd, 3 audio + 2 subtitle tracks"),
            ("ffmpeg", "ffmpeg -f hls, 3 audio tracks"),
        ):
            t = statistics.median(times[name])
            print(f"  {label:38s} {t:7.3f} s  {t / anchor:5.2f}x anchor")


if __name__ == "__main__":
    main()
