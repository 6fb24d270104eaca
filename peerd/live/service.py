"""The live service: configured inputs, their keys, one publisher each, and the fan-out.

Theory of operation
-------------------
:class:`LiveService` is the node's :class:`~peerd.core.live.LiveInputs`. Ingest adapters (RTMP,
WHIP) call :meth:`LiveService.open` with the key a publisher sent; the key is compared in
constant time with every configured input's key (:func:`~peerd.core.live.match_key`), read at
start from each input's secret file (``[live] inputs`` ``key_secret``, default
``live-<name>.key``). An input without its key file refuses every publisher, and the start logs
one error naming the file (never a key). An input has one publisher at a time: a second one is
refused (409) while the first is connected.

An accepted publisher gets a *tee* sink: ``begin``/``frame``/``end`` are forwarded to a sink per
registered :class:`LiveConsumer` (the LL-HLS packager, WHEP viewers, the recorder), each asked
for one when the publisher is accepted. A consumer that raises is logged once and dropped from
that publication; the others never notice. ``end`` is idempotent: the adapter ends a
publication when its publisher unpublishes or its connection drops, and the service ends it when
no frame came for ``[live] idle_timeout_s`` ("vanished: no data"); the first reason wins.

Each connect and drop is logged (``live input connected`` / ``live input dropped``) and calls
the listeners (the coordinator's early heartbeat, so the coordinator learns at once).
:meth:`LiveService.status` is what ``GET /api/v1/live``, the heartbeat's ``live`` field and the
dashboard show: per input, connected or not and since when, protocol, the publisher's address,
codecs (RFC 6381), the bitrate over the last :data:`RATE_WINDOW_S` seconds, viewers (the sum of
the registered viewer counters), latency (the lowest a registered latency hook reports: for
LL-HLS the node's part of glass-to-glass, see :meth:`peerd.live.llhls.LiveHls.latency`; null
while the input is not live) and the media id of its last recording.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from prometheus_client import CollectorRegistry, Counter, Gauge

from peerd.config import LiveSettings
from peerd.core.live import (
    LiveFrame,
    LiveSink,
    LiveTrack,
    Protocol_,
    Publication,
    match_key,
)
from peerd.errors import Conflict, NotFound, Unauthorized, Unavailable
from peerd.media.codecs import aac_codec, avc_codec

if TYPE_CHECKING:
    from peerd.live.record import Recorder

log = logging.getLogger("peerd.live")

RATE_WINDOW_S = 5.0
IDLE_REASON = "vanished: no data"
STOP_REASON = "node stopping"
# AAC profile names libavcodec gives the audio object types an AudioSpecificConfig names.
_AAC_OBJECT = {1: "Main", 2: "LC", 3: "SSR", 4: "LTP", 5: "HE-AAC", 29: "HE-AACv2"}


class LiveConsumer(Protocol):
    """A part that wants every publication (the LL-HLS packager, WHEP fan-out, the recorder)."""

    def publication(self, input: str) -> LiveSink:
        """A sink for a new publication of ``input`` (called when a publisher is accepted)."""
        ...


@runtime_checkable
class DrainingConsumer(LiveConsumer, Protocol):
    """A consumer with something to finish once the node ended its publications (LL-HLS
    viewers to tell of the end)."""

    async def drain(self) -> None:
        """Finish what the ended publications left for viewers (bounded)."""
        ...


@runtime_checkable
class RecoveringConsumer(LiveConsumer, Protocol):
    """A consumer with something an earlier run left to clean up (LL-HLS window blobs)."""

    async def recover(self) -> object:
        """Clean up after the last run (called once at start, publishers may be live)."""
        ...


ViewerCounter = Callable[[str], int]
"""Viewers of one input now (``counter(input)``), as one consumer counts them."""

LatencyHook = Callable[[str], float | None]
"""Seconds behind its publisher one output of an input is now (``hook(input)``), or None."""


@dataclass(frozen=True)
class InputStatus:
    """One configured input as ``GET /api/v1/live`` reports it."""

    input: str
    connected: bool
    since: float | None  # Unix time the publisher connected (None while not connected)
    protocol: Protocol_ | None
    remote: str | None  # the publisher's address, without its port
    codecs: tuple[str, ...]  # RFC 6381, one per track
    bitrate_bps: int  # over the last RATE_WINDOW_S seconds
    viewers: int
    latency_s: float | None
    last_recording: str | None  # media id of the input's last recording
    record: bool


def track_codec(track: LiveTrack) -> str:
    """The RFC 6381 string of a live track (``avc1.PPCCLL``, ``mp4a.40.N``, ``Opus``)."""
    if track.codec == "h264":
        return avc_codec(track.config)
    if track.codec == "aac":
        aot = track.config[0] >> 3 if track.config else 2
        return aac_codec(_AAC_OBJECT.get(aot, "LC"))
    return "Opus"


def address_of(remote: str) -> str:
    """``remote`` without its port: ``[::1]:5000`` -> ``::1``, ``1.2.3.4:5000`` -> ``1.2.3.4``."""
    if remote.startswith("["):
        return remote[1:].partition("]")[0]
    host, sep, port = remote.rpartition(":")
    if sep and host and ":" not in host and port.isdigit():
        return host
    return remote


def outcome_of(reason: str) -> str:
    """The bounded metric label of an end reason."""
    if reason == "unpublished":
        return "unpublished"
    if reason == STOP_REASON:
        return "stopped"
    return "vanished"


class LiveMetrics:
    """Prometheus metrics of live inputs (inputs are configured, so labels are bounded)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.registry = registry
        self.connected = Gauge(
            "peerd_live_inputs_connected", "Live inputs with a publisher now", registry=registry
        )
        self.publications = Counter(
            "peerd_live_publications",
            "Live publications ended, by protocol and outcome (unpublished, vanished, stopped)",
            ["protocol", "outcome"],
            registry=registry,
        )
        self.ingest_bytes = Counter(
            "peerd_live_ingest_bytes",
            "Media bytes received from publishers, by input",
            ["input"],
            registry=registry,
        )
        self.refusals = Counter(
            "peerd_live_refusals",
            "Publishers refused, by reason (key, unknown_input, busy, stopping)",
            ["reason"],
            registry=registry,
        )


@dataclass
class _Live:
    """One accepted publication: the tee over the consumers' sinks and its figures."""

    service: LiveService
    input: str
    protocol: Protocol_
    remote: str
    since: float  # Unix time
    opened: float  # on the service's clock
    last_frame: float
    sinks: list[tuple[str, LiveSink]]
    tracks: tuple[LiveTrack, ...] = ()
    bytes: int = 0
    window: deque[tuple[float, int]] = field(default_factory=deque)
    ended: str | None = None

    def __post_init__(self) -> None:
        self.counted = self.service.metrics.ingest_bytes.labels(input=self.input)

    def _each(self, what: str, call: Callable[[LiveSink], None]) -> None:
        for entry in list(self.sinks):
            name, sink = entry
            try:
                call(sink)
            except Exception:
                log.exception(
                    "live consumer failed; dropped from this publication",
                    extra={"input": self.input, "consumer": name, "call": what},
                )
                self.sinks.remove(entry)

    def begin(self, tracks: Sequence[LiveTrack]) -> None:
        """Forward the tracks to every consumer."""
        if self.ended is not None:
            return
        self.tracks = tuple(tracks)
        self.last_frame = self.service.clock()
        self._each("begin", lambda s: s.begin(tracks))

    def frame(self, frame: LiveFrame) -> None:
        """Count the frame and forward it to every consumer."""
        if self.ended is not None:
            return
        now = self.service.clock()
        self.last_frame = now
        size = len(frame.data)
        self.bytes += size
        self.window.append((now, size))
        self._prune(now)
        self.counted.inc(size)
        self._each("frame", lambda s: s.frame(frame))

    def end(self, reason: str) -> None:
        """End the publication once (later calls are ignored), for every consumer."""
        if self.ended is not None:
            return
        self.ended = reason
        self._each("end", lambda s: s.end(reason))
        self.service._ended(self)

    def _prune(self, now: float) -> None:
        while self.window and self.window[0][0] < now - RATE_WINDOW_S:
            self.window.popleft()

    def bitrate(self, now: float) -> int:
        """Bits per second over the last RATE_WINDOW_S seconds."""
        self._prune(now)
        span = min(RATE_WINDOW_S, max(now - self.opened, 1e-3))
        return int(sum(n for _, n in self.window) * 8 / span)


class LiveService:
    """The node's live inputs (see the module doc); a daemon service for its idle timer."""

    name = "live"

    def __init__(
        self,
        settings: LiveSettings,
        *,
        secret: Callable[[str], str | None],
        consumers: Sequence[LiveConsumer] = (),
        recorder: Recorder | None = None,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self._secret = secret
        self.recorder = recorder
        self.consumers: list[LiveConsumer] = list(consumers)
        if recorder is not None:
            self.consumers.append(recorder)
            recorder.on_recorded.append(self._recorded)
        self.clock = clock
        self.wall = wall
        self.metrics = LiveMetrics(registry)
        self.metrics.connected.set_function(lambda: len(self._live))
        self._inputs = {i.name: i for i in settings.inputs}
        self._keys: dict[str, str] = {}
        self._live: dict[str, _Live] = {}
        self._viewers: list[ViewerCounter] = []
        self._latencies: list[LatencyHook] = []
        self._listeners: list[Callable[[], None]] = []
        self.stopping = False

    # -- wiring ------------------------------------------------------------------------------

    def add_viewer_counter(self, counter: ViewerCounter) -> None:
        """Count ``counter(input)`` into every input's viewers (LL-HLS, WHEP)."""
        self._viewers.append(counter)

    def add_latency(self, hook: LatencyHook) -> None:
        """Report ``hook(input)`` as the input's latency (the lowest of the hooks that know)."""
        self._latencies.append(hook)

    def add_listener(self, listener: Callable[[], None]) -> None:
        """Call ``listener()`` when an input connects or drops, or a recording is published
        (the coordinator's early heartbeat)."""
        self._listeners.append(listener)

    def load_keys(self) -> None:
        """Read every input's key from its secret file (blocking: run it in a thread)."""
        keys = {}
        for name, cfg in self._inputs.items():
            key = self._secret(cfg.secret_name)
            if key is None:
                log.error(
                    "live input has no stream key: every publisher is refused until the secret "
                    "file exists (secrets directory or systemd credentials)",
                    extra={"input": name, "key_file": cfg.secret_name},
                )
                continue
            keys[name] = key
        self._keys = keys

    # -- LiveInputs ----------------------------------------------------------------------------

    def open(self, key: str, *, input: str | None, protocol: Protocol_, remote: str) -> Publication:
        """Accept a publisher (see :class:`~peerd.core.live.LiveInputs`)."""
        # Every input's key is compared, whatever the outcome, so timing says nothing.
        found = match_key(key, [(n, self._keys.get(n, "")) for n in self._inputs])
        where = address_of(remote)
        if self.stopping or not self.settings.enabled:
            self._refuse("stopping", input, protocol, where)
            raise Unavailable("the node is stopping" if self.stopping else "[live] is off")
        if input is not None and input not in self._inputs:
            self._refuse("unknown_input", input, protocol, where)
            raise NotFound(f"no live input {input!r}")
        if found is None or (input is not None and found != input):
            self._refuse("key", input, protocol, where)
            raise Unauthorized("wrong stream key")
        if found in self._live:
            self._refuse("busy", found, protocol, where)
            raise Conflict(f"live input {found!r} already has a publisher")
        sinks: list[tuple[str, LiveSink]] = []
        for consumer in self.consumers:
            cname = type(consumer).__name__
            try:
                sinks.append((cname, consumer.publication(found)))
            except Exception:
                log.exception(
                    "live consumer refused a publication; it goes on without it",
                    extra={"input": found, "consumer": cname},
                )
        now = self.clock()
        live = _Live(self, found, protocol, where, self.wall(), now, now, sinks)
        self._live[found] = live
        log.info(
            "live input connected",
            extra={"input": found, "protocol": protocol, "remote": where},
        )
        self._notify()
        return Publication(found, protocol, live)

    def _refuse(self, reason: str, input: str | None, protocol: str, where: str) -> None:
        self.metrics.refusals.labels(reason=reason).inc()
        log.warning(
            "live publisher refused",
            extra={"reason": reason, "input": input, "protocol": protocol, "remote": where},
        )

    def _ended(self, live: _Live) -> None:
        if self._live.get(live.input) is live:
            del self._live[live.input]
        reason = live.ended or ""
        self.metrics.publications.labels(protocol=live.protocol, outcome=outcome_of(reason)).inc()
        log.info(
            "live input dropped",
            extra={
                "input": live.input,
                "protocol": live.protocol,
                "reason": reason,
                "seconds": round(self.wall() - live.since, 3),
                "bytes": live.bytes,
            },
        )
        self._notify()

    def _recorded(self, input: str, media_id: str) -> None:
        self._notify()

    def _notify(self) -> None:
        for listener in self._listeners:
            try:
                listener()
            except Exception:
                log.exception("live listener failed")

    # -- timers ----------------------------------------------------------------------------

    def check_idle(self, now: float | None = None) -> list[str]:
        """End publications with no frame for ``idle_timeout_s``; the inputs ended."""
        now = self.clock() if now is None else now
        idle = [
            live
            for live in self._live.values()
            if now - live.last_frame >= self.settings.idle_timeout_s
        ]
        for live in idle:
            live.end(IDLE_REASON)
        return [live.input for live in idle]

    # -- status ----------------------------------------------------------------------------

    def _viewers_of(self, input: str) -> int:
        total = 0
        for counter in self._viewers:
            try:
                total += max(0, int(counter(input)))
            except Exception:
                log.exception("live viewer counter failed", extra={"input": input})
        return total

    def _latency_of(self, input: str) -> float | None:
        known = []
        for hook in self._latencies:
            try:
                seconds = hook(input)
            except Exception:
                log.exception("live latency hook failed", extra={"input": input})
                continue
            if seconds is not None:
                known.append(seconds)
        return round(min(known), 3) if known else None

    def status(self) -> list[InputStatus]:
        """Every configured input, in configuration order."""
        now = self.clock()
        out = []
        for name, cfg in self._inputs.items():
            live = self._live.get(name)
            last = self.recorder.last(name) if self.recorder is not None else None
            out.append(
                InputStatus(
                    input=name,
                    connected=live is not None,
                    since=live.since if live is not None else None,
                    protocol=live.protocol if live is not None else None,
                    remote=live.remote if live is not None else None,
                    codecs=tuple(track_codec(t) for t in live.tracks) if live else (),
                    bitrate_bps=live.bitrate(now) if live is not None else 0,
                    viewers=self._viewers_of(name),
                    latency_s=self._latency_of(name) if live is not None else None,
                    last_recording=last,
                    record=cfg.record,
                )
            )
        return out

    # -- service ---------------------------------------------------------------------------

    async def run(self, ready: Callable[[], None]) -> None:
        """Read the keys, ingest recordings a crash left behind, end idle publications."""
        await asyncio.to_thread(self.load_keys)
        ready()
        if self.recorder is not None:
            await self.recorder.recover()
        for consumer in self.consumers:
            if isinstance(consumer, RecoveringConsumer) and consumer is not self.recorder:
                await consumer.recover()
        step = min(1.0, self.settings.idle_timeout_s / 4)
        while True:
            await asyncio.sleep(step)
            self.check_idle()

    async def drain(self) -> None:
        """Refuse new publishers and end every publication ("node stopping"); recordings are
        sealed and ingested at the next start; consumers that drain tell their viewers."""
        self.stopping = True
        if self.recorder is not None:
            self.recorder.stopping = True
        for live in list(self._live.values()):
            live.end(STOP_REASON)
        if self.recorder is not None:
            await self.recorder.flush()  # first: the recordings matter more than a clean end
        await asyncio.gather(
            *(c.drain() for c in self.consumers if isinstance(c, DrainingConsumer))
        )
