"""Media enters the network through the bucket: packaging source files put under the uploads
prefix (claims and key layout: :mod:`peerd.core.uploads`).

For one upload, :meth:`Uploads.ingest_key`:

1. claims it (the watcher only; ``peerd ingest --from-bucket`` is an operator's explicit order
   and packages whatever the claims say), renewing the claim while it works;
2. downloads it to ``<cache dir>/uploads/`` (streamed, its size checked, retried with backoff on
   transient failures; the directory is removed afterwards, whatever happened);
3. packages it with the node's ``[media]`` options (:class:`~peerd.media.ingest.Ingestor`:
   the catalog and store never keep half a media item). Packaging is deterministic, so every
   node that packages the same upload makes the same media id;
4. queues its blobs and then its manifest on the replication outbox and waits until R2 holds and
   verified them all (``media/<id>.json`` last, so the bucket never names media it cannot serve);
5. archives the upload (copy to ``[r2] archive_prefix``, delete) or deletes it
   (``[r2] uploads_done``), then deletes its claims;
6. asks the coordinator service for a heartbeat now: its inventory digest names the new media
   item, which ``GET /api/v1/inventory`` lists with the upload's name as title. The media id and
   its blobs are announced as any held media's (DHT provide loop, LAN peers).

Outcomes, counted as ``peerd_uploads_total{result}``: ``ok``; ``failed`` -- the file cannot be
packaged (corrupt, not media, empty, too large): a ``failed/`` marker with the reason is
written and the claims released, and no watcher tries that upload again until it is uploaded
anew; ``retry`` -- the bucket, the outbox or the disk failed: the claim is released and the
watcher tries again after a backoff (any node may); ``lost`` -- another node took the claim over
(this one stalled past the lease); ``gone`` -- the upload disappeared (another node finished it);
``skipped`` -- claimed by a live node, or marked failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from prometheus_client import Counter

from peerd.core import uploads as up
from peerd.core.backoff import backoff_delay
from peerd.errors import MediaError, NotFound, PeerdError, StoreFull
from peerd.media.ingest import Ingestor, IngestResult
from peerd.media.options import PackagingOptions
from peerd.replication.r2 import AlreadyExists, ObjectInfo, R2Client, R2Error
from peerd.replication.service import Replicator
from peerd.runtime import Runtime

log = logging.getLogger("peerd.uploads")

DOWNLOAD_ATTEMPTS = 5
DOWNLOAD_BACKOFF_S = 1.0
RETRY_MAX_S = 600.0
CLAIM_LIMIT = 64 * 1024


@dataclass(frozen=True)
class UploadResult:
    """What became of one upload (see the module doc for ``result``)."""

    key: str
    result: str
    media_id: str | None = None
    reason: str | None = None
    ingest: IngestResult | None = None

    @property
    def ok(self) -> bool:
        """True when the upload is packaged and published."""
        return self.result == "ok"

    def as_json(self) -> dict[str, Any]:
        """An ingest result's fields (what ``peerd ingest`` prints), the upload's key as path."""
        out: dict[str, Any] = self.ingest.as_json() if self.ingest is not None else {}
        out.update(path=self.key, ok=self.ok, upload=self.result, media_id=self.media_id)
        if not self.ok:
            out["error"] = f"{self.key}: {self.result}: {self.reason}"
        return out


class Uploads:
    """Packages bucket uploads on this node; as a daemon service, watches the uploads prefix
    when ``[r2] watch_uploads`` is on."""

    name = "uploads"

    def __init__(
        self,
        rt: Runtime,
        client: R2Client,
        replicator: Replicator,
        ingestor: Ingestor,
        *,
        report: Callable[[], None] | None = None,
        run_outbox: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``report``: called once an upload is published (the coordinator's early heartbeat);
        ``run_outbox``: work the outbox here (a CLI run with no daemon's replicator running)."""
        self.rt = rt
        self.cfg = rt.settings.r2
        self.client = client
        self.replicator = replicator
        self.ingestor = ingestor
        self._report = report
        self._run_outbox = run_outbox
        self._clock = clock
        self._skip: set[tuple[str, str]] = set()  # (key, etag) marked failed
        self._retry: dict[str, tuple[int, float]] = {}  # key -> (failures, not before)
        self.results = Counter(
            "peerd_uploads",
            "Bucket uploads handled, by result (ok, failed, retry, lost, gone, skipped)",
            ["result"],
            registry=rt.metrics.registry,
        )

    @property
    def _work_root(self) -> Path:
        return self.rt.settings.cache_dir / "uploads"

    # -- service -----------------------------------------------------------------------------------

    async def run(self, ready: Callable[[], None]) -> None:
        """Watch the uploads prefix (when configured) until cancelled; back off on outages."""
        # Downloads a killed process left behind (this daemon holds the state directory).
        await asyncio.to_thread(shutil.rmtree, self._work_root, ignore_errors=True)
        ready()
        if not self.cfg.watch_uploads:
            await asyncio.Event().wait()
        log.info(
            "watching bucket uploads",
            extra={"prefix": self.cfg.uploads_prefix, "interval_s": self.cfg.uploads_interval_s},
        )
        failures = 0
        interval = self.cfg.uploads_interval_s
        while True:
            try:
                await self.poll()
                failures = 0
                # Jittered, so watchers started together do not list (and claim) in lockstep.
                wait = interval * (0.75 + 0.5 * _draw())
            except R2Error as exc:
                failures += 1
                wait = backoff_delay(failures, interval, max(interval, RETRY_MAX_S), _draw())
                log.warning(
                    "cannot list bucket uploads; backing off",
                    extra={"error": exc.message, "retry_in_s": round(wait, 2)},
                )
            await asyncio.sleep(wait)

    async def poll(self) -> list[UploadResult]:
        """One pass over the uploads prefix: every upload not claimed, failed or backing off."""
        prefix = self.cfg.uploads_prefix
        listed = [o for o in await self.client.list_objects(prefix) if not o.key.endswith("/")]
        if not listed:
            return []
        marked = {o.key for o in await self.client.list_objects(up.FAILED + prefix)}
        out = []
        for obj in listed:
            now = self._clock()
            if (obj.key, obj.etag) in self._skip or self._retry.get(obj.key, (0, 0.0))[1] > now:
                continue
            if up.failed_key(obj.key) in marked:
                marker = await self.client.get_bytes(up.failed_key(obj.key), limit=CLAIM_LIMIT)
                if up.is_failed(marker, obj.etag) is not None:
                    self._skip.add((obj.key, obj.etag))
                    continue
            res = await self.ingest_key(obj.key, claim=True)
            if res.result == "retry":
                failures = self._retry.get(obj.key, (0, 0.0))[0] + 1
                wait = backoff_delay(
                    failures,
                    self.cfg.uploads_interval_s,
                    RETRY_MAX_S,
                    _draw(),
                )
                self._retry[obj.key] = (failures, now + wait)
            else:
                self._retry.pop(obj.key, None)
            out.append(res)
        return out

    # -- one upload --------------------------------------------------------------------------------

    async def ingest_key(
        self, key: str, *, claim: bool = False, options: PackagingOptions | None = None
    ) -> UploadResult:
        """Package and publish the upload at ``key`` (see the module doc); never raises for the
        upload's or the bucket's faults, which its result names."""
        res = await self._ingest_key(key, claim, options)
        self.results.labels(result=res.result).inc()
        level = logging.INFO if res.result in ("ok", "skipped", "gone") else logging.WARNING
        log.log(
            level,
            "upload " + res.result,
            extra={"key": key, "media_id": res.media_id, "reason": res.reason},
        )
        return res

    async def _ingest_key(
        self, key: str, claim: bool, options: PackagingOptions | None
    ) -> UploadResult:
        try:
            info = await self.client.head(key)
        except R2Error as exc:
            return UploadResult(key, "retry", reason=exc.message)
        if info is None:
            return UploadResult(key, "gone", reason="no such object in the bucket")
        etag = info.etag or ""
        gen = 0
        if claim:
            try:
                gen, why = await self._claim(key, etag)
            except R2Error as exc:
                return UploadResult(key, "retry", reason=exc.message)
            if not gen:
                return UploadResult(key, "skipped", reason=why)
            log.info("claimed upload", extra={"key": key, "gen": gen, "reason": why})
        job = asyncio.ensure_future(self._package(key, info, options))
        lost = asyncio.Event()
        renew = asyncio.ensure_future(self._renew(key, gen, etag, job, lost)) if gen else None
        try:
            res = await asyncio.shield(job)
        except asyncio.CancelledError:
            if not lost.is_set() or _cancelling():
                job.cancel()
                await asyncio.gather(job, return_exceptions=True)
                if gen:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(asyncio.shield(self._release(key)), 2.0)
                raise
            return UploadResult(key, "lost", reason="another node took the claim over")
        except MediaError as exc:
            await self._mark_failed(key, info, exc.message)
            return UploadResult(key, "failed", reason=exc.message)
        except NotFound as exc:
            await self._release_quietly(key, gen)
            return UploadResult(key, "gone", reason=exc.message)
        except (PeerdError, OSError) as exc:
            # R2Error, StoreFull, an outbox that gave up, a full disk: try again later.
            await self._release_quietly(key, gen)
            reason = exc.message if isinstance(exc, PeerdError) else f"{type(exc).__name__}: {exc}"
            return UploadResult(key, "retry", reason=reason)
        finally:
            if renew is not None:
                renew.cancel()
                await asyncio.gather(renew, return_exceptions=True)
        # Released after the renewals stopped, so none outlives the upload. A release that
        # fails leaves claims naming a key that is gone; they expire.
        await self._release_quietly(key, gen)
        if self._report is not None:
            self._report()
        return UploadResult(key, "ok", res.media_id, ingest=res)

    async def _package(
        self, key: str, info: ObjectInfo, options: PackagingOptions | None
    ) -> IngestResult:
        """Download, package, publish, archive; MediaError for an upload that cannot be media."""
        if info.size == 0:
            raise MediaError(f"{key} is empty")
        if info.size > self.cfg.uploads_max_bytes:
            raise MediaError(
                f"{key} is {info.size} bytes, more than [r2] uploads_max_bytes "
                f"({self.cfg.uploads_max_bytes})"
            )
        name = PurePosixPath(key).name or "upload"
        work = self._work_root / hashlib.sha256(key.encode()).hexdigest()[:16]
        path = work / name
        try:
            await asyncio.to_thread(work.mkdir, parents=True, exist_ok=True)
            free = (await asyncio.to_thread(shutil.disk_usage, work)).free
            if free < info.size + self.rt.settings.store.min_free_bytes:
                # Not the upload's fault: another node (or this one, later) may have the room.
                raise StoreFull(f"no room to download {key} ({info.size} bytes, {free} free)")
            await self._download(key, info.size, path)
            res = await self.ingestor.ingest(
                path, force=True, title=PurePosixPath(name).stem, options=options
            )
        finally:
            await asyncio.shield(asyncio.to_thread(shutil.rmtree, work, ignore_errors=True))
        assert res.media_id is not None
        await self._publish(res.media_id)
        # Under the claim still: if this fails, the upload stays and the next pass packages it
        # again (to the same media id, nothing new to push) and archives it.
        await self._finish(key, info)
        return res

    async def _download(self, key: str, size: int, path: Path) -> None:
        """The upload into ``path``, whole: retried with backoff on R2 failures."""
        for attempt in range(1, DOWNLOAD_ATTEMPTS + 1):
            try:
                await self._download_once(key, size, path)
                return
            except R2Error as exc:
                if attempt == DOWNLOAD_ATTEMPTS:
                    raise
                wait = backoff_delay(attempt, DOWNLOAD_BACKOFF_S, 30.0, _draw())
                log.info(
                    "upload download failed; retrying",
                    extra={"key": key, "error": exc.message, "retry_in_s": round(wait, 2)},
                )
                await asyncio.sleep(wait)

    async def _download_once(self, key: str, size: int, path: Path) -> None:
        got = await self.client.open(key)
        if got is None:
            raise NotFound(f"{key} disappeared from the bucket")
        length, body = got
        f = await asyncio.to_thread(path.open, "wb")
        written = 0
        try:
            if length != size:
                raise R2Error(f"{key} changed while it was fetched ({length} != {size} bytes)")
            async for chunk in body:
                await asyncio.to_thread(f.write, chunk)
                written += len(chunk)
        finally:
            await body.aclose()
            await asyncio.to_thread(f.close)
        if written != size:
            raise R2Error(f"{key}: fetched {written} of {size} bytes")

    async def _publish(self, media_id: str) -> None:
        """Push the media item's blobs, then its manifest, and wait until R2 verified them."""
        batch = await self.replicator.promote_media(media_id)
        if self._run_outbox:
            await self.replicator.run_until_idle()
        while True:
            status = await self.replicator.job_status(batch)
            if status["state"] == "done":
                return
            if status["state"] == "failed":
                errors = status.get("errors") or [{}]
                raise R2Error(
                    f"publishing {media_id} to R2 failed: {errors[0].get('error')}", transient=True
                )
            await asyncio.sleep(0.2)

    async def _finish(self, key: str, info: ObjectInfo) -> None:
        """Archive (or delete) the packaged upload and drop any stale failure marker."""
        if self.cfg.uploads_done == "archive":
            dest = up.archive_key(key, self.cfg.uploads_prefix, self.cfg.archive_prefix)
            await self.client.copy(key, dest, info.size)
        await self.client.delete(key)
        await self.client.delete(up.failed_key(key))

    # -- claims ------------------------------------------------------------------------------------

    async def _claim(self, key: str, etag: str) -> tuple[int, str]:
        """Claim ``key``: (the generation now held, why), or (0, why not)."""
        keys = [o.key for o in await self.client.list_objects(up.claim_prefix(key))]
        gen = up.latest_gen(keys, key)
        latest = None
        if gen:
            data = await self.client.get_bytes(up.claim_key(key, gen), limit=CLAIM_LIMIT)
            if data is None:
                # Deleted since the listing: its holder has just finished.
                return 0, "its claims were just released"
            latest = up.decode_claim(gen, data)
        decision = up.decide(latest, gen, self._clock())
        if not decision.take:
            return 0, decision.reason
        if not await self._write_claim(key, decision.gen, etag):
            return 0, f"another node claimed generation {decision.gen} first"
        return decision.gen, decision.reason

    async def _write_claim(self, key: str, gen: int, etag: str) -> bool:
        """Create claim generation ``gen``; False if another node holds it."""
        claim = up.Claim(
            gen,
            self.rt.identity.peer_id,
            self.rt.settings.node.name,
            self._clock() + self.cfg.claim_lease_s,
            etag,
        )
        try:
            await self.client.put_bytes(
                up.claim_key(key, gen), up.encode_claim(claim), content_type="application/json"
            )
            return True
        except AlreadyExists:
            # Ours after all if an earlier attempt of this very write got through unanswered.
            data = await self.client.get_bytes(up.claim_key(key, gen), limit=CLAIM_LIMIT)
            held = up.decode_claim(gen, data) if data is not None else None
            return held is not None and held.peer_id == claim.peer_id

    async def _renew(
        self, key: str, gen: int, etag: str, job: asyncio.Future[Any], lost: asyncio.Event
    ) -> None:
        """Renew the claim every third of its lease; cancel ``job`` if another node took it."""
        while True:
            await asyncio.sleep(self.cfg.claim_lease_s / 3)
            try:
                if not await self._write_claim(key, gen + 1, etag):
                    log.warning("lost the claim of an upload", extra={"key": key, "gen": gen + 1})
                    lost.set()
                    job.cancel()
                    return
                gen += 1
                if gen > 2:
                    await self.client.delete(up.claim_key(key, gen - 2))
            except R2Error as exc:
                # The claim holds until its lease ends; the next renewal may get through.
                log.info("cannot renew an upload claim", extra={"key": key, "error": exc.message})

    async def _release(self, key: str) -> None:
        """Delete every claim of ``key``."""
        for obj in await self.client.list_objects(up.claim_prefix(key)):
            await self.client.delete(obj.key)

    async def _release_quietly(self, key: str, gen: int) -> None:
        if not gen:
            return
        try:
            await self._release(key)
        except R2Error as exc:
            log.info("cannot release an upload claim", extra={"key": key, "error": exc.message})

    async def _mark_failed(self, key: str, info: ObjectInfo, reason: str) -> None:
        """Write the failure marker (replacing an older one) and release the claims."""
        marker = up.failure_marker(
            info.etag or "",
            info.size,
            reason,
            self.rt.identity.peer_id,
            self.rt.settings.node.name,
            self._clock(),
        )
        try:
            await self.client.put_bytes(
                up.failed_key(key), marker, content_type="application/json", conditional=False
            )
            await self._release(key)
        except R2Error as exc:
            log.warning("cannot mark an upload failed", extra={"key": key, "error": exc.message})
        self._skip.add((key, info.etag or ""))


def _draw() -> float:
    """A jitter draw: spreads the retries of nodes that failed together."""
    return random.random()  # noqa: S311 -- jitter, not a secret


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
