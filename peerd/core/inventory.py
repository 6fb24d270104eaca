"""Inventory digest, sync cursor and egress rate: the pure parts of what the node reports.

Digest
------
The coordinator keeps its own view of what each node holds and wants to know cheaply whether that
view is still right. The node publishes ``digest``: the sum, modulo 2**256, of
``sha256("<kind>:<id>")`` over every held entry, written as 64 lowercase hex digits, where an entry
is ``blob:<cid>`` for each blob whose local copy is present and ``media:<media id>`` for each
media item in the catalog. A sum of hashes is order-independent and incremental: the coordinator
adds an entry's hash when it learns the node holds it and subtracts it when it learns it is gone,
and compares with the heartbeat's digest; only on a mismatch does it page through the inventory.
The empty inventory has digest ``"0" * 64``.

Cursor
------
Every change that matters (blob or media added, deleted, local state, R2 state, pin) gives the
entry a new, strictly larger sequence number (SQLite triggers, migration 0700). ``GET inventory
?since=S`` returns entries with ``seq > S`` in ``seq`` order; the answer's ``next_since`` is the
cursor for the next page, and ``more`` says whether one exists. Starting from ``since=0`` and
following ``next_since`` until ``more`` is false yields the current state of every entry ever
seen (deleted ones as ``state: "deleted"``). A coordinator that stores ``next_since`` resumes from
there after the node or the coordinator restarts.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

MOD = 1 << 256
EMPTY_DIGEST = "0" * 64


def entry_hash(kind: str, ident: str) -> int:
    """The digest term of one held entry."""
    return int.from_bytes(hashlib.sha256(f"{kind}:{ident}".encode()).digest(), "big")


def digest_of(entries: Iterable[tuple[str, str]]) -> str:
    """Digest of held ``(kind, id)`` entries (see the module doc)."""
    total = 0
    for kind, ident in entries:
        total = (total + entry_hash(kind, ident)) % MOD
    return format(total, "064x")


def digest_add(digest: str, kind: str, ident: str) -> str:
    """The digest after adding one entry (what a coordinator does while syncing)."""
    return format((int(digest, 16) + entry_hash(kind, ident)) % MOD, "064x")


def digest_remove(digest: str, kind: str, ident: str) -> str:
    """The digest after removing one entry."""
    return format((int(digest, 16) - entry_hash(kind, ident)) % MOD, "064x")


@dataclass(frozen=True)
class Page:
    """Where a page of the inventory ends."""

    next_since: int
    more: bool


def page_of(since: int, seqs: list[int], limit: int) -> Page:
    """Cursor for a page: ``seqs`` are the sequence numbers fetched with ``LIMIT limit + 1``."""
    if len(seqs) > limit:
        return Page(next_since=seqs[limit - 1], more=True)
    return Page(next_since=seqs[-1] if seqs else since, more=False)


@dataclass
class RateMeter:
    """Bytes per second of a monotonically growing counter over a sliding window."""

    window_s: float = 30.0
    _samples: deque[tuple[float, float]] = field(default_factory=deque)

    def add(self, now: float, total: float) -> None:
        """Record the counter's value at ``now``; a counter reset starts over."""
        if self._samples and total < self._samples[-1][1]:
            self._samples.clear()
        self._samples.append((now, total))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()

    def rate(self) -> float:
        """Average bytes/s between the oldest and newest samples (0 with fewer than two)."""
        if len(self._samples) < 2:
            return 0.0
        (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
        return 0.0 if t1 <= t0 else (v1 - v0) / (t1 - t0)

    @property
    def measured(self) -> bool:
        """True once two samples exist."""
        return len(self._samples) >= 2
