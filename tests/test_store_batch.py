"""Blob store batches (`BlobBatch`, `put_many`): all-or-nothing commits."""

import asyncio
import errno
import os
from pathlib import Path

import pytest

from peerd.core.ids import cid_of
from peerd.errors import IntegrityError, StoreFull
from peerd.runtime import Runtime
from peerd.store.blobs import TMP_PREFIX
from tests.support.store import put_many


def _temps(root: Path) -> list[Path]:
    return list(root.rglob(f"{TMP_PREFIX}*"))


def _files(root: Path) -> set[str]:
    return {p.name for p in root.rglob("*") if p.is_file()}


async def test_put_many_stores_all_and_dedupes(runtime: Runtime) -> None:
    store = runtime.store
    old = await store.put(b"held before")
    items = [
        (b"one", "init"),
        (b"two" * 50_000, "segment"),
        (b"one", "init"),
        (b"held before", "segment"),
    ]
    cids = await put_many(store, items)
    assert cids == [cid_of(d) for d, _ in items]
    assert cids[3] == old
    for (data, _), cid in zip(items, cids, strict=True):
        assert await store.read(cid) == data
    assert store.count == 3
    assert store.used_bytes == len(b"held before") + 3 + 150_000
    assert (await runtime.catalog.get_blob(cids[0])).kind == "init"  # type: ignore[union-attr]
    assert _temps(store.root) == []
    report = await store.verify()
    assert report.ok, report.problems()


async def test_put_many_mismatch_stores_nothing(runtime: Runtime) -> None:
    store = runtime.store
    with pytest.raises(IntegrityError):
        await put_many(
            store,
            [(b"good", "segment"), (b"evil", "segment")],
            expected=[cid_of(b"good"), cid_of(b"other")],
        )
    assert store.count == 0
    assert not await store.has(cid_of(b"good"))
    assert _files(store.root) == set()


async def test_batch_abort_leaves_nothing(runtime: Runtime) -> None:
    store = runtime.store
    batch = store.batch()
    cids = [await batch.add(os.urandom(70_000 + i)) for i in range(3)]
    assert len(_temps(store.root)) == 3
    assert not any([await store.has(c) for c in cids])
    await batch.abort()
    await batch.abort()  # idempotent
    assert _files(store.root) == set()
    with pytest.raises(RuntimeError):
        await batch.add(b"late")
    assert (await store.verify()).ok


async def test_batch_disk_full(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    store = runtime.store
    batch = store.batch()
    await batch.add(b"fits")

    def full(fd: int, data: bytes | memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    real_write = os.write
    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StoreFull, match="disk full"):
        await batch.add(b"does not fit")
    monkeypatch.setattr(os, "write", real_write)
    await batch.abort()
    assert store.count == 0
    assert _files(store.root) == set()


async def test_batch_quota_counts_pending_bytes(runtime: Runtime) -> None:
    store = runtime.store
    store.quota_bytes = 10
    batch = store.batch()
    await batch.add(b"123456")
    with pytest.raises(StoreFull, match="quota"):
        await batch.add(b"abcdef")
    assert await batch.commit() == [cid_of(b"123456")]
    assert store.count == 1


async def test_failed_commit_discards_every_file(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A commit whose transaction fails keeps no renamed file and no temp file."""
    store = runtime.store
    batch = store.batch()
    for i in range(4):
        await batch.add(os.urandom(1000 + i))

    async def broken(*args: object) -> None:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(type(runtime.catalog), "put_blob_rows", staticmethod(broken))
    with pytest.raises(OSError, match="I/O error"):
        await batch.commit()
    assert _files(store.root) == set()
    assert store.count == 0
    assert (await store.verify()).ok


async def test_cancel_put_many_at_any_moment_is_all_or_nothing(runtime: Runtime) -> None:
    """A put_many cancelled at any await point commits every one of its blobs or none."""
    store = runtime.store
    for step in range(0, 60, 3):
        items = [(os.urandom(40_000 + step * 7 + i), "segment") for i in range(4)]
        task = asyncio.ensure_future(put_many(store, items))
        for _ in range(step):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        held = [await store.has(cid_of(d)) for d, _ in items]
        assert all(held) or not any(held), (step, held)
        report = await store.verify()
        assert report.ok, (step, report.problems())
        assert store.count == len(await runtime.catalog.get_blobs(_files(store.root)))
