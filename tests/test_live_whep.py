"""WHEP viewers of a live input, from outside: aiortc viewers in their own processes.

A publication (a Main-profile H.264 + AAC clip fed in real time by ``tests/support/livefeed``, as
an RTMP publisher would send it) goes to the WHEP fan-out, served by peerd's own app (WHEP
routes, the live routes, the viewer authorization) over loopback. Viewers decode its picture
and its sound (a 440 Hz tone, AAC turned into Opus by the node); several viewers at once cost
one AAC decode and Opus encode for the input and no video encode at all; a forged token is 403.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import aiohttp
import av
import pytest
from aiohttp import web
from aiortc.mediastreams import MediaStreamError

from peerd.config import load_settings
from peerd.core import tokens
from peerd.core.live import Protocol_, Publication, match_key
from peerd.errors import Unauthorized
from peerd.http.server import build_app
from peerd.live import whep as live_whep
from peerd.live import whip
from peerd.runtime import Runtime, open_runtime
from peerd.webrtc import routes as whep_routes
from peerd.webrtc.session import WhepService
from tests.support.live_media import TONE_HZ, make_live_clip
from tests.support.livefeed import feed
from tests.support.poll import until
from tests.support.whep_media import VIEWER_KEY, sign_viewers
from tests.support.whep_viewer import ViewerProcess, make_offer
from tests.support.whip_publisher import PublisherProcess

WHIP_KEY = "whip-test-key-0123456789"


class Inputs:
    """One input ``cam`` whose publications go to the WHEP fan-out alone (no live service)."""

    def __init__(self, live: live_whep.LiveWhep) -> None:
        self.live = live

    def open(self, key: str, *, input: str | None, protocol: Protocol_, remote: str) -> Publication:
        if match_key(key, [("cam", WHIP_KEY)]) != "cam" or input != "cam":
            raise Unauthorized("wrong key")
        return Publication("cam", protocol, self.live.publication("cam"))


@dataclass
class Node:
    base: str
    rt: Runtime
    whep: WhepService
    live: live_whep.LiveWhep

    def url(self, input: str, *, key: bytes = VIEWER_KEY, path: str = "/whep/live/") -> str:
        token = tokens.mint(key, live_whep.media_id(input), "whep", int(time.time()) + 600)
        return f"{self.base}{path}{input}?token={token}"


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    state = tmp_path / "state"
    sign_viewers(state)
    rt = await open_runtime(
        load_settings(None, node={"state_dir": state}, webrtc={"connect_timeout_s": 20})
    )
    whep = WhepService(rt)
    ready = asyncio.Event()
    task = asyncio.create_task(whep.run(ready.set))
    await ready.wait()
    live = live_whep.LiveWhep(whep)
    ingest = whip.WhipIngest(rt, Inputs(live), whep.ice)
    ingesting = asyncio.create_task(ingest.run(ready.set))
    installers = [
        partial(whep_routes.install, whep=whep),
        partial(live_whep.install, live=live),
        partial(whip.install, whip=ingest),
    ]
    runner = web.AppRunner(build_app(rt, installers))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield Node(f"http://127.0.0.1:{runner.addresses[0][1]}", rt, whep, live)
    finally:
        for t in (task, ingesting):
            t.cancel()
        await asyncio.gather(task, ingesting, return_exceptions=True)
        await runner.cleanup()
        await rt.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_live_clip(tmp_path_factory.mktemp("live") / "main.mp4", seconds=40)


async def grows(viewer: ViewerProcess, video: int = 25, audio: int = 25) -> dict[str, object]:
    """Wait until the viewer decodes ``video`` more pictures and ``audio`` more sound frames."""
    start = await viewer.stats()
    last: dict[str, object] = {}

    async def grew() -> bool:
        nonlocal last
        last = await viewer.stats()
        return bool(
            last["video"] >= start["video"] + video and last["audio"] >= start["audio"] + audio
        )

    await until(grew, timeout_s=60, step_s=0.2)
    return last


def metric(rt: Runtime, name: str, **labels: str) -> float:
    return rt.metrics.registry.get_sample_value(name, labels) or 0.0


async def test_live_viewers_share_one_conversion(node: Node, clip: Path) -> None:
    offer = await make_offer()
    async with aiohttp.ClientSession() as http:
        # Before the input is live: nothing to watch.
        async with http.post(
            node.url("cam"), data=offer, headers={"Content-Type": "application/sdp"}
        ) as r:
            assert r.status == 404, await r.text()
    sink = node.live.publication("cam")
    publisher = asyncio.create_task(feed(sink, clip, speed=1.0))
    viewers: list[ViewerProcess] = []
    try:
        # A token signed with another key, or for another input, is refused.
        forged = await ViewerProcess.start(node.url("cam", key=b"not-the-viewer-key".ljust(32)))
        viewers.append(forged)
        assert forged.status == 403
        other = await ViewerProcess.start(node.url("other").replace("/other?", "/cam?"))
        viewers.append(other)
        assert other.status == 403
        absent = await ViewerProcess.start(node.url("other"))
        viewers.append(absent)
        assert absent.status == 404

        first = await ViewerProcess.start(node.url("cam"))
        viewers.append(first)
        assert first.status == 201, first.sdp
        assert first.location is not None
        assert first.location.startswith("/whep/sessions/")
        stats = await grows(first, video=50, audio=50)
        assert stats["widths"] == [320], stats
        assert abs(float(str(stats["tone"])) - TONE_HZ) < 20, stats

        more = [await ViewerProcess.start(node.url("cam")) for _ in range(3)]
        viewers += more
        assert [v.status for v in more] == [201, 201, 201], [v.sdp for v in more]
        for v in [first, *more]:
            await grows(v)
        assert node.live.viewers("cam") == 4
        fan = node.live.fanouts["cam"]
        assert isinstance(fan, live_whep.Fanout)
        # One AAC decode and Opus encode for the input, whatever the number of viewers ...
        assert metric(node.rt, "peerd_live_whep_transcoders_total", kind="audio") == 1
        assert metric(node.rt, "peerd_live_whep_transcoders_total", kind="video") == 0
        assert fan.audio_worker is not None
        assert isinstance(fan.audio_worker.converter, live_whep.AacToOpus)
        assert fan.audio_worker.converter.encoded > 0
        assert fan.video_worker is None
        # ... and no picture handed to an encoder: every viewer's video is packets passed on.
        sessions = [s for s in node.whep.sessions.values() if s.media_id == "live:cam"]
        assert len(sessions) == 4
        for s in sessions:
            assert s.mode == "live"
            for t in s.tracks:
                assert isinstance(t, live_whep.ViewerTrack)
                assert t.sent > 0
                assert t.frames == 0
        # The viewer's DELETE goes to the ordinary WHEP session URL, with the live token.
        async with (
            aiohttp.ClientSession() as http,
            http.delete(
                f"{node.base}{more[0].location}?token={node.url('cam').split('=')[1]}"
            ) as r,
        ):
            assert r.status == 200
        await until(lambda: node.live.viewers("cam") == 3, timeout_s=10)
    finally:
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        sink.end("unpublished")
        for v in viewers:
            await v.close()
    # The publication's end ends its viewers' sessions.
    await until(lambda: not node.whep.sessions, timeout_s=20)
    assert metric(node.rt, "peerd_whep_sessions_closed_total", reason="live_ended") >= 1


async def test_viewers_without_the_inputs_profile_share_one_reencode(
    node: Node, tmp_path: Path
) -> None:
    """A High-profile input (OBS's x264 default) to viewers offering Constrained Baseline only
    (a Chromium without a High decoder): one decode and one encode for the input, shared."""
    high = await asyncio.to_thread(
        make_live_clip, tmp_path / "high.mp4", seconds=30, profile="high"
    )
    sink = node.live.publication("cam")
    publisher = asyncio.create_task(feed(sink, high, speed=1.0))
    viewers: list[ViewerProcess] = []
    try:
        for _ in range(2):
            v = await ViewerProcess.start(node.url("cam"), h264="")
            viewers.append(v)
            assert v.status == 201, v.sdp
            assert "profile-level-id=42e01f" in v.sdp, v.sdp
        # A viewer that takes High gets the input's own stream.
        direct = await ViewerProcess.start(node.url("cam"))
        viewers.append(direct)
        assert direct.status == 201, direct.sdp
        for v in viewers:
            stats = await grows(v, video=50)
            assert stats["widths"] == [320], stats
        fan = node.live.fanouts["cam"]
        assert isinstance(fan, live_whep.Fanout)
        assert fan.video_worker is not None
        conv = fan.video_worker.converter
        assert isinstance(conv, live_whep.H264ToBaseline)
        assert conv.encoded > 0
        assert metric(node.rt, "peerd_live_whep_transcoders_total", kind="video") == 1
        modes = sorted(s.mode for s in node.whep.sessions.values())
        assert modes == ["live", "live-transcode", "live-transcode"], modes
    finally:
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        sink.end("unpublished")
        for v in viewers:
            await v.close()


async def test_without_transcoding_a_viewer_without_the_profile_is_refused(
    node: Node, tmp_path: Path
) -> None:
    node.whep.cfg = node.whep.cfg.model_copy(update={"transcode": False})
    high = await asyncio.to_thread(make_live_clip, tmp_path / "high.mp4", seconds=5, profile="high")
    sink = node.live.publication("cam")
    publisher = asyncio.create_task(feed(sink, high, speed=1.0))
    try:
        await until(lambda: node.live.fanouts["cam"].begun, timeout_s=10)
        v = await ViewerProcess.start(node.url("cam"), h264="")
        await v.close()
        assert v.status == 400
        assert "no H.264 profile that decodes" in v.sdp, v.sdp
        assert metric(node.rt, "peerd_whep_rejected_total", reason="codec") == 1
    finally:
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        sink.end("unpublished")


async def test_a_slow_viewer_skips_to_the_next_keyframe() -> None:
    """A viewer that does not keep up never queues more than its bound: its video restarts at
    the next keyframe, its sound loses the oldest packets."""
    video = live_whep.ViewerTrack("video", 4)
    audio = live_whep.ViewerTrack("audio", 4)
    packets = [av.Packet(bytes([i])) for i in range(12)]
    video.push(packets[0], False)  # before the first keyframe: not queued
    assert video.queue.qsize() == 0
    for i in range(1, 7):  # keyframe at 1, then deltas: the 5th overflows
        video.push(packets[i], i == 1)
    assert video.queue.qsize() == 0
    assert video.waiting_key
    video.push(packets[7], False)
    video.push(packets[8], True)
    assert video.queue.qsize() == 1
    assert bytes(await video.recv()) == b"\x08"
    for p in packets:
        audio.push(p, True)
    assert audio.queue.qsize() == 4
    assert [bytes(await audio.recv()) for _ in range(4)] == [bytes([i]) for i in range(8, 12)]
    video.end()
    with pytest.raises(MediaStreamError):
        await video.recv()


async def test_whip_publisher_to_whep_viewers(node: Node, clip: Path) -> None:
    """WHIP in, WHEP out: an aiortc publisher's H.264 and Opus reach an aiortc viewer as they
    were sent (no conversion at all for this input)."""
    publisher = await PublisherProcess.start(f"{node.base}/whip/cam", str(clip), key=WHIP_KEY)
    viewer: ViewerProcess | None = None
    try:
        assert publisher.status == 201, publisher.sdp
        await until(lambda: "cam" in node.live.fanouts and node.live.fanouts["cam"].begun, 60)
        viewer = await ViewerProcess.start(node.url("cam"))
        assert viewer.status == 201, viewer.sdp
        stats = await grows(viewer, video=50, audio=50)
        assert stats["widths"] == [320], stats
        assert abs(float(str(stats["tone"])) - TONE_HZ) < 20, stats
        fan = node.live.fanouts["cam"]
        assert fan.audio is not None
        assert fan.audio.codec == "opus"
        assert fan.audio_worker is None
        assert fan.video_worker is None
        assert await publisher.delete() == 200
        await until(lambda: not node.whep.sessions, timeout_s=20)
    finally:
        await publisher.close()
        if viewer is not None:
            await viewer.close()
