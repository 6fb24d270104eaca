"""Object GETs of the R2 client (the read-through path) on the wire.

Against moto through the FaultProxy (which keeps its client connections alive while moto itself
answers ``Connection: close``) for what a real S3 server does, and against a tiny scripted
server on loopback where a test needs exact control of the bytes: keep-alive reuse, a
connection the server closed while idle, malformed and unframed answers, read timeouts, and a
GET abandoned while it waits for its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from peerd.core.ids import cid_of
from peerd.replication.r2 import READ_ATTEMPTS, R2Client, R2Error, blob_key
from tests.r2.conftest import make_config, read_all
from tests.support.faultproxy import Fault, FaultProxy, method_is
from tests.support.poll import until
from tests.support.s3server import MotoServer

KIB = 1024
MIB = 1024 * KIB


class Scripted:
    """A loopback HTTP server whose every connection runs ``handler(index, reader, writer)``."""

    def __init__(
        self,
        handler: Callable[[int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    ) -> None:
        self.handler = handler
        self.requests: list[tuple[int, str]] = []  # (connection index, target)
        self.accepted = 0
        self.open_now = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def request(self, index: int, reader: asyncio.StreamReader) -> str | None:
        """The next request's target (recorded), or None once the client closed."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        target = head.split(b" ", 2)[1].decode()
        self.requests.append((index, target))
        return target

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        index = self.accepted
        self.accepted += 1
        self.open_now += 1
        try:
            await self.handler(index, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # (a cancelled handler ends normally: asyncio's stream callback would log it)
        finally:
            self.open_now -= 1
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def ok(body: bytes) -> bytes:
    """A 200 answer framed by Content-Length."""
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body


def body_of(target: str) -> bytes:
    """What the scripted server answers for ``target`` (distinct per target)."""
    return (target.encode() + b"|") * 100


@contextlib.asynccontextmanager
async def scripted(
    first: bytes | None = None, *, read_timeout_s: float = 2.0, close_after_one: bool = False
) -> AsyncIterator[tuple[Scripted, R2Client]]:
    """A server that answers ``first`` (raw bytes) to its first request, and :func:`body_of`
    each target after it; with ``close_after_one`` each connection closes
    after one answer (as moto does). A client for it."""

    async def handler(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while (target := await server.request(index, r)) is not None:
            once = first is not None and server.requests == [(0, target)]
            w.write(first if first is not None and once else ok(body_of(target)))
            await w.drain()
            if close_after_one:
                await asyncio.sleep(0.02)
                return

    server = Scripted(handler)
    url = await server.start()
    client = R2Client(make_config(url, "bucket", read_timeout_s=read_timeout_s))
    try:
        yield server, client
    finally:
        await client.close()
        await server.stop()


async def put(moto: MotoServer, bucket: str, data: bytes) -> str:
    key = blob_key(cid_of(data))
    await asyncio.to_thread(moto.put, bucket, key, data)
    return key


# -- against moto through the fault proxy ----------------------------------------------------


async def test_keep_alive_reuses_one_connection_through_the_proxy(
    client: R2Client, proxy: FaultProxy, moto: MotoServer, bucket: str
) -> None:
    objects = [b"", os.urandom(10), os.urandom(300 * KIB), os.urandom(2 * MIB + 3)]
    keys = [await put(moto, bucket, data) for data in objects]
    accepted: list[int] = []
    handle = proxy._handle

    async def counted(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        accepted.append(1)
        await handle(r, w)

    proxy._server.close()  # type: ignore[union-attr]
    proxy._server = await asyncio.start_server(counted, "127.0.0.1", proxy.port)
    for _ in range(2):
        for key, data in zip(keys, objects, strict=True):
            assert await read_all(client, key) == data
    assert proxy.count("GET", "/blobs/") == 2 * len(objects)
    assert len(accepted) == 1


async def test_missing_object_is_none_and_errors_are_retried_then_reported(
    client: R2Client, proxy: FaultProxy, moto: MotoServer, bucket: str
) -> None:
    data = os.urandom(5000)
    key = await put(moto, bucket, data)
    assert await client.open(blob_key(cid_of(b"absent"))) is None
    assert proxy.count("GET", "/blobs/") == 1  # a miss costs one GET
    proxy.add(method_is("GET", "/blobs/"), Fault("slowdown"), READ_ATTEMPTS)
    with pytest.raises(R2Error) as slow:
        await client.open(key)
    assert slow.value.throttled
    assert slow.value.detail["status_code"] == 503
    assert "SlowDown" in str(slow.value)
    proxy.add(method_is("GET", "/blobs/"), Fault("status", status=403))
    with pytest.raises(R2Error) as refused:
        await client.open(key)  # not transient: not retried
    assert not refused.value.throttled
    assert refused.value.detail["status_code"] == 403
    assert await read_all(client, key) == data
    assert proxy.count("GET", "/blobs/") == 1 + READ_ATTEMPTS + 1 + 1


async def test_stalled_answer_times_out_after_the_read_timeout(
    client: R2Client, proxy: FaultProxy, moto: MotoServer, bucket: str
) -> None:
    data = os.urandom(1000)
    key = await put(moto, bucket, data)
    proxy.add(method_is("GET", "/blobs/"), Fault("stall", seconds=5.0))
    started = time.monotonic()
    with pytest.raises(R2Error, match="Timeout"):
        await client.open(key)
    assert time.monotonic() - started >= 0.9  # read_timeout_s is 1.0 (tests/r2/conftest.py)
    assert proxy.count("GET", "/blobs/") == 1  # a timeout is not retried
    assert await read_all(client, key) == data


# -- against a scripted server ---------------------------------------------------------------


async def test_connection_closed_by_the_server_while_idle_is_not_reused() -> None:
    async with scripted(close_after_one=True) as (server, client):
        assert await read_all(client, "a") == body_of("/bucket/a")
        await until(lambda: server.open_now == 0)
        assert await read_all(client, "b") == body_of("/bucket/b")
        assert server.requests == [(0, "/bucket/a"), (1, "/bucket/b")]


@pytest.mark.parametrize(
    "answer",
    [
        b"FOO BAR\r\n\r\n",
        b"HTTP/1.1 abc\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * (70 * KIB) + b"\r\n\r\n",
    ],
    ids=["garbage", "status", "header", "huge-head"],
)
async def test_malformed_answer_fails_and_the_next_get_is_whole(answer: bytes) -> None:
    async with scripted(answer) as (server, client):
        with pytest.raises(R2Error) as refused:
            await client.open("a")
        assert "Timeout" not in str(refused.value)  # refused at once, not timed out
        assert await read_all(client, "b") == body_of("/bucket/b")
        assert server.requests[-1][0] > 0  # on a new connection
        await until(lambda: server.open_now == 1)  # the malformed one was closed


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n",
    ],
    ids=["chunked", "read-to-close"],
)
async def test_unframed_success_is_refused(head: bytes) -> None:
    async with scripted(head + b"5\r\nhello\r\n0\r\n\r\n") as (_, client):
        with pytest.raises(R2Error, match="without a Content-Length"):
            await client.open("a")
        assert await read_all(client, "b") == body_of("/bucket/b")


async def test_an_abandoned_get_closes_its_connection() -> None:
    """The resolver's fetch timeout cancels a GET that waits for its head: the connection is
    closed, not left open with an answer nobody reads."""

    async def slow(index: int, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while (target := await server.request(index, r)) is not None:
            await asyncio.sleep(0.2)
            w.write(ok(body_of(target)))
            await w.drain()

    server = Scripted(slow)
    client = R2Client(make_config(await server.start(), "bucket"))
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.open("a"), 0.05)
        await until(lambda: server.open_now == 0)
        assert await read_all(client, "b") == body_of("/bucket/b")
    finally:
        await client.close()
        await server.stop()
