"""A replayed synthetic trace for the tiering policy: Zipf popularity, diurnal load.

:func:`replay` runs a policy over the trace and reports the *hit ratio* (bytes viewers got, from
the node within its uplink or from R2, over bytes they asked for), the mean and peak bytes
stored in R2, and the number of promotions (uploads cost R2 class A requests). Two policies are
provided: peerd's (:mod:`peerd.core.tiering`) and plain LRU (every viewed media item goes to R2;
the least recently viewed leave when the byte budget is full).
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from dataclasses import dataclass

from peerd.core.tiering import (
    Demote,
    MediaStat,
    Promote,
    TieringLimits,
    demand_bps,
    fold,
    plan_tiering,
)

DAY = 86400.0


@dataclass(frozen=True)
class Trace:
    """Views per step: a list (one per step) of lists of media indexes."""

    sizes: tuple[int, ...]
    steps: tuple[tuple[int, ...], ...]
    step_s: float
    view_bytes: int


@dataclass(frozen=True)
class Result:
    """How a policy did on a trace."""

    hit_ratio: float
    mean_r2_bytes: float
    peak_r2_bytes: int
    promotions: int


def make_trace(
    *,
    media: int = 200,
    days: float = 3.0,
    step_s: float = 300.0,
    views_per_s: float = 0.3,
    zipf_s: float = 1.0,
    diurnal: float = 0.8,
    seed: int = 7,
) -> Trace:
    """A trace with Zipf(``zipf_s``) popularity and a sinusoidal daily load."""
    rng = random.Random(seed)  # noqa: S311 -- a reproducible trace, not a secret
    sizes = tuple(rng.randint(50, 500) * 1_000_000 for _ in range(media))
    weights = [1.0 / (i + 1) ** zipf_s for i in range(media)]
    order = list(range(media))
    rng.shuffle(order)  # popularity rank is unrelated to size
    steps = []
    n_steps = int(days * DAY / step_s)
    for k in range(n_steps):
        t = k * step_s
        rate = views_per_s * (1.0 + diurnal * math.sin(2 * math.pi * t / DAY))
        lam = rate * step_s
        n = max(0, int(rng.gauss(lam, math.sqrt(lam)) + 0.5))
        picks = rng.choices(order, weights=weights, k=n)
        steps.append(tuple(picks))
    return Trace(sizes, tuple(steps), step_s, 200_000_000)


def _serve(
    trace: Trace, views: tuple[int, ...], in_r2: set[int], uplink_bps: float
) -> tuple[int, int]:
    budget = uplink_bps * trace.step_s
    asked = served = 0
    for m in views:
        nbytes = min(trace.sizes[m], trace.view_bytes)
        asked += nbytes
        if m in in_r2:
            served += nbytes
        elif budget >= nbytes:
            budget -= nbytes
            served += nbytes
    return asked, served


def replay_peerd(trace: Trace, limits: TieringLimits, half_life_s: float = 7200.0) -> Result:
    """peerd's policy: scores folded each step, a plan every step, uploads land next step."""
    n = len(trace.sizes)
    score = [0.0] * n
    since: list[float | None] = [None] * n
    r2_since: dict[int, float] = {}
    pending: list[int] = []
    asked = served = promotions = 0
    stored_sum = 0.0
    peak = 0
    for k, views in enumerate(trace.steps):
        now = k * trace.step_s
        for m in pending:
            r2_since[m] = now
        pending = []
        a, s = _serve(trace, views, set(r2_since), limits.uplink_bps)
        asked += a
        served += s
        per: dict[int, int] = {}
        for m in views:
            per[m] = per.get(m, 0) + min(trace.sizes[m], trace.view_bytes)
        for m, b in per.items():
            score[m] = fold(score[m], since[m], b, now, half_life_s)
            since[m] = now
        stats = [
            MediaStat(
                str(i),
                trace.sizes[i],
                demand_bps(
                    score[i] * 0.5 ** ((now - (since[i] or now)) / half_life_s), half_life_s
                ),
                i in r2_since,
                r2_since.get(i),
            )
            for i in range(n)
        ]
        for act in plan_tiering(stats, limits, now):
            i = int(act.media_id)
            if isinstance(act, Promote):
                pending.append(i)
                promotions += 1
            elif isinstance(act, Demote):
                r2_since.pop(i, None)
        stored = sum(trace.sizes[i] for i in r2_since)
        stored_sum += stored
        peak = max(peak, stored)
    return Result(served / max(1, asked), stored_sum / len(trace.steps), peak, promotions)


def replay_lru(trace: Trace, uplink_bps: float, budget_bytes: int) -> Result:
    """Plain LRU: each viewed media item is put in R2 (available from the next step)."""
    lru: OrderedDict[int, None] = OrderedDict()
    ready: set[int] = set()
    stored = 0
    asked = served = promotions = 0
    stored_sum = 0.0
    peak = 0
    for views in trace.steps:
        a, s = _serve(trace, views, ready, uplink_bps)
        asked += a
        served += s
        for m in views:
            if m in lru:
                lru.move_to_end(m)
                continue
            if trace.sizes[m] > budget_bytes:
                continue
            while stored + trace.sizes[m] > budget_bytes:
                old, _ = lru.popitem(last=False)
                stored -= trace.sizes[old]
                ready.discard(old)
            lru[m] = None
            stored += trace.sizes[m]
            promotions += 1
        ready = set(lru)
        stored_sum += stored
        peak = max(peak, stored)
    return Result(served / max(1, asked), stored_sum / len(trace.steps), peak, promotions)
