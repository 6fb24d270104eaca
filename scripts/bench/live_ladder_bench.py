#!/usr/bin/env python3
"""CPU of one live input's ABR ladder (one rung) against the ffmpeg CLI doing the same transcode.

    .venv/bin/python scripts/bench/live_ladder_bench.py [--seconds 60] [--size 1280x720]
        [--rung 360:800] [--rounds 3] [--ffmpeg-threads 1] [--out /tmp/peerd-bench/ladder]

1. Makes a clip (H.264 without B-frames, a keyframe a second, AAC: what a live publisher
   sends) with ffmpeg, once.
2. Each round, peerd: the clip's frames as a publisher hands them over
   (``tests/support/livefeed.read_file``) through the ladder's own pieces
   (:mod:`peerd.live.ladder`: one single-threaded decode, the rung's scaling and libx264
   ``veryfast``/``zerolatency`` encode with an IDR forced on each source keyframe) and the rung's
   LL-HLS :class:`peerd.live.llhls.Muxer` (with the source audio), as fast as it goes, in this
   process: the CPU seconds of the thread doing it (``time.thread_time``, what the ladder's CPU
   budget charges) and of the process.
3. Anchor, same round: the ffmpeg CLI doing the same (``-vf scale=-2:<h> -c:v libx264 -preset
   veryfast -tune zerolatency -b:v/-maxrate/-bufsize <kbps>k -force_key_frames source
   -x264-params keyint=infinite:scenecut=0 -c:a copy -f hls -hls_segment_type fmp4``), decoder
   and encoder on ``--ffmpeg-threads`` threads (1: as the ladder runs; 0: ffmpeg's default), its
   CPU seconds (``RUSAGE_CHILDREN``).

Prints per round the CPU seconds of each, the ratio peerd / ffmpeg and the ladder's share of one
core at real time (CPU seconds / media seconds: what ``[live] ladder_cpu_percent`` must allow for
this input); writes them as JSON to ``<out>/live_ladder_bench.json``.
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
from fractions import Fraction
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def peerd_cpu(clip: Path, height: int, kbps: int) -> tuple[float, float]:
    """(thread, process) CPU seconds to transcode ``clip``'s video to one rung and package it."""
    import av

    from peerd.core.ladder import LiveRung
    from peerd.live.ladder import _Coder, _decode
    from peerd.live.llhls import Muxer
    from tests.support.livefeed import read_file

    tracks, frames = read_file(clip)
    video = next(t for t in tracks if t.codec == "h264")
    audio = [t for t in tracks if t.kind == "audio"]
    t0, p0 = time.thread_time(), time.process_time()
    decoder: Any = av.CodecContext.create("h264", "r")
    decoder.extradata = video.config
    decoder.thread_count = 1
    coder: _Coder | None = None
    muxer: Muxer | None = None
    early: list[Any] = []
    for f in frames:
        if f.track != video.index:
            if muxer is not None:
                muxer.frame(f)
            continue
        for pic in _decode(decoder, f):
            if coder is None:
                early.append(pic)
                if len(early) < 2:
                    continue
                tick = (early[1].pts or 0) - (early[0].pts or 0)
                fps = Fraction(video.timescale, tick) if tick > 0 else Fraction(30)
                coder = _Coder(LiveRung(height, kbps), video, pic.width, pic.height, fps)
                muxer = Muxer([coder.track, *audio], 0.5, 2.0)
                ready, early = early, []
            else:
                ready = [pic]
            for p in ready:
                assert muxer is not None
                for out in coder.encode(p, 0):
                    muxer.frame(out)
    if muxer is not None:
        muxer.end("unpublished")
    return time.thread_time() - t0, time.process_time() - p0


def ffmpeg_cpu(clip: Path, out: Path, height: int, kbps: int, threads: int) -> float:
    """CPU seconds of the ffmpeg CLI transcoding ``clip``'s video to the rung as fMP4 HLS."""
    rate = f"{kbps}k"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory(dir=out) as d:
        subprocess.run(  # noqa: S603 - fixed argument list
            [
                "ffmpeg", "-v", "error", "-nostdin", "-y", "-threads", str(threads),
                "-i", str(clip), "-map", "0:v", "-map", "0:a",
                "-vf", f"scale=-2:{height}", "-c:v", "libx264", "-threads", str(threads),
                "-preset", "veryfast", "-tune", "zerolatency",
                "-b:v", rate, "-maxrate", rate, "-bufsize", rate,
                "-force_key_frames", "source", "-x264-params", "keyint=infinite:scenecut=0",
                "-c:a", "copy", "-f", "hls", "-hls_segment_type", "fmp4", "-hls_time", "2",
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
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--rung", default="360:800", help="height:kbps")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ffmpeg-threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("/tmp/peerd-bench/ladder"))  # noqa: S108
    args = ap.parse_args()
    from tests.support.live_media import make_live_clip

    args.out.mkdir(parents=True, exist_ok=True)
    w, h = (int(x) for x in args.size.split("x"))
    height, kbps = (int(x) for x in args.rung.split(":"))
    clip = args.out / f"live_{w}x{h}_{args.fps}_{int(args.seconds)}s.mp4"
    if not clip.is_file():
        make_live_clip(clip, seconds=args.seconds, size=(w, h), fps=args.fps)
    rows = []
    for r in range(args.rounds):
        thread_s, process_s = peerd_cpu(clip, height, kbps)
        theirs = ffmpeg_cpu(clip, args.out, height, kbps, args.ffmpeg_threads)
        rows.append(
            {
                "round": r,
                "peerd_thread_cpu_s": round(thread_s, 3),
                "peerd_process_cpu_s": round(process_s, 3),
                "ffmpeg_cpu_s": round(theirs, 3),
                "ratio": round(process_s / theirs, 2) if theirs else None,
                "peerd_core_share": round(process_s / args.seconds, 4),
            }
        )
        print(rows[-1], flush=True)
    ratios = [x["ratio"] for x in rows if x["ratio"] is not None]
    share = statistics.median(x["peerd_core_share"] for x in rows)
    summary = {
        "clip": str(clip),
        "media_s": args.seconds,
        "rung": args.rung,
        "ffmpeg_threads": args.ffmpeg_threads,
        "median_ratio": statistics.median(ratios) if ratios else None,
        "median_core_share": share,
        "rounds": rows,
    }
    print(
        f"peerd / ffmpeg CPU: median {summary['median_ratio']}x; a {args.size} input with a"
        f" {height}p rung at real time takes {share * 100:.1f}% of a core (decode + scale +"
        " encode + mux)"
    )
    (args.out / "live_ladder_bench.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
