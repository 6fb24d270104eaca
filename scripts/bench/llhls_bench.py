#!/usr/bin/env python3
"""CPU of one live input's LL-HLS packaging against the ffmpeg CLI packaging the same file.

    .venv/bin/python scripts/bench/llhls_bench.py [--seconds 60] [--size 1280x720] [--rounds 3]
        [--out /tmp/peerd-bench/llhls]

1. Makes a clip (H.264 with a keyframe each second, AAC) with ffmpeg, once.
2. Each round, peerd: the clip's frames as a publisher hands them over
   (``tests/support/livefeed.read_file``, PyAV demuxing, counted) through the packager's
   :class:`peerd.live.llhls.Muxer` (0.5 s parts, 2 s segments, every segment hashed to its
   content id), as fast as it goes, in this process: its CPU seconds (``time.process_time``).
3. Anchor, same round: the ffmpeg CLI remuxing the same file into fMP4 HLS (``-c copy -f hls
   -hls_segment_type fmp4 -hls_time 2``; ffmpeg 5.1 makes no parts), its CPU seconds
   (``RUSAGE_CHILDREN``).

Prints per round the CPU seconds of each, the ratio peerd / ffmpeg and peerd's share of one
core at real time (CPU seconds / media seconds); writes them as JSON to
``<out>/llhls_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def peerd_cpu(clip: Path) -> float:
    """CPU seconds to demux ``clip`` and package it as LL-HLS parts and segments."""
    from peerd.live.llhls import Muxer
    from tests.support.livefeed import read_file

    start = time.process_time()
    tracks, frames = read_file(clip)
    m = Muxer(tracks, 0.5, 2.0)
    for f in frames:
        m.frame(f)
    m.end("unpublished")
    return time.process_time() - start


def ffmpeg_cpu(clip: Path, out: Path) -> float:
    """CPU seconds of the ffmpeg CLI remuxing ``clip`` into fMP4 HLS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory(dir=out) as d:
        subprocess.run(  # noqa: S603 - fixed argument list
            [
                "ffmpeg", "-v", "error", "-nostdin", "-y", "-i", str(clip), "-c", "copy",
                "-f", "hls", "-hls_segment_type", "fmp4", "-hls_time", "2",
                "-hls_playlist_type", "event", f"{d}/index.m3u8",
            ],
            check=True,
        )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    """Run the rounds and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("/tmp/peerd-bench/llhls"))  # noqa: S108
    args = ap.parse_args()
    from tests.support.media import make_media

    args.out.mkdir(parents=True, exist_ok=True)
    w, h = (int(x) for x in args.size.split("x"))
    clip = args.out / f"live_{w}x{h}_{int(args.seconds)}s.mp4"
    if not clip.is_file():
        make_media(clip, seconds=args.seconds, size=(w, h))
    rows = []
    for r in range(args.rounds):
        ours = peerd_cpu(clip)
        theirs = ffmpeg_cpu(clip, args.out)
        rows.append(
            {
                "round": r,
                "peerd_cpu_s": round(ours, 3),
                "ffmpeg_cpu_s": round(theirs, 3),
                "ratio": round(ours / theirs, 2) if theirs else None,
                "peerd_core_share": round(ours / args.seconds, 4),
            }
        )
        print(rows[-1], flush=True)
    ratios = [x["ratio"] for x in rows if x["ratio"] is not None]
    share = statistics.median(x["peerd_core_share"] for x in rows)
    summary = {
        "clip": str(clip),
        "media_s": args.seconds,
        "median_ratio": statistics.median(ratios) if ratios else None,
        "median_core_share": share,
        "rounds": rows,
    }
    print(
        f"peerd / ffmpeg CPU: median {summary['median_ratio']}x; one live input at real time"
        f" takes {share * 100:.2f}% of a core (demux + mux + hashing)"
    )
    (args.out / "llhls_bench.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
