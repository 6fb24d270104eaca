"""The tiering policy (pure): unit cases, and a replayed Zipf/diurnal trace against plain LRU."""

from __future__ import annotations

from dataclasses import replace

from peerd.core.tiering import (
    CONFIRM_FRESH_S,
    BlobStat,
    Demote,
    Keep,
    MediaStat,
    Promote,
    TieringLimits,
    decayed,
    demand_bps,
    fold,
    plan_eviction,
    plan_tiering,
    request_budget,
    spendable,
)
from tests.support.tiering_trace import make_trace, replay_lru, replay_peerd

LIM = TieringLimits(uplink_bps=1000, r2_budget_bytes=10_000, headroom=1.0, cold_bps=10)


def test_scores_decay_and_convert_to_rates() -> None:
    assert decayed(100, 0, 3600, 3600) == 50
    assert fold(100, 0, 10, 3600, 3600) == 60
    # A steady 100 B/s folded every second settles at the rate demand_bps reports.
    s, t = 0.0, None
    for i in range(40_000):
        s = fold(s, t, 100, float(i), 3600)
        t = float(i)
    assert abs(demand_bps(s, 3600) - 100) < 2


def test_no_promotion_while_uplink_copes() -> None:
    media = [MediaStat("a", 100, 500, False), MediaStat("b", 100, 400, False)]
    assert plan_tiering(media, LIM, 0) == []


def test_promotes_densest_until_demand_fits_within_budget() -> None:
    media = [
        MediaStat("big", 9_000, 900, False),
        MediaStat("small-hot", 1_000, 800, False),
        MediaStat("small-warm", 1_000, 300, False),
    ]
    acts = plan_tiering(media, LIM, 0)
    assert [a.media_id for a in acts if isinstance(a, Promote)] == ["small-hot", "small-warm"]
    tight = TieringLimits(uplink_bps=1000, r2_budget_bytes=1_500, headroom=1.0, cold_bps=10)
    acts = plan_tiering(media, tight, 0)
    assert [a.media_id for a in acts] == ["small-hot"]
    off = TieringLimits(1000, 10_000, headroom=1.0, cold_bps=10, promotions_allowed=False)
    assert plan_tiering(media, off, 0) == []


def test_demotes_cold_media_but_never_the_last_copy_and_respects_residence() -> None:
    media = [
        MediaStat("cold", 100, 1, True, r2_since=0),
        MediaStat("cold-not-local", 100, 1, True, r2_since=0, local_complete=False),
        MediaStat("cold-new", 100, 1, True, r2_since=9_000),
        MediaStat("warm", 100, 50, True, r2_since=0),
    ]
    acts = plan_tiering(media, LIM, 10_000)
    assert acts == [Demote("cold", 100, "cold")]


def test_demotion_needs_min_copies_in_the_network() -> None:
    """min_copies counts this node's copy: 2 needs one more elsewhere; unknown is none."""
    media = [
        MediaStat("alone", 100, 1, True, r2_since=0, copies=0),
        MediaStat("unknown", 100, 1, True, r2_since=0),
        MediaStat("shared", 100, 1, True, r2_since=0, copies=1),
        MediaStat("cold-not-local", 100, 1, True, r2_since=0, local_complete=False, copies=5),
    ]
    two = replace(LIM, min_copies=2)
    assert plan_tiering(media, two, 10_000) == [
        Keep("alone", 100, "copies"),
        Keep("unknown", 100, "unknown"),
        Demote("shared", 100, "cold"),
    ]
    three = replace(LIM, min_copies=3)
    assert [a for a in plan_tiering(media, three, 10_000) if isinstance(a, Demote)] == []
    # One copy is enough: today's single-node rule, copies never asked.
    assert [a.media_id for a in plan_tiering(media, LIM, 10_000)] == ["alone", "unknown", "shared"]
    # Kept items still count as stored: a promotion that no longer fits waits.
    full = TieringLimits(10, 250, headroom=1.0, cold_bps=10, min_copies=2)
    hot = [*media[:2], MediaStat("hot", 100, 500, False)]
    assert not [a for a in plan_tiering(hot, full, 10_000) if isinstance(a, Promote)]


def test_over_budget_demotes_least_dense() -> None:
    media = [
        MediaStat("dense", 1_000, 500, True, r2_since=0),
        MediaStat("sparse", 9_500, 100, True, r2_since=0),
    ]
    acts = plan_tiering(media, LIM, 100_000)
    assert acts == [Demote("sparse", 9_500, "over budget")]


def test_eviction_only_confirmed_unpinned_coldest_first() -> None:
    blobs = [
        BlobStat("hot", 30, 100.0, 5.0, True, False),
        BlobStat("cold", 30, 1.0, 1.0, True, False),
        BlobStat("pinned", 30, 0.0, 0.0, True, True),
        BlobStat("not-in-r2", 30, 0.0, 0.0, False, False),
        BlobStat("warm", 30, 10.0, 3.0, True, False),
    ]
    assert plan_eviction(blobs, 90, 100) == []  # below the high watermark
    ev = plan_eviction(blobs, 150, 100)
    assert [e.cid for e in ev] == ["cold", "warm", "hot"]
    ev = plan_eviction(blobs, 100, 100, high=0.95, low=0.5)
    assert [e.cid for e in ev] == ["cold", "warm"]
    assert plan_eviction(blobs, 100, 0) == []  # no quota


def test_lru_eviction_ignores_demand() -> None:
    blobs = [
        BlobStat("recent", 30, 1.0, 9.0, True, False),
        BlobStat("busy-long-ago", 30, 500.0, 0.5, True, False),
        BlobStat("middle", 30, 10.0, 3.0, True, False),
    ]
    ev = plan_eviction(blobs, 100, 100, low=0.5)
    assert [e.cid for e in ev] == ["recent", "middle"]
    ev = plan_eviction(blobs, 100, 100, low=0.5, order="lru")
    assert [e.cid for e in ev] == ["busy-long-ago", "middle"]


def test_trace_replay_against_lru() -> None:
    """Zipf popularity, diurnal load peaking above the uplink: peerd's policy serves about as
    much as LRU while storing a fraction of the bytes and uploading far less."""
    trace = make_trace(views_per_s=0.04)
    library = sum(trace.sizes)
    uplink = 5_000_000
    budget = int(library * 0.3)
    limits = TieringLimits(
        uplink_bps=uplink, r2_budget_bytes=budget, cold_bps=uplink * 0.01, min_residence_s=3600
    )
    ours = replay_peerd(trace, limits, half_life_s=3600)
    lru = replay_lru(trace, uplink, budget)
    nothing = replay_lru(trace, uplink, 0)
    print(f"peerd {ours}\nlru   {lru}\nnone  {nothing}")
    assert nothing.hit_ratio < 0.7  # the uplink alone does not cope: the trace is meaningful
    assert ours.hit_ratio >= lru.hit_ratio - 0.03
    assert ours.mean_r2_bytes <= 0.35 * lru.mean_r2_bytes
    assert ours.peak_r2_bytes <= budget
    assert ours.promotions <= 0.25 * lru.promotions


def test_request_budget() -> None:
    ok = request_budget(10, 10, 100, 100)
    assert (ok.promote, ok.evict, ok.class_a_left, ok.class_b_left) == (True, True, 90, 90)
    no_a = request_budget(100, 10, 100, 100)
    assert (no_a.promote, no_a.evict, no_a.class_a_left) == (False, True, 0)
    no_b = request_budget(10, 150, 100, 100)
    assert (no_b.promote, no_b.evict, no_b.class_b_left) == (False, False, 0)


def test_class_b_is_shared_out_by_purpose_in_degradation_order() -> None:
    """Optional spending stops first, eviction HEADs next, viewers use the rest; never past
    the budget."""
    budget = 100
    assert [spendable(100, budget, p) for p in ("optional", "evict", "viewer")] == [75, 90, 100]
    assert [spendable(20, budget, p) for p in ("optional", "evict", "viewer")] == [0, 10, 20]
    assert [spendable(5, budget, p) for p in ("optional", "evict", "viewer")] == [0, 0, 5]
    assert [spendable(0, budget, p) for p in ("optional", "evict", "viewer")] == [0, 0, 0]
    assert spendable(-3, budget, "viewer") == 0  # overrun elsewhere: nothing more
    assert spendable(1, 3, "optional") == 0  # a tiny budget keeps a whole request back


def test_eviction_needs_heads_only_for_blobs_not_confirmed_lately() -> None:
    now = 10_000.0
    old = now - CONFIRM_FRESH_S - 1
    blobs = [
        BlobStat("cold-old", 30, 1.0, 1.0, True, False, checked_at=old),
        BlobStat("cold-fresh", 30, 2.0, 1.0, True, False, checked_at=now - 5),
        BlobStat("warm-never", 30, 3.0, 1.0, True, False, checked_at=None),
        BlobStat("warm-fresh", 30, 4.0, 1.0, True, False, checked_at=now - 60),
    ]
    ev = plan_eviction(blobs, 120, 100, low=0.5, now=now)
    assert [(e.cid, e.head) for e in ev] == [
        ("cold-old", True),
        ("cold-fresh", False),
        ("warm-never", True),
    ]
    # No HEAD allowed: only blobs confirmed lately go, the others are passed over.
    ev = plan_eviction(blobs, 120, 100, low=0.5, now=now, heads=0)
    assert [(e.cid, e.head) for e in ev] == [("cold-fresh", False), ("warm-fresh", False)]
    ev = plan_eviction(blobs, 120, 100, low=0.5, now=now, heads=1)
    assert [e.cid for e in ev] == ["cold-old", "cold-fresh", "warm-fresh"]
    # Without ``now`` nothing counts as fresh (every eviction is checked).
    assert all(e.head for e in plan_eviction(blobs, 120, 100, low=0.5))


def test_eviction_spares_blobs_stored_for_a_viewer_not_asked_for_yet() -> None:
    blobs = [
        BlobStat("prefetched", 30, 0.0, 9.0, True, False),
        BlobStat("placed-unseen", 30, 0.0, 1.0, True, False),
        BlobStat("seen", 30, 5.0, 8.0, True, False),
    ]
    ev = plan_eviction(blobs, 100, 100, low=0.5)
    assert [e.cid for e in ev] == ["placed-unseen", "prefetched"]
    ev = plan_eviction(blobs, 100, 100, low=0.5, spare={"prefetched"})
    assert [e.cid for e in ev] == ["placed-unseen", "seen"]


def test_eviction_ranks_demand_per_stored_byte() -> None:
    """A score is bytes served: a large segment served once outscores a small one served three
    times, yet keeping the small one saves more reads per byte of room."""
    blobs = [
        BlobStat("big-once", 400, 400.0, 5.0, True, False),
        BlobStat("small-thrice", 100, 300.0, 4.0, True, False),
    ]
    ev = plan_eviction(blobs, 500, 500, low=0.5)
    assert [e.cid for e in ev] == ["big-once"]


def test_eviction_keeps_the_unread_segments_of_a_rendition_being_watched() -> None:
    """A segment not read yet scores 0, as one nobody will ask for; its rendition's reads per
    byte (``prior``) tell them apart."""
    blobs = [
        BlobStat("next-of-watched", 100, 0.0, None, True, False, prior=0.5),
        BlobStat("read-once-long-ago", 100, 10.0, 1.0, True, False),
        BlobStat("nobody-watches", 100, 0.0, None, True, False),
    ]
    ev = plan_eviction(blobs, 300, 300, low=0.5)
    assert [e.cid for e in ev] == ["nobody-watches", "read-once-long-ago"]
