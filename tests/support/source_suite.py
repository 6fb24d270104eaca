"""The conformance suite every :class:`~peerd.delivery.Source` passes.

Use it by subclassing :class:`SourceConformance` in a test module and providing a
``source_factory`` fixture: an async callable ``factory(blobs, lies) -> Source`` that builds a
source holding ``blobs`` (cid -> bytes) and sending the wrong bytes ``lies`` (cid -> bytes) for
some cids. The fixture owns cleanup (servers, peers, buckets) of whatever it starts.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import pytest

from peerd.core.ids import Cid, cid_of
from peerd.delivery import Resolver, Source
from peerd.errors import NotFound, PeerdError
from peerd.runtime import Runtime

SourceFactory = Callable[[dict[Cid, bytes], dict[Cid, bytes]], Awaitable[Source]]


async def _drain(source: Source, cid: Cid) -> list[bytes]:
    """Bytes of every offer for ``cid``; a NotFound from a stream counts as no offer."""
    out = []
    async for offer in source.offers(cid):
        try:
            out.append(b"".join([c async for c in offer.chunks]))
        except NotFound:
            pass
        finally:
            await offer.close()
    return out


class SourceConformance:
    """Shared behaviour of all sources."""

    async def test_delivers_held_blob(self, source_factory: SourceFactory) -> None:
        data = os.urandom(3 * 1024 * 1024 + 17)
        cid = cid_of(data)
        source = await source_factory({cid: data}, {})
        assert isinstance(source, Source)
        assert source.name
        assert source.timeout_s > 0
        got = await _drain(source, cid)
        assert got
        assert got[0] == data

    async def test_unknown_blob_gives_nothing(self, source_factory: SourceFactory) -> None:
        held = b"held"
        source = await source_factory({cid_of(held): held}, {})
        missing = cid_of(b"not held anywhere")
        try:
            assert await _drain(source, missing) == []
        except NotFound:
            pass

    async def test_resolver_fetches_and_verifies(
        self, source_factory: SourceFactory, runtime: Runtime
    ) -> None:
        data = os.urandom(200_000)
        cid = cid_of(data)
        source = await source_factory({cid: data}, {})
        resolver = Resolver(runtime.store, [source])
        path = await resolver.ensure_local(cid)
        assert await asyncio.to_thread(path.read_bytes) == data
        assert await runtime.store.has(cid)

    async def test_wrong_bytes_are_refused(
        self, source_factory: SourceFactory, runtime: Runtime
    ) -> None:
        data = os.urandom(100_000)
        cid = cid_of(data)
        source = await source_factory({cid: data}, {cid: os.urandom(100_000)})
        resolver = Resolver(runtime.store, [source])
        with pytest.raises(NotFound):
            await resolver.ensure_local(cid)
        assert not await runtime.store.has(cid)
        assert (await runtime.store.verify()).ok

    async def test_concurrent_requests_share_one_fetch(
        self, source_factory: SourceFactory, runtime: Runtime
    ) -> None:
        data = os.urandom(500_000)
        cid = cid_of(data)
        source = await source_factory({cid: data}, {})
        resolver = Resolver(runtime.store, [source])
        paths = await asyncio.gather(*(resolver.ensure_local(cid) for _ in range(20)))
        assert len(set(paths)) == 1
        assert resolver.m_fetches.labels(source=source.name, outcome="ok")._value.get() == 1

    async def test_errors_are_peerd_errors(self, source_factory: SourceFactory) -> None:
        """A malformed id never reaches the wire: sources get only valid cids, and any failure
        they raise is a PeerdError (never a bare library exception)."""
        source = await source_factory({}, {})
        cid = cid_of(b"anything")
        try:
            await _drain(source, cid)
        except PeerdError:
            pass
