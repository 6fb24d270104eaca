"""Structured logging: one JSON object per line on stdout (journald keeps it as the message).

Use stdlib loggers named ``peerd.<area>`` and pass fields with ``extra={...}``. Field names that
look like secrets are redacted, as a second line of defence: secrets should never reach a log call.
A third line: every rendered line (message, fields, traceback, and what libraries log: aiohttp
quotes request lines in its errors) goes through :func:`redact`, which masks ``token=`` query
values, credential header values and anything shaped like a JWT or a peerd viewer token.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any, TextIO

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_SECRET_HINTS = ("token", "secret", "password", "authorization", "signature", "key_material")
REDACTED = "[redacted]"
# A value ends at a separator of the query, of a quoted repr or JSON string, or of the line.
_VALUE = r"[^&\s'\"\\,;<>#]+"
_SECRETS = re.compile(
    # ?token=..., &access_token=..., sig=... in URLs and request lines
    rf"(?P<q>[?&;](?:[a-z_]*token|jwt|sig|signature|key)=){_VALUE}"
    # Authorization: Bearer ..., 'cf-access-jwt-assertion': '...', Cookie: ... (header or repr)
    # (after a word boundary, or after the two characters \n of a quoted head)
    r"|(?P<h>(?:\b|(?<=\\n))(?:authorization|proxy-authorization|cf-access-jwt-assertion|cookie|"
    r"cf_authorization|x-api-key)\b['\"]?\s*[:=]\s*['\"]?)[^'\"\\\r\n,;}]+"
    # a JWT (base64url JSON header starting '{"') and a peerd token (peerd/core/tokens.py)
    r"|eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*"
    r"|\bv\d+\.[a-z]+\.\d{1,12}\.[A-Za-z0-9_-]{20,}",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """``text`` with token query values, credential header values and tokens masked."""
    return _SECRETS.sub(_mask, text)


def _mask(m: re.Match[str]) -> str:
    return (m.group("q") or m.group("h") or "") + REDACTED


def _redact(key: str, value: Any) -> Any:
    lowered = key.lower()
    if any(h in lowered for h in _SECRET_HINTS):
        return "[redacted]"
    return value


class JsonFormatter(logging.Formatter):
    """Formats records as compact JSON with ts, level, logger, msg and extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record."""
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = _redact(key, value)
        if record.exc_info and record.exc_info[0] is not None:
            out["exc"] = self.formatException(record.exc_info)
        return redact(json.dumps(out, default=str, separators=(",", ":")))


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal, extra fields as key=value."""

    def format(self, record: logging.LogRecord) -> str:
        """Render one record."""
        base = f"{record.levelname.lower():7} {record.name}: {record.getMessage()}"
        extras = [
            f"{k}={_redact(k, v)}"
            for k, v in record.__dict__.items()
            if k not in _STANDARD and not k.startswith("_")
        ]
        line = base + (" " + " ".join(extras) if extras else "")
        if record.exc_info and record.exc_info[0] is not None:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


def setup_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    """Configure the root logger once for the process."""
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # libp2p turns off its logger's propagation at import; peerd wants one stream.
    logging.getLogger("libp2p").propagate = True
    for noisy in (
        "aiohttp.access",
        "aiosqlite",
        "botocore",
        "boto3",
        "urllib3",
        "aioice",
        "aiortc",
    ):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
