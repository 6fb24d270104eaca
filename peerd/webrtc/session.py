"""WHEP sessions: negotiation, the concurrency cap, and cleanup when a viewer goes away.

One :class:`WhepService` per daemon owns every session. A session is one
aiortc ``RTCPeerConnection`` answering a viewer's offer, its two paced tracks and the feeder that
fills them (``peerd.webrtc.media``; for a live input, the fan-out of ``peerd.live.whep``, which
opens its sessions through :meth:`WhepService.admit` and :meth:`WhepService.start`). It ends
when the viewer sends ``DELETE``, when the peer connection fails or closes (ICE consent lost,
DTLS closed), when it does not connect within ``connect_timeout_s``, or when the daemon stops;
ending closes the peer connection, stops the feeder and frees the slot.

A session is a stream of the uplink admission (:class:`peerd.core.uplink.Uplink`, ``[uplink]
budget_mbps``): a new one is decided as a new HLS stream is, and refused with 503 and
``Retry-After`` when the node is over its budget (there is no bucket to send a WHEP viewer to);
an admitted one is held until it ends, never cut. Every second, the RTP bytes each session's
senders sent since the last look (aiortc's ``bytesSent``) are counted into the uplink meter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCOutboundRtpStreamStats,
    RTCPeerConnection,
    RTCRemoteInboundRtpStreamStats,
    RTCRtpSender,
    RTCSessionDescription,
)
from aiortc import sdp as rtc_sdp
from aiortc.codecs import CODECS
from aiortc.exceptions import InternalError, InvalidAccessError, InvalidStateError, OperationError
from aiortc.rtcrtpparameters import (
    RTCRtcpFeedback,
    RTCRtpCodecCapability,
    RTCRtpCodecParameters,
)
from prometheus_client import Counter, Gauge

from peerd.core.whep import IceServer, OfferedCodec, VideoPlan, choose_video
from peerd.delivery import Resolver
from peerd.delivery.media import MediaResolver
from peerd.errors import BadRequest, NotFound, TooManyRequests, Unavailable
from peerd.http.playback import PlaybackAnalytics
from peerd.runtime import Runtime
from peerd.webrtc.ice import IceProvider, build_ice_provider, for_aiortc
from peerd.webrtc.media import (
    Feeder,
    PacedTrack,
    Playable,
    PlayoutClock,
    VideoMode,
    load_playable,
)

log = logging.getLogger("peerd.webrtc")

# aiortc advertises H.264 (Constrained) Baseline only and matches H.264 by profile, so it could not
# accept a viewer's Main or High entry. aiortc's packetizer does not care about the profile, so the
# profiles peerd passes through are added to its codec table, once, with fresh payload types; the
# answer then names the stream's own profile-level-id (:func:`_label_h264`). aiortc's own encoder
# (transcode path) produces Constrained Baseline, which every one of these profiles decodes.
_EXTRA_H264 = ("4d001f", "640c1f", "64001f")


def _register_h264_profiles() -> None:
    video = CODECS["video"]
    have = {
        str(c.parameters.get("profile-level-id", "")).lower()
        for c in video
        if c.mimeType.lower() == "video/h264"
    }
    pt = max(c.payloadType or 0 for c in video) + 1
    for pli in _EXTRA_H264:
        if pli in have:
            continue
        video.append(
            RTCRtpCodecParameters(
                mimeType="video/H264",
                clockRate=90000,
                payloadType=pt,
                rtcpFeedback=[
                    RTCRtcpFeedback(type="nack"),
                    RTCRtcpFeedback(type="nack", parameter="pli"),
                    RTCRtcpFeedback(type="goog-remb"),
                ],
                parameters={
                    "level-asymmetry-allowed": "1",
                    "packetization-mode": "1",
                    "profile-level-id": pli,
                },
            )
        )
        video.append(
            RTCRtpCodecParameters(
                mimeType="video/rtx", clockRate=90000, payloadType=pt + 1, parameters={"apt": pt}
            )
        )
        pt += 2


_register_h264_profiles()


def h264_preferences(profile_level_id: str) -> list[RTCRtpCodecCapability]:
    """Capabilities naming the H.264 profile of ``profile_level_id`` (and RTX), for the answer."""
    want = rtc_sdp.parse_h264_profile_level_id(profile_level_id)[0]
    prefs: list[RTCRtpCodecCapability] = []
    rtx = None
    for cap in RTCRtpSender.getCapabilities("video").codecs:
        name = cap.mimeType.lower()
        if name == "video/rtx":
            rtx = cap
        elif name == "video/h264" and cap.parameters.get("packetization-mode") == "1":
            pli = str(cap.parameters.get("profile-level-id", "42e01f"))
            if rtc_sdp.parse_h264_profile_level_id(pli)[0] == want and not prefs:
                prefs.append(cap)
    if rtx is not None and prefs:
        prefs.append(rtx)
    return prefs


def _label_h264(answer: str, profile_level_id: str) -> str:
    """``answer`` with its video H.264 entries naming ``profile_level_id`` (the stream sent):
    aiortc words an answer with the level of its codec table, not the stream's."""
    desc = rtc_sdp.SessionDescription.parse(answer)
    for m in desc.media:
        for c in m.rtp.codecs if m.kind == "video" else ():
            if c.mimeType.lower() == "video/h264":
                c.parameters["profile-level-id"] = profile_level_id
    return str(desc)


async def answer_offer(pc: RTCPeerConnection, offer: str, h264_label: str | None) -> None:
    """Apply ``offer`` to ``pc`` (its sending transceivers added) and set the answer, its H.264
    entries naming ``h264_label`` when given; BadRequest when aiortc cannot negotiate it."""
    try:
        await asyncio.sleep(0)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=offer, type="offer"))
        await asyncio.sleep(0)
        answer = await pc.createAnswer()
        if h264_label:
            answer = RTCSessionDescription(
                sdp=_label_h264(answer.sdp, h264_label), type=answer.type
            )
        await asyncio.sleep(0)
        await pc.setLocalDescription(answer)
    except (
        ValueError,
        KeyError,
        IndexError,
        InternalError,
        InvalidAccessError,
        InvalidStateError,
        OperationError,  # no common codec, no DTLS fingerprint, ...
    ) as exc:
        raise BadRequest(f"cannot negotiate this offer: {exc}") from None


_SENT_EVERY_S = 1.0


def _stream(session_id: str) -> tuple[str, str]:
    """The session's stream key in the uplink admission (apart from HLS streams' keys)."""
    return ("whep", session_id)


@dataclass(frozen=True)
class OfferSummary:
    """What the viewer's offer asks for."""

    kinds: tuple[str, ...]
    video_codecs: tuple[OfferedCodec, ...]


def summarize_offer(offer: str) -> OfferSummary:
    """Parse an SDP offer enough to plan the session; BadRequest when it is not one."""
    if "m=" not in offer or not offer.lstrip().startswith("v=0"):
        raise BadRequest("body is not an SDP offer")
    try:
        desc = rtc_sdp.SessionDescription.parse(offer)
    except (ValueError, KeyError, IndexError, AssertionError) as exc:
        raise BadRequest(f"cannot parse the SDP offer: {exc}") from None
    kinds = tuple(m.kind for m in desc.media)
    video: list[OfferedCodec] | None = None
    for m in desc.media:
        if m.kind not in ("audio", "video"):
            continue
        # aiortc accepts these offers and then can never connect: refuse them up front.
        if m.dtls is None or not m.dtls.fingerprints:
            raise BadRequest(f"the offer's {m.kind} section has no DTLS fingerprint")
        if m.ice is None or not m.ice.usernameFragment or not m.ice.password:
            raise BadRequest(f"the offer's {m.kind} section has no ICE credentials")
        if m.kind == "video" and video is None:
            video = [
                OfferedCodec(c.mimeType, {k: str(v) for k, v in c.parameters.items()})
                for c in m.rtp.codecs
            ]
    if "video" not in kinds and "audio" not in kinds:
        raise BadRequest("the offer has no audio or video section")
    return OfferSummary(kinds=kinds, video_codecs=tuple(video or ()))


class Feed(Protocol):
    """What fills a session's tracks: stored media (:class:`~peerd.webrtc.media.Feeder`) or a
    live input (:mod:`peerd.live.whep`)."""

    clock: PlayoutClock
    segments_read: int

    async def run(self) -> None:
        """Fill the tracks until the media ends (or the session is cancelled)."""


T = TypeVar("T")


@dataclass
class WhepSession:
    """One viewer."""

    id: str
    media_id: str  # or "live:<input>" (the id its viewer token names)
    mode: str
    pc: RTCPeerConnection
    feeder: Feed
    tracks: list[MediaStreamTrack]
    started: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    sent: int = 0  # RTP bytes already counted into the uplink meter
    # Playback analytics from the viewer's RTCP receiver reports (see WhepService._report).
    received: int = 0
    lost: int = 0
    lossy: bool = False
    freezes: int = 0


class WhepMetrics:
    """Session counters on the daemon's registry."""

    def __init__(self, rt: Runtime) -> None:
        reg = rt.metrics.registry
        self.active = Gauge("peerd_whep_sessions", "Open WHEP sessions", registry=reg)
        self.opened = Counter(
            "peerd_whep_sessions_opened", "WHEP sessions opened", ["mode"], registry=reg
        )
        self.closed = Counter(
            "peerd_whep_sessions_closed", "WHEP sessions ended", ["reason"], registry=reg
        )
        self.rejected = Counter(
            "peerd_whep_rejected", "WHEP offers refused", ["reason"], registry=reg
        )
        self.turn = Counter(
            "peerd_turn_credentials_fetch",
            "Cloudflare TURN credential requests",
            ["result"],
            registry=reg,
        )


class WhepService:
    """The daemon service owning every WHEP session (see the module doc)."""

    name = "webrtc"

    def __init__(
        self,
        rt: Runtime,
        ice: IceProvider | None = None,
        resolver: Resolver | None = None,
        finder: MediaResolver | None = None,
        analytics: PlaybackAnalytics | None = None,
    ) -> None:
        self.rt = rt
        self.analytics = analytics  # None: sessions are not reported
        self.resolver = resolver  # blobs the node lacks; None: the store alone
        self.finder = finder  # media the catalog lacks; None: 404
        self.cfg = rt.settings.webrtc
        self.metrics = WhepMetrics(rt)
        self.ice = ice or build_ice_provider(rt.settings, on_fetch=self._count_fetch)
        self.sessions: dict[str, WhepSession] = {}
        self._reserved = 0
        self._playables: dict[str, Playable] = {}
        self._loading: dict[str, asyncio.Task[Playable]] = {}
        # Demuxing runs on a few threads of its own, started with the service: segment work is
        # bounded whatever the number of viewers, and no viewer waits for a thread to start
        # (starting one blocks the event loop until the new thread runs).
        self.pool = ThreadPoolExecutor(
            max_workers=self.cfg.media_threads, thread_name_prefix="ThreadPoolExecutor-whep"
        )
        self._accepting = False

    def _count_fetch(self, result: str) -> None:
        self.metrics.turn.labels(result=result).inc()

    async def run(self, ready: Callable[[], None]) -> None:
        """Start the media threads, accept sessions until cancelled; then close them all."""
        await asyncio.to_thread(self._start_threads)
        self._accepting = self.cfg.enabled
        ready()
        try:
            while True:
                await asyncio.sleep(_SENT_EVERY_S)
                for s in list(self.sessions.values()):
                    # A session closing meanwhile must not end the service (and every session).
                    with contextlib.suppress(Exception):
                        await self._count_sent(s)
        finally:
            self._accepting = False
            await asyncio.shield(self._close_all("stop"))
            await asyncio.shield(self.ice.close())
            await asyncio.shield(asyncio.to_thread(self.pool.shutdown, True, cancel_futures=True))

    async def _count_sent(self, s: WhepSession) -> None:
        """Count what ``s`` sent since the last call into the uplink meter; hold its stream."""
        total = received = lost = 0
        for sender in s.pc.getSenders():
            for st in (await sender.getStats()).values():
                if isinstance(st, RTCOutboundRtpStreamStats):
                    total += st.bytesSent
                elif isinstance(st, RTCRemoteInboundRtpStreamStats):
                    received += st.packetsReceived
                    lost += st.packetsLost
        self._report(s, received, lost)
        now = time.monotonic()
        if total > s.sent:
            self.rt.uplink.sent(total - s.sent, now)
            s.sent = total
        if s.id in self.sessions:  # not ended meanwhile
            self.rt.uplink.hold(_stream(s.id), now)

    def _report(self, s: WhepSession, received: int, lost: int) -> None:
        """Playback analytics from the node's side of the peer connection: the viewer's
        receiver reports. The session started (its startup counted from the offer) once the
        viewer reported packets received; a freeze is a run of seconds in which it lost more
        than 5% of the packets sent to it."""
        if self.analytics is None:
            return
        got, gone = received - s.received, lost - s.lost
        if got + gone > 0:
            lossy = gone > 0.05 * (got + gone)
            if lossy and not s.lossy:
                s.freezes += 1
            s.lossy = lossy
        s.received, s.lost = max(s.received, received), max(s.lost, lost)
        playable = self._playables.get(s.media_id)
        shown = playable and (playable.rendition or playable.audio)
        self.analytics.whep(
            s.id,
            s.media_id,
            shown.id if shown else "",
            shown.codecs if shown else "",
            startup_s=time.monotonic() - s.started if s.received else None,
            freezes=s.freezes,
        )

    def _start_threads(self) -> None:
        n = self.cfg.media_threads
        barrier = threading.Barrier(n)
        # n tasks that wait for each other: the pool has to start all n threads.
        for f in [self.pool.submit(barrier.wait, 10) for _ in range(n)]:
            f.result()

    async def drain(self) -> None:
        """Refuse new sessions and end the open ones (viewers reconnect to another node)."""
        self._accepting = False
        await self._close_all("drain")

    async def _close_all(self, reason: str) -> None:
        await asyncio.gather(
            *(self.close(s.id, reason) for s in list(self.sessions.values())),
            return_exceptions=True,
        )

    async def ice_servers(self) -> tuple[IceServer, ...]:
        """The servers to hand to a viewer now."""
        return await self.ice.servers()

    async def open(
        self, media_id: str, offer: str
    ) -> tuple[WhepSession, str, tuple[IceServer, ...]]:
        """Answer a viewer's offer: the new session, the SDP answer and the ICE servers used."""
        return await self.admit(lambda session_id: self._open(session_id, media_id, offer))

    async def admit(self, negotiate: Callable[[str], Awaitable[T]]) -> T:
        """Run ``negotiate(session id)`` in a slot of ``max_sessions`` and the uplink admission
        (refused with 429 or 503 otherwise); the slot is the session's once ``negotiate`` has
        :meth:`start`-ed it."""
        if not self._accepting or self.rt.draining:
            raise Unavailable("WHEP is not accepting sessions")
        if len(self.sessions) + self._reserved >= self.cfg.max_sessions:
            self.metrics.rejected.labels(reason="cap").inc()
            raise TooManyRequests(
                f"the node is at its limit of {self.cfg.max_sessions} WHEP sessions"
            )
        session_id = secrets.token_urlsafe(16)
        if not self.rt.uplink.admit(_stream(session_id), time.monotonic()):
            self.metrics.rejected.labels(reason="uplink").inc()
            self.rt.metrics.uplink_overflow.labels(answer="refused").inc()
            raise Unavailable(
                "uplink budget reached", retry_after=self.rt.settings.uplink.retry_after_s
            )
        # Hold the slot across the awaits below, so concurrent offers cannot overshoot the cap.
        self._reserved += 1
        try:
            return await negotiate(session_id)
        except BaseException:
            self.rt.uplink.release(_stream(session_id))
            raise
        finally:
            self._reserved -= 1

    async def _open(
        self, session_id: str, media_id: str, offer: str
    ) -> tuple[WhepSession, str, tuple[IceServer, ...]]:
        summary = summarize_offer(offer)
        playable = await self._playable(media_id)
        plan = VideoPlan("refuse", reason="the offer has no video section")
        if "video" in summary.kinds and playable.rendition is not None:
            plan = choose_video(
                summary.video_codecs,
                playable.profile,
                reorders=playable.reorders,
                transcode_allowed=self.cfg.transcode,
            )
            if plan.mode == "refuse":
                self.metrics.rejected.labels(reason="codec").inc()
                raise BadRequest(f"cannot send this media to the viewer: {plan.reason}")
        if plan.mode == "refuse" and not ("audio" in summary.kinds and playable.has_audio):
            # A session that would send nothing at all is refused rather than left silent.
            self.metrics.rejected.labels(reason="kind").inc()
            if playable.rendition is None:
                raise BadRequest("the media is audio-only and the offer has no audio section")
            raise BadRequest("the media has no sound and the offer has no video section")
        servers = await self.ice.servers()
        # Negotiation is a few milliseconds of synchronous aiortc work; yield between its stages
        # so that many offers arriving at once never hold the loop in one long step.
        await asyncio.sleep(0)
        pc = RTCPeerConnection(RTCConfiguration(iceServers=for_aiortc(servers)))
        try:
            session = await self._negotiate(session_id, pc, playable, summary, plan, offer)
        except BaseException:
            await pc.close()
            raise
        assert pc.localDescription is not None
        return session, pc.localDescription.sdp, servers

    async def _playable(self, media_id: str) -> Playable:
        # Manifests are immutable, so what was learnt about a media item (rendition, B-frames)
        # holds for every later viewer; a small bounded map is enough.
        p = self._playables.get(media_id)
        if p is not None:
            return p
        task = self._loading.get(media_id)
        if task is None:
            # One load per media item however many viewers ask at once.
            task = asyncio.create_task(self._load_playable(media_id))
            self._loading[media_id] = task
            task.add_done_callback(lambda _: self._loading.pop(media_id, None))
        p = await asyncio.shield(task)
        if len(self._playables) >= 256:
            self._playables.pop(next(iter(self._playables)))
        self._playables[media_id] = p
        return p

    async def _load_playable(self, media_id: str) -> Playable:
        if self.finder is not None:
            await self.finder.ensure_media(media_id)  # from the network if the catalog lacks it
        return await load_playable(self.rt, media_id, self.cfg.max_height, self.pool, self.resolver)

    async def _negotiate(
        self,
        session_id: str,
        pc: RTCPeerConnection,
        playable: Playable,
        summary: OfferSummary,
        plan: VideoPlan,
        offer: str,
    ) -> WhepSession:
        clock = PlayoutClock()
        video = audio = None
        for kind in summary.kinds:
            # One sending transceiver per kind, created before the offer is applied so that
            # aiortc pairs it with the viewer's section and honours the codec preference.
            if kind == "video" and video is None and plan.mode != "refuse":
                video = PacedTrack("video", clock)
                tr = pc.addTransceiver(video, direction="sendonly")
                if plan.mode == "passthrough" and plan.offered is not None:
                    tr.setCodecPreferences(h264_preferences(plan.offered))
            elif kind == "audio" and audio is None and playable.has_audio:
                audio = PacedTrack("audio", clock)
                pc.addTransceiver(audio, direction="sendonly")
        label = plan.profile_level_id if video is not None and plan.mode == "passthrough" else None
        await answer_offer(pc, offer, label)
        mode: VideoMode = "passthrough" if plan.mode == "passthrough" else "transcode"
        feeder = Feeder(
            self.rt,
            playable,
            video=video,
            video_mode=mode,
            audio=audio,
            clock=clock,
            read_ahead_s=self.cfg.read_ahead_s,
            loop_playback=self.cfg.loop_playback,
            pool=self.pool,
            resolver=self.resolver,
        )
        session = WhepSession(
            id=session_id,
            media_id=playable.media_id,
            mode=mode if video is not None else "audio",
            pc=pc,
            feeder=feeder,
            tracks=[t for t in (video, audio) if t is not None],
        )
        self.start(session)
        return session

    def start(self, session: WhepSession) -> None:
        """Make a negotiated session one of the service's: feed it, watch its connection, count
        it (closed by :meth:`close`)."""
        pc = session.pc
        self.sessions[session.id] = session
        session.task = asyncio.create_task(self._feed(session), name=f"whep-{session.id[:8]}")

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            state = pc.connectionState
            log.debug("whep connection state", extra={"session": session.id, "state": state})
            if state in ("failed", "closed"):
                await self.close(session.id, state)

        asyncio.get_running_loop().call_later(
            self.cfg.connect_timeout_s, self._check_connected, session.id
        )
        self.metrics.opened.labels(mode=session.mode).inc()
        self.metrics.active.set(len(self.sessions))
        log.info(
            "whep session opened",
            extra={"session": session.id, "media": session.media_id, "mode": session.mode},
        )

    async def _feed(self, session: WhepSession) -> None:
        try:
            await session.feeder.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("whep media failed", extra={"session": session.id, "error": repr(exc)})
            await self.close(session.id, "media_error")

    def _check_connected(self, session_id: str) -> None:
        s = self.sessions.get(session_id)
        if s is not None and s.pc.connectionState != "connected":
            log.info("whep session never connected", extra={"session": session_id})
            task = asyncio.create_task(self.close(session_id, "connect_timeout"))
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    def get(self, session_id: str) -> WhepSession:
        """An open session; NotFound otherwise."""
        s = self.sessions.get(session_id)
        if s is None:
            raise NotFound("no such WHEP session")
        return s

    async def close(self, session_id: str, reason: str) -> bool:
        """End a session (idempotent); False if it was not open."""
        s = self.sessions.pop(session_id, None)
        if s is None:
            return False
        self.metrics.active.set(len(self.sessions))
        self.metrics.closed.labels(reason=reason).inc()
        current = asyncio.current_task()
        if s.task is not None and s.task is not current and not s.task.done():
            s.task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await s.task
        for t in s.tracks:
            t.stop()
        with contextlib.suppress(Exception):
            await self._count_sent(s)  # the last second's bytes
        self.rt.uplink.release(_stream(session_id))
        await s.pc.close()
        log.info(
            "whep session closed",
            extra={
                "session": session_id,
                "reason": reason,
                "seconds": round(time.monotonic() - s.started, 1),
                "played_s": round(s.feeder.clock.media_now() or 0.0, 1),
                "segments_read": s.feeder.segments_read,
            },
        )
        return True
