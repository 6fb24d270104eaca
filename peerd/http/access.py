"""Cloudflare Access: validate the ``Cf-Access-Jwt-Assertion`` header Access adds at the edge.

When an Access application protects the tunnel hostname, Cloudflare sends every authenticated
request with a JWT signed RS256 by the team's keys. The node checks it itself (a request that
reaches the origin some other way must not pass):

* the JWT is three base64url parts; the header says ``alg: RS256`` (nothing else is accepted, so
  ``none`` and HMAC confusion are impossible) and names the key by ``kid``;
* keys come from ``https://<team>.cloudflareaccess.com/cdn-cgi/access/certs`` (JWKS, ``keys``
  array of RSA keys); they are cached for ``access_keys_ttl_s`` and fetched again when a token
  names a ``kid`` the cache does not hold (key rotation), at most once per
  ``access_refetch_min_s`` so a flood of forged kids cannot hammer the endpoint;
* the signature is RSASSA-PKCS1-v1_5 with SHA-256 over ``header.payload``;
* claims: ``iss`` equals the team URL, ``aud`` (a string or an array of AUD tags) contains the
  configured tag, ``exp`` is in the future and ``nbf``/``iat`` not in the future (with a small
  leeway for clock skew).

We implement RS256 with ``cryptography`` (already a dependency) instead of adding PyJWT: the check
is ~60 lines, accepts one algorithm only and has no configuration surface to get wrong.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from peerd.errors import Forbidden, Unavailable

log = logging.getLogger("peerd.http.access")

LEEWAY_S = 60.0
MAX_JWT_CHARS = 16 * 1024


class AccessDenied(Forbidden):
    """The Access JWT is missing or invalid (the client only ever sees a bare 403)."""

    code = "forbidden"


@dataclass(frozen=True)
class AccessIdentity:
    """Who Access says the viewer is."""

    subject: str
    email: str | None
    expires: float


def _b64url(data: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(data + "=" * (-len(data) % 4))
    except (binascii.Error, ValueError) as exc:
        raise AccessDenied("bad base64") from exc


def _b64int(data: str) -> int:
    return int.from_bytes(_b64url(data), "big")


def parse_jwks(doc: Any) -> dict[str, rsa.RSAPublicKey]:
    """RSA public keys by kid from a JWKS document; entries that are not RSA keys are skipped."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError("JWKS document has no keys array")
    keys: dict[str, rsa.RSAPublicKey] = {}
    for k in doc["keys"]:
        if not isinstance(k, dict) or k.get("kty") != "RSA" or not isinstance(k.get("kid"), str):
            continue
        if not isinstance(k.get("n"), str) or not isinstance(k.get("e"), str):
            continue
        keys[k["kid"]] = rsa.RSAPublicNumbers(_b64int(k["e"]), _b64int(k["n"])).public_key()
    return keys


def verify_jwt(
    token: str,
    keys: dict[str, rsa.RSAPublicKey],
    *,
    issuer: str,
    audience: str,
    now: float,
) -> AccessIdentity:
    """Check an RS256 JWT against ``keys``; AccessDenied (with a log-only reason) if invalid.

    KeyError when the header names a kid not in ``keys`` (the caller refreshes and retries).
    """
    if len(token) > MAX_JWT_CHARS:
        raise AccessDenied("token too long")
    parts = token.split(".")
    if len(parts) != 3:
        raise AccessDenied("not a JWS compact token")
    try:
        header = json.loads(_b64url(parts[0]))
        claims = json.loads(_b64url(parts[1]))
    except ValueError as exc:
        raise AccessDenied("bad JSON") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise AccessDenied("bad JWT structure")
    if header.get("alg") != "RS256":
        raise AccessDenied("algorithm not allowed")
    kid = header.get("kid")
    if not isinstance(kid, str):
        raise AccessDenied("no kid")
    key = keys[kid]
    try:
        key.verify(
            _b64url(parts[2]),
            f"{parts[0]}.{parts[1]}".encode(),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except InvalidSignature as exc:
        raise AccessDenied("bad signature") from exc
    if claims.get("iss") != issuer:
        raise AccessDenied("wrong issuer")
    aud = claims.get("aud")
    auds = aud if isinstance(aud, list) else [aud]
    if audience not in auds:
        raise AccessDenied("wrong audience")
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool) or now >= exp + LEEWAY_S:
        raise AccessDenied("expired")
    for claim in ("nbf", "iat"):
        t = claims.get(claim)
        if t is not None and (not isinstance(t, (int, float)) or t > now + LEEWAY_S):
            raise AccessDenied(f"{claim} in the future")
    sub = claims.get("sub")
    email = claims.get("email")
    return AccessIdentity(
        subject=sub if isinstance(sub, str) else "",
        email=email if isinstance(email, str) else None,
        expires=float(exp),
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
        self._keys: dict[str, rsa.RSAPublicKey] = {}
        self._fetched_at: float | None = None
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        # Verified tokens until they expire: segment requests repeat the same JWT many times.
        self._ok: dict[str, AccessIdentity] = {}
        self.fetches = 0

    async def close(self) -> None:
        """Close the HTTP client."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _fetch(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        self.fetches += 1
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

    async def _refresh(self, *, force: bool) -> None:
        async with self._lock:
            now = self.clock()
            fresh = self._fetched_at is not None and now - self._fetched_at < self.keys_ttl_s
            recent = self._fetched_at is not None and now - self._fetched_at < self.refetch_min_s
            if (force and not recent) or not fresh:
                await self._fetch()

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
        now = self.clock()
        hit = self._ok.get(token)
        if hit is not None and now < hit.expires + LEEWAY_S:
            return hit
        await self._refresh(force=False)
        try:
            ident = verify_jwt(
                token, self._keys, issuer=self.issuer, audience=self.audience, now=now
            )
        except KeyError:
            # Unknown kid: the team may have rotated its keys since we fetched them.
            await self._refresh(force=True)
            try:
                ident = verify_jwt(
                    token, self._keys, issuer=self.issuer, audience=self.audience, now=now
                )
            except KeyError as exc:
                raise AccessDenied("unknown kid") from exc
        if len(self._ok) > 4096:
            self._ok.clear()
        self._ok[token] = ident
        return ident
