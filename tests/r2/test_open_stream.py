"""Resolver.open_stream: a trusted source (R2) streams to the viewer while the blob is stored."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from peerd.core.ids import Cid, cid_of
from peerd.delivery import BlobStream, Resolver
from peerd.delivery.source import Offer
from peerd.errors import IntegrityError, NotFound
from peerd.replication.r2 import R2Client, blob_key
from peerd.replication.source import R2Source
from peerd.runtime import Runtime
from peerd.store import BlobStore
from tests.support.faultproxy import FaultProxy
from tests.support.s3server import MotoServer
from tests.support.sources import MemorySource


async def body(s: BlobStream) -> bytes:
    if s.path is not None:
        return await asyncio.to_thread(s.path.read_bytes)
    assert s.chunks is not None
    return b"".join([c async for c in s.chunks])


async def test_streams_from_r2_once_for_many_viewers(
    runtime: Runtime, client: R2Client, proxy: FaultProxy, moto: MotoServer, bucket: str
) -> None:
    data = os.urandom(3 * 1024 * 1024 + 5)
    cid = cid_of(data)
    await asyncio.to_thread(moto.put, bucket, blob_key(cid), data)
    resolver = Resolver(runtime.store, [R2Source(client)])
    streams = []
    for _ in range(4):
        streams += [asyncio.create_task(resolver.open_stream(cid)) for _ in range(5)]
        await asyncio.sleep(0)
    opened = await asyncio.gather(*streams)
    assert any(s.chunks is not None and s.size == len(data) for s in opened)
    bodies = await asyncio.gather(*(body(s) for s in opened))
    assert all(b == data for b in bodies)
    assert proxy.count("GET", "/blobs/") == 1
    assert await runtime.store.has(cid)
    local = await resolver.open_stream(cid)
    assert local.path is not None
    assert await resolver.ensure_local(cid) == local.path


async def test_wrong_bytes_abort_the_stream_before_it_completes(
    runtime: Runtime, client: R2Client, moto: MotoServer, bucket: str
) -> None:
    data = os.urandom(1024 * 1024)
    cid = cid_of(data)
    await asyncio.to_thread(moto.put, bucket, blob_key(cid), os.urandom(len(data)))
    resolver = Resolver(runtime.store, [R2Source(client)])
    s = await resolver.open_stream(cid)
    assert s.chunks is not None
    got: list[bytes] = []

    async def consume() -> None:
        assert s.chunks is not None
        async for chunk in s.chunks:
            got.append(chunk)

    with pytest.raises(IntegrityError):
        await consume()
    assert sum(map(len, got)) < len(data)  # the viewer never received a complete body
    assert not await runtime.store.has(cid)


async def test_untrusted_sources_are_verified_before_serving(runtime: Runtime) -> None:
    data = os.urandom(100_000)
    cid = cid_of(data)
    lan = MemorySource(name="lan", blobs={cid: data})
    resolver = Resolver(runtime.store, [lan])
    s = await resolver.open_stream(cid)
    assert s.path is not None
    assert s.chunks is None
    assert await body(s) == data
    with pytest.raises(NotFound):
        await resolver.open_stream(cid_of(b"nowhere"))


class _WinsTheRace(MemorySource):
    """A trusted source; just before it offers, another fetch stores the blob."""

    store: BlobStore | None = None

    async def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        data = self.blobs[cid]
        assert self.store is not None
        await self.store.put(data, expected=cid)
        yield Offer(self.name, "r2", self._stream(data), size=len(data), meta={"trusted": "1"})


async def test_stream_completes_from_the_file_when_the_store_already_had_the_blob(
    runtime: Runtime,
) -> None:
    data = os.urandom(700_000)
    cid = cid_of(data)
    source = _WinsTheRace(name="r2", blobs={cid: data}, chunk=50_000)
    source.store = runtime.store
    resolver = Resolver(runtime.store, [source])
    s = await resolver.open_stream(cid)
    assert s.chunks is not None  # streaming began before the store said it had the blob
    assert await body(s) == data
