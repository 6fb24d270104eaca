"""The durable outbox of R2 replication: jobs in ``replication_jobs``, claimed with leases
(decisions in :mod:`peerd.core.outbox`; the replicator runs them).

Jobs survive restarts because they are rows. A claim is one ``BEGIN IMMEDIATE`` transaction
that picks due jobs and writes a fresh lease owner token and the holding process (boot id, pid,
start time), so two workers -- in one process or in two (the daemon and ``peerd replicate
push``) -- never hold the same job. The same transaction first reclaims the leases of processes
that are gone (:func:`peerd.core.outbox.holder_gone`): a process killed mid-job blocks nobody,
whatever its lease's length. Completion and failure are conditional on the owner token.

A job that failed for good stays ``failed`` until :meth:`Outbox.retry_failed` queues it again
(an explicit push does, and the daemon at start and then hourly); :meth:`Outbox.failed_count`
counts only the jobs whose latest attempt at their (kind, target) failed, i.e. the current state.
"""

from __future__ import annotations

import logging
import random
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace

import aiosqlite

from peerd.catalog.db import Catalog, Row, named_rows
from peerd.core import outbox as core
from peerd.core.outbox import JOB_KINDS, Holder, JobView, RetryPolicy
from peerd.lock import holder_alive, this_process

log = logging.getLogger("peerd.replication")

_COLS = (
    "id, kind, target, state, attempts, lease_until, next_attempt_at, last_error, "
    "lease_owner, batch_id, bytes"
)


@dataclass(frozen=True)
class Job(JobView):
    """A claimed (or inspected) job: the fields the pure decisions use, and the rest of its row."""

    last_error: str | None
    lease_owner: str | None
    batch_id: str | None
    bytes: int


@dataclass(frozen=True)
class Lease:
    """Jobs one process holds: how many, and until when (the latest of their leases)."""

    holder: Holder
    jobs: int
    until: float


async def enqueue_in(
    tx: aiosqlite.Connection,
    kind: str,
    target: str,
    now: float,
    *,
    batch_id: str | None = None,
    after: float | None = None,
) -> int:
    """Queue a job inside an open transaction (e.g. the one that adds a media item).

    An open job of the same kind and target is reused (its id returned), so enqueueing twice is
    harmless.
    """
    if kind not in JOB_KINDS:
        raise ValueError(f"unknown job kind {kind!r}")
    cur = await tx.execute(
        "INSERT INTO replication_jobs(kind, target, state, next_attempt_at, created_at, "
        "updated_at, batch_id) VALUES(?, ?, 'queued', ?, ?, ?, ?) "
        "ON CONFLICT(kind, target) WHERE state IN ('queued', 'running') DO NOTHING",
        (kind, target, now if after is None else after, now, now, batch_id),
    )
    if cur.rowcount:
        return int(cur.lastrowid or 0)
    async with tx.execute(
        "SELECT id FROM replication_jobs WHERE kind=? AND target=? "
        "AND state IN ('queued', 'running')",
        (kind, target),
    ) as c:
        row = await c.fetchone()
    assert row is not None
    if batch_id is not None:
        await tx.execute(
            "UPDATE replication_jobs SET batch_id=COALESCE(batch_id, ?) WHERE id=?",
            (batch_id, row[0]),
        )
    return int(row[0])


class Outbox:
    """Job queue operations on the catalog."""

    def __init__(
        self,
        catalog: Catalog,
        policy: RetryPolicy | None = None,
        *,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        holder: Holder | None = None,
        alive: Callable[[Holder], bool] = holder_alive,
    ) -> None:
        self.catalog = catalog
        self.policy = policy or RetryPolicy()
        self._clock = clock
        self._rand = rand
        self.holder = holder or this_process()
        self._alive = alive

    async def enqueue(
        self, kind: str, target: str, *, batch_id: str | None = None, after: float | None = None
    ) -> int:
        """Queue a job (or find the open one); returns its id."""
        async with self.catalog.transaction() as tx:
            return await enqueue_in(tx, kind, target, self._clock(), batch_id=batch_id, after=after)

    async def enqueue_many(
        self, kind: str, targets: list[str], *, batch_id: str | None = None
    ) -> list[int]:
        """Queue many jobs in one transaction (one commit instead of one per job)."""
        now = self._clock()
        async with self.catalog.transaction() as tx:
            return [await enqueue_in(tx, kind, t, now, batch_id=batch_id) for t in targets]

    async def claim(self, limit: int = 1, kinds: frozenset[str] = JOB_KINDS) -> list[Job]:
        """Take up to ``limit`` due jobs (oldest due first) under a fresh lease."""
        now = self._clock()
        owner = secrets.token_hex(8)
        marks = ",".join("?" * len(kinds))
        h = self.holder
        async with self.catalog.transaction() as tx:
            await self._reclaim(tx, now)
            sql = (
                f"SELECT {_COLS} FROM replication_jobs WHERE kind IN ({marks}) AND ("  # noqa: S608
                "(state='queued' AND next_attempt_at <= ?) "
                "OR (state='running' AND (lease_until IS NULL OR lease_until < ?))) "
                "ORDER BY next_attempt_at, id LIMIT ?"
            )
            async with tx.execute(sql, (*sorted(kinds), now, now, limit)) as cur:
                rows = [Job(*r) for r in await cur.fetchall()]
            out = []
            for job in rows:
                c = core.claim(job, now, self.policy)
                await tx.execute(
                    "UPDATE replication_jobs SET state='running', lease_until=?, lease_owner=?, "
                    "lease_boot=?, lease_pid=?, lease_started=?, updated_at=? WHERE id=?",
                    (c.lease_until, owner, h.boot, h.pid, h.started, now, job.id),
                )
                out.append(
                    replace(job, state="running", lease_until=c.lease_until, lease_owner=owner)
                )
        return out

    async def _leases(self, conn: aiosqlite.Connection) -> list[Lease]:
        sql = (
            "SELECT lease_boot, lease_pid, lease_started, COUNT(*), MAX(lease_until) "
            "FROM replication_jobs WHERE state='running' AND lease_pid IS NOT NULL "
            "GROUP BY lease_boot, lease_pid, lease_started"
        )
        async with conn.execute(sql) as cur:
            return [
                Lease(Holder(str(r[0]), int(r[1]), int(r[2])), int(r[3]), float(r[4] or 0.0))
                for r in await cur.fetchall()
            ]

    async def _reclaim(self, tx: aiosqlite.Connection, now: float) -> None:
        """Queue again, at once and without counting a failure, the jobs of gone holders."""
        for lease in await self._leases(tx):
            h = lease.holder
            if h == self.holder or self._alive(h):
                continue
            await tx.execute(
                "UPDATE replication_jobs SET state='queued', lease_until=NULL, lease_owner=NULL, "
                "lease_boot=NULL, lease_pid=NULL, lease_started=NULL, next_attempt_at=?, "
                "updated_at=? WHERE state='running' AND lease_boot=? AND lease_pid=? "
                "AND lease_started=?",
                (now, now, h.boot, h.pid, h.started),
            )
            log.info(
                "reclaimed replication jobs of a process that is gone",
                extra={"jobs": lease.jobs, "pid": h.pid, "boot": h.boot},
            )

    async def leases(self) -> list[Lease]:
        """Jobs held by other processes (what a worker with nothing to claim waits for)."""
        held = await self._leases(self.catalog.conn)
        return [lease for lease in held if lease.holder != self.holder]

    async def retry_failed(self) -> int:
        """Queue again, due now with no attempts counted, every (kind, target) whose latest job
        failed; returns how many."""
        now = self._clock()
        async with self.catalog.transaction() as tx:
            cur = await tx.execute(
                "UPDATE replication_jobs SET state='queued', attempts=0, next_attempt_at=?, "
                "lease_until=NULL, lease_owner=NULL, updated_at=? WHERE state='failed' AND id IN "
                "(SELECT MAX(id) FROM replication_jobs GROUP BY kind, target)",
                (now, now),
            )
            return cur.rowcount

    async def failed_count(self) -> int:
        """(kind, target)s whose latest job failed: what is still wrong now."""
        sql = (
            "SELECT COUNT(*) FROM replication_jobs WHERE state='failed' AND id IN "
            "(SELECT MAX(id) FROM replication_jobs GROUP BY kind, target)"
        )
        async with self.catalog.conn.execute(sql) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def failed_of(self, kind: str, targets: list[str]) -> set[str]:
        """Those of ``targets`` whose latest ``kind`` job failed (and none is open)."""
        out: set[str] = set()
        for i in range(0, len(targets), 500):
            part = targets[i : i + 500]
            sql = (
                "SELECT target, state FROM replication_jobs WHERE kind=? "  # noqa: S608
                f"AND target IN ({','.join('?' * len(part))}) ORDER BY id"
            )
            latest: dict[str, str] = {}
            async with self.catalog.conn.execute(sql, (kind, *part)) as cur:
                for target, state in await cur.fetchall():
                    latest[str(target)] = str(state)
            out.update(t for t, st in latest.items() if st == "failed")
        return out

    async def renew(self, job: Job) -> bool:
        """Extend the lease of a job still owned; False if it was lost."""
        now = self._clock()
        async with self.catalog.transaction() as tx:
            cur = await tx.execute(
                "UPDATE replication_jobs SET lease_until=?, updated_at=? "
                "WHERE id=? AND lease_owner=? AND state='running'",
                (now + self.policy.lease_s, now, job.id, job.lease_owner),
            )
            return cur.rowcount > 0

    async def complete(
        self,
        job: Job,
        *,
        nbytes: int = 0,
        also: Callable[[aiosqlite.Connection], Awaitable[object]] | None = None,
    ) -> bool:
        """Mark a job done (conditional on owning it); False if the lease was lost.

        ``also(tx)`` writes in the same transaction (e.g. marking the blob present in R2), so the
        job's effect and its completion land together or not at all.
        """
        now = self._clock()
        async with self.catalog.transaction() as tx:
            cur = await tx.execute(
                "UPDATE replication_jobs SET state='done', lease_until=NULL, last_error=NULL, "
                "bytes=?, updated_at=? WHERE id=? AND lease_owner=? AND state='running'",
                (nbytes, now, job.id, job.lease_owner),
            )
            if cur.rowcount == 0:
                return False
            if also is not None:
                await also(tx)
            return True

    async def fail(
        self, job: Job, error: str, *, retryable: bool = True, throttled: bool = False
    ) -> core.Retry | core.GiveUp | None:
        """Record a failed attempt; retry later or give up. None if the lease was lost."""
        now = self._clock()
        decision = core.fail(
            job,
            now,
            error,
            min(self._rand(), 0.999999),
            self.policy,
            retryable=retryable,
            throttled=throttled,
        )
        return decision if await self._apply(job, decision, now) else None

    async def defer(self, job: Job, delay_s: float, reason: str) -> bool:
        """Put a job back without counting a failure."""
        now = self._clock()
        return await self._apply(job, core.defer(job, now, delay_s, reason), now)

    async def _apply(self, job: Job, decision: core.Retry | core.GiveUp, now: float) -> bool:
        if isinstance(decision, core.Retry):
            sql = (
                "UPDATE replication_jobs SET state='queued', lease_until=NULL, lease_owner=NULL, "
                "attempts=?, next_attempt_at=?, last_error=?, updated_at=? "
                "WHERE id=? AND lease_owner=? AND state='running'"
            )
            args: tuple[object, ...] = (
                decision.attempts,
                decision.next_attempt_at,
                decision.error[:1000],
                now,
                job.id,
                job.lease_owner,
            )
        else:
            sql = (
                "UPDATE replication_jobs SET state='failed', lease_until=NULL, attempts=?, "
                "last_error=?, updated_at=? WHERE id=? AND lease_owner=? AND state='running'"
            )
            args = (decision.attempts, decision.error[:1000], now, job.id, job.lease_owner)
        async with self.catalog.transaction() as tx:
            cur = await tx.execute(sql, args)
            return cur.rowcount > 0

    async def get(self, job_id: int) -> Job | None:
        """One job by id."""
        sql = f"SELECT {_COLS} FROM replication_jobs WHERE id=?"  # noqa: S608
        async with self.catalog.conn.execute(sql, (job_id,)) as cur:
            row = await cur.fetchone()
        return None if row is None else Job(*row)

    async def batch(self, batch_id: str) -> list[Job]:
        """Every job of a batch."""
        sql = f"SELECT {_COLS} FROM replication_jobs WHERE batch_id=? ORDER BY id"  # noqa: S608
        async with self.catalog.conn.execute(sql, (batch_id,)) as cur:
            return [Job(*r) for r in await cur.fetchall()]

    async def next_due(self) -> float | None:
        """When the next queued job becomes due (None if none is queued)."""
        sql = (
            "SELECT MIN(next_attempt_at) FROM replication_jobs WHERE state='queued' "
            "UNION ALL SELECT MIN(lease_until) FROM replication_jobs WHERE state='running'"
        )
        async with self.catalog.conn.execute(sql) as cur:
            vals = [float(r[0]) for r in await cur.fetchall() if r[0] is not None]
        return min(vals) if vals else None

    async def open_count(self) -> int:
        """Jobs queued or running."""
        sql = "SELECT COUNT(*) FROM replication_jobs WHERE state IN ('queued', 'running')"
        async with self.catalog.conn.execute(sql) as cur:
            row = await cur.fetchone()
        return int(row[0]) if row else 0


async def job_counts(catalog: Catalog) -> dict[str, int]:
    """Replication jobs by state."""
    sql = "SELECT state, COUNT(*) FROM replication_jobs GROUP BY state"
    async with catalog.conn.execute(sql) as cur:
        return {str(r[0]): int(r[1]) for r in await cur.fetchall()}


async def recent_jobs(catalog: Catalog, since: float) -> list[Row]:
    """Jobs not done, or changed after ``since``: kind, target, state, attempts, last_error,
    created_at, updated_at."""
    return await named_rows(
        catalog.conn,
        "SELECT kind, target, state, attempts, last_error, created_at, updated_at "
        "FROM replication_jobs WHERE state != 'done' OR updated_at > ?",
        (since,),
    )


async def push_backlog(catalog: Catalog) -> tuple[int, int]:
    """(bytes, count) of the blobs queued or being pushed to R2."""
    sql = (
        "SELECT COALESCE(SUM(b.size), 0), COUNT(*) FROM replication_jobs j "
        "JOIN blobs b ON b.cid = j.target WHERE j.kind='push_blob' "
        "AND j.state IN ('queued', 'running')"
    )
    async with catalog.conn.execute(sql) as cur:
        row = await cur.fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


async def recent_errors(catalog: Catalog, limit: int = 10) -> list[Row]:
    """The last jobs that failed an attempt: id, kind, target, attempts, error."""
    return await named_rows(
        catalog.conn,
        "SELECT id, kind, target, attempts, last_error AS error FROM replication_jobs "
        "WHERE last_error IS NOT NULL ORDER BY updated_at DESC LIMIT ?",
        (limit,),
    )
