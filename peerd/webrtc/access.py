"""Who may open a WHEP session: the HLS token rules, with the ``whep`` scope.

When the node has the secret ``hls_signing_key`` (shared with the coordinator), every WHEP
request (offer and player page) needs a token for that media id and the ``whep`` scope that has
not expired; without the key the node is private (loopback or behind Cloudflare Access) and WHEP
is open. Viewers send it as ``Authorization: Bearer <token>`` (WHEP's way) or ``?token=``.

Token: ``<expiry, unix seconds>.<base64url, unpadded, of HMAC-SHA256(key, "<scope>\n<media
id>\n<expiry>")>``. This is an interim implementation of the shape planned for the HLS token
scheme (``peerd.core.tokens``, issue 4: HMAC over media id, scope and expiry with
``hls_signing_key``), which was not written when WHEP was; once it exists, :func:`check_access`
should call it so HLS and WHEP share one scheme.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from peerd.errors import Forbidden, Unauthorized
from peerd.runtime import Runtime

SCOPE = "whep"


def sign(key: bytes, media_id: str, scope: str, expires: int) -> str:
    """A token ``<expiry>.<base64url HMAC-SHA256(key, scope, media id, expiry)>``."""
    mac = hmac.new(key, f"{scope}\n{media_id}\n{expires}".encode(), hashlib.sha256).digest()
    return f"{expires}." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def verify(key: bytes, token: str, media_id: str, scope: str, now: float) -> None:
    """Raise Forbidden unless ``token`` is a live token for ``media_id`` and ``scope``."""
    expires_s, _, _ = token.partition(".")
    if not expires_s.isdigit():
        raise Forbidden("malformed token")
    expected = sign(key, media_id, scope, int(expires_s))
    if not hmac.compare_digest(expected.encode(), token.encode()):
        raise Forbidden("token is not valid for this media")
    if int(expires_s) <= now:
        raise Forbidden("token expired")


def check_access(rt: Runtime, media_id: str, token: str | None, now: float) -> None:
    """Allow the request or raise Unauthorized (no token) / Forbidden (bad token)."""
    key = rt.settings.secret("hls_signing_key")
    if key is None:
        return
    if token is None:
        raise Unauthorized("a token is required")
    verify(key.encode(), token, media_id, SCOPE, now)
