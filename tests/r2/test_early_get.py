"""Early GETs: a cold miss's bucket request sent from the caller's own callback.

``GetPool.start`` writes the request before it returns when a slot is free and a connection
idle, and calls ``on_head`` in the connection's callback before any body byte is handed out;
``R2Source.start``/``offers_from`` and the resolver's ``_start_early`` build on it so a viewer's
cold miss reaches the bucket with no task in between and the answer feeds the tee from the
bucket connection's callback. Checked here: the request really leaves at once (and only when it
can), the retry of a reused connection keeps ``on_head``, a cancelled or abandoned early GET
frees its slot and connection without stray errors, slots are handed over in order, the
resolver starts early only for its first source and never for a blob it just missed, and an
early answer that began the tee but was then lost fails the tee instead of leaving viewers
with unverified bytes.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest

from peerd.core.ids import Cid, cid_of
from peerd.delivery import Resolver
from peerd.delivery.source import Begin, EarlySource, Offer, Started, Tap
from peerd.errors import NotFound, UpstreamError
from peerd.replication.r2 import R2Client, blob_key
from peerd.replication.s3get import GetResponse
from peerd.replication.source import R2Source
from peerd.runtime import Runtime
from peerd.testing.faultproxy import Fault, FaultProxy, method_is
from peerd.testing.s3server import MotoServer
from peerd.testing.sources import MemorySource
from tests.r2.conftest import make_config
from tests.r2.test_s3get import (
    body_of,
    fetch,
    gated_by,
    scripted,
    second_request_unanswered,
    serve_forever,
    until,
)


def loop_errors() -> list[dict[str, Any]]:
    """Collect what the loop would log (e.g. "Future exception was never retrieved")."""
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    return errors


# -- GetPool.start -------------------------------------------------------------------------


async def test_start_writes_the_request_before_returning_on_an_idle_connection() -> None:
    async with scripted(serve_forever) as (server, pool):
        assert await fetch(pool, "/a") == body_of("/a")  # leaves its connection idle
        heads: list[GetResponse] = []
        tapped = bytearray()

        def on_head(resp: GetResponse) -> None:
            assert resp.received == 0  # before any body byte is handed out
            heads.append(resp)
            resp.tap(tapped.extend)

        pending = pool.start("/b", {"host": pool.authority}, on_head)
        assert pending.sent  # written in this very callback
        await until(lambda: len(server.requests) == 2)  # nobody awaited it yet
        resp = await pending.response()
        assert heads == [resp]
        body = b"".join([c async for c in resp])
        resp.release()
        assert body == bytes(tapped) == body_of("/b")
        assert server.requests == [(0, "/a"), (0, "/b")]
        assert pool.connects == 1


async def test_start_without_an_idle_connection_sends_when_awaited() -> None:
    async with scripted(serve_forever) as (server, pool):
        heads: list[int] = []
        pending = pool.start("/a", {"host": pool.authority}, lambda r: heads.append(r.status))
        assert not pending.sent
        await asyncio.sleep(0.05)
        assert server.requests == []
        resp = await pending.response()
        assert heads == [200]
        assert b"".join([c async for c in resp]) == body_of("/a")
        resp.release()


async def test_on_head_follows_the_retry_of_a_reused_connection() -> None:
    async with scripted(second_request_unanswered) as (server, pool):
        errors = loop_errors()
        assert await fetch(pool, "/a") == body_of("/a")
        heads: list[GetResponse] = []
        pending = pool.start("/b", {"host": pool.authority}, heads.append)
        assert pending.sent
        resp = await pending.response()
        assert heads == [resp]  # called once, for the answer that came
        assert b"".join([c async for c in resp]) == body_of("/b")
        resp.release()
        assert server.requests == [(0, "/a"), (0, "/b"), (1, "/b")]
        gc.collect()
        assert errors == []


async def test_a_cancelled_start_closes_its_connection_and_frees_its_slot() -> None:
    gate = asyncio.Event()

    async with scripted(gated_by(gate), limit=1) as (server, pool):
        errors = loop_errors()
        gate.set()
        assert await fetch(pool, "/a") == body_of("/a")
        gate.clear()
        pending = pool.start("/b", {"host": pool.authority}, lambda r: pytest.fail("no head"))
        assert pending.sent
        await until(lambda: len(server.requests) == 2)
        pending.cancel()
        pending.cancel()  # idempotent
        assert pool._free == 1
        assert not pool._open
        with pytest.raises(Exception, match="already answered or cancelled"):
            await pending.response()
        gate.set()  # the server's answer meets a closed connection
        await until(lambda: server.open_now == 0)
        assert await fetch(pool, "/c") == body_of("/c")  # the slot is usable again
        assert pool.connects == 2
        gc.collect()
        assert errors == []


async def test_a_start_cancelled_after_its_connection_failed_logs_nothing() -> None:
    async with scripted(second_request_unanswered, limit=1) as (_, pool):
        errors = loop_errors()
        assert await fetch(pool, "/a") == body_of("/a")
        pending = pool.start("/b", {"host": pool.authority})
        assert pending.sent
        await until(lambda: not pool._open)  # closed by the server, the failure not awaited
        pending.cancel()
        assert pool._free == 1
        del pending
        gc.collect()
        assert errors == []


async def test_a_start_cancelled_after_its_head_came_closes_its_connection() -> None:
    async with scripted(serve_forever, limit=1) as (server, pool):
        errors = loop_errors()
        assert await fetch(pool, "/a") == body_of("/a")
        heads: list[GetResponse] = []
        pending = pool.start("/b", {"host": pool.authority}, heads.append)
        await until(lambda: bool(heads))
        pending.cancel()  # the answer is in, and will never be read
        await until(lambda: server.open_now == 0)
        assert pool._free == 1
        assert await fetch(pool, "/c") == body_of("/c")
        gc.collect()
        assert errors == []


async def test_slots_are_handed_over_in_order_and_a_start_does_not_jump_the_queue() -> None:
    async with scripted(serve_forever, limit=1) as (server, pool):
        first = await pool.get("/a", {"host": pool.authority})
        waiting = asyncio.create_task(fetch(pool, "/b"))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        assert b"".join([c async for c in first]) == body_of("/a")
        first.release()  # the slot goes to the waiting GET at once...
        late = pool.start("/c", {"host": pool.authority})
        assert not late.sent  # ...so a start in the same callback waits its turn
        assert await waiting == body_of("/b")
        resp = await late.response()
        assert b"".join([c async for c in resp]) == body_of("/c")
        resp.release()
        assert [t for _, t in server.requests] == ["/a", "/b", "/c"]
        assert pool._free == 1


async def test_a_waiter_cancelled_after_being_handed_a_slot_passes_it_on() -> None:
    async with scripted(serve_forever, limit=1) as (_, pool):
        first = await pool.get("/a", {"host": pool.authority})
        doomed = asyncio.create_task(fetch(pool, "/b"))
        after = asyncio.create_task(fetch(pool, "/c"))
        await asyncio.sleep(0.05)
        first.close()  # hands the slot to the /b waiter...
        doomed.cancel()  # ...which is cancelled before it runs
        with pytest.raises(asyncio.CancelledError):
            await doomed
        assert await asyncio.wait_for(after, 2) == body_of("/c")
        assert pool._free == 1


async def test_a_get_waiting_for_a_slot_fails_once_the_pool_closes() -> None:
    async with scripted(serve_forever, limit=1) as (server, pool):
        first = await pool.get("/a", {"host": pool.authority})
        waiting = asyncio.create_task(pool.get("/b", {"host": pool.authority}))
        await asyncio.sleep(0.05)
        await pool.close()  # aborts the connection of /a: its slot goes to /b
        first.close()
        with pytest.raises(Exception, match="pool is closed"):
            await asyncio.wait_for(waiting, 2)
        assert server.requests == [(0, "/a")]

    gate = asyncio.Event()

    async with scripted(gated_by(gate)) as (server, pool):
        gate.set()
        assert await fetch(pool, "/a") == body_of("/a")
        gate.clear()
        sent = pool.start("/b", {"host": pool.authority})
        assert sent.sent
        answer = asyncio.create_task(sent.response())
        await until(lambda: len(server.requests) == 2)
        await pool.close()  # its connection is aborted before any answer: no retry
        with pytest.raises(Exception, match="pool is closed"):
            await asyncio.wait_for(answer, 2)
        gate.set()
        assert server.accepted == 1


# -- the resolver's early start (R2 in moto, through the fault proxy) ----------------------


@pytest.fixture
async def counted(proxy: FaultProxy, bucket: str) -> AsyncIterator[tuple[R2Client, list[str]]]:
    """An R2 client that records every request it makes, as it makes it."""
    ops: list[str] = []
    client = await R2Client.create(make_config(proxy.url, bucket), on_request=ops.append)
    try:
        yield client, ops
    finally:
        await client.close()


async def warm(client: R2Client, moto: MotoServer, bucket: str) -> None:
    """One GET, so the pool holds an idle connection (the proxy keeps it alive)."""
    await asyncio.to_thread(moto.put, bucket, "warm", b"w")
    assert await client.get_bytes("warm") == b"w"
    await until(lambda: bool(client.gets._idle))


async def settled(tee: Any) -> None:
    await until(lambda: tee.done, 10)


async def test_a_cold_miss_sends_its_get_from_the_callers_callback(
    runtime: Runtime,
    counted: tuple[R2Client, list[str]],
    proxy: FaultProxy,
    moto: MotoServer,
    bucket: str,
) -> None:
    client, ops = counted
    data = os.urandom(3 * 1024 * 1024 + 11)
    cid = cid_of(data)
    await asyncio.to_thread(moto.put, bucket, blob_key(cid), data)
    await warm(client, moto, bucket)
    ops.clear()
    resolver = Resolver(runtime.store, [R2Source(client)])
    wakes: list[tuple[bool, int]] = []

    def wake() -> None:
        assert tee is not None
        wakes.append((tee.streaming, len(tee.chunks)))

    tee = resolver.watch(cid, wake)
    assert tee is not None
    # Signed and written before watch returned: no task ran in between.
    assert ops == ["GetObject"]
    assert [c for c in client.gets._open if c.head_waiter is not None]  # awaiting its answer
    await settled(tee)
    assert tee.error is None
    assert tee.early
    assert tee.source == tee.path_source == "r2"
    assert b"".join(tee.chunks) == data
    assert wakes[0] == (True, 0)  # begun from the answer's head, before any chunk
    assert await runtime.store.has(cid)
    assert proxy.count("GET", f"/{blob_key(cid)}") == 1
    assert ops == ["GetObject"]


async def test_only_the_first_source_starts_early(
    runtime: Runtime, counted: tuple[R2Client, list[str]], moto: MotoServer, bucket: str
) -> None:
    client, ops = counted
    data = os.urandom(500_000)
    cid = cid_of(data)
    await asyncio.to_thread(moto.put, bucket, blob_key(cid), data)
    await warm(client, moto, bucket)
    ops.clear()
    lan = MemorySource(name="lan", blobs={})  # asked first, has nothing
    resolver = Resolver(runtime.store, [lan])
    resolver.add_source(R2Source(client))
    tee = resolver.watch(cid, lambda: None)
    assert tee is not None
    assert ops == []  # R2 is asked only once the LAN had nothing
    await settled(tee)
    # Streamed all the same, tapped by the resolver once R2's offer came.
    assert tee.error is None
    assert tee.streaming
    assert not tee.early
    assert b"".join(tee.chunks) == data
    assert ops == ["GetObject"]


class IdlePeers(MemorySource):
    """A peer source that looks idle (no peer known) but may hold blobs all the same (a peer
    that appeared a moment ago)."""

    def idle(self) -> bool:
        return True


async def test_r2_starts_early_and_is_asked_first_when_the_peer_sources_look_idle(
    runtime: Runtime,
    counted: tuple[R2Client, list[str]],
    proxy: FaultProxy,
    moto: MotoServer,
    bucket: str,
) -> None:
    client, ops = counted
    in_r2 = os.urandom(300_000)
    only_lan = os.urandom(200_000)
    await asyncio.to_thread(moto.put, bucket, blob_key(cid_of(in_r2)), in_r2)
    await warm(client, moto, bucket)
    ops.clear()
    lan = IdlePeers(name="lan", blobs={cid_of(only_lan): only_lan})
    resolver = Resolver(runtime.store, [lan])
    resolver.add_source(R2Source(client))
    tee = resolver.watch(cid_of(in_r2), lambda: None)
    assert tee is not None
    assert ops == ["GetObject"]  # sent before watch returned, ahead of the idle LAN
    await settled(tee)
    assert tee.error is None
    assert tee.early
    assert b"".join(tee.chunks) == in_r2
    assert lan.requests == []  # R2 delivered: the idle source was not asked
    # A blob R2 lacks: the idle source is still asked after R2, and delivers.
    ops.clear()
    tee = resolver.watch(cid_of(only_lan), lambda: None)
    assert tee is not None
    assert ops == ["GetObject"]
    await settled(tee)
    assert tee.error is None
    assert tee.path_source == "lan"
    assert lan.requests == [cid_of(only_lan)]
    assert await runtime.store.has(cid_of(only_lan))
    # A peer source that does not look idle keeps its place: no early request.
    busy = MemorySource(name="lan")
    behind = Resolver(runtime.store, [busy, IdlePeers(name="libp2p")])
    behind.add_source(R2Source(client))
    ops.clear()
    tee = behind.watch(cid_of(os.urandom(8)), lambda: None)
    assert tee is not None
    assert ops == []
    await settled(tee)


async def test_missing_and_failing_early_gets_begin_nothing(
    runtime: Runtime,
    counted: tuple[R2Client, list[str]],
    proxy: FaultProxy,
    moto: MotoServer,
    bucket: str,
) -> None:
    client, ops = counted
    await warm(client, moto, bucket)
    resolver = Resolver(runtime.store, [R2Source(client)], miss_ttl_s=60)
    absent = cid_of(b"in no bucket")
    tee = resolver.watch(absent, lambda: None)
    assert tee is not None
    await settled(tee)
    assert isinstance(tee.error, NotFound)
    assert not tee.streaming
    # Missed a moment ago: no request at all, early or not.
    ops.clear()
    again = resolver.watch(absent, lambda: None)
    assert again is not None
    await settled(again)
    assert isinstance(again.error, NotFound)
    assert ops == []

    data = os.urandom(100_000)
    cid = cid_of(data)
    await asyncio.to_thread(moto.put, bucket, blob_key(cid), data)
    await until(lambda: bool(client.gets._idle))
    proxy.add(method_is("GET"), Fault("status", status=500), times=1)
    failing = Resolver(runtime.store, [R2Source(client)])
    tee = failing.watch(cid, lambda: None)
    assert tee is not None
    await settled(tee)
    assert tee.error is not None
    assert not tee.streaming
    assert not await runtime.store.has(cid)
    assert client.gets._free == client.gets._limit


async def test_a_fetch_cancelled_before_it_ran_closes_its_early_get(
    runtime: Runtime,
    counted: tuple[R2Client, list[str]],
    proxy: FaultProxy,
    moto: MotoServer,
    bucket: str,
) -> None:
    client, ops = counted
    errors = loop_errors()
    data = os.urandom(200_000)
    cid = cid_of(data)
    await asyncio.to_thread(moto.put, bucket, blob_key(cid), data)
    await warm(client, moto, bucket)
    ops.clear()
    resolver = Resolver(runtime.store, [R2Source(client)])
    _, task = resolver._start_tee(cid)  # what shutdown does to a fetch not yet begun
    assert ops == ["GetObject"]
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert client.gets._free == client.gets._limit
    await until(lambda: all(c in client.gets._idle for c in client.gets._open))
    assert not await runtime.store.has(cid)
    # The next miss of the blob fetches it whole.
    tee = resolver.watch(cid, lambda: None)
    assert tee is not None
    await settled(tee)
    assert tee.error is None
    assert await runtime.store.has(cid)
    gc.collect()
    assert errors == []


# -- an early answer lost after it began the tee ------------------------------------------


class LosingSource:
    """An early source whose answer begins the tee, then whose offer is lost (the race of a
    timeout between the answer's head and the offer reaching the resolver)."""

    name = "r2"
    timeout_s = 5.0

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.cancelled = 0

    async def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        raise AssertionError("an early source is asked through offers_from")
        yield  # an async generator

    def start(self, cid: Cid, begin: Begin) -> Started:
        source = self

        class Handle:
            def cancel(self) -> None:
                source.cancelled += 1

        handle = Handle()
        self.begin = begin
        return handle

    async def offers_from(self, cid: Cid, started: Started) -> AsyncIterator[Offer]:
        fed: list[Tap] = []
        self.begin(len(self.data), fed.append)
        fed[0](self.data[:1000])  # part of the body reached the viewers
        raise UpstreamError("lost between the head and the offer")
        yield  # an async generator

    def report(self, offer: Offer, ok: bool, reason: str = "") -> None:
        pass


async def test_an_early_answer_lost_after_it_began_fails_the_tee(runtime: Runtime) -> None:
    data = os.urandom(50_000)
    cid = cid_of(data)
    losing = LosingSource(data)
    assert isinstance(losing, EarlySource)
    other = MemorySource(name="transcode", blobs={cid: data})
    resolver = Resolver(runtime.store, [losing, other])
    tee = resolver.watch(cid, lambda: None)
    assert tee is not None
    await settled(tee)
    assert tee.early
    # The viewers' bytes have no verified end: they see the failure (the blob itself was
    # delivered whole by the next source and is stored).
    assert isinstance(tee.error, UpstreamError)
    with pytest.raises(UpstreamError):
        async for _ in tee.reader():
            pass
    assert tee.path is not None
    assert await runtime.store.has(cid)
    assert losing.cancelled >= 1
