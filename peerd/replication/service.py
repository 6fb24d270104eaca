"""The replicator: runs the outbox against R2, and the operations other subsystems call.

Public surface (the daemon builds one and hands it to the API, the coordinator and tiering):

``await push_blob(cid)``
    queue an upload of one blob (durable; returns at once).
``await promote_media(media_id) -> batch id``
    queue uploads of every blob of a media item, then its manifest; the media item is marked
    ``present`` in R2 once the manifest is uploaded and verified, which happens only after all its
    blobs are. Poll with :meth:`job_status`.
``await demote_media(media_id) -> batch id``
    queue deletion of the manifest, then of the blobs no other R2 media item uses -- never of a
    blob the node does not hold (R2 may hold the last copy).
``await pull_media(media_id, progress=None) -> PullReport``
    fetch a manifest and its blobs from R2 into the local store, verifying every hash; blobs
    already held are skipped, so re-running after a crash resumes. ``progress(nbytes)`` is called
    as bytes arrive. The media rows are committed after the last blob.
``await upload_last_copies(deadline_s) -> int``
    hand off to R2 what only this node holds, as far as ``deadline_s`` and this month's class A
    request budget (``r2.budget_class_a_per_month``) allow (for a node about to leave): media
    item by media item, its blobs R2 lacks and then its manifest (last, so the bucket never
    names a media item it cannot serve); then stray blobs. Returns how many blobs were
    verified in R2.
``await sweep_uploads() -> int``
    abort abandoned multipart uploads under ``blobs/`` (older than
    :data:`~peerd.replication.r2.STALE_UPLOAD_S`, or of a blob already in R2); the service and
    ``peerd replicate push`` run it at start.
``await job_status(job_id) -> dict``
    one job (numeric id) or one batch (the id from promote/demote).

Upload protocol for one blob: ``PUT blobs/<cid>`` with ``If-None-Match: *`` and the SHA-256
checksum; then HEAD (size + checksum). Only a verified object lets the job complete, and the
blob's ``r2_state='present'`` is committed in the same transaction as the job's completion. A 412
(an object already there -- an earlier attempt whose answer was lost, or another node) is followed
by the same HEAD check; an object there that fails it is deleted and the job retried.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from peerd.catalog import Catalog
from peerd.catalog.media import (
    media_blobs,
    media_manifest,
    media_not_in_r2,
    r2_users,
    set_media_r2,
)
from peerd.catalog.outbox import Job, Lease, Outbox, enqueue_in
from peerd.core.ids import Cid, digest_of
from peerd.core.manifest import decode
from peerd.core.multipart import b64_digest
from peerd.core.outbox import RetryPolicy
from peerd.delivery.pull import Progress, PullReport, pull_media
from peerd.errors import IntegrityError, NotFound, PeerdError
from peerd.replication.budget import request_ledger
from peerd.replication.metrics import R2Metrics, r2_metrics
from peerd.replication.r2 import (
    STALE_UPLOAD_S,
    AlreadyExists,
    R2Client,
    R2Error,
    blob_key,
    manifest_key,
)
from peerd.replication.source import R2Source
from peerd.runtime import Runtime

log = logging.getLogger("peerd.replication")

# The daemon queues jobs that failed for good again this often (an outage longer than a job's
# attempts has usually ended by then).
FAILED_RETRY_S = 3600.0


class JobFailed(PeerdError):
    """A job cannot succeed as asked (it is given up, with this message)."""

    code = "replication_failed"


class Deferred(Exception):  # noqa: N818 (a signal, not an error)
    """A job must wait for others: a signal caught in :meth:`Replicator.execute` that never
    leaves this module, hence not under ``PeerdError``."""

    def __init__(self, reason: str, delay_s: float = 2.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.delay_s = delay_s


class Replicator:
    """Outbox workers plus the replication operations (see the module doc)."""

    name = "replicator"

    def __init__(
        self,
        rt: Runtime,
        client: R2Client,
        *,
        outbox: Outbox | None = None,
        concurrency: int | None = None,
        clock: Callable[[], float] = time.time,
        poll_s: float = 5.0,
    ) -> None:
        self.rt = rt
        self.client = client
        r2 = rt.settings.r2
        policy = RetryPolicy(
            lease_s=r2.job_lease_s,
            base_s=r2.retry_base_s,
            max_s=r2.retry_max_s,
            max_attempts=r2.max_attempts,
        )
        self.outbox = outbox or Outbox(rt.catalog, policy, clock=clock)
        self.concurrency = concurrency or r2.max_concurrency
        self.metrics: R2Metrics = r2_metrics(rt.metrics.registry)
        self.ledger = request_ledger(rt)
        self._clock = clock
        self._poll_s = poll_s
        self._wake = asyncio.Event()
        self._stopping = False
        self._busy = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # Set (and replaced) whenever a job finishes: run_until_idle's workers wait on it
        # instead of sleeping until the next due time (a running job's lease is ~30 s out).
        self._finished = asyncio.Event()
        self.on_progress: Progress | None = None
        # Told, while run_until_idle has nothing to claim, which other processes hold the jobs
        # still open.
        self.on_wait: Callable[[list[Lease]], None] | None = None

    # -- service ---------------------------------------------------------------------------------

    async def run(self, ready: Callable[[], None]) -> None:
        """Run outbox workers until cancelled."""
        self._stopping = False
        ready()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._housekeeping(), name="r2-housekeeping")
            for i in range(self.concurrency):
                tg.create_task(self._worker(), name=f"r2-worker-{i}")

    async def _housekeeping(self) -> None:
        """Sweep abandoned uploads once; queue failed jobs again now and every
        :data:`FAILED_RETRY_S`."""
        await self.sweep_uploads()
        while not self._stopping:
            if n := await self.outbox.retry_failed():
                log.info("queued failed replication jobs again", extra={"jobs": n})
                self.wake()
            await asyncio.sleep(FAILED_RETRY_S)

    async def sweep_uploads(self) -> int:
        """Abort abandoned multipart uploads (see the module doc); best effort."""
        now = self._clock()
        try:
            uploads = await self.client.list_uploads("blobs/")
            if not uploads:
                return 0
            rows = await self.rt.catalog.get_blobs(u.key.removeprefix("blobs/") for u in uploads)
            return await self.client.abort_uploads(
                u
                for u in uploads
                if u.initiated < now - STALE_UPLOAD_S
                or (
                    (row := rows.get(Cid(u.key.removeprefix("blobs/")))) is not None
                    and row.r2_state == "present"
                )
            )
        except R2Error as exc:
            log.info("cannot sweep open multipart uploads", extra={"error": exc.message})
            return 0

    async def drain(self) -> None:
        """Stop claiming jobs and let the ones in flight finish (leases cover the rest)."""
        self._stopping = True
        self._wake.set()
        await self._idle.wait()

    def wake(self) -> None:
        """Tell idle workers that a job was queued."""
        self._wake.set()

    async def _worker(self) -> None:
        while not self._stopping:
            jobs = await self.outbox.claim(1)
            if not jobs:
                self._wake.clear()
                due = await self.outbox.next_due()
                wait = (
                    self._poll_s
                    if due is None
                    else max(0.01, min(self._poll_s, due - self._clock()))
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)
                continue
            await self.execute(jobs[0])

    async def run_until_idle(self, *, max_wait_s: float = 3600.0) -> int:
        """Work until no job is queued or running (CLI and tests). Returns jobs executed."""
        done = 0
        deadline = self._clock() + max_wait_s

        async def one() -> None:
            nonlocal done
            while self._clock() < deadline:
                jobs = await self.outbox.claim(1)
                if jobs:
                    await self.execute(jobs[0])
                    done += 1
                    continue
                finished = self._finished
                if await self.outbox.open_count() == 0:
                    return
                if self.on_wait is not None and (held := await self.outbox.leases()):
                    self.on_wait(held)
                due = await self.outbox.next_due()
                wait = 0.05 if due is None else max(0.01, min(1.0, due - self._clock()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(finished.wait(), timeout=wait)

        await asyncio.gather(*(one() for _ in range(self.concurrency)))
        return done

    async def execute(self, job: Job) -> None:
        """Run one claimed job and record its outcome."""
        self._busy += 1
        self._idle.clear()
        renew = asyncio.create_task(self._renew(job))
        outcome = "ok"
        try:
            await self._dispatch(job)
        except Deferred as d:
            outcome = "deferred"
            await self.outbox.defer(job, d.delay_s, d.reason)
        except R2Error as exc:
            outcome = "retry"
            res = await self.outbox.fail(job, exc.message, throttled=exc.throttled)
            log.info(
                "replication job failed",
                extra={"job": job.id, "kind": job.kind, "error": exc.message, "next": repr(res)},
            )
        except (JobFailed, NotFound, IntegrityError) as exc:
            outcome = "failed"
            await self.outbox.fail(job, exc.message, retryable=isinstance(exc, IntegrityError))
            log.warning(
                "replication job gave up",
                extra={"job": job.id, "kind": job.kind, "error": exc.message},
            )
        except PeerdError as exc:
            outcome = "retry"
            await self.outbox.fail(job, exc.message)
        except OSError as exc:
            outcome = "retry"
            await self.outbox.fail(job, f"{type(exc).__name__}: {exc}")
        finally:
            renew.cancel()
            self.metrics.jobs.labels(kind=job.kind, outcome=outcome).inc()
            self._busy -= 1
            if self._busy == 0:
                self._idle.set()
            self._finished.set()
            self._finished = asyncio.Event()

    async def _renew(self, job: Job) -> None:
        period = self.outbox.policy.lease_s / 3
        while True:
            await asyncio.sleep(period)
            if not await self.outbox.renew(job):
                return

    async def _dispatch(self, job: Job) -> None:
        if job.kind == "push_blob":
            await self._job_push_blob(job)
        elif job.kind == "push_manifest":
            await self._job_push_manifest(job)
        elif job.kind == "pull_media":
            report = await self.pull_media(job.target)
            await self.outbox.complete(job, nbytes=report.bytes)
        elif job.kind == "delete_manifest":
            await self._job_delete_manifest(job)
        elif job.kind == "delete_blob":
            await self._job_delete_blob(job)
        else:
            raise JobFailed(f"unknown job kind {job.kind}")

    # -- push --------------------------------------------------------------------------------------

    async def upload_blob(self, cid: Cid) -> int:
        """Upload one blob and verify it; returns bytes sent (0 if it was already there).

        Does not touch the catalog: the caller commits ``r2_state='present'``.
        """
        row = await self.rt.catalog.get_blob(cid)
        if row is None:
            raise JobFailed(f"blob {cid} is not in the catalog")
        try:
            path = await self.rt.store.open_path(cid)
        except NotFound:
            if await self.client.verify_blob(cid, row.size, None):
                return 0
            raise JobFailed(f"blob {cid} is not held locally and R2 lacks it") from None
        sent = row.size
        existed = False
        try:
            await self.client.put_blob(cid, path, row.size)
        except AlreadyExists:
            existed = True
            sent = 0
        if await self.client.verify_blob(cid, row.size, path):
            self.metrics.bytes.labels(direction="up").inc(sent)
            if self.on_progress is not None:
                self.on_progress(row.size)
            return sent
        if existed:
            # Someone left a wrong or partial object under our immutable key: remove it so the
            # next attempt can write the real one.
            await self.client.delete(blob_key(cid))
            raise R2Error(f"object for {cid} in R2 failed verification; deleted it")
        raise R2Error(f"upload of {cid} did not verify (size or checksum differ)")

    async def _job_push_blob(self, job: Job) -> None:
        cid = Cid(job.target)
        row = await self.rt.catalog.get_blob(cid)
        if row is not None and row.r2_state == "present":
            await self.outbox.complete(job)
            return
        sent = await self.upload_blob(cid)
        now = self._clock()
        await self.outbox.complete(
            job, nbytes=sent, also=lambda tx: Catalog.set_blob_r2(tx, cid, "present", now)
        )

    async def _media_manifest(self, media_id: str) -> bytes:
        data = await media_manifest(self.rt.catalog, media_id)
        if data is None:
            raise NotFound(f"media {media_id} is not in the catalog")
        return data

    async def _job_push_manifest(self, job: Job) -> None:
        media_id = job.target
        data = await self._media_manifest(media_id)
        cids = list(decode(data).blob_cids())
        rows = await self.rt.catalog.get_blobs(cids)
        waiting = [c for c in cids if c not in rows or rows[Cid(c)].r2_state != "present"]
        if waiting:
            # A blob whose upload gave up would be queued again here for ever (a long outage):
            # the manifest gives up with it, and a later push retries both.
            if gave_up := await self.outbox.failed_of("push_blob", waiting):
                raise JobFailed(f"the upload of {len(gave_up)} of its blobs failed")
            for c in waiting:
                if c in rows:
                    await self.outbox.enqueue("push_blob", c, batch_id=job.batch_id)
            raise Deferred(f"waiting for {len(waiting)} blobs", delay_s=1.0)
        await self.upload_manifest(media_id, data)
        now = self._clock()
        await self.outbox.complete(
            job, nbytes=len(data), also=lambda tx: set_media_r2(tx, media_id, "present", now)
        )

    async def upload_manifest(self, media_id: str, data: bytes) -> None:
        """Put a media item's manifest and verify it (size and checksum); the caller makes sure
        its blobs are in R2 first and commits the media item's ``r2_state``."""
        key = manifest_key(media_id)
        try:
            await self.client.put_bytes(key, data, content_type="application/json")
        except AlreadyExists:
            pass
        info = await self.client.head(key)
        if (
            info is None
            or info.size != len(data)
            or info.checksum_sha256 != b64_digest(digest_of(media_id))
        ):
            if info is not None:
                await self.client.delete(key)
            raise R2Error(f"manifest {media_id} in R2 did not verify")

    async def push_blob(self, cid: Cid) -> int:
        """Queue an upload of ``cid``; returns the job id."""
        job_id = await self.outbox.enqueue("push_blob", cid)
        self.wake()
        return job_id

    async def promote_media(self, media_id: str) -> str:
        """Queue a media item's blobs and manifest for R2; returns the batch id."""
        data = await self._media_manifest(media_id)
        cids = list(decode(data).blob_cids())
        rows = await self.rt.catalog.get_blobs(cids)
        missing = [c for c in cids if c not in rows]
        if missing:
            raise JobFailed(f"media {media_id} lacks {len(missing)} blob rows; cannot promote")
        batch = "p-" + secrets.token_hex(8)
        now = self._clock()
        async with self.rt.catalog.transaction() as tx:
            await set_media_r2(tx, media_id, "queued", now)
            for c in cids:
                if rows[Cid(c)].r2_state != "present":
                    await enqueue_in(tx, "push_blob", c, now, batch_id=batch)
            await enqueue_in(tx, "push_manifest", media_id, now, batch_id=batch)
        self.wake()
        return batch

    # -- demote ------------------------------------------------------------------------------------

    async def demote_media(self, media_id: str) -> str:
        """Queue removal of a media item from R2 (see the module doc); returns the batch id."""
        await self._media_manifest(media_id)
        batch = "d-" + secrets.token_hex(8)
        now = self._clock()
        async with self.rt.catalog.transaction() as tx:
            await set_media_r2(tx, media_id, "deleting", now)
            await enqueue_in(tx, "delete_manifest", media_id, now, batch_id=batch)
        self.wake()
        return batch

    async def _job_delete_manifest(self, job: Job) -> None:
        media_id = job.target
        data = await self._media_manifest(media_id)
        # The manifest goes first: without it nobody starts pulling a half-deleted item.
        await self.client.delete(manifest_key(media_id))
        cids = list(decode(data).blob_cids())
        now = self._clock()
        async with self.rt.catalog.transaction() as tx:
            for c in cids:
                await enqueue_in(tx, "delete_blob", c, now, batch_id=job.batch_id)
        await self.outbox.complete(job, also=lambda tx: set_media_r2(tx, media_id, "none", now))
        self.wake()

    async def _job_delete_blob(self, job: Job) -> None:
        cid = job.target
        # Shared by another media item still wanted in R2? Then it stays.
        if await r2_users(self.rt.catalog, cid):
            await self.outbox.complete(job)
            return
        now = self._clock()
        async with self.rt.catalog.transaction() as tx:
            marked = await Catalog.set_blob_r2(
                tx, cid, "deleting", now, only_from=("queued", "present", "deleting"), held=True
            )
        if not marked:
            row = await self.rt.catalog.get_blob(cid)
            if row is not None and row.r2_state != "none" and row.local_state != "present":
                raise JobFailed(f"blob {cid} is not held locally; R2 keeps the last copy")
            await self.outbox.complete(job)
            return
        await self.client.delete(blob_key(cid))
        await self.outbox.complete(job, also=lambda tx: Catalog.set_blob_r2(tx, cid, "none", now))

    # -- pull --------------------------------------------------------------------------------------

    async def pull_media(self, media_id: str, progress: Progress | None = None) -> PullReport:
        """Fetch a media item from R2 into the local store (see the module doc)."""

        async def manifest() -> bytes:
            data = await self.client.get_bytes(manifest_key(media_id))
            if data is None:
                raise NotFound(f"media {media_id} is not in R2")
            return data

        report = await pull_media(
            self.rt.catalog,
            self.rt.store,
            media_id,
            manifest,
            R2Source(self.client),
            concurrency=self.concurrency,
            progress=progress,
            in_r2=True,
        )
        self.metrics.bytes.labels(direction="down").inc(report.bytes)
        return report

    # -- drain support -----------------------------------------------------------------------------

    async def upload_last_copies(self, deadline_s: float) -> int:
        """Hand off media and blobs R2 lacks until ``deadline_s`` runs out (see the module
        doc); returns how many blobs made it."""
        done = 0
        media = await media_not_in_r2(self.rt.catalog)
        try:
            async with asyncio.timeout(deadline_s):
                for media_id in media:
                    done += await self._upload_held(await media_blobs(self.rt.catalog, media_id))
                    if await self.class_a_left() <= 0:
                        break  # no manifest PUT either; its blobs may be in R2 for later
                    await self._hand_off_manifest(media_id)
                done += await self._upload_held(await self.rt.catalog.not_in_r2())
        except TimeoutError:
            log.warning("last-copy upload ran out of time", extra={"blobs": done})
        return done

    async def class_a_left(self) -> int:
        """Class A requests ``r2.budget_class_a_per_month`` still allows this month: those the
        tiering service recorded, and those made since (not recorded yet), as the node's
        :class:`~peerd.replication.budget.RequestLedger` counts them."""
        await self.ledger.load()
        return self.ledger.left_a()

    async def _upload_held(self, cids: list[Cid]) -> int:
        """Upload those of ``cids`` held here and not in R2; returns how many were verified.
        Stops when the month's class A budget is used up (the node keeps its copies)."""
        rows = await self.rt.catalog.get_blobs(cids)
        queue = [
            row
            for c in reversed(cids)
            if (row := rows.get(c)) is not None
            and row.local_state == "present"
            and row.r2_state != "present"
        ]
        done = 0
        # Each upload takes its class A requests from what the month still allows before it
        # starts (no await in between), so concurrent workers never overrun the budget.
        left = await self.class_a_left()

        async def worker() -> None:
            nonlocal done, left
            while queue:
                cost = self.client.put_requests(queue[-1].size)
                if left < cost:
                    log.warning(
                        "R2 request budget used up; last copies stay on this node",
                        extra={"blobs": len(queue)},
                    )
                    queue.clear()
                    return
                left -= cost
                cid = queue.pop().cid
                try:
                    await self.upload_blob(cid)
                except PeerdError as exc:
                    log.info("last-copy upload failed", extra={"cid": cid, "error": exc.message})
                    continue
                async with self.rt.catalog.transaction() as tx:
                    await Catalog.set_blob_r2(tx, cid, "present", self._clock())
                done += 1

        await asyncio.gather(*(worker() for _ in range(self.concurrency)))
        return done

    async def _hand_off_manifest(self, media_id: str) -> None:
        """Upload the manifest of ``media_id`` if every one of its blobs is in R2."""
        try:
            data = await self._media_manifest(media_id)
            cids = list(decode(data).blob_cids())
            rows = await self.rt.catalog.get_blobs(cids)
            if not all(
                (r := rows.get(Cid(c))) is not None and r.r2_state == "present" for c in cids
            ):
                log.debug("media not handed off: blobs missing in R2", extra={"media": media_id})
                return
            await self.upload_manifest(media_id, data)
        except PeerdError as exc:
            log.info("manifest hand-off failed", extra={"media": media_id, "error": exc.message})
            return
        now = self._clock()
        async with self.rt.catalog.transaction() as tx:
            await set_media_r2(tx, media_id, "present", now)

    # -- status ------------------------------------------------------------------------------------

    async def job_status(self, job_id: str) -> dict[str, Any]:
        """A job (numeric id) or batch, as a JSON-able dict; NotFound if unknown."""
        return await self.job_status_of(self.outbox, job_id)

    @staticmethod
    async def job_status_of(outbox: Outbox, job_id: str) -> dict[str, Any]:
        """:meth:`job_status` on any outbox (the CLI reads it without an R2 client)."""
        if job_id.isdigit():
            job = await outbox.get(int(job_id))
            if job is None:
                raise NotFound(f"no replication job {job_id}")
            return {
                "id": job.id,
                "kind": job.kind,
                "target": job.target,
                "state": job.state,
                "attempts": job.attempts,
                "last_error": job.last_error,
                "bytes": job.bytes,
                "batch": job.batch_id,
            }
        jobs = await outbox.batch(job_id)
        if not jobs:
            raise NotFound(f"no replication batch {job_id}")
        states: dict[str, int] = {}
        for j in jobs:
            states[j.state] = states.get(j.state, 0) + 1
        finished = all(j.state in ("done", "failed") for j in jobs)
        return {
            "batch": job_id,
            "jobs": len(jobs),
            "states": states,
            "state": ("failed" if states.get("failed") else "done") if finished else "running",
            "bytes": sum(j.bytes for j in jobs),
            "errors": [
                {"id": j.id, "target": j.target, "error": j.last_error}
                for j in jobs
                if j.last_error
            ][:20],
        }
