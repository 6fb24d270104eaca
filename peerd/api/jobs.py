"""Command jobs: persisted in the catalog (``api_jobs``), run as asyncio tasks, polled by id.

Why the catalog and not memory: the coordinator polls job ids, possibly after the node restarted;
an id it holds must still answer (as ``failed: interrupted by restart`` if the node stopped while
it ran) instead of a 404 that looks like a lie. State changes follow :mod:`peerd.core.jobs`.
At most one open job exists per (kind, target): asking again returns the job already running.
Finished jobs beyond ``api.jobs_kept`` are pruned, oldest first.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from peerd.catalog import Catalog
from peerd.catalog.jobs import fail_open_jobs, get_job, insert_job, open_job, save_job
from peerd.core.jobs import INTERRUPTED, Event, Fail, Finish, Job, JobKind, Progress, Start
from peerd.core.jobs import transition as apply
from peerd.errors import NotFound, PeerdError

log = logging.getLogger("peerd.api.jobs")

ProgressFn = Callable[[float], None]
Work = Callable[[ProgressFn], Awaitable[dict[str, Any]]]


class JobRunner:
    """Runs command jobs with bounded concurrency and records every state change."""

    def __init__(
        self,
        catalog: Catalog,
        *,
        concurrency: int = 2,
        keep: int = 1000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.catalog = catalog
        self.keep = keep
        self._clock = clock
        self._sem = asyncio.Semaphore(concurrency)
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._boot = clock()

    @property
    def active(self) -> int:
        """Jobs queued or running in this process."""
        return len(self._tasks)

    async def recover(self) -> int:
        """Fail jobs left open by a previous run of the daemon; prune old finished jobs."""
        failed = await fail_open_jobs(
            self.catalog, INTERRUPTED, self._clock(), self._boot, self.keep
        )
        if failed:
            log.info("jobs interrupted by restart marked failed", extra={"jobs": failed})
        return failed

    async def get(self, job_id: str) -> Job:
        """The job; :class:`NotFound` if unknown."""
        job = await get_job(self.catalog, job_id)
        if job is None:
            raise NotFound(f"no job {job_id}")
        return job

    async def submit(
        self, kind: JobKind, target: str, params: dict[str, Any], work: Work
    ) -> tuple[Job, bool]:
        """Queue ``work`` as a job; returns (job, created). An open job for the same kind and
        target is returned instead of starting a second one."""
        now = self._clock()
        job = Job(secrets.token_hex(16), kind, target, "queued", now, now)
        if not await insert_job(self.catalog, job, params):
            running = await open_job(self.catalog, kind, target)
            if running is None:  # it finished between our insert and this read: start anew
                return await self.submit(kind, target, params, work)
            return running, False
        self._tasks[job.job_id] = asyncio.create_task(self._run(job, work), name=f"job-{kind}")
        return job, True

    async def _save(self, job: Job, event: Event) -> Job:
        new = apply(job, event, self._clock())
        await save_job(self.catalog, new)
        return new

    async def _run(self, job: Job, work: Work) -> None:
        current = job
        pending_progress: list[float] = []

        def progress(fraction: float) -> None:
            pending_progress.append(fraction)

        async def flush() -> None:
            # Progress is written at most every 0.5 s: a fast prefetch must not
            # become one catalog transaction per blob.
            nonlocal current
            while current.state == "running":
                await asyncio.sleep(0.5)
                if pending_progress:
                    frac = max(pending_progress)
                    pending_progress.clear()
                    current = await self._save(current, Progress(frac))

        try:
            async with self._sem:
                current = await self._save(current, Start())
                flusher = asyncio.create_task(flush())
                try:
                    result = await work(progress)
                finally:
                    flusher.cancel()
                    await asyncio.gather(flusher, return_exceptions=True)
                current = await self._save(current, Finish(result))
            log.info("job done", extra={"job": job.job_id, "kind": job.kind, "target": job.target})
        except asyncio.CancelledError:
            await asyncio.shield(self._fail(current, "cancelled: node stopping"))
            raise
        except PeerdError as exc:
            await self._fail(current, exc.message)
        except Exception as exc:
            log.exception("job crashed", extra={"job": job.job_id, "kind": job.kind})
            await self._fail(current, f"internal error: {type(exc).__name__}")
        finally:
            self._tasks.pop(job.job_id, None)

    async def _fail(self, job: Job, error: str) -> None:
        log.warning("job failed", extra={"job": job.job_id, "kind": job.kind, "error": error})
        if not job.final:
            await self._save(job, Fail(error))

    async def close(self) -> None:
        """Cancel running jobs (they are recorded as failed)."""
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
