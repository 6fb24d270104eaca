"""Who may open a WHEP session: the HLS token rules (``peerd.core.tokens``) with scope ``whep``.

When the node has the secret ``hls_signing_key`` (shared with the coordinator), every WHEP
request (offer and player page) needs a live token for that media id and the ``whep`` scope,
minted exactly as for HLS (``v1.whep.<expires>.<sig>``, see ``peerd.core.tokens``); without the
key the node is private (loopback or behind Cloudflare Access) and WHEP is open. Viewers send it
as ``Authorization: Bearer <token>`` (WHEP's way) or ``?token=``.
"""

from __future__ import annotations

from peerd.core import tokens
from peerd.errors import Forbidden, Unauthorized
from peerd.runtime import Runtime

SCOPE = "whep"


def sign(key: bytes, media_id: str, scope: str, expires: int) -> str:
    """A token for ``scope`` on ``media_id`` (the shared HLS/WHEP format)."""
    return tokens.mint(key, media_id, scope, expires)


def verify(key: bytes, token: str, media_id: str, scope: str, now: float) -> None:
    """Raise Forbidden unless ``token`` is a live token for ``media_id`` and ``scope``."""
    check = tokens.verify(key, token, media_id, scope, now)
    if not check.ok:
        assert check.error is not None
        raise Forbidden(f"token refused ({check.error.value})")


def check_access(rt: Runtime, media_id: str, token: str | None, now: float) -> None:
    """Allow the request or raise Unauthorized (no token) / Forbidden (bad token)."""
    key = rt.settings.secret("hls_signing_key")
    if key is None:
        return
    if token is None:
        raise Unauthorized("a token is required")
    verify(tokens.key_from_secret(key), token, media_id, SCOPE, now)
