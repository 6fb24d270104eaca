"""Pull a whole media item from one :class:`~peerd.delivery.source.Source` (R2, a named LAN peer).

1. The manifest comes first (``get_manifest``). A media id is the CID of its canonical
   manifest, so the bytes are checked against the id before anything else happens: an upstream
   cannot hand over a different media item.
2. Every blob the manifest names and the store lacks is fetched through the source and kept
   only if it hashes to its id (the store verifies while it writes; nothing partial is kept).
   Blobs already held are skipped, so a pull interrupted by a crash resumes where it stopped.
3. The media, rendition and segment rows are committed in one transaction after the last blob
   (:func:`peerd.catalog.media.record_media`), so the catalog never names a segment the node
   does not hold.

The first failure cancels the blobs still in flight and is raised as it is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from peerd.catalog import Catalog
from peerd.catalog.media import record_media
from peerd.core.ids import Cid, cid_of
from peerd.core.manifest import decode
from peerd.delivery.source import Source
from peerd.errors import IntegrityError, NotFound, PeerdError, UpstreamError
from peerd.store import BlobStore

Progress = Callable[[int], None]
"""progress(nbytes): bytes arrived, or the size of a blob already held."""


@dataclass(frozen=True)
class PullReport:
    """What a pull did."""

    media_id: str
    blobs: int
    fetched: int
    bytes: int
    recorded: bool


async def pull_media(
    catalog: Catalog,
    store: BlobStore,
    media_id: str,
    get_manifest: Callable[[], Awaitable[bytes]],
    source: Source,
    *,
    concurrency: int = 4,
    progress: Progress | None = None,
    in_r2: bool = False,
) -> PullReport:
    """Fetch ``media_id`` (manifest and every missing blob) from ``source`` into the store and
    record it (see the module doc). ``in_r2``: the source is the node's R2 bucket."""
    data = await get_manifest()
    if cid_of(data) != media_id:
        raise IntegrityError(
            f"manifest of {media_id} from {source.name} does not hash to its id", expected=media_id
        )
    try:
        manifest = decode(data)
    except (PeerdError, ValueError) as exc:
        raise IntegrityError(f"manifest of {media_id} from {source.name} is malformed") from exc
    inits = {r.init for r in manifest.renditions if r.init}
    cids = [Cid(c) for c in manifest.blob_cids()]
    sem = asyncio.Semaphore(concurrency)
    fetched = 0
    nbytes = 0

    async def one(cid: Cid) -> None:
        nonlocal fetched, nbytes
        if await store.has(cid):
            if progress is not None and (row := await catalog.get_blob(cid)) is not None:
                progress(row.size)
            return
        async with sem:
            kind = "init" if cid in inits else "segment"
            size = await _fetch(store, source, cid, kind, progress, media_id)
        fetched += 1
        nbytes += size

    try:
        async with asyncio.TaskGroup() as tg:
            for c in cids:
                tg.create_task(one(c))
    except BaseExceptionGroup as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None
    async with catalog.transaction() as tx:
        recorded = await record_media(tx, media_id, data, manifest, time.time(), in_r2=in_r2)
    return PullReport(media_id, len(cids), fetched, nbytes, recorded)


async def _fetch(
    store: BlobStore, source: Source, cid: Cid, kind: str, progress: Progress | None, media_id: str
) -> int:
    """Store ``cid`` from the first offer of ``source``; returns its size."""
    offers = source.offers(cid)
    try:
        async for offer in offers:
            size = 0

            async def counted(chunks: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
                nonlocal size
                async for chunk in chunks:
                    size += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
                    yield chunk

            try:
                await store.put_stream(
                    counted(offer.chunks), expected=cid, kind=kind, max_size=offer.size
                )
            except IntegrityError:
                source.report(offer, False, "integrity")
                raise
            except UpstreamError:
                source.report(offer, False, "transfer")
                raise
            finally:
                await offer.close()
            source.report(offer, True)
            return size
    finally:
        aclose = getattr(offers, "aclose", None)
        if aclose is not None:
            await aclose()
    raise NotFound(f"{source.name} does not have blob {cid} of media {media_id}")
