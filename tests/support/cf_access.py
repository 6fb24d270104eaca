"""A fake Cloudflare Access team: a certs endpoint (JWKS) and a JWT minter, for tests.

Shaped like the real ``https://<team>.cloudflareaccess.com/cdn-cgi/access/certs``: a JSON object
with a ``keys`` array of RSA JWKs (``kid``, ``kty``, ``alg: RS256``, ``use: sig``, ``e``, ``n``).
Tokens are RS256 JWTs with Access's claims (``aud`` array, ``iss`` = team URL, ``sub``, ``email``,
``iat``, ``nbf``, ``exp``). :meth:`FakeAccessTeam.rotate` adds a new key and makes it current, as
Access does when it rotates.
"""

from __future__ import annotations

import asyncio
import base64
import json
import secrets
import time
from typing import Any

from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int_b64(n: int) -> str:
    return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


async def new_key() -> rsa.RSAPrivateKey:
    """A fresh 2048-bit RSA key (generated in a thread: it takes ~100 ms)."""
    return await asyncio.to_thread(rsa.generate_private_key, public_exponent=65537, key_size=2048)


class FakeAccessTeam:
    """Serves JWKS on ``/cdn-cgi/access/certs`` of a loopback port and signs tokens."""

    def __init__(self, audience: str = "aud-test-tag") -> None:
        self.audience = audience
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.current = ""
        self.requests = 0
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def rotate(self) -> str:
        """Add a fresh key and sign new tokens with it; returns its kid."""
        kid = secrets.token_hex(8)
        self.keys[kid] = await new_key()
        self.current = kid
        return kid

    def retire(self, kid: str) -> None:
        """Stop publishing a key."""
        del self.keys[kid]

    @property
    def certs_url(self) -> str:
        """Where the JWKS is served."""
        return f"{self.base_url}/cdn-cgi/access/certs"

    @property
    def issuer(self) -> str:
        """The team URL Access puts in ``iss``."""
        return self.base_url

    def jwks(self) -> dict[str, Any]:
        """The published key set."""
        out = []
        for kid, key in self.keys.items():
            pub = key.public_key().public_numbers()
            out.append(
                {
                    "kid": kid,
                    "kty": "RSA",
                    "alg": "RS256",
                    "use": "sig",
                    "e": _int_b64(pub.e),
                    "n": _int_b64(pub.n),
                }
            )
        return {"keys": out, "public_cert": {}, "public_certs": []}

    def token(
        self,
        *,
        kid: str | None = None,
        key: rsa.RSAPrivateKey | None = None,
        alg: str = "RS256",
        ttl_s: float = 600,
        now: float | None = None,
        **claims: Any,
    ) -> str:
        """An Access JWT; keyword claims override the defaults (e.g. ``aud=[...]``, ``iss=...``)."""
        t = time.time() if now is None else now
        kid = kid or self.current
        signer = key or self.keys[kid]
        body: dict[str, Any] = {
            "aud": [self.audience],
            "iss": self.issuer,
            "sub": "user-1",
            "email": "viewer@example.com",
            "type": "app",
            "iat": int(t),
            "nbf": int(t),
            "exp": int(t + ttl_s),
        }
        body.update(claims)
        header = {"alg": alg, "kid": kid, "typ": "JWT"}
        signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(body).encode())}"
        sig = signer.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64(sig)}"

    async def _certs(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.json_response(self.jwks())

    async def start(self) -> None:
        """Make the first key and listen on an ephemeral loopback port."""
        await self.rotate()
        app = web.Application()
        app.router.add_get("/cdn-cgi/access/certs", self._certs)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
