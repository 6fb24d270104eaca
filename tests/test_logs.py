"""Log lines never carry tokens: query values, credential headers, JWTs and peerd tokens are
masked in the message, in extra fields and in tracebacks, in both output formats."""

from __future__ import annotations

import io
import logging

import pytest

from peerd.core import tokens
from peerd.logs import setup_logging

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ2aWV3ZXIifQ.c2lnbmF0dXJlc2VjcmV0"
PEERD = tokens.mint(b"k" * 32, "bmedia", "hls", 1_900_000_000)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_tokens_are_redacted_in_message_fields_and_tracebacks(fmt: str) -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    setup_logging("info", fmt, out)
    log = logging.getLogger("peerd.test")
    try:
        log.info(
            "GET /hls/b/v0.m3u8?token=SECRET1&x=1 headers %s", {"Authorization": "Bearer SECRET2"}
        )
        log.info("bare tokens %s and %s", JWT, PEERD, extra={"url": "/w?sig=SECRET3", "h": JWT})
        try:
            raise ValueError("bad line b'GET /a?token=SECRET4 HTTP/1.1\\r\\nCookie: SECRET5'")
        except ValueError:
            log.exception("failed")
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    text = out.getvalue()
    for secret in ("SECRET", JWT.split(".")[1], PEERD.rsplit(".", 1)[1]):
        assert secret not in text
    assert "token=[redacted]&x=1" in text  # the rest of the line is kept
    assert "Traceback" in text
