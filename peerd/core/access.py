"""Access counting for tiering, cheap enough for the hot path.

Serving a blob calls :meth:`AccessCounter.record` (a dict update, no I/O, no write per request).
The tiering service periodically calls :meth:`AccessCounter.drain` and folds the counts into the
catalog's decayed access scores in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AccessStats:
    """Accesses to one blob since the last drain."""

    hits: int
    bytes: int
    first: float
    last: float


class AccessCounter:
    """Per-blob hits and bytes since the last drain."""

    def __init__(self) -> None:
        self._hits: dict[str, list[float]] = {}

    def record(self, cid: str, nbytes: int, now: float) -> None:
        """Count one access of ``nbytes`` to ``cid`` at ``now``."""
        entry = self._hits.get(cid)
        if entry is None:
            self._hits[cid] = [1, nbytes, now, now]
        else:
            entry[0] += 1
            entry[1] += nbytes
            entry[3] = now

    def __len__(self) -> int:
        return len(self._hits)

    def drain(self) -> dict[str, AccessStats]:
        """Everything counted so far; the counter starts again empty."""
        hits, self._hits = self._hits, {}
        return {
            cid: AccessStats(int(h), int(b), first, last)
            for cid, (h, b, first, last) in hits.items()
        }
