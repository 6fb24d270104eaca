"""The fast path's request-head reader (peerd.core.httphead), alone and synchronous: what it
takes, what it hands to aiohttp, and (fuzzed) that it never raises and never takes a head that
aiohttp's own parsers (C and Python) would refuse or read differently."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpRequestParserC, HttpRequestParserPy
from hypothesis import event, given, settings
from hypothesis import strategies as st

from peerd.core.httphead import HANDOFF, MAX_HEAD, MORE, REFUSED, Head, Limits, parse

LIMITS = Limits(max_line=200, max_field=120, max_headers=8)
PLAIN = b"GET /hls/m/v0.m3u8?token=a.b-c HTTP/1.1\r\nHost: node\r\nUser-Agent:  x y \r\n\r\n"


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_a_plain_head_and_the_next_pipelined_one() -> None:
    second = b"HEAD /b HTTP/1.1\r\nhost: n\r\nConnection: Keep-Alive\r\n\r\n"
    got = parse(PLAIN + second, LIMITS)
    assert got == Head(
        "GET", "/hls/m/v0.m3u8?token=a.b-c", {"host": "node", "user-agent": "x y"}, len(PLAIN)
    )
    assert isinstance(got, Head)
    nxt = parse((PLAIN + second)[got.size :], LIMITS)
    assert isinstance(nxt, Head)
    assert (nxt.method, nxt.target, nxt.size) == ("HEAD", "/b", len(second))


def test_every_prefix_of_a_plain_head_asks_for_more() -> None:
    for n in range(len(PLAIN)):
        assert parse(PLAIN[:n], LIMITS) is MORE, PLAIN[:n]


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nHost: n\r\n\r\n",
        b"get / HTTP/1.1\r\nHost: n\r\n\r\n",
        b"GET / HTTP/1.0\r\nHost: n\r\n\r\n",
        b"GET  / HTTP/1.1\r\nHost: n\r\n\r\n",
        b"GET /%62 HTTP/1.1\r\nHost: n\r\n\r\n",
        b"GET http://n/ HTTP/1.1\r\nHost: n\r\n\r\n",
        b"GET /\xc3\xa9 HTTP/1.1\r\nHost: n\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\nHost: n\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nHost: n\r\nHost: n\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: n\r\nX-A: 1\r\nx-a: 2\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost : n\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: n\r\nX-A: 1\r\n continued\r\n\r\n",  # obs-fold
        b"GET / HTTP/1.1\r\nHost: n\r\nX-A: caf\xc3\xa9\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: n\r\nX-A: a\x00b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: n\r\nX-A: a\rb\r\n\r\n",
        b"GET / HTTP/1.1\nHost: n\n\n",
        b"GET / HTTP/1.1\r\nHost: n\nX: y\r\n",  # a bare LF, head not complete yet
        b"GET / HTTP/1.1\r\nHost: n\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: n\r\nContent-Length: 0\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: n\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: n\r\nExpect: 100-continue\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: n\r\nUpgrade: websocket\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: n\r\nRange: bytes=0-1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: n\r\nIf-None-Match: *\r\n\r\n",
        b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: n\r\n\r\n",  # request line > max_line
        b"GET / HTTP/1.1\r\nHost: n\r\nX-A: " + b"a" * 120 + b"\r\n\r\n",  # field > max_field
        b"GET / HTTP/1.1\r\nHost: n\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(6)) + b"\r\n",
        b"GET / HTTP/1.1\r\nHost: n\r\nX-A: " + b"a" * MAX_HEAD,  # never ends
    ],
)
def test_anything_unusual_goes_to_aiohttp(head: bytes) -> None:
    assert parse(head, LIMITS) is HANDOFF


def _aiohttp(data: bytes, loop: asyncio.AbstractEventLoop) -> Iterator[Any]:
    """aiohttp's reading of ``data`` by each of its parsers (raises what they raise)."""
    for parser in (HttpRequestParserC, HttpRequestParserPy):
        p = parser(
            BaseProtocol(loop),  # no body is read: the protocol is only held
            loop,
            2**16,
            max_line_size=LIMITS.max_line,
            max_field_size=LIMITS.max_field,
            max_headers=LIMITS.max_headers,
        )
        messages, upgraded, _tail = p.feed_data(data)
        assert not upgraded
        yield [m for m, _payload in messages]


def test_at_the_limits_it_takes_only_what_aiohttp_takes(loop: asyncio.AbstractEventLoop) -> None:
    heads = [
        b"GET / HTTP/1.1\r\nHost: n\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(n)) + b"\r\n"
        for n in range(LIMITS.max_headers + 1)
    ]
    heads += [b"GET /" + b"a" * n + b" HTTP/1.1\r\nHost: n\r\n\r\n" for n in range(180, 200)]
    heads += [b"GET / HTTP/1.1\r\nHost: n\r\nX: " + b"a" * n + b"\r\n\r\n" for n in range(110, 120)]
    taken = 0
    for head in heads:
        got = parse(head, LIMITS)
        if isinstance(got, Head):
            taken += 1
            for messages in _aiohttp(head, loop):
                assert len(messages) == 1, head
    # 6 header lines at most (aiohttp counts the request line and the empty one), request
    # lines of up to 200 bytes (n <= 186), fields of up to 120 (n <= 117): 6 + 7 + 8.
    assert taken == 21


# Near-plain heads: mostly plain parts (method, version, fields, one Host among them), some odd
# ones, then maybe one edit cutting a few bytes somewhere and putting in one of ODD.
NAME = st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,8}", fullmatch=True).filter(
    lambda n: n.lower() not in {"host", "connection", *REFUSED}
)
VALUE = st.from_regex(r"([!-~]([ -~\t]{0,10}[!-~])?)?", fullmatch=True)
ODD_NAMES = [" Host", "Host ", "host", "X Y", "\u00c4", "", "X\x00", "Connection", "Range"]
ODD_VALUES = ["close", "keep-alive", "Keep-Alive", "a\rb", "caf\u00e9", "\x00", " \t "]
PLAIN_FIELD = st.tuples(NAME, st.just(": "), VALUE)
ODD_FIELD = st.tuples(
    NAME | st.sampled_from(ODD_NAMES),
    st.sampled_from([":", ": ", " :", ":\t", ":  ", ""]),
    VALUE | st.sampled_from(ODD_VALUES),
)
ODD_FIELDS = [
    ("Connection", ": ", "close"), ("Connection", ": ", "Keep-Alive"), ("Connection", ":", "x"),
    (" Host", ": ", "n"), ("Host ", ": ", "n"), ("X-A", " :", "1"), ("X-A", ": ", "a\rb"),
    ("X-A", ": ", "caf\u00e9"), ("X-A", ": ", "a\x00"), ("X-A", ": ", "a\x7f"), ("X-A", "", "1"),
    ("Range", ": ", "bytes=0-1"), ("Te", ": ", "trailers"), ("host", ": ", "m"),
]  # fmt: skip
ODD = [
    b"", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\r\n ", b"\x00", b"\xc3\xa9", b"%", b"#",
    b"Host: y\r\n", b"Range: bytes=0-1\r\n", b"Content-Length: 1\r\n",
]  # fmt: skip
TARGET = st.from_regex(r"/[A-Za-z0-9._~!$&'()*+,;=:@/?-]{0,14}", fullmatch=True)
PLAIN_PARTS: st.SearchStrategy[dict[str, Any]] = st.fixed_dictionaries(
    {
        "method": st.sampled_from(["GET", "HEAD"]),
        "target": TARGET,
        "version": st.just("HTTP/1.1"),
        "fields": st.lists(PLAIN_FIELD, max_size=7),
        "host_at": st.integers(0, 7),
        "odd_field": st.just(None),
        "edit": st.just(None),
    }
)
# At most one odd part per head, so that heads which are plain but for it are common.
ODDITIES: dict[str, st.SearchStrategy[Any]] = {
    "method": st.sampled_from(["POST", "get", "GET ", "OPTIONS", "PUT"]),
    "target": st.sampled_from(["/a%20b", "/a#b", "*", "a", "http://n/", "/a b", "/\u00e9"])
    | st.text("/ab?=&:@%#.-_~!$'()*+,; \t\x7f\u00e9", max_size=16),
    "version": st.sampled_from(["HTTP/1.0", "HTTP/2.0", "http/1.1", "HTTP/1.1 ", "HTTP/1.10"]),
    "odd_field": st.tuples(st.integers(0, 7), st.sampled_from(ODD_FIELDS) | ODD_FIELD),
    "edit": st.tuples(st.integers(0, 400), st.integers(0, 3), st.sampled_from(ODD)),
}


@st.composite
def heads(draw: st.DrawFn) -> dict[str, Any]:
    """A plain head's parts, with at most one of them odd."""
    parts = draw(PLAIN_PARTS)
    odd = draw(st.sampled_from([None, *ODDITIES]))
    if odd is not None:
        parts[odd] = draw(ODDITIES[odd])
    return parts


def _render(parts: Any) -> bytes:
    fields = parts["fields"]
    if parts["odd_field"] is not None:
        i, field = parts["odd_field"]
        fields = [*fields[:i], field, *fields[i:]]
    at = parts["host_at"]
    fields = [*fields[:at], ("Host", ": ", "node"), *fields[at:]]
    text = f"{parts['method']} {parts['target']} {parts['version']}\r\n"
    text += "".join(f"{n}{s}{v}\r\n" for n, s, v in fields)
    data = (text + "\r\n").encode("utf-8")
    if parts["edit"] is not None:
        pos, cut, odd = parts["edit"]
        pos %= len(data)
        data = data[:pos] + odd + data[pos + cut :]
    return data


@settings(max_examples=1000, deadline=None)
@given(heads(), st.binary(max_size=8))
def test_never_takes_what_aiohttp_would_refuse_or_read_otherwise(
    loop: asyncio.AbstractEventLoop, parts: Any, tail: bytes
) -> None:
    data = _render(parts)
    got = parse(data + tail, LIMITS)
    assert got is MORE or got is HANDOFF or isinstance(got, Head)
    event("taken" if isinstance(got, Head) else "handed off")
    if not isinstance(got, Head):
        return
    # An edit may have ended the head early: the bytes after it are the next request's.
    assert got.size <= len(data)
    for messages in _aiohttp(data[: got.size], loop):
        assert len(messages) == 1
        msg = messages[0]
        assert (msg.method, msg.path, tuple(msg.version)) == (got.method, got.target, (1, 1))
        assert not msg.should_close
        assert {k.lower(): v for k, v in msg.headers.items()} == dict(got.headers)
        assert len(msg.headers) == len(got.headers)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(data: bytes) -> None:
    got = parse(data, LIMITS)
    assert got is MORE or got is HANDOFF or isinstance(got, Head)
    got = parse(PLAIN[:40] + data, LIMITS)
    assert got is MORE or got is HANDOFF or isinstance(got, Head)
