"""Tiering policy: which media go to R2, which leave it, which local blobs may be evicted.

Theory of operation
-------------------
Demand is measured as *decayed bytes served*: every drained batch of accesses adds its bytes to a
blob's score, and scores decay exponentially with half-life ``H`` (:func:`decayed`). A steady
stream of ``r`` bytes/s settles at ``r * H / ln 2``, so :func:`demand_bps` turns a score back into
a rate. A media item's demand is the sum over its blobs.

The node's uplink serves ``uplink_bps * headroom``. :func:`plan_tiering`:

1. Media in R2 that are still warm (demand >= ``cold_bps``), or younger than
   ``min_residence_s``, stay: their demand is served by R2.
2. If the rest of the demand exceeds the uplink, media not in R2 are promoted in order of demand
   per stored byte (most uplink relief for the fewest stored bytes) until the remainder fits, or
   the R2 byte budget (``r2_budget_bytes``) or request budget stops it.
3. Media in R2 that went cold (and are old enough) are demoted -- but only if the node still
   holds all their blobs, so demotion never deletes the last copy. When the budget shrank below
   what is stored, the least dense warm media are demoted too.
4. The bucket is shared by every node, so a demotion also needs the network to keep the item
   without it: with ``min_copies`` above 1, an item leaves R2 only when this node's copy plus
   the full copies other nodes are known to hold (``MediaStat.copies``) reach ``min_copies``.
   Copies not known (``None``: never looked up, or the lookup failed) count as none: the item
   stays (:class:`Keep`) and its bytes count as stored. Looking copies up is I/O, so the
   caller plans once with ``min_copies=1`` to learn the candidates, looks up their copies, and
   plans again with them.

:func:`plan_eviction` keeps local disk under quota: when usage passes the high watermark it evicts
blobs, coldest first (lowest demand per stored byte), down to the low watermark, choosing only
blobs whose R2 copy is confirmed and that are not pinned. The caller re-checks a candidate with a
HEAD before it deletes anything -- unless the bucket was seen to hold it a short while ago
(``BlobStat.checked_at`` within :data:`CONFIRM_FRESH_S`: the node read it from the bucket and it
hashed to its cid, uploaded and verified it, or HEAD-confirmed it). Objects under ``blobs/`` are
immutable (content-addressed keys), so what a fresh confirmation can miss is only a deletion, and
the only deleter is a demotion (``min_copies``), made by a node that keeps a full copy itself: an
eviction after a stale confirmation can leave the network a copy short of ``min_copies``, never
without the blob. ``heads`` caps the HEADs a plan may need (what the class B budget still allows
for eviction, :func:`spendable`); candidates that would need one more are passed over for fresh
ones.

:func:`request_budget` turns this month's request counts into what may go on. R2 bills class A
(writes, lists) and class B (reads: GET, HEAD) requests:

* class A used up: no promotions (each one is a PUT per blob);
* class B used up: no promotions either (each upload is verified by a HEAD, and media in R2 are
  there to be read), and ``evict`` is False: no eviction that needs a HEAD (the tiering service
  still evicts blobs confirmed a short while ago, which cost none: a full store relays every
  later miss without keeping it, one GET per viewer);
* demotions go on (DELETE is free and lowers what is stored).

Class B is spent on the viewers' behalf too, so the month's class B budget is shared out by
purpose (:func:`spendable`), and the node degrades in a fixed order as it runs low, never past
it:

1. ``optional`` (prefetching segments a viewer has not asked for yet) stops first, once less
   than :data:`RESERVE` ``["optional"]`` of the budget is left;
2. ``evict`` (the HEAD before evicting a blob not confirmed a short while ago) stops next,
   below ``RESERVE["evict"]``; evictions that need no HEAD go on;
3. ``viewer`` (a read-through GET, or the HEAD before redirecting a viewer to the bucket) uses
   the rest. Once that is gone too, a viewer's read of a blob only the bucket holds is answered
   503 with ``Retry-After`` (never 404: the blob exists), so the player or the coordinator goes
   to another node.

Pure: no I/O, ``now`` is passed in, results are frozen dataclasses.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

LN2 = math.log(2.0)


def decayed(score: float, since: float | None, now: float, half_life_s: float) -> float:
    """``score`` recorded at ``since``, decayed to ``now``."""
    if since is None or score <= 0.0:
        return max(0.0, score)
    dt = max(0.0, now - since)
    return score * math.pow(0.5, dt / half_life_s)


def fold(score: float, since: float | None, added: float, at: float, half_life_s: float) -> float:
    """A score after ``added`` bytes were accessed at ``at`` (the new reference time)."""
    return decayed(score, since, at, half_life_s) + added


def demand_bps(score: float, half_life_s: float) -> float:
    """The steady byte rate that would produce ``score`` (see the module doc)."""
    return score * LN2 / half_life_s


@dataclass(frozen=True)
class MediaStat:
    """One media item as the policy sees it."""

    media_id: str
    size: int
    demand_bps: float
    in_r2: bool
    r2_since: float | None = None
    local_complete: bool = True
    copies: int | None = None  # full copies other nodes hold, as far as known (None: unknown)


Purpose = Literal["optional", "evict", "viewer"]

# Share of the month's class B budget kept back from each purpose (see the module doc).
RESERVE: dict[str, float] = {"optional": 0.25, "evict": 0.10, "viewer": 0.0}

# How long the bucket's holding a blob, once seen, stands in for a HEAD before eviction.
CONFIRM_FRESH_S = 3600.0
# How long a blob just stored and not asked for yet is spared by eviction (a prefetch reaches
# its viewer within seconds).
SPARE_STORED_S = 30.0


def spendable(left: int, budget: int, purpose: Purpose) -> int:
    """Class B requests ``purpose`` may still make when ``left`` of the month's ``budget``
    remain: what is left above the share kept back for the purposes that come after it."""
    return max(0, left - math.ceil(RESERVE[purpose] * budget))


@dataclass(frozen=True)
class BudgetVerdict:
    """What this month's request counts still allow (see the module doc)."""

    promote: bool
    evict: bool
    class_a_left: int
    class_b_left: int


def request_budget(used_a: int, used_b: int, budget_a: int, budget_b: int) -> BudgetVerdict:
    """The verdict for ``used_a``/``used_b`` requests made this month against the budgets."""
    a_left = max(0, budget_a - used_a)
    b_left = max(0, budget_b - used_b)
    return BudgetVerdict(
        promote=a_left > 0 and b_left > 0,
        evict=b_left > 0,
        class_a_left=a_left,
        class_b_left=b_left,
    )


@dataclass(frozen=True)
class TieringLimits:
    """The node's capacity and the operator's budgets."""

    uplink_bps: float
    r2_budget_bytes: int
    headroom: float = 0.6
    cold_bps: float = 1000.0
    min_residence_s: float = 3600.0
    promotions_allowed: bool = True
    min_copies: int = 1


@dataclass(frozen=True)
class Promote:
    """Copy a media item (manifest and blobs) to R2."""

    media_id: str
    size: int
    demand_bps: float


@dataclass(frozen=True)
class Demote:
    """Delete a media item's objects from R2 (the node keeps its copy)."""

    media_id: str
    size: int
    reason: str


@dataclass(frozen=True)
class Keep:
    """A media item that would be demoted but stays in R2: too few full copies are known
    elsewhere (``reason`` ``"copies"``, or ``"unknown"`` when they could not be learnt)."""

    media_id: str
    size: int
    reason: str


def enough_copies(others: int | None, min_copies: int) -> bool:
    """Whether this node's copy and ``others`` full copies elsewhere reach ``min_copies``
    (``None``: not known, which never does unless one copy is enough)."""
    return min_copies <= 1 or (others is not None and others + 1 >= min_copies)


@dataclass(frozen=True)
class BlobStat:
    """One locally held blob as eviction sees it."""

    cid: str
    size: int
    score: float
    last_access: float | None
    r2_confirmed: bool
    pinned: bool
    checked_at: float | None = None  # when the bucket was last seen to hold it
    # Reads per stored byte of the rendition it belongs to (its blobs' decayed scores over
    # their bytes): what a blob not read yet, or read once, is likely to see.
    prior: float = 0.0


@dataclass(frozen=True)
class Evict:
    """Drop the local copy of a blob (its R2 copy stays); ``head``: confirm that copy first."""

    cid: str
    size: int
    head: bool = True


def _density(m: MediaStat) -> float:
    return m.demand_bps / max(1, m.size)


def plan_tiering(
    media: Sequence[MediaStat], limits: TieringLimits, now: float
) -> list[Promote | Demote | Keep]:
    """Promotions and demotions for this round, and demotions held back (see the module
    doc)."""
    capacity = max(0.0, limits.uplink_bps * limits.headroom)
    actions: list[Promote | Demote | Keep] = []

    def settled(m: MediaStat) -> bool:
        return m.r2_since is not None and now - m.r2_since < limits.min_residence_s

    kept: list[MediaStat] = []
    cold: list[MediaStat] = []
    for m in media:  # one pass: a membership test on the list was quadratic in the library
        if m.in_r2:
            (kept if m.demand_bps >= limits.cold_bps or settled(m) else cold).append(m)
    kept.sort(key=_density, reverse=True)
    stored = 0
    keep_ids = set()
    for m in kept:
        if stored + m.size <= limits.r2_budget_bytes or not m.local_complete:
            stored += m.size
            keep_ids.add(m.media_id)
        else:
            cold.append(m)
    for m in cold:
        if m.local_complete and enough_copies(m.copies, limits.min_copies):
            reason = "over budget" if m.demand_bps >= limits.cold_bps else "cold"
            actions.append(Demote(m.media_id, m.size, reason))
            continue
        if m.local_complete:
            actions.append(Keep(m.media_id, m.size, "unknown" if m.copies is None else "copies"))
        stored += m.size  # cannot leave R2 before the node (and the network) holds it again
        keep_ids.add(m.media_id)
    local_demand = sum(m.demand_bps for m in media if m.media_id not in keep_ids)
    if local_demand > capacity and limits.promotions_allowed:
        candidates = sorted(
            (m for m in media if not m.in_r2 and m.demand_bps > 0), key=_density, reverse=True
        )
        for m in candidates:
            if local_demand <= capacity:
                break
            if stored + m.size > limits.r2_budget_bytes:
                continue
            actions.append(Promote(m.media_id, m.size, m.demand_bps))
            stored += m.size
            local_demand -= m.demand_bps
    return actions


def plan_eviction(
    blobs: Iterable[BlobStat],
    used_bytes: int,
    quota_bytes: int,
    *,
    high: float = 0.95,
    low: float = 0.85,
    order: str = "demand",
    now: float | None = None,
    heads: int | None = None,
    spare: Collection[str] = (),
) -> list[Evict]:
    """Blobs to evict so local usage falls to ``low * quota`` once it passed ``high * quota``;
    ``order`` ``"lru"`` ignores scores (least recently used first). A blob confirmed in the
    bucket since ``now - CONFIRM_FRESH_S`` needs no HEAD; at most ``heads`` others are chosen
    (None: any number; see the module doc). ``spare``: blobs stored a moment ago and not asked
    for since, on their way to a viewer (a prefetch): not evicted yet (their score is 0, which
    would make them the first to go, and each would be fetched again)."""
    if quota_bytes <= 0 or used_bytes <= high * quota_bytes:
        return []
    target = low * quota_bytes

    def key(b: BlobStat) -> tuple[float, float, str]:
        last = b.last_access if b.last_access is not None else -math.inf
        # Demand per stored byte: a blob's score is the bytes it served, so ranking by the
        # score itself kept a large segment watched once over a small one watched often, the
        # wrong way round for the bytes fetched again (each byte of room is worth the reads
        # of it it saves). A blob's own reads are few (a segment is read once per viewer),
        # so its rendition's reads per byte are added: the segments of a rendition being
        # watched, read yet or not, outrank those of one nobody watches.
        return (0.0 if order == "lru" else b.score / max(b.size, 1) + b.prior, last, b.cid)

    candidates = sorted(
        (b for b in blobs if b.r2_confirmed and not b.pinned and b.cid not in spare), key=key
    )
    out = []
    for b in candidates:
        if used_bytes <= target:
            break
        fresh = (
            now is not None and b.checked_at is not None and now - b.checked_at < CONFIRM_FRESH_S
        )
        if not fresh and heads is not None:
            if heads <= 0:
                continue
            heads -= 1
        out.append(Evict(b.cid, b.size, head=not fresh))
        used_bytes -= b.size
    return out
