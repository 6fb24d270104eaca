"""RTMP and RTMPS ingest: the asyncio edge of :mod:`peerd.core.rtmp`.

:class:`RtmpService` listens on ``[live] rtmp_listen`` and, when set, ``rtmps_listen`` (TLS with
``rtmps_cert``/``rtmps_key``). Each connection runs one :class:`~peerd.core.rtmp.RtmpConnection`:
bytes read go in, bytes it wants sent go out, and its events drive the live service
(:class:`~peerd.core.live.LiveInputs`): ``publish(key)`` opens a publication (a wrong key, an
unknown input or an input that already has a publisher is refused with an ``onStatus`` error the
publisher shows, then the connection closes), the tracks and frames go to the publication's sink,
and the publication ends with ``"unpublished"`` when the publisher says so or ``"vanished:
<cause>"`` when the socket closes, fails, breaks the protocol or sends nothing for ``[live]
idle_timeout_s``.

Guards: a connection must ask to publish within :data:`HANDSHAKE_TIMEOUT_S`; at most
``max_connections`` are open; the state machine bounds every buffer (message size, chunk
streams, AMF depth) and the sink never blocks, so reading one socket at a time is the only
backpressure needed. Refusals count in ``peerd_live_rtmp_refusals_total{reason}`` and are logged
at most once a minute per reason; stream keys are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge

from peerd import errors
from peerd.config import LiveSettings
from peerd.core import rtmp
from peerd.core.live import LiveInputs, LiveSink

log = logging.getLogger("peerd.live.rtmp")

HANDSHAKE_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64
READ_SIZE = 65536
LOG_EVERY_S = 60.0

Scheme = Literal["rtmp", "rtmps"]
# The refusal reasons, a fixed set (metric label values).
REASONS = (
    "bad_key",
    "unknown_input",
    "busy",
    "unavailable",
    "protocol",
    "unsupported",
    "limit",
    "capacity",
    "handshake_timeout",
)


@dataclass
class _Throttle:
    """At most one log line per reason per ``every_s``; the rest are counted into the next."""

    every_s: float = LOG_EVERY_S
    last: dict[str, float] = field(default_factory=dict)
    quiet: dict[str, int] = field(default_factory=dict)

    def allow(self, reason: str) -> int | None:
        """The number of suppressed lines since the last one, or None to stay quiet now."""
        now = time.monotonic()
        if now - self.last.get(reason, -self.every_s) < self.every_s:
            self.quiet[reason] = self.quiet.get(reason, 0) + 1
            return None
        self.last[reason] = now
        return self.quiet.pop(reason, 0)


class RtmpService:
    """The RTMP/RTMPS listeners (a daemon service: ``run`` until cancelled)."""

    name = "rtmp"

    def __init__(
        self,
        settings: LiveSettings,
        inputs: LiveInputs,
        *,
        registry: CollectorRegistry | None = None,
        max_connections: int = MAX_CONNECTIONS,
        handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S,
        addr_dir: Path | None = None,
    ) -> None:
        """``inputs`` decides who may publish; metrics go to ``registry``; each bound address
        is written to ``<addr_dir>/<scheme>.addr`` (as ``http.addr``: port 0 picks one)."""
        self.settings = settings
        self.addr_dir = addr_dir
        self.inputs = inputs
        self.max_connections = max_connections
        self.handshake_timeout_s = handshake_timeout_s
        self.addresses: dict[Scheme, tuple[str, int]] = {}
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._throttle = _Throttle()
        reg = registry or CollectorRegistry()
        self.m_connections = Gauge(
            "peerd_live_rtmp_connections",
            "Open RTMP/RTMPS connections, by scheme",
            ["scheme"],
            registry=reg,
        )
        self.m_refusals = Counter(
            "peerd_live_rtmp_refusals",
            "RTMP/RTMPS connections refused or closed for a fault, by reason (bad_key, "
            "unknown_input, busy, unavailable, protocol, unsupported, limit, capacity, "
            "handshake_timeout)",
            ["reason"],
            registry=reg,
        )

    async def run(self, ready: Callable[[], None]) -> None:
        """Listen on the configured addresses, serve publishers until cancelled."""
        s = self.settings
        # No input, nothing to publish to: no port is opened.
        on = s.enabled and bool(s.inputs)
        try:
            if on and s.rtmp_listen:
                await self._listen("rtmp", s.rtmp_listen, None)
            if on and s.rtmps_listen:
                await self._listen("rtmps", s.rtmps_listen, await self._tls())
            ready()
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self._stop())

    async def drain(self) -> None:
        """Stop accepting publishers (the connected ones go on until the service stops)."""
        for server in self._servers:
            server.close()

    async def _tls(self) -> ssl.SSLContext:
        s = self.settings
        if s.rtmps_cert is None or s.rtmps_key is None:
            raise errors.ConfigError("[live] rtmps_listen needs rtmps_cert and rtmps_key")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert: Path = s.rtmps_cert
        key: Path = s.rtmps_key
        try:
            await asyncio.to_thread(ctx.load_cert_chain, cert, key)
        except (OSError, ssl.SSLError) as e:
            raise errors.ConfigError(f"[live] rtmps_cert/rtmps_key unusable: {e}") from e
        return ctx

    async def _listen(self, scheme: Scheme, address: str, tls: ssl.SSLContext | None) -> None:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        try:
            server = await asyncio.start_server(
                lambda r, w: self._accept(scheme, r, w),
                host,
                int(port),
                ssl=tls,
                ssl_handshake_timeout=self.handshake_timeout_s if tls is not None else None,
                limit=READ_SIZE,
            )
        except (OSError, ValueError) as e:
            raise errors.ConfigError(f"[live] {scheme}_listen {address!r}: {e}") from e
        self._servers.append(server)
        bound = server.sockets[0].getsockname()
        self.addresses[scheme] = (str(bound[0]), int(bound[1]))
        if self.addr_dir is not None:
            path = self.addr_dir / f"{scheme}.addr"
            await asyncio.to_thread(path.write_text, f"{bound[0]}:{bound[1]}\n")
        log.info("%s listening", scheme, extra={"host": bound[0], "port": bound[1]})

    async def _stop(self) -> None:
        await self.drain()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks))
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()

    def _accept(
        self, scheme: Scheme, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        if len(self._tasks) >= self.max_connections:
            self.refused("capacity", f"more than {self.max_connections} connections")
            writer.close()
            return
        task = asyncio.get_running_loop().create_task(self._serve(scheme, reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def refused(self, reason: str, detail: str, remote: str = "") -> None:
        """Count a refusal and log it (at most once a minute per reason)."""
        self.m_refusals.labels(reason=reason).inc()
        quiet = self._throttle.allow(reason)
        if quiet is not None:
            log.warning(
                "rtmp publisher refused: %s",
                detail,
                extra={"reason": reason, "remote": remote, "suppressed": quiet},
            )

    async def _serve(
        self, scheme: Scheme, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = writer.get_extra_info("peername")
        host = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        remote = f"{host}:{peer[1]}" if isinstance(peer, tuple) else host
        gauge = self.m_connections.labels(scheme=scheme)
        gauge.inc()
        session = _Session(self, scheme, host, remote)
        try:
            await session.serve(reader, writer)
        except Exception:  # one publisher's fault never reaches the listener
            log.exception("rtmp connection failed", extra={"remote": host})
            session.end("vanished: internal error")
        finally:
            session.end(f"vanished: {session.cause}")
            gauge.dec()
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5.0)


class _Session:
    """One connection: the state machine between a socket and a publication's sink."""

    def __init__(self, service: RtmpService, scheme: Scheme, host: str, remote: str) -> None:
        self.service = service
        self.scheme: Scheme = scheme
        self.host = host
        self.remote = remote
        self.conn = rtmp.RtmpConnection(nonce=os.urandom(rtmp.HANDSHAKE_SIZE))
        self.sink: LiveSink | None = None
        self.input = ""
        self.asked = False  # a publish was asked for: the handshake deadline no longer applies
        self.cause = "node stopping"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Read, feed, write until the peer or the state machine ends the connection."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.service.handshake_timeout_s
        idle = self.service.settings.idle_timeout_s
        while True:
            timeout = idle if self.asked else max(0.0, deadline - loop.time())
            try:
                data = await asyncio.wait_for(reader.read(READ_SIZE), timeout)
            except TimeoutError:
                if not self.asked:
                    self.service.refused(
                        "handshake_timeout", "no publish request in time", self.host
                    )
                    self.cause = "no publish request in time"
                else:
                    self.cause = f"nothing received for {idle:g} s"
                return
            except (OSError, ssl.SSLError) as e:
                self.cause = f"connection error ({type(e).__name__})"
                return
            if not data:
                self.cause = "connection closed by the publisher"
                return
            for event in self.conn.receive(data):
                self.handle(event)
            out = self.conn.data_to_send()
            if out:
                writer.write(out)
                try:
                    await asyncio.wait_for(writer.drain(), idle)
                except (OSError, ssl.SSLError, TimeoutError) as e:
                    self.cause = f"connection error ({type(e).__name__})"
                    return
            if self.conn.closed:
                return

    def handle(self, event: rtmp.Event) -> None:
        """Act on one event of the state machine."""
        if isinstance(event, rtmp.Frame):
            if self.sink is not None:
                self.sink.frame(event.frame)
        elif isinstance(event, rtmp.TracksReady):
            if self.sink is not None:
                self.sink.begin(event.tracks)
        elif isinstance(event, rtmp.PublishRequested):
            self.asked = True
            self.publish(event.key)
        elif isinstance(event, rtmp.Unpublished):
            self.end("unpublished")
        elif isinstance(event, rtmp.Failed):
            self.service.refused(event.kind, event.reason, self.host)
            self.cause = f"{event.kind}: {event.reason}"

    def publish(self, key: str) -> None:
        """Ask the live service for a publication with ``key``; accept or refuse the publisher."""
        try:
            pub = self.service.inputs.open(
                key, input=None, protocol=self.scheme, remote=self.remote
            )
        except errors.Unauthorized:
            self.refuse("bad_key", "NetStream.Publish.BadName", "stream key refused")
        except errors.NotFound:
            self.refuse("unknown_input", "NetStream.Publish.BadName", "no such live input")
        except errors.Conflict:
            self.refuse(
                "busy", "NetStream.Publish.BadName", "this live input already has a publisher"
            )
        except errors.PeerdError as e:
            self.refuse("unavailable", "NetStream.Publish.Failed", f"live input unavailable: {e}")
        else:
            self.sink = pub.sink
            self.input = pub.input
            self.conn.accept()
            log.info(
                "rtmp publisher accepted",
                extra={"input": pub.input, "scheme": self.scheme, "remote": self.host},
            )

    def refuse(self, reason: str, code: str, description: str) -> None:
        """Answer the publish with an error status (the connection then closes)."""
        self.service.refused(reason, description, self.host)
        self.cause = f"refused: {description}"
        self.conn.reject(code, description)

    def end(self, reason: str) -> None:
        """End the publication, if one is open (once)."""
        sink, self.sink = self.sink, None
        if sink is not None:
            log.info(
                "rtmp publication ended",
                extra={"input": self.input, "reason": reason, "remote": self.host},
            )
            sink.end(reason)
