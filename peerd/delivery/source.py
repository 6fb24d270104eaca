"""The ``Source`` interface every upstream of blobs implements."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from peerd.core.ids import Cid

DELIVERY_ORDER = ("lan", "libp2p", "r2", "transcode")
"""Where a missing blob is looked for, by source name, cheapest and nearest first (DESIGN.md):
peers on the LAN, libp2p providers, the node's R2 bucket, then regenerating it locally. Sources
with other names come after these."""


def delivery_rank(name: str) -> int:
    """A source's place in :data:`DELIVERY_ORDER` (unknown names rank last)."""
    try:
        return DELIVERY_ORDER.index(name)
    except ValueError:
        return len(DELIVERY_ORDER)


@dataclass
class Offer:
    """One upstream's promise to deliver a blob: its bytes as an async stream.

    ``peer`` names who sends them (a peer id, a URL, ``"r2"``), for reporting and metrics.
    ``size`` is the announced size when known; the resolver refuses streams that exceed it.
    ``close`` is called whatever happens, to release connections. ``early``: the offer answers
    an :meth:`EarlySource.start`, whose ``begin`` already fed its bytes to the resolver.
    """

    source: str
    peer: str
    chunks: AsyncIterator[bytes]
    size: int | None = None
    meta: dict[str, str] = field(default_factory=dict)
    early: bool = False

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

    A hint for the order only: the resolver may ask a later source first (and an early one
    at once, :class:`EarlySource`), and still asks this one if that later source fails. Peer
    sources define it (no LAN peer known, no libp2p peer connected); others never look idle.
    """
    idle = getattr(source, "idle", None)
    return idle is not None and bool(idle())


Tap = Callable[[bytes], None]
Begin = Callable[[int, Callable[[Tap], None]], None]
"""``begin(size, tap)``: an early request's answer is in, ``size`` trusted bytes follow, and
``tap(fn)`` calls ``fn`` with each of them as it arrives (from the first)."""


class Started(Protocol):
    """A request an :class:`EarlySource` sent ahead of its offers."""

    def cancel(self) -> None:
        """Give the request up (a no-op once :meth:`EarlySource.offers_from` took it)."""
        ...


@runtime_checkable
class EarlySource(Source, Protocol):
    """A source that can send its request before any task runs, from the caller's callback.

    The resolver uses this when a fetch is started for a viewer (a cold miss) and the source
    comes first, or every source before it looks idle (:func:`looks_idle`: it is then asked
    first, the idle ones after it): the upstream request goes out in the very callback that
    parsed the viewer's request, and the answer's bytes reach the viewers in the callback that
    received them. The resolver passes what :meth:`start` returned to :meth:`offers_from` (in
    place of :meth:`Source.offers`), or cancels it.
    """

    def start(self, cid: Cid, begin: Begin) -> Started:
        """Send the request for ``cid`` now; call ``begin`` (in the callback that received the
        answer) if and only if the first offer of :meth:`offers_from` will be that answer.

        Raising :class:`peerd.errors.PeerdError` means no early start (the resolver goes the
        ordinary way)."""
        ...

    def offers_from(self, cid: Cid, started: Started) -> AsyncIterator[Offer]:
        """The offers :meth:`Source.offers` would give, the first (``early=True``) from the
        request :meth:`start` sent."""
        ...
