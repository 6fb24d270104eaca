"""Blob store: atomic puts, integrity, quota, delete order, recovery and verify."""

import os
from collections.abc import AsyncIterator

import pytest

from peerd.core.ids import cid_of
from peerd.errors import IntegrityError, NotFound, StoreFull
from peerd.runtime import Runtime
from peerd.store.blobs import TMP_PREFIX


async def _chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


async def test_put_read_dedupe(runtime: Runtime) -> None:
    store = runtime.store
    cid = await store.put(b"segment-bytes")
    assert cid == cid_of(b"segment-bytes")
    assert await store.read(cid) == b"segment-bytes"
    assert await store.put(b"segment-bytes") == cid
    assert store.count == 1
    assert store.used_bytes == len(b"segment-bytes")
    path = await store.open_path(cid)
    assert path.name == cid
    assert oct(path.stat().st_mode & 0o777) == "0o644"


async def test_put_expected_mismatch_stores_nothing(runtime: Runtime) -> None:
    with pytest.raises(IntegrityError):
        await runtime.store.put(b"evil", expected=cid_of(b"good"))
    assert runtime.store.count == 0
    assert not any(runtime.store.root.rglob("*")) or all(
        p.is_dir() for p in runtime.store.root.rglob("*")
    )


async def test_put_stream_verifies(runtime: Runtime) -> None:
    store = runtime.store
    good = cid_of(b"abcdef")
    assert await store.put_stream(_chunks(b"abc", b"def"), expected=good) == good
    assert await store.read(good) == b"abcdef"
    other = cid_of(b"123456")
    with pytest.raises(IntegrityError):
        await store.put_stream(_chunks(b"123", b"457"), expected=other)
    assert not await store.has(other)
    leftovers = [p for p in store.root.rglob(f"{TMP_PREFIX}*")]
    assert leftovers == []


async def test_put_stream_size_cap(runtime: Runtime) -> None:
    cid = cid_of(b"x" * 100)
    with pytest.raises(IntegrityError, match="larger"):
        await runtime.store.put_stream(_chunks(b"x" * 60, b"x" * 40), expected=cid, max_size=50)


async def test_quota(runtime: Runtime) -> None:
    store = runtime.store
    store.quota_bytes = 10
    await store.put(b"123456")
    with pytest.raises(StoreFull, match="quota"):
        await store.put(b"abcdef")
    assert store.count == 1


async def test_delete_row_then_file(runtime: Runtime) -> None:
    store = runtime.store
    cid = await store.put(b"gone soon")
    path = store.path_for(cid)
    assert await store.delete(cid)
    assert not path.exists()
    assert await runtime.catalog.get_blob(cid) is None
    with pytest.raises(NotFound):
        await store.read(cid)
    assert store.count == 0
    assert store.used_bytes == 0


async def test_missing_file_becomes_absent(runtime: Runtime) -> None:
    store = runtime.store
    cid = await store.put(b"vanishing")
    store.path_for(cid).unlink()
    with pytest.raises(NotFound):
        await store.open_path(cid)
    row = await runtime.catalog.get_blob(cid)
    assert row is not None
    assert row.local_state == "absent"


async def test_recover_and_verify(runtime: Runtime) -> None:
    store = runtime.store
    keep = await store.put(b"keep me")
    lost = await store.put(b"file will vanish")
    store.path_for(lost).unlink()
    orphan = cid_of(b"orphan")
    store.path_for(orphan).parent.mkdir(exist_ok=True)
    store.path_for(orphan).write_bytes(b"orphan")
    tmp = store.path_for(keep).parent / f"{TMP_PREFIX}dead"
    tmp.write_bytes(b"half")
    report = await store.verify()
    assert not report.ok
    assert report.missing == [lost]
    assert report.orphans == [orphan]
    assert len(report.temp_files) == 1
    rec = await store.recover()
    assert (rec.temp_removed, rec.orphans_removed, rec.marked_absent) == (1, 1, 1)
    report = await store.verify()
    assert report.ok, report.problems()
    assert await store.read(keep) == b"keep me"


async def test_verify_detects_corruption(runtime: Runtime) -> None:
    store = runtime.store
    cid = await store.put(b"pristine bytes")
    with store.path_for(cid).open("r+b") as f:
        f.write(b"P")
    report = await store.verify()
    assert report.corrupt == [cid]
    quick = await store.verify(deep=False)
    assert quick.ok
    with store.path_for(cid).open("ab") as f:
        f.write(b"more")
    assert (await store.verify(deep=False)).size_mismatch == [cid]


async def test_evict_local_keeps_row(runtime: Runtime) -> None:
    store = runtime.store
    cid = await store.put(b"in r2 too")
    await store.evict_local(cid)
    row = await runtime.catalog.get_blob(cid)
    assert row is not None
    assert row.local_state == "absent"
    assert not store.path_for(cid).exists()
    assert (await store.verify()).ok


async def test_disk_full_is_store_full(runtime: Runtime, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    real_write = os.write

    def full(fd: int, data: bytes | memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(StoreFull, match="disk full"):
        await runtime.store.put(b"does not fit")
    monkeypatch.setattr(os, "write", real_write)
    assert runtime.store.count == 0
    assert list(runtime.store.root.rglob(f"{TMP_PREFIX}*")) == []


async def test_cancel_at_any_moment_leaves_store_consistent(runtime: Runtime) -> None:
    """A put cancelled at any await point leaves either the whole blob (file and row) or nothing."""
    import asyncio

    store = runtime.store
    for step in range(40):
        data = os.urandom(3 * 65536 + step)
        parts = [data[i : i + 65536] for i in range(0, len(data), 65536)]

        async def stream(parts: list[bytes] = parts) -> AsyncIterator[bytes]:
            for p in parts:
                await asyncio.sleep(0)
                yield p

        streamed = asyncio.ensure_future(store.put_stream(stream(), expected=cid_of(data)))
        whole = asyncio.ensure_future(store.put(data[::-1]))
        for _ in range(step):
            await asyncio.sleep(0)
        streamed.cancel()
        whole.cancel()
        await asyncio.gather(streamed, whole, return_exceptions=True)
        report = await store.verify()
        assert report.ok, (step, report)
        for cid in (cid_of(data), cid_of(data[::-1])):
            assert await store.has(cid) == (await runtime.catalog.get_blob(cid) is not None)
