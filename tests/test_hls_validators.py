"""Validators and ranges of a real daemon's segments (RFC 9110), with curl and raw sockets, with
the HTTP fast path on and off; and the documented viewer 403 body against the one sent.

A blob's ETag is its content id (strong, the same on every node); ``bytes=-0`` is unsatisfiable
(416 with ``Content-Range: bytes */<size>``); an ``If-Range`` that does not match gets the whole
body (200), a matching one the part (206); ``If-None-Match`` with the ETag gets 304.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from peerd.config import load_settings
from peerd.core import tokens
from peerd.core.ids import cid_of
from peerd.http.access import DENIED_BODY
from peerd.runtime import open_runtime
from tests.support.process import PeerdProcess
from tests.support.r2media import hls_url
from tests.support.whep_media import HlsClip, add_media, make_hls

README = Path(__file__).resolve().parents[1] / "README.md"

Answer = tuple[int, dict[str, str], bytes]


@dataclass
class Served:
    """A running daemon and one media item's blobs."""

    node: PeerdProcess
    media_id: str
    segment: bytes
    init: bytes

    def url(self, path: str) -> str:
        return hls_url(self.node.base_url, self.node.state_dir, self.media_id, path)

    @property
    def seg_path(self) -> str:
        return f"b/{cid_of(self.segment)}.m4s"


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> HlsClip:
    return make_hls(tmp_path_factory.mktemp("validators") / "clip", seconds=4, audio=False)


@pytest.fixture(params=[True, False], ids=["fast_path", "full_path"])
async def served(
    request: pytest.FixtureRequest, tmp_path: Path, clip: HlsClip
) -> AsyncIterator[Served]:
    state = tmp_path / "node"
    node = PeerdProcess(state, config={"http": {"fast_path": request.param}})
    await asyncio.to_thread(node.init)
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        media_id = await add_media(rt, clip)
        await rt.catalog.set_state("clean_shutdown", "1")
    finally:
        await rt.close()
    assert clip.init is not None
    segment = await asyncio.to_thread(clip.segments[0].read_bytes)
    init = await asyncio.to_thread(clip.init.read_bytes)
    await asyncio.to_thread(node.start)
    try:
        yield Served(node, media_id, segment, init)
    finally:
        code = await asyncio.to_thread(node.stop)
        assert code == 0, node.logs()[-3000:]


def _curl(url: str, *headers: str, method: str = "GET") -> Answer:
    """The real curl CLI: status, headers (lower-case names), body."""
    curl = shutil.which("curl")
    assert curl, "curl (Debian package) is needed as the independent client"
    args = [curl, "-sS", "-i", "--http1.1", "-X", method]
    if method == "HEAD":
        args = [curl, "-sS", "-i", "--http1.1", "-I"]
    for h in headers:
        args += ["-H", h]
    out = subprocess.run([*args, url], capture_output=True, timeout=60, check=True).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    return _parse_head(head) + (body,)


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), fields


def _raw(url: str, *headers: str, method: str = "GET") -> Answer:
    """One request on a raw keep-alive socket, as a player sends it (the fast path's kind)."""
    u = urllib.parse.urlsplit(url)
    lines = [f"{method} {u.path}?{u.query} HTTP/1.1", f"Host: {u.netloc}", *headers]
    with socket.create_connection((u.hostname, u.port), timeout=30) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            assert chunk, data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status, fields = _parse_head(head)
        want = 0 if method == "HEAD" or status == 304 else int(fields["content-length"])
        while len(body) < want:
            chunk = s.recv(65536)
            assert chunk, (len(body), want)
            body += chunk
    return status, fields, body


CLIENTS = {"curl": _curl, "raw": _raw}


@pytest.mark.parametrize("client", CLIENTS)
async def test_segment_validators_and_ranges(served: Served, client: str) -> None:
    get = CLIENTS[client]
    seg, url = served.segment, served.url(served.seg_path)
    size = len(seg)
    etag = f'"{cid_of(seg)}"'

    status, h, body = await asyncio.to_thread(get, url)
    assert (status, body) == (200, seg)
    assert h["etag"] == etag  # strong, from the content: the same on every node
    assert "last-modified" not in h
    status, h, body = await asyncio.to_thread(get, url, method="HEAD")
    assert (status, h["etag"], int(h["content-length"])) == (200, etag, size)

    # A suffix range of length 0 is unsatisfiable.
    status, h, body = await asyncio.to_thread(get, url, "Range: bytes=-0")
    assert status == 416
    assert h["content-range"] == f"bytes */{size}"
    status, h, body = await asyncio.to_thread(get, url, "Range: bytes=-5")
    assert (status, body, h["content-range"]) == (
        206,
        seg[-5:],
        f"bytes {size - 5}-{size - 1}/{size}",
    )

    # If-Range: the part only if the validator is this blob's strong ETag; else all of it.
    for validator in ('"not-this-blob"', f"W/{etag}", "Tue, 01 Jan 2030 00:00:00 GMT"):
        status, h, body = await asyncio.to_thread(
            get, url, "Range: bytes=0-9", f"If-Range: {validator}"
        )
        assert (status, body) == (200, seg), validator
        assert "content-range" not in h
    status, h, body = await asyncio.to_thread(get, url, "Range: bytes=0-9", f"If-Range: {etag}")
    assert (status, body, h["content-range"]) == (206, seg[:10], f"bytes 0-9/{size}")

    # Conditional GETs.
    for tags in (etag, f"W/{etag}", f'"other", {etag}', "*"):
        status, h, body = await asyncio.to_thread(get, url, f"If-None-Match: {tags}")
        assert (status, body, h["etag"]) == (304, b"", etag), tags
    status, h, body = await asyncio.to_thread(get, url, 'If-None-Match: "other"')
    assert (status, body) == (200, seg)
    status, h, body = await asyncio.to_thread(get, url, 'If-Match: "other"')
    assert status == 412


async def test_init_segments_and_playlists(served: Served) -> None:
    init_url = served.url(f"b/{cid_of(served.init)}.mp4")
    for get in CLIENTS.values():
        status, h, body = await asyncio.to_thread(get, init_url)
        assert (status, body, h["etag"]) == (200, served.init, f'"{cid_of(served.init)}"')
        # A playlist names the viewer's token: no strong validator shared across viewers/nodes.
        status, h, body = await asyncio.to_thread(get, served.url("master.m3u8"))
        assert status == 200
        assert not h.get("etag", "W/").startswith('"')


def _documented_403() -> dict[str, str]:
    text = " ".join(README.read_text().split())
    m = re.search(r"all get the same bare `403 (\{[^`]*\})`", text)
    assert m, "README no longer quotes the viewer 403 body"
    return dict(json.loads(m.group(1)))


async def test_the_403_body_sent_is_the_documented_one(served: Served) -> None:
    assert _documented_403() == DENIED_BODY
    forged = tokens.mint(b"not-the-key-0123456789abcdef", served.media_id, "hls", 2**31)
    expired = tokens.mint(b"x" * 32, served.media_id, "hls", int(time.time()) - 10)
    base = f"{served.node.base_url}/hls/{served.media_id}"
    for url in (
        f"{base}/master.m3u8",
        f"{base}/{served.seg_path}?token={forged}",
        f"{base}/master.m3u8?token={expired}",
    ):
        for get in CLIENTS.values():
            status, _, body = await asyncio.to_thread(get, url)
            assert status == 403, url
            assert json.loads(body) == DENIED_BODY
    status, _, body = await asyncio.to_thread(
        _curl, f"{served.node.base_url}/whep/{served.media_id}", method="POST"
    )
    assert status == 403
    assert json.loads(body) == DENIED_BODY
