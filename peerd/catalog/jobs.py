"""Queries on ``api_jobs``: the coordinator's command jobs (:mod:`peerd.api.jobs` runs them).

A unique index allows one open (``queued`` or ``running``) job per (kind, target).
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from peerd.catalog.db import Catalog
from peerd.core.jobs import Job

_COLS = "job_id, kind, target, state, progress, result, error, created_at, updated_at"


def _job(r: tuple[Any, ...]) -> Job:
    return Job(
        job_id=str(r[0]),
        kind=r[1],
        target=str(r[2]),
        state=r[3],
        progress=float(r[4]),
        result=None if r[5] is None else json.loads(r[5]),
        error=None if r[6] is None else str(r[6]),
        created_at=float(r[7]),
        updated_at=float(r[8]),
    )


def _result(job: Job) -> str | None:
    return None if job.result is None else json.dumps(job.result, sort_keys=True)


async def get_job(catalog: Catalog, job_id: str) -> Job | None:
    """The job ``job_id``, if recorded."""
    sql = f"SELECT {_COLS} FROM api_jobs WHERE job_id=?"  # noqa: S608
    async with catalog.conn.execute(sql, (job_id,)) as cur:
        row = await cur.fetchone()
    return None if row is None else _job(tuple(row))


async def open_job(catalog: Catalog, kind: str, target: str) -> Job | None:
    """The queued or running job for (kind, target), if any."""
    sql = (
        f"SELECT {_COLS} FROM api_jobs WHERE kind=? AND target=? "  # noqa: S608
        "AND state IN ('queued', 'running')"
    )
    async with catalog.conn.execute(sql, (kind, target)) as cur:
        row = await cur.fetchone()
    return None if row is None else _job(tuple(row))


async def insert_job(catalog: Catalog, job: Job, params: dict[str, Any]) -> bool:
    """Record a new job; False (nothing written) if one is already open for its kind and target."""
    try:
        async with catalog.transaction() as tx:
            await tx.execute(
                f"INSERT INTO api_jobs({_COLS}, params) VALUES(?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
                (
                    job.job_id,
                    job.kind,
                    job.target,
                    job.state,
                    job.progress,
                    _result(job),
                    job.error,
                    job.created_at,
                    job.updated_at,
                    json.dumps(params, sort_keys=True),
                ),
            )
    except sqlite3.IntegrityError:
        return False
    return True


async def save_job(catalog: Catalog, job: Job) -> None:
    """Write the job's state, progress, result, error and update time."""
    async with catalog.transaction() as tx:
        await tx.execute(
            "UPDATE api_jobs SET state=?, progress=?, result=?, error=?, updated_at=? "
            "WHERE job_id=?",
            (job.state, job.progress, _result(job), job.error, job.updated_at, job.job_id),
        )


async def fail_open_jobs(
    catalog: Catalog, error: str, now: float, created_before: float, keep: int
) -> int:
    """Fail the jobs still open that were created before ``created_before`` (a previous run of
    the daemon), and prune finished jobs beyond the newest ``keep``; returns how many failed."""
    async with catalog.transaction() as tx:
        cur = await tx.execute(
            "UPDATE api_jobs SET state='failed', error=?, updated_at=? "
            "WHERE state IN ('queued', 'running') AND created_at < ?",
            (error, now, created_before),
        )
        failed = cur.rowcount
        await tx.execute(
            "DELETE FROM api_jobs WHERE state IN ('done', 'failed') AND job_id NOT IN "
            "(SELECT job_id FROM api_jobs ORDER BY updated_at DESC LIMIT ?)",
            (keep,),
        )
    return failed
