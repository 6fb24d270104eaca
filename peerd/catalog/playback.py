"""Queries on the playback analytics tables (``migrations/0923_playback.sql``): the hourly
rollup of sessions by dimensions, bytes by source, and anomalies."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from peerd.catalog.db import Catalog, Row, named_rows

DIMENSIONS = ("media", "rendition", "codec", "path", "region")
COUNTS = ("sessions", "started", "failures", "stalls", "stalled_sessions", "startup_sum")
HIST = tuple(f"h{i}" for i in range(7))

# Built from the constant column names above.
_ADD = (
    "INSERT INTO playback_hourly(hour, media, rendition, codec, path, region, "  # noqa: S608
    + ", ".join(COUNTS + HIST)
    + ") VALUES ("
    + ", ".join("?" * (6 + len(COUNTS) + len(HIST)))
    + ") ON CONFLICT(hour, media, rendition, codec, path, region) DO UPDATE SET "
    + ", ".join(f"{c} = {c} + excluded.{c}" for c in COUNTS + HIST)
)


async def add_rollup(
    catalog: Catalog,
    rows: Iterable[tuple[Sequence[Any], Sequence[float]]],
    byte_counts: Mapping[tuple[int, str], int],
    anomalies: Iterable[Sequence[Any]],
) -> None:
    """Add counts to the hourly rollup, in one transaction: ``rows`` are (hour and the five
    dimensions, then :data:`COUNTS` and :data:`HIST` values); ``byte_counts`` bytes by (hour,
    source); ``anomalies`` (at, kind, codec, region, baseline, observed, z, sessions)."""
    async with catalog.transaction() as tx:
        await tx.executemany(_ADD, [(*key, *values) for key, values in rows])
        await tx.executemany(
            "INSERT INTO playback_bytes(hour, source, bytes) VALUES(?, ?, ?) "
            "ON CONFLICT(hour, source) DO UPDATE SET bytes = bytes + excluded.bytes",
            [(h, s, n) for (h, s), n in byte_counts.items() if n],
        )
        await tx.executemany(
            "INSERT INTO playback_anomalies(at, kind, codec, region, baseline, observed, z, "
            "sessions) VALUES(?, ?, ?, ?, ?, ?, ?, ?)",
            [tuple(a) for a in anomalies],
        )


async def rollup(
    catalog: Catalog,
    since_hour: int,
    until_hour: int,
    group_by: Sequence[str],
    where: Mapping[str, str],
    limit: int,
) -> list[Row]:
    """The rollup summed over hours ``since_hour <= hour <= until_hour`` by the dimensions in
    ``group_by`` (and ``hour`` if named), rows matching ``where`` (dimension: value) only;
    biggest session counts first, at most ``limit`` rows."""
    keys = [k for k in group_by if k in (*DIMENSIONS, "hour")]
    conds = ["hour >= ?", "hour <= ?"]
    params: list[Any] = [since_hour, until_hour]
    for k, v in where.items():
        if k in DIMENSIONS:
            conds.append(f"{k} = ?")
            params.append(v)
    sums = ", ".join(f"SUM({c}) AS {c}" for c in COUNTS + HIST)
    cols = ", ".join([*keys, sums])
    sql = f"SELECT {cols} FROM playback_hourly WHERE {' AND '.join(conds)}"  # noqa: S608
    if keys:
        sql += f" GROUP BY {', '.join(keys)}"
    sql += " HAVING COUNT(*) > 0 ORDER BY sessions DESC LIMIT ?"
    params.append(limit)
    return await named_rows(catalog.conn, sql, params)


async def bytes_by_source(catalog: Catalog, since_hour: int, until_hour: int) -> dict[str, int]:
    """Bytes served by source over the hours."""
    sql = (
        "SELECT source, SUM(bytes) FROM playback_bytes WHERE hour >= ? AND hour <= ? "
        "GROUP BY source"
    )
    async with catalog.conn.execute(sql, (since_hour, until_hour)) as cur:
        return {str(r[0]): int(r[1]) for r in await cur.fetchall()}


async def anomalies(catalog: Catalog, since: float, until: float, limit: int) -> list[Row]:
    """Anomalies raised between ``since`` and ``until`` (Unix seconds), newest first."""
    return await named_rows(
        catalog.conn,
        "SELECT at, kind, codec, region, baseline, observed, z, sessions FROM "
        "playback_anomalies WHERE at >= ? AND at <= ? ORDER BY at DESC LIMIT ?",
        (since, until, limit),
    )


async def prune(catalog: Catalog, before: float) -> None:
    """Delete what is older than ``before`` (Unix seconds)."""
    async with catalog.transaction() as tx:
        await tx.execute("DELETE FROM playback_hourly WHERE hour < ?", (before,))
        await tx.execute("DELETE FROM playback_bytes WHERE hour < ?", (before,))
        await tx.execute("DELETE FROM playback_anomalies WHERE at < ?", (before,))
