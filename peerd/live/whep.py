"""WHEP viewers of a live input: each frame converted once per input, fanned out to every viewer.

Protocol
--------
``POST /whep/live/<input>`` (an SDP offer, as for stored media) with a viewer token whose media
field is ``live:<input>`` and scope ``whep`` (``?token=`` or ``Authorization: Bearer``; the Access
JWT in access mode), checked by the one viewer authorization of :mod:`peerd.http.access`. The
session is an ordinary :class:`~peerd.webrtc.session.WhepSession`: the same ``[webrtc]
max_sessions`` cap, uplink admission, ICE servers, ``Location: /whep/sessions/<id>`` (``DELETE``
ends it), connection watch and metrics. ``GET /whep/live/player/<input>`` is the node's player
page aimed at the input. An input with no publisher is ``404``.

Fan-out
-------
:class:`LiveWhep` is a live consumer: the live service calls ``publication(input)`` for each
accepted publisher and gets a :class:`Fanout`, a :class:`~peerd.core.live.LiveSink`. Each frame
becomes what aiortc's senders take, once per input, and the same object goes to every viewer:

* H.264: an ``av.Packet`` of Annex B NAL units, the avcC's SPS/PPS in band before each keyframe
  that lacks them, on a 90 kHz clock; aiortc packetizes a packet without encoding it
  (``RTCRtpSender`` calls the codec's ``pack``), as the on-demand passthrough does;
* Opus (from WHIP): the packet as it came, on a 48 kHz clock;
* AAC (from RTMP): decoded, resampled and encoded to Opus by one :class:`AacToOpus` per input
  (started by the first viewer with sound, on the WHEP media threads, in order), its packets
  shared. A conversion that falls behind real time drops what it has queued (video: up to the
  next keyframe) rather than delay every viewer.

Video is passed through where the viewer's offer accepts the input's H.264 profile and the
stream has no B-frames (:func:`peerd.core.whep.choose_video`, as on-demand passthrough decides).
Other viewers (a High-profile or B-frame publisher, as OBS's x264 defaults send over RTMP, to a
Chromium without a High decoder) get, with ``[webrtc] transcode``, the input's one
:class:`H264ToBaseline` re-encode (decoded once, encoded once as Constrained Baseline, shared by
all of them, started by the first); without it they are refused with the reason. Nothing is
decoded or encoded per viewer. A viewer starts at the next keyframe. Each viewer's tracks have a
bounded queue; a viewer too slow to keep up loses its queued video and starts again at the next
keyframe (its sound loses the oldest packets), rather than growing without bound. The
publication's end ends its viewers' sessions.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
from aiohttp import web
from aiortc import MediaStreamTrack, RTCConfiguration, RTCPeerConnection
from aiortc.mediastreams import MediaStreamError
from prometheus_client import Counter

from peerd.core import avc
from peerd.core.live import LiveFrame, LiveSink, LiveTrack
from peerd.core.whep import IceServer, VideoPlan, choose_video, link_headers
from peerd.errors import BadRequest, MediaError, NotFound
from peerd.http.access import viewer_auth
from peerd.runtime import Runtime
from peerd.webrtc.ice import for_aiortc
from peerd.webrtc.media import AUDIO_FRAME, AUDIO_RATE, VIDEO_CLOCK, PlayoutClock
from peerd.webrtc.routes import SDP, player_page, read_offer
from peerd.webrtc.session import (
    WhepService,
    WhepSession,
    answer_offer,
    h264_preferences,
    summarize_offer,
)

log = logging.getLogger("peerd.live")

VIDEO_QUEUE = 90  # packets: about 3 s at 30 fps
AUDIO_QUEUE = 100  # 20 ms Opus packets: 2 s
_VIDEO_TB = Fraction(1, VIDEO_CLOCK)
_AUDIO_TB = Fraction(1, AUDIO_RATE)


def media_id(input: str) -> str:
    """The media field of a viewer token for ``input``."""
    return f"live:{input}"


class ViewerTrack(MediaStreamTrack):
    """One viewer's track: packets shared with every viewer, queued boundedly."""

    def __init__(self, kind: str, limit: int) -> None:
        super().__init__()
        self.kind = kind
        self.queue: asyncio.Queue[av.Packet[Any] | None] = asyncio.Queue(limit)
        self.waiting_key = kind == "video"
        self.sent = 0
        self.frames = 0  # av.Frames handed to aiortc (which it would encode): none, by design
        self.dropped = 0

    def push(self, packet: av.Packet[Any], keyframe: bool) -> None:
        """Queue ``packet`` (video: from a keyframe on; a full queue restarts at the next)."""
        if self.readyState != "live":
            return
        if self.waiting_key:
            if not keyframe:
                return
            self.waiting_key = False
        try:
            self.queue.put_nowait(packet)
        except asyncio.QueueFull:
            if self.kind == "video":
                self.dropped += self.queue.qsize()
                self._clear()
                self.waiting_key = True
                if keyframe:
                    self.push(packet, keyframe)
            else:
                self.queue.get_nowait()
                self.dropped += 1
                self.queue.put_nowait(packet)

    def _clear(self) -> None:
        while not self.queue.empty():
            self.queue.get_nowait()

    def end(self) -> None:
        """No more packets: the sender stops after what is queued."""
        if self.queue.full():
            self._clear()
        self.queue.put_nowait(None)

    async def recv(self) -> Any:
        """The next packet, as soon as it came; ``MediaStreamError`` at the end."""
        if self.readyState != "live":
            raise MediaStreamError
        item = await self.queue.get()
        if item is None:
            self.stop()
            raise MediaStreamError
        self.sent += 1
        if isinstance(item, av.frame.Frame):
            self.frames += 1
        return item


class AacToOpus:
    """One input's AAC decoded, resampled to 48 kHz stereo and encoded to Opus (blocking)."""

    kind = "audio"

    def __init__(self, track: LiveTrack) -> None:
        self.timescale = track.timescale
        self.decoder = av.CodecContext.create("aac", "r")
        if track.config:
            self.decoder.extradata = track.config
        self.resampler = av.AudioResampler(
            format="s16", layout="stereo", rate=AUDIO_RATE, frame_size=AUDIO_FRAME
        )
        enc: Any = av.CodecContext.create("libopus", "w")
        enc.sample_rate = AUDIO_RATE
        enc.layout = "stereo"
        enc.format = "s16"
        enc.bit_rate = 96_000
        enc.time_base = _AUDIO_TB
        self.encoder = enc
        self.base: int | None = None  # the first AAC frame's time, at 48 kHz
        self.samples = 0
        self.decoded = 0
        self.encoded = 0

    def push(self, frame: LiveFrame) -> list[tuple[av.Packet[Any], bool]]:
        """The Opus packets ``frame`` completes, timed on the input's clock at 48 kHz."""
        if self.base is None:
            self.base = frame.pts * AUDIO_RATE // self.timescale
        out: list[tuple[av.Packet[Any], bool]] = []
        for af in _decode(self.decoder, frame, self.timescale):
            if not isinstance(af, av.AudioFrame):
                continue
            self.decoded += 1
            af.pts = None  # timed by the running sample count
            for chunk in self.resampler.resample(af):
                chunk.pts = self.samples
                chunk.time_base = _AUDIO_TB
                self.samples += chunk.samples
                for p in self.encoder.encode(chunk):
                    p.pts = p.dts = self.base + (p.pts or 0)
                    p.time_base = _AUDIO_TB
                    self.encoded += 1
                    out.append((p, True))
        return out


class H264ToBaseline:
    """One input's H.264 decoded and encoded once as Constrained Baseline without B-frames, for
    the viewers that cannot take the input's own stream (blocking)."""

    kind = "video"
    PROFILE = "42e01f"  # Constrained Baseline: every WebRTC H.264 decoder takes it

    def __init__(self, track: LiveTrack) -> None:
        self.timescale = track.timescale
        self.decoder = av.CodecContext.create("h264", "r")
        self.decoder.extradata = track.config
        self.encoder: Any = None
        self.decoded = 0
        self.encoded = 0

    def _open_encoder(self, width: int, height: int) -> Any:
        enc: Any = av.CodecContext.create("libx264", "w")
        enc.width, enc.height = width, height
        enc.pix_fmt = "yuv420p"
        enc.time_base = _VIDEO_TB
        enc.gop_size = 50  # a joining viewer waits at most two seconds for a picture
        enc.options = {"preset": "veryfast", "tune": "zerolatency", "profile": "baseline"}
        return enc

    def push(self, frame: LiveFrame) -> list[tuple[av.Packet[Any], bool]]:
        """The Annex B packets (parameter sets in band) re-encoding ``frame`` gives."""
        out: list[tuple[av.Packet[Any], bool]] = []
        for vf in _decode(self.decoder, frame, self.timescale):
            if not isinstance(vf, av.VideoFrame) or vf.pts is None:
                continue
            self.decoded += 1
            if self.encoder is None:
                self.encoder = self._open_encoder(vf.width, vf.height)
            vf.pts = vf.pts * VIDEO_CLOCK // self.timescale
            vf.time_base = _VIDEO_TB
            vf.pict_type = av.video.frame.PictureType.NONE
            for p in self.encoder.encode(vf):
                p.time_base = _VIDEO_TB
                self.encoded += 1
                out.append((p, bool(p.is_keyframe)))
        return out


def _decode(ctx: Any, frame: LiveFrame, timescale: int) -> list[Any]:
    pkt = av.Packet(frame.data)
    pkt.pts, pkt.dts = frame.pts, frame.dts
    pkt.time_base = Fraction(1, timescale)
    try:
        return list(ctx.decode(pkt))
    except av.FFmpegError as exc:
        raise MediaError(f"cannot decode the input's {ctx.name}: {exc}") from exc


Converter = AacToOpus | H264ToBaseline


class _Worker:
    """One conversion of an input on the WHEP media threads, in order, its output to a lane."""

    LIMIT = 200

    def __init__(
        self,
        fan: Fanout,
        make: Callable[[], Converter],
        deliver: Callable[[list[tuple[av.Packet[Any], bool]]], None],
        keyed: bool,
    ) -> None:
        self.fan = fan
        self.make = make
        self.deliver = deliver
        self.keyed = keyed  # video: start at a keyframe, and again after an overflow
        self.waiting_key = keyed
        self.converter: Converter | None = None
        self.queue: asyncio.Queue[LiveFrame | None] = asyncio.Queue(self.LIMIT)
        self.task = asyncio.create_task(self._run(), name=f"live-convert-{fan.input}")

    def offer(self, frame: LiveFrame) -> None:
        if self.waiting_key:
            if not frame.keyframe:
                return
            self.waiting_key = False
        try:
            self.queue.put_nowait(frame)
        except asyncio.QueueFull:
            # Behind real time: lose what is queued rather than fall further behind.
            self.fan.owner.metrics.dropped.inc(self.queue.qsize())
            while not self.queue.empty():
                self.queue.get_nowait()
            self.waiting_key = self.keyed
            if not self.keyed or frame.keyframe:
                self.offer(frame)

    def stop(self) -> None:
        while self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(None)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        pool = self.fan.owner.whep.pool
        self.converter = conv = await loop.run_in_executor(pool, self.make)
        self.fan.owner.metrics.transcoders.labels(kind=conv.kind).inc()
        log.info(
            "live whep: conversion started", extra={"input": self.fan.input, "kind": conv.kind}
        )
        while (frame := await self.queue.get()) is not None:
            try:
                packets = await loop.run_in_executor(pool, conv.push, frame)
            except MediaError as exc:
                log.warning("live whep: frame lost", extra={"error": exc.message})
                continue
            if packets and self.fan._prune():
                self.deliver(packets)


@dataclass
class _Viewer:
    session_id: str
    video: ViewerTrack | None
    audio: ViewerTrack | None
    transcoded: bool = False  # its video comes from the input's H264ToBaseline

    def live(self) -> bool:
        return any(t is not None and t.readyState == "live" for t in (self.video, self.audio))


class LiveFeed:
    """A live session's feed (:class:`peerd.webrtc.session.Feed`): nothing to read, the fan-out
    pushes; it lasts until the publication ends."""

    def __init__(self, fanout: Fanout) -> None:
        self.fanout = fanout
        self.clock = PlayoutClock()
        self.segments_read = 0

    async def run(self) -> None:
        """Wait for the publication's end."""
        await self.fanout.done.wait()


@dataclass
class Fanout:
    """One publication of an input, as its viewers receive it (a :class:`LiveSink`)."""

    input: str
    owner: LiveWhep
    video: LiveTrack | None = None
    audio: LiveTrack | None = None
    profile: str | None = None
    reorders: bool = False
    begun: bool = False
    ended: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    viewers: list[_Viewer] = field(default_factory=list)
    audio_worker: _Worker | None = None  # AAC -> Opus, once for the input
    video_worker: _Worker | None = None  # H.264 -> Constrained Baseline, once for the input
    _param_sets: bytes = b""

    def begin(self, tracks: Sequence[LiveTrack]) -> None:
        """Take the publication's tracks: its first H.264 and first audio track."""
        self.video = next((t for t in tracks if t.codec == "h264"), None)
        self.audio = next((t for t in tracks if t.kind == "audio"), None)
        if self.video is not None:
            try:
                sps, pps = avc.avcc_parameter_sets(self.video.config)
                self.profile = avc.profile_level_id(self.video.config)
            except ValueError as exc:
                log.warning("live whep: no avcC", extra={"input": self.input, "error": str(exc)})
                self.video = None
            else:
                self._param_sets = avc.annexb(sps + pps)
        self.begun = True

    def frame(self, frame: LiveFrame) -> None:
        """Convert ``frame`` once and queue it for every viewer."""
        if self.ended:
            return
        if self.video is not None and frame.track == self.video.index:
            if frame.pts != frame.dts:
                self.reorders = True
            if self._prune():
                self._video(frame, self.video)
                if self.video_worker is not None:
                    if any(v.transcoded for v in self.viewers):
                        self.video_worker.offer(frame)
                    else:  # nobody to re-encode for: resume at a keyframe when someone comes
                        self.video_worker.waiting_key = True
        elif self.audio is not None and frame.track == self.audio.index:
            if self.audio.codec == "opus":
                if self._prune():
                    pkt = _packet(frame.data, frame.pts * AUDIO_RATE // self.audio.timescale)
                    pkt.time_base = _AUDIO_TB
                    self._send_audio([(pkt, True)])
            elif self.audio_worker is not None and self._prune():
                self.audio_worker.offer(frame)

    def _video(self, frame: LiveFrame, track: LiveTrack) -> None:
        direct = [v.video for v in self.viewers if v.video is not None and not v.transcoded]
        if not direct:
            return
        try:
            nals = avc.split_length_prefixed(frame.data)
        except ValueError:
            return  # a malformed frame: the viewers' decoders skip to the next keyframe
        data = avc.annexb(nals)
        if frame.keyframe and not any(avc.nal_type(n) == avc.NAL_SPS for n in nals):
            data = self._param_sets + data
        pkt = _packet(data, frame.pts * VIDEO_CLOCK // track.timescale)
        pkt.dts = frame.dts * VIDEO_CLOCK // track.timescale
        pkt.time_base = _VIDEO_TB
        for t in direct:
            t.push(pkt, frame.keyframe)

    def _send_transcoded(self, packets: list[tuple[av.Packet[Any], bool]]) -> None:
        for v in self.viewers:
            if v.video is not None and v.transcoded:
                for p, key in packets:
                    v.video.push(p, key)

    def _send_audio(self, packets: list[tuple[av.Packet[Any], bool]]) -> None:
        for v in self.viewers:
            if v.audio is not None:
                for p, _ in packets:
                    v.audio.push(p, True)

    def _prune(self) -> bool:
        """Forget viewers whose sessions ended; True while some remain."""
        if any(not v.live() for v in self.viewers):
            self.viewers = [v for v in self.viewers if v.live()]
        return bool(self.viewers)

    def add(self, v: _Viewer) -> None:
        """A new viewer; the first one needing a conversion of the input starts it, once."""
        self.viewers.append(v)
        audio, video = self.audio, self.video
        if v.audio is not None and audio is not None and audio.codec == "aac":
            if self.audio_worker is None:
                self.audio_worker = _Worker(
                    self, lambda: AacToOpus(audio), self._send_audio, keyed=False
                )
        if v.transcoded and video is not None and self.video_worker is None:
            self.video_worker = _Worker(
                self, lambda: H264ToBaseline(video), self._send_transcoded, keyed=True
            )

    def end(self, reason: str) -> None:
        """The publication ended: end every viewer's session, stop the conversions."""
        if self.ended:
            return
        self.ended = True
        self.done.set()
        for w in (self.audio_worker, self.video_worker):
            if w is not None:
                w.stop()
        for v in self.viewers:
            for t in (v.video, v.audio):
                if t is not None:
                    t.end()
        self.owner.ended(self, reason)


def _packet(data: bytes, pts: int) -> av.Packet[Any]:
    pkt = av.Packet(data)
    pkt.pts = pkt.dts = pts
    return pkt


class LiveWhepMetrics:
    """What the fan-out counts, on the daemon's registry."""

    def __init__(self, rt: Runtime) -> None:
        reg = rt.metrics.registry
        self.transcoders = Counter(
            "peerd_live_whep_transcoders",
            "Conversions of a live input started for its WHEP viewers (at most one per kind and"
            " publication: audio = AAC to Opus, video = H.264 to Constrained Baseline)",
            ["kind"],
            registry=reg,
        )
        self.dropped = Counter(
            "peerd_live_whep_convert_dropped",
            "Live frames dropped because a conversion fell behind real time",
            registry=reg,
        )


class LiveWhep:
    """WHEP viewers of live inputs: a live consumer (``publication``) and the session opener."""

    def __init__(self, whep: WhepService) -> None:
        self.whep = whep
        self.metrics = LiveWhepMetrics(whep.rt)
        self.fanouts: dict[str, Fanout] = {}

    def publication(self, input: str) -> LiveSink:
        """A sink for a new publication of ``input``."""
        fan = Fanout(input, self)
        self.fanouts[input] = fan
        return fan

    def viewers(self, input: str) -> int:
        """WHEP viewers of ``input`` now (the live service's viewer counter)."""
        fan = self.fanouts.get(input)
        return len([v for v in fan.viewers if v.live()]) if fan is not None else 0

    def ended(self, fan: Fanout, reason: str) -> None:
        """Close the sessions of a publication that ended."""
        if self.fanouts.get(fan.input) is fan:
            del self.fanouts[fan.input]
        for v in fan.viewers:
            task = asyncio.ensure_future(self.whep.close(v.session_id, "live_ended"))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())
        log.info(
            "live whep: publication ended",
            extra={"input": fan.input, "reason": reason, "viewers": len(fan.viewers)},
        )

    async def open(self, input: str, offer: str) -> tuple[WhepSession, str, tuple[IceServer, ...]]:
        """Answer a viewer's offer for ``input``: the session, the answer, the ICE servers."""
        return await self.whep.admit(lambda sid: self._open(sid, input, offer))

    async def _open(
        self, session_id: str, input: str, offer: str
    ) -> tuple[WhepSession, str, tuple[IceServer, ...]]:
        summary = summarize_offer(offer)
        fan = self.fanouts.get(input)
        if fan is None or not fan.begun or fan.ended:
            raise NotFound(f"live input {input} has no publisher")
        plan = VideoPlan("refuse", reason="the offer has no video section")
        transcoded = False
        if "video" in summary.kinds and fan.video is not None:
            plan = choose_video(
                summary.video_codecs, fan.profile, reorders=fan.reorders, transcode_allowed=False
            )
            if plan.mode != "passthrough":
                why = plan.reason.removesuffix(" and transcoding is disabled")
                # Never encoded per viewer: the input's one Constrained Baseline re-encode, for
                # every viewer that cannot take its own stream (and offers that profile).
                cb = choose_video(
                    summary.video_codecs,
                    H264ToBaseline.PROFILE,
                    reorders=False,
                    transcode_allowed=False,
                )
                if not self.whep.cfg.transcode or cb.mode != "passthrough":
                    self.whep.metrics.rejected.labels(reason="codec").inc()
                    if self.whep.cfg.transcode:
                        why += " nor H.264 Constrained Baseline"
                    raise BadRequest(f"cannot send this live input to the viewer: {why}")
                plan, transcoded = cb, True
        send_audio = "audio" in summary.kinds and fan.audio is not None
        if plan.mode == "refuse" and not send_audio:
            self.whep.metrics.rejected.labels(reason="kind").inc()
            raise BadRequest("the offer asks for nothing this live input sends")
        servers = await self.whep.ice_servers()
        await asyncio.sleep(0)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=for_aiortc(servers)))
        video = audio = None
        try:
            for kind in summary.kinds:
                if kind == "video" and video is None and plan.mode == "passthrough":
                    video = ViewerTrack("video", VIDEO_QUEUE)
                    tr = pc.addTransceiver(video, direction="sendonly")
                    if plan.offered is not None:
                        tr.setCodecPreferences(h264_preferences(plan.offered))
                elif kind == "audio" and audio is None and send_audio:
                    audio = ViewerTrack("audio", AUDIO_QUEUE)
                    pc.addTransceiver(audio, direction="sendonly")
            await answer_offer(pc, offer, plan.profile_level_id if video is not None else None)
        except BaseException:
            await pc.close()
            raise
        if fan.ended:  # the publication ended while negotiating
            await pc.close()
            raise NotFound(f"live input {input} has no publisher")
        fan.add(_Viewer(session_id, video, audio, transcoded=transcoded and video is not None))
        session = WhepSession(
            id=session_id,
            media_id=media_id(input),
            mode="live-transcode" if transcoded and video is not None else "live",
            pc=pc,
            feeder=LiveFeed(fan),
            tracks=[t for t in (video, audio) if t is not None],
        )
        self.whep.start(session)
        assert pc.localDescription is not None
        return session, pc.localDescription.sdp, servers


def install(app: web.Application, rt: Runtime, live: LiveWhep) -> None:
    """Register the routes of WHEP viewers of live inputs."""
    if not (rt.settings.webrtc.enabled and rt.settings.live.enabled):
        return
    auth = viewer_auth(app, rt)

    async def post_offer(request: web.Request) -> web.Response:
        input = request.match_info["input"]
        await auth.check(request, media_id(input), "whep")
        offer = await read_offer(request)
        session, answer, servers = await live.open(input, offer)
        resp = web.Response(status=201, text=answer, content_type=SDP)
        resp.headers["Location"] = f"/whep/sessions/{session.id}"
        for value in link_headers(servers):
            resp.headers.add("Link", value)
        resp.headers["Cache-Control"] = "no-store"
        return resp

    async def preflight(request: web.Request) -> web.Response:
        methods = "POST, OPTIONS"
        headers = {
            "Access-Control-Allow-Methods": methods,
            "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
            "Access-Control-Max-Age": "600",
            "Allow": methods,
            "Accept-Post": SDP,
        }
        return web.Response(status=204, headers=headers)

    async def player(request: web.Request) -> web.Response:
        input = request.match_info["input"]
        token = await auth.check(request, media_id(input), "whep")
        return player_page(f"/whep/live/{input}", token, await live.whep.ice_servers())

    app.router.add_post("/whep/live/{input}", post_offer)
    app.router.add_route("OPTIONS", "/whep/live/{input}", preflight)
    app.router.add_get("/whep/live/player/{input}", player)
