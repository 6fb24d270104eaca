"""Hand-off of a live input to Cloudflare Stream: its frames restreamed, unchanged, over RTMPS.

A :class:`HandoffConsumer` is one of the live service's consumers: it gets every publication
(``publication(input)``) and, every ``[live.handoff] check_interval_s``, asks
:class:`peerd.core.handoff.Handoff` whether the input's audience has outgrown the node and R2
(``start``) or come back within reach (``stop``). Then:

``start``  the Stream live input of this input is looked up (reused while the daemon runs) or
           created through Stream's API (``POST /accounts/{account}/stream/live_inputs``,
           ``Authorization: Bearer <token>``, recording ``automatic``: Stream plays a live input
           over HLS only when it records it), and an egress thread sends the publication to its
           ``rtmps.url`` + ``rtmps.streamKey``: FLV muxed by PyAV from the frames as they come,
           starting at a keyframe, H.264 (AVCC) and AAC as they are. Opus (WHIP publishers) has
           no place in FLV: it is decoded and encoded to AAC once, in the egress thread; video is
           never touched. (WHIP egress would carry Opus as is, but needs a WebRTC sender that
           takes encoded H.264 without encoding it again, ICE and DTLS towards Stream: far more
           moving parts than one audio encoder at a few percent of a core.)
``stop``   the egress is closed (also when the publication ends). The Stream live input is kept
           for the next hand-off; its recording stays in Stream.

An egress that fails (Stream unreachable, the connection cut) reconnects with backoff, at the
next keyframe; frames that arrive meanwhile are dropped, and nothing it does reaches the node's
own viewers (it has its own thread and queue). While handed off the input's viewers are the
node's plus Stream's (``GET https://customer-<code>.cloudflarestream.com/<uid>/views``), so the
audience moved to Stream still counts. :meth:`HandoffConsumer.status` is what the coordinator's
heartbeat reports (``live_handoff``): per input, whether it is handed off, the Stream uid and the
HLS URL to send viewers to. Tokens and stream keys are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import queue
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import av
from prometheus_client import CollectorRegistry, Counter, Gauge

from peerd.config import LiveHandoffSettings, Settings
from peerd.core.backoff import backoff_delay
from peerd.core.handoff import EgressState, Handoff, HandoffPolicy, HandoffStatus, Observation
from peerd.core.live import LiveFrame, LiveSink, LiveTrack
from peerd.core.uplink import Uplink
from peerd.errors import UpstreamError

log = logging.getLogger("peerd.live.handoff")

API_TIMEOUT_S = 10.0
EGRESS_TIMEOUT_S = 10.0  # an RTMP connect or write stuck this long fails the egress
MAX_QUEUED = 1000  # frames waiting for the egress thread (about 15 s of audio and video)


@dataclass(frozen=True)
class StreamInput:
    """A Cloudflare Stream live input, as its API describes it (the fields the hand-off uses)."""

    uid: str
    rtmps_url: str
    stream_key: str
    playback_base: str | None  # scheme://host Stream plays it from, when known


class StreamApi:
    """The calls the hand-off makes to Cloudflare Stream's live-input API."""

    def __init__(self, cfg: LiveHandoffSettings, token: str) -> None:
        self.base = f"{cfg.api_url.rstrip('/')}/accounts/{cfg.account_id}/stream/live_inputs"
        self.cfg = cfg
        self._headers = {"Authorization": f"Bearer {token}"}

    async def _call(
        self, method: str, url: str, body: dict[str, Any] | None = None, missing: bool = False
    ) -> Any:
        """The call's ``result``; with ``missing``, None for a 404 (an unknown uid)."""
        timeout = aiohttp.ClientTimeout(total=API_TIMEOUT_S)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as s,
                s.request(method, url, json=body, headers=self._headers) as r,
            ):
                status = r.status
                try:
                    doc = await r.json(content_type=None)
                except ValueError:
                    doc = None
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UpstreamError(f"Cloudflare Stream unreachable: {exc!r}") from exc
        if missing and status == 404:
            return None
        if status != 200 or not isinstance(doc, dict) or not doc.get("success"):
            errors = doc.get("errors") if isinstance(doc, dict) else None
            what = "; ".join(
                f"{e.get('code')}: {e.get('message')}" for e in errors or [] if isinstance(e, dict)
            )
            raise UpstreamError(f"Cloudflare Stream answered {status}: {what or 'no detail'}")
        return doc.get("result")

    def _input(self, result: Any) -> StreamInput:
        try:
            rtmps = result["rtmps"]
            found = StreamInput(result["uid"], rtmps["url"], rtmps["streamKey"], None)
        except (KeyError, TypeError) as exc:
            raise UpstreamError(f"Cloudflare Stream answered without {exc}") from exc
        domain = self.cfg.customer_domain
        if domain:
            base = domain if "://" in domain else f"https://{domain}"
        else:  # Stream's WebRTC URLs are on the account's customer domain
            base = ""
            for key in ("webRTCPlayback", "webRTC"):
                url = (result.get(key) or {}).get("url") or ""
                parts = urlsplit(url)
                if parts.scheme and parts.netloc:
                    base = f"{parts.scheme}://{parts.netloc}"
                    break
        return replace(found, playback_base=base.rstrip("/") or None)

    async def create(self, name: str) -> StreamInput:
        """A new live input for peerd input ``name``, recorded (Stream's HLS needs it)."""
        recording: dict[str, Any] = {"mode": "automatic", "timeoutSeconds": 0}
        body: dict[str, Any] = {"meta": {"name": name}, "recording": recording}
        if self.cfg.delete_recording_after_days:
            body["deleteRecordingAfterDays"] = self.cfg.delete_recording_after_days
        return self._input(await self._call("POST", self.base, body))

    async def get(self, uid: str) -> StreamInput | None:
        """The live input ``uid``, or None if Stream does not know it (deleted)."""
        result = await self._call("GET", f"{self.base}/{uid}", missing=True)
        return None if result is None else self._input(result)

    async def named(self, name: str) -> str | None:
        """The uid of the live input called ``name`` (``meta.name``), if the account has one."""
        result = await self._call("GET", self.base)
        listed = result.get("liveInputs") if isinstance(result, dict) else result
        for item in listed if isinstance(listed, list) else []:
            if isinstance(item, dict) and (item.get("meta") or {}).get("name") == name:
                uid = item.get("uid")
                if isinstance(uid, str):
                    return uid
        return None

    async def views(self, playback_base: str, uid: str) -> int | None:
        """How many watch ``uid`` on Stream now, or None if Stream does not say."""
        timeout = aiohttp.ClientTimeout(total=API_TIMEOUT_S)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as s,
                s.get(f"{playback_base}/{uid}/views") as r,
            ):
                doc = await r.json(content_type=None) if r.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError):
            return None
        n = doc.get("liveViewers") if isinstance(doc, dict) else None
        return n if isinstance(n, int) and n >= 0 else None


def _flv_tag(kind: int, payload: bytes) -> bytes:
    n = len(payload)
    return bytes([kind]) + n.to_bytes(3, "big") + bytes(7) + payload + (n + 11).to_bytes(4, "big")


def _templates(tracks: Sequence[LiveTrack]) -> tuple[Any, dict[int, Any]]:
    """An FLV holding only the H.264/AAC tracks' codec configurations, opened: its streams are
    the templates of the egress streams (PyAV copies a stream's parameters only from another
    stream), so nothing is encoded to describe them."""
    flv = b"FLV\x01\x05\x00\x00\x00\x09" + bytes(4)
    order: list[int] = []
    for t in tracks:
        if t.codec == "h264":
            flv += _flv_tag(9, b"\x17\x00\x00\x00\x00" + t.config)
            order.append(t.index)
        elif t.codec == "aac":
            flv += _flv_tag(8, b"\xaf\x00" + t.config)
            order.append(t.index)
    holder = av.open(io.BytesIO(flv), format="flv")
    return holder, dict(zip(order, holder.streams, strict=False))


class _Egress:
    """One restream: a thread muxing a publication's frames as FLV into an ffmpeg process that
    copies them to an RTMP(S) URL, started again (with backoff) whenever it fails.

    The network side is the ffmpeg CLI's, not PyAV's in this process: PyAV opens an output URL
    (connect, TLS and RTMP handshakes) holding the GIL, which would stall the event loop and every
    viewer of the node for as long as Stream takes to answer, and it cannot ask for the server's
    certificate to be verified. ffmpeg is told to (``-tls_verify 1``), and reports what it sent
    (``-progress``): the egress bytes are counted there."""

    def __init__(
        self,
        input: str,
        url: str,
        tracks: Sequence[LiveTrack],
        cfg: LiveHandoffSettings,
        sent: Callable[[int], None],
        failed: Callable[[], None],
    ) -> None:
        self.input = input
        self.url = url
        self.host = urlsplit(url).netloc  # what logs name: the URL's path holds the key
        self._key = url.rstrip("/").rsplit("/", 1)[-1]
        self.tracks = list(tracks)
        self.cfg = cfg
        self._sent = sent
        self._failed = failed
        self.state: EgressState = "connecting"
        self.failures = 0
        self._connected = False  # the current ffmpeg reported progress (it reached Stream)
        self._skipping = False  # frames are dropped until the next video keyframe
        self._has_video = any(t.kind == "video" for t in self.tracks)
        self._queue: queue.SimpleQueue[LiveFrame | None] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"handoff-{input}", daemon=True)
        self._thread.start()

    def put(self, frame: LiveFrame) -> None:
        """Queue ``frame``; while the thread is :data:`MAX_QUEUED` frames behind, frames are
        dropped until the next video keyframe with room (a decoder needs no frame before it)."""
        if self._skipping or self._queue.qsize() >= MAX_QUEUED:
            video = self.tracks[frame.track].kind == "video"
            resumes = (frame.keyframe and video) or not self._has_video
            if not resumes or self._queue.qsize() >= MAX_QUEUED:
                self._skipping = True
                return
            self._skipping = False
        self._queue.put(frame)

    def close(self) -> None:
        """Stop once the frames queued so far are sent (:meth:`wait` for the thread)."""
        self._stop.set()
        self._queue.put(None)

    async def wait(self) -> None:
        """Until the thread has ended."""
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        streak = 0  # failures since the last connection that sent
        while not self._stop.is_set():
            try:
                if self._session():
                    streak = 0
                    continue
                error = "ffmpeg ended"
            except (av.FFmpegError, OSError, ValueError) as exc:
                error = str(exc)[:200]
            if self._stop.is_set():
                break
            streak += 1
            self.failures += 1
            self.state = "retrying"
            self._failed()
            delay = backoff_delay(streak, 1.0, self.cfg.retry_max_s, random.random())  # noqa: S311
            log.warning(
                "hand-off egress failed; retrying",
                extra={"input": self.input, "host": self.host, "error": error},
            )
            if self._stop.wait(delay):
                break
            while not self._queue.empty():  # stale: the next connection starts afresh
                self._queue.get_nowait()
        self.state = "off"

    def _next(self, proc: subprocess.Popen[bytes]) -> LiveFrame | None:
        """The next frame; None once closed (the frames queued before are sent first)."""
        while True:
            try:
                return self._queue.get(timeout=0.5)
            except queue.Empty:
                if self._stop.is_set():
                    return None
                if proc.poll() is not None:
                    raise OSError(f"ffmpeg exited with {proc.returncode}") from None

    def _command(self) -> list[str]:
        exe = shutil.which("ffmpeg")
        if exe is None:
            raise OSError("the ffmpeg CLI is not installed (Debian package: ffmpeg)")
        cmd = [exe, "-hide_banner", "-nostdin", "-loglevel", "error", "-nostats"]
        cmd += ["-progress", "pipe:1", "-stats_period", "1", "-f", "flv", "-i", "pipe:0"]
        cmd += ["-map", "0", "-c", "copy", "-rw_timeout", str(int(EGRESS_TIMEOUT_S * 1e6))]
        if urlsplit(self.url).scheme == "rtmps":
            cmd += ["-tls_verify", "1"]
            if self.cfg.ca_file is not None:
                cmd += ["-ca_file", str(self.cfg.ca_file)]
        return [*cmd, "-f", "flv", self.url]

    def _progress(self, proc: subprocess.Popen[bytes]) -> None:
        """ffmpeg's progress reports: bytes sent so far, and that it is connected."""
        assert proc.stdout is not None
        total = 0
        for line in proc.stdout:
            key, _, value = line.decode(errors="replace").strip().partition("=")
            if key == "total_size" and value.isdigit():
                self._sent(int(value) - total)
                total = int(value)
            elif key == "progress" and not self._stop.is_set():
                self.state = "sending"
                self._connected = True

    def _session(self) -> bool:
        """One ffmpeg process, from the next keyframe until stopped; whether it sent anything."""
        self.state = "connecting"
        self._connected = False
        with subprocess.Popen(  # noqa: S603 - argument list built here
            self._command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as proc:
            assert proc.stdin is not None
            assert proc.stderr is not None
            reader = threading.Thread(
                target=self._progress, args=(proc,), name=f"handoff-{self.input}-progress"
            )
            reader.start()
            holder, templates = _templates(self.tracks)
            failure: Exception | None = None  # on our side; ffmpeg's own cause is said first
            try:
                with av.open(proc.stdin, "w", format="flv") as out:
                    self._mux(out, templates, proc)
                proc.stdin.close()
                proc.wait(timeout=EGRESS_TIMEOUT_S)
            except (av.FFmpegError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
                failure = exc
            finally:
                holder.close()
                with contextlib.suppress(OSError):  # unsent bytes of a dead ffmpeg: gone
                    proc.stdin.close()
                if proc.poll() is None:
                    proc.kill()
                reader.join()
                err = proc.stderr.read().decode(errors="replace").strip()
                # ffmpeg names the URL in its errors: the stream key must not reach the logs.
                err = err.replace(self._key, "<key>") if self._key else err
        if proc.returncode != 0:
            raise OSError(f"ffmpeg exited with {proc.returncode}: {err[-200:]}") from failure
        if failure is not None:
            raise OSError(str(failure)) from failure
        return self._connected

    def _mux(self, out: Any, templates: dict[int, Any], proc: subprocess.Popen[bytes]) -> None:
        streams: dict[int, Any] = {}
        coders: dict[int, tuple[Any, Any, Any]] = {}  # opus track -> decoder, encoder, resampler
        for t in self.tracks:
            if t.index in templates:
                s = out.add_stream_from_template(templates[t.index])
                if t.kind == "video":
                    s.codec_context.width, s.codec_context.height = t.width, t.height
                else:
                    s.codec_context.sample_rate = t.sample_rate
                streams[t.index] = s
            elif t.codec == "opus":
                dec = av.CodecContext.create("opus", "r")
                if t.config:
                    dec.extradata = t.config
                enc = out.add_stream("aac", rate=48000)
                enc.layout = "mono" if t.channels == 1 else "stereo"
                enc.time_base = Fraction(1, 48000)
                res = av.AudioResampler(
                    format="fltp", layout=enc.layout, rate=48000, frame_size=1024
                )
                streams[t.index] = enc
                coders[t.index] = (dec, enc, res)
        has_video = self._has_video
        base: float | None = None  # seconds of the first keyframe sent
        while (f := self._next(proc)) is not None:
            t = self.tracks[f.track]
            if f.track not in streams:
                continue
            if base is None:
                if has_video and not (t.kind == "video" and f.keyframe):
                    continue
                base = f.dts / t.timescale
            offset = round(base * t.timescale)
            if f.dts < offset:
                continue
            if f.track in coders:
                self._transcode(out, f, t, offset, *coders[f.track])
                continue
            pkt = av.Packet(f.data)
            pkt.stream = streams[f.track]
            pkt.time_base = Fraction(1, t.timescale)
            pkt.dts, pkt.pts = f.dts - offset, f.pts - offset
            pkt.is_keyframe = f.keyframe
            out.mux(pkt)

    @staticmethod
    def _transcode(
        out: Any, f: LiveFrame, t: LiveTrack, offset: int, dec: Any, enc: Any, res: Any
    ) -> None:
        pkt = av.Packet(f.data)
        pkt.time_base = Fraction(1, t.timescale)
        pkt.pts = pkt.dts = f.pts - offset
        for frame in dec.decode(pkt):
            if frame.pts is not None:  # onto the encoder's 48 kHz clock
                frame.pts = round(Fraction(frame.pts) * frame.time_base * 48000)
                frame.time_base = Fraction(1, 48000)
            for chunk in res.resample(frame):
                out.mux(enc.encode(chunk))


class _Publication:
    """The hand-off's sink for one publication of one input."""

    def __init__(self, owner: HandoffConsumer, input: str) -> None:
        self.owner = owner
        self.input = input
        self.decision = Handoff(owner.policy)
        self.tracks: list[LiveTrack] = []
        self.egress: _Egress | None = None
        self.stream: StreamInput | None = None
        self.since: float | None = None
        self.remote_viewers = 0
        self._task: asyncio.Task[None] | None = None
        self._retry_at = 0.0  # after an API failure, no new attempt before this
        self._api_failures = 0

    # -- LiveSink --------------------------------------------------------------------------------

    def begin(self, tracks: Sequence[LiveTrack]) -> None:
        """Remember the tracks; start checking the audience (with ``[live.handoff]`` on)."""
        self.tracks = list(tracks)
        if not self.owner.cfg.enabled:
            return
        self._task = asyncio.get_running_loop().create_task(
            self._watch(), name=f"handoff-{self.input}"
        )
        self._task.add_done_callback(self._watched)
        self.owner._publications.add(self)

    def frame(self, frame: LiveFrame) -> None:
        """Queued for the egress while handed off."""
        if self.egress is not None:
            self.egress.put(frame)

    def end(self, reason: str) -> None:
        """The input ended: so does its hand-off."""
        if self._task is not None:
            self._task.cancel()
        self.decision.end()
        self._stop("input ended")
        self.owner._publications.discard(self)

    # -- the decision ----------------------------------------------------------------------------

    def _watched(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error(
                "hand-off checks stopped; the node keeps the input",
                extra={"input": self.input},
                exc_info=task.exception(),
            )
            self._stop("hand-off checks failed")

    async def _watch(self) -> None:
        owner = self.owner
        while True:
            await asyncio.sleep(owner.cfg.check_interval_s)
            now = owner.clock()
            if self.stream is not None and self.stream.playback_base and owner.api is not None:
                n = await owner.api.views(self.stream.playback_base, self.stream.uid)
                if n is not None:
                    self.remote_viewers = n
            viewers = owner.viewers(self.input) + (self.remote_viewers if self.egress else 0)
            obs = Observation(viewers, owner.uplink.report(now).state, owner.spill())
            action = self.decision.step(obs, now)
            if action == "start":
                if now < self._retry_at or not await self._start():
                    self.decision.active = False
            elif action == "stop":
                self._stop("audience back under the threshold")

    async def _start(self) -> bool:
        owner = self.owner
        token = owner.settings.secret(owner.cfg.api_token_secret)
        try:
            if not token:
                raise UpstreamError(
                    f"no Cloudflare API token (secret {owner.cfg.api_token_secret!r})"
                )
            api = owner.api = StreamApi(owner.cfg, token)
            stream = await self._find(api)
        except UpstreamError as exc:
            self._api_failures += 1
            self._retry_at = owner.clock() + backoff_delay(
                self._api_failures,
                10.0,
                600.0,
                random.random(),  # noqa: S311
            )
            owner.failures.labels(stage="api").inc()
            log.error(
                "hand-off to Cloudflare Stream refused; the node keeps the input",
                extra={"input": self.input, "error": str(exc)[:300]},
            )
            return False
        self._api_failures = 0
        self.stream = stream
        owner.uids[self.input] = stream.uid
        self.since = owner.wall()
        url = stream.rtmps_url.rstrip("/") + "/" + stream.stream_key
        self.egress = _Egress(
            self.input,
            url,
            self.tracks,
            owner.cfg,
            owner.egress_bytes.inc,
            owner.failures.labels(stage="egress").inc,
        )
        owner.active.inc()
        log.info(
            "live input handed off to Cloudflare Stream",
            extra={"input": self.input, "stream_uid": stream.uid},
        )
        return True

    async def _find(self, api: StreamApi) -> StreamInput:
        """This input's Stream live input: the one it used last (named after the node and the
        input, so a restarted daemon finds it too), else a new one."""
        name = f"peerd {self.owner.settings.node.name} {self.input}"
        uid = self.owner.uids.get(self.input) or await api.named(name)
        found = await api.get(uid) if uid is not None else None
        return found or await api.create(name)

    def _stop(self, why: str) -> None:
        egress, self.egress = self.egress, None
        if egress is None:
            return
        egress.close()
        self.owner._closing(egress)
        self.owner.active.dec()
        self.since = None
        self.remote_viewers = 0
        log.info("hand-off ended", extra={"input": self.input, "reason": why})

    def status(self) -> HandoffStatus:
        """This input's hand-off as the coordinator sees it."""
        s, e = self.stream, self.egress
        playback = (
            f"{s.playback_base}/{s.uid}/manifest/video.m3u8"
            if s is not None and s.playback_base
            else None
        )
        return HandoffStatus(
            input=self.input,
            handed_off=e is not None,
            since=self.since,
            stream_uid=s.uid if s is not None else None,
            playback_url=playback if e is not None else None,
            egress=e.state if e is not None else "off",
            failures=e.failures if e is not None else 0,
        )


class HandoffConsumer:
    """Restreams busy live inputs to Cloudflare Stream (a live service consumer, and a daemon
    service whose stop ends every hand-off)."""

    name = "live-handoff"

    def __init__(
        self,
        settings: Settings,
        uplink: Uplink,
        viewers: Callable[[str], int],
        *,
        registry: CollectorRegistry,
        spill: Callable[[], bool] = lambda: False,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.cfg = settings.live.handoff
        self.policy = HandoffPolicy(
            self.cfg.start_viewers,
            self.cfg.stop_viewers,
            self.cfg.start_after_s,
            self.cfg.stop_after_s,
        )
        self.uplink = uplink
        self.viewers = viewers
        self.spill = spill
        self.clock = clock
        self.wall = wall
        self.api: StreamApi | None = None
        self.uids: dict[str, str] = {}  # input -> its Stream live input, reused
        self._publications: set[_Publication] = set()
        self._ending: set[asyncio.Task[None]] = set()
        self.active = Gauge(
            "peerd_live_handoff_active",
            "Live inputs restreamed to Cloudflare Stream now",
            registry=registry,
        )
        self.egress_bytes = Counter(
            "peerd_live_handoff_egress_bytes",
            "Media bytes restreamed to Cloudflare Stream",
            registry=registry,
        )
        self.failures = Counter(
            "peerd_live_handoff_failures",
            "Hand-off failures: Stream's API refused or failed (api), an egress connection "
            "failed (egress)",
            ["stage"],
            registry=registry,
        )

    def publication(self, input: str) -> LiveSink:
        """A sink for a new publication of ``input``."""
        return _Publication(self, input)

    def status(self) -> list[HandoffStatus]:
        """Every published input's hand-off (for the coordinator's heartbeat)."""
        return sorted((p.status() for p in self._publications), key=lambda s: s.input)

    def _closing(self, egress: _Egress) -> None:
        task = asyncio.get_running_loop().create_task(egress.wait())
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def run(self, ready: Callable[[], None]) -> None:
        """Until cancelled; then every hand-off ends and its egress thread is waited for."""
        ready()
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def close(self) -> None:
        """End every hand-off and wait for the egress threads."""
        for p in list(self._publications):
            p.end("stopping")
        await asyncio.gather(*self._ending, return_exceptions=True)
