"""Structured logging: one JSON object per line on stdout (journald keeps it as the message).

Use stdlib loggers named ``peerd.<area>`` and pass fields with ``extra={...}``. Field names that
look like secrets are redacted, as a second line of defence: secrets should never reach a log call.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
_SECRET_HINTS = ("token", "secret", "password", "authorization", "signature", "key_material")


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
        return json.dumps(out, default=str, separators=(",", ":"))


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
        return line


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
