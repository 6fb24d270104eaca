"""Queries on ``media``, ``renditions`` and ``segments``: what a media item is made of.

A manifest is stored as its canonical JSON bytes and turned into rows in one place,
:func:`record_media` (ingest, pulls, test fixtures); a rendition made on demand has segment rows
whose ``cid`` (and an ``init_cid``) stay NULL until produced. A media item's R2 state moves only
through :func:`set_media_r2`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Literal

import aiosqlite

from peerd.catalog.db import Catalog, Row, named_rows
from peerd.core.ids import Cid
from peerd.core.manifest import Manifest


async def media_exists(catalog: Catalog, media_id: str) -> bool:
    """True if the media item is in the catalog."""
    sql = "SELECT 1 FROM media WHERE media_id=?"
    async with catalog.conn.execute(sql, (media_id,)) as cur:
        return await cur.fetchone() is not None


async def media_ids(catalog: Catalog) -> list[str]:
    """Every media id in the catalog (announced on the DHT beside the blob ids)."""
    async with catalog.conn.execute("SELECT media_id FROM media") as cur:
        return [str(r[0]) for r in await cur.fetchall()]


async def media_count(catalog: Catalog) -> int:
    """How many media items the catalog holds."""
    async with catalog.conn.execute("SELECT COUNT(*) FROM media") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


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


async def record_media(
    tx: aiosqlite.Connection,
    media_id: str,
    data: bytes,
    manifest: Manifest,
    now: float,
    *,
    title: str = "",
    source: tuple[str, str] | None = None,
    in_r2: bool = False,
) -> bool:
    """Write the media, rendition and segment rows of a manifest (inside ``tx``): the one place
    that turns a manifest into catalog rows (ingest, a pull from R2 or from a LAN peer).

    ``source`` is the ingested file's ``(path, size:mtime signature)``, so an unchanged file is
    not packaged again. ``in_r2`` says the manifest and every blob it names are in the node's R2
    bucket (a pull from R2): the media row and those blob rows say so. The blob rows themselves
    are the store's (written when a blob's file is durable); the caller commits this after every
    blob is stored, so a segment row never names a blob the node lacks.

    Returns False when the media item was already catalogued: then only ``source`` (if given)
    and the R2 state of the blobs are updated.
    """
    if in_r2:
        cids = list(manifest.blob_cids())
        for i in range(0, len(cids), 500):
            part = cids[i : i + 500]
            marks = ",".join("?" * len(part))
            await tx.execute(
                f"UPDATE blobs SET r2_state='present', r2_checked_at=? "  # noqa: S608
                f"WHERE cid IN ({marks}) AND r2_state != 'deleting'",
                (now, *part),
            )
    path, sig = source or (None, None)
    duration = max((r.duration_seconds for r in manifest.renditions), default=0.0)
    cur = await tx.execute(
        "INSERT INTO media(media_id, title, source_path, source_sig, manifest, duration_s, "
        "created_at, r2_state, r2_since) VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(media_id) DO NOTHING",
        (
            media_id,
            title,
            path,
            sig,
            data,
            duration,
            now,
            "present" if in_r2 else "none",
            now if in_r2 else None,
        ),
    )
    if cur.rowcount == 0:
        if source is not None:
            await tx.execute(
                "UPDATE media SET source_path=?, source_sig=? WHERE media_id=?",
                (path, sig, media_id),
            )
        return False
    for pos, r in enumerate(manifest.renditions):
        await tx.execute(
            "INSERT INTO renditions(media_id, rendition_id, position, kind, container, codecs, "
            "bandwidth, width, height, init_cid, produced) VALUES(?,?,?,?,?,?,?,?,?,?,?)",
            (
                media_id,
                r.id,
                pos,
                r.kind,
                manifest.container,
                r.codecs,
                r.bandwidth,
                r.width,
                r.height,
                r.init,
                0 if r.on_demand else 1,
            ),
        )
        await tx.executemany(
            "INSERT INTO segments(media_id, rendition_id, seq, duration_s, cid) VALUES(?,?,?,?,?)",
            [
                (media_id, r.id, seq, r.segment_seconds(seq), s.cid)
                for seq, s in enumerate(r.segments)
            ],
        )
    return True


async def media_from(catalog: Catalog, path: str, sig: str) -> Cid | None:
    """The media item ingested from the file ``path`` while it had signature ``sig``."""
    sql = "SELECT media_id FROM media WHERE source_path=? AND source_sig=?"
    async with catalog.conn.execute(sql, (path, sig)) as cur:
        row = await cur.fetchone()
    return None if row is None else Cid(str(row[0]))


async def is_referenced(catalog: Catalog, cid: str) -> bool:
    """Whether a segment or init segment row names ``cid``."""
    sql = "SELECT 1 FROM segments WHERE cid=? UNION ALL SELECT 1 FROM renditions WHERE init_cid=?"
    async with catalog.conn.execute(sql + " LIMIT 1", (cid, cid)) as cur:
        return await cur.fetchone() is not None


async def record_produced(
    catalog: Catalog, media_id: str, rendition_id: str, seq: int, cid: Cid, init: Cid | None
) -> None:
    """Record an on-demand segment (and its rendition's init segment, if new) once stored."""
    async with catalog.transaction() as tx:
        await tx.execute(
            "UPDATE segments SET cid=? WHERE media_id=? AND rendition_id=? AND seq=?",
            (cid, media_id, rendition_id, seq),
        )
        if init is not None:
            await tx.execute(
                "UPDATE renditions SET init_cid=? WHERE media_id=? AND rendition_id=? "
                "AND init_cid IS NULL",
                (init, media_id, rendition_id),
            )


async def locate_blob(catalog: Catalog, cid: str) -> list[tuple[str, str, int]]:
    """Where ``cid`` is used: (media id, rendition id, seq), seq -1 for an init segment."""
    sql = (
        "SELECT media_id, rendition_id, seq FROM segments WHERE cid=? "
        "UNION ALL SELECT media_id, rendition_id, -1 FROM renditions WHERE init_cid=? "
        "ORDER BY 1, 2, 3"
    )
    async with catalog.conn.execute(sql, (cid, cid)) as cur:
        return [(str(r[0]), str(r[1]), int(r[2])) for r in await cur.fetchall()]


async def dangling_segments(catalog: Catalog) -> list[str]:
    """Segments of ingested media naming a blob that has no row, as ``media/rendition/seq ->
    cid``. Media found in the network (``peerd.delivery.media``) are recorded before any of
    their blobs, which come on demand: theirs are not dangling."""
    sql = (
        "SELECT s.media_id, s.rendition_id, s.seq, s.cid FROM segments s "
        "JOIN media m ON m.media_id = s.media_id AND m.source_path IS NOT NULL "
        "LEFT JOIN blobs b ON b.cid = s.cid WHERE s.cid IS NOT NULL AND b.cid IS NULL"
    )
    async with catalog.conn.execute(sql) as cur:
        return [f"{m}/{r}/{seq} -> {cid}" for m, r, seq, cid in await cur.fetchall()]


async def manifests(catalog: Catalog) -> AsyncIterator[tuple[str, bytes]]:
    """Every (media id, manifest bytes)."""
    async with catalog.conn.execute("SELECT media_id, manifest FROM media") as cur:
        async for media_id, raw in cur:
            yield str(media_id), raw.encode() if isinstance(raw, str) else bytes(raw)


# -- R2 state ---------------------------------------------------------------------------------

_MEDIA_R2 = {
    # Promotion queued: a media item already in R2 stays "present".
    "queued": "UPDATE media SET r2_state='queued' WHERE media_id=? AND r2_state != 'present'",
    "deleting": "UPDATE media SET r2_state='deleting' WHERE media_id=?",
    # Only a demotion under way ends in "none" (a promotion since then wins).
    "none": "UPDATE media SET r2_state='none', r2_since=NULL WHERE media_id=? "
    "AND r2_state='deleting'",
}


async def set_media_r2(
    tx: aiosqlite.Connection,
    media_id: str,
    state: Literal["queued", "present", "deleting", "none"],
    now: float,
) -> None:
    """Move a media item's R2 state (inside ``tx``)."""
    if state == "present":
        sql = "UPDATE media SET r2_state='present', r2_since=? WHERE media_id=?"
        await tx.execute(sql, (now, media_id))
    else:
        await tx.execute(_MEDIA_R2[state], (media_id,))


async def r2_users(catalog: Catalog, cid: str) -> int:
    """How many media items queued for or present in R2 use ``cid``."""
    sql = (
        "SELECT COUNT(*) FROM segments s JOIN media m ON m.media_id = s.media_id "
        "WHERE s.cid=? AND m.r2_state IN ('queued', 'present') "
        "UNION ALL SELECT COUNT(*) FROM renditions r JOIN media m ON m.media_id = r.media_id "
        "WHERE r.init_cid=? AND m.r2_state IN ('queued', 'present')"
    )
    async with catalog.conn.execute(sql, (cid, cid)) as cur:
        return sum(int(r[0]) for r in await cur.fetchall())


async def media_not_in_r2(catalog: Catalog) -> list[str]:
    """Media items whose R2 state is not ``present``."""
    async with catalog.conn.execute(
        "SELECT media_id FROM media WHERE r2_state != 'present'"
    ) as cur:
        return [str(r[0]) for r in await cur.fetchall()]


async def media_by_r2_state(catalog: Catalog) -> dict[str, int]:
    """Media item count by R2 state."""
    async with catalog.conn.execute(
        "SELECT r2_state, COUNT(*) FROM media GROUP BY r2_state"
    ) as cur:
        return {str(r[0]): int(r[1]) for r in await cur.fetchall()}


_MEDIA_BLOBS = (
    "SELECT m.media_id, m.r2_state, m.r2_since, b.size, b.access_score, b.last_access, "
    "b.local_state FROM media m JOIN ("
    "  SELECT media_id, cid FROM segments WHERE cid IS NOT NULL"
    "  UNION SELECT media_id, init_cid FROM renditions WHERE init_cid IS NOT NULL"
    ") x ON x.media_id = m.media_id JOIN blobs b ON b.cid = x.cid"
)


async def media_blob_rows(
    catalog: Catalog,
) -> list[tuple[str, str, float | None, int, float, float | None, str]]:
    """For tiering, one row per (media item, blob): media_id, r2_state, r2_since, size,
    access_score, last_access, local_state."""
    async with catalog.conn.execute(_MEDIA_BLOBS) as cur:
        return [tuple(r) for r in await cur.fetchall()]


_RENDITION_BLOBS = (
    "SELECT x.media_id, x.rendition_id, b.cid, b.size, b.access_score, b.last_access FROM ("
    "  SELECT media_id, rendition_id, cid FROM segments WHERE cid IS NOT NULL"
    "  UNION SELECT media_id, rendition_id, init_cid FROM renditions WHERE init_cid IS NOT NULL"
    ") x JOIN blobs b ON b.cid = x.cid"
)


async def rendition_blob_rows(
    catalog: Catalog,
) -> list[tuple[str, str, str, int, float, float | None]]:
    """For eviction, one row per (rendition, catalogued blob, held or not): media_id,
    rendition_id, cid, size, access_score, last_access."""
    async with catalog.conn.execute(_RENDITION_BLOBS) as cur:
        return [tuple(r) for r in await cur.fetchall()]


async def holds_media(catalog: Catalog, media_id: str) -> bool:
    """Whether this node holds every blob of ``media_id`` (a full copy; False if unknown)."""
    sql = (
        "SELECT COUNT(*), SUM(b.local_state = 'present') FROM ("
        "  SELECT cid FROM segments WHERE media_id=? AND cid IS NOT NULL"
        "  UNION SELECT init_cid FROM renditions WHERE media_id=? AND init_cid IS NOT NULL"
        ") x LEFT JOIN blobs b ON b.cid = x.cid"
    )
    async with catalog.conn.execute(sql, (media_id, media_id)) as cur:
        row = await cur.fetchone()
    return row is not None and int(row[0]) > 0 and int(row[1] or 0) == int(row[0])


async def forget_r2_copy(tx: aiosqlite.Connection, cid: str) -> bool:
    """The bucket was found to lack ``cid`` while the catalog had it there (another node
    removed it): the blob, and every media item using it, stop claiming R2 (``present`` ->
    ``none``), so the node no longer sends viewers there and tiering may promote it again.
    True if the blob's row changed."""
    cur = await tx.execute(
        "UPDATE blobs SET r2_state='none', r2_checked_at=NULL WHERE cid=? AND r2_state='present'",
        (cid,),
    )
    if cur.rowcount == 0:
        return False
    await tx.execute(
        "UPDATE media SET r2_state='none', r2_since=NULL WHERE r2_state='present' AND media_id IN "
        "(SELECT media_id FROM segments WHERE cid=? "
        "UNION SELECT media_id FROM renditions WHERE init_cid=?)",
        (cid, cid),
    )
    return True


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
