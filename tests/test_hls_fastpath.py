"""The HLS fast path (peerd.http.fastpath) on raw connections: what it answers itself, what it
hands to aiohttp mid-connection (and that aiohttp then answers as before), pipelining, limits.

Every test of tests/test_hls.py runs with the fast path on and off; these tests pin down the
split, the byte-level behaviour, and that both ways give the same answers."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hls_node import KEY, Node, run_node

from peerd.core import tokens
from peerd.core.ids import Cid, cid_of
from tests.support.hlsmedia import make_hls


@pytest.fixture(scope="session")
def playlists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny MPEG-TS rendition, made once per session."""
    root = tmp_path_factory.mktemp("fastmedia")
    return {"ts": make_hls(root / "ts", "ts")}


@pytest.fixture
async def node(tmp_path: Path, playlists: dict[str, Path]) -> AsyncIterator[Node]:
    async with run_node(tmp_path, playlists) as n:
        yield n


class Conn:
    """One raw HTTP/1.1 connection to the node."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, node: Node, base: str | None = None) -> Conn:
        host, port = (base or node.base).removeprefix("http://").split(":")
        r, w = await asyncio.open_connection(host, int(port))
        return cls(r, w)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def response(self, *, head: bool = False) -> tuple[int, dict[str, str], bytes]:
        """Status, headers (lower-case names) and body of the next response."""
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers[k.strip().lower()] = v.strip()
        n = 0 if head else int(headers.get("content-length", "0"))
        body = await asyncio.wait_for(self.reader.readexactly(n), 10)
        return status, headers, body

    async def closed(self) -> bool:
        """Whether the server closed the connection (EOF without a further response)."""
        return await asyncio.wait_for(self.reader.read(1), 10) == b""

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def _get(path: str, *extra: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: node", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _path(node: Node, name: str, token: str | None = "") -> str:
    return node.url("ts", name, token).removeprefix(node.base)


async def _warm(node: Node) -> list[str]:
    """Load the media (on a connection of its own); returns the blob paths of its playlist."""
    first = await Conn.open(node)
    first.send(_get(_path(node, "v0.m3u8")))
    status, _, body = await first.response()
    assert status == 200
    await first.close()
    return re.findall(r"^(b/b[a-z2-7]{58}\.ts)", body.decode(), re.M)


async def test_pipelined_requests_then_a_hand_off(node: Node) -> None:
    conn = await Conn.open(node)
    blobs = await _warm(node)
    before = node.answered
    # Four requests in one write: playlist, blob, HEAD of the blob, then /healthz (not HLS).
    conn.send(
        _get(_path(node, "v0.m3u8"))
        + _get(_path(node, blobs[0]))
        + _get(_path(node, blobs[0]), method="HEAD")
        + _get("/healthz")
    )
    status, h, body = await conn.response()
    assert status == 200
    assert h["content-type"] == "application/vnd.apple.mpegurl"
    assert h["cache-control"] == "max-age=2"
    assert h["access-control-allow-origin"] == "*"
    assert "date" in h
    assert "server" in h
    assert body.startswith(b"#EXTM3U")
    status, h, body = await conn.response()
    assert status == 200
    assert h["content-type"] == "video/mp2t"
    assert h["accept-ranges"] == "bytes"
    assert h["cache-control"] == "public, max-age=31536000, immutable"
    assert h["etag"] == f'"{blobs[0][2:-3]}"'  # the content id, the same on every node
    assert cid_of(body) == blobs[0][2:-3]
    status, hh, body = await conn.response(head=True)
    assert status == 200
    assert hh["content-length"] == h["content-length"]
    assert hh["etag"] == h["etag"]
    status, _, body = await conn.response()
    assert status == 200
    assert body == b'{"status": "ok"}'
    assert node.answered == before + 3
    # The connection is aiohttp's now, and still serves HLS.
    conn.send(_get(_path(node, blobs[1])))
    status, _, body = await conn.response()
    assert status == 200
    assert cid_of(body) == blobs[1][2:-3]
    assert node.answered == before + 3
    await conn.close()


async def test_fast_and_full_paths_send_the_same_headers(node: Node) -> None:
    fast, full = await Conn.open(node), await Conn.open(node)
    blobs = await _warm(node)
    for name in ("v0.m3u8", "master.m3u8", blobs[0]):
        path = _path(node, name)
        fast.send(_get(path))
        # A percent-encoded letter: the same URL to aiohttp's router, too unusual for the fast
        # path, so aiohttp answers it.
        full.send(_get(path.replace("/hls/b", "/hls/%62", 1)))
        before = node.answered
        s1, h1, b1 = await fast.response()
        assert node.answered == before + 1
        s2, h2, b2 = await full.response()
        assert node.answered == before + 1
        assert (s1, b1) == (s2, b2)
        h1.pop("date")
        h2.pop("date")
        assert h1 == h2
    await fast.close()
    await full.close()


async def test_with_and_without_the_fast_path_the_answers_are_the_same(node: Node) -> None:
    blobs = await _warm(node)
    forged = tokens.mint(b"not-the-key-0123456789abcdef", node.media["ts"], "hls", 2**31)
    answered_fast = [
        _get(_path(node, "master.m3u8")),
        _get(_path(node, "v0.m3u8")),
        _get(_path(node, "v0.m3u8"), method="HEAD"),
        _get(_path(node, blobs[0])),
        _get(_path(node, blobs[1]), method="HEAD"),
    ]
    handed_off = [
        _get(_path(node, blobs[0]), "Range: bytes=0-9"),
        _get(_path(node, blobs[0], token=forged)),
        _get(_path(node, "v9.m3u8")),
        _get(_path(node, f"b/{cid_of(b'not in the media')}.ts")),
        _get("/healthz"),
    ]
    before = node.answered
    for raw in answered_fast + handed_off:
        head = raw.startswith(b"HEAD")
        answers = []
        for base in (node.base, node.plain):  # each on a new connection, as a player's first
            conn = await Conn.open(node, base)
            conn.send(raw)
            status, headers, body = await conn.response(head=head)
            headers.pop("date")
            answers.append((status, headers, body))
            await conn.close()
        assert answers[0] == answers[1], raw
    assert node.answered == before + len(answered_fast)


async def test_refusals_come_from_the_full_path(node: Node) -> None:
    conn = await Conn.open(node)
    blobs = await _warm(node)
    before = node.answered
    denied = node.rt.metrics.registry.get_sample_value(
        "peerd_http_denied_total", {"reason": "signature"}
    )
    forged = tokens.mint(b"not-the-key-0123456789abcdef", node.media["ts"], "hls", 2**31)
    conn.send(_get(_path(node, blobs[0], token=forged)))
    status, h, body = await conn.response()
    assert status == 403
    assert body == b'{"error": "forbidden", "message": "forbidden"}'
    assert h["access-control-allow-origin"] == "*"
    after = node.rt.metrics.registry.get_sample_value(
        "peerd_http_denied_total", {"reason": "signature"}
    )
    assert (after or 0) == (denied or 0) + 1
    assert node.answered == before
    await conn.close()


@pytest.mark.parametrize(
    "extra",
    [
        ["Range: bytes=0-9"],
        ["If-None-Match: *"],
        ["Connection: close"],
        ["X-Bad: caf\u00e9"],
    ],
)
async def test_unusual_blob_requests_get_the_full_path(node: Node, extra: list[str]) -> None:
    conn = await Conn.open(node)
    blobs = await _warm(node)
    before = node.answered
    conn.send(_get(_path(node, blobs[0]), *extra))
    status, h, body = await conn.response(head="If-None-Match: *" in extra)
    assert node.answered == before
    if extra == ["Range: bytes=0-9"]:
        assert status == 206
        assert len(body) == 10
        assert h["content-range"].startswith("bytes 0-9/")
    elif extra == ["If-None-Match: *"]:
        assert status == 304
    else:
        assert status == 200
    if extra == ["Connection: close"]:
        assert await conn.closed()
    await conn.close()


async def test_a_head_trickling_in_and_bare_line_feeds(node: Node) -> None:
    conn = await Conn.open(node)
    await _warm(node)
    before = node.answered
    for byte in _get(_path(node, "v0.m3u8")):
        conn.send(bytes([byte]))
        await conn.writer.drain()
    status, _, body = await conn.response()
    assert status == 200
    assert body.startswith(b"#EXTM3U")
    assert node.answered == before + 1
    # Bare LF line ends: aiohttp's parser decides, as before the fast path existed.
    bare = f"GET {_path(node, 'v0.m3u8')} HTTP/1.1\nHost: node\n\n".encode()
    conn.send(bare)
    status, _, _ = await conn.response()
    assert node.answered == before + 1
    assert status in (200, 400)
    await conn.close()


async def test_header_limits_still_apply(node: Node) -> None:
    conn = await Conn.open(node)
    await _warm(node)
    before = node.answered
    conn.send(_get(_path(node, "v0.m3u8"), "X-Big: " + "a" * 70_000))
    status, _, _ = await conn.response()
    assert status in (400, 431)
    assert node.answered == before
    await conn.close()


async def test_blob_metrics_and_open_files(node: Node) -> None:
    conn = await Conn.open(node)
    blobs = await _warm(node)
    conn.send(_get(_path(node, blobs[0])) + _get(_path(node, blobs[0])))
    _, _, b1 = await conn.response()
    _, _, b2 = await conn.response()
    assert b1 == b2
    reg = node.rt.metrics.registry
    for _ in range(200):  # counted just after the last byte went to the kernel
        sent = reg.get_sample_value(
            "peerd_http_blob_bytes_total", {"source": "local", "status": "200"}
        )
        if sent == 2 * len(b1):
            break
        await asyncio.sleep(0.01)
    assert sent == 2 * len(b1)
    assert reg.get_sample_value("peerd_bytes_served_total", {"source": "local"}) == 2 * len(b1)
    assert reg.get_sample_value("peerd_http_active_streams") == 0
    route = "/hls/{media}/b/{cid}.{ext}"
    assert reg.get_sample_value("peerd_http_requests_total", {"route": route, "status": "200"})
    assert node.rt.access.drain()[blobs[0][2:-3]].hits == 2
    # A blob removed from disk is a miss again (the full path's resolver), not the open file.
    node.rt.store.path_for(Cid(blobs[0][2:-3])).unlink()
    before = node.answered
    conn.send(_get(_path(node, blobs[0])))
    status, _, _ = await conn.response()
    assert status == 404
    assert node.answered == before
    await conn.close()


async def test_idle_connections_close_after_the_keepalive_timeout(
    tmp_path: Path, playlists: dict[str, Path]
) -> None:
    http = {"keepalive_timeout_s": 0.2, "header_timeout_s": 0.2}
    async with run_node(tmp_path, playlists, http=http) as node:
        blobs = await _warm(node)
        before = node.answered
        conn = await Conn.open(node)
        conn.send(_get(_path(node, blobs[0])))
        status, _, _ = await conn.response()
        assert status == 200
        assert node.answered == before + 1
        assert await conn.closed()
        await conn.close()
        # A head that never completes: closed by the header timeout.
        conn = await Conn.open(node)
        conn.send(b"GET /hls/")
        assert await conn.closed()
        await conn.close()


async def test_shutdown_closes_idle_fast_connections(
    tmp_path: Path, playlists: dict[str, Path]
) -> None:
    async with run_node(tmp_path, playlists) as node:
        blobs = await _warm(node)
        conn = await Conn.open(node)
        conn.send(_get(_path(node, blobs[0])))
        status, _, _ = await conn.response()
        assert status == 200
        assert node.fast is not None
        assert node.fast.conns
    # run_node stopped the site and cleaned up the runner: the idle connection was closed.
    assert await conn.closed()
    assert node.fast is not None
    assert not node.fast.conns
    await conn.close()


async def test_concurrent_first_requests_open_a_blob_once(node: Node) -> None:
    blobs = await _warm(node)
    before = node.answered
    conns = [await Conn.open(node) for _ in range(8)]
    for c in conns:
        c.send(_get(_path(node, blobs[2])))
    bodies = [(await c.response())[2] for c in conns]
    assert {cid_of(b) for b in bodies} == {blobs[2][2:-3]}
    assert node.fast is not None
    assert node.fast.opened == 1
    assert node.answered == before + 8
    for c in conns:
        await c.close()


async def test_a_media_not_cached_is_loaded_and_the_connection_stays_fast(node: Node) -> None:
    node.routes._media.clear()  # as after a restart: no manifest in memory
    conn = await Conn.open(node)
    before = node.answered
    conn.send(_get(_path(node, "v0.m3u8")))
    status, _, body = await conn.response()
    assert status == 200
    assert body.startswith(b"#EXTM3U")
    blob = re.findall(r"^(b/b[a-z2-7]{58}\.ts)", body.decode(), re.M)[0]
    conn.send(_get(_path(node, blob)))
    status, _, body = await conn.response()
    assert status == 200
    assert cid_of(body) == blob[2:-3]
    assert node.answered == before + 2  # both answered here: nothing was handed off
    await conn.close()
    # A media that does not exist (with a token for it) is loaded once, then aiohttp's 404.
    ghost = cid_of(b"no such media")
    token = tokens.mint(KEY, ghost, "hls", 2**31)
    conn = await Conn.open(node)
    conn.send(_get(f"/hls/{ghost}/v0.m3u8?token={token}"))
    status, _, _ = await conn.response()
    assert status == 404
    assert node.answered == before + 2
    await conn.close()
    # No token, no catalog work: straight to the full path's 403.
    node.routes._media.clear()
    conn = await Conn.open(node)
    conn.send(_get(_path(node, "v0.m3u8", token=None)))
    status, _, _ = await conn.response()
    assert status == 403
    assert node.routes._media == {}
    await conn.close()


async def test_cmcd_requests_stay_on_the_fast_path(node: Node) -> None:
    """hls.js's CMCD query argument (percent-encoded, after the token) is answered here."""
    conn = await Conn.open(node)
    blobs = await _warm(node)
    cmcd = "bl%3D4200%2Cbr%3D1306%2Cot%3Dav%2Csid%3D%22a-b%22%2Csu"
    for name in ("v0.m3u8", blobs[0]):
        before = node.answered
        conn.send(_get(_path(node, name) + "&CMCD=" + cmcd))
        status, _, _ = await conn.response()
        assert status == 200
        assert node.answered == before + 1
    await conn.close()
