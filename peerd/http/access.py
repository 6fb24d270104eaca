"""Who may watch: the one viewer authorization of every viewer route, and Access JWTs.

:class:`ViewerAuth` decides for HLS (playlists and blobs, the fast path's copy of them included),
WHEP (offer, session, player page) and the dashboard's WHEP link, which mints its token through
it. :func:`viewer_auth` builds it once per application from ``[http]``:

* ``auth = "token"``: a live ``peerd.core.tokens`` token for the media id and the route's scope
  (``hls`` or ``whep``), in ``?token=`` or else ``Authorization: Bearer``. The key is the secret
  named by ``http.signing_key_secret``, read once when the application is built (a rotated key
  takes effect at restart). Without that secret every viewer is refused.
* ``auth = "access"``: a valid Cloudflare Access JWT in ``Cf-Access-Jwt-Assertion``; tokens are
  ignored. Without ``access_team_url`` and ``access_aud`` every viewer is refused.

Every refusal is the same bare 403; the reason goes to the log and to
``peerd_http_denied_total{reason}``.

Access JWTs (:class:`AccessVerifier`, also used by ``/api/v1/`` for service tokens) are checked
by PyJWT: RS256 only (the key is bound to RS256, so ``none`` and HMAC confusion fail), ``aud``
holding the application's tag, ``iss`` the team URL, ``exp`` required, ``exp``/``nbf``/``iat``
with :data:`LEEWAY_S` of clock skew. The keys are the team's JWKS
(``<team>/cdn-cgi/access/certs``), fetched here with aiohttp (PyJWT's own ``PyJWKClient``
blocks on urllib), cached for ``access_keys_ttl_s`` and fetched again when a token names an
unknown ``kid`` (key rotation), at most once per ``access_refetch_min_s`` so a flood of forged
kids cannot hammer the endpoint.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from prometheus_client import Counter

from peerd.config import HttpSettings
from peerd.core import tokens
from peerd.errors import Forbidden, NotConfigured, Unavailable
from peerd.http.clientip import Network, client_ip, parse_networks
from peerd.runtime import Runtime

log = logging.getLogger("peerd.http.access")

LEEWAY_S = 60.0
MAX_JWT_CHARS = 16 * 1024
ACCESS_HEADER = "Cf-Access-Jwt-Assertion"
# The body of every viewer refusal, whatever the reason (README "HLS URLs" quotes it; a test
# holds the two together).
DENIED_BODY = {"error": "forbidden", "message": "forbidden"}


class AccessDenied(Forbidden):
    """The Access JWT is missing or invalid (the client only ever sees a bare 403)."""

    code = "forbidden"


@dataclass(frozen=True)
class AccessIdentity:
    """Who Access says the viewer is."""

    subject: str
    email: str | None
    expires: float


def parse_jwks(doc: Any) -> dict[str, jwt.PyJWK]:
    """RS256 keys by kid from a JWKS document; entries that are not usable RSA keys are skipped."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("JWKS document has no keys array")
    keys: dict[str, jwt.PyJWK] = {}
    for k in doc["keys"]:
        if not isinstance(k, dict) or k.get("kty") != "RSA" or not isinstance(k.get("kid"), str):
            continue
        try:
            keys[k["kid"]] = jwt.PyJWK(k, algorithm="RS256")
        except (jwt.PyJWTError, ValueError, TypeError):
            log.warning("access key skipped", extra={"kid": k["kid"]})
    return keys


def _decode(token: str, key: jwt.PyJWK, issuer: str, audience: str) -> AccessIdentity:
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=["RS256"],
            audience=audience,
            issuer=issuer,
            leeway=LEEWAY_S,
            options={"require": ["exp", "iss", "aud"], "enforce_minimum_key_length": True},
        )
    except jwt.PyJWTError as exc:
        raise AccessDenied(type(exc).__name__) from None
    sub, email = claims.get("sub"), claims.get("email")
    return AccessIdentity(
        subject=sub if isinstance(sub, str) else "",
        email=email if isinstance(email, str) else None,
        expires=float(claims["exp"]),
    )


class AccessVerifier:
    """Validates Access JWTs with keys fetched (and cached) from the team's certs endpoint."""

    def __init__(
        self,
        *,
        certs_url: str,
        issuer: str,
        audience: str,
        keys_ttl_s: float = 3600.0,
        refetch_min_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.certs_url = certs_url
        self.issuer = issuer
        self.audience = audience
        self.keys_ttl_s = keys_ttl_s
        self.refetch_min_s = refetch_min_s
        self.clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        # Verified tokens until they expire: segment requests repeat the same JWT many times.
        self._ok: dict[str, AccessIdentity] = {}

    @classmethod
    def for_team(cls, team_url: str, audience: str, cfg: HttpSettings) -> AccessVerifier:
        """A verifier of the Access team at ``team_url``, key caching as ``cfg`` (``[http]``)."""
        team = team_url.rstrip("/")
        return cls(
            certs_url=f"{team}/cdn-cgi/access/certs",
            issuer=team,
            audience=audience,
            keys_ttl_s=cfg.access_keys_ttl_s,
            refetch_min_s=cfg.access_refetch_min_s,
        )

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _fetch(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            async with self._session.get(self.certs_url) as resp:
                if resp.status != 200:
                    raise Unavailable("Access certs endpoint failed", status=resp.status)
                doc = await resp.json(content_type=None)
            keys = parse_jwks(doc)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise Unavailable("Access certs endpoint unreachable") from exc
        self._keys = keys
        self._fetched_at = self.clock()
        log.info("access keys fetched", extra={"kids": sorted(keys)})

    async def _key(self, kid: str) -> jwt.PyJWK | None:
        async with self._lock:
            at = self._fetched_at
            age = self.clock() - at if at is not None else None
            # An unknown kid may be a rotation since the last fetch: fetch again, unless the
            # last fetch is too recent (forged kids must not hammer the endpoint).
            if (
                age is None
                or age >= self.keys_ttl_s
                or (kid not in self._keys and age >= self.refetch_min_s)
            ):
                await self._fetch()
            return self._keys.get(kid)

    def cached(self, token: str) -> AccessIdentity | None:
        """The identity of ``token`` if it was verified before and has not expired, else None."""
        hit = self._ok.get(token)
        if hit is not None and self.clock() < hit.expires + LEEWAY_S:
            return hit
        return None

    async def verify(self, token: str | None) -> AccessIdentity:
        """The identity in a valid token; AccessDenied otherwise."""
        if not token:
            raise AccessDenied("no Access token")
        hit = self.cached(token)
        if hit is not None:
            return hit
        if len(token) > MAX_JWT_CHARS:
            raise AccessDenied("token too long")
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError:
            raise AccessDenied("not a JWT") from None
        if not isinstance(kid, str):
            raise AccessDenied("no kid")
        key = await self._key(kid)
        if key is None:
            raise AccessDenied("unknown kid")
        ident = _decode(token, key, self.issuer, self.audience)
        if len(self._ok) > 4096:
            self._ok.clear()
        self._ok[token] = ident
        return ident


def request_token(request: web.BaseRequest) -> str | None:
    """The viewer token of a request: ``?token=``, else ``Authorization: Bearer`` (WHEP's way).

    The query comes first as the fast path reads only the query: both decide alike.
    """
    token = request.query.get("token")
    if token:
        return token
    auth = request.headers.get("Authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return None


class ViewerAuth:
    """Decides whether a request may read one media item (HLS) or open a session on it (WHEP)."""

    def __init__(
        self,
        mode: str,
        *,
        key: bytes | None,
        verifier: AccessVerifier | None,
        trusted: tuple[Network, ...],
        denied: Counter,
        key_name: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.mode = mode
        self.key = key
        self.key_name = key_name
        self.verifier = verifier
        self.trusted = trusted
        self.denied = denied
        self.clock = clock
        self._good: dict[tuple[str, str, str], int] = {}

    async def close(self, _app: web.Application | None = None) -> None:
        """Close the Access verifier's HTTP client (an aiohttp cleanup callback)."""
        if self.verifier is not None:
            await self.verifier.close()

    def _deny(self, request: web.BaseRequest, reason: str) -> Forbidden:
        self.denied.labels(reason=reason).inc()
        log.info(
            "viewer refused",
            extra={
                "reason": reason,
                "path": request.path,
                "client": client_ip(request, self.trusted),
            },
        )
        return Forbidden(DENIED_BODY["message"])

    async def check(self, request: web.BaseRequest, media_id: str, scope: str) -> str | None:
        """Raise a bare Forbidden unless the request may use ``scope`` on ``media_id``.

        Returns the token to propagate into URLs (None in access mode).
        """
        if self.mode == "access":
            if self.verifier is None:
                raise self._deny(request, "access-unconfigured")
            try:
                await self.verifier.verify(request.headers.get(ACCESS_HEADER))
            except AccessDenied as exc:
                raise self._deny(request, f"access:{exc.message}") from None
            return None
        return self.check_token(request, media_id, scope)

    def _token_ok(self, token: str | None, media_id: str, scope: str) -> tokens.TokenError | None:
        # A player repeats one token for every request of a media: remember good ones until
        # they expire instead of recomputing the HMAC each time.
        assert self.key is not None
        now = self.clock()
        cached = self._good.get((token, media_id, scope)) if token else None
        if cached is not None and now < cached:
            return None
        result = tokens.verify(self.key, token, media_id, scope, now)
        if result.error is not None or result.expires is None:
            return result.error or tokens.TokenError.MALFORMED
        if len(self._good) >= 4096:
            self._good.clear()
        self._good[(token or "", media_id, scope)] = result.expires
        return None

    def check_token(self, request: web.BaseRequest, media_id: str, scope: str) -> str | None:
        """Token mode's check, synchronous (the hot path of playlists skips a coroutine)."""
        if self.key is None:
            raise self._deny(request, "no-signing-key")
        token = request_token(request)
        error = self._token_ok(token, media_id, scope)
        if error is not None:
            raise self._deny(request, error.value)
        return token

    def admits(self, token: str | None, jwt: str | None, media_id: str, scope: str) -> bool:
        """Whether a request passes without refusal, coroutine or I/O (:mod:`peerd.http.fastpath`).

        Token mode verifies ``token``; access mode accepts only a JWT verified before. False
        sends the request down the full path, which refuses it with its reason (or fetches keys).
        """
        if self.mode == "access":
            if self.verifier is None or not jwt:
                return False
            return self.verifier.cached(jwt) is not None
        return (
            self.key is not None and bool(token) and self._token_ok(token, media_id, scope) is None
        )

    def mint(self, media_id: str, scope: str, ttl_s: int) -> str | None:
        """A token for ``scope`` on ``media_id`` valid ``ttl_s`` (the dashboard's player link).

        None in access mode (Access admits the viewer); NotConfigured in token mode without
        the key, since every viewer is refused then.
        """
        if self.mode == "access":
            return None
        if self.key is None:
            raise NotConfigured(f"no {self.key_name} secret: the node refuses every viewer")
        return tokens.mint(self.key, media_id, scope, int(self.clock()) + ttl_s)


VIEWER_AUTH = web.AppKey("viewer_auth", ViewerAuth)


def make_auth(rt: Runtime) -> ViewerAuth:
    """The viewer authorization configured in ``[http]``."""
    cfg = rt.settings.http
    key: bytes | None = None
    verifier: AccessVerifier | None = None
    if cfg.auth == "token":
        secret = rt.settings.secret(cfg.signing_key_secret)
        if secret is None:
            log.warning(
                "no viewer signing key: every viewer request will be refused",
                extra={"secret": cfg.signing_key_secret},
            )
        else:
            key = tokens.key_from_secret(secret)
    elif cfg.access_team_url and cfg.access_aud:
        verifier = AccessVerifier.for_team(cfg.access_team_url, cfg.access_aud, cfg)
    else:
        log.warning("access mode without access_team_url/access_aud: refusing every viewer")
    denied = Counter(
        "peerd_http_denied",
        "Viewer requests refused, by reason",
        ["reason"],
        registry=rt.metrics.registry,
    )
    return ViewerAuth(
        cfg.auth,
        key=key,
        key_name=cfg.signing_key_secret,
        verifier=verifier,
        trusted=parse_networks(cfg.trusted_proxies),
        denied=denied,
    )


def viewer_auth(app: web.Application, rt: Runtime) -> ViewerAuth:
    """The application's viewer authorization, built by the first route installer that asks."""
    auth = app.get(VIEWER_AUTH)
    if auth is None:
        auth = app[VIEWER_AUTH] = make_auth(rt)
        app.on_cleanup.append(auth.close)
    return auth
