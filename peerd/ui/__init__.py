"""The operator dashboard at ``/ui``.

A static page (``static/``: HTML, JS, CSS shipped in the package, no CDN, no build step) fed by
JSON endpoints:

``GET /ui``                     the dashboard, or the login form without a session
``POST /ui/login``              form field ``token`` = the ``admin_token`` secret -> session cookie
``POST /ui/logout``             drops the cookie
``GET /ui/api/summary``         node health, storage and quota, replication queue, peers, bytes
                                served by source (P2P savings), bandwidth samples, the library
``GET /ui/api/media/{id}``      one item's renditions with init and segment blob ids
``GET /ui/api/blob/{cid}``      a blob's bytes, for the in-page player (through the resolver
                                when the daemon has one, so absent blobs are fetched)
``GET /ui/api/playback``        playback analytics of the last 24 hours: by codec, by hour, the
                                swarm's P2P share, recent anomalies (``enabled`` false when off)
``GET /ui/api/whep/{id}``       ``{"player": url}``: the node's WHEP player page for one item,
                                with a short-lived ``whep`` token minted for the operator by
                                the viewer authorization (:mod:`peerd.http.access`)
``GET /ui/api/live``            the live inputs (as ``GET /api/v1/live``), each connected one
                                with ``preview``: its LL-HLS playlist with a short-lived ``hls``
                                token for ``live:<input>``, which the page plays with hls.js
                                (served by the node at ``/swarm/lib/hls.min.js``)

Access control, checked on every request before anything else:

* loopback only: the TCP peer address must be 127.0.0.0/8 or ::1, and requests carrying the
  headers cloudflared adds (``CF-Connecting-IP``, ``Cf-Ray``, ``X-Forwarded-For``) are refused,
  because through a tunnel every request comes from loopback. ``[ui] allow_remote = true`` lifts
  both (for an operator's own authenticating proxy);
* the ``admin_token`` secret: ``Authorization: Bearer <token>`` or the session cookie made at
  login (:mod:`peerd.ui.auth`). Without the secret the dashboard answers 503 and says how to set
  it.

The player: Chromium has no native HLS, so instead of vendoring hls.js the page plays fMP4
renditions itself with Media Source Extensions, appending the init segment and the media
segments by blob id. MSE in Chromium does not take MPEG-TS, so every item (TS ones included)
can also be played over WebRTC: the page frames the node's WHEP player (``/whep/player/``), the
same path a viewer uses.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

from aiohttp import web

from peerd.core.ids import parse_cid
from peerd.delivery import Resolver
from peerd.errors import Forbidden, NotConfigured, NotFound, Unauthorized, Unavailable
from peerd.http.access import ViewerAuth, viewer_auth
from peerd.http.playback import PlaybackAnalytics
from peerd.runtime import Runtime
from peerd.ui.auth import COOKIE, make_session, session_valid, token_matches
from peerd.ui.summary import BandwidthHistory, build_summary, media_detail, served_totals

if TYPE_CHECKING:
    from peerd.live.service import LiveService

log = logging.getLogger("peerd.ui")

TUNNEL_HEADERS = ("CF-Connecting-IP", "Cf-Ray", "X-Forwarded-For", "Cf-Access-Jwt-Assertion")
STATIC_TYPES = {
    "index.html": "text/html",
    "login.html": "text/html",
    "app.js": "text/javascript",
    "login.js": "text/javascript",
    "playback.js": "text/javascript",
    "app.css": "text/css",
}
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "media-src 'self' blob:; connect-src 'self'; form-action 'self'; base-uri 'none'; "
    "frame-src 'self'; frame-ancestors 'none'"
)
FAILED_LOGIN_DELAY_S = 0.5
# The player page posts its offer at once; the token only needs to outlive that.
PLAYER_TOKEN_TTL_S = 600

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _static(name: str) -> bytes:
    return resources.files("peerd.ui").joinpath("static", name).read_bytes()


def _secure(resp: web.StreamResponse, *, cache: str = "no-store") -> web.StreamResponse:
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["X-Frame-Options"] = "DENY"
    resp.headers.setdefault("Cache-Control", cache)
    return resp


class Dashboard:
    """The routes, bound to one runtime."""

    def __init__(
        self,
        rt: Runtime,
        auth: ViewerAuth,
        resolver: Resolver | None = None,
        live: LiveService | None = None,
    ) -> None:
        self.rt = rt
        self.auth = auth
        self.resolver = resolver
        self.live_inputs = live
        cfg = rt.settings.ui
        self.history = BandwidthHistory(max_points=cfg.history_points)

    # -- access control ---------------------------------------------------------------------

    def _check_origin(self, request: web.Request) -> None:
        if self.rt.settings.ui.allow_remote:
            return
        peer = request.transport.get_extra_info("peername") if request.transport else None
        host = peer[0] if isinstance(peer, tuple) and peer else None
        try:
            loopback = host is not None and ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise Forbidden("the dashboard answers loopback clients only ([ui] allow_remote)")
        if any(h in request.headers for h in TUNNEL_HEADERS):
            raise Forbidden("the dashboard is not served through the tunnel ([ui] allow_remote)")

    def _admin_token(self) -> str:
        token = self.rt.settings.secret("admin_token")
        if not token:
            raise Unavailable(
                "no admin_token secret: run `peerd init` (or `peerd install`) to create one"
            )
        return token

    def _authenticated(self, request: web.Request, token: str) -> bool:
        auth = request.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return token_matches(token, auth[7:])
        return session_valid(token, request.cookies.get(COOKIE, ""), time.time())

    def _require(self, request: web.Request) -> None:
        self._check_origin(request)
        if not self._authenticated(request, self._admin_token()):
            raise Unauthorized("log in at /ui with the admin_token secret")

    # -- pages ------------------------------------------------------------------------------

    async def page(self, request: web.Request) -> web.StreamResponse:
        """The dashboard, or the login form."""
        self._check_origin(request)
        token = self._admin_token()
        name = "index.html" if self._authenticated(request, token) else "login.html"
        body = await asyncio.to_thread(_static, name)
        return _secure(web.Response(body=body, content_type="text/html", charset="utf-8"))

    async def static(self, request: web.Request) -> web.StreamResponse:
        """Page assets (served before login: they hold no data)."""
        self._check_origin(request)
        name = request.match_info["name"]
        ctype = STATIC_TYPES.get(name)
        if ctype is None or name.endswith(".html"):
            raise NotFound(f"no asset {name}")
        body = await asyncio.to_thread(_static, name)
        return _secure(
            web.Response(body=body, content_type=ctype, charset="utf-8"), cache="no-cache"
        )

    async def login(self, request: web.Request) -> web.StreamResponse:
        """Check the token from the form; set the session cookie."""
        self._check_origin(request)
        token = self._admin_token()
        form = await request.post()
        offered = form.get("token")
        if not isinstance(offered, str) or not token_matches(token, offered):
            log.warning("dashboard login failed")
            # Slow down guessing; the token has 256 bits, this only keeps logs quiet.
            await asyncio.sleep(FAILED_LOGIN_DELAY_S)
            raise web.HTTPSeeOther("/ui?failed=1")
        ttl = self.rt.settings.ui.session_hours * 3600
        resp = web.HTTPSeeOther("/ui")
        resp.set_cookie(
            COOKIE,
            make_session(token, time.time(), ttl),
            max_age=int(ttl),
            path="/ui",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )
        log.info("dashboard login")
        raise resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        """Drop the session cookie."""
        self._check_origin(request)
        resp = web.HTTPSeeOther("/ui")
        resp.del_cookie(COOKIE, path="/ui")
        raise resp

    # -- data -------------------------------------------------------------------------------

    async def summary(self, request: web.Request) -> web.StreamResponse:
        """Everything the dashboard shows."""
        self._require(request)
        data = await build_summary(self.rt, self.history)
        return _secure(web.json_response(data))

    async def media(self, request: web.Request) -> web.StreamResponse:
        """One media item with its blob ids."""
        self._require(request)
        media_id = parse_cid(request.match_info["media_id"])
        data = await media_detail(self.rt, media_id)
        if data is None:
            raise NotFound(f"no media {media_id}")
        return _secure(web.json_response(data))

    async def blob(self, request: web.Request) -> web.StreamResponse:
        """A blob's bytes for the player."""
        self._require(request)
        cid = parse_cid(request.match_info["cid"])
        resolver = self.resolver
        path = await (
            resolver.ensure_local(cid) if resolver is not None else self.rt.store.open_path(cid)
        )
        resp = web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})
        return _secure(resp, cache="private, max-age=31536000, immutable")

    async def whep(self, request: web.Request) -> web.StreamResponse:
        """A link to the WHEP player for one media item, with a token in token mode."""
        self._require(request)
        if not self.rt.settings.webrtc.enabled:
            raise NotConfigured("WebRTC playback is off ([webrtc] enabled = false)")
        media_id = parse_cid(request.match_info["media_id"])
        if await media_detail(self.rt, media_id) is None:
            raise NotFound(f"no media {media_id}")
        url = f"/whep/player/{media_id}"
        token = self.auth.mint(media_id, "whep", PLAYER_TOKEN_TTL_S)
        if token is not None:
            url += "?token=" + token
        return _secure(web.json_response({"player": url}))

    async def live(self, request: web.Request) -> web.StreamResponse:
        """The live inputs, with a preview link for each connected one."""
        self._require(request)
        inputs: list[dict[str, Any]] = []
        note = None
        for st in self.live_inputs.status() if self.live_inputs is not None else ():
            row = dataclasses.asdict(st)
            row["codecs"] = list(st.codecs)
            row["preview"] = None
            if st.connected:
                url = f"/live/{st.input}/index.m3u8"
                try:
                    token = self.auth.mint(f"live:{st.input}", "hls", PLAYER_TOKEN_TTL_S)
                except NotConfigured as exc:
                    note = exc.message
                else:
                    row["preview"] = url if token is None else f"{url}?token={token}"
            inputs.append(row)
        return _secure(web.json_response({"inputs": inputs, "note": note}))

    # -- bandwidth sampler ------------------------------------------------------------------

    async def sampler(self, app: web.Application) -> AsyncIterator[None]:
        """aiohttp cleanup context: sample bytes served while the app runs."""
        interval = self.rt.settings.ui.sample_interval_s

        async def loop() -> None:
            while True:
                self.history.sample(time.time(), served_totals(self.rt))
                await asyncio.sleep(interval)

        task = asyncio.create_task(loop(), name="ui-sampler")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def install(
    app: web.Application,
    rt: Runtime,
    resolver: Resolver | None = None,
    live: LiveService | None = None,
    analytics: PlaybackAnalytics | None = None,
) -> None:
    """Add the dashboard's routes (nothing when ``[ui] enabled = false``); the player's blobs
    the node lacks come through ``resolver``; the Live panel shows ``live``'s inputs, the
    Playback panel ``analytics`` (it hides itself without)."""
    if not rt.settings.ui.enabled:
        return
    d = Dashboard(rt, viewer_auth(app, rt), resolver, live)
    app.router.add_get("/ui", d.page)
    app.router.add_get("/ui/", d.page)
    app.router.add_post("/ui/login", d.login)
    app.router.add_post("/ui/logout", d.logout)
    app.router.add_get("/ui/static/{name}", d.static)
    app.router.add_get("/ui/api/summary", d.summary)
    app.router.add_get("/ui/api/media/{media_id}", d.media)
    app.router.add_get("/ui/api/whep/{media_id}", d.whep)
    app.router.add_get("/ui/api/blob/{cid}", d.blob)
    app.router.add_get("/ui/api/live", d.live)
    app.router.add_get("/ui/api/playback", _playback(d, analytics))
    app.cleanup_ctx.append(d.sampler)


def _playback(d: Dashboard, analytics: PlaybackAnalytics | None) -> Handler:
    async def playback(request: web.Request) -> web.StreamResponse:
        """Playback analytics for the dashboard's panel."""
        d._require(request)
        if analytics is None:  # the panel hides itself
            return _secure(web.json_response({"enabled": False}))
        codecs = await analytics.report(None, None, ["codec"], {}, 50)
        hours = await analytics.report(None, None, ["hour"], {}, 48)
        data = {
            "enabled": True,
            "codecs": codecs["rows"],
            "hours": hours["rows"],
            "bytes": codecs["bytes"],
            "anomalies": codecs["anomalies"][:20],
        }
        return _secure(web.json_response(data))

    return playback
