"""The resolver tells "no source has it" (404) from "sources failed" (retried, then 503)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from peerd.core.ids import Cid, cid_of
from peerd.delivery import Offer, Resolver
from peerd.errors import NotFound, Unavailable, UpstreamError
from peerd.runtime import Runtime
from tests.support.sources import MemorySource


@dataclass
class Flaky(MemorySource):
    """Fails its first ``failures`` requests: raising, or (``cut``) cutting a trusted body
    after its first chunk."""

    failures: int = 0
    cut: bool = False

    async def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        self.requests.append(cid)
        data = self.blobs.get(cid)
        failing = len(self.requests) <= self.failures
        if failing and not self.cut:
            raise UpstreamError(f"{self.name}: 503")
        if data is None:
            return
        chunks = self._cut(data) if failing else self._stream(data)
        yield Offer(self.name, "bucket", chunks, size=len(data), meta={"trusted": "1"})

    async def _cut(self, data: bytes) -> AsyncIterator[bytes]:
        yield data[: self.chunk]
        raise UpstreamError(f"{self.name}: body cut")


async def test_a_failing_source_is_retried_until_it_delivers(runtime: Runtime) -> None:
    data = os.urandom(10_000)
    cid = cid_of(data)
    src = Flaky(name="r2", blobs={cid: data}, failures=3)
    resolver = Resolver(runtime.store, [src], retry_s=30)
    path = await resolver.ensure_local(cid)
    assert path.read_bytes() == data
    assert len(src.requests) == 4
    assert resolver.m_retries._value.get() == 3


async def test_sources_that_keep_failing_are_unavailable_not_missing(runtime: Runtime) -> None:
    cid = cid_of(b"somewhere")
    absent = MemorySource(name="lan")
    down = MemorySource(name="r2", fail=True)
    resolver = Resolver(runtime.store, [absent, down], retry_s=0.3)
    with pytest.raises(Unavailable) as err:
        await resolver.ensure_local(cid)
    assert err.value.status == 503
    assert err.value.retry_after_s
    asked = len(down.requests)
    assert asked > 1
    assert resolver.m_unavailable._value.get() == 1
    # Not remembered as a miss: the next viewer's request asks again.
    with pytest.raises(Unavailable):
        await resolver.ensure_local(cid)
    assert len(down.requests) > asked


async def test_a_blob_no_source_has_is_not_found_at_once(runtime: Runtime) -> None:
    cid = cid_of(b"nowhere")
    sources = [MemorySource(name="lan"), MemorySource(name="r2")]
    resolver = Resolver(runtime.store, sources, retry_s=30)
    with pytest.raises(NotFound):
        await resolver.ensure_local(cid)
    assert [len(s.requests) for s in sources] == [1, 1]
    assert resolver.m_retries._value.get() == 0


async def test_a_streamed_body_cut_for_good_continues_from_the_retry(runtime: Runtime) -> None:
    data = os.urandom(300_000)
    cid = cid_of(data)
    src = Flaky(name="r2", blobs={cid: data}, failures=1, cut=True)
    resolver = Resolver(runtime.store, [src], retry_s=30)
    got = await resolver.open_stream(cid)
    assert got.chunks is not None  # relayed while being stored
    body = b"".join([c async for c in got.chunks])
    assert body == data
    assert len(src.requests) == 2
    assert await runtime.store.has(cid)
