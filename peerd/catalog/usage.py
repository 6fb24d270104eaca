"""Queries on ``usage``: counters by UTC day, metric and label."""

from __future__ import annotations

from peerd.catalog.db import Catalog, Row, named_rows


async def daily_bytes_served(catalog: Catalog) -> list[Row]:
    """Bytes served (metrics ``bytes_served*``) by day and label, newest day first: day, label,
    bytes (at most 300 rows)."""
    return await named_rows(
        catalog.conn,
        "SELECT day, label, SUM(value) AS bytes FROM usage WHERE metric LIKE 'bytes_served%' "
        "GROUP BY day, label ORDER BY day DESC LIMIT 300",
    )


async def add_usage(catalog: Catalog, day: str, metric: str, counts: dict[str, int]) -> None:
    """Add ``counts`` (by label) to the day's counters of ``metric``, in one transaction."""
    async with catalog.transaction() as tx:
        await tx.executemany(
            "INSERT INTO usage(day, metric, label, value) VALUES(?, ?, ?, ?) "
            "ON CONFLICT(day, metric, label) DO UPDATE SET value = value + excluded.value",
            [(day, metric, label, n) for label, n in counts.items() if n],
        )


async def usage_since(catalog: Catalog, metric: str, first_day: str) -> dict[str, int]:
    """The counters of ``metric`` summed by label from ``first_day`` (``YYYY-MM-DD``) on."""
    sql = "SELECT label, SUM(value) FROM usage WHERE metric=? AND day >= ? GROUP BY label"
    async with catalog.conn.execute(sql, (metric, first_day)) as cur:
        return {str(r[0]): int(r[1]) for r in await cur.fetchall()}
