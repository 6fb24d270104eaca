"""GetPool (peerd.replication.s3get), the bucket GETs of the read-through path, byte by byte.

Against moto through the FaultProxy (which keeps its client connections alive while moto itself
answers ``Connection: close``) for what a real S3 server does, and against tiny scripted servers
on loopback where a test needs exact control of the bytes and their timing: keep-alive reuse,
the one retry of a reused connection, malformed and unframed answers, read timeouts, cut and
overlong bodies, the tap, flow control, the connection limit, and a GET cancelled while it waits
for its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from peerd.core.ids import cid_of
from peerd.replication.r2 import R2Client, R2Error, blob_key
from peerd.replication.s3get import HIGH_WATER, LOW_WATER, GetError, GetPool, GetResponse
from peerd.testing.faultproxy import Fault, FaultProxy, method_is
from peerd.testing.poll import until
from peerd.testing.s3server import MotoServer
from tests.r2.conftest import make_config, read_all

KIB = 1024
MIB = 1024 * KIB


# -- a scripted HTTP/1.1 server -------------------------------------------------------------


class Peer:
    """The server's side of one connection, driven by a test's handler."""

    def __init__(
        self, server: Scripted, index: int, reader: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        self.server = server
        self.index = index  # connections accepted before this one
        self.reader = reader
        self.writer = w

    async def request(self) -> str | None:
        """The next request's target (recorded), or None once the client closed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        target = head.split(b" ", 2)[1].decode()
        self.server.requests.append((self.index, target))
        return target

    async def send(self, data: bytes) -> None:
        """Write and drain (in slices, so no loop step copies megabytes)."""
        view = memoryview(data)
        for i in range(0, len(view), 256 * KIB):
            self.writer.write(view[i : i + 256 * KIB])
            await self.writer.drain()
            self.server.sent[self.index] = self.server.sent.get(self.index, 0) + len(
                view[i : i + 256 * KIB]
            )

    async def closed_by_client(self) -> bool:
        """Waits until the client closes (True) or sends more bytes (False)."""
        with contextlib.suppress(ConnectionError):
            return await self.reader.read(1) == b""
        return True


Handler = Callable[[Peer], Awaitable[None]]


class Scripted:
    """A loopback server whose every connection runs ``handler`` (then is closed)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.requests: list[tuple[int, str]] = []  # (connection index, target)
        self.sent: dict[int, int] = {}  # bytes written per connection
        self.accepted = 0
        self.open_now = 0
        self.max_open = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> Scripted:
        self._server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for w in list(self._writers):
                w.close()
            # A handler still waiting on a test's event (the test failed first) is cancelled.
            _, pending = (
                await asyncio.wait(list(self._tasks), timeout=1.0) if self._tasks else ((), ())
            )
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        peer = Peer(self, self.accepted, reader, writer)
        self.accepted += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            await self.handler(peer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass  # (a cancelled handler ends normally: asyncio's stream callback would log it)
        finally:
            self.open_now -= 1
            self._tasks.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def ok_head(length: int) -> bytes:
    """The head of a 200 answer of ``length`` body bytes."""
    return f"HTTP/1.1 200 OK\r\nContent-Length: {length}\r\n\r\n".encode()


def ok(body: bytes) -> bytes:
    """A 200 answer framed by Content-Length."""
    return ok_head(len(body)) + body


def body_of(target: str) -> bytes:
    """What the scripted servers answer for ``target`` (distinct per target)."""
    return (target.encode() + b"|") * 100


async def serve_forever(peer: Peer) -> None:
    """Answer every request on the connection with :func:`body_of` its target."""
    while (target := await peer.request()) is not None:
        await peer.send(ok(body_of(target)))


async def second_request_unanswered(peer: Peer) -> None:
    """Answer the first request of the first connection, then close it after reading the next
    one (a keep-alive connection the server dropped while idle); later connections serve."""
    if peer.index > 0:
        await serve_forever(peer)
        return
    target = await peer.request()
    assert target is not None
    await peer.send(ok(body_of(target)))
    await peer.request()  # read the next request, then close without a byte


def first_answer(answer: bytes) -> Handler:
    """A handler whose first connection answers its first request with ``answer`` (raw bytes)
    and then waits for the client to close it; later connections serve."""

    async def first(peer: Peer) -> None:
        if peer.index > 0:
            await serve_forever(peer)
            return
        await peer.request()
        await peer.send(answer)
        await peer.closed_by_client()

    return first


def gated_by(gate: asyncio.Event) -> Handler:
    """A handler that reads each request at once and answers it once ``gate`` is set."""

    async def gated(peer: Peer) -> None:
        while (target := await peer.request()) is not None:
            await gate.wait()
            await peer.send(ok(body_of(target)))

    return gated


@contextlib.asynccontextmanager
async def scripted(
    handler: Handler, *, limit: int = 4, read_timeout_s: float = 2.0, spare: bool = False
) -> AsyncIterator[tuple[Scripted, GetPool]]:
    server = await Scripted(handler).start()
    pool = GetPool(
        server.url,
        limit=limit,
        connect_timeout_s=2.0,
        read_timeout_s=read_timeout_s,
        spare=spare,
    )
    try:
        yield server, pool
    finally:
        await pool.close()
        await server.stop()


async def fetch(pool: GetPool, target: str) -> bytes:
    """GET ``target``, the whole body, released (a connection read to its end is reused)."""
    resp = await pool.get(target, {"host": pool.authority})
    assert resp.status == 200
    try:
        return b"".join([c async for c in resp])
    finally:
        resp.release()


async def collect(
    chunks: AsyncIterator[bytes], into: bytearray, arrivals: list[float] | None = None
) -> None:
    """Append every chunk to ``into`` (and its arrival time to ``arrivals``) until the end."""
    async for chunk in chunks:
        into += chunk
        if arrivals is not None:
            arrivals.append(time.monotonic())


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
    for _ in range(2):
        for key, data in zip(keys, objects, strict=True):
            assert await read_all(client, key) == data
    assert proxy.count("GET", "/blobs/") == 2 * len(objects)
    # The first GET's connection and the spare R2's pool opens beside it; nothing after.
    assert client.gets.connects == 2


async def test_missing_object_is_none_and_slowdown_is_throttled(
    client: R2Client, proxy: FaultProxy, moto: MotoServer, bucket: str
) -> None:
    data = os.urandom(5000)
    key = await put(moto, bucket, data)
    assert await client.open(blob_key(cid_of(b"absent"))) is None
    proxy.add(method_is("GET", "/blobs/"), Fault("slowdown"))
    with pytest.raises(R2Error) as slow:
        await client.open(key)
    assert slow.value.throttled
    assert slow.value.detail["status_code"] == 503
    assert "SlowDown" in str(slow.value)
    proxy.add(method_is("GET", "/blobs/"), Fault("status", status=500))
    with pytest.raises(R2Error) as failed:
        await client.open(key)
    assert not failed.value.throttled
    assert failed.value.detail["status_code"] == 500
    assert await read_all(client, key) == data
    assert proxy.count("GET", "/blobs/") == 4


async def test_stalled_answer_times_out_after_the_read_timeout(
    client: R2Client, proxy: FaultProxy, moto: MotoServer, bucket: str
) -> None:
    data = os.urandom(1000)
    key = await put(moto, bucket, data)
    proxy.add(method_is("GET", "/blobs/"), Fault("stall", seconds=5.0))
    started = time.monotonic()
    with pytest.raises(R2Error, match="no answer bytes"):
        await client.open(key)
    took = time.monotonic() - started
    assert 0.9 <= took < 2.5  # read_timeout_s is 1.0 (tests/r2/conftest.py)
    assert await read_all(client, key) == data


async def test_body_cut_midway_raises_and_the_next_get_is_whole(
    client: R2Client, proxy: FaultProxy, moto: MotoServer, bucket: str
) -> None:
    data = os.urandom(900 * KIB)
    key = await put(moto, bucket, data)
    assert await read_all(client, key) == data  # an idle keep-alive connection now
    proxy.add(method_is("GET", "/blobs/"), Fault("cut", fraction=0.5))
    got = await client.open(key)
    assert got is not None
    size, body = got
    assert size == len(data)
    received = bytearray()
    with pytest.raises(R2Error, match=f"ended after {len(data) // 2} of {len(data)} bytes"):
        await collect(body, received)
    await body.aclose()
    assert bytes(received) == data[: len(received)]  # (chunks gathered but not yet given: lost)
    assert await read_all(client, key) == data
    # First GET: its connection + the spare. The cut GET took one of them; the last GET took
    # the other (the cut one was not reused) and a new spare was opened beside it.
    assert client.gets.connects == 3
    assert proxy.count("GET", "/blobs/") == 3


# -- against scripted servers ----------------------------------------------------------------


async def test_connection_closed_by_the_server_while_idle_is_not_reused() -> None:
    async def answer_then_close(peer: Peer) -> None:
        target = await peer.request()
        assert target is not None
        await peer.send(ok(body_of(target)))
        await asyncio.sleep(0.02)  # an idle timeout of the server's

    async with scripted(answer_then_close) as (server, pool):
        assert await fetch(pool, "/a") == body_of("/a")
        await until(lambda: server.open_now == 0)
        await asyncio.sleep(0.05)
        assert await fetch(pool, "/b") == body_of("/b")
        assert pool.connects == 2
        assert server.requests == [(0, "/a"), (1, "/b")]


async def test_reused_connection_closed_before_answering_is_retried_once() -> None:
    async with scripted(second_request_unanswered) as (server, pool):
        assert await fetch(pool, "/a") == body_of("/a")
        assert await fetch(pool, "/b") == body_of("/b")
        assert pool.connects == 2
        assert server.requests == [(0, "/a"), (0, "/b"), (1, "/b")]
        # The new connection is kept alive in turn.
        assert await fetch(pool, "/c") == body_of("/c")
        assert pool.connects == 2


async def test_a_fresh_connection_is_not_retried_and_the_retry_happens_once() -> None:
    async def never_answer(peer: Peer) -> None:
        await peer.request()

    async with scripted(never_answer) as (server, pool):
        with pytest.raises(GetError, match="closed by the server"):
            await fetch(pool, "/a")
        assert server.requests == [(0, "/a")]
        assert pool.connects == 1

    async def only_the_first_answer(peer: Peer) -> None:
        if peer.index == 0:
            target = await peer.request()
            assert target is not None
            await peer.send(ok(body_of(target)))
        await peer.request()

    async with scripted(only_the_first_answer) as (server, pool):
        assert await fetch(pool, "/a") == body_of("/a")
        with pytest.raises(GetError, match="closed by the server"):
            await fetch(pool, "/b")
        assert server.requests == [(0, "/a"), (0, "/b"), (1, "/b")]
        assert pool.connects == 2


async def test_reused_connection_cut_inside_its_answer_is_not_retried() -> None:
    async def part_of_a_head(peer: Peer) -> None:
        target = await peer.request()
        assert target is not None
        await peer.send(ok(body_of(target)))
        await peer.request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Le")

    async with scripted(part_of_a_head) as (server, pool):
        assert await fetch(pool, "/a") == body_of("/a")
        with pytest.raises(GetError):
            await fetch(pool, "/b")
        assert server.requests == [(0, "/a"), (0, "/b")]
        assert pool.connects == 1


@pytest.mark.parametrize(
    "answer",
    [
        b"FOO BAR\r\n\r\n",
        b"HTTP/1.1 abc\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon here\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * (70 * KIB),  # a head that never ends
    ],
    ids=["garbage", "status", "header", "huge-head"],
)
async def test_malformed_answer_fails_and_its_connection_is_dropped(answer: bytes) -> None:
    async with scripted(first_answer(answer)) as (server, pool):
        started = time.monotonic()
        with pytest.raises(GetError, match="malformed|too large"):
            await fetch(pool, "/a")
        assert time.monotonic() - started < 1.0  # not a read timeout
        assert await fetch(pool, "/b") == body_of("/b")
        assert pool.connects == 2
        assert server.requests == [(0, "/a"), (1, "/b")]
        await until(lambda: server.open_now == 1)  # the malformed one was closed


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 12abc\r\n\r\n",
    ],
    ids=["no-length", "chunked", "chunked-and-length", "bad-length"],
)
async def test_unframed_success_is_refused_and_not_reused(head: bytes) -> None:
    async with scripted(first_answer(head + b"5\r\nhello\r\n0\r\n\r\n")) as (server, pool):
        resp = await pool.get("/a", {"host": pool.authority})
        assert resp.status == 200
        assert resp.length is None
        with pytest.raises(GetError, match="without a Content-Length"):
            await collect(resp, bytearray())
        resp.release()
        assert await fetch(pool, "/b") == body_of("/b")
        assert pool.connects == 2
        await until(lambda: server.open_now == 1)

        # R2Client.open refuses it before handing out a body.
        server.accepted = 0  # the client's first connection is answered unframed again
        c = await R2Client.create(make_config(server.url, "bucket", read_timeout_s=2.0))
        try:
            with pytest.raises(R2Error, match="without a Content-Length"):
                await c.open("blobs/x")
            assert await read_all(c, "blobs/y") == body_of("/bucket/blobs/y")
            assert c.gets.connects == 2
        finally:
            await c.close()


async def test_silent_server_times_out_before_the_head_and_inside_the_body() -> None:
    body = os.urandom(100 * KIB)

    async def stall(peer: Peer) -> None:
        target = await peer.request()
        if target == "/half":
            await peer.send(ok(body)[: 50 * KIB])
        await peer.closed_by_client()  # silent until then

    async with scripted(stall, read_timeout_s=0.3) as (_, pool):
        started = time.monotonic()
        with pytest.raises(GetError, match="no answer bytes for 0.3 s"):
            await pool.get("/head", {"host": pool.authority})
        assert 0.25 <= time.monotonic() - started < 1.0

        resp = await pool.get("/half", {"host": pool.authority})
        got = bytearray()
        arrivals: list[float] = []
        with pytest.raises(GetError, match="no answer bytes"):
            await collect(resp, got, arrivals)
        assert 0.25 <= time.monotonic() - arrivals[-1] < 1.0
        resp.close()
        assert len(got) < len(body)
        assert bytes(got) == body[: len(got)]
        assert pool.connects == 2


@pytest.mark.parametrize("late", [False, True], ids=["same-write", "after-release"])
async def test_bytes_past_content_length_are_dropped_with_the_connection(late: bool) -> None:
    body = os.urandom(20 * KIB)
    extra = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nevil"

    async def overlong_first(peer: Peer) -> None:
        if peer.index > 0:
            await serve_forever(peer)
            return
        await peer.request()
        if late:
            await peer.send(ok(body))
            await asyncio.sleep(0.05)
            await peer.send(extra)
        else:
            await peer.send(ok(body) + extra)
        await serve_forever(peer)  # a reused connection would show as (0, "/b")

    async with scripted(overlong_first) as (server, pool):
        resp = await pool.get("/a", {"host": pool.authority})
        tapped: list[bytes] = []
        resp.tap(tapped.append)
        got = b"".join([c async for c in resp])
        assert got == body
        resp.release()
        assert b"".join(tapped) == body
        await asyncio.sleep(0.1)  # the late bytes arrive on the idle connection
        # The next GET is answered on a new connection (the old one never parses "evil").
        assert await fetch(pool, "/b") == body_of("/b")
        assert pool.connects == 2
        assert server.requests == [(0, "/a"), (1, "/b")]
        await until(lambda: server.open_now == 1)


async def test_tap_replays_the_chunks_already_in_then_follows_in_order() -> None:
    piece = 40 * KIB
    body = os.urandom(6 * piece)
    go_on = asyncio.Event()

    async def in_two_halves(peer: Peer) -> None:
        target = await peer.request()
        assert target == "/a"
        await peer.send(ok_head(len(body)))
        for i in range(3):
            await peer.send(body[i * piece : (i + 1) * piece])
            await asyncio.sleep(0.01)
        await go_on.wait()
        for i in range(3, 6):
            await peer.send(body[i * piece : (i + 1) * piece])
            await asyncio.sleep(0.01)
        await serve_forever(peer)

    async with scripted(in_two_halves) as (_, pool):
        resp = await pool.get("/a", {"host": pool.authority})
        await until(lambda: resp.received == 3 * piece)
        tapped: list[bytes] = []
        resp.tap(tapped.append)
        assert b"".join(tapped) == body[: 3 * piece]  # replayed at once, in the call
        go_on.set()
        # Fed from the connection's callbacks: nobody iterates the body meanwhile.
        await until(lambda: resp.received == len(body))
        assert b"".join(tapped) == body
        assert len(tapped) >= 2
        got = b"".join([c async for c in resp])
        assert got == body  # the iterator still yields every chunk
        resp.release()
        assert b"".join(tapped) == body  # nothing more after the end
        assert await fetch(pool, "/b") == body_of("/b")
        assert pool.connects == 1


async def test_flow_control_pauses_past_high_water_and_resumes_when_consumed() -> None:
    total = 16 * MIB
    body = await asyncio.to_thread(os.urandom, total)

    async def big(peer: Peer) -> None:
        await peer.request()
        await peer.send(ok(body))
        await serve_forever(peer)

    # A read timeout well below the pause below: a paused connection must not time out.
    async with scripted(big, read_timeout_s=0.3) as (server, pool):
        resp = await pool.get("/a", {"host": pool.authority})
        await until(lambda: resp.received > HIGH_WATER)
        # Reading stops: nothing more arrives while nobody consumes.
        plateau = resp.received
        await asyncio.sleep(0.6)
        assert resp.received == plateau
        assert HIGH_WATER < plateau <= HIGH_WATER + 512 * KIB
        # Consuming resumes reading once less than LOW_WATER is queued.
        got = bytearray()
        while resp.received == plateau:
            got += await resp.__anext__()
            await asyncio.sleep(0.01)
        queued_at_resume = plateau - len(got)
        assert LOW_WATER - 768 * KIB <= queued_at_resume < LOW_WATER
        async for chunk in resp:
            got += chunk
            if len(got) % (2 * MIB) < len(chunk):
                await asyncio.sleep(0.05)  # a slow consumer: paused and resumed again
        assert len(got) == total
        assert bytes(got) == body
        resp.release()
        assert await fetch(pool, "/b") == body_of("/b")
        assert pool.connects == 1


async def test_limit_bounds_the_connections_and_a_closed_answer_frees_its_slot() -> None:
    gate = asyncio.Event()

    async with scripted(gated_by(gate), limit=2) as (server, pool):
        tasks = [asyncio.create_task(fetch(pool, f"/{i}")) for i in range(6)]
        await until(lambda: len(server.requests) == 2)
        await asyncio.sleep(0.1)
        assert len(server.requests) == 2
        assert server.accepted == 2
        gate.set()
        bodies = await asyncio.gather(*tasks)
        assert bodies == [body_of(f"/{i}") for i in range(6)]
        assert pool.connects == 2
        assert server.max_open == 2
        assert len(server.requests) == 6

    async with scripted(serve_forever, limit=1) as (server, pool):
        first = await pool.get("/a", {"host": pool.authority})
        second = asyncio.create_task(pool.get("/b", {"host": pool.authority}))
        await asyncio.sleep(0.1)
        assert not second.done()  # the only slot is held by an answer not yet released
        first.close()  # not read: the connection is closed and the slot freed
        resp = await asyncio.wait_for(second, 2)
        assert b"".join([c async for c in resp]) == body_of("/b")
        resp.release()
        assert pool.connects == 2
        assert server.requests == [(0, "/a"), (1, "/b")]


async def test_a_get_cancelled_while_waiting_for_its_answer_closes_its_connection() -> None:
    """The resolver's fetch timeout cancels a GET that waits for its head (its own read timeout
    equals it by default). Nobody can release that answer: the connection must be closed, not
    left open (with up to HIGH_WATER of a body queued in it) until the server gives up."""

    async def slow(peer: Peer) -> None:
        while (target := await peer.request()) is not None:
            await asyncio.sleep(0.2)
            await peer.send(ok(body_of(target)))

    async with scripted(slow) as (server, pool):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(pool.get("/a", {"host": pool.authority}), 0.05)
        await asyncio.sleep(0.4)  # the answer has arrived meanwhile
        assert server.open_now == 0, "the abandoned connection is still open"
        assert await fetch(pool, "/b") == body_of("/b")


async def test_response_helpers_on_a_real_answer() -> None:
    """``read`` for an error body, ``received``, and the headers as parsed."""

    async def error_then_ok(peer: Peer) -> None:
        if peer.index > 0:
            await serve_forever(peer)
            return
        await peer.request()
        await peer.send(
            b"HTTP/1.1 503 Busy\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 9000\r\n\r\n" + b"e" * 5000
        )
        await asyncio.sleep(0.1)
        await peer.send(b"e" * 4000)
        await serve_forever(peer)

    async with scripted(error_then_ok) as (_, pool):
        resp: GetResponse = await pool.get("/a", {"host": pool.authority})
        assert resp.status == 503
        assert resp.headers["x-a"] == "1, 2"
        assert resp.length == 9000
        assert await resp.read(4096) == b"e" * 4096
        assert resp.received == 5000
        resp.release()  # not read to its end: closed
        assert await fetch(pool, "/b") == body_of("/b")
        assert pool.connects == 2


async def answer_once_then_close(peer: Peer) -> None:
    """One answer per connection, then close it (as moto does: ``Connection: close``)."""
    target = await peer.request()
    if target is not None:
        body = body_of(target)
        await peer.send(
            f"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )


async def test_spare_connection_serves_the_next_get_without_a_connect() -> None:
    async with scripted(answer_once_then_close, spare=True) as (server, pool):
        assert await fetch(pool, "/a") == body_of("/a")
        await until(lambda: len(pool._idle) == 1)
        assert pool.connects == 2  # the first GET's, and the spare opened beside it

        attempts: list[str] = []

        async def refused() -> None:
            attempts.append("connect")
            raise GetError("refused by the test")

        connect = pool._connect
        pool._connect = refused  # type: ignore[assignment,method-assign]
        # Only the spare's replacement tries to connect (and fails quietly); the GET does not.
        assert await fetch(pool, "/b") == body_of("/b")
        await until(lambda: pool._warming is None)
        assert attempts == ["connect"]
        pool._connect = connect  # type: ignore[method-assign]
        assert [t for _, t in server.requests] == ["/a", "/b"]
        # Each GET leaves a spare behind (only started by a GET: a dead server costs nothing).
        assert await fetch(pool, "/c") == body_of("/c")
        await until(lambda: len(pool._idle) == 1)
        assert server.accepted == pool.connects


async def test_no_spare_without_the_option() -> None:
    async with scripted(serve_forever) as (server, pool):
        for t in ("/a", "/b", "/c"):
            assert await fetch(pool, t) == body_of(t)
        await asyncio.sleep(0.05)
        assert pool.connects == server.accepted == 1


async def test_a_get_cut_by_the_pool_closing_is_not_retried() -> None:
    """close() aborts a reused connection before its answer: that looks like a server that
    dropped an idle connection, but a closed pool opens no new one."""
    gate = asyncio.Event()
    async with scripted(gated_by(gate)) as (server, pool):
        gate.set()
        assert await fetch(pool, "/a") == body_of("/a")
        gate.clear()
        answer = asyncio.create_task(pool.get("/b", {"host": pool.authority}))
        await until(lambda: len(server.requests) == 2)
        await pool.close()
        with pytest.raises(GetError, match="pool is closed"):
            await asyncio.wait_for(answer, 2)
        gate.set()
        assert server.accepted == pool.connects == 1
