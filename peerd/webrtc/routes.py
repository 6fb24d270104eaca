"""WHEP over HTTP (RFC 9725): the endpoint, the session resource, CORS, and a player page.

``POST /whep/<media id>`` (``Content-Type: application/sdp``, the offer) answers ``201 Created``
with the SDP answer, ``Location: /whep/sessions/<id>`` and one ``Link: <url>; rel="ice-server"``
header per ICE server URL. ``DELETE`` on the session URL ends it. ``OPTIONS`` on both answers
CORS preflights (origins from ``webrtc.cors_origins``). ``PATCH`` (trickle ICE) is not offered:
the answer carries every candidate, so aiohttp answers 405.

``GET /whep/player/<media id>`` is a small page (no external script) that gathers its candidates
with the same ICE servers, posts its offer, plays the answer, and exposes ``window.whep`` so
tests and operators can read ``getStats()`` and stop the session.

Every route (offer, session, player page) asks the one viewer authorization of
:mod:`peerd.http.access` with scope ``whep``: a token bound to the media id in ``?token=`` or
``Authorization: Bearer``, or the Cloudflare Access JWT in access mode; refusals are a bare 403.
"""

from __future__ import annotations

import json
from collections.abc import MutableMapping, Sequence
from importlib import resources

from aiohttp import web

from peerd.core.whep import IceServer, link_headers
from peerd.errors import BadRequest, NotFound
from peerd.http.access import viewer_auth
from peerd.runtime import Runtime
from peerd.webrtc.session import WhepService

SDP = "application/sdp"
_MAX_OFFER = 64 * 1024
_ALLOW_HEADERS = "Authorization, Content-Type, If-Match"
_EXPOSE_HEADERS = "Location, Link, ETag, Accept-Patch"


def _cors(rt: Runtime, request: web.Request, headers: MutableMapping[str, str]) -> None:
    allowed = rt.settings.webrtc.cors_origins
    origin = request.headers.get("Origin")
    if "*" in allowed:
        headers["Access-Control-Allow-Origin"] = "*"
    elif origin is not None and origin in allowed:
        headers["Access-Control-Allow-Origin"] = origin
        headers["Vary"] = "Origin"
    headers["Access-Control-Expose-Headers"] = _EXPOSE_HEADERS


async def read_offer(request: web.Request) -> str:
    """The SDP offer a WHEP or WHIP client posted: ``application/sdp`` (else 415), at most
    ``_MAX_OFFER`` bytes of UTF-8 (else 400)."""
    ctype = request.headers.get("Content-Type", "").split(";")[0].strip().lower()
    if ctype != SDP:
        raise web.HTTPUnsupportedMediaType(text=f"send the offer as {SDP}")
    if request.content_length is not None and request.content_length > _MAX_OFFER:
        raise BadRequest("SDP offer too large")
    body = await request.content.read(_MAX_OFFER + 1)
    if len(body) > _MAX_OFFER:
        raise BadRequest("SDP offer too large")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("SDP offer is not UTF-8") from None


def install(app: web.Application, rt: Runtime, whep: WhepService) -> None:
    """Register the WHEP routes, answered by ``whep``."""
    if not rt.settings.webrtc.enabled:
        return
    auth = viewer_auth(app, rt)

    async def post_offer(request: web.Request) -> web.Response:
        media_id = request.match_info["media_id"]
        await auth.check(request, media_id, "whep")
        offer = await read_offer(request)
        session, answer, servers = await whep.open(media_id, offer)
        location = f"/whep/sessions/{session.id}"
        resp = web.Response(status=201, text=answer, content_type=SDP)
        resp.headers["Location"] = location
        for value in link_headers(servers):
            resp.headers.add("Link", value)
        resp.headers["Cache-Control"] = "no-store"
        return resp

    async def delete_session(request: web.Request) -> web.Response:
        session = whep.get(request.match_info["session_id"])
        await auth.check(request, session.media_id, "whep")
        if not await whep.close(session.id, "delete"):
            raise NotFound("no such WHEP session")
        return web.Response(status=200)

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
        return web.Response(status=204, headers=headers)

    async def add_cors(request: web.Request, response: web.StreamResponse) -> None:
        # Every /whep/ answer, errors included (401, 429...), so a page on another origin can
        # read why its offer was refused.
        if request.path.startswith("/whep/") and not request.path.startswith("/whep/player/"):
            _cors(rt, request, response.headers)

    app.on_response_prepare.append(add_cors)

    async def player(request: web.Request) -> web.Response:
        media_id = request.match_info["media_id"]
        token = await auth.check(request, media_id, "whep")
        servers = await whep.ice_servers()
        return player_page(f"/whep/{media_id}", token, servers)

    app.router.add_post("/whep/{media_id}", post_offer)
    app.router.add_route("OPTIONS", "/whep/{media_id}", preflight)
    app.router.add_delete("/whep/sessions/{session_id}", delete_session)
    app.router.add_route("OPTIONS", "/whep/sessions/{session_id}", preflight)
    app.router.add_get("/whep/player/{media_id}", player)


def player_page(endpoint: str, token: str | None, servers: Sequence[IceServer]) -> web.Response:
    """The player page posting its offer to ``endpoint`` (stored media or a live input)."""
    config = {
        "endpoint": endpoint,
        "token": token,
        "iceServers": [s.to_json() for s in servers],
    }
    # JSON inside a <script> element: escape "<" so no value can close the element.
    blob = json.dumps(config).replace("<", "\\u003c")
    page = _PLAYER.replace("{{CONFIG}}", blob)
    return web.Response(
        text=page,
        content_type="text/html",
        headers={
            "Cache-Control": "no-store",
            "Content-Security-Policy": _CSP,
            "Referrer-Policy": "no-referrer",
        },
    )


_CSP = (
    "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
    "media-src 'self' blob:; connect-src 'self'"
)
_PLAYER = resources.files("peerd.webrtc").joinpath("player.html").read_text(encoding="utf-8")
