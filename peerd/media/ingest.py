"""Ingest: package files into the blob store and the catalog, and produce on-demand segments.

`Ingestor` is the async API the CLI (`peerd ingest`), the daemon's HTTP API and the delivery
resolver call. Theory of operation:

* **Worker.** `peerd.media.package.package` is blocking PyAV work; it runs in a thread
  (`asyncio.to_thread`). A thread and not a process: libav releases the GIL while it decodes,
  encodes and muxes, x264 and the decoders run their own threads, and the sink hands each
  finished blob back to the event loop (`run_coroutine_threadsafe`) without pickling megabytes
  across a process boundary. One packaging job runs at a time per Ingestor (the machine's cores
  are already used by the encoder threads).
* **Atomicity.** Blobs are stored as they are produced (each one durably, by the BlobStore); the
  catalog rows of the media (media, renditions, segments) are written in ONE transaction after
  every blob is stored. If anything fails - bad input, a file removed mid-ingest, a full disk,
  cancellation - the blobs this job added that no catalog row references are deleted again, so
  the catalog never shows partial media and the store keeps no orphans.
* **Idempotence.** Packaging is deterministic, so ingesting the same file twice (or on another
  node) gives the same blobs and the same media id; the second time no blob is new and the media
  row already exists. Unless `force` is set, a file whose path and size:mtime signature are
  already in the catalog with the same packaging options is not even re-packaged; other options
  (`--container ts` after fMP4) make another media item, and the first one stays.
* **On demand.** `produce_segment(media_id, rendition_id, seq)` makes one segment of a ladder
  rendition listed as on demand, from the same segment of its source rendition, stores it and
  records its id in the catalog. Concurrent requests for the same segment share one job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import importlib
import json
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiosqlite

from peerd.catalog import Catalog
from peerd.catalog.media import (
    init_cid,
    is_referenced,
    media_from,
    media_manifest,
    record_media,
    record_produced,
    segment_cid,
)
from peerd.core import manifest as mf
from peerd.core.ids import Cid
from peerd.errors import MediaError, NotFound, PeerdError
from peerd.media.options import PackagingOptions
from peerd.store import BlobBatch, BlobStore

log = logging.getLogger("peerd.media")

MEDIA_SUFFIXES = frozenset(
    {".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".ts", ".m2ts", ".mpg", ".mpeg", ".flv"}
    | {".m4a", ".mp3", ".aac", ".flac", ".ogg", ".opus", ".wav", ".mka"}
)

MAX_PENDING_PUTS = 4

ProgressFn = Callable[[float, float], None]
"""progress(done_seconds, total_seconds) in media seconds, called from the worker thread."""

CommitHook = Callable[[aiosqlite.Connection, mf.Manifest, Cid], Awaitable[None]]
"""Called inside the transaction that adds a new media item (e.g. to queue replication)."""


@dataclass(frozen=True)
class IngestResult:
    """The outcome of ingesting one file."""

    path: Path
    ok: bool
    media_id: Cid | None = None
    error: str | None = None
    error_code: str | None = None
    new_blobs: int = 0
    reused_blobs: int = 0
    bytes_added: int = 0
    duration_s: float = 0.0
    wall_s: float = 0.0
    skipped: bool = False
    renditions: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    """Streams of the file that were not packaged, and why (e.g. bitmap subtitles)."""

    @property
    def speed(self) -> float:
        """Media seconds packaged per wall-clock second (x real time)."""
        return self.duration_s / self.wall_s if self.wall_s > 0 else 0.0

    def as_json(self) -> dict[str, Any]:
        """Every field, JSON-ready: what ``peerd ingest --json`` prints and the daemon sends."""
        out = asdict(self)
        out["path"] = str(self.path)
        out["renditions"] = list(self.renditions)
        out["warnings"] = list(self.warnings)
        return out


class MediaMetrics:
    """Prometheus metrics of packaging, defined on the runtime's registry."""

    def __init__(self, registry: Any) -> None:
        from prometheus_client import Counter

        self.ingests = Counter(
            "peerd_media_ingests",
            "Files ingested, by result (ok, failed, unchanged)",
            ["result"],
            registry=registry,
        )
        self.media_seconds = Counter(
            "peerd_media_packaged_seconds", "Media seconds packaged", registry=registry
        )
        self.wall_seconds = Counter(
            "peerd_media_packaging_wall_seconds",
            "Wall-clock seconds spent packaging (speed = packaged / wall)",
            registry=registry,
        )
        self.skipped_streams = Counter(
            "peerd_media_streams_skipped",
            "Streams of ingested files that were not packaged (e.g. bitmap subtitles)",
            registry=registry,
        )
        self.on_demand = Counter(
            "peerd_media_on_demand_segments",
            "Segments of on-demand renditions produced",
            registry=registry,
        )


@dataclass
class _Added:
    cids: list[Cid] = field(default_factory=list)
    bytes: int = 0
    reused: int = 0


def media_files(paths: Iterable[Path]) -> list[Path]:
    """Files named by `paths`: files as given, folders walked for media suffixes, sorted."""
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(
                f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in MEDIA_SUFFIXES
            )
        else:
            out.append(p)
    return out


class Ingestor:
    """Packages files into the store and catalog; produces on-demand rendition segments.

    Construct with the node's `Catalog`, `BlobStore` and `PackagingOptions`
    (`settings.media.packaging_options()`). All methods are coroutines and never block the
    event loop.

    * `await ingest(path, progress=None, force=False, title=None) -> IngestResult` - one file;
      raises `MediaError` (bad input, naming file and reason), `StoreFull`, or `Cancelled`.
    * `await ingest_many(paths, ...) -> list[IngestResult]` - files and folders; a failure is
      recorded in its result and the batch continues.
    * `await produce_segment(media_id, rendition_id, seq) -> Cid` - make (or find) one segment of
      an on-demand rendition.
    * `await produce_init(media_id, rendition_id) -> Cid` - the init segment of such a rendition.
    * `await watch(dirs, ...)` - ingest new or changed files under `dirs` once they stop growing;
      runs until cancelled.
    """

    def __init__(
        self,
        catalog: Catalog,
        store: BlobStore,
        options: PackagingOptions,
        metrics: MediaMetrics | None = None,
        *,
        max_transcodes: int = 1,
    ) -> None:
        self.catalog = catalog
        self.metrics = metrics
        self.store = store
        self.options = options
        self._job_lock = asyncio.Lock()
        # Held while blobs are committed to rows or deleted as orphans, so a cleanup never
        # deletes a blob another job is about to reference.
        self._commit_lock = asyncio.Lock()
        self._inflight: dict[tuple[str, str, int], asyncio.Future[Cid]] = {}
        # Segments derived at once (on demand, ahead, regenerated): each holds a slot.
        self.transcodes = asyncio.Semaphore(max_transcodes)
        self.commit_hooks: list[CommitHook] = []

    # -- ingest --------------------------------------------------------------------------------

    async def ingest_many(
        self,
        paths: Iterable[Path],
        *,
        force: bool = False,
        progress_for: Callable[[Path], ProgressFn | None] | None = None,
        on_result: Callable[[IngestResult], None] | None = None,
        options: PackagingOptions | None = None,
    ) -> list[IngestResult]:
        """Ingest files and folders one after another; errors do not stop the batch."""
        files = await asyncio.to_thread(media_files, list(paths))
        results = []
        for f in files:
            res = await self.ingest_result(
                f,
                force=force,
                progress=progress_for(f) if progress_for else None,
                options=options,
            )
            if on_result is not None:
                on_result(res)
            results.append(res)
        return results

    async def ingest_result(
        self,
        path: Path,
        *,
        force: bool = False,
        progress: ProgressFn | None = None,
        options: PackagingOptions | None = None,
    ) -> IngestResult:
        """Like `ingest`, but a PeerdError becomes a failed IngestResult instead of raising."""
        started = time.monotonic()
        try:
            return await self.ingest(path, force=force, progress=progress, options=options)
        except PeerdError as exc:
            if self.metrics is not None:
                self.metrics.ingests.labels(result="failed").inc()
            log.info("ingest failed", extra={"path": str(path), "error": exc.message})
            return IngestResult(
                path=path,
                ok=False,
                error=exc.message,
                error_code=exc.code,
                wall_s=time.monotonic() - started,
            )

    async def ingest(
        self,
        path: Path,
        *,
        force: bool = False,
        progress: ProgressFn | None = None,
        title: str | None = None,
        options: PackagingOptions | None = None,
    ) -> IngestResult:
        """Package one file, store its blobs and add it to the catalog; see the module doc.

        ``options`` replaces the node's packaging options for this file (a CLI override).
        """
        opts = self.options if options is None else options
        path = await asyncio.to_thread(Path(path).absolute)
        async with self._job_lock:
            started = time.monotonic()
            if not force:
                known = await self._known(path, opts)
                if known is not None:
                    if self.metrics is not None:
                        self.metrics.ingests.labels(result="unchanged").inc()
                    return IngestResult(path=path, ok=True, media_id=known, skipped=True)
            added = _Added()
            # Every blob of this job is written durably to a temp file as it is produced, and
            # all of them are committed together with the media rows; see BlobBatch.
            batch = self.store.batch()
            cancel = threading.Event()
            loop = asyncio.get_running_loop()
            duration = [0.0]
            passes = [1]

            pending: list[concurrent.futures.Future[Cid]] = []

            def sink(data: bytes, kind: str, cid: Cid) -> Cid:
                # Stores run on the loop while the worker goes on packaging; at most
                # MAX_PENDING_PUTS blobs are in flight (bounded memory), errors surface at once.
                put = asyncio.run_coroutine_threadsafe(batch.add(data, kind=kind, cid=cid), loop)
                pending.append(put)
                while sum(not f.done() for f in pending) > MAX_PENDING_PUTS:
                    next(f for f in pending if not f.done()).result()
                for f in pending:
                    if f.done() and f.exception() is not None:
                        f.result()
                return cid

            def settle() -> None:
                for f in pending:
                    try:
                        f.result()
                    except Exception:  # noqa: S110 - the packaging error is the one to report
                        pass

            def on_progress(done: float) -> None:
                if progress is not None:
                    progress(done, duration[0] * passes[0])

            def work() -> tuple[mf.Manifest, Any]:
                from peerd.media import package as pkg
                from peerd.media.probe import probe

                info = probe(path)
                duration[0] = info.duration
                height = info.video.height if info.video is not None else 0
                passes[0] = 1 + sum(1 for r in opts.ladder if not r.on_demand and r.height < height)
                if progress is not None:
                    progress(0.0, duration[0] * passes[0])
                try:
                    out = pkg.package(
                        path,
                        opts,
                        sink,
                        progress=on_progress,
                        cancel=cancel,
                        info=info,
                    )
                except BaseException:
                    settle()  # every put has finished before the caller cleans up
                    raise
                for f in pending:
                    f.result()  # all blobs stored (or the first store error) before the commit
                return out

            task = asyncio.ensure_future(asyncio.to_thread(work))
            try:
                try:
                    manifest, info = await asyncio.shield(task)
                except asyncio.CancelledError:
                    cancel.set()
                    # Wait for the worker to stop putting blobs before cleaning up after it.
                    await asyncio.gather(task, return_exceptions=True)
                    raise
                media_id = mf.media_id_of(manifest)
                await self._commit(manifest, media_id, path, info, title, batch, added, opts)
            except BaseException:
                await asyncio.shield(batch.abort())
                await asyncio.shield(self._cleanup(added.cids))
                raise
            if progress is not None:
                progress(duration[0] * passes[0], duration[0] * passes[0])
            wall = time.monotonic() - started
            res = IngestResult(
                path=path,
                ok=True,
                media_id=media_id,
                new_blobs=len(added.cids),
                reused_blobs=added.reused,
                bytes_added=added.bytes,
                duration_s=info.duration,
                wall_s=wall,
                renditions=tuple(r.id for r in manifest.renditions),
                warnings=info.warnings,
            )
            if self.metrics is not None:
                self.metrics.ingests.labels(result="ok").inc()
                self.metrics.media_seconds.inc(res.duration_s)
                self.metrics.wall_seconds.inc(wall)
                self.metrics.skipped_streams.inc(len(res.warnings))
            log.info(
                "ingested",
                extra={
                    "path": str(path),
                    "media_id": media_id,
                    "new_blobs": res.new_blobs,
                    "reused_blobs": res.reused_blobs,
                    "speed": round(res.speed, 2),
                },
            )
            return res

    async def _known(self, path: Path, opts: PackagingOptions) -> Cid | None:
        try:
            st = await asyncio.to_thread(path.stat)
        except OSError:
            return None
        sig = f"{st.st_size}:{st.st_mtime_ns}"
        known = await media_from(self.catalog, str(path), _source_sig(sig, opts))
        if known is None and opts == self.options:
            # Rows from before the options were recorded: taken as packaged with the node's.
            known = await media_from(self.catalog, str(path), sig)
        return known

    async def _commit(
        self,
        m: mf.Manifest,
        media_id: Cid,
        path: Path,
        info: Any,
        title: str | None,
        batch: BlobBatch,
        added: _Added,
        opts: PackagingOptions,
    ) -> None:
        async with self._commit_lock:
            # Under the lock, so a cleanup of another job cannot delete a blob this batch
            # found already held between the batch commit and the media rows.
            added.reused = len(batch.held)
            added.bytes = batch.new_bytes
            # Known before the commit: a commit cancelled midway still finishes (then the
            # cleanup must see these blobs) or discards them all (then deleting them is a no-op).
            added.cids = batch.new
            await batch.commit()
            async with self.catalog.transaction() as tx:
                # Same content again: only where it came from is remembered (an unchanged file
                # is skipped next time); the hooks ran when it was new.
                new = await record_media(
                    tx,
                    media_id,
                    mf.encode(m),
                    m,
                    time.time(),
                    title=title or path.stem,
                    source=(str(path), _source_sig(info.signature, opts)),
                )
                for hook in self.commit_hooks if new else ():
                    await hook(tx, m, media_id)

    async def _cleanup(self, cids: list[Cid]) -> None:
        """Delete blobs this job added that no catalog row references."""
        if not cids:
            return
        removed = 0
        async with self._commit_lock:
            for cid in reversed(cids):
                if await is_referenced(self.catalog, cid):
                    continue
                await self.store.delete(cid)
                removed += 1
        log.info("removed blobs of a failed ingest", extra={"blobs": removed})

    # -- on demand -----------------------------------------------------------------------------

    async def load_manifest(self, media_id: str) -> mf.Manifest:
        """The manifest of a media item in the catalog; NotFound if there is none."""
        data = await media_manifest(self.catalog, media_id)
        if data is None:
            raise NotFound(f"no media {media_id}")
        return mf.decode(data)

    async def produce_init(self, media_id: str, rendition_id: str) -> Cid:
        """The init segment of an fMP4 rendition, producing segment 0 first if needed."""
        m = await self.load_manifest(media_id)
        r = _rendition(m, rendition_id)
        if r.init is not None:
            return Cid(r.init)
        if m.container != "fmp4":
            raise NotFound(f"{media_id}/{rendition_id}: MPEG-TS renditions have no init segment")
        await self.produce_segment(media_id, rendition_id, 0)
        cid = await init_cid(self.catalog, media_id, rendition_id)
        if cid is None:
            raise MediaError(f"{media_id}/{rendition_id}: init segment was not produced")
        return cid

    async def produce_segment(self, media_id: str, rendition_id: str, seq: int) -> Cid:
        """Segment `seq` of a rendition: its blob id, transcoding it first if not yet produced.

        For a rendition that is not on demand this just returns the manifest's id. Raises
        NotFound for an unknown media/rendition/segment or when the source segment is not held
        locally (fetch it first).
        """
        key = (media_id, rendition_id, seq)
        fut = self._inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._inflight[key] = fut
        try:
            cid = await self._produce(media_id, rendition_id, seq)
        except BaseException as exc:
            if isinstance(exc, Exception):
                fut.set_exception(exc)
                fut.exception()  # waiters get it; do not warn if there were none
            else:
                fut.cancel()
            raise
        else:
            fut.set_result(cid)
            return cid
        finally:
            del self._inflight[key]

    async def _produce(self, media_id: str, rendition_id: str, seq: int) -> Cid:
        m = await self.load_manifest(media_id)
        r = _rendition(m, rendition_id)
        if not 0 <= seq < len(r.segments):
            raise NotFound(f"{media_id}/{rendition_id}: no segment {seq}")
        pinned = r.segments[seq].cid
        if pinned is not None:
            return Cid(pinned)
        known = await segment_cid(self.catalog, media_id, rendition_id, seq)
        if known is not None and await self.store.has(known):
            return known
        started = time.monotonic()
        out = await self._derive(m, media_id, r, seq)
        seconds = r.segment_seconds(seq)
        rate = len(out.data) * 8 / seconds if seconds > 0 else 0
        if rate > r.bandwidth:
            log.warning(
                "on-demand segment above the declared BANDWIDTH",
                extra={"media_id": media_id, "rendition": rendition_id, "seq": seq, "bps": rate},
            )
        async with self._commit_lock:
            init = None
            if out.init is not None:
                init = await self.store.put(out.init, kind="init")
            cid = await self.store.put(out.data, kind="segment")
            await record_produced(self.catalog, media_id, rendition_id, seq, cid, init)
        if self.metrics is not None:
            self.metrics.on_demand.inc()
        log.info(
            "produced on-demand segment",
            extra={
                "media_id": media_id,
                "rendition": rendition_id,
                "seq": seq,
                "cid": cid,
                "seconds": round(time.monotonic() - started, 3),
            },
        )
        return cid

    async def _derive(self, m: mf.Manifest, media_id: str, r: mf.Rendition, seq: int) -> Any:
        """Run the rendition's recipe on segment `seq` of its source rendition (in a thread)."""
        recipe = r.recipe
        if recipe is None:
            raise NotFound(f"{media_id}/{r.id}: not a derived rendition")
        src = m.rendition(recipe.source)
        src_cid = src.segments[seq].cid
        assert src_cid is not None  # validated: a recipe's source rendition pins its blobs
        try:
            src_init = await self.store.read(Cid(src.init)) if src.init else None
            src_data = await self.store.read(Cid(src_cid))
        except NotFound:
            raise NotFound(
                f"{media_id}/{r.id}/{seq}: source segment {src_cid} of rendition "
                f"{src.id!r} is not held here"
            ) from None
        from peerd.media.transcode import derive_segment

        async with self.transcodes:
            job = asyncio.ensure_future(
                asyncio.to_thread(derive_segment, m.container, src_init, src_data, recipe, seq)
            )
            # A cancelled caller must not free the slot while the thread still encodes.
            try:
                return await asyncio.shield(job)
            except asyncio.CancelledError:
                await asyncio.gather(job, return_exceptions=True)
                raise

    async def regenerate(self, media_id: str, rendition_id: str, seq: int) -> bytes:
        """The bytes of segment `seq` (or the init segment, seq -1) of a derived rendition.

        Stores nothing: the caller (the delivery resolver, through `TranscodeSource`) checks
        them against the blob id it wants and stores them.
        """
        m = await self.load_manifest(media_id)
        r = _rendition(m, rendition_id)
        out = await self._derive(m, media_id, r, max(seq, 0))
        if seq < 0:
            if out.init is None:
                raise NotFound(f"{media_id}/{rendition_id}: no init segment")
            return bytes(out.init)
        return bytes(out.data)

    # -- watching ------------------------------------------------------------------------------

    async def watch(
        self,
        dirs: Iterable[Path],
        *,
        settle_s: float = 5.0,
        interval_s: float = 2.0,
        on_result: Callable[[IngestResult], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Ingest new or changed media files under `dirs` once they stop growing; until cancelled.

        A file is ingested when its size and mtime have not changed for `settle_s` seconds. A
        file that fails is not retried until it changes again.
        """
        roots = [Path(d) for d in dirs]
        seen: dict[Path, tuple[int, int, float]] = {}  # path -> (size, mtime_ns, stable since)
        done: dict[Path, tuple[int, int]] = {}
        while True:
            stats = await asyncio.to_thread(_scan, roots)
            now = clock()
            for path, (size, mtime) in stats.items():
                prev = seen.get(path)
                if prev is None or prev[:2] != (size, mtime):
                    seen[path] = (size, mtime, now)
                    continue
                if done.get(path) == (size, mtime) or now - prev[2] < settle_s:
                    continue
                res = await self.ingest_result(path)
                done[path] = (size, mtime)
                if on_result is not None:
                    on_result(res)
            for path in set(seen) - set(stats):
                seen.pop(path, None)
                done.pop(path, None)
            await asyncio.sleep(interval_s)


def _source_sig(signature: str, opts: PackagingOptions) -> str:
    """What the catalog records of an ingested file: its ``size:mtime`` signature and a digest
    of the packaging options, so the same file with other options is packaged again."""
    canonical = json.dumps(asdict(opts), sort_keys=True, separators=(",", ":"))
    return f"{signature}/{hashlib.sha256(canonical.encode()).hexdigest()[:16]}"


def _scan(roots: list[Path]) -> dict[Path, tuple[int, int]]:
    out: dict[Path, tuple[int, int]] = {}
    for f in media_files([r for r in roots if r.is_dir()]):
        try:
            st = f.stat()
        except OSError:
            continue
        out[f.absolute()] = (st.st_size, st.st_mtime_ns)
    return out


def _rendition(m: mf.Manifest, rendition_id: str) -> mf.Rendition:
    for r in m.renditions:
        if r.id == rendition_id:
            return r
    raise NotFound(f"no rendition {rendition_id!r}")


def node_ingestor(rt: Any) -> Ingestor:
    """An Ingestor on the runtime's catalog, store, ``[media]`` settings and metrics registry.

    The daemon builds one and hands it to the media and control services, the API's commands
    and the transcode source (``produce_segment``); its metrics register once per registry.
    """
    media = rt.settings.media
    metrics = MediaMetrics(rt.metrics.registry)
    return Ingestor(
        rt.catalog,
        rt.store,
        media.packaging_options(),
        metrics,
        max_transcodes=media.on_demand_concurrency,
    )


def _warm_up() -> None:
    """Import what an ingest job imports (blocking; run in a thread)."""
    importlib.import_module("peerd.media.package")
    importlib.import_module("peerd.media.probe")


class MediaService:
    """Daemon service: makes the Ingestor available and watches ``[media] watch_dirs``."""

    name = "media"

    def __init__(self, rt: Any, ingestor: Ingestor) -> None:
        self.rt = rt
        self.ingestor = ingestor

    async def run(self, ready: Callable[[], None]) -> None:
        """Warm the packager up, then watch the library folders (if any) until cancelled."""
        media = self.rt.settings.media
        ready()
        # The packager and PyAV are imported lazily (the CLI and the daemon's start stay
        # light); importing them here, in a thread, after the node is ready, keeps ~0.1 s of
        # imports out of the first ingest after a start (a watch folder's, say).
        started = time.monotonic()
        await asyncio.to_thread(_warm_up)
        log.debug("packager loaded", extra={"seconds": round(time.monotonic() - started, 3)})
        if media.watch_dirs:
            await self.ingestor.watch(
                media.watch_dirs, settle_s=media.watch_settle_s, interval_s=media.watch_interval_s
            )
        else:
            await asyncio.Event().wait()
