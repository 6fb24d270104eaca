"""aiohttp routes of ``/api/v1/``: authentication, request parsing, one handler per endpoint.

Authentication (every endpoint but ``openapi.json``):

* ``Authorization: Bearer <api_token>``; the token is the node's ``api_token`` secret, shared with
  the coordinator, compared in constant time. Missing: 401; wrong: 403. It is read once, at the
  first request; a rotated token takes effect at the next restart.
* When ``api.require_access_jwt`` is on, also ``Cf-Access-Jwt-Assertion`` (Cloudflare Access
  service token), checked against the team in ``http.access_team_url`` (its certs endpoint, with
  key caching and rotation) for the audience ``api.access_aud`` (default: ``http.access_aud``).
  A node told to require it without a team URL or audience refuses to start. Tests may pass
  their own verifier to :func:`install`.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any, Protocol, TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

from peerd.api.commands import Commands, job_status
from peerd.api.models import (
    AnalyticsQuery,
    AnalyticsReport,
    ChallengeRequest,
    ChallengeResponse,
    EvictRequest,
    IngestRequest,
    InventoryQuery,
    MediaCommand,
    PrefetchRequest,
)
from peerd.api.node import NodeApi
from peerd.api.spec import ENDPOINTS, PREFIX
from peerd.core.ids import Cid
from peerd.core.signed import PEER_HEADER, SIGNATURE_HEADER, b64url, encode_body
from peerd.errors import (
    BadRequest,
    ConfigError,
    Forbidden,
    NotConfigured,
    NotFound,
    RangeNotSatisfiable,
    Unauthorized,
)
from peerd.http.access import AccessVerifier as HttpAccessVerifier
from peerd.http.playback import PlaybackAnalytics
from peerd.runtime import Runtime
from peerd.store import hash_file

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
M = TypeVar("M", bound=BaseModel)
ACCESS_HEADER = "Cf-Access-Jwt-Assertion"
RT = web.AppKey("api_runtime", Runtime)
TOKEN = web.AppKey("api_token", list)
API = web.AppKey("api_node", NodeApi)
ANALYTICS = web.AppKey("api_analytics", PlaybackAnalytics)


class AccessVerifier(Protocol):
    """Validates a Cloudflare Access JWT (``peerd.http.access``)."""

    async def verify(self, token: str) -> object:
        """The token's claims; raises :class:`Forbidden` when it is not valid."""


VERIFIER: web.AppKey[AccessVerifier] = web.AppKey("api_access_verifier")


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors()[:5]:
        key = ".".join(str(p) for p in e["loc"]) or "(body)"
        parts.append(f"{key}: {e['msg']}")
    return "; ".join(parts)


async def _body(request: web.Request, model: type[M]) -> M:
    raw = await request.read()
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BadRequest("request body is not JSON") from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise BadRequest(f"invalid request: {_describe(exc)}") from None


def _query(request: web.Request, model: type[M]) -> M:
    try:
        return model.model_validate(dict(request.query))
    except ValidationError as exc:
        raise BadRequest(f"invalid query: {_describe(exc)}") from None


def _json(model: BaseModel, status: int = 200) -> web.Response:
    return web.Response(
        body=model.model_dump_json().encode(), status=status, content_type="application/json"
    )


def _token(app: web.Application) -> str | None:
    cache: list[str | None] = app[TOKEN]
    if not cache:
        cache.append(app[RT].settings.secret("api_token"))
    return cache[0]


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bearer token (constant-time) and, if configured, the Cloudflare Access JWT."""
    if request.path == f"{PREFIX}/openapi.json":
        return await handler(request)
    rt = request.app[RT]
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise Unauthorized("missing bearer token")
    cache = request.app[TOKEN]
    expected = cache[0] if cache else await asyncio.to_thread(_token, request.app)
    if expected is None:
        raise Unauthorized("this node has no api_token secret; the API is closed")
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        raise Forbidden("wrong bearer token")
    if rt.settings.api.require_access_jwt:
        jwt = request.headers.get(ACCESS_HEADER)
        if not jwt:
            raise Unauthorized(f"missing {ACCESS_HEADER}")
        await request.app[VERIFIER].verify(jwt)
    return await handler(request)


# -- handlers --------------------------------------------------------------------------------------


async def get_node(request: web.Request) -> web.Response:
    """Node info."""
    return _json(await request.app[API].info())


async def get_health(request: web.Request) -> web.Response:
    """Health and load."""
    return _json(await request.app[API].health())


async def get_inventory(request: web.Request) -> web.Response:
    """A page of inventory changes."""
    q = _query(request, InventoryQuery)
    return _json(await request.app[API].inventory(q.since, q.limit))


async def get_live(request: web.Request) -> web.Response:
    """The live inputs."""
    return _json(request.app[API].live())


async def post_challenge(request: web.Request) -> web.Response:
    """Possession proof over a byte range of a held blob; the response body is signed."""
    rt = request.app[RT]
    req = await _body(request, ChallengeRequest)
    row = await rt.catalog.get_blob(req.cid)
    if row is None or row.local_state != "present":
        raise NotFound(f"blob {req.cid} is not held")
    if req.offset + req.length > row.size:
        raise RangeNotSatisfiable(
            f"range {req.offset}+{req.length} is past the end of the blob ({row.size} bytes)"
        )
    path = await rt.store.open_path(Cid(req.cid))
    nonce = hashlib.sha256(bytes.fromhex(req.nonce))
    digest = await asyncio.to_thread(hash_file, path, req.offset, req.length, nonce)
    if digest is None:
        raise BadRequest("blob file is shorter than its catalog size")
    answer = ChallengeResponse(
        peer_id=rt.identity.peer_id,
        cid=req.cid,
        nonce=req.nonce,
        offset=req.offset,
        length=req.length,
        sha256=digest.hex(),
    )
    body = encode_body(answer.model_dump())
    signature = b64url(rt.identity.sign(body))
    headers = {PEER_HEADER: rt.identity.peer_id, SIGNATURE_HEADER: signature}
    return web.Response(body=body, content_type="application/json", headers=headers)


def _command(
    kind: str, model: type[M], prepare: Callable[[Commands, Any], Awaitable[tuple[str, Any]]]
) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        rt = request.app[RT]
        req = await _body(request, model)
        target, work = await prepare(Commands(rt, request.app[API].parts), req)
        job, _ = await request.app[API].jobs.submit(
            kind,  # type: ignore[arg-type]
            target,
            req.model_dump(mode="json"),
            work,
        )
        resp = _json(job_status(job), status=202)
        resp.headers["Location"] = f"{PREFIX}/jobs/{job.job_id}"
        return resp

    handler.__doc__ = f"Submit a {kind} job."
    return handler


async def get_job(request: web.Request) -> web.Response:
    """Status of a job."""
    job_id = request.match_info["job_id"]
    if len(job_id) != 32 or any(c not in "0123456789abcdef" for c in job_id):
        raise NotFound(f"no job {job_id}")
    job = await request.app[API].jobs.get(job_id)
    return _json(job_status(job))


async def get_analytics(request: web.Request) -> web.Response:
    """Playback analytics over a time range, grouped by dimensions."""
    q = _query(request, AnalyticsQuery)
    analytics = request.app.get(ANALYTICS)
    if analytics is None:
        raise NotConfigured("playback analytics are off ([analytics] enabled)")
    group_by = list(dict.fromkeys(q.group_by.split(",")))
    where = {
        k: v
        for k, v in (
            ("media", q.media),
            ("rendition", q.rendition),
            ("codec", q.codec),
            ("path", q.path),
            ("region", q.region),
        )
        if v is not None
    }
    found = await analytics.report(q.since, q.until, group_by, where, q.limit)
    return _json(AnalyticsReport.model_validate(found))


HANDLERS: dict[str, Handler] = {
    "getAnalytics": get_analytics,
    "getNode": get_node,
    "getHealth": get_health,
    "getInventory": get_inventory,
    "postChallenge": post_challenge,
    "postPrefetch": _command("prefetch", PrefetchRequest, Commands.prefetch),
    "postPin": _command("pin", MediaCommand, Commands.pin),
    "postUnpin": _command("unpin", MediaCommand, Commands.unpin),
    "postEvict": _command("evict", EvictRequest, Commands.evict),
    "postPromote": _command("promote", MediaCommand, Commands.promote),
    "postIngest": _command("ingest", IngestRequest, Commands.ingest),
    "getJob": get_job,
    "getLive": get_live,
}


async def get_openapi(request: web.Request) -> web.Response:
    """The committed OpenAPI document (no authentication: it holds no secret)."""
    body = await asyncio.to_thread(resources.files("peerd.api").joinpath("openapi.json").read_bytes)
    return web.Response(body=body, content_type="application/json")


def _access_verifier(rt: Runtime) -> HttpAccessVerifier:
    """The Cloudflare Access verifier for service tokens sent by the coordinator."""
    team = rt.settings.http.access_team_url
    aud = rt.settings.api.access_aud or rt.settings.http.access_aud
    if not team:
        raise ConfigError(
            "api.require_access_jwt is on but http.access_team_url (the Access team URL) is unset"
        )
    if not aud:
        raise ConfigError(
            "api.require_access_jwt is on but neither api.access_aud nor http.access_aud is set"
        )
    return HttpAccessVerifier.for_team(team, aud, rt.settings.http)


def install(
    app: web.Application,
    rt: Runtime,
    api: NodeApi,
    verifier: AccessVerifier | None = None,
    analytics: PlaybackAnalytics | None = None,
) -> None:
    """Mount ``/api/v1/`` on the node's application, answered from ``api`` (and
    ``analytics``: ``/api/v1/analytics``, 409 without); with
    ``api.require_access_jwt``, Access JWTs are checked by ``verifier`` (default: one for the
    configured team, closed with the app)."""
    if not rt.settings.api.enabled:
        return
    sub = web.Application(middlewares=[auth_middleware])
    if rt.settings.api.require_access_jwt:
        if verifier is None:
            owned = _access_verifier(rt)
            verifier = owned

            async def close_verifier(_app: web.Application) -> None:
                await owned.close()

            app.on_cleanup.append(close_verifier)
        sub[VERIFIER] = verifier
    sub[RT] = rt
    sub[API] = api
    if analytics is not None:
        sub[ANALYTICS] = analytics
    sub[TOKEN] = []
    sub.router.add_get("/openapi.json", get_openapi)
    for ep in ENDPOINTS:
        sub.router.add_route(ep.method, ep.path, HANDLERS[ep.operation_id])
    app.add_subapp(PREFIX, sub)
