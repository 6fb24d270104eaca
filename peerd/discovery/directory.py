"""The peer directory: the pure :class:`~peerd.core.peers.PeerTable` plus its rows in the catalog.

Sightings, RTTs and bans update the in-memory table at once (sources ask it on every fetch) and
are written to the catalog ``peers`` table in the background, so bans survive a restart and the
operator can list peers with ``sqlite3``. Wall-clock time is used because bans are persisted.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from peerd.catalog import Catalog
from peerd.catalog.peers import banned_peers, save_peer
from peerd.core.peers import Ban, BanPolicy, Peer, PeerTable

log = logging.getLogger("peerd.discovery")


class PeerDirectory:
    """Peers of one kind (``via``: ``mdns`` or ``libp2p``)."""

    def __init__(
        self,
        catalog: Catalog | None,
        *,
        via: str,
        ttl_s: float,
        policy: BanPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.catalog = catalog
        self.via = via
        self.table = PeerTable(ttl_s=ttl_s, policy=policy)
        self.clock = clock
        self._writes: set[asyncio.Task[None]] = set()

    async def load(self) -> int:
        """Restore bans recorded before a restart; returns how many peers were restored."""
        if self.catalog is None:
            return 0
        peers = await banned_peers(self.catalog, self.via, self.clock())
        for peer in peers:
            self.table.restore(peer)
        return len(peers)

    def seen(
        self,
        peer_id: str,
        *,
        url: str | None = None,
        addrs: tuple[str, ...] = (),
        version: str | None = None,
    ) -> bool:
        """Record a sighting; True if the peer is new or moved."""
        peer, changed = self.table.seen(
            peer_id, self.clock(), url=url, addrs=addrs, version=version, via=self.via
        )
        if changed:
            log.info(
                "peer seen", extra={"peer": peer_id, "via": self.via, "url": url, "addrs": addrs}
            )
        self._persist(peer)
        return changed

    def gone(self, peer_id: str) -> None:
        """The peer left: it withdrew its announcement, or stopped answering mDNS."""
        self.table.gone(peer_id)

    def rtt(self, peer_id: str, rtt_ms: float) -> None:
        """One measured round trip."""
        self.table.rtt(peer_id, rtt_ms)

    def report(self, peer_id: str, ok: bool, reason: str = "") -> Ban | None:
        """Outcome of a fetch; bans are logged and persisted."""
        ban = self.table.report(peer_id, ok, reason, self.clock())
        peer = self.table.get(peer_id)
        if ban is not None:
            log.warning(
                "peer banned",
                extra={"peer": peer_id, "via": self.via, "until": ban.until, "reason": ban.reason},
            )
        if peer is not None and (ban is not None or not ok):
            self._persist(peer)
        return ban

    def order(self) -> list[Peer]:
        """Live unbanned peers, best first."""
        return self.table.order(self.clock())

    def known(self, peer_id: str) -> bool:
        """True if the peer is live and not banned."""
        return self.table.known(peer_id, self.clock())

    def expire(self) -> list[str]:
        """Drop expired entries."""
        return self.table.expire(self.clock())

    def _persist(self, peer: Peer) -> None:
        if self.catalog is None:
            return
        task = asyncio.get_running_loop().create_task(self._write(peer))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, p: Peer) -> None:
        assert self.catalog is not None
        try:
            await save_peer(self.catalog, p, self.via)
        except Exception as exc:  # the table in memory is authoritative; a lost row is harmless
            log.warning("cannot persist peer", extra={"peer": p.peer_id, "error": repr(exc)})

    async def flush(self) -> None:
        """Wait for pending catalog writes (on stop)."""
        if self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)
