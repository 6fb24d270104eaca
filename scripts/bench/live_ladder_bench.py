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

``--live`` measures the same at real time over RTMP instead (``--seconds`` each, so keep it
short): a real daemon (``peerd run``, recording off) with the ladder on, then off, while ffmpeg
publishes the clip (``-re -c copy -f flv``); the daemon's CPU (``/proc/<pid>/stat``) in each,
and their difference (what the ladder costs). Anchor, same round: the ffmpeg CLI listening for
RTMP (``ffmpeg -listen 1 -i rtmp://...``) doing the same transcode as it arrives (its CPU from
``wait4``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
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
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.TemporaryDirectory(dir=out) as d:
        subprocess.run(  # noqa: S603 - fixed argument list
            ["ffmpeg", "-v", "error", "-nostdin", "-y", "-threads", str(threads)]
            + ["-i", str(clip), *_transcode_args(height, kbps, threads)]
            + ["-hls_playlist_type", "event", f"{d}/index.m3u8"],
            check=True,
        )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


PUBLISH = ["ffmpeg", "-v", "error", "-nostdin", "-re"]


def _transcode_args(height: int, kbps: int, threads: int) -> list[str]:
    rate = f"{kbps}k"
    return [
        "-map", "0:v", "-map", "0:a",
        "-vf", f"scale=-2:{height}", "-c:v", "libx264", "-threads", str(threads),
        "-preset", "veryfast", "-tune", "zerolatency",
        "-b:v", rate, "-maxrate", rate, "-bufsize", rate,
        "-force_key_frames", "source", "-x264-params", "keyint=infinite:scenecut=0",
        "-c:a", "copy", "-f", "hls", "-hls_segment_type", "fmp4", "-hls_time", "2",
    ]  # fmt: skip


def _proc_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def daemon_cpu(clip: Path, out: Path, height: int, kbps: int, ladder: bool) -> float:
    """CPU seconds of a real daemon while ffmpeg publishes ``clip`` to it in real time."""
    from tests.support.process import PeerdProcess

    key = "bench-key-" + "b" * 32
    rungs = [{"height": height, "bitrate_kbps": kbps}] if ladder else []
    with tempfile.TemporaryDirectory(dir=out) as d:
        node = PeerdProcess(
            Path(d) / "node",
            config={
                "live": {
                    "inputs": [{"name": "bench", "record": False}],
                    "rtmp_listen": "127.0.0.1:0",
                    "ladder": rungs,
                    "ladder_cpu_percent": 800.0,
                },
                "log": {"level": "info"},
            },
        )
        node.init()
        (node.state_dir / "secrets" / "live-bench.key").write_text(key + "\n")
        node.start()
        try:
            assert node.proc is not None
            addr = (node.state_dir / "rtmp.addr").read_text().strip()
            before = _proc_cpu(node.proc.pid)
            pub = subprocess.run(  # noqa: S603 - fixed argument list
                [*PUBLISH, "-i", str(clip), "-c", "copy", "-f", "flv", f"rtmp://{addr}/live/{key}"],
                check=False,
            )
            if pub.returncode != 0:  # the work was done; say so rather than lose the round
                print(f"publisher exited with {pub.returncode} (ladder={ladder})", flush=True)
            time.sleep(1.0)  # the last frames' work
            used = _proc_cpu(node.proc.pid) - before
            if ladder and "live ladder started" not in node.logs():
                raise RuntimeError("the daemon started no ladder:\n" + node.logs()[-2000:])
        finally:
            node.stop()
    return used


def ffmpeg_rtmp_cpu(clip: Path, out: Path, height: int, kbps: int, threads: int) -> float:
    """CPU seconds of the ffmpeg CLI receiving ``clip`` over RTMP in real time and transcoding."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"rtmp://127.0.0.1:{port}/live/bench"
    with tempfile.TemporaryDirectory(dir=out) as d:
        listener = subprocess.Popen(  # noqa: S603 - fixed argument list
            ["ffmpeg", "-v", "error", "-nostdin", "-y", "-threads", str(threads)]
            + ["-listen", "1", "-i", url, *_transcode_args(height, kbps, threads)]
            + ["-hls_playlist_type", "event", f"{d}/index.m3u8"]
        )
        deadline = time.monotonic() + 10
        while True:  # until the listener takes the publisher
            pub = subprocess.run(  # noqa: S603 - fixed argument list
                [*PUBLISH, "-i", str(clip), "-c", "copy", "-f", "flv", url],
                check=False,
                stderr=subprocess.DEVNULL,  # "connection refused" until the listener is up
            )
            if pub.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        _, status, usage = os.wait4(listener.pid, 0)
        listener.returncode = os.waitstatus_to_exitcode(status)
    if pub.returncode != 0 or listener.returncode != 0:
        raise RuntimeError(f"ffmpeg failed: publisher {pub.returncode}, {listener.returncode}")
    return usage.ru_utime + usage.ru_stime


def live_rounds(args: argparse.Namespace, clip: Path, height: int, kbps: int) -> None:
    """The ``--live`` rounds: daemon with and without the ladder, ffmpeg over RTMP."""
    rows = []
    for r in range(args.rounds):
        on = daemon_cpu(clip, args.out, height, kbps, ladder=True)
        off = daemon_cpu(clip, args.out, height, kbps, ladder=False)
        theirs = ffmpeg_rtmp_cpu(clip, args.out, height, kbps, args.ffmpeg_threads)
        rows.append(
            {
                "round": r,
                "daemon_ladder_on_cpu_s": round(on, 2),
                "daemon_ladder_off_cpu_s": round(off, 2),
                "ladder_cpu_s": round(on - off, 2),
                "ffmpeg_rtmp_cpu_s": round(theirs, 2),
                "ratio": round((on - off) / theirs, 2) if theirs else None,
                "daemon_core_share_on": round(on / args.seconds, 4),
            }
        )
        print(rows[-1], flush=True)
    summary = {
        "clip": str(clip),
        "media_s": args.seconds,
        "rung": args.rung,
        "ffmpeg_threads": args.ffmpeg_threads,
        "median_ratio": statistics.median(x["ratio"] for x in rows if x["ratio"] is not None),
        "median_core_share_on": statistics.median(x["daemon_core_share_on"] for x in rows),
        "rounds": rows,
    }
    print(
        f"ladder (daemon on - off) / ffmpeg CLI over RTMP CPU: median {summary['median_ratio']}x;"
        f" the daemon with one {args.size} input and a {height}p rung takes"
        f" {summary['median_core_share_on'] * 100:.1f}% of a core"
    )
    (args.out / "live_ladder_bench_live.json").write_text(json.dumps(summary, indent=2))


def main() -> None:
    """Run the rounds and print the table."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--size", default="1280x720")
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--rung", default="360:800", help="height:kbps")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--ffmpeg-threads", type=int, default=1)
    ap.add_argument("--live", action="store_true", help="a real daemon and ffmpeg over RTMP")
    ap.add_argument("--out", type=Path, default=Path("/tmp/peerd-bench/ladder"))  # noqa: S108
    args = ap.parse_args()
    from tests.support.live_media import make_live_clip

    args.out.mkdir(parents=True, exist_ok=True)
    w, h = (int(x) for x in args.size.split("x"))
    height, kbps = (int(x) for x in args.rung.split(":"))
    clip = args.out / f"live_{w}x{h}_{args.fps}_{int(args.seconds)}s.mp4"
    if not clip.is_file():
        make_live_clip(clip, seconds=args.seconds, size=(w, h), fps=args.fps)
    if args.live:
        live_rounds(args, clip, height, kbps)
        return
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
        f"peerd / ffmpeg CPU: median {round(summary['median_ratio'] or 0, 2)}x; a {args.size}"
        f" input with a {height}p rung at real time takes {share * 100:.1f}% of a core"
        " (decode + scale + encode + mux)"
    )
    (args.out / "live_ladder_bench.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
