"""Queries on ``media``, ``renditions`` and ``segments``: what a media item is made of.

A manifest is stored as its canonical JSON bytes; a rendition made on demand has segment rows
whose ``cid`` (and an ``init_cid``) stay NULL until produced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import aiosqlite

from peerd.catalog.db import Catalog, Row, named_rows
from peerd.core.ids import Cid


async def media_exists(catalog: Catalog, media_id: str) -> bool:
    """True if the media item is in the catalog."""
    sql = "SELECT 1 FROM media WHERE media_id=?"
    async with catalog.conn.execute(sql, (media_id,)) as cur:
        return await cur.fetchone() is not None


async def media_count(catalog: Catalog) -> int:
    """How many media items the catalog holds."""
    async with catalog.conn.execute("SELECT COUNT(*) FROM media") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def media_ids(catalog: Catalog) -> list[str]:
    """Every media id."""
    async with catalog.conn.execute("SELECT media_id FROM media") as cur:
        return [str(r[0]) for r in await cur.fetchall()]


async def latest_media_id(catalog: Catalog, source_path: str | None = None) -> str | None:
    """The newest media item ingested from ``source_path`` (any source if None)."""
    sql = "SELECT media_id FROM media ORDER BY created_at DESC LIMIT 1"
    args: tuple[str, ...] = ()
    if source_path is not None:
        sql = "SELECT media_id FROM media WHERE source_path=? ORDER BY created_at DESC LIMIT 1"
        args = (source_path,)
    async with catalog.conn.execute(sql, args) as cur:
        row = await cur.fetchone()
    return None if row is None else str(row[0])


async def media_manifest(catalog: Catalog, media_id: str) -> bytes | None:
    """The stored manifest bytes of a media item (None if the item is unknown)."""
    async with catalog.conn.execute(
        "SELECT manifest FROM media WHERE media_id=?", (media_id,)
    ) as cur:
        row = await cur.fetchone()
    if row is None:
        return None
    raw = row[0]
    return str(raw).encode() if isinstance(raw, str) else bytes(raw)


async def media_blobs(catalog: Catalog, media_id: str) -> list[Cid]:
    """Every blob of a media item: init segments, segments, and its manifest blob if kept."""
    sql = (
        "SELECT init_cid FROM renditions WHERE media_id=? AND init_cid IS NOT NULL "
        "UNION SELECT cid FROM segments WHERE media_id=? AND cid IS NOT NULL "
        "UNION SELECT cid FROM blobs WHERE cid=?"
    )
    async with catalog.conn.execute(sql, (media_id, media_id, media_id)) as cur:
        return [Cid(str(r[0])) for r in await cur.fetchall()]


async def pin_media(catalog: Catalog, media_id: str, cids: Sequence[Cid]) -> int:
    """Pin a media item and its blobs ``cids``; returns how many blob rows were pinned."""
    async with catalog.transaction() as tx:
        await tx.execute("UPDATE media SET pinned=1 WHERE media_id=?", (media_id,))
        return await _set_pins(tx, cids, 1)


async def unpin_media(catalog: Catalog, media_id: str, cids: Sequence[Cid]) -> int:
    """Unpin a media item and those of its blobs ``cids`` no other pinned item uses; returns how
    many blob rows were unpinned."""
    still = (
        "SELECT init_cid FROM renditions r JOIN media m USING (media_id) "
        "WHERE m.pinned=1 AND r.init_cid IS NOT NULL "
        "UNION SELECT s.cid FROM segments s JOIN media m USING (media_id) "
        "WHERE m.pinned=1 AND s.cid IS NOT NULL "
        "UNION SELECT media_id FROM media WHERE pinned=1"
    )
    async with catalog.transaction() as tx:
        await tx.execute("UPDATE media SET pinned=0 WHERE media_id=?", (media_id,))
        return await _set_pins(tx, cids, 0, f" AND cid NOT IN ({still})")


async def _set_pins(
    tx: aiosqlite.Connection, cids: Sequence[Cid], pinned: int, where: str = ""
) -> int:
    n = 0
    for i in range(0, len(cids), 500):
        part = cids[i : i + 500]
        marks = ",".join("?" * len(part))
        sql = f"UPDATE blobs SET pinned={pinned} WHERE cid IN ({marks}){where}"  # noqa: S608
        cur = await tx.execute(sql, part)
        n += cur.rowcount
    return n


async def init_cid(catalog: Catalog, media_id: str, rendition_id: str) -> Cid | None:
    """The init segment of a rendition, once known."""
    sql = "SELECT init_cid FROM renditions WHERE media_id=? AND rendition_id=?"
    async with catalog.conn.execute(sql, (media_id, rendition_id)) as cur:
        row = await cur.fetchone()
    return None if row is None or row[0] is None else Cid(str(row[0]))


async def segment_cid(catalog: Catalog, media_id: str, rendition_id: str, seq: int) -> Cid | None:
    """The blob of one segment, once produced."""
    sql = "SELECT cid FROM segments WHERE media_id=? AND rendition_id=? AND seq=?"
    async with catalog.conn.execute(sql, (media_id, rendition_id, seq)) as cur:
        row = await cur.fetchone()
    return None if row is None or row[0] is None else Cid(str(row[0]))


async def blob_role(catalog: Catalog, media_id: str, cid: str) -> Literal["init", "seg"] | None:
    """Whether ``cid`` is a segment or an init segment of the media item (None: neither)."""
    async with catalog.conn.execute(
        "SELECT 'seg' FROM segments WHERE media_id=? AND cid=? "
        "UNION ALL SELECT 'init' FROM renditions WHERE media_id=? AND init_cid=? LIMIT 1",
        (media_id, cid, media_id, cid),
    ) as cur:
        row = await cur.fetchone()
    if row is None:
        return None
    return "init" if row[0] == "init" else "seg"


# -- the dashboard's read-outs ------------------------------------------------------------------


async def recent_media(catalog: Catalog, limit: int) -> list[Row]:
    """The newest items: media_id, title, duration_s, created_at, pinned, r2_state."""
    return await named_rows(
        catalog.conn,
        "SELECT media_id, title, duration_s, created_at, pinned, r2_state FROM media "
        "ORDER BY created_at DESC LIMIT ?",
        (limit,),
    )


async def renditions_of(catalog: Catalog, ids: Sequence[str]) -> list[Row]:
    """Renditions of the items ``ids``, in ladder order: media_id, rendition_id, kind,
    container, codecs, bandwidth, width, height, produced."""
    marks = ",".join("?" * len(ids))
    return await named_rows(
        catalog.conn,
        f"SELECT media_id, rendition_id, kind, container, codecs, bandwidth, width, height, "  # noqa: S608
        f"produced FROM renditions WHERE media_id IN ({marks}) ORDER BY media_id, position",
        ids,
    )


async def local_share(catalog: Catalog, ids: Sequence[str]) -> list[Row]:
    """Per item of ``ids``: media_id, segments, local_segments, local_bytes (held on disk)."""
    marks = ",".join("?" * len(ids))
    return await named_rows(
        catalog.conn,
        f"SELECT s.media_id, COUNT(*) AS segments, "  # noqa: S608
        f"SUM(b.local_state = 'present') AS local_segments, "
        f"COALESCE(SUM(CASE WHEN b.local_state = 'present' THEN b.size END), 0) AS local_bytes "
        f"FROM segments s LEFT JOIN blobs b ON b.cid = s.cid WHERE s.media_id IN ({marks}) "
        f"GROUP BY s.media_id",
        ids,
    )


async def media_layout(catalog: Catalog, media_id: str) -> Row | None:
    """One item (media_id, title, duration_s) with its ``renditions`` (rendition_id, kind,
    container, codecs, bandwidth, width, height, init_cid), each with its ``segments`` (seq,
    duration_s, cid)."""
    conn = catalog.conn
    items = await named_rows(
        conn, "SELECT media_id, title, duration_s FROM media WHERE media_id = ?", (media_id,)
    )
    if not items:
        return None
    rends = await named_rows(
        conn,
        "SELECT rendition_id, kind, container, codecs, bandwidth, width, height, init_cid "
        "FROM renditions WHERE media_id = ? ORDER BY position",
        (media_id,),
    )
    segs = await named_rows(
        conn,
        "SELECT rendition_id, seq, duration_s, cid FROM segments WHERE media_id = ? "
        "ORDER BY rendition_id, seq",
        (media_id,),
    )
    by_rend: dict[str, list[Row]] = {}
    for s in segs:
        rid = s.pop("rendition_id")
        by_rend.setdefault(rid, []).append(s)
    for r in rends:
        r["segments"] = by_rend.get(r["rendition_id"], [])
    return {**items[0], "renditions": rends}
