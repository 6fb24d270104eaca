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

Beside the tracker (same prefix, so the tunnel publishes them with it):

* ``GET /swarm/player/<media id>?token=`` -- the node's player page: hls.js with P2P Media Loader
  (``swarmId`` = the media id, this tracker with the viewer's token, the node's ICE servers),
  which checks every segment a peer sends against the content id in its URL before hls.js gets
  it (``swarm_player.js``);
* ``GET /swarm/lib/<file>`` -- that module and the pinned npm bundles ``make web-deps``
  installed (``[swarm] web_dir``), for this page or any site's player (CORS ``*``);
* ``POST /swarm/<media id>/report?token=`` -- a player's beacon ``{"peer": n, "http": n}``
  (segment bytes since its last one): the token must be the media's viewer token, one beacon
  per half ``report_interval_s`` per viewer (token and address; else 429), each value at most
  :data:`MAX_REPORT_BYTES`; counted in ``peerd_swarm_viewer_bytes_total{source}``. Optional
  playback fields (README "Playback analytics"): ``sid`` (the player's session), ``codec``,
  ``startup_ms`` (null until it played), ``stalls`` (so far) and ``failed`` (gave up before
  playing), handed to playback analytics under the path ``swarm``.

``[swarm] disabled_media`` turns the swarm off for single media: their tracker upgrade is a 403
and their player page fetches over HTTP only.

Offers and answers for other viewers are written by tasks of their own, so a viewer whose
socket does not drain delays nobody else; one still not written after :data:`SEND_TIMEOUT_S`
closes that viewer's socket.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import re
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web
from prometheus_client import Counter, Gauge

from peerd.config import SwarmSettings
from peerd.core import swarm, tokens
from peerd.core.whep import IceServer
from peerd.errors import Forbidden
from peerd.http.access import ACCESS_HEADER, ViewerAuth, request_token, viewer_auth
from peerd.http.clientip import client_ip
from peerd.http.playback import PlaybackAnalytics
from peerd.runtime import Runtime

log = logging.getLogger("peerd.http.swarm")

LOG_INTERVAL_S = 60.0
SEND_TIMEOUT_S = 10.0
SCOPE = "hls"
# A beacon's value past this is a lie or a bug (a player reports every few seconds).
MAX_REPORT_BYTES = 1 << 30
MAX_REPORT_BODY = 512
# The files /swarm/lib/ serves: ours from the package, the rest from `make web-deps`.
PLAYER_MODULE = "swarm_player.js"
WEB_FILES = {
    "hls.min.js": "hls.js/dist/hls.min.js",
    "p2p-media-loader-core.es.min.js": "p2p-media-loader-core/dist/p2p-media-loader-core.es.min.js",
    "p2p-media-loader-hlsjs.es.min.js": (
        "p2p-media-loader-hlsjs/dist/p2p-media-loader-hlsjs.es.min.js"
    ),
}
IceSource = Callable[[], Awaitable[tuple[IceServer, ...]]]


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
        self.viewer_bytes = rt.metrics.swarm_viewer_bytes
        self.reports = Counter(
            "peerd_swarm_reports",
            "Player byte beacons, by result (ok, rate: too soon after the last, bad: malformed)",
            ["result"],
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
        ice: IceSource | None = None,
        analytics: PlaybackAnalytics | None = None,
    ) -> None:
        self.cfg = rt.settings.swarm
        self.auth = auth
        self.clock = clock
        self.ice = ice
        self.analytics = analytics  # playback fields of beacons; None: ignored
        self.web_dir = Path(self.cfg.web_dir or Path(sys.prefix) / "web") / "node_modules"
        self.disabled = frozenset(self.cfg.disabled_media)
        self._reported: dict[str, float] = {}  # viewer -> monotonic time of its last beacon
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
        if media in self.disabled:
            self.metrics.rejects.labels(reason="disabled").inc()
            raise web.HTTPForbidden(text="the viewer swarm is off for this media\n")
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

    async def player(self, request: web.Request) -> web.Response:
        """The node's player page for one media (the viewer's token checked first)."""
        media = request.match_info["media"]
        token = await self.auth.check(request, media, SCOPE)
        servers = await self.ice() if self.ice is not None else ()
        config = {
            "media": media,
            "token": token,
            "p2p": media not in self.disabled,
            "iceServers": [s.to_json() for s in servers],
            "relayOnly": self.cfg.relay_only,
            "reportIntervalS": self.cfg.report_interval_s,
        }
        # JSON inside a <script> element: escape "<" so no value can close the element.
        page = _PLAYER.replace("{{CONFIG}}", json.dumps(config).replace("<", "\\u003c"))
        return web.Response(
            text=page,
            content_type="text/html",
            headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
        )

    async def lib(self, request: web.Request) -> web.StreamResponse:
        """A script of the player: ours, or one of the pinned npm bundles."""
        name = request.match_info["name"]
        headers = {
            "Access-Control-Allow-Origin": "*",
            "Cache-Control": "public, max-age=3600",
            "Content-Type": "text/javascript; charset=utf-8",
        }
        if name == PLAYER_MODULE:
            return web.Response(body=_MODULE, headers=headers)
        rel = WEB_FILES.get(name)
        if rel is None:
            raise web.HTTPNotFound()
        path = self.web_dir / rel
        if not path.is_file():
            log.warning("swarm player bundle missing: run `make web-deps`", extra={"path": path})
            raise web.HTTPNotFound(text="not installed on this node (make web-deps)\n")
        return web.FileResponse(path, headers=headers)

    async def report(self, request: web.Request) -> web.Response:
        """A player's beacon: segment bytes from peers and over HTTP since its last one."""
        media = request.match_info["media"]
        token = await self.auth.check(request, media, SCOPE)
        cors = {"Access-Control-Allow-Origin": "*"}
        # One token may be shared by a site's viewers: a viewer is a token at an address.
        viewer = f"{token or ''} {client_ip(request, self.auth.trusted)}"
        now = time.monotonic()
        if now - self._reported.get(viewer, -math.inf) < self.cfg.report_interval_s / 2:
            self.metrics.reports.labels(result="rate").inc()
            return web.Response(status=429, headers=cors)
        body = await request.content.read(MAX_REPORT_BODY + 1)
        values, playback = _report_values(body)
        if values is None:
            self.metrics.reports.labels(result="bad").inc()
            return web.Response(status=400, headers=cors)
        if len(self._reported) > 100_000:  # forget viewers silent for two intervals
            horizon = now - 2 * self.cfg.report_interval_s
            self._reported = {v: t for v, t in self._reported.items() if t > horizon}
        self._reported[viewer] = now
        for source, n in values.items():
            self.metrics.viewer_bytes.labels(source=source).inc(n)
        self.metrics.reports.labels(result="ok").inc()
        if playback is not None and self.analytics is not None:
            self.analytics.swarm(
                playback.sid,
                media,
                playback.codec,
                peer=request.remote or "",
                headers=request.headers,
                startup_s=None if playback.startup_ms is None else playback.startup_ms / 1000,
                stalls=playback.stalls,
                failed=playback.failed,
            )
        return web.Response(status=204, headers=cors)

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


@dataclass(frozen=True)
class Playback:
    """A beacon's playback fields (what the player measured itself)."""

    sid: str
    codec: str
    startup_ms: int | None
    stalls: int
    failed: bool


_PLAYBACK = {"sid", "codec", "startup_ms", "stalls", "failed"}
_TEXT = re.compile(r"[A-Za-z0-9._,-]{0,64}")


def _report_values(body: bytes) -> tuple[dict[str, int] | None, Playback | None]:
    """``{"peer": n, "http": n}`` of a beacon and its playback fields (None: it has none);
    ``(None, None)`` if it is not a beacon (or out of bounds)."""
    if len(body) > MAX_REPORT_BODY:
        return None, None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None, None
    keys = set(doc) if isinstance(doc, dict) else set()
    if not {"peer", "http"} <= keys <= {"peer", "http"} | _PLAYBACK:
        return None, None
    out: dict[str, int] = {}
    for k in ("peer", "http"):
        v = doc[k]
        if type(v) is not int or not 0 <= v <= MAX_REPORT_BYTES:
            return None, None
        out[k] = v
    if keys == {"peer", "http"}:
        return out, None
    sid, codec = doc.get("sid"), doc.get("codec", "")
    startup, stalls, failed = doc.get("startup_ms"), doc.get("stalls", 0), doc.get("failed", False)
    if not (
        isinstance(sid, str)
        and sid
        and _TEXT.fullmatch(sid)
        and isinstance(codec, str)
        and _TEXT.fullmatch(codec)
        and (startup is None or (type(startup) is int and 0 <= startup <= 3_600_000))
        and type(stalls) is int
        and 0 <= stalls <= 100_000
        and type(failed) is bool
    ):
        return None, None
    return out, Playback(sid, codec, startup, stalls, failed)


_PLAYER = resources.files("peerd.http").joinpath("swarm_player.html").read_text(encoding="utf-8")
_MODULE = resources.files("peerd.http").joinpath(PLAYER_MODULE).read_bytes()

SWARM_KEY = web.AppKey("swarm", SwarmRoutes)


def install(
    app: web.Application,
    rt: Runtime,
    ice: IceSource | None = None,
    analytics: PlaybackAnalytics | None = None,
) -> None:
    """Add ``/swarm/<media id>`` (the viewer swarm's tracker), the player page, its scripts and
    the byte beacon when ``[swarm] enabled``; ``ice`` gives the ICE servers players get, and
    ``analytics`` the beacons' playback fields."""
    if not rt.settings.swarm.enabled:
        return
    routes = app[SWARM_KEY] = SwarmRoutes(rt, viewer_auth(app, rt), ice=ice, analytics=analytics)
    app.router.add_get(r"/swarm/{media:b[a-z2-7]{58}}", routes.handle)
    app.router.add_get(r"/swarm/player/{media:b[a-z2-7]{58}}", routes.player)
    app.router.add_get(r"/swarm/lib/{name:[a-z0-9][a-z0-9._-]{0,63}}", routes.lib)
    app.router.add_post(r"/swarm/{media:b[a-z2-7]{58}}/report", routes.report)
    app.on_startup.append(routes.start)
    app.on_shutdown.append(routes.stop)
