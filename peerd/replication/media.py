"""Catalog rows for a media item whose manifest came from R2 (a pull)."""

from __future__ import annotations

import aiosqlite

from peerd.core.manifest import Manifest


async def record_media(
    tx: aiosqlite.Connection,
    media_id: str,
    data: bytes,
    manifest: Manifest,
    now: float,
    *,
    r2_state: str = "present",
) -> bool:
    """Insert the media, rendition and segment rows of a pulled manifest (inside ``tx``).

    ``r2_state`` is the media item's state in R2: ``present`` for a pull from R2, ``none`` for a
    pull from a peer.

    Returns False (and changes nothing) when the media item is already catalogued. The caller
    commits this only after every blob the manifest names is stored, so a segment row never
    points at a blob the node does not have.
    """
    duration = max((r.duration_seconds for r in manifest.renditions), default=0.0)
    cur = await tx.execute(
        "INSERT INTO media(media_id, title, manifest, duration_s, created_at, r2_state, r2_since) "
        "VALUES(?, '', ?, ?, ?, ?, ?) ON CONFLICT(media_id) DO NOTHING",
        (media_id, data, duration, now, r2_state, now if r2_state == "present" else None),
    )
    if cur.rowcount == 0:
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
                (media_id, r.id, seq, s.duration / r.timescale, s.cid)
                for seq, s in enumerate(r.segments)
            ],
        )
    return True
