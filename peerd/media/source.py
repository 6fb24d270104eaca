"""`TranscodeSource`: the last upstream of the delivery order, regenerating derived blobs locally.

A blob of a ladder rendition (eager, or on demand and produced once) is a deterministic function of
the same segment of its source rendition and the rendition's recipe. When such a blob is missing
everywhere else, this source finds which media/rendition/segment it is (catalog rows), produces it
again from the source segment the node holds, and offers the bytes; the resolver then checks them
against the id like any other upstream's. Blobs of top renditions (remuxed or transcoded from a
file that is gone) cannot be made again and get no offer.

It does not pass `tests.support.source_suite` (which feeds arbitrary bytes to a source): a
transcoder can only make media it can derive; its own tests are in tests/test_media.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from peerd.catalog.media import locate_blob
from peerd.core.ids import Cid
from peerd.delivery.source import Offer
from peerd.errors import NotFound, UpstreamError
from peerd.media.ingest import Ingestor


class TranscodeSource:
    """Regenerates segments and init segments of derived renditions from their source rendition."""

    name = "transcode"

    def __init__(self, ingestor: Ingestor, *, timeout_s: float = 120.0) -> None:
        self.ingestor = ingestor
        self.timeout_s = timeout_s
        self.failures = 0

    async def _locate(self, cid: Cid) -> tuple[str, str, int] | None:
        """(media id, rendition id, seq) of a derived blob; seq -1 for an init segment."""
        rows = await locate_blob(self.ingestor.catalog, cid)
        for media_id, rendition_id, seq in rows:
            m = await self.ingestor.load_manifest(media_id)
            r = next((x for x in m.renditions if x.id == rendition_id), None)
            if r is not None and r.recipe is not None:
                return media_id, rendition_id, seq
        return None

    async def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        """One offer if `cid` is a derived blob this node can make again, else none."""
        where = await self._locate(cid)
        if where is None:
            return
        media_id, rendition_id, seq = where

        async def chunks() -> AsyncIterator[bytes]:
            try:
                data = await self.ingestor.regenerate(media_id, rendition_id, seq)
            except NotFound as exc:
                raise UpstreamError(f"cannot transcode {cid}: {exc.message}") from exc
            yield data

        yield Offer(source=self.name, peer="local", chunks=chunks())
        await asyncio.sleep(0)

    def report(self, offer: Offer, ok: bool, reason: str = "") -> None:
        """Count failures (a wrong regeneration means a different build or recipe)."""
        if not ok:
            self.failures += 1
