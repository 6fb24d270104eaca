"""The testbed simulator (scripts/testbed/sim.py): invariants on a small scenario, and its
calibration against a real quick testbed run (tests/fixtures/testbed_quick)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from scripts.testbed import sim as S
from scripts.testbed.workload import make_trace

FIXTURE = Path(__file__).parent / "fixtures" / "testbed_quick"


def small(**kw: object) -> S.SimParams:
    """4 nodes (one LAN pair), 40 items, 30 s of arrivals: the quick scenario, shorter."""
    sc = json.loads((FIXTURE / "summary.json").read_text())["scenario"]
    p = S.params_from_scenario(sc)
    p.duration_s = 30.0
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def library(p: S.SimParams) -> S.Library:
    rungs = json.loads((FIXTURE / "library.json").read_text())["rungs"]
    return S.library_from_rungs(rungs, p.items, p.segments_per_item)


def run(p: S.SimParams, policy: str) -> tuple[S.Sim, dict[str, Any]]:
    sim = S.simulate(p, library(p), policy)
    return sim, sim.summary()


@pytest.mark.parametrize("policy", ["peerd", "lru", "no_r2", "all_r2"])
def test_bytes_conserved_and_bounded(policy: str) -> None:
    p = small()
    sim, s = run(p, policy)
    assert s["viewers"] == len(sim.viewers) > 20
    by = s["bytes_by_source"]
    assert isinstance(by, dict)
    # What the viewers counted, per source, is what the player side saw in total...
    assert sum(by.values()) == sum(sum(v.bytes_by_source.values()) for v in sim.viewers)
    assert by == sim.totals
    # ... and what the nodes say they sent to viewers (by origin) is the viewers' node bytes.
    sent = sum(x for n in sim.nodes for k, x in n.served.items() if k != "lan-peer")
    assert sent == by.get("node", 0)
    lib = sim.lib
    for v in sim.viewers:
        item = lib.items[v.item]
        inits = sum(lib.sizes[g.init] for g in item.rungs)
        assert sum(v.bytes_by_source.values()) <= item.size + v.reroutes * inits
        assert v.played_s <= item.duration_s + 1e-6
        assert not v.gave_up
    if policy == "all_r2":
        assert by.get("node", 0) == 0
    if policy == "no_r2":
        assert by.get("r2", 0) == by.get("r2_redirect", 0) == 0


@pytest.mark.parametrize("crowded", [False, True])
def test_no_r2_costs_nothing_in_r2(crowded: bool) -> None:
    """``no_r2`` nodes have no bucket, and its coordinator never routes there: also when every
    node refuses (admission on narrow uplinks: 503s, viewers sent back to a refusing holder)."""
    p = small(admission_fraction=1.0, uplinks_mbit=[3, 4, 3, 2]) if crowded else small()
    sim, s = run(p, "no_r2")
    if crowded:
        assert s["reroutes"] > 0  # refusals happened
        assert all(r[2] == "node" for r in sim.routes)
    assert s["r2_class_a"] == s["r2_class_b"] == 0
    assert s["r2_gb_months"] == 0
    assert s["cost_usd"] == 0
    assert s["r2_read_bytes"] == 0


def test_infinite_uplink_never_stalls() -> None:
    """Infinite uplinks (and no CPU time, whose long tail alone can stall a viewer)."""
    p = small(uplinks_mbit=[math.inf] * 4, node_request_s=0.0, client_request_s=0.0)
    sim, s = run(p, "peerd")
    assert s["stalls"] == 0
    assert s["rebuffer_ratio"] == 0
    assert s["bytes_by_source"].get("node", 0) > 0


def test_a_narrow_uplink_stalls() -> None:
    """The model can stall at all: nodes only, on a tenth of the uplinks."""
    p = small(uplinks_mbit=[0.6, 0.9, 0.7, 0.5])
    _, s = run(p, "no_r2")
    assert s["stalls"] > 0


def worst_over_budget(p: S.SimParams, budget_of: float) -> tuple[float, S.Sim, dict[str, Any]]:
    """Run ``p``; the most a node's 5 s send rate (peerd.core.uplink's meter) went past
    ``budget_of`` times its uplink, sampled every 0.25 s."""
    sim = S.Sim(p, library(p), "peerd")
    worst = -math.inf

    def probe() -> S.Proc:
        nonlocal worst
        while sim.active or sim.now < p.duration_s:
            for n in sim.nodes:
                worst = max(worst, n.meter.rate(sim.now) - n.uplink_Bps * budget_of)
            yield "wait", 0.25

    sim.start(probe())
    trace = make_trace(
        seed=p.seed,
        duration_s=p.duration_s,
        mean_per_s=p.mean_per_s,
        peak_ratio=p.peak_ratio,
        items=p.items,
        zipf_s=p.zipf_s,
    )
    summary = sim.play(trace)
    return worst, sim, summary


def test_admission_keeps_the_send_rate_within_the_budget() -> None:
    """With [uplink] budget at half the link, a node's send rate never passes the budget by
    more than one stream's worth; the new streams it refuses go to the bucket (redirects).
    Without admission the same nodes send well past it (so the check can fail): 5 viewers a
    second, as the shaper's measured loss recovery slows the viewers of the quick scenario's
    3.5 to within a stream of half the link."""
    busy = small(mean_per_s=5.0, admission_fraction=0.5, admission_stream_mbit=1.0)
    worst, sim, s = worst_over_budget(busy, 0.5)
    one_stream = max(i.need_Bps for i in sim.lib.items)
    assert worst <= one_stream
    assert s["bytes_by_source"].get("r2_redirect", 0) > 0
    unchecked, _, _ = worst_over_budget(small(mean_per_s=5.0), 0.5)
    assert unchecked > one_stream


# What the model reproduces of the fixture's quick run (the old defaults: holders routing, every
# manifest in every catalog), and how closely. Two identical quick runs of the testbed itself
# differ by 7% in startup p50, 12% in class B and 37% in class A operations (/tmp/tbq2: 156,
# the fixture's run: 107), so those two are held to their own spread; startup p95 is not
# claimed, and the rebuffer ratio of a quick run is a handful of stalls (one 3 s stall is
# 0.15%): held within half the 1% goal.
# Its startups are not claimed either since the model's transfer times are measured, not fitted
# on this run: 0.24 s against its 0.337 s p50 (its peerd and defaults are older; the quick run of
# today's below is matched).
TOLERANCE = {"node_share": 0.10, "r2_class_b": 0.20}
# How long before the first viewer each node's catalog was seeded in that run (its catalogs and
# logs, read by S.seed_ages while the run's work directory existed).
FIXTURE_AGES = {"peerd": [10.36, 8.81, 6.87, 4.88]}


def test_calibration_against_a_real_quick_run(tmp_path: Path) -> None:
    """The fixture is the summary of one real ``run.sh --quick`` and its library's sizes."""
    (tmp_path / "library.json").write_text((FIXTURE / "library.json").read_text())
    # That run's coordinator kept no uplink in reserve for items the bucket holds (routing.py
    # since: r2_reserve 0.15), and its nodes no budget (admission off: no spill, no overflow).
    summary = json.loads((FIXTURE / "summary.json").read_text())
    summary["scenario"]["r2_reserve"] = 0.0
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    # That run's peerd predates 27d9b58: its nodes' check failed on every object the driver put
    # in the bucket (its daemon.log: "failed verification; deleted it").
    # Its peerd also predates ddf77c4: a HEAD before every eviction.
    summary["scenario"]["head_free_eviction"] = False
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    res = S.calibrate(tmp_path, ages=FIXTURE_AGES, unverified=True)
    assert (tmp_path / "sim_compare.md").is_file()
    cmp = res["policies"]["peerd"]["compare"]
    for k, tol in TOLERANCE.items():
        assert cmp[k]["rel_err"] is not None, k
        assert abs(cmp[k]["rel_err"]) <= tol, (k, cmp[k])
    # the testbed's class A operations are refused evictions' pushes: without them (the model
    # before) it made 8 where the run made 107
    assert cmp["r2_class_a"]["sim"] > 30
    assert abs(cmp["rebuffer_ratio"]["abs_err"]) <= 0.005


# The quick run of today's defaults (run.sh --quick: admission at each uplink, routing any,
# placed manifests): its summary, its library's sizes and its nodes' clocks (S.node_clocks on its
# work directory: seed ages, ready ages, LAN partner lost).
FINAL = Path(__file__).parent / "fixtures" / "testbed_quick_final"
FINAL_CLOCKS = {
    "peerd": ([4.91, 4.3, 3.78, 3.2], [0.02, 0.03, 1.01, 1.11], [math.inf, 70.6] + [math.inf] * 2)
}


def test_calibration_against_todays_quick_run(tmp_path: Path) -> None:
    """On the quick run of today's defaults the model's startups come from the measured
    transfer times (the shaper's excess, the measured CPU time): p50 and p95 within 15%, the
    bytes from nodes and class B within 10%, the rebuffer ratio within 0.1 point."""
    (tmp_path / "library.json").write_text((FINAL / "library.json").read_text())
    # That run's coordinator took the latest inventory's r2_state as the bucket's
    summary = json.loads((FINAL / "summary.json").read_text())
    summary["scenario"]["coord_latest_wins"] = True
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    res = S.calibrate(tmp_path, clocks=FINAL_CLOCKS, unverified=False)
    cmp = res["policies"]["peerd"]["compare"]
    for k, tol in (("startup_p50_s", 0.15), ("startup_p95_s", 0.15), ("node_share", 0.1)):
        assert abs(cmp[k]["rel_err"]) <= tol, (k, cmp[k])
    assert abs(cmp["r2_class_b"]["rel_err"]) <= 0.1, cmp["r2_class_b"]
    assert abs(cmp["rebuffer_ratio"]["abs_err"]) <= 0.001


def test_near_zero_figures_are_judged_by_absolute_difference() -> None:
    """0.03% against 0.01% rebuffering is +200% yet both are far within the 1% goal: the
    rebuffer ratio passes within 0.1 point; a large relative error on a large figure fails."""
    tb = dict.fromkeys(S.HEADLINE, 1.0) | {"rebuffer_ratio": 0.0001, "r2_class_a": 0}
    sim = dict.fromkeys(S.HEADLINE, 1.05) | {"rebuffer_ratio": 0.0003, "r2_class_a": 3}
    cmp = S.compare(tb, sim)
    assert cmp["rebuffer_ratio"]["pass"]
    assert cmp["rebuffer_ratio"]["rel_err"] == 2.0
    assert cmp["r2_class_a"]["pass"]
    assert cmp["r2_class_a"]["rel_err"] is None
    assert cmp["startup_p50_s"]["pass"]
    assert not S.compare(tb, dict(sim, startup_p95_s=1.2))["startup_p95_s"]["pass"]
    assert not S.compare(tb, dict(sim, rebuffer_ratio=0.0012))["rebuffer_ratio"]["pass"]


def test_new_defaults_are_read_from_the_scenario() -> None:
    """The testbed's --route any --manifests placed --node-set 'uplink.budget_mbps=...'."""
    sc = json.loads((FIXTURE / "summary.json").read_text())["scenario"]
    sc = dict(
        sc, route="any", manifests="placed", node_set={"uplink": {"budget_mbps": "{uplink_mbit}"}}
    )
    p = S.params_from_scenario(sc)
    assert (p.route, p.manifests, p.admission_fraction) == ("any", "placed", 1.0)
    assert p.admission_stream_mbit > 0
    sim = S.Sim(p, library(p), "peerd")
    # a catalog holds its own items' manifests only, all marked in the bucket
    assert all(n.known == set(range(n.index, p.items, p.nodes)) for n in sim.nodes)
    assert all(n.known == set(n.media_r2) for n in sim.nodes)
    assert all(n.meter.enabled for n in sim.nodes)


def test_a_refused_eviction_pushes_the_blob_back() -> None:
    """What the testbed's class A operations are: a node evicting a blob whose bucket copy it
    cannot confirm pushes it instead (one PUT when a demotion deleted it; when the object is
    there but fails the check -- the driver's, in the quick runs -- a PUT refused with 412, a
    DELETE and the retry's PUT)."""
    p = small()
    sim = S.Sim(p, library(p), "peerd")
    n = sim.nodes[0]
    sim.seeded = set(sim.bucket)  # the peerd of before 27d9b58 (see SimParams)
    seeded = next(iter(sim.seeded))
    absent = next(b for b in sim.lib.items[1].blobs if b >= 0)
    sim.bucket_delete(absent)
    a0 = sim.class_a
    sim.push(n, absent)
    assert sim.class_a == a0 + 1
    assert absent in sim.bucket
    assert absent in n.r2_rows
    sim.push(n, seeded)
    assert sim.class_a == a0 + 3
    assert seeded in sim.written
    assert sim.verify(n, seeded)  # the object a node wrote carries its checksum


def test_a_shared_shaper_carries_less_than_its_rate() -> None:
    """Three flows or more on a shaped link carry its measured goodput, not its rate."""
    from scripts.testbed.fluid import Link

    for goodput, done_at in ((1.0, 1.5), (0.5, 3.0)):
        link = Link(100.0, contended=3, contended_goodput=goodput)
        for f in range(3):
            link.add(f, 50.0, 0.0)
        assert link.next_done() == pytest.approx(done_at)
    two = Link(100.0, contended=3, contended_goodput=0.5)
    two.add(0, 50.0, 0.0)
    two.add(1, 50.0, 0.0)
    assert two.next_done() == pytest.approx(1.0)


def test_a_transfer_waits_what_the_shaper_measured_past_its_share() -> None:
    """A segment a node sends takes its equal share of the uplink plus the excess the bench
    measured at the testbed's tbf (scripts/testbed/tbf_excess.json) for that size and the
    transfers already in flight: more, the more others crowd the link; a playlist alone on it
    is not held up."""
    ex = S.ShaperExcess.load()
    us = [i / 200 for i in range(200)]
    alone = [ex.draw(6.0, 199_500, 0, u) for u in us]
    crowded = [ex.draw(6.0, 199_500, 8, u) for u in us]
    assert alone == sorted(alone)  # a quantile function
    assert sum(crowded) > 2 * sum(alone)
    assert max(ex.draw(6.0, 400, 0, u) for u in us) < 0.01

    p = small()
    for excess in (False, True):
        p.shaper_excess = excess
        sim = S.Sim(p, library(p), "peerd")
        done: dict[int, float] = {}

        def send(k: int, s: S.Sim = sim, d: dict[int, float] = done) -> S.Proc:
            yield "flow", (1, 199_500)
            d[k] = s.now

        for k in range(9):
            sim.start(send(k))
        sim.run(60.0)
        share = 9 * 199_500 / sim.nodes[1].uplink_Bps  # all nine end together on a fair link
        assert min(done.values()) >= share - 1e-9
        if excess:
            # the later ones started with others in flight and waited their draw besides
            assert max(done.values()) > share + 0.05
        else:
            assert max(done.values()) == pytest.approx(share)


def test_a_node_past_its_request_budget_still_evicts_what_the_bucket_confirmed() -> None:
    """peerd's eviction never stops for want of class B budget (a full store cuts every relay):
    blobs the bucket confirmed within the hour (seeded, read from it) go without a HEAD, so with
    little budget left stores stay below the quota as with a budget, and no HEAD is made."""
    fullest, heads = {}, {}
    for budget in (40, 10**9):  # 40: spent within the run by two of the four nodes
        p = small(budget_class_b_per_month=budget, quota_factor=1.2, duration_s=60.0)
        sim, s = run(p, "peerd")
        fullest[budget] = max(n.used / n.quota for n in sim.nodes)
        heads[budget] = sim.counters.get("class_b:check_head", 0)
        assert sim.counters.get("evict_fresh", 0) > 0
    assert fullest[40] <= 0.96
    assert fullest[10**9] <= 0.96
    assert heads[40] == heads[10**9] == 0


def test_eviction_starts_as_soon_as_the_store_passes_its_mark_and_spares_a_fetch_ahead() -> None:
    """``BlobStore.on_grow``: a blob stored past the high watermark starts an eviction at once,
    not at the next round; it evicts down to the low watermark without a HEAD (every blob was
    confirmed at the seeding), never the blob just stored that nobody asked for yet."""
    p = small(tiering_interval_s=10**6)  # no round: only the store's growth evicts
    sim = S.Sim(p, library(p), "peerd")
    n = sim.nodes[0]
    item = next(k for k in range(len(sim.lib.items)) if k % p.nodes not in (0, n.lan_peer))
    blob = next(b for b in sim.lib.items[item].rungs[-1].segments)[0]
    n.quota = int((n.used + sim.lib.sizes[blob]) / 0.96)
    assert sim.store(n, blob, "r2")  # a fetch ahead's body: stored, not asked for
    sim.run(1.0)
    assert n.used <= 0.85 * n.quota
    assert blob in n.held
    assert sim.counters.get("class_b:check_head", 0) == 0
    assert sim.counters["evict_fresh"] > 0


def test_the_class_b_budget_stops_prefetch_first_then_answers_503() -> None:
    """The ledger by purpose (``peerd.core.tiering.spendable``): with less than a quarter of the
    class B budget left a node fetches nothing ahead, but still reads for a viewer; with none
    left a viewer's read of a blob only the bucket holds is 503 + Retry-After 60 (BudgetSpent),
    and a stream over the uplink is not redirected (no HEAD) but taken at its floor."""
    p = small(manifests="placed", budget_class_b_per_month=100)
    sim = S.Sim(p, library(p), "peerd")
    n = sim.nodes[2]
    item = next(k for k in range(len(sim.lib.items)) if k % p.nodes not in (2, n.lan_peer))
    segs = [b for b, _, _ in sim.lib.items[item].rungs[0].segments]
    n.req_b = 80  # 20 left: under the 25 kept back from prefetching
    sim.fetch_ahead(n, item, segs[0], (item, 1))
    sim.fetch_ahead(n, item, segs[1], (item, 1))
    assert sim.node_gets == []
    assert n.inflight == {}
    assert sim.counters["budget_refused:optional"] == 2
    assert sim.fetch_source(n, segs[2]) == "r2"  # a viewer's read still goes
    n.req_b = 100
    assert sim.fetch_source(n, segs[3]) == "budget"
    v = S.ViewerStats(0, item, 0.0)
    got: dict[str, str] = {}
    sim.start(_served(sim.serve(n, v, segs[3], got), got))
    sim.run(10.0)
    assert got == {"failed": "503: R2 budget"}
    # over the uplink, a blob the row says the bucket holds: no link, the floor instead
    own = next(k for k in range(len(sim.lib.items)) if k % p.nodes == 2)
    blob = sim.lib.items[own].rungs[0].segments[0][0]
    assert blob in n.r2_rows
    n.meter.budget_bps = sim.lib.items[own].floor_Bps * 1.5
    n.meter.sent(int(n.meter.budget_bps * n.meter.window_s), sim.now)  # at its budget
    got = {}
    sim.start(_served(sim.serve(n, S.ViewerStats(1, own, sim.now), blob, got), got))
    sim.run(20.0)
    assert got == {"via": "node"}
    assert sim.counters.get("class_b:head_redirect", 0) == 0
    assert n.bucket_down_until > 0  # no redirect tried for Retry-After


def test_the_coordinator_sends_a_viewer_the_bucket_cannot_take_to_a_holder_with_floor_room() -> (
    None
):
    """``RoutingCoordinator.floors``: when no node takes the item at its full rate and the
    bucket cannot take it, a holder whose heartbeat reported room at lowest renditions gets the
    viewer (its floor taken off that room), before the node whose Retry-After ends first."""
    p = small(admission_fraction=1.0)
    sim = S.Sim(p, library(p), "no_r2")
    item = 3
    holder = sim.nodes[item % p.nodes]
    assert holder.index in sim.holders[item]
    for n in sim.nodes:
        n.assigned_Bps = n.coord_uplink_Bps  # no room at full rate anywhere
        n.floor_spare_Bps = 0.0
    floor = sim.lib.items[item].rungs[0].bandwidth / 8
    holder.floor_spare_Bps = 2.5 * floor
    assert sim.route(item, {}) is holder
    assert holder.floor_spare_Bps == pytest.approx(1.5 * floor)
    assert sim.route(item, {}) is holder
    other = sim.route(item, {})  # no floor room left: the least refusing, as before
    assert holder.floor_spare_Bps < floor
    assert other is not None


def test_a_node_fetches_ahead_where_the_stream_is_and_a_viewer_joins_the_fetch() -> None:
    """A node serving media it lacks fetches ahead as peerd does (``peerd.core.lookahead``):
    nothing after a stream's first segment, the next ``prefetch_segments`` after its second;
    a fetch ahead costs one bucket GET, its blob is stored when its body is in, and a viewer
    asking meanwhile joins it (no second GET). Into a full store the GETs are still made
    (StoreFull drops the bytes): the run's ``repeat`` fetches."""
    p = small()
    for full in (False, True):
        sim = S.Sim(p, library(p), "peerd")
        n = sim.nodes[0]
        item = next(k for k in range(len(sim.lib.items)) if k % p.nodes not in (0, n.lan_peer))
        segs = [b for b, _, _ in sim.lib.items[item].rungs[0].segments]
        if full:
            n.quota = n.used
        stream = (item, 1)
        sim.fetch_ahead(n, item, segs[0], stream)
        assert sim.node_gets == []
        sim.fetch_ahead(n, item, segs[1], stream)
        assert sim.node_gets == [(0, segs[2]), (0, segs[3])]
        assert set(n.inflight) == {segs[2], segs[3]}
        sim.fetch_ahead(n, item, segs[1], stream)  # under way: skipped
        assert len(sim.node_gets) == 2
        assert sim.counters["prefetch_skipped"] == 2
        v = S.ViewerStats(0, item, 0.0)
        sim.stream_key[0] = 1
        got: dict[str, str] = {}
        sim.start(_served(sim.serve(n, v, segs[2], got), got))
        sim.run(10.0)
        assert len([g for g in sim.node_gets if g[1] == segs[2]]) == 1
        assert n.inflight == {}
        if full:
            assert got == {"failed": "StoreFull"}
            assert sim.counters["prefetch_failed"] == 2
            assert segs[2] not in n.held
        else:
            assert got["via"] == "node"
            assert {segs[2], segs[3]} <= set(n.held)


def _served(proc: S.Proc, got: dict[str, str]) -> S.Proc:
    try:
        yield from proc
    except S.Failed as exc:
        got["failed"] = str(exc.args[0])


def test_a_blob_read_from_the_bucket_is_recorded_there() -> None:
    """peerd's R2 source confirms the copy of a blob it read (``r2_state`` 'present'), which the
    node's inventory tells the coordinator: an item a node resolved stays routable to the
    bucket. A 404 corrects the row (``forget_stale``)."""
    p = small(manifests="placed")
    sim = S.Sim(p, library(p), "peerd")
    n = sim.nodes[2]
    item = next(k for k in range(len(sim.lib.items)) if k % p.nodes not in (2, n.lan_peer))
    blob = next(b for b in sim.lib.items[item].blobs if b >= 0)
    assert blob not in n.r2_rows
    assert sim.fetch_source(n, blob) == "r2"
    assert sim.store(n, blob, "r2")
    assert blob in n.r2_rows
    assert n.changed[blob] is True  # the next heartbeat's inventory: present
    other = next(b for b in sim.lib.items[item].blobs if b >= 0 and b != blob)
    n.r2_rows.add(other)
    sim.bucket_delete(other)
    assert sim.fetch_source(n, other) == ""
    assert other not in n.r2_rows
    assert n.changed[other] is False


def test_a_node_that_lost_its_lan_partner_reads_from_the_bucket() -> None:
    """The run's nodes lost their LAN partner when its mDNS entry expired (their logs' ``peer
    expired``): from then the LAN source is idle and goes after R2 (``source_order``)."""
    p = small()
    for lost, want in ((None, "lan"), ([0.0] * p.nodes, "r2")):
        p.lan_lost_s = lost
        sim = S.Sim(p, library(p), "peerd")
        n = sim.nodes[0]
        assert n.lan_peer is not None
        blob = next(b for b in sim.nodes[n.lan_peer].held if b >= 0 and b not in n.held)
        assert sim.fetch_source(n, blob) == want


def test_a_node_past_its_budget_answers_a_lookup_of_media_it_lacks_with_503_at_once() -> None:
    """``MediaResolver`` does not retry the R2 source's BudgetSpent: a node past its class B
    budget asked for media it lacks answers 503 with the budget's Retry-After (60 s) at once,
    not after the player's 10 s timeout, and makes no request."""
    p = small(manifests="placed", budget_class_b_per_month=10)
    sim = S.Sim(p, library(p), "peerd")
    n = sim.nodes[2]
    item = next(k for k in range(len(sim.lib.items)) if k % p.nodes not in (2, n.lan_peer))
    assert item not in n.known
    n.req_b = 10
    for _ in range(2):
        with pytest.raises(S.Failed) as exc:
            next(sim.resolve_media(n, item))
        assert (exc.value.args[0], exc.value.why, exc.value.retry_after_s) == (
            "503: R2 budget",
            "refused",
            60.0,
        )
    assert sim.class_b == 0


def test_the_coordinator_sends_overflow_to_a_holder_only_if_it_can_spill() -> None:
    """``routing.route`` with every node past its room: a viewer of an item the bucket holds
    goes to a holder in overflow only if its heartbeat said ``spill`` (it redirects the
    segments); a holder past its class B budget (no HEAD, so no redirect) is skipped for the
    bucket itself. The heartbeat's field comes from ``peerd.core.uplink.can_spill``."""
    p = small(manifests="placed", budget_class_b_per_month=100)
    sim = S.Sim(p, library(p), "peerd")
    item = next(k for k in range(len(sim.lib.items)) if sim.in_r2(k))
    holder = sim.nodes[next(iter(sim.holders[item]))]
    for n in sim.nodes:
        n.meter.budget_bps = 1.0  # admission on, every node past its budget: overflow
        n.meter.sent(1_000_000, sim.now)
        sim.heartbeat(n)
    assert holder.admission == "overflow"
    assert holder.spill
    assert holder.class_b_left == 100
    assert sim.route(item, {}) is holder
    holder.req_b = 100
    sim.heartbeat(holder)
    assert not holder.spill
    assert holder.class_b_left == 0
    assert sim.route(item, {}) is None  # straight to the bucket


def test_a_node_that_never_knew_does_not_take_a_blob_out_of_the_bucket() -> None:
    """``routing.learned``: a node's inventory row ``none`` undoes another's ``present`` only
    when that node had said ``present`` (it demoted the item or a 404 corrected it), not when
    it resolved the media from a peer and never knew."""
    p = small()
    sim = S.Sim(p, library(p), "peerd")
    knew, other = sim.nodes[0], sim.nodes[1]
    blob = 10_000
    knew.changed[blob] = True
    other.changed[blob] = False
    sim.heartbeat(knew)
    sim.heartbeat(other)
    assert sim.coord_r2[blob] is True
    knew.changed[blob] = False
    sim.heartbeat(knew)
    assert sim.coord_r2[blob] is False
