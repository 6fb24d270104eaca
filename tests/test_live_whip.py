"""WHIP ingest from outside: an aiortc client publishes H.264 and Opus to the node's WHIP route.

The route is served by a real aiohttp app (peerd's own ``build_app``) over loopback; the
publisher is aiortc in its own process (``tests/support/whip_publisher.py``) playing a synthetic
clip; the live inputs are a fake that records what the publication delivers. What arrives must
decode with PyAV (the avcC and the length-prefixed H.264 frames, the Opus packets): the node
itself never decodes.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import aiohttp
import av
import pytest
from aiohttp import web
from aiortc import RTCPeerConnection
from aiortc.jitterbuffer import JitterFrame

from peerd.core.live import LiveFrame, LiveTrack, Protocol_, Publication, match_key
from peerd.errors import Conflict, NotFound, Unauthorized
from peerd.http.server import build_app
from peerd.live import whip
from peerd.runtime import Runtime
from peerd.webrtc.ice import StaticIce
from tests.support.media import make_media
from tests.support.poll import until
from tests.support.whep_viewer import make_offer
from tests.support.whip_publisher import PublisherProcess

KEY = "cam-stream-key-0123456789"
SIZE = (320, 240)


@dataclass
class Recorded:
    """What one publication delivered."""

    tracks: list[LiveTrack] = field(default_factory=list)
    frames: list[LiveFrame] = field(default_factory=list)
    ended: str | None = None

    def begin(self, tracks: Sequence[LiveTrack]) -> None:
        assert not self.tracks
        assert self.ended is None
        self.tracks = list(tracks)

    def frame(self, frame: LiveFrame) -> None:
        assert self.tracks
        assert self.ended is None
        self.frames.append(frame)

    def end(self, reason: str) -> None:
        assert self.ended is None
        self.ended = reason

    def count(self, kind: str) -> int:
        idx = {t.index for t in self.tracks if t.kind == kind}
        return sum(1 for f in self.frames if f.track in idx)


class FakeInputs:
    """LiveInputs with one input ``cam``: one publisher at a time, every publication recorded."""

    def __init__(self) -> None:
        self.publications: list[Recorded] = []
        self.connected = False

    def open(self, key: str, *, input: str | None, protocol: Protocol_, remote: str) -> Publication:
        if input not in (None, "cam"):
            raise NotFound(f"no live input {input}")
        if match_key(key, [("cam", KEY)]) is None:
            raise Unauthorized("wrong stream key")
        if self.connected:
            raise Conflict("input cam already has a publisher")
        self.connected = True
        rec = Recorded()
        original_end = rec.end

        def end(reason: str) -> None:
            original_end(reason)
            self.connected = False

        rec.end = end  # type: ignore[method-assign]
        self.publications.append(rec)
        return Publication("cam", protocol, rec)


@dataclass
class Node:
    base: str
    ingest: whip.WhipIngest
    inputs: FakeInputs


@pytest.fixture
async def node(runtime: Runtime) -> AsyncIterator[Node]:
    inputs = FakeInputs()
    ingest = whip.WhipIngest(runtime, inputs, StaticIce(()))
    ready = asyncio.Event()
    task = asyncio.create_task(ingest.run(ready.set))
    await ready.wait()
    app = build_app(runtime, [partial(whip.install, whip=ingest)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield Node(f"http://127.0.0.1:{port}", ingest, inputs)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("whip") / "clip.mp4"
    # Long enough never to loop within a test: aiortc's MediaPlayer restarts its video clock at
    # each loop, and the publisher then stops (it hung up on the node on a loaded machine).
    return str(make_media(path, seconds=60, size=SIZE, rate=25, acodec="aac"))


def decode_h264(track: LiveTrack, frames: list[LiveFrame]) -> list[av.VideoFrame]:
    ctx = av.CodecContext.create("h264", "r")
    ctx.extradata = track.config
    pictures: list[av.VideoFrame] = []
    for f in frames:
        pictures += [p for p in ctx.decode(av.Packet(f.data)) if isinstance(p, av.VideoFrame)]
    return pictures


def decode_opus(frames: list[LiveFrame]) -> list[av.AudioFrame]:
    ctx = av.CodecContext.create("opus", "r")
    out: list[av.AudioFrame] = []
    for f in frames:
        out += [a for a in ctx.decode(av.Packet(f.data)) if isinstance(a, av.AudioFrame)]
    return out


def metric(rt: Runtime, name: str, **labels: str) -> float:
    value = rt.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def test_aiortc_publishes_h264_and_opus_over_whip(node: Node, clip: str) -> None:
    rt = node.ingest.rt
    url = f"{node.base}/whip/cam"
    wrong = await PublisherProcess.start(url, clip, key="not-the-key")
    assert wrong.status == 401, wrong.sdp
    assert wrong.www_authenticate is not None
    assert wrong.www_authenticate.startswith("Bearer")
    await wrong.close()
    unknown = await PublisherProcess.start(f"{node.base}/whip/nope", clip, key=KEY)
    assert unknown.status == 404, unknown.sdp
    await unknown.close()
    vp8 = await PublisherProcess.start(url, clip, key=KEY, vcodec="VP8")
    assert vp8.status == 400, vp8.sdp
    assert "H.264" in vp8.sdp
    await vp8.close()
    assert node.inputs.publications == []

    first = await PublisherProcess.start(url, clip, key=KEY)
    try:
        assert first.status == 201, first.sdp
        assert first.location is not None
        assert re.fullmatch(r"/whip/cam/[\w-]{16,}", first.location), first.location
        # The answer names H.264 and Opus only.
        rtpmaps = re.findall(r"a=rtpmap:\d+ ([\w-]+)/", first.sdp)
        assert set(rtpmaps) <= {"H264", "opus", "rtx"}, rtpmaps
        rec = node.inputs.publications[0]
        await until(lambda: rec.count("video") >= 50 and rec.count("audio") >= 50, timeout_s=60)
        video, audio = rec.tracks
        assert (video.codec, video.timescale, video.width, video.height) == ("h264", 90000, *SIZE)
        assert (audio.codec, audio.timescale) == ("opus", 48000)
        vframes = [f for f in rec.frames if f.track == video.index]
        assert vframes[0].keyframe
        assert vframes[0].dts == 0
        assert all(b.dts > a.dts for a, b in zip(vframes, vframes[1:], strict=False))
        pictures = await asyncio.to_thread(decode_h264, video, vframes)
        assert len(pictures) >= 40
        assert {(p.width, p.height) for p in pictures} == {SIZE}
        sound = await asyncio.to_thread(
            decode_opus, [f for f in rec.frames if f.track == audio.index]
        )
        assert len(sound) >= 40
        assert sound[0].sample_rate == 48000

        # A second publisher on the same input is refused; the first keeps flowing.
        second = await PublisherProcess.start(url, clip, key=KEY)
        assert second.status == 409, second.sdp
        await second.close()
        before = rec.count("video")
        await until(lambda: rec.count("video") >= before + 25, timeout_s=30)
        assert metric(rt, "peerd_whip_refused_total", reason="conflict") == 1
        assert metric(rt, "peerd_whip_refused_total", reason="unauthorized") == 1
        assert metric(rt, "peerd_whip_sessions") == 1

        assert await first.delete() == 200
        assert rec.ended == "unpublished"
        assert metric(rt, "peerd_whip_sessions_ended_total", reason="unpublished") == 1
        assert metric(rt, "peerd_whip_sessions") == 0
    finally:
        await first.close()

    # A publisher that goes away without DELETE ends its publication as vanished.
    third = await PublisherProcess.start(url, clip, key=KEY)
    try:
        assert third.status == 201, third.sdp
        rec = node.inputs.publications[1]
        await until(lambda: rec.count("video") >= 10, timeout_s=60)
    finally:
        await third.close()
    await until(lambda: rec.ended is not None, timeout_s=60)
    assert str(rec.ended).startswith("vanished: "), rec.ended
    assert metric(rt, "peerd_whip_sessions_ended_total", reason="vanished") == 1


async def test_whip_options_patch_and_cors(node: Node) -> None:
    async with aiohttp.ClientSession() as http:
        # An offer aiortc would take and never connect (no DTLS fingerprint) is refused before
        # the input is taken.
        offer = "v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\n"
        offer += "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=sendonly\r\n"
        offer += "a=rtpmap:96 H264/90000\r\na=fmtp:96 packetization-mode=1\r\n"
        async with http.post(
            f"{node.base}/whip/cam",
            data=offer,
            headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {KEY}"},
        ) as r:
            assert r.status == 400
            assert "DTLS" in (await r.json())["message"]
        assert node.inputs.publications == []
        async with http.options(
            f"{node.base}/whip/cam", headers={"Origin": "https://studio.example"}
        ) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "POST" in r.headers["Access-Control-Allow-Methods"]
            assert r.headers["Accept-Post"] == "application/sdp"
        async with http.patch(f"{node.base}/whip/cam/nope") as r:
            assert r.status == 404
        async with http.post(f"{node.base}/whip/cam", data="x") as r:
            assert r.status == 415


async def test_the_receiver_tap_fits_the_installed_aiortc() -> None:
    """The WHIP tap relies on aiortc's receiver internals: an aiortc upgrade that moves them
    fails here, by name, before any publisher does."""
    pc = RTCPeerConnection()
    try:
        receiver = pc.addTransceiver("video", direction="recvonly").receiver
        got: list[bytes] = []
        whip.tap_receiver(receiver, lambda codec, frame: got.append(frame.data))
        # The receiver hands a reassembled frame to its decoder queue; the tap takes it.
        receiver._RTCRtpReceiver__decoder_queue.put((None, JitterFrame(b"x", 0)))
        assert got == [b"x"]
    finally:
        await pc.close()


async def test_a_publisher_that_never_connects_vanishes(node: Node) -> None:
    node.ingest.cfg = node.ingest.cfg.model_copy(update={"connect_timeout_s": 1})
    offer = await make_offer()  # a real offer (H.264, Opus) whose sender never answers ICE
    async with (
        aiohttp.ClientSession() as http,
        http.post(
            f"{node.base}/whip/cam",
            data=offer,
            headers={"Content-Type": "application/sdp", "Authorization": f"Bearer {KEY}"},
        ) as r,
    ):
        assert r.status == 201, await r.text()
    rec = node.inputs.publications[0]
    await until(lambda: rec.ended is not None, timeout_s=30)
    assert rec.ended == "vanished: never connected"
    assert not node.inputs.connected  # the input is free for the next publisher
