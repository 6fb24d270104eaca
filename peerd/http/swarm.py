"""The viewer swarm's tracker on the node's HTTP server: a WebSocket speaking the WebTorrent
tracker protocol (the bookkeeping is :mod:`peerd.core.swarm`; this module moves its frames).

URL: ``/swarm/<media id>?token=<viewer token>`` (``ws://`` or ``wss://`` on the same host and
port as HLS, so it passes through the Cloudflare Tunnel with the playlists). The token is the
media's HLS viewer token (scope ``hls``, :mod:`peerd.core.tokens`), or in ``[http] auth =
"access"`` mode the Access JWT of the upgrade request: it is checked at the upgrade by the one
viewer authorization (:class:`peerd.http.access.ViewerAuth`; a refusal is the bare 403 before
any WebSocket exists) and its expiry again on every message (past it the socket is closed,
code 1008 ``token expired``). P2P Media Loader carries it as it is given: its
``announceTrackers`` setting takes the URL with the query.

A rule broken by a frame closes the socket with a WebSocket close code and a reason a person can
read (1008 policy: not a tracker message, over the rate, token expired; 1009: over
``[swarm] max_message_bytes``; 1001: idle); each is counted in
``peerd_swarm_rejects_total{reason}`` and logged once per reason per :data:`LOG_INTERVAL_S`
(with the count of the ones not logged; never the token or the message).

Offers and answers for other viewers are written by tasks of their own, so a viewer whose
socket does not drain delays nobody else; one still not written after :data:`SEND_TIMEOUT_S`
closes that viewer's socket.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable, Coroutine
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from prometheus_client import Counter, Gauge

from peerd.config import SwarmSettings
from peerd.core import swarm, tokens
from peerd.errors import Forbidden
from peerd.http.access import ACCESS_HEADER, ViewerAuth, request_token, viewer_auth
from peerd.http.clientip import client_ip
from peerd.runtime import Runtime

log = logging.getLogger("peerd.http.swarm")

LOG_INTERVAL_S = 60.0
SEND_TIMEOUT_S = 10.0
SCOPE = "hls"


def limits(cfg: SwarmSettings) -> swarm.Limits:
    """The tracker's limits from ``[swarm]``."""
    return swarm.Limits(
        max_peers_per_swarm=cfg.max_peers_per_swarm,
        max_swarms_per_connection=cfg.max_swarms_per_connection,
        messages_per_s=cfg.messages_per_s,
        max_message_bytes=cfg.max_message_bytes,
        idle_s=cfg.idle_s,
        interval_s=cfg.announce_interval_s,
    )


class SwarmMetrics:
    """Swarms, peers and sockets now; messages relayed; rejects by reason."""

    def __init__(self, rt: Runtime, tracker: swarm.Tracker) -> None:
        reg = rt.metrics.registry
        Gauge("peerd_swarm_swarms", "Viewer swarms (media, stream)", registry=reg).set_function(
            lambda: len(tracker.swarms)
        )
        Gauge(
            "peerd_swarm_peers",
            "Viewer swarm memberships (a viewer in two streams' swarms counts twice)",
            registry=reg,
        ).set_function(lambda: tracker.peers)
        Gauge("peerd_swarm_connections", "Open tracker WebSockets", registry=reg).set_function(
            lambda: len(tracker.conns)
        )
        self.relayed = Counter(
            "peerd_swarm_relayed",
            "WebRTC offers and answers relayed between viewers, by kind",
            ["kind"],
            registry=reg,
        )
        self.received = Counter("peerd_swarm_messages", "Tracker messages received", registry=reg)
        self.rejects = Counter(
            "peerd_swarm_rejects",
            "Tracker requests refused or sockets closed for a rule, by reason",
            ["reason"],
            registry=reg,
        )


class RejectLog:
    """One log line per reason per interval, with how many were not logged in between."""

    def __init__(self, interval_s: float = LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._at: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def note(self, reason: str, detail: str, media: str, client: str) -> None:
        """Log the reject unless one with the same reason was logged within the interval."""
        now = time.monotonic()
        if now - self._at.get(reason, -math.inf) < self.interval_s:
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            return
        self._at[reason] = now
        log.info(
            "swarm reject",
            extra={
                "reason": reason,
                "detail": detail,
                "media": media,
                "client": client,
                "suppressed": self._unlogged.pop(reason, 0),
            },
        )


class SwarmRoutes:
    """The tracker endpoint: sockets by connection number, one :class:`swarm.Tracker`."""

    def __init__(
        self,
        rt: Runtime,
        auth: ViewerAuth,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cfg = rt.settings.swarm
        self.auth = auth
        self.clock = clock
        self.tracker = swarm.Tracker(limits(self.cfg))
        self.metrics = SwarmMetrics(rt, self.tracker)
        self.rejects = RejectLog()
        self.sockets: dict[int, web.WebSocketResponse] = {}
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Task[None] | None = None

    def _reject(self, why: swarm.Reject, detail: str, media: str, request: web.Request) -> None:
        self.metrics.rejects.labels(reason=why.value).inc()
        self.rejects.note(why.value, detail, media, client_ip(request, self.auth.trusted))

    def _expiry(self, request: web.Request, media: str) -> float:
        """Until when the upgrade's credential lets the viewer in (it passed the check)."""
        if self.auth.mode == "access":
            assert self.auth.verifier is not None
            ident = self.auth.verifier.cached(request.headers.get(ACCESS_HEADER) or "")
            return ident.expires if ident is not None else 0.0
        assert self.auth.key is not None
        check = tokens.verify(self.auth.key, request_token(request), media, SCOPE, self.clock())
        return float(check.expires or 0)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Upgrade to a tracker WebSocket after the viewer check; serve it until it ends."""
        media = request.match_info["media"]
        try:
            await self.auth.check(request, media, SCOPE)
        except Forbidden:
            self.metrics.rejects.labels(reason="token").inc()
            raise
        expires = self._expiry(request, media)
        ws = web.WebSocketResponse(
            max_msg_size=self.cfg.max_message_bytes, compress=False, autoping=True
        )
        await ws.prepare(request)
        conn = next(self._ids)
        self.sockets[conn] = ws
        self.tracker.open(conn, media, expires, self.clock())
        try:
            async for msg in ws:
                if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                    self.metrics.received.inc()
                    if not await self._act(
                        self.tracker.receive(conn, msg.data, self.clock()), conn, media, request
                    ):
                        break
                elif msg.type == WSMsgType.ERROR:
                    # aiohttp closed the socket itself: a frame over max_msg_size (1009) or
                    # one it could not parse (1002).
                    big = getattr(msg.data, "code", None) == WSCloseCode.MESSAGE_TOO_BIG
                    why = swarm.Reject.OVERSIZED if big else swarm.Reject.MALFORMED
                    self._reject(why, str(msg.data), media, request)
                    break
        finally:
            self.tracker.close(conn)
            self.sockets.pop(conn, None)
        return ws

    async def _act(
        self, actions: list[swarm.Action], conn: int, media: str, request: web.Request
    ) -> bool:
        """Carry out the tracker's actions; False once this connection is to end."""
        for a in actions:
            if isinstance(a, swarm.Send):
                ws = self.sockets.get(a.conn)
                if ws is None or ws.closed:
                    continue
                if a.relayed is None:
                    await ws.send_str(a.text)
                else:
                    self.metrics.relayed.labels(kind=a.relayed).inc()
                    self._spawn(self._relay(a.conn, ws, a.text))
            elif isinstance(a, swarm.Failure):
                self._reject(a.why, a.why.value, media, request)
            else:
                self._reject(a.why, a.reason, media, request)
                ws = self.sockets.get(a.conn)
                if ws is not None:
                    await ws.close(code=a.code, message=a.reason.encode())
                return False
        return True

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _relay(self, conn: int, ws: web.WebSocketResponse, text: str) -> None:
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await ws.send_str(text)
        except TimeoutError:
            log.info("swarm peer not reading: closed", extra={"conn": conn})
            self.tracker.close(conn)
            await ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=b"not reading")
        except ConnectionError:
            self.tracker.close(conn)

    async def sweep(self) -> None:
        """Close idle sockets and drop stale memberships, every quarter of ``idle_s``."""
        every = min(self.cfg.idle_s / 4, 15.0)
        while True:
            await asyncio.sleep(every)
            for c in self.tracker.expire(self.clock()):
                self.metrics.rejects.labels(reason=c.why.value).inc()
                ws = self.sockets.get(c.conn)
                if ws is not None:
                    self._spawn(self._close(ws, c.code, c.reason))

    @staticmethod
    async def _close(ws: web.WebSocketResponse, code: int, reason: str) -> None:
        await ws.close(code=code, message=reason.encode())

    async def start(self, _app: web.Application) -> None:
        """Start the sweeper (an aiohttp startup callback)."""
        self._sweeper = asyncio.create_task(self.sweep())

    async def stop(self, _app: web.Application) -> None:
        """Stop the sweeper and close every socket (an aiohttp shutdown callback)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        for ws in list(self.sockets.values()):
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"node stopping")


SWARM_KEY = web.AppKey("swarm", SwarmRoutes)


def install(app: web.Application, rt: Runtime) -> None:
    """Add ``/swarm/<media id>`` (the viewer swarm's tracker) when ``[swarm] enabled``."""
    if not rt.settings.swarm.enabled:
        return
    routes = app[SWARM_KEY] = SwarmRoutes(rt, viewer_auth(app, rt))
    app.router.add_get(r"/swarm/{media:b[a-z2-7]{58}}", routes.handle)
    app.on_startup.append(routes.start)
    app.on_shutdown.append(routes.stop)
