"""R2 as a :class:`~peerd.delivery.Source` for the resolver (the read-through cache), and as
the last source of manifests (:class:`R2ManifestSource`).

One GET per miss: the offer carries the open response body, so a blob R2 lacks costs one
request that answers 404, and a blob R2 has streams at once. The resolver verifies the bytes
against the cid while storing them. Offers are marked ``trusted`` (``meta["trusted"] == "1"``):
R2 is the node's own bucket and every object was checksummed on upload, so
:meth:`Resolver.open_stream` may pass its bytes to a viewer while they are being verified (see
``peerd.delivery.resolver`` for the trade-off).

The bucket is shared: another node may remove an object this node's catalog still has there
(its tiering demoted the media item). A 404 on read-through for a blob the catalog marks
``present`` corrects the catalog (:func:`forget_stale`); :class:`BucketLink`, which gives
viewers over the uplink budget a URL in the bucket, checks with a HEAD first, so a viewer is
never redirected to an object that is gone. That HEAD stays even for a blob confirmed a moment
ago: a demotion by any node may delete it in between, and a viewer sent to a 404 is not
retried by hls.js (a 4xx), so a saved class B request would cost a broken playback.

Both spend the month's class B budget on a viewer's behalf: each asks the
:class:`~peerd.replication.budget.RequestLedger` first (purpose ``viewer``). Past the budget the
read-through raises :class:`~peerd.errors.BudgetSpent` (503 with ``Retry-After``) and the link
is None (the uplink admission answers 503 too): never a 404 for a blob that exists.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

from peerd.catalog import Catalog
from peerd.catalog.media import forget_r2_copy
from peerd.core.ids import Cid
from peerd.core.uplink import can_spill
from peerd.delivery.source import Offer
from peerd.errors import BudgetSpent
from peerd.replication.budget import RequestLedger
from peerd.replication.metrics import R2Metrics
from peerd.replication.r2 import R2Client, R2Error, blob_key, manifest_key

log = logging.getLogger("peerd.replication")


class R2Source:
    """Blobs from the node's R2 bucket."""

    name = "r2"

    def __init__(
        self,
        client: R2Client,
        *,
        catalog: Catalog | None = None,
        timeout_s: float = 30.0,
        metrics: R2Metrics | None = None,
        ledger: RequestLedger | None = None,
    ) -> None:
        self.client = client
        self.catalog = catalog
        self.timeout_s = timeout_s
        self.metrics = metrics
        self.ledger = ledger
        self._tasks: set[asyncio.Task[None]] = set()

    async def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        """One offer if ``blobs/<cid>`` exists (if not, a catalog that had it there is
        corrected); :class:`BudgetSpent` if the month's class B budget allows no more GETs."""
        if self.ledger is not None and not self.ledger.allows("viewer"):
            raise BudgetSpent("the month's R2 read budget is used up; try another node")
        got = await self.client.open(blob_key(cid))
        if got is None:
            if self.catalog is not None:
                await forget_stale(self.catalog, cid, self.metrics, "read_through")
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
        """A verified fetch confirms the R2 copy (and when: a blob confirmed a short while ago
        is evicted without another HEAD); a wrong one means our bucket is damaged."""
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
            await Catalog.set_blob_r2(
                tx, cid, "present", time.time(), only_from=("none", "queued", "present")
            )


async def forget_stale(catalog: Catalog, cid: Cid, metrics: R2Metrics | None, found: str) -> bool:
    """The bucket answered 404 for ``cid``: if the catalog had it there, correct it
    (:func:`peerd.catalog.media.forget_r2_copy`); True if it did."""
    row = await catalog.get_blob(cid)
    if row is None or row.r2_state != "present":
        return False
    async with catalog.transaction() as tx:
        changed = await forget_r2_copy(tx, cid)
    if changed:
        if metrics is not None:
            metrics.stale.labels(found=found).inc()
        log.warning("the bucket no longer has a blob; catalog corrected", extra={"cid": cid})
    return changed


class BucketLink:
    """A URL of a blob in the bucket for a viewer over the uplink budget (the bucket's public
    domain, or a presigned URL), or None.

    The catalog may be stale (see the module doc), so every link is checked with a HEAD (one
    class B request, beside the viewer's GET it spares the uplink): a 404 corrects the catalog
    and gives None, as does a bucket that does not answer or a class B budget used up -- the
    viewer then gets 503 with ``Retry-After``, never a redirect to a missing object.
    """

    def __init__(
        self,
        client: R2Client,
        catalog: Catalog,
        *,
        expires_s: int,
        public_base_url: str | None = None,
        metrics: R2Metrics | None = None,
        ledger: RequestLedger | None = None,
        down_s: float = 60.0,
    ) -> None:
        self.client = client
        self.catalog = catalog
        self.expires_s = expires_s
        self.public = public_base_url.rstrip("/") if public_base_url else None
        self.metrics = metrics
        self.ledger = ledger
        self.down_s = down_s
        self.down_until = 0.0  # the bucket failed a HEAD: no link expected before

    def ready(self) -> bool:
        """Whether a link can be given now, as far as the node knows
        (:func:`peerd.core.uplink.can_spill`; the admission reports it to the coordinator)."""
        links = self.public is not None or self.client.cfg.sse_c_key is None
        left = self.ledger.spendable("viewer") if self.ledger is not None else 1
        return can_spill(links, left, time.monotonic() < self.down_until)

    def class_b_left(self) -> int | None:
        """Class B requests this month's budget still allows (None without a ledger)."""
        return max(0, self.ledger.left_b()) if self.ledger is not None else None

    async def __call__(self, cid: Cid, content_type: str) -> str | None:
        """The URL of ``cid`` once the bucket confirmed it holds it, else None."""
        if self.public is not None:
            url: str | None = f"{self.public}/{blob_key(cid)}"
        else:
            url = self.client.blob_url(cid, expires_s=self.expires_s, content_type=content_type)
        if url is None:
            return None  # SSE-C: a viewer must never hold the key
        if self.ledger is not None and not self.ledger.allows("viewer"):
            return None  # the month's class B budget is used up: 503, never an unchecked link
        try:
            info = await self.client.head(blob_key(cid))
        except (R2Error, BudgetSpent) as exc:
            log.info("cannot check the bucket before a redirect", extra={"error": exc.message})
            self.down_until = time.monotonic() + self.down_s
            return None
        if info is None:
            await forget_stale(self.catalog, cid, self.metrics, "redirect")
            return None
        return url


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
