#!/usr/bin/env python3
"""Glass-to-glass latency of a live input over WHIP in and WHEP out, against a direct call.

    .venv/bin/python scripts/bench/live_latency_bench.py [--seconds 10] [--out DIR]

The publisher (aiortc, its own process) draws each video frame with the wall clock burnt in
(24 black or white blocks: milliseconds, modulo 2^24) the moment aiortc asks for it, encodes it
as H.264 and publishes it over WHIP to a serving process (the WHIP ingest, the live WHEP fan-out
and peerd's HTTP app on 127.0.0.1; no decode on the node). A WHEP viewer (aiortc, its own
process) decodes every picture and reads the time back: latency = its clock then minus the time
in the picture (one machine, one clock).

Anchor, in the same run: the same publisher and viewer code connected directly (one process, one
peer connection each, no node): what aiortc's own encode, jitter buffer and decode take. The
difference is what the node adds. Prints the median and 95th percentile of both (ms) and writes
``<out>/live_latency_bench.json``. The issue's goal: WHEP <= 0.5 s on loopback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from fractions import Fraction
from functools import partial
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

W, H = 320, 240
BITS = 24
BLOCK = 12  # pixels per bit, across; the code row is 4 blocks tall
KEY = "latency-bench-key-0123456789"


def now_ms() -> int:
    return time.time_ns() // 1_000_000 % (1 << BITS)


def stamped_frame(ms: int, pts: int) -> Any:
    """A grey picture with ``ms`` burnt in as BITS blocks (white = 1), as yuv420p."""
    import av

    img = bytearray(b"\x80" * (W * H))
    for bit in range(BITS):
        value = 235 if ms >> (BITS - 1 - bit) & 1 else 16
        for y in range(H // 2 - 2 * BLOCK, H // 2 + 2 * BLOCK):
            x0 = 16 + bit * BLOCK
            img[y * W + x0 : y * W + x0 + BLOCK] = bytes([value]) * BLOCK
    frame = av.VideoFrame(W, H, "gray")
    frame.planes[0].update(bytes(img))
    frame = frame.reformat(format="yuv420p")
    frame.pts = pts
    frame.time_base = Fraction(1, 90000)
    return frame


def read_stamp(frame: Any) -> int:
    """The milliseconds burnt into a decoded picture."""
    gray = frame.reformat(width=W, height=H, format="gray")
    plane = gray.planes[0]
    data = bytes(plane)
    ms = 0
    for bit in range(BITS):
        x = 16 + bit * BLOCK + BLOCK // 2
        ms = ms << 1 | (data[(H // 2) * plane.line_size + x] > 128)
    return ms


def stamp_track() -> Any:
    from aiortc import VideoStreamTrack

    class Stamped(VideoStreamTrack):
        async def recv(self) -> Any:
            pts, _ = await self.next_timestamp()
            return stamped_frame(now_ms(), pts)

    return Stamped()


async def watch(track: Any, seconds: float, out: list[float]) -> None:
    """Decode ``track`` for ``seconds`` once the first picture came; latencies (ms) to ``out``."""
    first = await track.recv()
    end = time.monotonic() + seconds
    del first
    while time.monotonic() < end:
        frame = await track.recv()
        out.append(((now_ms() - read_stamp(frame)) % (1 << BITS)) / 1.0)


def prefer_h264(transceiver: Any) -> None:
    from aiortc import RTCRtpSender

    caps = RTCRtpSender.getCapabilities("video")
    transceiver.setCodecPreferences([c for c in caps.codecs if c.mimeType.lower() == "video/h264"])


async def direct(seconds: float) -> list[float]:
    """The anchor: publisher and viewer peer connections connected to each other."""
    from aiortc import RTCPeerConnection

    pub, view = RTCPeerConnection(), RTCPeerConnection()
    prefer_h264(pub.addTransceiver(stamp_track(), direction="sendonly"))
    got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    view.on("track", lambda t: got.done() or got.set_result(t))
    await pub.setLocalDescription(await pub.createOffer())
    await view.setRemoteDescription(pub.localDescription)
    await view.setLocalDescription(await view.createAnswer())
    await pub.setRemoteDescription(view.localDescription)
    out: list[float] = []
    try:
        await watch(await asyncio.wait_for(got, 20), seconds, out)
    finally:
        await pub.close()
        await view.close()
    return out


async def publish(url: str, seconds: float) -> None:
    """The WHIP publisher process: publish until killed (or ``seconds``)."""
    import aiohttp
    from aiortc import RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection()
    prefer_h264(pc.addTransceiver(stamp_track(), direction="sendonly"))
    await pc.setLocalDescription(await pc.createOffer())
    headers = {"Content-Type": "application/sdp", "Authorization": f"Bearer {KEY}"}
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=pc.localDescription.sdp, headers=headers) as r,
    ):
        if r.status != 201:
            raise RuntimeError(f"WHIP answered {r.status}: {await r.text()}")
        await pc.setRemoteDescription(RTCSessionDescription(await r.text(), "answer"))
    print("PUBLISHING", flush=True)
    await asyncio.sleep(seconds)
    await pc.close()


async def view(url: str, seconds: float) -> list[float]:
    """A WHEP viewer: latencies of ``seconds`` of pictures."""
    import aiohttp
    from aiortc import RTCPeerConnection, RTCSessionDescription

    pc = RTCPeerConnection()
    pc.addTransceiver("video", direction="recvonly")
    got: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    pc.on("track", lambda t: got.done() or got.set_result(t))
    await pc.setLocalDescription(await pc.createOffer())
    async with (
        aiohttp.ClientSession() as http,
        http.post(url, data=pc.localDescription.sdp, headers={"Content-Type": SDP}) as r,
    ):
        if r.status != 201:
            raise RuntimeError(f"WHEP answered {r.status}: {await r.text()}")
        await pc.setRemoteDescription(RTCSessionDescription(await r.text(), "answer"))
    out: list[float] = []
    try:
        await watch(await asyncio.wait_for(got, 20), seconds, out)
    finally:
        await pc.close()
    return out


SDP = "application/sdp"


async def serve(state: Path) -> None:
    """The node: WHIP ingest and live WHEP viewers of input ``cam``; prints both URLs."""
    from aiohttp import web

    from peerd.config import load_settings
    from peerd.core import tokens
    from peerd.core.live import Protocol_, Publication
    from peerd.http.server import build_app
    from peerd.live import whep as live_whep
    from peerd.live import whip
    from peerd.runtime import open_runtime
    from peerd.webrtc import routes as whep_routes
    from peerd.webrtc.session import WhepService
    from tests.support.whep_media import VIEWER_KEY, sign_viewers

    sign_viewers(state)
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    whep = WhepService(rt)
    ready = asyncio.Event()
    tasks = [asyncio.create_task(whep.run(ready.set))]
    await ready.wait()
    live = live_whep.LiveWhep(whep)

    class Inputs:
        def open(
            self, key: str, *, input: str | None, protocol: Protocol_, remote: str
        ) -> Publication:
            return Publication("cam", protocol, live.publication("cam"))

    ingest = whip.WhipIngest(rt, Inputs(), whep.ice)
    tasks.append(asyncio.create_task(ingest.run(lambda: None)))
    installers = [
        partial(whep_routes.install, whep=whep),
        partial(live_whep.install, live=live),
        partial(whip.install, whip=ingest),
    ]
    runner = web.AppRunner(build_app(rt, installers))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    token = tokens.mint(VIEWER_KEY, live_whep.media_id("cam"), "whep", int(time.time()) + 3600)
    print(f"URLS {base}/whip/cam {base}/whep/live/cam?token={token}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        for t in tasks:
            t.cancel()
        await runner.cleanup()


def summary(values: list[float]) -> dict[str, float]:
    if len(values) < 20:
        raise RuntimeError(f"only {len(values)} pictures measured")
    q = statistics.quantiles(values, n=20)
    return {
        "pictures": len(values),
        "median_ms": round(statistics.median(values), 1),
        "p95_ms": round(q[18], 1),
    }


def run_through_node(args: argparse.Namespace) -> list[float]:
    me = [sys.executable, __file__]
    server = subprocess.Popen(
        [*me, "--serve", str(args.out / "node")], stdout=subprocess.PIPE, text=True
    )
    publisher: subprocess.Popen[str] | None = None
    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("URLS "):
            raise RuntimeError(f"server failed: {line!r}")
        whip_url, whep_url = line.split()[1:]
        publisher = subprocess.Popen(
            [*me, "--publish", whip_url, "--seconds", str(args.seconds + 30)],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert publisher.stdout is not None
        if not publisher.stdout.readline().startswith("PUBLISHING"):
            raise RuntimeError("publisher failed")
        time.sleep(2)  # the publication begins at the first keyframe
        viewer = subprocess.run(
            [*me, "--view", whep_url, "--seconds", str(args.seconds)],
            stdout=subprocess.PIPE,
            text=True,
            check=True,
            timeout=args.seconds + 60,
        )
        values: list[float] = json.loads(viewer.stdout.split("RESULT ", 1)[1])
        return values
    finally:
        for p in (publisher, server):
            if p is not None:
                p.terminate()
                p.wait(20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/peerd-bench/live-latency"))
    ap.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--publish", metavar="URL", help=argparse.SUPPRESS)
    ap.add_argument("--view", metavar="URL", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return 0
    if args.publish:
        asyncio.run(publish(args.publish, args.seconds))
        return 0
    if args.view:
        print("RESULT " + json.dumps(asyncio.run(view(args.view, args.seconds))), flush=True)
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    node = summary(run_through_node(args))
    anchor = summary(asyncio.run(direct(args.seconds)))
    result = {
        "whip_to_whep_via_node": node,
        "direct_aiortc_call": anchor,
        "node_adds_median_ms": round(node["median_ms"] - anchor["median_ms"], 1),
        "ratio_median": round(node["median_ms"] / anchor["median_ms"], 2)
        if anchor["median_ms"] > 0
        else None,
        "goal_ms": 500,
    }
    (args.out / "live_latency_bench.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
