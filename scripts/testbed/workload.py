"""The testbed's workload and its offline bound; pure (no I/O).

Trace: viewers arrive by a Poisson process whose rate follows a compressed day (one cosine
period over the run, trough at the start and end, peak in the middle, ``peak / mean`` given);
each picks a media item by Zipf popularity (rank ``r`` has weight ``1 / r**s``). The same seed
gives the same trace, so every policy sees the same viewers.

Bound: :func:`cache_misses` replays the requests one node saw against a cache of ``capacity``
bytes, starting from what was placed on it, evicting by LRU or by Belady's rule (the item whose
next use is furthest away; with unequal sizes this is the classic approximation of the optimum).
The bytes missed are what that node had to read from R2.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Arrival:
    """One viewer: when it arrives (s from the start), what it plays."""

    viewer: int
    at_s: float
    item: int


def zipf_weights(n: int, s: float) -> list[float]:
    """Normalised Zipf weights of ranks 1..n."""
    w = [1.0 / (r**s) for r in range(1, n + 1)]
    total = sum(w)
    return [x / total for x in w]


def rate_at(t: float, duration_s: float, mean_per_s: float, peak_ratio: float) -> float:
    """Arrival rate at ``t``: ``mean * (1 - a cos(2 pi t / T))`` with ``1 + a = peak_ratio``."""
    a = min(peak_ratio - 1.0, 0.95)
    return mean_per_s * (1.0 - a * math.cos(2 * math.pi * t / duration_s))


def make_trace(
    *,
    seed: int,
    duration_s: float,
    mean_per_s: float,
    peak_ratio: float,
    items: int,
    zipf_s: float,
) -> list[Arrival]:
    """Poisson arrivals (thinning) with Zipf-popular items."""
    rng = random.Random(seed)
    weights = zipf_weights(items, zipf_s)
    ceiling = mean_per_s * (1.0 + min(peak_ratio - 1.0, 0.95))
    out: list[Arrival] = []
    t = 0.0
    while True:
        t += rng.expovariate(ceiling)
        if t >= duration_s:
            return out
        if rng.random() * ceiling <= rate_at(t, duration_s, mean_per_s, peak_ratio):
            item = rng.choices(range(items), weights)[0]
            out.append(Arrival(len(out), t, item))


def cache_misses(
    requests: Sequence[int],
    sizes: Sequence[int],
    capacity: int,
    initial: Sequence[int],
    policy: str,
) -> int:
    """Bytes missed replaying ``requests`` (indexes into ``sizes``: items or blobs) on a cache
    (see the module doc)."""
    held: OrderedDict[int, None] = OrderedDict()
    used = 0
    for i in initial:
        if used + sizes[i] <= capacity:
            held[i] = None
            used += sizes[i]
    next_use: list[float] = [math.inf] * len(requests)
    last: dict[int, int] = {}
    for pos in range(len(requests) - 1, -1, -1):
        next_use[pos] = last.get(requests[pos], math.inf)
        last[requests[pos]] = pos
    upcoming: dict[int, float] = {i: last.get(i, math.inf) for i in held}
    missed = 0
    for pos, item in enumerate(requests):
        upcoming[item] = next_use[pos]
        if item in held:
            held.move_to_end(item)
            continue
        missed += sizes[item]
        if sizes[item] > capacity:
            continue
        if policy == "belady" and upcoming[item] == math.inf:
            continue  # never used again: the optimum does not keep it
        while used + sizes[item] > capacity:
            if policy == "lru":
                victim = next(iter(held))
            else:
                victim = max(held, key=lambda i: upcoming.get(i, math.inf))
            del held[victim]
            used -= sizes[victim]
        held[item] = None
        used += sizes[item]
    return missed
