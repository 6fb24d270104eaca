#!/usr/bin/env python3
"""CPU per WHEP viewer of a live passthrough input, against on-demand WHEP in the same run.

    .venv/bin/python scripts/bench/live_whep_bench.py [--sessions 10] [--seconds 10]
        [--height 720] [--bitrate 2500000] [--out /tmp/peerd-bench/live-whep]

1. Encodes a live-style clip (testsrc2 + tone, H.264 High without B-frames, CBR ``--bitrate``,
   AAC 44.1 kHz: what an RTMP publisher sends), the shape of the on-demand bench's clip; the
   viewers offer High, so both pass the video through.
2. Starts a serving process (this script with ``--serve``): a runtime, the WHEP service, the live
   WHEP fan-out and peerd's HTTP app on 127.0.0.1, and a publication of input ``cam`` fed with
   the clip's frames in real time, looped with increasing timestamps (the livefeed harness's
   frames, as the live service would hand them over).
3. Measures the serving process's CPU with the publication running and no viewer (the input's
   own cost), then with ``--sessions`` aiortc viewers receiving (in a separate process, no
   decoding: ``whep_bench.run_viewers``); the difference per viewer is the fan-out's cost (the
   one AAC->Opus transcode of the input, started by the first viewer, included).
4. Anchor, in the same run: ``scripts/bench/whep_bench.py`` (on-demand WHEP passthrough of the
   same shape, a real daemon) with the same sessions, seconds, height and bitrate.

Prints viewers per core for both and their ratio; writes ``<out>/live_whep_bench.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts" / "bench"))

from whep_bench import run_viewers, sample_cpu  # noqa: E402


async def serve(clip: Path, state: Path, sessions: int) -> None:
    """The serving process: prints ``URL <viewer url>`` once ready, then feeds forever."""
    from aiohttp import web

    from peerd.config import load_settings
    from peerd.core import tokens
    from peerd.http.server import build_app
    from peerd.live import whep as live_whep
    from peerd.runtime import open_runtime
    from peerd.webrtc import routes as whep_routes
    from peerd.webrtc.session import WhepService
    from tests.support.livefeed import read_file
    from tests.support.whep_media import VIEWER_KEY, sign_viewers

    sign_viewers(state)
    rt = await open_runtime(
        load_settings(None, node={"state_dir": state}, webrtc={"max_sessions": sessions + 2})
    )
    whep = WhepService(rt)
    ready = asyncio.Event()
    service = asyncio.create_task(whep.run(ready.set))
    await ready.wait()
    live = live_whep.LiveWhep(whep)
    installers = [partial(whep_routes.install, whep=whep), partial(live_whep.install, live=live)]
    runner = web.AppRunner(build_app(rt, installers))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    token = tokens.mint(VIEWER_KEY, live_whep.media_id("cam"), "whep", int(time.time()) + 3600)
    tracks, frames = read_file(clip)
    span = max(f.dts / tracks[f.track].timescale for f in frames) + 0.04
    sink = live.publication("cam")
    sink.begin(tracks)
    print(f"URL http://127.0.0.1:{port}/whep/live/cam?token={token}", flush=True)
    loop = asyncio.get_running_loop()
    start = loop.time()
    lap = 0
    try:
        while True:
            for f in frames:
                ts = tracks[f.track].timescale
                shift = round(lap * span * ts)
                due = start + lap * span + f.dts / ts
                if (delay := due - loop.time()) > 0:
                    await asyncio.sleep(delay)
                sink.frame(replace(f, dts=f.dts + shift, pts=f.pts + shift))
            lap += 1
    finally:
        sink.end("unpublished")
        service.cancel()
        await runner.cleanup()


def make_clip(out: Path, height: int, bitrate: int) -> Path:
    from tests.support.live_media import make_live_clip

    width = height * 16 // 9 // 2 * 2
    return make_live_clip(
        out / "live.mp4",
        seconds=6,
        size=(width, height),
        profile="high",
        video_bitrate=bitrate,
    )


def live_figure(args: argparse.Namespace) -> dict[str, Any]:
    clip = make_clip(args.out, args.height, args.bitrate)
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(clip), "--state", str(args.out / "node")]
        + ["--sessions", str(args.sessions)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("URL "):
            raise RuntimeError(f"server failed: {line!r}")
        url = line.split(" ", 1)[1].strip()
        time.sleep(2)
        idle = sample_cpu(server.pid, 3)
        client = subprocess.Popen(
            [sys.executable, __file__, "--client", url, "--sessions", str(args.sessions)]
            + ["--seconds", str(args.seconds + 3)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert client.stdout is not None
        line = client.stdout.readline()
        if not line.startswith("CONNECTED"):
            client.wait(30)
            raise RuntimeError(f"viewers failed: {line!r}")
        time.sleep(2)
        busy = sample_cpu(server.pid, args.seconds)
        rest = client.communicate(timeout=120)[0]
        viewers = json.loads(rest.split("RESULT ", 1)[1])
    finally:
        server.terminate()
        server.wait(20)
    per_viewer = (busy - idle) / args.sessions
    return {
        "server_cpu_input_only_pct": round(idle, 2),
        "server_cpu_busy_pct": round(busy, 2),
        "cpu_pct_per_viewer": round(per_viewer, 2),
        "viewers_per_core": round(100.0 / per_viewer, 1) if per_viewer > 0 else None,
        "viewer_video_mbit_per_s_min": round(min(viewers["video_mbit_per_s"]), 2),
        "viewer_video_frames_per_s_min": round(min(viewers["video_frames_per_s"]), 1),
        "viewer_audio_packets_per_s_min": round(min(viewers["audio_packets_per_s"]), 1),
    }


def ondemand_figure(args: argparse.Namespace) -> dict[str, Any]:
    out = args.out / "ondemand"
    cmd = [sys.executable, str(REPO / "scripts" / "bench" / "whep_bench.py")]
    cmd += ["--sessions", str(args.sessions), "--seconds", str(args.seconds)]
    cmd += ["--height", str(args.height), "--bitrate", str(args.bitrate), "--out", str(out)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)  # noqa: S603
    result: dict[str, Any] = json.loads((out / "whep_bench.json").read_text())
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sessions", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--bitrate", type=int, default=2_500_000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/peerd-bench/live-whep"))
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--state", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--client", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve, args.state, args.sessions))
        return 0
    if args.client:
        result = asyncio.run(run_viewers(args.client, args.sessions, args.seconds))
        print("RESULT " + json.dumps(result), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    live = live_figure(args)
    ondemand = ondemand_figure(args)
    od = ondemand.get("sessions_per_core")
    lv = live.get("viewers_per_core")
    result = {
        "sessions": args.sessions,
        "height": args.height,
        "video_bitrate": args.bitrate,
        **{f"live_{k}": v for k, v in live.items()},
        "ondemand_cpu_pct_per_session": ondemand.get("cpu_pct_per_session"),
        "ondemand_sessions_per_core": od,
        "live_to_ondemand_viewers_per_core": round(lv / od, 2) if lv and od else None,
        "goal_viewers_per_core": 16,
    }
    (args.out / "live_whep_bench.json").write_text(json.dumps(result, indent=2))
    for k, v in result.items():
        print(f"{k:38} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
