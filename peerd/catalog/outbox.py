"""Read-outs of ``replication_jobs``, the R2 replication outbox (``peerd.replication.outbox``
runs it)."""

from __future__ import annotations

from peerd.catalog.db import Catalog, Row, named_rows


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
