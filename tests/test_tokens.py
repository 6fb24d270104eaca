"""Signed viewer tokens (pure core): the documented format, and every way a token is refused."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from peerd.core import tokens
from peerd.core.tokens import TokenError

KEY = b"k" * 32
MEDIA = "bafkreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
OTHER = "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
NOW = 1_800_000_000


def test_format_matches_the_documented_recipe() -> None:
    tok = tokens.mint(KEY, MEDIA, "hls", NOW + 60)
    msg = f"peerd-token\nv1\nhls\n{MEDIA}\n{NOW + 60}".encode()
    sig = base64.urlsafe_b64encode(hmac.new(KEY, msg, hashlib.sha256).digest()).rstrip(b"=")
    assert tok == f"v1.hls.{NOW + 60}.{sig.decode()}"
    assert tokens.verify(KEY, tok, MEDIA, "hls", NOW).ok


def _tamper_sig(tok: str) -> str:
    head, sig = tok.rsplit(".", 1)
    return f"{head}.{('A' if sig[0] != 'A' else 'B')}{sig[1:]}"


@pytest.mark.parametrize(
    ("token", "media", "scope", "now", "error"),
    [
        (None, MEDIA, "hls", NOW, TokenError.MISSING),
        ("", MEDIA, "hls", NOW, TokenError.MISSING),
        ("garbage", MEDIA, "hls", NOW, TokenError.MALFORMED),
        ("v1.hls.123", MEDIA, "hls", NOW, TokenError.MALFORMED),
        ("x" * 200, MEDIA, "hls", NOW, TokenError.MALFORMED),
        ("v2.hls.1.abc", MEDIA, "hls", NOW, TokenError.VERSION),
        ("v1.hls.-5." + "A" * 43, MEDIA, "hls", NOW, TokenError.MALFORMED),
        ("v1.hls.0100." + "A" * 43, MEDIA, "hls", NOW, TokenError.MALFORMED),
        ("TAMPERED", MEDIA, "hls", NOW, TokenError.SIGNATURE),
        ("LONGER", MEDIA, "hls", NOW, TokenError.SIGNATURE),
        ("OK", OTHER, "hls", NOW, TokenError.SIGNATURE),
        ("OK", MEDIA, "whep", NOW, TokenError.SCOPE),
        ("OK", MEDIA, "hls", NOW + 60, TokenError.EXPIRED),
        ("OK", MEDIA, "hls", NOW + 1000, TokenError.EXPIRED),
        ("OTHERKEY", MEDIA, "hls", NOW, TokenError.SIGNATURE),
        ("UNKNOWNSCOPE", MEDIA, "hls", NOW, TokenError.SIGNATURE),
    ],
)
def test_refusals(token: str | None, media: str, scope: str, now: int, error: TokenError) -> None:
    good = tokens.mint(KEY, MEDIA, "hls", NOW + 60)
    special = {
        "OK": good,
        "TAMPERED": _tamper_sig(good),
        # Extending the expiry keeps the old signature: it must not verify.
        "LONGER": good.replace(f".{NOW + 60}.", f".{NOW + 6000}."),
        "OTHERKEY": tokens.mint(b"z" * 32, MEDIA, "hls", NOW + 60),
        "UNKNOWNSCOPE": good.replace(".hls.", ".admin."),
    }
    tok = special.get(token, token) if token is not None else None
    check = tokens.verify(KEY, tok, media, scope, now)
    assert check.error is error
    assert not check.ok


def test_whep_scope_is_its_own() -> None:
    tok = tokens.mint(KEY, MEDIA, "whep", NOW + 60)
    assert tokens.verify(KEY, tok, MEDIA, "whep", NOW).ok
    assert tokens.verify(KEY, tok, MEDIA, "hls", NOW).error is TokenError.SCOPE


def test_key_and_mint_validation() -> None:
    with pytest.raises(ValueError, match="at least 32"):
        tokens.key_from_secret("short\n")
    assert tokens.key_from_secret("  " + "a" * 40 + "\n") == b"a" * 40
    with pytest.raises(ValueError, match="scope"):
        tokens.mint(KEY, MEDIA, "admin", NOW)
    with pytest.raises(ValueError, match="expires"):
        tokens.mint(KEY, MEDIA, "hls", -1)
