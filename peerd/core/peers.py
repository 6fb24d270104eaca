"""The peer table: who may have blobs, in which order to ask them, and whom to stop asking.

Theory of operation
-------------------
Discovery (mDNS, the DHT, the coordinator) calls :meth:`PeerTable.seen` with what it learnt and
when; entries expire ``ttl_s`` after the last sighting. Each fetch reports its outcome with
:meth:`PeerTable.report`, and round trips measured on the wire arrive through
:meth:`PeerTable.rtt`, folded into a moving average. :meth:`PeerTable.order` lists live, unbanned
peers fastest first; a peer with recent failures sorts after peers without, whatever its speed.

Bans: a peer that sends bytes that do not hash to the id asked for is banned at once for
``ban_integrity_s`` (it is broken or lying, and retrying wastes a full transfer); a peer that
fails ``max_failures`` times in a row (refused, reset, timed out) is banned for ``ban_failure_s``.
A success clears the failure count. Every decision is returned as a :class:`Ban` so the edge can
log it and persist it.

Pure: no I/O, the clock is passed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

RTT_ALPHA = 0.3  # weight of a new RTT sample in the moving average
UNKNOWN_RTT_MS = 1_000.0  # peers never measured sort after measured ones


@dataclass(frozen=True)
class Peer:
    """One known peer."""

    peer_id: str
    url: str | None = None
    addrs: tuple[str, ...] = ()
    version: str | None = None
    via: str = "mdns"
    first_seen: float = 0.0
    last_seen: float = 0.0
    expires_at: float = 0.0
    rtt_ms: float | None = None
    failures: int = 0
    banned_until: float | None = None

    def banned(self, now: float) -> bool:
        """True while a ban is in force."""
        return self.banned_until is not None and self.banned_until > now


@dataclass(frozen=True)
class Ban:
    """A decision to stop asking ``peer_id`` until ``until``."""

    peer_id: str
    until: float
    reason: str


@dataclass(frozen=True)
class BanPolicy:
    """How failures turn into bans."""

    max_failures: int = 3
    ban_failure_s: float = 60.0
    ban_integrity_s: float = 3600.0


@dataclass
class PeerTable:
    """Known peers of one kind (LAN HTTP or libp2p), with expiry, RTT and bans."""

    ttl_s: float = 120.0
    policy: BanPolicy = field(default_factory=BanPolicy)
    _peers: dict[str, Peer] = field(default_factory=dict)

    def seen(
        self,
        peer_id: str,
        now: float,
        *,
        url: str | None = None,
        addrs: tuple[str, ...] = (),
        version: str | None = None,
        via: str = "mdns",
        ttl_s: float | None = None,
    ) -> tuple[Peer, bool]:
        """Record a sighting; returns the entry and whether it is new or its address changed."""
        old = self._peers.get(peer_id)
        expires = now + (self.ttl_s if ttl_s is None else ttl_s)
        if old is None:
            peer = Peer(peer_id, url, addrs, version, via, now, now, expires)
            self._peers[peer_id] = peer
            return peer, True
        changed = (url is not None and url != old.url) or (bool(addrs) and addrs != old.addrs)
        peer = replace(
            old,
            url=url if url is not None else old.url,
            addrs=addrs or old.addrs,
            version=version or old.version,
            last_seen=now,
            expires_at=max(old.expires_at, expires),
            # A new address is a new chance: measure it again.
            rtt_ms=None if changed else old.rtt_ms,
        )
        self._peers[peer_id] = peer
        return peer, changed

    def restore(self, peer: Peer) -> None:
        """Load an entry persisted earlier (bans survive restarts)."""
        self._peers[peer.peer_id] = peer

    def gone(self, peer_id: str) -> None:
        """The peer left (mDNS goodbye, or it stopped answering): forget it; a banned one keeps
        its ban, no longer live (:meth:`expire` drops it when the ban ends)."""
        peer = self._peers.get(peer_id)
        if peer is None:
            return
        if peer.banned_until is None:
            del self._peers[peer_id]
        else:
            self._peers[peer_id] = replace(peer, expires_at=0.0)

    def get(self, peer_id: str) -> Peer | None:
        """The entry, if known."""
        return self._peers.get(peer_id)

    def known(self, peer_id: str, now: float) -> bool:
        """True if the peer is live (not expired) and not banned."""
        p = self._peers.get(peer_id)
        return p is not None and p.expires_at > now and not p.banned(now)

    def rtt(self, peer_id: str, rtt_ms: float) -> None:
        """Fold one measured round trip into the peer's moving average."""
        p = self._peers.get(peer_id)
        if p is None or rtt_ms < 0:
            return
        avg = rtt_ms if p.rtt_ms is None else (1 - RTT_ALPHA) * p.rtt_ms + RTT_ALPHA * rtt_ms
        self._peers[peer_id] = replace(p, rtt_ms=avg)

    def report(self, peer_id: str, ok: bool, reason: str, now: float) -> Ban | None:
        """Outcome of one fetch from the peer; returns a ban when one starts now."""
        p = self._peers.get(peer_id)
        if p is None:
            return None
        if ok:
            self._peers[peer_id] = replace(p, failures=0)
            return None
        failures = p.failures + 1
        ban: Ban | None = None
        if reason == "integrity":
            ban = Ban(peer_id, now + self.policy.ban_integrity_s, "sent bytes not matching the id")
        elif failures >= self.policy.max_failures:
            ban = Ban(peer_id, now + self.policy.ban_failure_s, f"{failures} failures in a row")
        self._peers[peer_id] = replace(
            p,
            failures=0 if ban else failures,
            banned_until=ban.until if ban else p.banned_until,
        )
        return ban

    def order(self, now: float) -> list[Peer]:
        """Live, unbanned peers: fewest recent failures first, then lowest RTT."""
        live = [p for p in self._peers.values() if p.expires_at > now and not p.banned(now)]
        return sorted(
            live,
            key=lambda p: (p.failures, UNKNOWN_RTT_MS if p.rtt_ms is None else p.rtt_ms, p.peer_id),
        )

    def expire(self, now: float) -> list[str]:
        """Drop entries past expiry whose bans (if any) are over; returns their ids."""
        dead = [pid for pid, p in self._peers.items() if p.expires_at <= now and not p.banned(now)]
        for pid in dead:
            del self._peers[pid]
        return dead

    def __len__(self) -> int:
        return len(self._peers)

    def all(self) -> list[Peer]:
        """Every entry, live or not."""
        return list(self._peers.values())
