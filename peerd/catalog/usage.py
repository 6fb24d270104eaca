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
