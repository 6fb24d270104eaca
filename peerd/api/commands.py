"""The coordinator's commands: prefetch, pin, unpin, evict, promote, ingest.

Each command is checked when it arrives (unknown media -> 404, a subsystem this node does not run
-> 409 ``not_configured``, node draining -> 503) and then runs as a job (:mod:`peerd.api.jobs`).
Every command is idempotent: running it twice leaves the same state.

The subsystems commands need arrive as :class:`Subsystems` (built by the daemon), typed here as
protocols, so this module depends on no implementation: ``resolver`` (:class:`BlobFetcher`, the
delivery resolver), ``replicator`` (:class:`Replicator`, R2 replication), ``puller``
(:class:`PeerPuller`, fetching a media item from one named peer), ``ingestor``
(:class:`Ingester`, the packager), ``finder`` (:class:`MediaFinder`: a prefetch with
``source: "any"`` of a media item the catalog lacks finds its manifest in the network first) and
``live`` (:class:`LiveSource`, the live inputs' status).

Eviction never drops the last copy: a blob leaves local disk only if its R2 copy is confirmed
(``r2_state = 'present'``) and it is not pinned, and that condition is re-checked in the same
``UPDATE`` that marks it absent (``BlobStore.evict_local``), so a concurrent pin or R2 state change
cannot slip in between.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from peerd.api.jobs import ProgressFn
from peerd.api.models import (
    EvictRequest,
    IngestRequest,
    JobStatus,
    MediaCommand,
    PrefetchRequest,
)
from peerd.catalog.media import media_blobs, media_exists, pin_media, unpin_media
from peerd.core.ids import Cid
from peerd.core.jobs import Job
from peerd.errors import (
    Forbidden,
    NotConfigured,
    NotFound,
    PeerdError,
    Unavailable,
    UpstreamError,
)
from peerd.runtime import Runtime

if TYPE_CHECKING:
    from peerd.live.service import InputStatus

PROMOTE_POLL_S = (0.2, 2.0)


class BlobFetcher(Protocol):
    """Makes a blob local (``peerd.delivery.Resolver``)."""

    async def ensure_local(self, cid: Cid) -> Path:
        """Fetch ``cid`` from the first source that has it, verified; its local path."""


class MediaFinder(Protocol):
    """Finds a media item the catalog lacks in the network (``peerd.delivery.media``)."""

    async def ensure_media(self, media_id: str) -> bytes:
        """Its manifest, recorded in the catalog first; NotFound if no source has it."""


class Replicator(Protocol):
    """What the API needs of R2 replication (``peerd.replication``)."""

    async def promote_media(self, media_id: str) -> str:
        """Queue a media item for R2; returns a batch id for :meth:`job_status`."""

    async def pull_media(self, media_id: str) -> object:
        """Fetch a media item from R2 into the store."""

    async def upload_last_copies(self, deadline_s: float) -> int:
        """Upload blobs R2 lacks until the deadline; how many made it."""

    async def job_status(self, job_id: str) -> Mapping[str, Any]:
        """A batch's status; its ``state`` is ``running``, ``done`` or ``failed``."""


class Spill(Protocol):
    """Whether streams over the uplink budget can go to the bucket
    (``peerd.replication.source.BucketLink``)."""

    def ready(self) -> bool:
        """A redirect can be given now, as far as the node knows."""

    def class_b_left(self) -> int | None:
        """Class B requests the month's budget still allows; None: no budget known."""


class PeerPuller(Protocol):
    """Fetches a media item from one named LAN peer (``peerd.p2p.lan.LanSource``)."""

    async def pull_media_from(self, peer_id: str, media_id: str) -> object:
        """Fetch manifest and blobs of ``media_id`` from ``peer_id`` into the store."""


class Ingester(Protocol):
    """Packages media files into the catalog (``peerd.media.ingest.Ingestor``)."""

    async def ingest(
        self,
        path: Path,
        *,
        force: bool = False,
        progress: Callable[[float, float], None] | None = None,
    ) -> Any:
        """Package one file; its outcome (``ok``, ``media_id``, ``error`` and counts)."""

    async def ingest_many(self, paths: Iterable[Path], *, force: bool = False) -> list[Any]:
        """Package files and folders one after another; one outcome per file."""


class LiveSource(Protocol):
    """The node's live inputs (``peerd.live.service.LiveService``)."""

    def status(self) -> Sequence[InputStatus]:
        """One status per configured input, in configuration order."""


@dataclass(frozen=True)
class Subsystems:
    """The parts the API's commands and node facts use; None where this node runs none."""

    resolver: BlobFetcher | None = None
    replicator: Replicator | None = None
    puller: PeerPuller | None = None
    ingestor: Ingester | None = None
    finder: MediaFinder | None = None
    bucket: Spill | None = None  # links for streams over the uplink budget (R2 configured)
    live: LiveSource | None = None  # live inputs (GET /api/v1/live, the heartbeat's `live`)


def _ingest_json(res: Any) -> dict[str, Any]:
    """One file's ingest outcome, as the job result lists it."""
    return {
        "path": str(res.path),
        "ok": res.ok,
        "media_id": res.media_id,
        "error": res.error,
        "skipped": res.skipped,
        "new_blobs": res.new_blobs,
        "reused_blobs": res.reused_blobs,
        "bytes_added": res.bytes_added,
        "duration_s": round(res.duration_s, 3),
        "renditions": list(res.renditions),
        "warnings": list(res.warnings),
    }


def job_status(job: Job) -> JobStatus:
    """The API form of a job (the same fields)."""
    return JobStatus.model_validate(job, from_attributes=True)


def _jsonable(report: object) -> dict[str, Any]:
    if dataclasses.is_dataclass(report) and not isinstance(report, type):
        return {k: v for k, v in dataclasses.asdict(report).items() if _plain(v)}
    if isinstance(report, Mapping):
        return {str(k): v for k, v in report.items() if _plain(v)}
    return {}


def _plain(v: object) -> bool:
    return v is None or isinstance(v, str | int | float | bool)


class Commands:
    """Validates commands and builds their work for the job runner."""

    def __init__(self, rt: Runtime, parts: Subsystems) -> None:
        self.rt = rt
        self.parts = parts

    # -- lookups ---------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.rt.draining:
            raise Unavailable("node is draining; no new commands")

    def _replicator(self) -> Replicator:
        rep = self.parts.replicator
        if rep is None:
            raise NotConfigured("R2 replication is not configured on this node")
        return rep

    async def _require_media(self, media_id: str) -> None:
        if not await media_exists(self.rt.catalog, media_id):
            raise NotFound(f"media {media_id} is not in this node's catalog")

    # -- prefetch --------------------------------------------------------------------------------

    async def prefetch(self, req: PrefetchRequest) -> tuple[str, Callable[[ProgressFn], Any]]:
        """Target and work of a prefetch."""
        self._check_open()
        media_id = req.media_id
        if req.source == "peer":
            puller = self.parts.puller
            if puller is None:
                raise NotConfigured("fetching from a named peer needs the LAN/libp2p layer")
            peer_id = req.peer_id or ""

            async def from_peer(progress: ProgressFn) -> dict[str, Any]:
                report = await puller.pull_media_from(peer_id, media_id)
                return {"source": "peer", "peer_id": peer_id, **_jsonable(report)}

            return media_id, from_peer
        resolver = self.parts.resolver
        known = await media_exists(self.rt.catalog, media_id)
        if req.source == "any" and not known and resolver is not None and self.parts.finder:
            # The manifest from the network (LAN, libp2p, R2), then its blobs the same way:
            # 404 now if no source has it, 503 if they keep failing.
            await self.parts.finder.ensure_media(media_id)
            known = True
        if req.source == "any" and known and resolver is not None:

            async def via_resolver(progress: ProgressFn) -> dict[str, Any]:
                return await self._fetch_blobs(resolver, media_id, progress)

            return media_id, via_resolver
        replicator = self._replicator()

        async def from_r2(progress: ProgressFn) -> dict[str, Any]:
            report = await replicator.pull_media(media_id)
            return {"source": "r2", **_jsonable(report)}

        return media_id, from_r2

    async def _fetch_blobs(
        self, resolver: BlobFetcher, media_id: str, progress: ProgressFn
    ) -> dict[str, Any]:
        cids = await media_blobs(self.rt.catalog, media_id)
        rows = await self.rt.catalog.get_blobs(cids)
        missing = [c for c in cids if c not in rows or rows[c].local_state != "present"]
        fetched = 0
        failed: list[str] = []
        sem = asyncio.Semaphore(4)

        async def one(cid: Cid) -> None:
            nonlocal fetched
            async with sem:
                try:
                    await resolver.ensure_local(cid)
                except PeerdError:
                    failed.append(cid)
                    return
            fetched += 1
            progress(fetched / len(missing))

        await asyncio.gather(*(one(c) for c in missing))
        if failed:
            raise UpstreamError(
                f"{len(failed)} of {len(missing)} missing blobs could not be fetched "
                f"(first: {failed[0]})"
            )
        return {"source": "any", "blobs": len(cids), "fetched": fetched}

    # -- pin / unpin -----------------------------------------------------------------------------

    async def pin(self, req: MediaCommand) -> tuple[str, Callable[[ProgressFn], Any]]:
        """Pin a media item and all its blobs (never evicted while pinned)."""
        self._check_open()
        await self._require_media(req.media_id)

        async def work(progress: ProgressFn) -> dict[str, Any]:
            cids = await media_blobs(self.rt.catalog, req.media_id)
            n = await pin_media(self.rt.catalog, req.media_id, cids)
            return {"blobs_pinned": n}

        return req.media_id, work

    async def unpin(self, req: MediaCommand) -> tuple[str, Callable[[ProgressFn], Any]]:
        """Unpin a media item; blobs shared with another pinned item stay pinned."""
        self._check_open()
        await self._require_media(req.media_id)

        async def work(progress: ProgressFn) -> dict[str, Any]:
            cids = await media_blobs(self.rt.catalog, req.media_id)
            n = await unpin_media(self.rt.catalog, req.media_id, cids)
            return {"blobs_unpinned": n, "blobs_kept_pinned": len(cids) - n}

        return req.media_id, work

    # -- evict -----------------------------------------------------------------------------------

    async def evict(self, req: EvictRequest) -> tuple[str, Callable[[ProgressFn], Any]]:
        """Drop local copies that R2 holds and nobody pinned (see the module doc)."""
        self._check_open()
        if req.media_id is not None:
            await self._require_media(req.media_id)
            target = req.media_id
        else:
            listed = sorted(set(req.cids or []))
            target = "cids:" + hashlib.sha256("\n".join(listed).encode()).hexdigest()

        async def work(progress: ProgressFn) -> dict[str, Any]:
            if req.media_id is not None:
                cids = await media_blobs(self.rt.catalog, req.media_id)
            else:
                cids = [Cid(c) for c in sorted(set(req.cids or []))]
            return await self._evict(cids, progress)

        return target, work

    async def _evict(self, cids: list[Cid], progress: ProgressFn) -> dict[str, Any]:
        store = self.rt.store
        rows = await self.rt.catalog.get_blobs(cids)
        out = {"evicted": 0, "bytes_freed": 0, "kept_last_copy": 0, "kept_pinned": 0}
        out["not_held"] = 0
        for i, cid in enumerate(cids):
            row = rows.get(cid)
            if row is None or row.local_state != "present":
                out["not_held"] += 1
            elif row.pinned:
                out["kept_pinned"] += 1
            elif row.r2_state != "present":
                out["kept_last_copy"] += 1
            elif not await store.evict_local(cid, replicated=True):
                # It changed under us; keep it, the coordinator can retry.
                out["kept_last_copy"] += 1
            else:
                out["evicted"] += 1
                out["bytes_freed"] += row.size
            progress((i + 1) / len(cids))
        return out

    # -- ingest ----------------------------------------------------------------------------------

    async def ingest(self, req: IngestRequest) -> tuple[str, Callable[[ProgressFn], Any]]:
        """Package a file or folder inside the library folders (see :class:`IngestRequest`)."""
        self._check_open()
        roots = [*self.rt.settings.media.library_dirs, *self.rt.settings.media.watch_dirs]
        if not roots:
            raise NotConfigured(
                "no library folder: set [media] library_dirs (or watch_dirs) to ingest by API"
            )
        path, resolved_roots = await asyncio.to_thread(
            lambda: (Path(req.path).resolve(), [r.resolve() for r in roots])
        )
        # Resolved, so "..", symlinks and the like cannot lead out of the library.
        if not any(path == r or path.is_relative_to(r) for r in resolved_roots):
            raise Forbidden("path is outside the node's library folders")
        is_dir = await asyncio.to_thread(path.is_dir)
        if not is_dir and not await asyncio.to_thread(path.is_file):
            raise NotFound(f"no file or folder {path}")
        ingestor = self.parts.ingestor
        if ingestor is None:
            raise NotConfigured("this node runs no packager")

        async def one_file(progress: ProgressFn) -> dict[str, Any]:
            def step(done: float, total: float) -> None:
                progress(min(done / total, 1.0) if total > 0 else 0.0)

            res = await ingestor.ingest(path, force=req.force, progress=step)
            return {"files": [_ingest_json(res)]}

        async def folder(progress: ProgressFn) -> dict[str, Any]:
            results = await ingestor.ingest_many([path], force=req.force)
            failed = sum(1 for r in results if not r.ok)
            return {"files": [_ingest_json(r) for r in results], "failed": failed}

        return str(path), folder if is_dir else one_file

    # -- promote ---------------------------------------------------------------------------------

    async def promote(self, req: MediaCommand) -> tuple[str, Callable[[ProgressFn], Any]]:
        """Queue a media item for R2 and wait until the replicator finished it."""
        self._check_open()
        replicator = self._replicator()
        await self._require_media(req.media_id)

        async def work(progress: ProgressFn) -> dict[str, Any]:
            batch = await replicator.promote_media(req.media_id)
            delay = PROMOTE_POLL_S[0]
            while True:
                status = await replicator.job_status(batch)
                state = status.get("state")
                if state == "done":
                    return {"replication_batch": batch, **_jsonable(status)}
                if state == "failed":
                    errors = status.get("errors") or []
                    first = errors[0].get("error") if errors else None
                    raise UpstreamError(f"promotion batch {batch} failed: {first or 'see node'}")
                await asyncio.sleep(delay)
                delay = min(PROMOTE_POLL_S[1], delay * 2)

        return req.media_id, work
