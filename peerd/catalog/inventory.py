"""Queries on ``inventory_seq``: the numbered changes to held blobs and media items.

Triggers (``migrations/0700_inventory_api.sql``) give every insert, change and delete of a blob or
media row the next sequence number; a change whose row is gone reads as a deletion.
"""

from __future__ import annotations

from dataclasses import dataclass

from peerd.catalog.db import Catalog


@dataclass(frozen=True)
class Change:
    """One numbered change; the row's fields are None when it was deleted."""

    kind: str  # blob | media
    id: str
    seq: int
    deleted: bool
    size: int | None = None
    blob_kind: str | None = None
    local_state: str | None = None
    r2_state: str | None = None
    pinned: bool | None = None
    title: str | None = None
    duration_s: float | None = None


async def high_seq(catalog: Catalog) -> int:
    """The highest change sequence number (0 if none)."""
    async with catalog.conn.execute("SELECT MAX(seq) FROM inventory_seq") as cur:
        row = await cur.fetchone()
    return 0 if row is None or row[0] is None else int(row[0])


async def held(catalog: Catalog) -> list[tuple[str, str]]:
    """What the node holds, as (kind, id): present blobs, then media items."""
    conn = catalog.conn
    async with conn.execute("SELECT cid FROM blobs WHERE local_state='present'") as cur:
        entries = [("blob", str(r[0])) for r in await cur.fetchall()]
    async with conn.execute("SELECT media_id FROM media") as cur:
        entries += [("media", str(r[0])) for r in await cur.fetchall()]
    return entries


async def changes(catalog: Catalog, since: int, limit: int) -> list[Change]:
    """Up to ``limit`` changes after ``since``, in sequence order."""
    sql = (
        "SELECT s.kind, s.id, s.seq, b.cid IS NULL AND m.media_id IS NULL, b.size, b.kind, "
        "b.local_state, COALESCE(b.r2_state, m.r2_state), COALESCE(b.pinned, m.pinned), "
        "m.title, m.duration_s "
        "FROM inventory_seq s "
        "LEFT JOIN blobs b ON s.kind='blob' AND b.cid=s.id "
        "LEFT JOIN media m ON s.kind='media' AND m.media_id=s.id "
        "WHERE s.seq > ? ORDER BY s.seq LIMIT ?"
    )
    async with catalog.conn.execute(sql, (since, limit)) as cur:
        rows = await cur.fetchall()
    return [
        Change(
            str(r[0]),
            str(r[1]),
            int(r[2]),
            deleted=bool(r[3]),
            size=r[4],
            blob_kind=r[5],
            local_state=r[6],
            r2_state=r[7],
            pinned=None if r[8] is None else bool(r[8]),
            title=r[9],
            duration_s=r[10],
        )
        for r in rows
    ]
