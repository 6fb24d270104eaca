"""``put_many``: many blobs through one :class:`~peerd.store.BlobBatch`, all or nothing.

A test convenience over the batch API ingest uses: the store tests and the crash writer drive
the production batch (one durability step, one transaction) through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from peerd.core.ids import Cid, cid_of
from peerd.errors import IntegrityError
from peerd.store import BlobStore


async def put_many(
    store: BlobStore, items: Sequence[tuple[bytes, str]], *, expected: Sequence[Cid] | None = None
) -> list[Cid]:
    """Store ``(data, kind)`` blobs in one batch; their cids in order. All of them are
    committed, or (on an error or a cancellation before the commit started) none of those not
    already held. ``expected``, if given, is checked one cid per item."""
    if expected is not None and len(expected) != len(items):
        raise ValueError("put_many: one expected cid per item")
    batch = store.batch()
    try:
        cids = []
        for i, (data, kind) in enumerate(items):
            cid = await asyncio.to_thread(cid_of, data) if len(data) > 65536 else cid_of(data)
            if expected is not None and cid != expected[i]:
                raise IntegrityError(
                    f"bytes hash to {cid}, expected {expected[i]}", expected=expected[i]
                )
            cids.append(await batch.add(data, kind=kind, cid=cid))
        await batch.commit()
    except BaseException:
        await asyncio.shield(batch.abort())
        raise
    return cids
