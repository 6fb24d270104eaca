"""A strict reader of Common Media Client Data (CMCD, CTA-5004 version 1).

Theory of operation. A player that sends CMCD puts one Structured Field dictionary (RFC 8941)
either in the ``CMCD`` query argument of each request (URL-encoded) or spread over four header
fields, ``CMCD-Object``, ``CMCD-Request``, ``CMCD-Session`` and ``CMCD-Status``. :func:`parse`
takes the query argument (already URL-decoded, as aiohttp's ``request.query`` gives it, or still
encoded with ``encoded=True``, as the fast path sees it) and :func:`parse_headers` the header
fields; both return a :class:`Cmcd` or a :class:`CmcdError`, never raise.

What is accepted, and nothing else:

* members ``key=value`` or a bare ``key`` (boolean true), separated by ``,`` with optional
  spaces or tabs around it (RFC 8941 section 4.2.2); a key is ``lcalpha *(lcalpha / DIGIT / "_"
  / "-" / "." / "*")`` of at most 64 characters, and no key twice (across the four headers too);
* values are RFC 8941 bare items: integers (at most 15 digits), decimals (12.3 digits), strings
  (``"`` quoted, printable ASCII, ``\\"`` and ``\\\\`` escapes), tokens and booleans
  (``?0``/``?1``); no parameters and no inner lists (CMCD version 2 syntax);
* the keys CTA-5004 defines are typed: ``bl br d dl mtp rtp tb v`` non-negative integers,
  ``pr`` a positive number, ``bs su`` booleans, ``ot sf st`` tokens of the spec's enumerations,
  ``cid sid`` strings of at most 64 characters, ``nor nrr`` strings of at most
  :data:`MAX_STRING` characters. ``v`` must be 1 when present. Other keys (custom keys, keys of
  later versions) are checked for syntax only and ignored;
* the whole input is at most :data:`MAX_VALUE` characters and at most :data:`MAX_MEMBERS`
  members.

hls.js 1.7.4 (``cmcd: {}``, version 1) sends, sorted by key: ``bl br bs cid d dl mtp nor ot pr
rtp sf sid st su tb`` (integers rounded as the spec asks, ``nor`` as a URL-encoded string,
``pr`` only when it is not 1, false booleans left out). CMCD comes from the viewer and is
believed for statistics only, never for access control.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple
from urllib.parse import unquote

MAX_VALUE = 4096  # the query argument, or the four header fields together
MAX_STRING = 1024  # ``nor``: a relative URL
MAX_ID = 64  # ``cid`` and ``sid`` (CTA-5004 section 3.3)
MAX_MEMBERS = 64
HEADERS = ("cmcd-object", "cmcd-request", "cmcd-session", "cmcd-status")

OBJECT_TYPES = frozenset(("m", "a", "v", "av", "i", "c", "tt", "k", "o"))
STREAMING_FORMATS = frozenset(("d", "h", "s", "o"))
# v: VOD, l: live; ll: low-latency live, as hls.js 1.7 sends for LL-HLS (CTA-5004's next
# version; hls.js takes it from the SVTA common media library).
STREAM_TYPES = frozenset(("v", "l", "ll"))
_INTEGERS = frozenset(("bl", "br", "d", "dl", "mtp", "rtp", "tb", "v"))
_BOOLEANS = frozenset(("bs", "su"))
_TOKENS = frozenset(("ot", "sf", "st"))
_STRINGS = {"cid": MAX_ID, "sid": MAX_ID, "nor": MAX_STRING, "nrr": MAX_STRING}

# The whole dictionary is checked by one regular expression (in C: the hot path pays a few
# microseconds), every known key with its own value type; the members are then read with a
# second, simpler one. RFC 8941 section 4.2.2, bare items only.
_KEY = r"[a-z*][a-z0-9_\-.*]{0,63}"
_INT = r"[0-9]{1,15}(?![0-9])"
_STR = r'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]++|\\["\\])*+"'
_ITEM = (
    rf"(?:-?[0-9]{{1,12}}\.[0-9]{{1,3}}(?![0-9])|-?{_INT}|{_STR}|\?[01]"
    r"|[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*)"
)
_KNOWN = "bl|br|bs|cid|d|dl|mtp|nor|nrr|ot|pr|rtp|sf|sid|st|su|tb|v"
_MEMBER = (
    rf"(?:(?:bl|br|d|dl|mtp|rtp|tb)={_INT}"
    r"|(?:bs|su)(?:=\?[01])?"
    r"|ot=(?:av|tt|[maivcko])|sf=[dhso]|st=(?:ll|[vl])"
    rf"|(?:cid|sid|nor|nrr)={_STR}"
    rf"|pr=(?:[0-9]{{1,12}}\.[0-9]{{1,3}}(?![0-9])|{_INT})"
    r"|v=0{0,14}1(?![0-9])"
    rf"|(?!(?:{_KNOWN})(?![a-z0-9_\-.*])){_KEY}(?:={_ITEM})?"
    r")(?=[ \t]*(?:,|$))"
)
_DICT = re.compile(rf" *{_MEMBER}(?:[ \t]*,[ \t]*{_MEMBER})*[ \t]*")
_PAIR = re.compile(r'([^=, \t]+)(?:=("[^"\\]*(?:\\.[^"\\]*)*"|[^, \t]*))?')
# hls.js percent-encodes with upper-case hex; these escapes are decoded by str.replace (in C),
# anything else by unquote_plus.
_ESCAPES = (
    ("%22", '"'), ("%2C", ","), ("%3D", "="), ("%2F", "/"), ("%3F", "?"), ("%3A", ":"),
    ("%26", "&"), ("%3B", ";"), ("%20", " "),
)  # fmt: skip
_STRAY = re.compile(r"%(?!25)")
_ESCAPED = re.compile(r"\\(.)")


class Cmcd(NamedTuple):
    """The CTA-5004 keys of one request (None or False: not sent). Units as the spec's:
    ``bl dl d`` milliseconds, ``br mtp rtp tb`` kbit/s. (A tuple: made for every request.)"""

    bl: int | None = None  # buffer length
    br: int | None = None  # encoded bitrate of the object
    bs: bool = False  # buffer starvation since the last request
    cid: str | None = None  # content id
    d: int | None = None  # object duration
    dl: int | None = None  # deadline
    mtp: int | None = None  # measured throughput
    nor: str | None = None  # next object request
    nrr: str | None = None  # next range request
    ot: str | None = None  # object type
    pr: float | None = None  # playback rate
    rtp: int | None = None  # requested maximum throughput
    sf: str | None = None  # streaming format
    sid: str | None = None  # session id
    st: str | None = None  # stream type
    su: bool = False  # startup (the player is starting or rebuffering)
    tb: int | None = None  # top bitrate
    v: int | None = None  # version


@dataclass(frozen=True, slots=True)
class CmcdError:
    """Input that is not CMCD as this module accepts it, and why (no part of it is used)."""

    reason: str


def parse(value: str, *, encoded: bool = False) -> Cmcd | CmcdError:
    """The CMCD of a ``CMCD`` query argument's value (``encoded``: still URL-encoded)."""
    if len(value) > (3 * MAX_VALUE if encoded else MAX_VALUE):
        return CmcdError("too long")
    if encoded:
        decoded = _unquote(value)
        if decoded is None:
            return CmcdError("not UTF-8")
        value = decoded
        if len(value) > MAX_VALUE:
            return CmcdError("too long")
    if _DICT.fullmatch(value) is None:
        return CmcdError("malformed")
    return _typed(_PAIR.findall(value))


def parse_headers(headers: Mapping[str, str]) -> Cmcd | CmcdError | None:
    """The CMCD of a request's ``CMCD-*`` header fields (``headers``: case-insensitive, as
    aiohttp's, or with lower-case names, as the fast path's); None when there is none."""
    values = [v for h in HEADERS if (v := headers.get(h)) is not None]
    if not values:
        return None
    if sum(len(v) for v in values) > MAX_VALUE:
        return CmcdError("too long")
    pairs: list[tuple[str, str]] = []
    for v in values:
        if _DICT.fullmatch(v) is None:
            return CmcdError("malformed")
        pairs += _PAIR.findall(v)
    return _typed(pairs)


def _unquote(value: str) -> str | None:
    """``value`` URL-decoded (None: not UTF-8)."""
    if "+" in value:
        value = value.replace("+", " ")
    if "%" not in value:
        return value
    for escape, char in _ESCAPES:
        if escape in value:
            value = value.replace(escape, char)
    if _STRAY.search(value) is None:
        return value.replace("%25", "%")
    try:
        return unquote(value, errors="strict")
    except UnicodeDecodeError:
        return None


def _string(limit: int) -> Callable[[str], str]:
    def read(raw: str) -> str:
        text = raw[1:-1]
        if "\\" in text:
            text = _ESCAPED.sub(r"\1", text)
        if len(text) > limit:
            raise ValueError(f"a string longer than {limit} characters")
        return text

    return read


def _rate(raw: str) -> float:
    pr = float(raw)
    if not 0 < pr <= 100:
        raise ValueError("pr is not a positive number")
    return pr


def _flag(raw: str) -> bool:
    return raw != "?0"


def _token(raw: str) -> str:
    return raw


# How each known key's checked value is read (the regular expression checked its form).
_READ: dict[str, Callable[[str], int | float | str | bool]] = {
    **dict.fromkeys(_INTEGERS, int),
    **dict.fromkeys(_BOOLEANS, _flag),
    **dict.fromkeys(_TOKENS, _token),
    **{k: _string(n) for k, n in _STRINGS.items()},
    "pr": _rate,
}


def _typed(pairs: list[tuple[str, str]]) -> Cmcd | CmcdError:
    """The :class:`Cmcd` of checked members: (key, raw value) pairs."""
    if len(pairs) > MAX_MEMBERS:
        return CmcdError("too many keys")
    if len({k for k, _ in pairs}) != len(pairs):
        return CmcdError("a key twice")
    try:
        fields = {k: read(raw) for k, raw in pairs if (read := _READ.get(k)) is not None}
        return Cmcd(**fields)  # type: ignore[arg-type]
    except ValueError as exc:
        return CmcdError(str(exc))
