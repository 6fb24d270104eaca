"""A small in-memory replicator for the API's own tests (``peerd.api.commands.Replicator``).

"R2" is a dict of cid -> bytes. It updates the catalog the way the real replicator does
(``r2_state = 'present'`` once a blob is uploaded) so the API's eviction and drain logic can be
tested without R2. Only for tests of the API and coordinator logic; the real one is
``peerd.replication``.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from peerd.catalog import Catalog
from peerd.catalog.media import media_blobs, set_media_r2
from peerd.core.ids import Cid
from peerd.errors import NotFound
from peerd.runtime import Runtime


@dataclass
class FakeReplicator:
    """Uploads to and downloads from an in-memory "R2"."""

    rt: Runtime
    r2: dict[str, bytes] = field(default_factory=dict)
    media: dict[str, list[Cid]] = field(default_factory=dict)
    batches: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    uploads: list[str] = field(default_factory=list)
    upload_delay_s: float = 0.0

    async def _upload(self, cid: Cid) -> None:
        if self.upload_delay_s:
            await asyncio.sleep(self.upload_delay_s)
        self.r2[cid] = await self.rt.store.read(cid)
        self.uploads.append(cid)
        async with self.rt.catalog.transaction() as tx:
            await Catalog.set_blob_r2(tx, cid, "present", time.time())

    async def promote_media(self, media_id: str) -> str:
        """Upload every blob of the item in a background batch; returns the batch id."""
        cids = await media_blobs(self.rt.catalog, media_id)
        self.media[media_id] = cids

        async def batch() -> None:
            for c in cids:
                if c not in self.r2:
                    await self._upload(c)
            async with self.rt.catalog.transaction() as tx:
                await set_media_r2(tx, media_id, "present", time.time())

        batch_id = "p-" + secrets.token_hex(8)
        self.batches[batch_id] = asyncio.create_task(batch())
        return batch_id

    async def job_status(self, job_id: str) -> Mapping[str, Any]:
        """``state``: running, done or failed."""
        task = self.batches.get(job_id)
        if task is None:
            raise NotFound(f"no batch {job_id}")
        if not task.done():
            return {"batch": job_id, "state": "running"}
        return {"batch": job_id, "state": "failed" if task.exception() else "done"}

    async def pull_media(
        self, media_id: str, progress: Callable[[int], None] | None = None
    ) -> Mapping[str, Any]:
        """Put the item's blobs back into the store from "R2"."""
        cids = self.media.get(media_id)
        if cids is None:
            raise NotFound(f"media {media_id} is not in R2")
        fetched = 0
        for c in cids:
            if not await self.rt.store.has(c):
                await self.rt.store.put(self.r2[c], expected=c)
                fetched += 1
        return {"media_id": media_id, "blobs": len(cids), "fetched": fetched}

    async def upload_last_copies(self, deadline_s: float) -> int:
        """Upload held blobs that "R2" lacks, until the deadline."""
        cids = await self.rt.catalog.not_in_r2()
        done = 0
        try:
            async with asyncio.timeout(deadline_s):
                for c in cids:
                    await self._upload(c)
                    done += 1
        except TimeoutError:
            pass
        return done
