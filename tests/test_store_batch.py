"""Blob store batches (`BlobBatch`, `put_many`): one durability step, all-or-nothing commits."""

import asyncio
import errno
import fcntl
import mmap
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerd.core.ids import cid_of
from peerd.errors import IntegrityError, StoreFull
from peerd.runtime import Runtime
from peerd.store import blobs
from peerd.store.blobs import TMP_PREFIX


def _temps(root: Path) -> list[Path]:
    return list(root.rglob(f"{TMP_PREFIX}*"))


def _files(root: Path) -> set[str]:
    return {p.name for p in root.rglob("*") if p.is_file()}


@pytest.fixture(params=["syncfs", "fsync"])
def durability(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Run a test with syncfs, and again with the fallback of concurrent per-file fsyncs."""
    calls: list[str] = []
    real_syncfs = blobs._syncfs
    real_fsync = os.fsync

    def syncfs(root: Path) -> bool:
        calls.append("syncfs")
        return real_syncfs(root) if request.param == "syncfs" else False

    def fsync(fd: int) -> None:
        calls.append("fsync")
        real_fsync(fd)

    monkeypatch.setattr(blobs, "_syncfs", syncfs)
    monkeypatch.setattr(os, "fsync", fsync)
    yield request.param
    if request.param == "syncfs":
        assert "syncfs" in calls


async def test_put_many_stores_all_and_dedupes(runtime: Runtime, durability: str) -> None:
    store = runtime.store
    old = await store.put(b"held before")
    items = [
        (b"one", "init"),
        (b"two" * 50_000, "segment"),
        (b"one", "init"),
        (b"held before", "segment"),
    ]
    cids = await store.put_many(items)
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
        await store.put_many(
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
        task = asyncio.ensure_future(store.put_many(items))
        for _ in range(step):
            await asyncio.sleep(0)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        held = [await store.has(cid_of(d)) for d, _ in items]
        assert all(held) or not any(held), (step, held)
        report = await store.verify()
        assert report.ok, (step, report.problems())
        assert store.count == len(await runtime.catalog.get_blobs(_files(store.root)))


def _odirect_possible(directory: Path) -> bool:
    """Whether the file system under ``directory`` opens files with O_DIRECT at all."""
    probe = directory / "odirect-probe"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o644)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    finally:
        probe.unlink(missing_ok=True)
    os.close(fd)
    return True


def _aligned(data: bytes, shift: int = 0) -> memoryview:
    buf = mmap.mmap(-1, len(data) + shift + 1, flags=mmap.MAP_PRIVATE)
    buf[shift : shift + len(data)] = data
    return memoryview(buf)[shift : shift + len(data)]


@pytest.mark.parametrize("size", [100, 4096, 3 * 4096, 3 * 4096 + 17, (1 << 20) + 5])
@pytest.mark.parametrize("buffer", ["aligned", "misaligned", "bytes"])
async def test_direct_add_stores_exact_bytes(runtime: Runtime, size: int, buffer: str) -> None:
    """``add(direct=True)``: whatever the length and the buffer's alignment, the blob is
    stored byte for byte (direct where possible, through the page cache otherwise)."""
    store = runtime.store
    data = os.urandom(size)
    view = {"aligned": _aligned(data), "misaligned": _aligned(data, 1), "bytes": data}[buffer]
    batch = store.batch()
    cid = await batch.add(view, cid=cid_of(data), direct=True)  # type: ignore[arg-type]
    await batch.commit()
    assert (await store.open_path(cid)).read_bytes() == data
    assert (await store.verify(deep=True)).ok


@pytest.mark.parametrize("case", ["aligned", "misaligned", "no-direct-io"])
def test_write_direct_goes_direct_or_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
) -> None:
    """``_write_direct`` goes direct with an aligned buffer where the file system takes
    O_DIRECT (the test's temp dir). Where it cannot (the kernel refuses a misaligned buffer;
    a file system without direct I/O, simulated by F_SETFL refusing O_DIRECT) it writes
    nothing, so the ordinary write that follows starts from an empty file. Either way the
    descriptor is left as opened and the file holds exactly the bytes."""
    path = tmp_path / "blob"
    data = os.urandom(5 * 4096 + 123)
    expect = case == "aligned" and _odirect_possible(tmp_path)
    assert expect or case != "aligned", "the test's temp dir should allow O_DIRECT"
    if case == "no-direct-io":
        real = fcntl.fcntl

        def refuse(fd: int, cmd: int, arg: int = 0) -> int:
            if cmd == fcntl.F_SETFL and arg & os.O_DIRECT:
                raise OSError(errno.EINVAL, "Invalid argument")
            return real(fd, cmd, arg)

        monkeypatch.setattr(fcntl, "fcntl", refuse)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        view = _aligned(data, 1 if case == "misaligned" else 0)
        went_direct = blobs._write_direct(fd, view)  # type: ignore[arg-type]
        assert went_direct == expect
        if not went_direct:
            assert os.fstat(fd).st_size == 0
            blobs._write_direct_or_buffered(fd, view)  # type: ignore[arg-type]
        assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT
    finally:
        os.close(fd)
    assert path.read_bytes() == data


@pytest.mark.parametrize("direct", [False, True])
async def test_batch_disk_full_on_either_write_path(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch, direct: bool
) -> None:
    store = runtime.store
    batch = store.batch()
    await batch.add(b"fits")

    def full(fd: int, data: bytes | memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    data = _aligned(os.urandom(64 * 1024))
    with pytest.raises(StoreFull, match="disk full"):
        await batch.add(data, direct=direct)  # type: ignore[arg-type]
    monkeypatch.undo()
    await batch.abort()
    assert store.count == 0
    assert _files(store.root) == set()
