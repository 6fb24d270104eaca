"""The resolver with in-memory sources; MemorySource also runs the shared conformance suite."""

import asyncio
import os

import pytest

from peerd.core.ids import Cid, cid_of
from peerd.delivery import Resolver
from peerd.delivery.resolver import source_order
from peerd.errors import NotFound
from peerd.runtime import Runtime
from tests.support.poll import until
from tests.support.source_suite import SourceConformance, SourceFactory
from tests.support.sources import MemorySource


class TestMemorySource(SourceConformance):
    @pytest.fixture
    def source_factory(self) -> SourceFactory:
        async def make(blobs: dict[Cid, bytes], lies: dict[Cid, bytes]) -> MemorySource:
            return MemorySource(blobs=dict(blobs), lies=dict(lies))

        return make


async def test_falls_through_to_next_source_and_reports_liar(runtime: Runtime) -> None:
    data = os.urandom(10_000)
    cid = cid_of(data)
    liar = MemorySource(name="lan", lies={cid: b"x" * 10_000})
    down = MemorySource(name="p2p", fail=True)
    good = MemorySource(name="r2", blobs={cid: data})
    resolver = Resolver(runtime.store, [liar, down, good])
    path = await resolver.ensure_local(cid)
    assert path.read_bytes() == data
    assert liar.reports == [("lan-peer", False, "integrity")]
    assert good.reports == [("r2-peer", True, "")]
    # Held now: no source is asked again.
    await resolver.ensure_local(cid)
    assert len(good.requests) == 1


async def test_timeout_moves_on(runtime: Runtime) -> None:
    data = b"slow or fast"
    cid = cid_of(data)
    slow = MemorySource(name="slow", blobs={cid: data}, stall_s=5, timeout_s=0.05)
    fast = MemorySource(name="fast", blobs={cid: data})
    resolver = Resolver(runtime.store, [slow, fast])
    await resolver.ensure_local(cid)
    assert resolver.m_fetches.labels(source="slow", outcome="timeout")._value.get() == 1


async def test_misses_are_cached_briefly(runtime: Runtime) -> None:
    now = [100.0]
    src = MemorySource()
    resolver = Resolver(runtime.store, [src], miss_ttl_s=5, clock=lambda: now[0])
    cid = cid_of(b"nowhere")
    for _ in range(3):
        with pytest.raises(NotFound):
            await resolver.ensure_local(cid)
    assert len(src.requests) == 1
    now[0] += 6
    with pytest.raises(NotFound):
        await resolver.ensure_local(cid)
    assert len(src.requests) == 2


async def test_short_stream_is_refused(runtime: Runtime) -> None:
    data = os.urandom(1000)
    cid = cid_of(data)
    src = MemorySource(blobs={cid: data})

    async def offers(c: Cid):  # type: ignore[no-untyped-def]
        from peerd.delivery import Offer

        async def short():  # type: ignore[no-untyped-def]
            yield data[:500]

        yield Offer("memory", "p", short(), size=1000)

    src.offers = offers  # type: ignore[method-assign]
    with pytest.raises(NotFound):
        await Resolver(runtime.store, [src]).ensure_local(cid)
    assert not await runtime.store.has(cid)


async def test_waiters_get_the_failure_too(runtime: Runtime) -> None:
    src = MemorySource(stall_s=0.05)
    cid = cid_of(b"z")
    resolver = Resolver(runtime.store, [src])
    results = await asyncio.gather(
        *(resolver.ensure_local(cid) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, NotFound) for r in results)


async def test_ensure_local_from_names_the_delivering_source(runtime: Runtime) -> None:
    data = os.urandom(10_000)
    cid = cid_of(data)
    down = MemorySource(name="lan", fail=True)
    good = MemorySource(name="r2", blobs={cid: data})
    resolver = Resolver(runtime.store, [down, good], registry=None)
    # Concurrent callers share one fetch; every one learns which source supplied the bytes.
    got = await asyncio.gather(*(resolver.ensure_local_from(cid) for _ in range(5)))
    assert {source for _, source in got} == {"r2"}
    assert len(good.requests) == 1
    path, source = await resolver.ensure_local_from(cid)
    assert (path.read_bytes(), source) == (data, "local")
    # open_stream of an untrusted source's blob hands back the stored file, with its source.
    other = os.urandom(5_000)
    ocid = cid_of(other)
    lan = MemorySource(name="lan", blobs={ocid: other})
    stream = await Resolver(runtime.store, [lan], registry=None).open_stream(ocid)
    assert (stream.chunks, stream.source) == (None, "lan")


async def test_a_viewer_joins_a_prefetch_in_flight(runtime: Runtime) -> None:
    data = os.urandom(300_000)
    cid = cid_of(data)
    src = MemorySource(name="r2", blobs={cid: data}, stall_s=0.05)
    resolver = Resolver(runtime.store, [src], registry=None)
    assert resolver.prefetch(cid)
    assert not resolver.prefetch(cid)  # already on its way
    stream = await resolver.open_stream(cid)
    assert stream.path is not None
    assert stream.path.read_bytes() == data
    assert src.requests == [cid]  # one upstream request for both
    await until(lambda: resolver.m_prefetch.labels(outcome="ok")._value.get() == 1)


async def test_prefetch_is_bounded_and_never_raises(runtime: Runtime) -> None:
    blobs = {cid_of(d): d for d in (os.urandom(1000) for _ in range(3))}
    a, b, c = blobs
    src = MemorySource(name="r2", blobs={a: blobs[a]}, stall_s=0.05)
    resolver = Resolver(runtime.store, [src], registry=None, max_prefetches=2)
    assert resolver.prefetch(a)
    assert resolver.prefetch(b)  # nowhere to be found: counted as failed, not raised
    assert not resolver.prefetch(c)  # two are running: viewers come first
    await until(lambda: resolver.m_prefetch.labels(outcome="failed")._value.get() == 1)
    assert not resolver.prefetch(b)  # its miss is cached for a moment
    await until(lambda: runtime.store.has(a))
    assert resolver.prefetch(c)  # room again
    assert resolver.m_prefetch.labels(outcome="skipped")._value.get() == 2
    await until(lambda: resolver.m_prefetch.labels(outcome="failed")._value.get() == 2)


class IdlePeers(MemorySource):
    """A peer source that looks idle (no peer known) but may hold blobs all the same (a peer
    that appeared a moment ago)."""

    def idle(self) -> bool:
        return True


async def test_peer_sources_that_look_idle_are_asked_after_the_first_that_does_not(
    runtime: Runtime,
) -> None:
    in_r2 = os.urandom(30_000)
    only_lan = os.urandom(20_000)
    lan = IdlePeers(name="lan", blobs={cid_of(only_lan): only_lan})
    p2p = IdlePeers(name="libp2p")
    r2 = MemorySource(name="r2", blobs={cid_of(in_r2): in_r2})
    transcode = MemorySource(name="transcode")
    resolver = Resolver(runtime.store, [lan, p2p, r2, transcode])
    assert source_order(resolver.sources) == [r2, lan, p2p, transcode]
    # R2 delivers: the idle sources are not asked at all.
    assert (await resolver.ensure_local_from(cid_of(in_r2)))[1] == "r2"
    assert lan.requests == p2p.requests == []
    # R2 lacks it: the idle sources are still asked, after R2 and before transcoding.
    assert (await resolver.ensure_local_from(cid_of(only_lan)))[1] == "lan"
    assert r2.requests[-1] == lan.requests[0] == cid_of(only_lan)
    assert p2p.requests == transcode.requests == []
    # A peer source with a peer keeps its place; so does an all-idle list.
    busy = MemorySource(name="lan")
    assert source_order([busy, p2p, r2]) == [busy, p2p, r2]
    assert source_order([lan, p2p]) == [lan, p2p]


async def test_a_fetch_cancelled_before_it_ran_leaves_no_tee_behind(runtime: Runtime) -> None:
    data = os.urandom(10_000)
    cid = cid_of(data)
    resolver = Resolver(runtime.store, [MemorySource(name="r2", blobs={cid: data})])
    tee, task = resolver._start_tee(cid)  # what shutdown does to a fetch not yet begun
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert tee.done
    assert tee.error is not None
    # The next viewer starts a fetch of its own instead of waiting on the dead one.
    s = await asyncio.wait_for(resolver.open_stream(cid), 5)
    assert s.path is not None  # (an untrusted source: verified and stored first)
    assert await asyncio.to_thread(s.path.read_bytes) == data


async def test_the_source_of_a_stored_blob_is_told(runtime: Runtime) -> None:
    """Tiering learns which blobs a peer sent (peerd.replication.tiering); a blob already held
    is no fetch."""
    data = os.urandom(10_000)
    cid = cid_of(data)
    told: list[tuple[Cid, str]] = []
    lan = MemorySource(name="lan", blobs={cid: data})
    resolver = Resolver(runtime.store, [lan], on_fetched=lambda c, s: told.append((c, s)))
    await resolver.ensure_local(cid)
    await resolver.ensure_local(cid)
    assert told == [(cid, "lan")]
