"""MediaResolver: a media item the catalog lacks, found through the sources (fakes), bounded."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator

import pytest

from peerd.catalog.media import media_exists, media_manifest
from peerd.core.ids import Cid, cid_of
from peerd.delivery.media import MediaResolver
from peerd.delivery.source import Offer
from peerd.errors import BudgetSpent, NotFound, Unavailable
from peerd.runtime import Runtime
from tests.support.sources import MemorySource, one_rendition


def _media() -> tuple[Cid, bytes]:
    media_id, data = one_rendition([cid_of(os.urandom(64)) for _ in range(3)])
    return Cid(media_id), data


async def test_concurrent_requests_make_one_lookup_and_record_the_manifest(
    runtime: Runtime,
) -> None:
    media_id, data = _media()
    src = MemorySource(name="libp2p", blobs={media_id: data}, stall_s=0.05)
    finder = MediaResolver(runtime.catalog, [src])
    got = await asyncio.gather(*(finder.ensure_media(media_id) for _ in range(10)))
    assert got == [data] * 10
    assert src.requests == [media_id]
    assert await media_manifest(runtime.catalog, media_id) == data
    # Recorded: the next request is the catalog's, no source is asked.
    assert await finder.ensure_media(media_id) == data
    assert src.requests == [media_id]
    assert finder.m_lookups.labels(source="libp2p", outcome="ok")._value.get() == 1
    # Its blobs come on demand: the catalog is consistent without them.
    report = await runtime.store.verify()
    assert report.ok, report.problems()


async def test_unknown_media_is_not_found_and_remembered_briefly(runtime: Runtime) -> None:
    now = [100.0]
    src = MemorySource(name="lan")
    finder = MediaResolver(runtime.catalog, [src], miss_ttl_s=5.0, clock=lambda: now[0])
    unknown = cid_of(b"nobody has this")
    for _ in range(3):
        with pytest.raises(NotFound):
            await finder.ensure_media(unknown)
    assert src.requests == [unknown]
    now[0] += 6.0
    with pytest.raises(NotFound):
        await finder.ensure_media(unknown)
    assert src.requests == [unknown, unknown]
    # Not a content id: no manifest can hash to it, so no source is asked.
    with pytest.raises(NotFound):
        await finder.ensure_media("not-a-cid")
    assert src.requests == [unknown, unknown]


async def test_failing_sources_are_unavailable_not_missing(runtime: Runtime) -> None:
    media_id, data = _media()
    skew = [0.0]
    down = MemorySource(name="r2", fail=True)
    finder = MediaResolver(
        runtime.catalog,
        [down],
        retry_s=0.3,
        fail_ttl_s=2.0,
        clock=lambda: time.monotonic() + skew[0],
    )
    with pytest.raises(Unavailable) as info:
        await finder.ensure_media(media_id)
    assert info.value.status == 503
    assert info.value.retry_after_s is not None
    asked = len(down.requests)
    assert asked > 1  # retried within retry_s
    # Remembered briefly: the next request is answered at once, without asking again.
    with pytest.raises(Unavailable):
        await finder.ensure_media(media_id)
    assert len(down.requests) == asked
    # Not remembered as missing: once the source is back, a later request finds it.
    skew[0] += 2.5
    down.fail = False
    down.blobs[media_id] = data
    assert await finder.ensure_media(media_id) == data


async def test_bytes_that_are_not_the_media_are_refused_and_never_recorded(
    runtime: Runtime,
) -> None:
    media_id, data = _media()
    other_id, other = _media()
    liar = MemorySource(name="lan", lies={media_id: other})
    finder = MediaResolver(runtime.catalog, [liar])
    with pytest.raises(NotFound):
        await finder.ensure_media(media_id)
    assert liar.reports == [("lan-peer", False, "integrity")]
    assert not await media_exists(runtime.catalog, media_id)
    assert not await media_exists(runtime.catalog, other_id)
    # Bytes that hash to the id but are no manifest: refused the same way.
    junk = b'{"not": "a manifest"}'
    junk_id = cid_of(junk)
    finder = MediaResolver(runtime.catalog, [MemorySource(name="r2", blobs={junk_id: junk}), liar])
    with pytest.raises(NotFound):
        await finder.ensure_media(junk_id)
    assert not await media_exists(runtime.catalog, junk_id)
    # A liar first and an honest source after it: the honest bytes are recorded.
    honest = MemorySource(name="r2", blobs={media_id: data})
    finder = MediaResolver(runtime.catalog, [liar, honest])
    assert await finder.ensure_media(media_id) == data
    assert await media_manifest(runtime.catalog, media_id) == data


class _SpentBucket(MemorySource):
    """The bucket source of a node whose month's class B budget is used up."""

    async def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        self.requests.append(cid)
        raise BudgetSpent("class B budget used up")
        yield  # pragma: no cover - an async generator that raises at its first step


async def test_a_spent_budget_is_503_at_once_with_its_retry_after(runtime: Runtime) -> None:
    """The bucket cannot be asked this month: no wait of retry_s (it outlasted the player's
    own timeout), the budget's Retry-After, and remembered as such."""
    media_id, _ = _media()
    lan = MemorySource(name="lan")
    bucket = _SpentBucket(name="r2")
    finder = MediaResolver(runtime.catalog, [lan, bucket], retry_s=30.0, fail_ttl_s=5.0)
    started = time.monotonic()
    with pytest.raises(BudgetSpent) as info:
        await finder.ensure_media(media_id)
    assert time.monotonic() - started < 25.0  # not retried until retry_s ran out
    assert info.value.status == 503
    assert info.value.retry_after_s == BudgetSpent.retry_after_s
    assert bucket.requests == [media_id]  # asked once
    assert lan.requests == [media_id]  # the other source had its turn
    with pytest.raises(BudgetSpent):
        await finder.ensure_media(media_id)
    assert bucket.requests == [media_id]
    assert finder.m_lookups.labels(source="r2", outcome="budget")._value.get() == 1
