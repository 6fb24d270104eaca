"""The simulator's network: each node's uplink as a processor-sharing link; pure (no I/O).

Every segment a node sends is a *flow* on that node's uplink. The only bottleneck a flow
crosses is its node's uplink (viewers' downlinks, the LAN and the bucket are not the scarce
resource in the testbed), so max-min fair sharing reduces to equal shares per link: ``n``
flows on an uplink of ``C`` bytes/s each get ``C / n``. That is processor sharing, computed
with a virtual clock per link: ``V`` grows at ``C / n`` bytes per second, a flow of ``s`` bytes
that started at ``V0`` ends when ``V`` reaches ``V0 + s``, so an arrival or a departure costs
``O(log n)`` and the rest of the flows need no update. The caller keeps one event per link,
:meth:`Link.next_done`, and re-reads it whenever the link's flows change.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field


@dataclass
class Link:
    """One uplink: ``capacity`` bytes/s shared equally by its flows."""

    capacity: float
    # A token-bucket shaper dropping what waits past its queue loses goodput once several TCP
    # flows share it: from ``contended`` flows on, the link carries ``contended_goodput`` of
    # its capacity (scripts/bench/tbf_goodput.py measures the testbed's tbf).
    contended: int = 0
    contended_goodput: float = 1.0
    v: float = 0.0
    at: float = 0.0
    version: int = 0
    flows: list[tuple[float, int]] = field(default_factory=list)  # (finish V, flow id)
    sent: float = 0.0

    def rate(self, n: int) -> float:
        """Bytes/s the link carries with ``n`` flows."""
        if self.contended and n >= self.contended:
            return self.capacity * self.contended_goodput
        return self.capacity

    def _advance(self, now: float) -> None:
        n = len(self.flows)
        if n and now > self.at:
            dv = (now - self.at) * self.rate(n) / n
            self.v += dv
            self.sent += dv * n
        self.at = now

    def add(self, flow: int, size: float, now: float) -> None:
        """Start a flow of ``size`` bytes at ``now``."""
        self._advance(now)
        heapq.heappush(self.flows, (self.v + size, flow))
        self.version += 1

    def pop_done(self, now: float) -> list[int]:
        """Flows finished by ``now`` (removed)."""
        self._advance(now)
        out = []
        while self.flows and self.flows[0][0] <= self.v + 1e-6:
            out.append(heapq.heappop(self.flows)[1])
        if out:
            self.version += 1
        return out

    def next_done(self) -> float:
        """When the next flow ends if nothing changes (``inf`` when idle)."""
        if not self.flows:
            return math.inf
        if math.isinf(self.capacity):
            return self.at
        left = max(0.0, self.flows[0][0] - self.v)
        return self.at + left * len(self.flows) / self.rate(len(self.flows))
