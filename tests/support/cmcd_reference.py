"""A straightforward reader of CMCD, member by member, kept to check the one-regex reader of
:mod:`peerd.core.cmcd` against (tests/test_cmcd.py fuzzes both with the same inputs). Same
contract: a :class:`~peerd.core.cmcd.Cmcd` or a :class:`~peerd.core.cmcd.CmcdError`."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import unquote_plus

from peerd.core.cmcd import Cmcd, CmcdError

MAX_VALUE = 4096  # as peerd.core.cmcd  # the query argument, or the four header fields together
MAX_STRING = 1024  # ``nor``: a relative URL
MAX_ID = 64  # ``cid`` and ``sid`` (CTA-5004 section 3.3)
MAX_MEMBERS = 64
HEADERS = ("cmcd-object", "cmcd-request", "cmcd-session", "cmcd-status")

OBJECT_TYPES = frozenset(("m", "a", "v", "av", "i", "c", "tt", "k", "o"))
STREAMING_FORMATS = frozenset(("d", "h", "s", "o"))
STREAM_TYPES = frozenset(("v", "l", "ll"))
_INTEGERS = frozenset(("bl", "br", "d", "dl", "mtp", "rtp", "tb", "v"))
_BOOLEANS = frozenset(("bs", "su"))
_TOKENS = {"ot": OBJECT_TYPES, "sf": STREAMING_FORMATS, "st": STREAM_TYPES}
_STRINGS = {"cid": MAX_ID, "sid": MAX_ID, "nor": MAX_STRING, "nrr": MAX_STRING}

_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]{0,63}")
_INTEGER = re.compile(r"-?[0-9]{1,15}")
_DECIMAL = re.compile(r"-?[0-9]{1,12}\.[0-9]{1,3}")
_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*")
_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
_NUMBER_START = frozenset("-0123456789")


Item = int | float | str | bool
# Inside this module a refusal is a ValueError naming why; it never leaves it.
_Malformed = ValueError


def parse(value: str, *, encoded: bool = False) -> Cmcd | CmcdError:
    """The CMCD of a ``CMCD`` query argument's value (``encoded``: still URL-encoded)."""
    if len(value) > (3 * MAX_VALUE if encoded else MAX_VALUE):
        return CmcdError("too long")
    if encoded:
        try:
            value = unquote_plus(value, errors="strict")
        except UnicodeDecodeError:
            return CmcdError("not UTF-8")
        if len(value) > MAX_VALUE:
            return CmcdError("too long")
    try:
        return _typed(_members(value, {}))
    except _Malformed as exc:
        return CmcdError(str(exc))


def parse_headers(headers: Mapping[str, str]) -> Cmcd | CmcdError | None:
    """The CMCD of a request's ``CMCD-*`` header fields (``headers``: case-insensitive, as
    aiohttp's, or with lower-case names, as the fast path's); None when there is none."""
    values = [v for h in HEADERS if (v := headers.get(h)) is not None]
    if not values:
        return None
    if sum(len(v) for v in values) > MAX_VALUE:
        return CmcdError("too long")
    found: dict[str, Item] = {}
    try:
        for v in values:
            _members(v, found)
        return _typed(found)
    except _Malformed as exc:
        return CmcdError(str(exc))


def _members(text: str, into: dict[str, Item]) -> dict[str, Item]:
    """RFC 8941 section 4.2.2 for a dictionary of bare items, into ``into``."""
    n = len(text)
    i = 0
    while i < n and text[i] == " ":
        i += 1
    if i == n:
        raise _Malformed("empty")
    while True:
        m = _KEY.match(text, i)
        if m is None:
            raise _Malformed("bad key")
        key = m.group()
        i = m.end()
        if i < n and text[i] == "=":
            item, i = _item(text, i + 1)
        else:
            item = True
        if i < n and text[i] == ";":
            raise _Malformed("parameters are not CMCD version 1")
        if key in into:
            raise _Malformed(f"key {key} twice")
        if len(into) >= MAX_MEMBERS:
            raise _Malformed("too many keys")
        into[key] = item
        while i < n and text[i] in " \t":
            i += 1
        if i == n:
            return into
        if text[i] != ",":
            raise _Malformed("expected a comma")
        i += 1
        while i < n and text[i] in " \t":
            i += 1
        if i == n:
            raise _Malformed("trailing comma")


def _item(text: str, i: int) -> tuple[Item, int]:
    """The bare item at ``text[i]`` and the index after it."""
    if i >= len(text):
        raise _Malformed("missing value")
    c = text[i]
    if c in _NUMBER_START:
        m = _DECIMAL.match(text, i)
        if m is not None:
            return float(m.group()), m.end()
        m = _INTEGER.match(text, i)
        if m is None:
            raise _Malformed("bad number")
        end = m.end()
        if end < len(text) and text[end].isdigit():
            raise _Malformed("integer too long")
        return int(m.group()), end
    if c == '"':
        m = _STRING.match(text, i)
        if m is None:
            raise _Malformed("bad string")
        return m.group(1).replace('\\"', '"').replace("\\\\", "\\"), m.end()
    if c == "?":
        flag = text[i + 1 : i + 2]
        if flag not in ("0", "1"):
            raise _Malformed("bad boolean")
        return flag == "1", i + 2
    if c == "(":
        raise _Malformed("inner lists are not CMCD version 1")
    m = _TOKEN.match(text, i)
    if m is None:
        raise _Malformed("bad value")
    return _Token(m.group()), m.end()


class _Token(str):
    """A token, told apart from a string of the same text."""

    __slots__ = ()


def _typed(found: Mapping[str, Item]) -> Cmcd:
    """The :class:`Cmcd` of parsed members, each known key checked against its type."""
    fields: dict[str, Item] = {}
    for key, item in found.items():
        if key in _INTEGERS:
            if type(item) is not int or item < 0:
                raise _Malformed(f"{key} is not a non-negative integer")
        elif key in _BOOLEANS:
            if type(item) is not bool:
                raise _Malformed(f"{key} is not a boolean")
        elif key in _TOKENS:
            if not isinstance(item, _Token) or item not in _TOKENS[key]:
                raise _Malformed(f"{key} is not one of its tokens")
            item = str(item)
        elif key in _STRINGS:
            if type(item) is not str or len(item) > _STRINGS[key]:
                raise _Malformed(f"{key} is not a string of at most {_STRINGS[key]} characters")
        elif key == "pr":
            if type(item) not in (int, float) or not 0 < item <= 100:  # type: ignore[operator]
                raise _Malformed("pr is not a positive number")
            item = float(item)
        else:
            continue  # a custom key, or one of a later version: ignored
        fields[key] = item
    if fields.get("v", 1) != 1:
        raise _Malformed("not CMCD version 1")
    return Cmcd(**fields)  # type: ignore[arg-type]
