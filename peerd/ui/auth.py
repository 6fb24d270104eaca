"""Operator sessions for the dashboard: pure functions, no I/O.

The operator proves they hold the ``admin_token`` secret once (login form or
``Authorization: Bearer``); the browser then keeps a session cookie ``<expiry>.<mac>`` where
``mac = HMAC-SHA256(admin_token, "peerd-ui-session:" + expiry)``. The cookie never contains the
token, expires on its own, and stops working when the token is rotated. Every comparison is
constant-time.
"""

from __future__ import annotations

import hashlib
import hmac

COOKIE = "peerd_ui"
_DOMAIN = b"peerd-ui-session:"


def token_matches(expected: str, offered: str) -> bool:
    """Whether ``offered`` is the admin token (constant-time; empty never matches)."""
    if not expected or not offered:
        return False
    return hmac.compare_digest(expected.encode(), offered.strip().encode())


def _mac(token: str, expiry: int) -> str:
    return hmac.new(token.encode(), _DOMAIN + str(expiry).encode(), hashlib.sha256).hexdigest()


def make_session(token: str, now: float, ttl_s: float) -> str:
    """A cookie value valid until ``now + ttl_s``."""
    expiry = int(now + ttl_s)
    return f"{expiry}.{_mac(token, expiry)}"


def session_valid(token: str, cookie: str, now: float) -> bool:
    """Whether ``cookie`` was made with ``token`` and has not expired."""
    if not token or not cookie:
        return False
    expiry_s, _, mac = cookie.partition(".")
    if not expiry_s.isdigit() or len(expiry_s) > 12:
        return False
    expiry = int(expiry_s)
    if expiry <= now:
        return False
    return hmac.compare_digest(_mac(token, expiry), mac)
