"""An in-memory :class:`~peerd.delivery.Source` for tests: serves blobs from a dict, optionally
lying (wrong bytes), failing or stalling, and counts what it was asked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from peerd.core import manifest as mf
from peerd.core.ids import Cid
from peerd.delivery.source import Offer
from peerd.errors import UpstreamError


@dataclass
class MemorySource:
    """Blobs from memory. ``lies`` maps a cid to the wrong bytes to send instead."""

    name: str = "memory"
    blobs: dict[Cid, bytes] = field(default_factory=dict)
    lies: dict[Cid, bytes] = field(default_factory=dict)
    fail: bool = False
    stall_s: float = 0.0
    chunk: int = 64 * 1024
    timeout_s: float = 5.0
    requests: list[Cid] = field(default_factory=list)
    reports: list[tuple[str, bool, str]] = field(default_factory=list)

    async def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        """One offer if the blob is held (or lied about)."""
        self.requests.append(cid)
        if self.fail:
            raise UpstreamError(f"{self.name} is down")
        data = self.lies.get(cid, self.blobs.get(cid))
        if data is None:
            return
        yield Offer(self.name, f"{self.name}-peer", self._stream(data), size=len(data))

    async def _stream(self, data: bytes) -> AsyncIterator[bytes]:
        if self.stall_s:
            await asyncio.sleep(self.stall_s)
        for i in range(0, len(data), self.chunk):
            await asyncio.sleep(0)
            yield data[i : i + self.chunk]

    def report(self, offer: Offer, ok: bool, reason: str = "") -> None:
        """Record the outcome."""
        self.reports.append((offer.peer, ok, reason))


def one_rendition(blobs: list[Cid]) -> tuple[str, bytes]:
    """A canonical manifest of one video rendition (init ``blobs[0]``, the rest segments): its
    media id and bytes."""
    rendition = mf.Rendition(
        id="v0",
        kind="video",
        codecs="avc1.64001f",
        bandwidth=200_000,
        timescale=1000,
        segments=tuple(mf.Segment(duration=4000, cid=c) for c in blobs[1:]),
        width=320,
        height=240,
        init=blobs[0],
    )
    manifest = mf.Manifest(container="fmp4", renditions=(rendition,))
    return mf.media_id_of(manifest), mf.encode(manifest)
