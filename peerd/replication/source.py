"""R2 as a :class:`~peerd.delivery.Source` for the resolver (the read-through cache), and as
the last source of manifests (:class:`R2ManifestSource`).

One GET per miss: the offer carries the open response body, so a blob R2 lacks costs one
request that answers 404, and a blob R2 has streams at once. The resolver verifies the bytes
against the cid while storing them. Offers are marked ``trusted`` (``meta["trusted"] == "1"``):
R2 is the node's own bucket and every object was checksummed on upload, so
:meth:`Resolver.open_stream` may pass its bytes to a viewer while they are being verified (see
``peerd.delivery.resolver`` for the trade-off).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from peerd.catalog import Catalog
from peerd.core.ids import Cid
from peerd.delivery.source import Offer
from peerd.replication.r2 import R2Client, blob_key, manifest_key

log = logging.getLogger("peerd.replication")


class R2Source:
    """Blobs from the node's R2 bucket."""

    name = "r2"

    def __init__(
        self, client: R2Client, *, catalog: Catalog | None = None, timeout_s: float = 30.0
    ) -> None:
        self.client = client
        self.catalog = catalog
        self.timeout_s = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    async def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        """One offer if ``blobs/<cid>`` exists."""
        got = await self.client.open(blob_key(cid))
        if got is None:
            return
        size, chunks = got
        yield Offer(
            self.name,
            "r2",
            chunks,
            size=size,
            meta={"trusted": "1", "cid": cid},
        )

    def report(self, offer: Offer, ok: bool, reason: str = "") -> None:
        """A verified fetch confirms the R2 copy; a wrong one means our bucket is damaged."""
        cid = offer.meta.get("cid", "")
        if not ok:
            if reason == "integrity":
                log.error("R2 object does not match its cid", extra={"cid": cid})
            return
        if self.catalog is not None and cid:
            task = asyncio.get_running_loop().create_task(self._confirm(cid))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _confirm(self, cid: str) -> None:
        assert self.catalog is not None
        async with self.catalog.transaction() as tx:
            await Catalog.set_blob_r2(tx, cid, "present", time.time(), only_from=("none", "queued"))


class R2ManifestSource:
    """Manifests from the node's R2 bucket (``media/<id>.json``), for
    :class:`peerd.delivery.media.MediaResolver`: the bytes are checked against the media id
    there, as a blob's are against its cid."""

    name = "r2"

    def __init__(self, client: R2Client, *, timeout_s: float = 30.0) -> None:
        self.client = client
        self.timeout_s = timeout_s

    async def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        """One offer if ``media/<cid>.json`` exists."""
        got = await self.client.open(manifest_key(cid))
        if got is None:
            return
        size, chunks = got
        yield Offer(self.name, "r2", chunks, size=size)

    def report(self, offer: Offer, ok: bool, reason: str = "") -> None:
        """A manifest in our bucket that is not its media id means the bucket is damaged."""
        if not ok and reason == "integrity":
            log.error("R2 manifest does not match its media id")
