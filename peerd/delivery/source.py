"""The ``Source`` interface every upstream of blobs implements."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from peerd.core.ids import Cid


@dataclass
class Offer:
    """One upstream's promise to deliver a blob: its bytes as an async stream.

    ``peer`` names who sends them (a peer id, a URL, ``"r2"``), for reporting and metrics.
    ``size`` is the announced size when known; the resolver refuses streams that exceed it.
    ``close`` is called whatever happens, to release connections.
    """

    source: str
    peer: str
    chunks: AsyncIterator[bytes]
    size: int | None = None
    meta: dict[str, str] = field(default_factory=dict)

    async def close(self) -> None:
        """Release the stream (close the generator and its connection)."""
        aclose = getattr(self.chunks, "aclose", None)
        if aclose is not None:
            await aclose()


@runtime_checkable
class Source(Protocol):
    """An upstream of blobs (LAN peers, libp2p providers, R2, transcoder)."""

    name: str
    timeout_s: float

    def offers(self, cid: Cid) -> AsyncIterator[Offer]:
        """Offers for ``cid``, best first; none if this source cannot have it.

        Implementations are async generators. Raising :class:`peerd.errors.UpstreamError` means
        the source itself failed (it is skipped for this request).
        """
        ...

    def report(self, offer: Offer, ok: bool, reason: str = "") -> None:
        """Outcome of an offer: ``ok=False`` when it failed or sent wrong bytes."""
        ...


def looks_idle(source: Source) -> bool:
    """Whether ``source`` has no peer to ask right now, by its optional ``idle()`` method.

    A hint for the order only: when the first sources all look idle, the resolver asks the
    first one that does not first, and still asks the idle ones after it if it fails. Peer
    sources define it (no LAN peer known, no libp2p peer connected); others never look idle.
    """
    idle = getattr(source, "idle", None)
    return idle is not None and bool(idle())
