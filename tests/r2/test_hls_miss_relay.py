"""A blob the node lacks, relayed from the bucket on the HTTP fast path (peerd.http.fastpath).

An in-process HLS node (``hls_node.run_node``) whose media blobs were moved to the bucket (moto,
reached through the FaultProxy) and dropped locally, as tiering leaves a cold item; its resolver
has the R2 source only. A plain GET of a missing blob is then answered by the fast path's relay
(``FastPath.answered`` tells the paths apart): the head and every chunk the resolver's tee
releases go into the viewer's socket from the bucket connection's own callback. What is checked
here: exact bytes, the blob stored and verified afterwards, the same headers as the full path's
streamed answer, the fall-back to the full path when nothing could be sent (404), cut and forged
upstream bodies (never a complete body for the viewer, nothing stored), one upstream GET for many
viewers, a viewer that reads slowly, the metrics, and blobs delivered whole by a source that does
not stream (served from the stored file) or already held when the stream started (the tail from
the file).

Blobs bigger than the test media's segments (~100 KB) are added to the media's cached blob map,
as its manifest would list them, so that a relay spans many upstream chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hls_node import Node, run_node

from peerd.core.ids import Cid, cid_of
from peerd.delivery.resolver import Resolver
from peerd.delivery.source import Offer, Source
from peerd.http import fastpath
from peerd.replication.r2 import R2Client, blob_key
from peerd.replication.source import R2Source
from peerd.store import BlobStore
from peerd.testing.faultproxy import Fault, FaultProxy, method_is
from peerd.testing.hlsmedia import make_hls
from peerd.testing.poll import until
from peerd.testing.s3server import MotoServer
from peerd.testing.sources import MemorySource

KIB = 1024
MIB = 1024 * KIB
BLOB_ROUTE = "/hls/{media}/b/{cid}.{ext}"


@pytest.fixture(scope="module")
def playlists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny MPEG-TS rendition (three segments of ~100 KB)."""
    return {"ts": make_hls(tmp_path_factory.mktemp("relaymedia") / "ts", "ts")}


@dataclass
class Cold:
    """A node whose media's blobs are only in the bucket (or, without R2, nowhere)."""

    node: Node
    resolver: Resolver
    media: Any  # the media as the HLS routes cache it (hls._Media)
    blobs: dict[str, bytes]  # the media's own blobs, no longer held locally
    moto: MotoServer | None = None
    bucket: str = ""

    @property
    def fast(self) -> fastpath.FastPath:
        return self.node.fast

    def path(self, cid: str) -> str:
        """The signed request target of a blob of the media."""
        return self.node.url("ts", f"b/{cid}.ts").removeprefix(self.node.base)

    async def add_blob(self, data: bytes, *, stored: bytes | None = None) -> str:
        """A blob of the media held only in the bucket (``stored``: other bytes under its key)."""
        cid = cid_of(data)
        self.media.blobs[cid] = "ts"
        assert self.moto is not None
        await asyncio.to_thread(
            self.moto.put, self.bucket, blob_key(cid), data if stored is None else stored
        )
        return cid

    async def held(self, cid: str) -> bytes | None:
        """The blob's stored bytes (checked against the cid), or None if not held."""
        store = self.node.rt.store
        if not await store.has(Cid(cid)):
            assert not store.path_for(Cid(cid)).exists()
            return None
        data = await store.read(Cid(cid))
        assert cid_of(data) == cid
        return data

    def sample(self, name: str, **labels: str) -> float:
        return self.node.rt.metrics.registry.get_sample_value(name, labels) or 0.0

    async def settled(self) -> None:
        """Wait for the resolver's fetches in flight."""
        tasks = list(self.resolver._tee_tasks)
        if tasks:
            await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)


@contextlib.asynccontextmanager
async def cold_node(
    tmp_path: Path, playlists: dict[str, Path], sources: list[Source], **kw: Any
) -> AsyncIterator[Cold]:
    """``run_node`` with the media's blobs dropped locally (first put in the bucket, if any)."""
    moto: MotoServer | None = kw.pop("moto", None)
    bucket: str = kw.pop("bucket", "")
    async with run_node(tmp_path, playlists, http={"prefetch_segments": 0}) as node:
        store = node.rt.store
        media = await node.routes.media(node.media["ts"])
        blobs: dict[str, bytes] = {}
        for cid in list(media.blobs):
            data = await store.read(Cid(cid))
            if moto is not None:
                await asyncio.to_thread(moto.put, bucket, blob_key(cid), data)
            await store.evict_local(Cid(cid))
            blobs[cid] = data
        resolver = Resolver(store, sources, registry=None)
        node.routes.resolver = resolver
        cold = Cold(node, resolver, media, blobs, moto, bucket)
        try:
            yield cold
        finally:
            await cold.settled()


@pytest.fixture
async def cold(
    tmp_path: Path,
    playlists: dict[str, Path],
    client: R2Client,
    moto: MotoServer,
    bucket: str,
) -> AsyncIterator[Cold]:
    async with cold_node(tmp_path, playlists, [R2Source(client)], moto=moto, bucket=bucket) as c:
        yield c


class Viewer:
    """One raw HTTP/1.1 connection to the node."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, node: Node, *, rcvbuf: int | None = None) -> Viewer:
        host, port = node.base.removeprefix("http://").split(":")
        sock = socket.socket()
        if rcvbuf is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        r, w = await asyncio.open_connection(sock=sock)
        return cls(r, w)

    def get(self, path: str, *extra: str) -> None:
        lines = [f"GET {path} HTTP/1.1", "Host: node", *extra]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    async def head(self) -> tuple[int, list[tuple[str, str]]]:
        """Status and header lines (names as sent) of the next response."""
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        lines = raw.decode("latin-1").split("\r\n")
        headers = []
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers.append((k.strip(), v.strip()))
        return int(lines[0].split(" ")[1]), headers

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        status, lines = await self.head()
        headers = {k.lower(): v for k, v in lines}
        body = await asyncio.wait_for(
            self.reader.readexactly(int(headers.get("content-length", "0"))), 10
        )
        return status, headers, body

    async def until_closed(self) -> bytes:
        """Every byte up to the server's close (bounded)."""
        out = bytearray()
        while chunk := await asyncio.wait_for(self.reader.read(256 * KIB), 10):
            out += chunk
        return bytes(out)

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def lower(headers: list[tuple[str, str]]) -> dict[str, str]:
    return {k.lower(): v for k, v in headers}


def is_prefix(got: bytes, data: bytes) -> str:
    """ "" if ``got`` starts ``data``; else where it departs (a short, cheap failure message)."""
    if len(got) <= len(data) and got == data[: len(got)]:
        return ""
    step = 64 * KIB
    at = next(i for i in range(0, len(got), step) if got[i : i + step] != data[i : i + step])
    while at < min(len(got), len(data)) and got[at] == data[at]:
        at += 1
    return f"{len(got)} bytes; they depart from the blob at {at}: {got[at : at + 40]!r}"


def first_segment(cold: Cold) -> str:
    return next(cid for cid in cold.blobs if cold.media.blobs[cid] == "ts")


# -- the relay ---------------------------------------------------------------------------------


async def test_missing_blob_is_relayed_on_the_fast_path_then_held(
    cold: Cold, proxy: FaultProxy
) -> None:
    cid = first_segment(cold)
    data = cold.blobs[cid]
    assert await cold.held(cid) is None
    viewer = await Viewer.open(cold.node)
    before = cold.fast.answered
    viewer.get(cold.path(cid))
    status, h, body = await viewer.response()
    assert status == 200
    assert h["content-type"] == "video/mp2t"
    assert int(h["content-length"]) == len(data)
    assert body == data
    await until(lambda: cold.fast.answered == before + 1)
    await cold.settled()
    assert await cold.held(cid) == data
    assert proxy.count("GET", f"/blobs/{cid}") == 1
    # Held now: the same connection is answered from the file, with no second upstream GET.
    viewer.get(cold.path(cid))
    status, h, body = await viewer.response()
    assert (status, body) == (200, data)
    assert "etag" in h
    await until(lambda: cold.fast.answered == before + 2)
    assert proxy.count("GET", f"/blobs/{cid}") == 1
    await viewer.close()


async def test_relay_counts_bytes_under_the_r2_source(cold: Cold) -> None:
    data = await asyncio.to_thread(os.urandom, 3 * MIB + 17)
    cid = await cold.add_blob(data)
    requests = {"route": BLOB_ROUTE, "status": "200"}
    before = cold.sample("peerd_http_requests_total", **requests)
    viewer = await Viewer.open(cold.node)
    viewer.get(cold.path(cid))
    status, _, body = await viewer.response()
    assert (status, body == data) == (200, True)
    await until(
        lambda: cold.sample("peerd_http_blob_bytes_total", source="r2", status="200") == len(data)
    )
    assert cold.sample("peerd_bytes_served_total", source="r2") == len(data)
    assert cold.sample("peerd_http_blob_bytes_total", source="r2", status="cut") == 0
    assert cold.sample("peerd_bytes_served_total", source="local") == 0
    assert cold.sample("peerd_http_requests_total", **requests) == before + 1
    assert cold.sample("peerd_http_active_streams") == 0
    assert cold.node.routes.streams == 0
    await cold.settled()
    assert await cold.held(cid) == data
    await viewer.close()


async def test_relayed_headers_equal_the_full_paths_streamed_headers(
    cold: Cold, proxy: FaultProxy
) -> None:
    one = await asyncio.to_thread(os.urandom, 600 * KIB)
    two = await asyncio.to_thread(os.urandom, 700 * KIB)
    fast_cid, full_cid = await cold.add_blob(one), await cold.add_blob(two)
    fast, full = await Viewer.open(cold.node), await Viewer.open(cold.node)
    before = cold.fast.answered
    fast.get(cold.path(fast_cid))
    s1, h1 = await fast.head()
    b1 = await fast.reader.readexactly(len(one))
    await until(lambda: cold.fast.answered == before + 1)
    # A percent-encoded letter: the same URL to aiohttp's router, too unusual for the fast
    # path, so aiohttp's full path answers it: a GET of a missing blob, streamed from R2.
    full.get(cold.path(full_cid).replace("/hls/b", "/hls/%62", 1))
    s2, h2 = await full.head()
    b2 = await full.reader.readexactly(len(two))
    assert (s1, b1) == (200, one)
    assert (s2, b2) == (200, two)
    await asyncio.sleep(0.05)
    assert cold.fast.answered == before + 1  # the second one was not the fast path's
    assert lower(h1)["content-length"] == str(len(one))
    assert lower(h2)["content-length"] == str(len(two))
    assert "etag" not in lower(h2)  # streamed, not a FileResponse of a stored file

    def comparable(h: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return sorted(
            (k, "" if k.lower() == "content-length" else v) for k, v in h if k.lower() != "date"
        )

    assert comparable(h1) == comparable(h2)
    assert [k for k, _ in h1 if k.lower() == "date"] == [k for k, _ in h2 if k.lower() == "date"]
    assert proxy.count("GET", f"/blobs/{fast_cid}") == 1
    assert proxy.count("GET", f"/blobs/{full_cid}") == 1
    await fast.close()
    await full.close()


async def test_blob_missing_from_the_bucket_is_a_404_of_the_full_path_then_the_next_works(
    cold: Cold, proxy: FaultProxy
) -> None:
    nowhere = cid_of(b"not in the bucket")
    cold.media.blobs[nowhere] = "ts"
    cid = first_segment(cold)
    viewer = await Viewer.open(cold.node)
    before = cold.fast.answered
    viewer.get(cold.path(nowhere))
    status, h, body = await viewer.response()
    assert status == 404
    assert h["access-control-allow-origin"] == "*"
    assert b'"error": "not_found"' in body
    assert cold.fast.answered == before
    # The full path answered from the relay's fetch outcome: no second upstream GET.
    assert proxy.count("GET", f"/blobs/{nowhere}") == 1
    viewer.get(cold.path(cid))
    status, h, body = await viewer.response()
    assert (status, body) == (200, cold.blobs[cid])
    assert int(h["content-length"]) == len(body)
    await viewer.close()
    assert await cold.held(nowhere) is None


async def test_upstream_cut_mid_body_closes_the_viewer_short_and_keeps_nothing(
    cold: Cold, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    data = await asyncio.to_thread(os.urandom, 2 * MIB)
    cid = await cold.add_blob(data)
    proxy.add(method_is("GET", f"/blobs/{cid}"), Fault("cut", fraction=0.5), times=10**6)
    viewer = await Viewer.open(cold.node)
    before = cold.fast.answered
    with caplog.at_level(logging.WARNING, "peerd.http.hls"):
        viewer.get(cold.path(cid))
        status, h = await viewer.head()
        assert status == 200
        assert lower(h)["content-length"] == str(len(data))
        got = await viewer.until_closed()  # the node closes the connection
        await until(lambda: cold.fast.answered == before + 1)
    assert 0 < len(got) < len(data)  # (each resume is cut too)
    assert not (wrong := is_prefix(got, data)), wrong
    assert any(r.getMessage() == "blob relay cut" for r in caplog.records)
    await cold.settled()
    assert await cold.held(cid) is None
    await until(
        lambda: cold.sample("peerd_http_blob_bytes_total", source="r2", status="cut") == len(got)
    )
    assert cold.sample("peerd_http_blob_bytes_total", source="r2", status="200") == 0
    assert cold.sample("peerd_bytes_served_total", source="r2") == len(got)
    await viewer.close()


async def test_forged_object_never_reaches_a_viewer_whole_and_is_not_kept(
    cold: Cold, proxy: FaultProxy
) -> None:
    data = await asyncio.to_thread(os.urandom, 1 * MIB)
    forged = bytearray(data)
    forged[-1] ^= 1  # only the last byte differs: everything before it is the real blob
    cid = await cold.add_blob(data, stored=bytes(forged))
    viewer = await Viewer.open(cold.node)
    viewer.get(cold.path(cid))
    status, h = await viewer.head()
    assert status == 200
    assert lower(h)["content-length"] == str(len(data))
    got = await viewer.until_closed()
    assert len(got) < len(data)
    await cold.settled()
    assert await cold.held(cid) is None
    assert proxy.count("GET", f"/blobs/{cid}") == 1
    await viewer.close()


async def test_five_concurrent_viewers_share_one_upstream_get(
    cold: Cold, proxy: FaultProxy
) -> None:
    data = await asyncio.to_thread(os.urandom, 3 * MIB)
    cid = await cold.add_blob(data)
    viewers = [await Viewer.open(cold.node) for _ in range(5)]
    before = cold.fast.answered
    for v in viewers:
        v.get(cold.path(cid))
    answers = await asyncio.gather(*(v.response() for v in viewers))
    for status, h, body in answers:
        assert status == 200
        assert int(h["content-length"]) == len(data)
        assert body == data
    await until(lambda: cold.fast.answered == before + 5)
    assert proxy.count("GET", f"/blobs/{cid}") == 1
    await until(
        lambda: (
            cold.sample("peerd_http_blob_bytes_total", source="r2", status="200") == 5 * len(data)
        )
    )
    await cold.settled()
    assert await cold.held(cid) == data
    for v in viewers:
        await v.close()


async def test_a_slow_reading_viewer_gets_the_whole_body(
    cold: Cold, proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = await asyncio.to_thread(os.urandom, 6 * MIB)
    cid = await cold.add_blob(data)
    pauses = 0
    pause_writing = fastpath._Conn.pause_writing

    def counted(conn: fastpath._Conn) -> None:
        nonlocal pauses
        pauses += 1
        pause_writing(conn)

    monkeypatch.setattr(fastpath._Conn, "pause_writing", counted)
    viewer = await Viewer.open(cold.node, rcvbuf=32 * KIB)
    before = cold.fast.answered
    viewer.get(cold.path(cid))
    status, h = await viewer.head()
    assert status == 200
    assert lower(h)["content-length"] == str(len(data))
    got = bytearray()
    buffered = 0  # the most the node held for this viewer in its socket's write buffer
    while len(got) < len(data):
        got += await asyncio.wait_for(viewer.reader.read(64 * KIB), 10)
        for conn in cold.fast.conns:
            if conn.transport is not None:
                buffered = max(buffered, conn.transport.get_write_buffer_size())
        await asyncio.sleep(0.002)
    assert bytes(got) == data
    assert pauses > 0  # the relay did meet a full socket...
    assert buffered <= 512 * KIB  # ...and stopped writing (the tee keeps the rest)
    await until(lambda: cold.fast.answered == before + 1)
    await until(
        lambda: cold.sample("peerd_http_blob_bytes_total", source="r2", status="200") == len(data)
    )
    assert proxy.count("GET", f"/blobs/{cid}") == 1
    await cold.settled()
    assert await cold.held(cid) == data
    # The connection is still the fast path's and serves the next request.
    viewer.get(cold.path(cid))
    status, _, body = await viewer.response()
    assert (status, body) == (200, data)
    await until(lambda: cold.fast.answered == before + 2)
    await viewer.close()


# -- sources that do not stream ----------------------------------------------------------------


async def test_blob_from_an_untrusted_source_is_served_from_the_stored_file(
    tmp_path: Path, playlists: dict[str, Path]
) -> None:
    lan = MemorySource(name="lan")
    async with cold_node(tmp_path, playlists, [lan]) as c:
        cid = first_segment(c)
        data = c.blobs[cid]
        lan.blobs[Cid(cid)] = data
        viewer = await Viewer.open(c.node)
        before = c.fast.answered
        viewer.get(c.path(cid))
        status, h, body = await viewer.response()
        assert status == 200
        assert body == data
        assert int(h["content-length"]) == len(data)
        assert "etag" in h  # the stored file's answer
        await until(lambda: c.fast.answered == before + 1)
        assert lan.requests == [cid]
        await until(
            lambda: c.sample("peerd_http_blob_bytes_total", source="lan", status="200") == len(data)
        )
        assert c.sample("peerd_bytes_served_total", source="lan") == len(data)
        assert await c.held(cid) == data
        await viewer.close()


class _StoredFirst(MemorySource):
    """A trusted source (as R2 is) that sends one chunk and then nothing; the blob is stored
    by another fetch just before it offers, so the store takes no bytes from this one."""

    store: BlobStore | None = None
    yielded = 0  # chunks handed out

    async def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        data = self.blobs[cid]
        assert self.store is not None
        await self.store.put(data, expected=cid)
        yield Offer(self.name, "r2", self._one(data), size=len(data), meta={"trusted": "1"})

    async def _one(self, data: bytes) -> AsyncIterator[bytes]:
        self.yielded += 1
        yield data[: self.chunk]
        await asyncio.sleep(5)  # never more (the fetch closes this stream long before)
        self.yielded += 1
        yield data[self.chunk :]


async def test_stream_finished_from_the_file_when_the_store_already_held_the_blob(
    tmp_path: Path, playlists: dict[str, Path]
) -> None:
    r2 = _StoredFirst(name="r2", chunk=8 * KIB)
    async with cold_node(tmp_path, playlists, [r2]) as c:
        r2.store = c.node.rt.store
        cid = first_segment(c)
        data = c.blobs[cid]
        r2.blobs[Cid(cid)] = data
        viewer = await Viewer.open(c.node)
        before = c.fast.answered
        viewer.get(c.path(cid))
        status, h, body = await viewer.response()
        assert status == 200
        assert "etag" not in h  # the relay's head, sent before the blob was held
        assert body == data  # one chunk from the source, the rest from the stored file
        assert r2.yielded == 1
        await until(lambda: c.fast.answered == before + 1)
        assert await c.held(cid) == data
        await until(
            lambda: c.sample("peerd_http_blob_bytes_total", source="r2", status="200") == len(data)
        )
        await viewer.close()


# -- connections around a relay ----------------------------------------------------------------


async def test_pipelined_requests_around_relays_are_answered_in_order(cold: Cold) -> None:
    data = await asyncio.to_thread(os.urandom, 1 * MIB)
    cid = await cold.add_blob(data)
    seg = first_segment(cold)
    viewer = await Viewer.open(cold.node)
    before = cold.fast.answered
    playlist = cold.node.url("ts", "v0.m3u8").removeprefix(cold.node.base)
    viewer.get(cold.path(cid))
    viewer.get(playlist)
    viewer.get(cold.path(seg))
    status, _, body = await viewer.response()
    assert (status, body == data) == (200, True)
    status, h, body = await viewer.response()
    assert status == 200
    assert h["content-type"] == "application/vnd.apple.mpegurl"
    assert body.startswith(b"#EXTM3U")
    status, _, body = await viewer.response()
    assert (status, body == cold.blobs[seg]) == (200, True)
    await until(lambda: cold.fast.answered == before + 3)
    await viewer.close()


async def test_nothing_follows_a_cut_relay_on_its_connection(cold: Cold, proxy: FaultProxy) -> None:
    """A viewer that pipelined another request behind a blob whose relay was cut must get only
    a prefix of the blob and then the close: bytes of another answer after the cut body would
    be read as the rest of the blob (and could even complete its Content-Length)."""
    data = await asyncio.to_thread(os.urandom, 12 * MIB)
    cid = await cold.add_blob(data)
    proxy.add(method_is("GET", f"/blobs/{cid}"), Fault("cut", fraction=0.5), times=10**6)
    viewer = await Viewer.open(cold.node, rcvbuf=32 * KIB)
    before = cold.fast.answered
    playlist = cold.node.url("ts", "v0.m3u8").removeprefix(cold.node.base)
    viewer.get(cold.path(cid))
    for _ in range(3):
        viewer.get(playlist)
    # Not reading: the relay's bytes wait in the node's socket buffer when the cut comes.
    await until(lambda: cold.fast.answered > before)
    await cold.settled()
    status, h = await viewer.head()
    assert status == 200
    assert lower(h)["content-length"] == str(len(data))
    got = await viewer.until_closed()
    assert not (wrong := is_prefix(got, data)), wrong
    assert len(got) < len(data)
    assert cold.fast.answered == before + 1  # the playlists were not answered
    await viewer.close()


class _Gated(MemorySource):
    """A trusted source (as R2 is) that sends one chunk, then the rest once ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__(name="r2", chunk=64 * KIB)
        self.gate = asyncio.Event()

    async def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        data = self.blobs[cid]
        self.requests.append(cid)
        yield Offer(self.name, "r2", self._gated(data), size=len(data), meta={"trusted": "1"})

    async def _gated(self, data: bytes) -> AsyncIterator[bytes]:
        yield data[: self.chunk]
        await self.gate.wait()
        for i in range(self.chunk, len(data), self.chunk):
            yield data[i : i + self.chunk]


async def test_a_viewer_leaving_mid_relay_does_not_stop_the_fetch(
    tmp_path: Path, playlists: dict[str, Path]
) -> None:
    source = _Gated()
    async with cold_node(tmp_path, playlists, [source]) as c:
        cid = first_segment(c)
        data = c.blobs[cid]
        source.blobs[Cid(cid)] = data
        viewer = await Viewer.open(c.node)
        before = c.fast.answered
        viewer.get(c.path(cid))
        status, h = await viewer.head()
        assert status == 200
        assert lower(h)["content-length"] == str(len(data))
        first = await asyncio.wait_for(viewer.reader.readexactly(source.chunk), 10)
        assert first == data[: source.chunk]
        viewer.writer.transport.abort()  # gone, mid-body, while the fetch waits for more
        await until(lambda: c.fast.answered == before + 1)
        assert await c.held(cid) is None
        assert c.node.routes.streams == 0
        assert c.sample("peerd_http_active_streams") == 0
        source.gate.set()
        await c.settled()
        assert await c.held(cid) == data
        assert source.requests == [cid]
        assert c.sample("peerd_http_blob_bytes_total", source="r2", status="cut") == source.chunk


class _Silent(MemorySource):
    """A trusted source (as R2 is) whose answer does not come until ``gate`` is set."""

    def __init__(self) -> None:
        super().__init__(name="r2")
        self.gate = asyncio.Event()

    async def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        self.requests.append(cid)
        await self.gate.wait()
        data = self.blobs[cid]
        yield Offer(self.name, "r2", self._stream(data), size=len(data), meta={"trusted": "1"})


async def test_a_relay_timed_out_is_answered_503_without_waiting_again(
    tmp_path: Path, playlists: dict[str, Path]
) -> None:
    """The viewer waited ``request_timeout_s`` on the relay: the full path, handed the request,
    answers 503 at once instead of waiting on the same fetch for another timeout."""
    source = _Silent()
    async with cold_node(tmp_path, playlists, [source]) as c:
        cid = first_segment(c)
        data = c.blobs[cid]
        source.blobs[Cid(cid)] = data
        c.node.routes.timeout_s = 0.3
        joined: list[Cid] = []
        open_stream = c.resolver.open_stream

        async def counted(cid: Cid, *, known_absent: bool = False) -> Any:
            joined.append(cid)
            return await open_stream(cid, known_absent=known_absent)

        c.resolver.open_stream = counted  # type: ignore[method-assign]
        viewer = await Viewer.open(c.node)
        viewer.get(c.path(cid))
        status, _, body = await viewer.response()
        assert status == 503
        assert b"timed out" in body
        assert joined == []  # answered without waiting on the fetch a second time
        assert source.requests == [cid]
        # The bucket answers late: the fetch completes, and the connection carries on.
        source.gate.set()
        await c.settled()
        assert await c.held(cid) == data
        viewer.get(c.path(cid))
        status, _, body = await viewer.response()
        assert status == 200
        assert body == data
        await viewer.close()
