"""BlobStore: atomic content-addressed writes, recovery, verification (see the package doc)."""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from peerd.catalog import Catalog
from peerd.catalog.media import dangling_segments, manifests
from peerd.core.ids import Cid, Hasher, cid_of, digest_of, is_cid, shard_of
from peerd.errors import IntegrityError, NotFound, PeerdError, StoreFull

log = logging.getLogger("peerd.store")

TMP_PREFIX = ".tmp-"
PUT_CHUNK = 1024 * 1024


@dataclass
class RecoveryReport:
    """What start-up recovery found and did."""

    temp_removed: int = 0
    orphans_removed: int = 0
    marked_absent: int = 0
    files_seen: int = 0


@dataclass
class VerifyReport:
    """Problems found by :meth:`BlobStore.verify`; empty lists mean consistent."""

    blobs_checked: int = 0
    missing: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    temp_files: list[str] = field(default_factory=list)
    size_mismatch: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)
    dangling_segments: list[str] = field(default_factory=list)
    bad_manifests: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems()

    def problems(self) -> dict[str, list[str]]:
        """Non-empty problem lists by name, in field order."""
        lists = ((f.name, getattr(self, f.name)) for f in fields(self))
        return {name: v for name, v in lists if isinstance(v, list) and v}


class BlobStore:
    """Content-addressed blob files plus their catalog rows."""

    def __init__(
        self,
        root: Path,
        catalog: Catalog,
        *,
        quota_bytes: int = 0,
        min_free_bytes: int = 0,
        on_write: Callable[[str, int], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = root
        self._root_name = str(root)
        self.catalog = catalog
        self.quota_bytes = quota_bytes
        self.min_free_bytes = min_free_bytes
        self.used_bytes = 0
        self.count = 0
        self._on_write = on_write
        self._clock = clock
        # Told the blob stored and the new usage whenever it grows, so eviction can start at once
        # rather than at its next round (a store at its quota cuts every blob it is fetching for
        # a viewer), and spare what was just stored.
        self.on_grow: Callable[[Cid, int], None] | None = None

    async def open(self) -> None:
        """Create the directory and load the usage counters from the catalog."""
        await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
        self.count, self.used_bytes = await self.catalog.present_stats()

    # -- paths ----------------------------------------------------------------------------------

    def path_for(self, cid: Cid) -> Path:
        """Where the blob's file lives (whether or not it exists)."""
        return self.root / shard_of(cid) / cid

    def file_name(self, cid: Cid) -> str:
        """:meth:`path_for` as a string, built without pathlib (the HTTP hot path stats it)."""
        return f"{self._root_name}/{shard_of(cid)}/{cid}"

    async def has(self, cid: Cid) -> bool:
        """True if the catalog says the blob is held locally."""
        row = await self.catalog.get_blob(cid)
        return row is not None and row.local_state == "present"

    async def open_path(self, cid: Cid) -> Path:
        """The file of a blob held locally; :class:`NotFound` if not held.

        A row whose file vanished (disk trouble, manual deletion) is marked absent here, so the
        delivery path fetches it again instead of failing forever.
        """
        if not await self.has(cid):
            raise NotFound(f"blob {cid} is not held")
        path = self.path_for(cid)
        if not await asyncio.to_thread(path.is_file):
            log.warning("blob file missing; marking absent", extra={"cid": cid})
            await self.catalog.mark_absent([cid])
            self.count, self.used_bytes = await self.catalog.present_stats()
            raise NotFound(f"blob {cid} is not held")
        return path

    async def read(self, cid: Cid) -> bytes:
        """The bytes of a held blob."""
        path = await self.open_path(cid)
        return await asyncio.to_thread(path.read_bytes)

    # -- writes ---------------------------------------------------------------------------------

    def _check_room(self, size: int) -> None:
        if self.quota_bytes and self.used_bytes + size > self.quota_bytes:
            raise StoreFull(
                f"store quota reached: {self.used_bytes + size} > {self.quota_bytes} bytes",
                used=self.used_bytes,
                quota=self.quota_bytes,
            )
        if self.min_free_bytes:
            try:
                free = shutil.disk_usage(self.root).free
            except OSError:
                return
            if free - size < self.min_free_bytes:
                raise StoreFull(
                    f"disk nearly full: {free} bytes free, keeping {self.min_free_bytes} in reserve"
                )

    async def put(self, data: bytes, *, kind: str = "segment", expected: Cid | None = None) -> Cid:
        """Store ``data`` and return its cid. Idempotent; verifies ``expected`` if given."""
        if expected is None:
            expected = await asyncio.to_thread(cid_of, data) if len(data) > 65536 else cid_of(data)

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(data), PUT_CHUNK):
                yield data[i : i + PUT_CHUNK]

        return await self.put_stream(chunks(), expected=expected, kind=kind)

    def batch(self) -> BlobBatch:
        """A :class:`BlobBatch`: blobs written now, made durable and committed together later."""
        return BlobBatch(self)

    async def put_stream(
        self,
        chunks: AsyncIterable[bytes],
        *,
        expected: Cid,
        kind: str = "segment",
        max_size: int | None = None,
    ) -> Cid:
        """Store streamed bytes that must hash to ``expected``; nothing is kept on mismatch."""
        if await self._already_held(expected):
            async for _ in chunks:  # drain so the producer is not left hanging
                break
            return expected
        shard = self.root / shard_of(expected)
        await asyncio.to_thread(shard.mkdir, exist_ok=True)
        tmp = shard / f"{TMP_PREFIX}{secrets.token_hex(8)}"
        hasher = Hasher()
        # Opening and unlinking a temp file are metadata operations that take microseconds;
        # doing them on the loop means no cancellation can fall between creating the file and
        # owning its descriptor. Writes run in a thread that is always waited for, so the
        # descriptor is never closed under a write still in flight.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            async for chunk in chunks:
                hasher.update(chunk)
                if max_size is not None and hasher.size > max_size:
                    raise IntegrityError(f"blob {expected} is larger than {max_size} bytes")
                self._check_room(hasher.size)
                await _settle_in_thread(_write_all, fd, chunk)
            if hasher.cid() != expected:
                raise IntegrityError(
                    f"bytes hash to {hasher.cid()}, expected {expected}", expected=expected
                )
            await _settle_in_thread(os.fsync, fd)
        except BaseException as exc:
            _close_unlink(fd, tmp)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"disk full while writing blob {expected}") from exc
            raise
        await _finish_despite_cancel(self._publish(fd, tmp, expected, hasher.size, kind))
        return expected

    async def _publish(self, fd: int, tmp: Path, cid: Cid, size: int, kind: str) -> None:
        """Close, rename into place and commit the row of a verified, fsynced temp file."""
        os.close(fd)
        await asyncio.to_thread(_rename_all, [(cid, tmp, self.path_for(cid))])
        await self._commit(cid, size, kind)

    async def _already_held(self, cid: Cid) -> bool:
        row = await self.catalog.get_blob(cid)
        if row is None or row.local_state != "present":
            return False
        return await asyncio.to_thread(self.path_for(cid).is_file)

    def _count_new(self, rows: list[tuple[Cid, int, str]], before: dict[Cid, Any]) -> None:
        for cid, size, kind in rows:
            row = before.get(cid)
            if row is None or row.local_state != "present":
                self.used_bytes += size
                self.count += 1
                if self.on_grow is not None:
                    self.on_grow(cid, self.used_bytes)
            if self._on_write is not None:
                self._on_write(kind, size)

    async def _commit(self, cid: Cid, size: int, kind: str) -> None:
        before = await self.catalog.get_blob(cid)
        await self.catalog.add_blob(cid, size, kind, self._clock())
        self._count_new([(cid, size, kind)], {cid: before})

    async def delete(self, cid: Cid) -> bool:
        """Remove a blob: the row first, then the file. True if it was held."""
        row = await self.catalog.get_blob(cid)
        existed = await self.catalog.delete_blob_row(cid)
        path = self.path_for(cid)
        try:
            await asyncio.to_thread(path.unlink)
        except FileNotFoundError:
            pass
        if row is not None and row.local_state == "present":
            self.used_bytes -= row.size
            self.count -= 1
        return existed

    async def evict_local(self, cid: Cid, *, replicated: bool = False) -> bool:
        """Drop the local copy but keep the row as ``absent`` (the blob lives elsewhere, e.g. R2);
        True if it was dropped.

        With ``replicated``, only while the row says R2 holds it and nothing pins it, checked in
        the write itself (:meth:`Catalog.evict_row`): the last copy never leaves. The row is
        updated first, so a crash leaves at worst an orphan file, never a row claiming a file
        that is gone.
        """
        row = await self.catalog.get_blob(cid)
        if row is None or row.local_state != "present":
            return False
        if not replicated:
            await self.catalog.mark_absent([cid])
        elif not await self.catalog.evict_row(cid):
            return False
        await asyncio.to_thread(self.path_for(cid).unlink, missing_ok=True)
        self.used_bytes -= row.size
        self.count -= 1
        return True

    # -- recovery and verification ----------------------------------------------------------------

    def _scan(self) -> tuple[list[Path], dict[str, Path]]:
        temps: list[Path] = []
        files: dict[str, Path] = {}
        if not self.root.is_dir():
            return temps, files
        for shard in os.scandir(self.root):
            if not shard.is_dir(follow_symlinks=False):
                continue
            for entry in os.scandir(shard.path):
                if entry.name.startswith(TMP_PREFIX):
                    temps.append(Path(entry.path))
                else:
                    files[entry.name] = Path(entry.path)
        return temps, files

    async def recover(self) -> RecoveryReport:
        """Full reconciliation after an unclean stop (see the package docstring)."""
        report = RecoveryReport()
        temps, files = await asyncio.to_thread(self._scan)
        report.files_seen = len(files)
        for tmp in temps:
            await asyncio.to_thread(tmp.unlink, missing_ok=True)
        report.temp_removed = len(temps)
        names = list(files)
        rows = await self.catalog.get_blobs([n for n in names if is_cid(n)])
        orphans = [n for n in names if n not in rows or rows[Cid(n)].local_state != "present"]
        for name in orphans:
            await asyncio.to_thread(files[name].unlink, missing_ok=True)
        report.orphans_removed = len(orphans)
        missing: list[str] = []
        async for batch in self.catalog.iter_present():
            missing.extend(cid for cid, _ in batch if cid not in files)
        if missing:
            await self.catalog.mark_absent(missing)
        report.marked_absent = len(missing)
        self.count, self.used_bytes = await self.catalog.present_stats()
        return report

    async def verify(
        self, *, deep: bool = True, progress: Callable[[int], None] | None = None
    ) -> VerifyReport:
        """Check catalog against files; ``deep`` re-hashes every blob. Changes nothing."""
        report = VerifyReport()
        temps, files = await asyncio.to_thread(self._scan)
        report.temp_files = [str(t) for t in temps]
        seen: set[str] = set()
        async for batch in self.catalog.iter_present():
            for cid, size in batch:
                seen.add(cid)
                report.blobs_checked += 1
                path = files.get(cid)
                if path is None:
                    report.missing.append(cid)
                    continue
                problem = await asyncio.to_thread(_check_file, path, cid, size, deep)
                if problem == "size":
                    report.size_mismatch.append(cid)
                elif problem == "hash":
                    report.corrupt.append(cid)
            if progress is not None:
                progress(len(batch))
        report.orphans = sorted(n for n in files if n not in seen)
        report.dangling_segments = await dangling_segments(self.catalog)
        async for media_id, data in manifests(self.catalog):
            if cid_of(data) != media_id:
                report.bad_manifests.append(media_id)
        return report


class BlobBatch:
    """Blobs written durably as they come and committed all together.

    Why a batch: a packaging job's blobs must all become rows in one step with its media, or
    none of them may (a crash in the middle of an ingest must not leave rows of blobs nothing
    references). :meth:`add` writes and fsyncs each blob to a temp file (in a thread, while the
    packager goes on); :meth:`commit` renames them into place, fsyncs each touched shard
    directory once and commits every row in one transaction. The store's rules hold: a row is
    committed only after its file and directory entry are durable; a crash leaves temp files or
    row-less files, both swept by :meth:`BlobStore.recover`; :meth:`abort` (or a cancelled
    :meth:`add`) removes the batch's temp files, and a :meth:`commit`, once started, finishes
    even if its caller is cancelled, so the batch ends all committed or all gone.
    """

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self._temps: dict[Cid, tuple[Path, int, str]] = {}
        self._held: set[Cid] = set()
        self._closed = False
        self.new_bytes = 0

    @property
    def new(self) -> list[Cid]:
        """Blobs this batch writes (not held before it), in the order added."""
        return list(self._temps)

    @property
    def held(self) -> list[Cid]:
        """Blobs added to this batch that the store already held (nothing written for them)."""
        return list(self._held)

    async def add(self, data: bytes, *, kind: str = "segment", cid: Cid | None = None) -> Cid:
        """Write ``data`` durably to a temp file (not yet committed) and return its cid.

        ``cid`` is for a caller that has just hashed ``data`` itself (the packager does, in its
        worker thread) and must be ``cid_of(data)``; without it the bytes are hashed here.
        """
        if self._closed:
            raise RuntimeError("blob batch already committed or aborted")
        if cid is None:
            cid = await asyncio.to_thread(cid_of, data) if len(data) > 65536 else cid_of(data)
        if cid in self._temps or cid in self._held:
            return cid
        store = self.store
        if await store._already_held(cid):
            self._held.add(cid)
            return cid
        store._check_room(self.new_bytes + len(data))
        shard = store.root / shard_of(cid)
        await asyncio.to_thread(shard.mkdir, exist_ok=True)
        tmp = shard / f"{TMP_PREFIX}{secrets.token_hex(8)}"
        # As in put_stream: the temp file is created on the loop so that no cancellation falls
        # between creating it and owning its descriptor; the write runs in a thread that is
        # always waited for.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            await _settle_in_thread(_write_synced, fd, data)
        except BaseException as exc:
            _close_unlink(fd, tmp)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(f"disk full while writing blob {cid}") from exc
            raise
        os.close(fd)
        if self._closed or cid in self._temps:
            # Committed or aborted (or the same blob added) while this write ran: the temp
            # file is not part of the batch, so it must not outlive this call.
            tmp.unlink(missing_ok=True)
            if self._closed:
                raise RuntimeError("blob batch committed or aborted during add")
            return cid
        self._temps[cid] = (tmp, len(data), kind)
        self.new_bytes += len(data)
        return cid

    async def commit(self) -> list[Cid]:
        """Make every added blob durable, rename it into place and commit all rows at once.

        Returns the cids written by this batch. On an error nothing of the batch is kept.
        """
        if self._closed:
            raise RuntimeError("blob batch already committed or aborted")
        self._closed = True
        if not self._temps:
            return []
        await _finish_despite_cancel(self._commit())
        return self.new

    async def _commit(self) -> None:
        store = self.store
        items = [(cid, tmp, store.path_for(cid)) for cid, (tmp, _, _) in self._temps.items()]
        rows = [(cid, size, kind) for cid, (_, size, kind) in self._temps.items()]
        try:
            await asyncio.to_thread(_rename_all, items)
            before = await store.catalog.get_blobs([c for c, _, _ in rows])
            async with store.catalog.transaction() as tx:
                await store.catalog.put_blob_rows(tx, rows, store._clock())
        except BaseException as exc:
            await asyncio.shield(self._discard(items))
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull("disk full while making a blob batch durable") from exc
            raise
        store._count_new(rows, before)

    async def _discard(self, items: list[tuple[Cid, Path, Path]]) -> None:
        """Remove the temp files and any renamed file whose row was not committed."""
        rows = await self.store.catalog.get_blobs([c for c, _, _ in items])

        def remove() -> None:
            for cid, tmp, final in items:
                tmp.unlink(missing_ok=True)
                row = rows.get(cid)
                if row is None or row.local_state != "present":
                    final.unlink(missing_ok=True)

        await asyncio.to_thread(remove)

    async def abort(self) -> None:
        """Drop every temp file of a batch that was not committed; idempotent."""
        if self._closed:
            return  # a commit ran: it kept everything or already discarded everything
        self._closed = True
        temps = [tmp for tmp, _, _ in self._temps.values()]
        self._temps.clear()
        self.new_bytes = 0

        def remove() -> None:
            for tmp in temps:
                tmp.unlink(missing_ok=True)

        await asyncio.to_thread(remove)


def _rename_all(items: list[tuple[Cid, Path, Path]]) -> None:
    """Rename durable temp files into place, then fsync each touched shard directory once."""
    dirs: dict[Path, None] = {}
    for _, tmp, final in items:
        tmp.replace(final)
        dirs[final.parent] = None
    for d in dirs:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _check_file(path: Path, cid: str, size: int, deep: bool) -> str | None:
    try:
        actual = path.stat().st_size
    except FileNotFoundError:
        return "size"
    if actual != size:
        return "size"
    if not deep:
        return None
    return None if hash_file(path) == digest_of(cid) else "hash"


def hash_file(
    path: Path, offset: int = 0, length: int | None = None, h: hashlib._Hash | None = None
) -> bytes | None:
    """SHA-256 of ``length`` bytes of ``path`` from ``offset`` (all of it: None), after what the
    hash ``h`` already holds; None if the file ends before ``length`` bytes."""
    h = h or hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        while length is None or length:
            chunk = f.read(1 << 20 if length is None else min(length, 1 << 20))
            if not chunk:
                return None if length else h.digest()
            h.update(chunk)
            if length is not None:
                length -= len(chunk)
    return h.digest()


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_synced(fd: int, data: bytes) -> None:
    _write_all(fd, data)
    os.fsync(fd)


async def _settle_in_thread(func: Callable[..., object], *args: object) -> None:
    """Run ``func`` in a thread; if cancelled, wait for the thread before re-raising."""
    future = asyncio.get_running_loop().run_in_executor(None, func, *args)
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait({future})
        raise


async def _finish_despite_cancel(step: Coroutine[object, object, None]) -> None:
    """Run ``step`` to completion even if the caller is cancelled, then re-raise the cancel."""
    task = asyncio.ensure_future(step)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        task.result()
        raise


def _close_unlink(fd: int, tmp: Path) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
    tmp.unlink(missing_ok=True)


__all__ = ["BlobBatch", "BlobStore", "PeerdError", "RecoveryReport", "VerifyReport", "hash_file"]
