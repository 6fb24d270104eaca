"""A whole media item pulled over any Source (``peerd.delivery.pull``), here an in-memory one;
R2 (tests/r2/test_replication.py) and a named LAN peer (tests/test_lan.py) run the same code."""

import os
from collections.abc import Coroutine
from typing import Any

import pytest

from peerd.catalog.media import media_exists
from peerd.core.ids import cid_of
from peerd.delivery.pull import PullReport, pull_media
from peerd.errors import IntegrityError, NotFound
from peerd.runtime import Runtime
from tests.support.sources import MemorySource, one_rendition


async def test_pull_verifies_every_byte_records_last_and_resumes(runtime: Runtime) -> None:
    data = [os.urandom(300)] + [os.urandom(5000 + i) for i in range(4)]
    cids = [cid_of(b) for b in data]
    media_id, manifest = one_rendition(cids)
    source = MemorySource(blobs=dict(zip(cids, data, strict=True)), lies={cids[2]: b"not it"})

    async def get_manifest() -> bytes:
        return manifest

    def pull(media: str = media_id) -> Coroutine[Any, Any, PullReport]:
        return pull_media(runtime.catalog, runtime.store, media, get_manifest, source)

    with pytest.raises(IntegrityError, match="does not hash"):
        await pull(cid_of(b"another manifest"))
    # A lying source: reported, nothing of the lie kept, nothing recorded.
    with pytest.raises(IntegrityError):
        await pull()
    assert ("memory-peer", False, "integrity") in source.reports
    assert not await runtime.store.has(cids[2])
    assert not await media_exists(runtime.catalog, media_id)

    source.lies.clear()
    held = {c for c in cids if await runtime.store.has(c)}
    source.requests.clear()
    seen: list[int] = []
    report = await pull_media(
        runtime.catalog, runtime.store, media_id, get_manifest, source, progress=seen.append
    )
    assert report.recorded
    assert report.fetched == len(cids) - len(held)
    assert sorted(source.requests) == sorted(set(cids) - held)  # resumed: held blobs not asked
    assert sum(seen) == sum(map(len, data))
    assert report.bytes == sum(len(b) for c, b in zip(cids, data, strict=True) if c not in held)
    for c, b in zip(cids, data, strict=True):
        assert await runtime.store.read(c) == b
    assert await media_exists(runtime.catalog, media_id)
    again = await pull()
    assert (again.fetched, again.recorded) == (0, False)


async def test_a_blob_the_source_lacks_fails_the_pull(runtime: Runtime) -> None:
    data = [os.urandom(100), os.urandom(200)]
    cids = [cid_of(b) for b in data]
    media_id, manifest = one_rendition(cids)
    source = MemorySource(blobs={cids[0]: data[0]})

    async def get_manifest() -> bytes:
        return manifest

    with pytest.raises(NotFound, match=cids[1]):
        await pull_media(runtime.catalog, runtime.store, media_id, get_manifest, source)
    assert not await media_exists(runtime.catalog, media_id)
