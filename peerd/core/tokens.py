"""Signed, expiring access tokens for viewer URLs (HLS now, WHEP later); pure, no I/O, no clock.

The coordinator (a Cloudflare Worker) mints these tokens with the same shared key, so the format
below is a contract. Change it only by adding a new version.

Token format, version 1
-----------------------
A token is ASCII text of four fields joined by ``.``::

    v1.<scope>.<expires>.<signature>

* ``scope``: what the token grants, one of :data:`SCOPES` (``hls``: the master playlist, media
  playlists and init/media segments of ONE media item; ``whep``: a WHEP session for one media).
  Lowercase letters only.
* ``expires``: Unix time in whole seconds (UTC), decimal, no sign, no leading zeros, at most 12
  digits. The token is valid while ``now < expires``.
* ``signature``: ``base64url(HMAC-SHA256(key, message))`` without ``=`` padding (43 characters),
  where ``message`` is the UTF-8 encoding of the five lines joined by a single ``\\n`` (no trailing
  newline)::

      peerd-token
      v1
      <scope>
      <media id>
      <expires>

  ``media id`` is the media's content id string exactly as it appears in the URL (CIDv1, base32,
  ``b...``). The media id is not in the token: it comes from the URL the token is presented with,
  so a token for one media never opens another.
* ``key``: the raw bytes of the shared secret ``hls_signing_key`` (the file's content with leading
  and trailing whitespace removed, taken as UTF-8 bytes); at least 32 bytes.

The token travels in the ``token`` query parameter. Its characters (letters, digits, ``-``, ``_``,
``.``) need no percent-encoding.

Example (Worker side, WebCrypto)::

    const msg = `peerd-token\\nv1\\n${scope}\\n${mediaId}\\n${expires}`;
    const k = await crypto.subtle.importKey("raw", keyBytes, {name: "HMAC", hash: "SHA-256"},
                                            false, ["sign"]);
    const sig = base64url(new Uint8Array(await crypto.subtle.sign("HMAC", k, enc.encode(msg))));
    const token = `v1.${scope}.${expires}.${sig}`;

Verification compares signatures in constant time and returns a :class:`TokenCheck` naming why a
token failed; callers log the reason and answer a uniform 403 so nothing leaks to the client.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from dataclasses import dataclass
from enum import Enum

VERSION = "v1"
SCOPES: frozenset[str] = frozenset({"hls", "whep"})
MIN_KEY_BYTES = 32
MAX_TOKEN_CHARS = 128

_EXPIRES_RE = re.compile(r"^(0|[1-9][0-9]{0,11})$")
_SIG_RE = re.compile(r"^[A-Za-z0-9_-]{43}$")


class TokenError(Enum):
    """Why a token was refused (for logs and metrics only, never sent to the client)."""

    MISSING = "missing"
    MALFORMED = "malformed"
    VERSION = "version"
    SCOPE = "scope"
    EXPIRED = "expired"
    SIGNATURE = "signature"


@dataclass(frozen=True)
class TokenCheck:
    """The outcome of :func:`verify`: ``error`` is None when the token is good."""

    error: TokenError | None
    expires: int | None = None

    @property
    def ok(self) -> bool:
        """True when the token grants the requested access."""
        return self.error is None


def key_from_secret(secret: str) -> bytes:
    """The HMAC key from the secret's text; ValueError if it is too short to be safe."""
    key = secret.strip().encode()
    if len(key) < MIN_KEY_BYTES:
        raise ValueError(f"signing key must be at least {MIN_KEY_BYTES} bytes, got {len(key)}")
    return key


def _message(scope: str, media_id: str, expires: int) -> bytes:
    return f"peerd-token\n{VERSION}\n{scope}\n{media_id}\n{expires}".encode()


def _sign(key: bytes, scope: str, media_id: str, expires: int) -> str:
    mac = hmac.new(key, _message(scope, media_id, expires), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def mint(key: bytes, media_id: str, scope: str, expires: int) -> str:
    """A token granting ``scope`` on ``media_id`` until the Unix time ``expires``."""
    if scope not in SCOPES:
        raise ValueError(f"unknown scope {scope!r}")
    if not 0 <= expires < 10**12:
        raise ValueError(f"expires out of range: {expires}")
    return f"{VERSION}.{scope}.{expires}.{_sign(key, scope, media_id, expires)}"


def verify(key: bytes, token: str | None, media_id: str, scope: str, now: float) -> TokenCheck:
    """Check ``token`` grants ``scope`` on ``media_id`` at time ``now``."""
    if not token:
        return TokenCheck(TokenError.MISSING)
    if len(token) > MAX_TOKEN_CHARS:
        return TokenCheck(TokenError.MALFORMED)
    parts = token.split(".")
    if len(parts) != 4:
        return TokenCheck(TokenError.MALFORMED)
    version, tscope, texp, sig = parts
    if version != VERSION:
        return TokenCheck(TokenError.VERSION)
    if not _EXPIRES_RE.match(texp) or not _SIG_RE.match(sig):
        return TokenCheck(TokenError.MALFORMED)
    expires = int(texp)
    # The signature is checked before scope and expiry so a forged token learns nothing from
    # which of the later checks failed (the HTTP layer answers the same 403 anyway).
    expected = _sign(key, tscope, media_id, expires) if tscope in SCOPES else ""
    if not expected or not hmac.compare_digest(expected.encode(), sig.encode()):
        return TokenCheck(TokenError.SIGNATURE)
    if tscope != scope:
        return TokenCheck(TokenError.SCOPE, expires)
    if now >= expires:
        return TokenCheck(TokenError.EXPIRED, expires)
    return TokenCheck(None, expires)
