"""WHIP ingest (RFC 9725): a publisher's WebRTC H.264 and Opus, as live frames, never decoded.

Protocol
--------
``POST /whip/<input>`` with ``Content-Type: application/sdp`` (the offer) and ``Authorization:
Bearer <stream key>`` asks :class:`~peerd.core.live.LiveInputs` to accept a publisher: a wrong
key is ``401`` with ``WWW-Authenticate: Bearer``, an unknown input ``404``, an input that already
has a publisher ``409``. An offer whose video has no H.264 (packetization-mode 1) or whose audio
has no Opus is refused with ``400`` before anything is opened; the answer names only those
codecs. The publisher gets ``201 Created``, the SDP answer, ``Location: /whip/<input>/<session
id>`` and one ``Link: <url>; rel="ice-server"`` per ICE server (the node's WHEP servers; an
``OPTIONS`` preflight, unauthenticated, gets those without credentials).
``DELETE`` on the location ends the publication (``"unpublished"``); ``PATCH`` (trickle ICE,
optional in the RFC) is answered ``405``: the answer carries every candidate. ``OPTIONS``
answers CORS preflights (origins from ``webrtc.cors_origins``), since browsers publish too.

Media
-----
aiortc's ``RTCRtpReceiver`` reassembles each encoded frame in its jitter buffer (depayloaded:
H.264 as Annex B, Opus as the packet) and puts ``(codec, frame)`` on a queue its decoder thread
reads. :func:`tap_receiver` replaces that queue, for WHIP receivers only, with one handing the
encoded frames to the publication on the event loop (where the receiver puts them) and passing
only the stop marker to the decoder thread, which then never decodes anything. This relies on the
receiver's private ``__decoder_queue`` attribute, as aiortc :data:`AIORTC_TESTED` has it;
:func:`tap_receiver` refuses to run on a receiver without it, and ``tests/test_live_whip.py``
checks it on the installed aiortc.

H.264 arrives Annex B: frames are dropped (and a keyframe asked for with PLI, at most once a
second) until a keyframe with its SPS and PPS arrives; later, a PLI goes out whenever no keyframe
came for ``[live] segment_s`` (WebRTC encoders send one only when asked), so segments can be cut
and new viewers start; the publication then begins with an avcC
from those parameter sets and the picture size the SPS states, and each frame goes on as 4-byte
length-prefixed NAL units on a 90 kHz clock (WebRTC has no B-frames: dts = pts). Opus packets
go on as they are on a 48 kHz clock, from the same moment. A publisher whose ICE/DTLS fails or
closes without ``DELETE``, or that never connects, ends ``"vanished: <why>"``; one that goes
silent is the live service's idle timeout.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import queue
import secrets
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import aiortc
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCRtpReceiver, RTCSessionDescription
from aiortc import sdp as rtc_sdp
from aiortc.exceptions import InternalError, InvalidAccessError, InvalidStateError, OperationError
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtcrtpparameters import RTCRtpCodecParameters
from prometheus_client import Counter, Gauge

from peerd.core import avc
from peerd.core.live import LiveFrame, LiveInputs, LiveTrack, Publication
from peerd.core.whep import IceServer, link_headers
from peerd.errors import BadRequest, Conflict, NotFound, Unauthorized, Unavailable
from peerd.runtime import Runtime
from peerd.webrtc.ice import IceProvider, for_aiortc
from peerd.webrtc.routes import SDP, read_offer
from peerd.webrtc.session import summarize_offer  # (importing it registers peerd's H.264)

log = logging.getLogger("peerd.live")

AIORTC_TESTED = "1.16.0"  # the aiortc whose RTCRtpReceiver internals tap_receiver relies on
_QUEUE_ATTR = "_RTCRtpReceiver__decoder_queue"

_PLI_EVERY_S = 1.0
VIDEO_CLOCK = 90_000
OPUS_CLOCK = 48_000
# OpusHead (RFC 7845 5.1): version 1, 2 channels, 312 samples pre-skip, 48 kHz, no gain, family 0.
OPUS_HEAD = b"OpusHead\x01\x02" + (312).to_bytes(2, "little") + (48000).to_bytes(4, "little")
OPUS_HEAD += b"\x00\x00\x00"
_ALLOW_HEADERS = "Authorization, Content-Type, If-Match"
_EXPOSE_HEADERS = "Location, Link, ETag, Accept-Patch"

EncodedSink = Callable[[RTCRtpCodecParameters, JitterFrame], None]


class _EncodedFrames:
    """Stands in for a receiver's decoder queue: frames to ``sink``, the stop marker to the
    (idle) decoder thread, which then ends the receiver's track as it would have."""

    def __init__(self, sink: EncodedSink) -> None:
        self.sink = sink
        self._thread_side: queue.Queue[None] = queue.Queue()

    def put(self, item: tuple[RTCRtpCodecParameters, JitterFrame] | None) -> None:
        if item is None:
            self._thread_side.put(None)
        else:
            self.sink(*item)

    def get(self, *args: Any, **kwargs: Any) -> None:
        return self._thread_side.get(*args, **kwargs)


def tap_receiver(receiver: RTCRtpReceiver, sink: EncodedSink) -> None:
    """Send ``receiver``'s encoded frames to ``sink`` (on the event loop) instead of decoding
    them. Call before the receiver starts (between ``setRemoteDescription`` and connection);
    RuntimeError if this aiortc's receiver is not shaped as :data:`AIORTC_TESTED`'s."""
    current = getattr(receiver, _QUEUE_ATTR, None)
    if not isinstance(current, queue.Queue) or current.qsize():
        raise RuntimeError(
            f"aiortc {aiortc.__version__}: RTCRtpReceiver has no idle decoder queue "
            f"(peerd's WHIP ingest was written against aiortc {AIORTC_TESTED})"
        )
    setattr(receiver, _QUEUE_ATTR, _EncodedFrames(sink))


def check_offer(offer: str) -> tuple[bool, bool]:
    """Whether the offer sends video and audio; BadRequest unless every video section offers
    H.264 (packetization-mode 1), every audio section Opus, and there is at least one."""
    summarize_offer(offer)  # an SDP offer, with DTLS fingerprints and ICE credentials
    desc = rtc_sdp.SessionDescription.parse(offer)
    video = audio = False
    for m in desc.media:
        names = {c.mimeType.lower() for c in m.rtp.codecs}
        if m.kind == "video":
            if not any(
                c.mimeType.lower() == "video/h264"
                and str(c.parameters.get("packetization-mode", "0")) == "1"
                for c in m.rtp.codecs
            ):
                raise BadRequest(
                    f"WHIP video must be H.264 (packetization-mode 1); offered {sorted(names)}"
                )
            video = True
        elif m.kind == "audio":
            if "audio/opus" not in names:
                raise BadRequest(f"WHIP audio must be Opus; offered {sorted(names)}")
            audio = True
    if not (video or audio):
        raise BadRequest("the offer has no audio or video section")
    return video, audio


def _preferences(kind: str) -> list[Any]:
    caps = RTCRtpReceiver.getCapabilities(kind)
    assert caps is not None
    if kind == "audio":
        return [c for c in caps.codecs if c.mimeType.lower() == "audio/opus"]
    h264 = [
        c
        for c in caps.codecs
        if c.mimeType.lower() == "video/h264" and c.parameters.get("packetization-mode") == "1"
    ]
    return h264 + [c for c in caps.codecs if c.mimeType.lower() == "video/rtx"]


def _for_session(
    on: Callable[[WhipSession, JitterFrame], None],
    s: WhipSession,
    _codec: RTCRtpCodecParameters,
    frame: JitterFrame,
) -> None:
    on(s, frame)


class WhipMetrics:
    """WHIP counters on the daemon's registry (labels bounded by the code, never by inputs)."""

    def __init__(self, rt: Runtime) -> None:
        reg = rt.metrics.registry
        self.active = Gauge("peerd_whip_sessions", "Connected WHIP publishers", registry=reg)
        self.opened = Counter(
            "peerd_whip_sessions_opened", "WHIP publishers accepted", registry=reg
        )
        self.ended = Counter(
            "peerd_whip_sessions_ended",
            "WHIP publications ended",
            ["reason"],  # unpublished | vanished | stop
            registry=reg,
        )
        self.refused = Counter(
            "peerd_whip_refused",
            "WHIP offers refused",
            ["reason"],  # unauthorized | not_found | conflict | offer | unavailable
            registry=reg,
        )


@dataclass
class WhipSession:
    """One accepted publisher."""

    id: str
    input: str
    pc: RTCPeerConnection
    publication: Publication
    video: bool
    audio: bool
    started: float = field(default_factory=time.monotonic)
    begun: bool = False
    ended: bool = False
    sps: list[bytes] = field(default_factory=list)
    pps: list[bytes] = field(default_factory=list)
    video_base: int | None = None
    audio_base: int | None = None
    last_pli: float = 0.0
    last_key: float = 0.0
    frames: int = 0
    last_dts: dict[int, int] = field(default_factory=dict)
    receivers: list[RTCRtpReceiver] = field(default_factory=list)


class WhipIngest:
    """The daemon service taking WHIP publishers (see the module doc)."""

    name = "whip"

    def __init__(self, rt: Runtime, inputs: LiveInputs, ice: IceProvider) -> None:
        self.rt = rt
        self.inputs = inputs
        self.ice = ice
        self.cfg = rt.settings.webrtc
        self.metrics = WhipMetrics(rt)
        self.sessions: dict[str, WhipSession] = {}
        self._accepting = False

    async def run(self, ready: Callable[[], None]) -> None:
        """Accept publishers until cancelled; then end every publication."""
        self._accepting = self.rt.settings.live.enabled and self.rt.settings.live.whip
        ready()
        try:
            await asyncio.Event().wait()
        finally:
            self._accepting = False
            await asyncio.shield(self._close_all())

    async def _close_all(self) -> None:
        await asyncio.gather(
            *(
                self.close(s.id, "vanished: the node stopped", "stop")
                for s in list(self.sessions.values())
            ),
            return_exceptions=True,
        )

    async def publish(
        self, input: str, key: str, offer: str, remote: str
    ) -> tuple[WhipSession, str, tuple[IceServer, ...]]:
        """Accept a publisher's offer: the session, the SDP answer, the ICE servers used."""
        if not self._accepting or self.rt.draining:
            self.metrics.refused.labels(reason="unavailable").inc()
            raise Unavailable("WHIP is not accepting publishers")
        try:
            video, audio = check_offer(offer)
        except BadRequest:
            self.metrics.refused.labels(reason="offer").inc()
            raise
        try:
            pub = self.inputs.open(key, input=input, protocol="whip", remote=remote)
        except Unauthorized:
            self.metrics.refused.labels(reason="unauthorized").inc()
            raise
        except NotFound:
            self.metrics.refused.labels(reason="not_found").inc()
            raise
        except Conflict:
            self.metrics.refused.labels(reason="conflict").inc()
            raise
        pc: RTCPeerConnection | None = None
        try:
            servers = await self.ice.servers()
            pc = RTCPeerConnection(RTCConfiguration(iceServers=for_aiortc(servers)))
            s = WhipSession(
                id=secrets.token_urlsafe(16),
                input=pub.input,
                pc=pc,
                publication=pub,
                video=video,
                audio=audio,
            )
            answer = await self._negotiate(s, offer)
        except BaseException as exc:
            # The input was taken: give it back, whatever failed.
            self.metrics.refused.labels(reason="offer").inc()
            pub.sink.end(f"vanished: negotiation failed ({type(exc).__name__})")
            if pc is not None:
                await pc.close()
            raise
        self.sessions[s.id] = s
        self.metrics.opened.inc()
        self.metrics.active.set(len(self.sessions))

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            if pc.connectionState in ("failed", "closed"):
                await self.close(s.id, f"vanished: connection {pc.connectionState}", "vanished")
            elif pc.connectionState == "connected":
                await self._ask_keyframe(s)

        asyncio.get_running_loop().call_later(
            self.cfg.connect_timeout_s, self._check_connected, s.id
        )
        log.info(
            "whip publisher accepted",
            extra={"input": s.input, "session": s.id, "video": video, "audio": audio},
        )
        return s, answer, servers

    async def _negotiate(self, s: WhipSession, offer: str) -> str:
        pc = s.pc
        try:
            # Receiving transceivers made before the offer is applied: aiortc pairs them with
            # the publisher's sections and answers only the codecs preferred here.
            for kind in [k for k, on in (("video", s.video), ("audio", s.audio)) if on]:
                tr = pc.addTransceiver(kind, direction="recvonly")
                tr.setCodecPreferences(_preferences(kind))
                on = self._on_video if kind == "video" else self._on_audio
                tap_receiver(tr.receiver, functools.partial(_for_session, on, s))
                s.receivers.append(tr.receiver)
            await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
            await asyncio.sleep(0)
            await pc.setLocalDescription(await pc.createAnswer())
        except (
            ValueError,
            KeyError,
            IndexError,
            InternalError,
            InvalidAccessError,
            InvalidStateError,
            OperationError,
        ) as exc:
            raise BadRequest(f"cannot negotiate this offer: {exc}") from None
        assert pc.localDescription is not None
        return pc.localDescription.sdp

    # -- media -------------------------------------------------------------------------------

    def _on_video(self, s: WhipSession, frame: JitterFrame) -> None:
        if s.ended:
            return
        nals = [n for n in avc.split_annexb(frame.data) if avc.nal_type(n) != avc.NAL_AUD]
        key = any(avc.nal_type(n) == avc.NAL_IDR for n in nals)
        if not s.begun:
            sps = [n for n in nals if avc.nal_type(n) == avc.NAL_SPS]
            pps = [n for n in nals if avc.nal_type(n) == avc.NAL_PPS]
            if not (key and sps and pps):
                self._keyframe_soon(s)
                return
            try:
                width, height = avc.sps_dimensions(sps[0])
                config = avc.avcc(sps[:1], pps[:1])
            except ValueError as exc:
                log.warning("whip: unreadable SPS", extra={"input": s.input, "error": str(exc)})
                self._keyframe_soon(s)
                return
            s.sps, s.pps = sps[:1], pps[:1]
            self._begin(s, width, height, config)
        now = time.monotonic()
        if key:
            s.last_key = now
        elif now - s.last_key > self.rt.settings.live.segment_s:
            # WebRTC encoders (browsers) send a keyframe only when asked: ask every segment's
            # length, so LL-HLS can cut segments and a new WHEP viewer starts soon.
            self._keyframe_soon(s)
        if s.video_base is None:
            s.video_base = frame.timestamp
        t = frame.timestamp - s.video_base
        self._deliver(s, LiveFrame(0, t, t, key, avc.length_prefixed(nals)))

    def _on_audio(self, s: WhipSession, frame: JitterFrame) -> None:
        if s.ended:
            return
        if not s.begun:
            if s.video:
                return  # sound starts with the picture
            self._begin(s, 0, 0, b"")
        if s.audio_base is None:
            s.audio_base = frame.timestamp
        t = frame.timestamp - s.audio_base
        self._deliver(s, LiveFrame(1 if s.video else 0, t, t, True, frame.data))

    def _begin(self, s: WhipSession, width: int, height: int, config: bytes) -> None:
        tracks: list[LiveTrack] = []
        if s.video:
            tracks.append(
                LiveTrack(0, "video", "h264", VIDEO_CLOCK, config, width=width, height=height)
            )
        if s.audio:
            tracks.append(
                LiveTrack(
                    len(tracks),
                    "audio",
                    "opus",
                    OPUS_CLOCK,
                    OPUS_HEAD,
                    sample_rate=48000,
                    channels=2,
                )
            )
        s.begun = True
        s.publication.sink.begin(tracks)
        log.info(
            "whip publication began",
            extra={"input": s.input, "width": width, "height": height, "tracks": len(tracks)},
        )

    def _deliver(self, s: WhipSession, frame: LiveFrame) -> None:
        # Consumers are promised increasing decode times per track: a frame that does not
        # advance (a publisher's timestamp glitch) is dropped rather than passed on.
        if frame.dts <= s.last_dts.get(frame.track, -1):
            return
        s.last_dts[frame.track] = frame.dts
        s.frames += 1
        s.publication.sink.frame(frame)

    def _keyframe_soon(self, s: WhipSession) -> None:
        now = time.monotonic()
        if now - s.last_pli >= _PLI_EVERY_S:
            s.last_pli = now
            task = asyncio.ensure_future(self._ask_keyframe(s))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _ask_keyframe(self, s: WhipSession) -> None:
        """Send a PLI for every video source of ``s`` (RFC 4585 6.3.1)."""
        for r in s.receivers:
            if r.track is not None and r.track.kind == "video":
                for src in r.getSynchronizationSources():
                    await r._send_rtcp_pli(src.source)

    def _check_connected(self, session_id: str) -> None:
        s = self.sessions.get(session_id)
        if s is not None and s.pc.connectionState != "connected":
            task = asyncio.create_task(
                self.close(session_id, "vanished: never connected", "vanished")
            )
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    # -- ending ------------------------------------------------------------------------------

    def get(self, input: str, session_id: str) -> WhipSession:
        """An open publisher session of ``input``; NotFound otherwise."""
        s = self.sessions.get(session_id)
        if s is None or s.input != input:
            raise NotFound("no such WHIP session")
        return s

    async def close(self, session_id: str, reason: str, kind: str) -> bool:
        """End a publication with ``reason`` (``kind`` is its metric label); idempotent."""
        s = self.sessions.pop(session_id, None)
        if s is None:
            return False
        s.ended = True
        self.metrics.active.set(len(self.sessions))
        self.metrics.ended.labels(reason=kind).inc()
        try:
            s.publication.sink.end(reason)
        finally:
            await s.pc.close()
        log.info(
            "whip publication ended",
            extra={
                "input": s.input,
                "session": s.id,
                "reason": reason,
                "frames": s.frames,
                "seconds": round(time.monotonic() - s.started, 1),
            },
        )
        return True


def _cors(rt: Runtime, request: web.Request, headers: MutableMapping[str, str]) -> None:
    allowed = rt.settings.webrtc.cors_origins
    origin = request.headers.get("Origin")
    if "*" in allowed:
        headers["Access-Control-Allow-Origin"] = "*"
    elif origin is not None and origin in allowed:
        headers["Access-Control-Allow-Origin"] = origin
        headers["Vary"] = "Origin"
    headers["Access-Control-Expose-Headers"] = _EXPOSE_HEADERS


def _bearer(request: web.Request) -> str:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" else ""


def install(app: web.Application, rt: Runtime, whip: WhipIngest) -> None:
    """Register the WHIP routes, answered by ``whip``."""
    if not (rt.settings.live.enabled and rt.settings.live.whip):
        return

    async def post_offer(request: web.Request) -> web.Response:
        input = request.match_info["input"]
        offer = await read_offer(request)
        try:
            s, answer, servers = await whip.publish(
                input, _bearer(request), offer, request.remote or ""
            )
        except Unauthorized as exc:
            return web.json_response(
                exc.to_json(), status=401, headers={"WWW-Authenticate": 'Bearer realm="whip"'}
            )
        resp = web.Response(status=201, text=answer, content_type=SDP)
        resp.headers["Location"] = f"/whip/{s.input}/{s.id}"
        for value in link_headers(servers):
            resp.headers.add("Link", value)
        resp.headers["Cache-Control"] = "no-store"
        return resp

    async def delete_session(request: web.Request) -> web.Response:
        # The session URL is the capability (128 random bits, known to the publisher only).
        s = whip.get(request.match_info["input"], request.match_info["session_id"])
        await whip.close(s.id, "unpublished", "unpublished")
        return web.Response(status=200)

    async def patch_session(request: web.Request) -> web.Response:
        whip.get(request.match_info["input"], request.match_info["session_id"])
        # Trickle ICE and ICE restarts are optional (RFC 9725 4.3): the answer has every
        # candidate.
        raise web.HTTPMethodNotAllowed("PATCH", ["DELETE", "OPTIONS"])

    async def preflight(request: web.Request) -> web.Response:
        methods = "DELETE, OPTIONS" if "session_id" in request.match_info else "POST, OPTIONS"
        headers = {
            "Access-Control-Allow-Methods": methods,
            "Access-Control-Allow-Headers": _ALLOW_HEADERS,
            "Access-Control-Max-Age": "600",
            "Allow": methods,
        }
        if "session_id" not in request.match_info:
            headers["Accept-Post"] = SDP
            # RFC 9725 4.4: a client may learn the ICE servers before it makes its offer. A
            # preflight is not authenticated, so it gets the servers without credentials only;
            # TURN credentials go with the answer to an accepted offer.
            public = [s for s in await whip.ice.servers() if s.credential is None]
            resp = web.Response(status=204, headers=headers)
            for value in link_headers(public):
                resp.headers.add("Link", value)
            return resp
        return web.Response(status=204, headers=headers)

    async def add_cors(request: web.Request, response: web.StreamResponse) -> None:
        if request.path.startswith("/whip/"):
            _cors(rt, request, response.headers)

    app.on_response_prepare.append(add_cors)
    app.router.add_post("/whip/{input}", post_offer)
    app.router.add_route("OPTIONS", "/whip/{input}", preflight)
    app.router.add_delete("/whip/{input}/{session_id}", delete_session)
    app.router.add_patch("/whip/{input}/{session_id}", patch_session)
    app.router.add_route("OPTIONS", "/whip/{input}/{session_id}", preflight)
