"""A strict, sans-I/O reader of HTTP/1.1 request heads, for the HLS fast path.

Theory of operation. A connection's received bytes sit in a buffer; :func:`parse` looks at its
start and gives one of three answers:

* a :class:`Head`: one complete, *plain* request head (and its length: bytes after it are the
  next pipelined request, since a plain request has no body);
* ``MORE``: no complete head yet and nothing unusual so far: read more bytes;
* ``HANDOFF``: anything else. The bytes go, untouched, to aiohttp's parser, which decides:
  it answers 400 or 431, applies its own limits, or serves the request in full.

Plain means all of this, and nothing in it is repaired or guessed:

* a request line ``GET|HEAD SP target SP HTTP/1.1 CRLF``, at most ``max_line`` bytes, no empty
  line before it; the target in origin form of only unreserved, sub-delim, ``:``, ``@``,
  ``/`` and ``?`` characters, and in the query (after the first ``?``) percent-encoded
  octets too (no ``%`` in the path: decoding a path is aiohttp's);
* header lines ``name ":" OWS value OWS CRLF`` with a token name, a value of visible ASCII with
  inner spaces or tabs, each line at most ``max_field`` bytes and at most ``max_headers - 2``
  of them (aiohttp counts the request line and the final empty line too); no line folding, no
  bare CR or LF anywhere; the head within :data:`MAX_HEAD` bytes;
* exactly one ``Host``, no header name twice, ``Connection`` only ``keep-alive``, and none of
  :data:`REFUSED` (bodies, upgrades, ranges and conditions are aiohttp's to implement).

Whatever is not plain is a hand-off, never an error: this module cannot refuse a request, so it
cannot refuse one aiohttp would have served, and it accepts nothing aiohttp would refuse.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

MAX_HEAD = 16 * 1024  # players send ~0.5 KiB; an Access JWT and its cookie ~4 KiB more
# Header fields that make a request aiohttp's business: message framing, upgrades, and what
# the full path's blob answers implement (ranges, conditions: peerd.core.validators).
REFUSED = frozenset(
    (
        "content-length", "transfer-encoding", "te", "trailer", "upgrade", "expect",
        "http2-settings", "range", "if-range", "if-match", "if-none-match",
        "if-modified-since", "if-unmodified-since",
    )
)  # fmt: skip
# A query may hold percent-encoded octets (a player's CMCD argument); a path may not.
_LINE = re.compile(
    rb"(GET|HEAD) (/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*"
    rb"(?:\?(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]++|%[0-9A-Fa-f]{2})*+)?) HTTP/1\.1"
)
# One header line: a token name, the value of visible ASCII with inner spaces or tabs (the
# optional whitespace around it is not the value's), CRLF.
_FIELD = (
    rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*"
    rb"((?:[\x21-\x7e](?:[\x20-\x7e\t]*[\x21-\x7e])?)?)[ \t]*\r\n"
)
_ONE_FIELD = re.compile(_FIELD)
_FIELDS = re.compile(b"(?:" + _FIELD + b")*")


class Verdict(enum.Enum):
    """:func:`parse`'s answer when it has no :class:`Head`."""

    MORE = "more"
    HANDOFF = "handoff"


MORE = Verdict.MORE
HANDOFF = Verdict.HANDOFF


@dataclass(frozen=True)
class Limits:
    """aiohttp's limits for request heads (``[http] max_line_size`` and friends)."""

    max_line: int = 8190
    max_field: int = 8190
    max_headers: int = 64


class Head(NamedTuple):
    """A plain request head (a tuple: built for every request, it must be cheap)."""

    method: str  # "GET" or "HEAD"
    target: str
    headers: Mapping[str, str]  # lower-case names; values without surrounding whitespace
    size: int  # bytes of the head, its final CRLF CRLF included


def parse(buf: bytes | bytearray, limits: Limits) -> Head | Verdict:
    """The plain request head at the start of ``buf``, ``MORE`` or ``HANDOFF``."""
    end = buf.find(b"\r\n\r\n", 0, MAX_HEAD)
    if end < 0:
        if not buf:
            return MORE  # asked after every answer: nothing pipelined, most of the time
        if len(buf) >= MAX_HEAD:
            return HANDOFF
        # Only a CR at the very end may still become a CRLF.
        stray = bytes(buf).removesuffix(b"\r").replace(b"\r\n", b"")
        return HANDOFF if b"\r" in stray or b"\n" in stray else MORE
    head = bytes(buf[: end + 2])  # the request line and the fields, each with its CRLF
    at = head.find(b"\r\n")
    block = head[at + 2 :]
    line = _LINE.fullmatch(head, 0, at)
    if (
        line is None
        or at > limits.max_line
        or block.count(b"\r\n") > limits.max_headers - 2
        or (
            len(block) > limits.max_field and max(map(len, block.split(b"\r\n"))) > limits.max_field
        )
        or _FIELDS.fullmatch(block) is None
    ):
        return HANDOFF
    fields = _ONE_FIELD.findall(block)
    headers = {name.decode("ascii").lower(): value.decode("ascii") for name, value in fields}
    if (
        len(headers) != len(fields)  # a name twice
        or "host" not in headers
        or not REFUSED.isdisjoint(headers)
        or headers.get("connection", "keep-alive").lower() != "keep-alive"
    ):
        return HANDOFF
    method, target = line.groups()
    return Head(method.decode("ascii"), target.decode("ascii"), headers, end + 4)
