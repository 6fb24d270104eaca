"""Seed a catalog with small synthetic media items (rows plus real blob files) for API tests."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

from peerd.core.ids import Cid, cid_of
from peerd.runtime import Runtime


@dataclass(frozen=True)
class SeededMedia:
    """What :func:`seed_media` created."""

    media_id: Cid
    init: Cid
    segments: list[Cid]
    data: dict[Cid, bytes]

    @property
    def blobs(self) -> list[Cid]:
        """Init segment first, then the media segments."""
        return [self.init, *self.segments]


async def seed_media(
    rt: Runtime,
    title: str,
    *,
    segments: int = 3,
    size: int = 2000,
    shared: list[Cid] | None = None,
    data: dict[Cid, bytes] | None = None,
) -> SeededMedia:
    """One media item with one rendition; ``shared`` segments (held already) are reused."""
    blobs: dict[Cid, bytes] = {}
    init_bytes = os.urandom(200)
    init = await rt.store.put(init_bytes, kind="init")
    blobs[init] = init_bytes
    segs: list[Cid] = []
    for _ in range(segments):
        chunk = os.urandom(size)
        cid = await rt.store.put(chunk)
        blobs[cid] = chunk
        segs.append(cid)
    for cid in shared or []:
        segs.append(cid)
        if data is not None and cid in data:
            blobs[cid] = data[cid]
    manifest = json.dumps({"title": title, "init": init, "segments": segs}).encode()
    media_id = cid_of(manifest)
    now = time.time()
    async with rt.catalog.transaction() as tx:
        await tx.execute(
            "INSERT INTO media(media_id, title, manifest, duration_s, created_at) "
            "VALUES(?, ?, ?, ?, ?)",
            (media_id, title, manifest, 2.0 * len(segs), now),
        )
        await tx.execute(
            "INSERT INTO renditions(media_id, rendition_id, position, kind, container, codecs, "
            "bandwidth, width, height, init_cid) "
            "VALUES(?, 'v0', 0, 'video', 'fmp4', 'avc1.64001e', 300000, 320, 240, ?)",
            (media_id, init),
        )
        for i, cid in enumerate(segs):
            await tx.execute(
                "INSERT INTO segments(media_id, rendition_id, seq, duration_s, cid) "
                "VALUES(?, 'v0', ?, 2.0, ?)",
                (media_id, i, cid),
            )
    return SeededMedia(media_id, init, segs, blobs)
