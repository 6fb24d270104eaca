"""When to announce held blobs on the DHT.

Provider records expire on other nodes (go-libp2p and py-libp2p keep them ~48 h; the spec asks
providers to re-announce about every 22 h), so each held id is announced once, soon after it
appears, and again every ``interval_s``. Announcing costs a DHT lookup per id, so work is cut
into batches of at most ``batch`` ids, oldest announcement first (never-announced ids first of
all). *Lag* is how overdue the most overdue held id is: 0 when everything is fresh; it is
exported as a metric, so an operator sees a node that cannot keep up. An id whose announcement
failed (no peer took it: a node with no DHT peers gets this for every id) waits ``retry_s``
before it is tried again, instead of being retried in a tight loop; it still counts as late.

Pure: the clock is passed in, the caller does the announcing and reports back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class ProvideSchedule:
    """Tracks when each held id was last announced."""

    interval_s: float
    batch: int = 64
    retry_s: float = 60.0
    _last: dict[str, float] = field(default_factory=dict)
    _retry_at: dict[str, float] = field(default_factory=dict)

    def sync(self, held: Iterable[str]) -> None:
        """Forget ids no longer held; new ids become due at once."""
        keep = set(held)
        for cid in list(self._last):
            if cid not in keep:
                del self._last[cid]
                self._retry_at.pop(cid, None)
        for cid in keep:
            self._last.setdefault(cid, float("-inf"))

    def due(self, now: float) -> list[str]:
        """The next batch to announce, most overdue first (possibly empty)."""
        overdue = [
            (t, cid)
            for cid, t in self._last.items()
            if t + self.interval_s <= now and self._retry_at.get(cid, now) <= now
        ]
        overdue.sort()
        return [cid for _, cid in overdue[: self.batch]]

    def done(self, cids: Iterable[str], now: float) -> None:
        """Record a successful announcement."""
        for cid in cids:
            if cid in self._last:
                self._last[cid] = now
                self._retry_at.pop(cid, None)

    def failed(self, cids: Iterable[str], now: float) -> None:
        """Record announcements that did not succeed: not due again before ``now + retry_s``."""
        for cid in cids:
            if cid in self._last:
                self._retry_at[cid] = now + self.retry_s

    def lag(self, now: float, started: float) -> float:
        """Seconds the most overdue id is late (never-announced ids count from ``started``)."""
        worst = 0.0
        for t in self._last.values():
            due_at = started if t == float("-inf") else t + self.interval_s
            worst = max(worst, now - due_at)
        return worst

    def __len__(self) -> int:
        return len(self._last)
