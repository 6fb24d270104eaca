"""libp2p: the asyncio<->trio bridge, and Libp2pSource between two in-process hosts (shared
conformance suite), each host in its own trio thread."""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
import trio.lowlevel

from peerd.config import load_settings
from peerd.core.ids import Cid
from peerd.delivery import Resolver
from peerd.errors import UpstreamError
from peerd.p2p.bridge import BridgeClosed, TrioThread, to_asyncio
from peerd.p2p.service import Libp2pSource, P2PService
from peerd.runtime import Runtime, open_runtime
from tests.r2.test_replication import make_media
from tests.support.poll import until
from tests.support.source_suite import SourceConformance, SourceFactory


@pytest.fixture(autouse=True)
def _libp2p_dropped_sockets() -> Iterator[None]:
    """py-libp2p 0.8.1 drops the socket of a deduplicated dialled connection without closing it
    (it is closed by the garbage collector with a ResourceWarning). Collect those here, after
    both hosts of a test stopped, so they do not surface in a later test."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


# The same dropped sockets may instead be collected by the guard fixture's gc.collect() at the
# start of the next test in this module; that is py-libp2p's leak, not the next test's.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <socket.socket:pytest.PytestUnraisableExceptionWarning"
)

P2P = {"host": "127.0.0.1", "tcp_port": 0, "ws_port": 0, "provide_tick_s": 60.0}


@pytest.fixture
async def bridge() -> AsyncIterator[TrioThread]:
    b = TrioThread()
    await b.start()
    try:
        yield b
    finally:
        assert await b.stop()


async def test_bridge_round_trip_both_ways(bridge: TrioThread) -> None:
    loop = asyncio.get_running_loop()

    async def in_trio(x: int) -> tuple[int, str]:
        await trio.lowlevel.checkpoint()

        async def in_asyncio() -> str:
            await asyncio.sleep(0)
            return "from asyncio"

        return x * 2, await to_asyncio(loop, in_asyncio())

    assert await bridge.call(in_trio, 21) == (42, "from asyncio")


async def test_bridge_errors_and_cancellation(bridge: TrioThread) -> None:
    async def boom() -> None:
        raise UpstreamError("nope")

    with pytest.raises(UpstreamError, match="nope"):
        await bridge.call(boom)

    started, cancelled = threading.Event(), trio.Event()

    async def forever() -> None:
        try:
            started.set()
            await trio.sleep_forever()
        finally:
            cancelled.set()

    fut = bridge.call(forever)
    await until(started.is_set)  # cancelled while running in trio, not before it got there
    fut.cancel()

    async def wait_cancelled() -> bool:
        with trio.fail_after(5):
            await cancelled.wait()
        return True

    assert await bridge.call(wait_cancelled)


async def test_bridge_stop_answers_pending_calls() -> None:
    b = TrioThread()
    await b.start()
    started = threading.Event()

    async def forever() -> None:
        started.set()
        await trio.sleep_forever()

    fut = b.call(forever)
    await until(started.is_set)
    assert await b.stop()
    with pytest.raises(BridgeClosed):
        await fut
    with pytest.raises(BridgeClosed):
        await b.call(trio.sleep, 0)


async def start_node(
    stack: AsyncExitStack, rt: Runtime, bootstrap: list[str] | None = None
) -> P2PService:
    if bootstrap:
        rt.settings.p2p.bootstrap = bootstrap
    svc = P2PService(rt)
    task = asyncio.create_task(svc.run(lambda: None))

    async def stop() -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    stack.push_async_callback(stop)
    async with asyncio.timeout(30):
        await svc.started.wait()
    return svc


@pytest.fixture
async def stack() -> AsyncIterator[AsyncExitStack]:
    async with AsyncExitStack() as s:
        yield s


@pytest.fixture
def settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    return load_settings(None, node={"state_dir": tmp_path / "state"}, http={"port": 0}, p2p=P2P)


async def open_peer(stack: AsyncExitStack, state: Path) -> Runtime:
    rt = await open_runtime(load_settings(None, node={"state_dir": state}, p2p=P2P))
    stack.push_async_callback(rt.close)
    return rt


class TestLibp2pSource(SourceConformance):
    @pytest.fixture
    def source_factory(
        self, runtime: Runtime, stack: AsyncExitStack, tmp_path: Path
    ) -> SourceFactory:
        async def make(blobs: dict[Cid, bytes], lies: dict[Cid, bytes]) -> Libp2pSource:
            peer_rt = await open_peer(stack, tmp_path / "peer")
            for cid, data in blobs.items():
                await peer_rt.store.put(data, expected=cid)
            for cid, wrong in lies.items():
                path = peer_rt.store.path_for(cid)
                path.chmod(0o644)
                path.write_bytes(wrong)
            server = await start_node(stack, peer_rt)
            tcp = [a for a in server.addrs if "/ws" not in a]
            client = await start_node(stack, runtime, bootstrap=tcp)
            assert await server.provide_now(list(blobs)) == list(blobs)
            return Libp2pSource(client, timeout_s=20, max_providers=4)

        return make


async def test_busy_provider_is_skipped(
    runtime: Runtime, stack: AsyncExitStack, tmp_path: Path
) -> None:
    peer_rt = await open_peer(stack, tmp_path / "peer")
    peer_rt.settings.p2p.max_inbound_transfers = 1
    data = os.urandom(200_000)
    cid = await peer_rt.store.put(data)
    server = await start_node(stack, peer_rt)
    client = await start_node(stack, runtime, [a for a in server.addrs if "/ws" not in a])
    await server.provide_now([cid])
    server.node._serving = 1  # type: ignore[union-attr]  # one transfer in progress
    source = Libp2pSource(client, timeout_s=20, max_providers=4)
    # Busy is a failure for now, not "not held": no offer, and the resolver is told to retry.
    with pytest.raises(UpstreamError):
        [o async for o in source.offers(cid)]
    assert server.node.counters.refused_busy == 1  # type: ignore[union-attr]
    fetch = asyncio.ensure_future(Resolver(runtime.store, [source], retry_s=60).ensure_local(cid))
    await until(lambda: server.node.counters.refused_busy >= 2)  # type: ignore[union-attr]
    server.node._serving = 0  # type: ignore[union-attr]
    path = await fetch
    assert path.read_bytes() == data


async def test_providers_say_whether_they_hold_a_full_copy(
    runtime: Runtime, stack: AsyncExitStack, tmp_path: Path
) -> None:
    """``/peerd/held/1.0.0``: a provider of a media id holding every blob counts as a copy
    (tiering's question before it removes the item from the bucket); one missing a blob does
    not; an id nobody provides has no holder, and every provider found answered."""
    peer_rt = await open_peer(stack, tmp_path / "peer")
    media_id, cids = await make_media(peer_rt, n=2, size=1000)
    server = await start_node(stack, peer_rt)
    client = await start_node(stack, runtime, [a for a in server.addrs if "/ws" not in a])
    assert await server.provide_now([media_id]) == [media_id]
    assert await client.full_copies(media_id) == ({peer_rt.identity.peer_id}, True)
    await peer_rt.store.delete(cids[-1])
    assert await client.full_copies(media_id) == (set(), True)
    assert await client.full_copies(str(cids[0])) == (set(), True)


async def test_ws_and_tcp_listen_on_separate_ports(runtime: Runtime, stack: AsyncExitStack) -> None:
    svc = await start_node(stack, runtime)
    tcp = [a for a in svc.addrs if "/ws" not in a]
    ws = [a for a in svc.addrs if "/ws" in a]
    assert tcp
    assert ws
    assert tcp[0].split("/tcp/")[1].split("/")[0] != ws[0].split("/tcp/")[1].split("/")[0]


async def test_source_looks_idle_while_no_peer_is_connected(
    runtime: Runtime, stack: AsyncExitStack, tmp_path: Path
) -> None:
    """The resolver's hint (``idle``): a node with no libp2p peer asks R2 first on a cold miss.
    Kept current by the network's events, inbound connections and disconnections included."""
    peer_rt = await open_peer(stack, tmp_path / "peer")
    server = await start_node(stack, peer_rt)
    served = Libp2pSource(server, timeout_s=20, max_providers=4)
    assert served.idle()  # listening, nobody connected
    client = await start_node(stack, runtime)
    source = Libp2pSource(client, timeout_s=20, max_providers=4)
    assert source.idle()
    assert await client.connect([a for a in server.addrs if "/ws" not in a][0])
    assert not source.idle()  # counted before the dial returned
    await until(lambda: not served.idle(), 10.0, 0.01)  # the server saw an inbound connection
    assert client.node is not None
    assert server.node is not None
    await client.bridge.call(client.node.host.disconnect, server.node.host.get_id())
    await until(source.idle, 10.0, 0.01)
    await until(served.idle, 10.0, 0.01)  # the server saw it go
