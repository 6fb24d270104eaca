"""Past one machine, by simulation: a discrete-event model of the testbed (issue 20, item 7).

    python -m scripts.testbed.sim --calibrate DIR          # DIR: a testbed run (run.sh --out DIR)
    python -m scripts.testbed.sim --nodes 1000 --viewers 100000 --out DIR2

What is *the same code* as the testbed and peerd, imported, not rewritten:

* the workload: :func:`scripts.testbed.workload.make_trace` (Zipf items, Poisson arrivals over a
  compressed day), the player's knobs :class:`scripts.testbed.player.PlayerConfig`;
* tiering: :func:`peerd.core.tiering.plan_tiering` / :func:`plan_eviction` with
  :func:`decayed` / :func:`fold` / :func:`demand_bps`, every ``tiering_interval_s`` per node, with
  the testbed's ``[r2]`` settings (what leaves the bucket, what is promoted, what a disk evicts);
* source order: :func:`peerd.delivery.resolver.source_order` over the node's sources (LAN
  partner, libp2p, R2; an idle peer source goes after R2);
* uplink admission: :class:`peerd.core.uplink.Uplink` per node (its meter always, its admission
  when a budget is set, as ``peerd.http.hls`` calls it: the media's cost, ``spill`` for blobs the
  catalog has in the bucket, the lowest rendition's cost as ``floor_bps``; a refused new stream
  is redirected after a HEAD, else decided again without ``spill``: taken at its floor while the
  floors fit, or answered 503);
* the request budget: :func:`peerd.core.tiering.request_budget` (past class A or B no
  promotion) and :func:`peerd.core.tiering.spendable` by purpose on each node's own R2 requests
  as ``RequestLedger`` counts them: no fetch ahead below a quarter of the class B budget, no
  more eviction HEADs than it allows (eviction itself never stops: blobs confirmed in the
  bucket within the hour need none), past it a bucket-only read is 503 + ``Retry-After`` and
  no redirect is given, and a lookup of media the node lacks is 503 + ``Retry-After`` at once
  (``MediaResolver`` does not retry BudgetSpent); eviction as soon as the store passes its
  high watermark, sparing what was fetched ahead and not asked for yet (``plan_eviction``
  with ``now``, ``heads``, ``spare``);
* the cost and summary arithmetic of ``driver.summarise`` (same keys, same prices).

What is modelled: the coordinator's routing rule (``routing.py``: a node takes a stream with
spare uplink, less ``r2_reserve`` for items in the bucket, not in overflow at its last heartbeat,
no ``Retry-After`` running; holder, else its LAN partner, else any node that can get it (from
the bucket only with class B budget left), else a holder in overflow whose heartbeat said
``spill`` (:func:`peerd.core.uplink.can_spill` on its ledger), else the bucket; when the
bucket cannot take the item a holder or LAN partner with ``floor_spare_bps`` for it; ``no_r2``
never the bucket), the player's loop
(``player.py``: start on the lowest rung once ``start_buffer_s`` is buffered, EWMA throughput
ABR, stalls when the buffer empties, pause at ``max_buffer_s``; failover at the same segment on
the lowest rung, back to a refusing node after its ``Retry-After``) as a generator per viewer, and
the network as flows: each segment a node sends is a flow on that node's uplink, shared max-min
fairly (equal shares: one bottleneck per flow) by :mod:`scripts.testbed.fluid`, then waits
what TCP's recovery at the testbed's ``tbf`` adds, drawn from a measured table
(:class:`ShaperExcess`); each request waits the home's RTT and a measured CPU time; a
read-through waits the LAN or the bucket's latency; a bucket GET waits the bucket's latency and
moves at ``r2_flow_Bps``. No sockets, no processes, no clock: 100,000
viewers on 1,000 nodes run in a few minutes on one core.
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import json
import math
import random
import statistics
import sys
import time
from collections.abc import Generator
from dataclasses import asdict, dataclass, field
from dataclasses import replace as dc_replace
from decimal import Decimal
from pathlib import Path
from typing import Any

from peerd.config import R2Settings, UplinkSettings
from peerd.core.lookahead import Lookahead
from peerd.core.manifest import PlayOrder
from peerd.core.tiering import (
    SPARE_STORED_S,
    BlobStat,
    Demote,
    MediaStat,
    Promote,
    Purpose,
    TieringLimits,
    decayed,
    demand_bps,
    fold,
    plan_eviction,
    plan_tiering,
    request_budget,
    spendable,
)
from peerd.core.uplink import Uplink, can_spill
from peerd.delivery.resolver import source_order
from peerd.errors import BudgetSpent
from peerd.replication.tiering import EVICT_PAUSE_S
from scripts.testbed.fluid import Link
from scripts.testbed.player import Failed, PlayerConfig, ViewerStats
from scripts.testbed.workload import make_trace

PRICE_STORAGE_GB_MONTH = 0.015
PRICE_CLASS_A = 4.50 / 1e6
PRICE_CLASS_B = 0.36 / 1e6
PRICE_STREAM_MINUTE = 1.0 / 1000
MONTH_S = 30 * 86400.0
TIMESCALE = 90000

# -- the library ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class SimRung:
    """One rendition of an item: its BANDWIDTH, init segment key and (key, bytes, seconds)."""

    bandwidth: int
    init: int
    segments: tuple[tuple[int, int, float], ...]


@dataclass(frozen=True)
class SimItem:
    """One media item: its rungs (lowest first) and every blob key it names."""

    rungs: tuple[SimRung, ...]
    blobs: frozenset[int]
    size: int
    need_Bps: float
    duration_s: float
    # what peerd's admission takes a stream to cost (hls._Media.rate_Bps: the top
    # AVERAGE-BANDWIDTH), where the coordinator counts ``need_Bps`` (the top BANDWIDTH, a peak)
    rate_Bps: float = 0.0
    # what a stream admitted at its floor costs (hls._Media.floor_Bps: the lowest
    # AVERAGE-BANDWIDTH; 0: unknown, never admitted at its floor)
    floor_Bps: float = 0.0


@dataclass
class Library:
    """Items and the size of every blob (init segments are shared between items, as in
    ``library.py``)."""

    items: list[SimItem]
    sizes: dict[int, int]


def library_from_rungs(rungs: list[dict[str, Any]], items: int, per_item: int) -> Library:
    """Items as ``library.make_library`` cuts them: item ``k`` is segments ``[k n, (k+1) n)``
    of every rung (cycling when the rungs are shorter); ``rungs``: ``{"init": bytes,
    "segments": [[bytes, seconds], ...]}`` per rendition."""
    sizes: dict[int, int] = {}
    for r, rung in enumerate(rungs):
        sizes[-(r + 1)] = int(rung["init"])
    out = []
    for k in range(items):
        sim_rungs = []
        top_avg = 0
        low_avg = 0
        blobs = {-(r + 1) for r in range(len(rungs))}
        for r, rung in enumerate(rungs):
            segs = rung["segments"]
            chunk = []
            peak = 1
            ticks_total = 0
            for j in range(per_item):
                nbytes, secs = segs[(k * per_item + j) % len(segs)]
                key = (k * len(rungs) + r) * per_item + j
                sizes[key] = int(nbytes)
                blobs.add(key)
                chunk.append((key, int(nbytes), float(secs)))
                ticks = int(Decimal(str(secs)) * TIMESCALE)
                ticks_total += ticks
                peak = max(peak, int(nbytes * 8 * TIMESCALE / max(ticks, 1)))
            avg = int(sum(c[1] for c in chunk) * 8 * TIMESCALE / max(ticks_total, 1))
            top_avg = max(top_avg, avg)
            low_avg = min(low_avg, avg) if low_avg else avg
            sim_rungs.append(SimRung(peak, -(r + 1), tuple(chunk)))
        sim_rungs.sort(key=lambda g: g.bandwidth)
        out.append(
            SimItem(
                tuple(sim_rungs),
                frozenset(blobs),
                sum(sizes[b] for b in blobs),
                max(g.bandwidth for g in sim_rungs) / 8,
                sum(s for _, _, s in sim_rungs[0].segments),
                top_avg / 8,
                low_avg / 8,
            )
        )
    return Library(out, sizes)


def read_rungs(media_dir: Path) -> list[dict[str, Any]]:
    """The rungs of a testbed library on disk (``DIR/work/media``): sizes and durations only."""
    out = []
    for playlist in sorted(media_dir.glob("v*.m3u8")):
        if playlist.name.endswith(".tmp.m3u8"):
            continue
        init = 0
        segs: list[list[float]] = []
        secs = 0.0
        for line in playlist.read_text().splitlines():
            if line.startswith("#EXT-X-MAP:"):
                name = line.split('URI="', 1)[1].split('"', 1)[0]
                init = (media_dir / name).stat().st_size
            elif line.startswith("#EXTINF:"):
                secs = float(line[8:].split(",", 1)[0])
            elif line and not line.startswith("#"):
                segs.append([(media_dir / line).stat().st_size, secs])
        out.append({"name": playlist.stem, "init": init, "segments": segs})
    return out


# -- the shaped uplink ---------------------------------------------------------------------------

EXCESS_TABLE = Path(__file__).with_name("tbf_excess.json")
MIN_CELL = 30  # transfers a cell of the table needs to be drawn from


@dataclass(frozen=True)
class ShaperExcess:
    """What TCP's loss recovery at the testbed's ``tbf`` adds to a transfer, past its equal
    share of the link, as measured by ``scripts/bench/tbf_goodput.py`` (``tbf_excess.json``:
    quantiles of the excess per rate, size class and others in flight when it started)."""

    cells: dict[str, list[float]]
    quantiles: list[float]
    sizes: dict[str, int]
    rows: list[int]
    rates: list[float]

    @classmethod
    def load(cls, path: Path = EXCESS_TABLE) -> ShaperExcess:
        """The table the bench wrote."""
        t = json.loads(path.read_text())
        # a rate's own cell where it holds enough transfers for its tail, else every rate's
        cells = {k: list(v["q"]) for k, v in t["cells"].items() if v["n"] >= MIN_CELL}
        rates = sorted({float(k.split("/", 1)[0]) for k in cells if not k.startswith("*")})
        return cls(cells, list(t["quantiles"]), dict(t["sizes"]), list(t["others_rows"]), rates)

    def draw(self, mbit: float, size: float, others: int, u: float) -> float:
        """The excess (seconds) at quantile ``u`` for a transfer of ``size`` bytes starting
        with ``others`` in flight on a ``mbit`` Mbit/s link: the nearest rate and size class
        measured, its others row (a row with too few transfers: the rates pooled, then the
        row below)."""
        klass = min(self.sizes, key=lambda k: abs(self.sizes[k] - size))
        rate = min(self.rates, key=lambda r: abs(r - mbit))
        rows = [r for r in self.rows if r <= others][::-1]
        q: list[float] | None = None
        for row in rows:
            q = self.cells.get(f"{rate:g}/{klass}/{row}") or self.cells.get(f"*/{klass}/{row}")
            if q:
                break
        if not q:
            return 0.0
        qs = self.quantiles
        i = min(len(qs) - 2, max(0, next((j for j, x in enumerate(qs) if x > u), len(qs)) - 1))
        span = qs[i + 1] - qs[i]
        f = (u - qs[i]) / span if span > 0 else 0.0
        return q[i] + (q[i + 1] - q[i]) * min(1.0, max(0.0, f))


# -- the scenario --------------------------------------------------------------------------------


@dataclass
class SimParams:
    """Everything the model needs. Defaults: the testbed's (``driver.py``, ``routing.py``,
    ``netns.py``, the ``[r2]`` section it writes) and what the quick run measured."""

    nodes: int
    uplinks_mbit: list[float]
    rtts_ms: list[float]
    lan_pairs: list[tuple[int, int]]
    items: int
    segments_per_item: int
    duration_s: float
    mean_per_s: float
    peak_ratio: float
    zipf_s: float = 0.9
    seed: int = 20
    r2_latency_s: float = 0.03
    quota_factor: float = 1.6
    tiering_interval_s: float = 5.0
    policies: list[str] = field(default_factory=lambda: ["peerd"])
    # routing.py
    admit_fraction: float = 0.85
    heartbeat_s: float = 2.0
    # The driver seeds the nodes' catalogs (r2_since) one after the other, then starts them all:
    # node i's catalog is seeded (N - i) * seed_s_per_node before the first viewer (the quick
    # run's log: 11 s for 4 nodes; the full run's: 69 s for 8).
    seed_s_per_node: float = 2.75
    # Or measured per node (what --calibrate reads from a run's catalogs and logs): how long
    # before the first viewer each node's catalog was seeded
    seed_ages_s: list[float] | None = None
    # and how long before it each daemon was ready (its first tiering round comes one interval
    # after that); None: a random phase
    ready_ages_s: list[float] | None = None
    # And when each node's LAN directory lost its partner, seconds after the first viewer (the
    # run's peerd expired an mDNS entry ``[mdns] peer_ttl_s`` after its one announcement):
    # from then its LAN source is idle (after R2 in the source order) and tiering counts no
    # copy of the partner's; None: never
    lan_lost_s: list[float] | None = None
    any_sample: int = 64  # the "any node" tier looks at this many random nodes (all when fewer)
    # [r2] as driver.py writes it
    min_residence_s: float = 30.0
    access_half_life_s: float = 60.0
    cold_bytes_per_s: float = 2000.0
    uplink_headroom: float = 0.6
    r2_budget_bytes: int = 10 * 1024**3
    # [r2] budget_class_a/b_per_month: a month's requests over the month's days, as the driver
    # writes them (a run is one compressed day); peerd's defaults when the scenario has none
    budget_class_a_per_month: int = R2Settings().budget_class_a_per_month
    budget_class_b_per_month: int = R2Settings().budget_class_b_per_month
    evict_high: float = 0.95
    evict_low: float = 0.85
    # [uplink] budget as a fraction of each node's uplink (0: off; the testbed's ``--node-set
    # 'uplink.budget_mbps={uplink_mbit}'`` is 1.0) and what a stream is assumed to cost before
    # one is measured (peerd's default ``[uplink] stream_mbps``)
    admission_fraction: float = 0.0
    admission_stream_mbit: float = UplinkSettings().stream_mbps
    admission_window_s: float = UplinkSettings().window_s
    # The testbed's --manifests: "all" (every catalog holds every manifest, its blobs marked in
    # R2) or "placed" (only its own items'; media it resolves are recorded not in R2)
    manifests: str = "all"
    # The testbed's --route: "holders", or "any" (the last tier is any node even when the
    # coordinator believes the bucket lacks the item: nodes resolve unknown media)
    route: str = "holders"
    # routing.py: an item a viewer could not get from the bucket is not sent there for this long
    r2_retry_s: float = 20.0
    # routing.py: an item the bucket holds is sent to a node only if this much of its uplink
    # stays free besides
    r2_reserve: float = 0.15
    # [uplink] retry_after_s: what a node's 503 tells the player
    retry_after_s: float = UplinkSettings().retry_after_s
    # [r2] min_copies: an item leaves the bucket only when this node's copy and the full copies
    # its peers say they hold reach it (peerd's default); a node learns of its LAN partner's
    # only: the testbed's nodes run no libp2p
    min_copies: int = R2Settings().min_copies
    # A request the uplink turned away counts as demand for tiering (peerd.http.hls since
    # 77754bb: media wanted past the uplink reach the bucket)
    refused_access: bool = True
    # Objects the driver put in the bucket (no SHA-256 checksum) fail a node's check: peerd
    # before 27d9b58 (its check then read no body), see Sim
    seeded_unverified: bool = False
    # A blob the bucket was seen to hold within CONFIRM_FRESH_S is evicted without a HEAD (peerd
    # since ddf77c4); False: a HEAD before every eviction, as the nodes of runs before it did
    head_free_eviction: bool = True
    # The coordinator took every inventory's latest r2_state as the bucket's (routing.py before
    # RoutingCoordinator.learned): a node that resolved media from a peer took it out
    coord_latest_wins: bool = False
    # Latencies: the bucket's is the proxy's r2_latency_s plus moto's answer (the quick run's
    # bucket-routed startups: three GETs in 0.14 s, CPU time included).
    r2_server_s: float = 0.005
    r2_flow_Bps: float = 50e6  # a GET's body on loopback
    lan_request_s: float = 0.004  # a signed LAN HTTP fetch
    # CPU time per request, measured: peerd's for a 360p segment with an uplink budget set
    # (scripts/bench/serve_bench.py on the testbed's rendition, 4 connections: 0.45 ms; a
    # playlist 0.03 ms), the player's for a GET and the hash of its body
    # (scripts/bench/tbf_goodput.py --player-cpu: 0.18-0.40 ms). At the testbed's ~60 GETs a
    # second that is a few percent of one core: no contention is modelled.
    node_request_s: float = 0.00045
    client_request_s: float = 0.0003
    prefetch_segments: int = 2  # [http] prefetch_segments
    max_prefetches: int = 4  # Resolver.max_prefetches
    # What TCP's recovery at the tbf adds to each transfer past its equal share, drawn from
    # the bench's measured table (:class:`ShaperExcess`; a median goodput per batch was no one
    # figure: 0.31-0.96 of the rate); False: the ideal shared link only
    shaper_excess: bool = True
    playlist_bytes: int = 400
    player: PlayerConfig = field(default_factory=PlayerConfig)

    @property
    def r2_request_s(self) -> float:
        """A bucket request's latency, before its body."""
        return self.r2_latency_s + self.r2_server_s


def params_from_scenario(sc: dict[str, Any]) -> SimParams:
    """The testbed's ``summary.json`` ``scenario`` object as model parameters (its
    ``node_set`` too: ``uplink.budget_mbps`` of ``{uplink_mbit}`` turns admission on at each
    node's uplink, a number at that many Mbit/s for every node)."""
    keys = {f for f in SimParams.__dataclass_fields__}
    p = SimParams(
        **{k: v for k, v in sc.items() if k in keys and k != "lan_pairs"},
        lan_pairs=[(int(a), int(b)) for a, b in sc.get("lan_pairs", [])],
    )
    up = sc.get("node_set", {}).get("uplink", {})
    budget = up.get("budget_mbps")
    if budget == "{uplink_mbit}":
        p.admission_fraction = 1.0
    elif budget:
        p.admission_fraction = float(budget) / (sum(p.uplinks_mbit) / len(p.uplinks_mbit))
    if "stream_mbps" in up:
        p.admission_stream_mbit = float(up["stream_mbps"])
    if "window_s" in up:
        p.admission_window_s = float(up["window_s"])
    if "r2_budget_per_month" in sc:
        a, b = sc["r2_budget_per_month"]
        days = sc.get("days_per_month", 30)
        p.budget_class_a_per_month = math.ceil(a / days)
        p.budget_class_b_per_month = math.ceil(b / days)
    r2 = sc.get("node_set", {}).get("r2", {})
    if "min_copies" in r2:
        p.min_copies = int(r2["min_copies"])
    return p


def scaled(nodes: int, viewers: int, duration_s: float = 240.0) -> SimParams:
    """The testbed's full scenario (``driver.full()``, with its defaults: routing, catalogs,
    the nodes' extra config) grown to ``nodes`` nodes and about ``viewers`` viewers: the same
    uplink and RTT mix, a quarter of the homes in LAN pairs, 7.5 items per node, the same
    Zipf exponent and peak-to-mean day. Homes have their own CPUs, and their bucket holds what
    nodes put there."""
    from scripts.testbed.driver import full

    ups = [10, 6, 8, 12, 5, 9, 7, 11]
    rtts = [20, 28, 36, 44, 52, 60, 70, 80]
    pairs = [(k, k + 1) for k in range(0, nodes - 1, 8)]
    pairs += [(k + 2, k + 3) for k in range(0, nodes - 3, 8)]
    sc = asdict(full()) | {
        "nodes": nodes,
        "uplinks_mbit": [ups[i % 8] for i in range(nodes)],
        "rtts_ms": [rtts[i % 8] for i in range(nodes)],
        "lan_pairs": sorted(pairs),
        "items": max(40, int(7.5 * nodes)),
        "duration_s": duration_s,
        "mean_per_s": viewers / duration_s,
    }
    p = params_from_scenario(sc)
    p.seed_s_per_node = 0.0
    p.seeded_unverified = False  # a real bucket's objects are the nodes' own (checksummed)
    return p


# -- the model -----------------------------------------------------------------------------------


@dataclass
class PeerSource:
    """A resolver source as :func:`source_order` sees it (``idle()``: no peer to ask)."""

    name: str
    has_peer: bool

    def idle(self) -> bool:
        """No peer known."""
        return not self.has_peer


@dataclass
class BucketSource:
    """The bucket: never idle."""

    name: str = "r2"


@dataclass
class Node:
    """One home node."""

    index: int
    uplink_Bps: float
    rtt_s: float
    lan_peer: int | None
    quota: int
    link: Link
    meter: Uplink
    held: dict[int, float] = field(default_factory=dict)  # blob -> last access
    score: dict[int, tuple[float, float]] = field(default_factory=dict)  # blob -> (score, at)
    used: int = 0
    have: dict[int, int] = field(default_factory=dict)  # item -> blobs held
    assigned_Bps: float = 0.0
    streams: int = 0
    served: dict[str, float] = field(default_factory=dict)
    fetched: dict[str, float] = field(default_factory=dict)
    # hls._Media.remote: items that had a miss here (their requests fetch ahead), the
    # lookahead's streams, prefetches under way (blob -> when its body is in, its source)
    remote: set[int] = field(default_factory=set)
    lookahead: Lookahead = field(default_factory=lambda: Lookahead(0))
    inflight: dict[int, tuple[float, str]] = field(default_factory=dict)
    prefetching: int = 0
    # Its catalog: media rows (manifests), those it believes in the bucket (-> r2_since), and
    # blob rows whose r2_state is 'present' (what it may evict, or redirect a viewer to)
    known: set[int] = field(default_factory=set)
    media_r2: dict[int, float] = field(default_factory=dict)
    r2_rows: set[int] = field(default_factory=set)
    # Blob rows changed since its last heartbeat (the coordinator reads them from its
    # inventory then): blob -> r2_state is 'present'
    changed: dict[int, bool] = field(default_factory=dict)
    said_r2: dict[int, bool] = field(default_factory=dict)  # what its inventory last reported
    egress: Uplink = field(default_factory=lambda: Uplink(window_s=30.0))  # the API's ~30 s
    reported_Bps: float = 0.0  # egress as of its last heartbeat
    # its own R2 requests (R2Client.on_request: class A, class B), against its [r2] budgets
    # (RequestLedger: counted as each is sent)
    req_a: int = 0
    req_b: int = 0
    # blob -> when the bucket was last seen to hold it (r2_checked_at: read from it, uploaded,
    # HEAD-confirmed), and blobs stored and not asked for since (-> when stored; eviction
    # spares them for SPARE_STORED_S)
    checked: dict[int, float] = field(default_factory=dict)
    unasked: dict[int, float] = field(default_factory=dict)
    # TieringService: an eviction due since the store passed its high watermark, and when the
    # next such one may run (EVICT_PAUSE_S after the last)
    evict_due: bool = False
    evict_ready: float = 0.0
    # replication.source.BucketLink.down_until: no redirect is tried before (it gave none)
    bucket_down_until: float = 0.0
    down: bool = False  # a viewer reported it failed since its last heartbeat (routing.alive)
    # routing.NodeView: its uplink (the budget once a heartbeat reported one), the admission
    # state of its last heartbeat, until when a viewer's 503 said to stay away
    coord_uplink_Bps: float = 0.0
    admission: str = "off"
    refusing_until: float = 0.0
    floor_spare_Bps: float = 0.0  # room at lowest renditions (heartbeat), less floors sent since
    # its heartbeat's admission.spill (peerd.core.uplink.can_spill) and r2_class_b_left
    spill: bool = True
    class_b_left: int | None = None


Step = tuple[str, Any]
Proc = Generator[Step, None, None]


class Sim:
    """One policy on one trace (see the module doc)."""

    def __init__(self, p: SimParams, lib: Library, policy: str) -> None:
        self.p = p
        self.lib = lib
        self.policy = policy
        self.now = 0.0
        self.events: list[tuple[float, int, int, Any]] = []
        self.seq = 0
        self.waiting: dict[int, Proc] = {}
        self.rng = random.Random(p.seed + 1)
        self.excess = ShaperExcess.load() if p.shaper_excess else None
        self.net_rng = random.Random(p.seed + 2)  # the transfers' draws, apart from the rest
        self.extra: dict[int, float] = {}  # flow -> its excess, waited after its bytes
        lib_bytes = sum(i.size for i in lib.items)
        quota = int(lib_bytes / p.nodes * p.quota_factor)
        peers: dict[int, int] = {}
        for a, b in p.lan_pairs:
            peers[a], peers[b] = b, a
        self.nodes = []
        for i in range(p.nodes):
            up = p.uplinks_mbit[i] * 1e6 / 8
            meter = Uplink(
                budget_bps=up * p.admission_fraction,
                stream_bps=p.admission_stream_mbit * 1e6 / 8,
            )
            link = Link(up)
            self.nodes.append(Node(i, up, p.rtts_ms[i] / 1000, peers.get(i), quota, link, meter))
            self.nodes[-1].coord_uplink_Bps = up
        for n in self.nodes:
            n.lookahead = Lookahead(p.prefetch_segments)
        # PlayOrder.of each item's manifest: a rendition's init, then its segments in order
        self.orders: dict[int, PlayOrder] = {}
        for k, it in enumerate(lib.items):
            at: dict[str, tuple[tuple[str, ...], int]] = {}
            for g in it.rungs:
                cids = tuple(str(b) for b, _, _ in g.segments)
                at.setdefault(str(g.init), (cids, 0))
                for j, c in enumerate(cids):
                    at.setdefault(c, (cids, j + 1))
            self.orders[k] = PlayOrder(at)
        self.holders: dict[int, set[int]] = {k: set() for k in range(len(lib.items))}
        self.blob_items: dict[int, list[int]] = {}
        for k, it in enumerate(lib.items):
            for b in it.blobs:
                self.blob_items.setdefault(b, []).append(k)
        uses_r2 = policy not in ("no_r2",)
        self.r2_items: dict[int, float | None] = (
            {k: None for k in range(len(lib.items))} if uses_r2 else {}
        )  # item -> r2_since
        # Blobs in the bucket (an item is there when its manifest is: ``r2_items``).
        self.bucket: set[int] = {b for k in self.r2_items for b in lib.items[k].blobs}
        self.bucket_size = sum(lib.sizes[b] for b in self.bucket)
        self.nodes_use_r2 = policy in ("peerd", "lru")
        self.class_a = 0
        self.class_b = 0
        self.bucket_before = self.bucket_bytes()
        self.stored_integral = 0.0
        self.stored_at = 0.0
        self.stored_now = self.bucket_before
        self.viewers: list[ViewerStats] = []
        self.totals: dict[str, int] = {}
        self.series: list[dict[str, Any]] = []
        self.active = 0
        self.stall_count = 0
        self.streams = 0  # viewers attached to nodes, all nodes
        self.routes: list[tuple[float, int, str, int | None]] = []
        self.flow_owner: dict[int, int] = {}
        self.admission_log: list[tuple[int, float, float]] = []  # (node, t, projected rate)
        # Every blob GET a node made at the bucket, in order (node, blob), the blobs viewers got
        # through each node, and the counters the testbed's nodes keep (relay cuts, prefetches):
        # the driver's ``fetch_waste`` and ``node_counters`` made of the same events
        self.node_gets: list[tuple[int, int]] = []
        self.asked: dict[int, set[int]] = {}
        self.counters: dict[str, int] = {}
        self.next_flow = 0
        # viewer -> the token of its route (routing mints one per route)
        self.stream_key: dict[int, int] = {}
        self.tokens = 0
        # Blobs in the bucket written by the driver (boto3, no SHA-256 checksum), not by a node.
        # Before peerd 27d9b58 a node's check never confirmed one: in a quick run of then
        # (/tmp/tbq2), 67 of the 69 blobs whose eviction was refused though no demotion had
        # deleted them met an object on the push (412), failed the check again and were
        # deleted and put a second time (16 of the 18 a demotion had deleted were put once).
        # Since, the check reads and hashes such an object (a HEAD and a GET).
        self.seeded: set[int] = set(self.bucket) if p.seeded_unverified else set()
        self.written: set[int] = set()  # objects a node put (they carry a SHA-256 checksum)
        self.coord_r2: dict[int, bool] = {}  # the coordinator's r2_state (see heartbeat)
        self.r2_missing: dict[int, float] = {}  # item -> when a viewer failed at the bucket
        # (node, item) -> when a viewer found the node could not get the item it lacks
        self.node_missing: dict[tuple[int, int], float] = {}
        self.place = place = self.placement()
        for node, items in place.items():
            n = self.nodes[node]
            for k in items:
                for b in lib.items[k].blobs:
                    self.put(n, b, 0.0)
            n.known = set(range(len(lib.items))) if p.manifests == "all" else set(items)
            if self.nodes_use_r2:
                since = (
                    -p.seed_ages_s[node]
                    if p.seed_ages_s is not None
                    else -(p.nodes - node) * p.seed_s_per_node
                )
                n.media_r2 = {k: since for k in n.known}
                n.r2_rows = {b for k in n.known for b in lib.items[k].blobs}
                # record_media(in_r2=True): each row confirmed at the seeding
                n.checked = dict.fromkeys(n.r2_rows, since)
                # the coordinator's first inventory sync (routing._sync from 0) reads them
                n.said_r2 = dict.fromkeys(n.r2_rows, True)
                self.coord_r2.update(n.said_r2)

    # -- bookkeeping ---------------------------------------------------------------------------

    def placement(self) -> dict[int, list[int]]:
        """Item ``k`` on node ``k mod N`` (``driver.placement``)."""
        out: dict[int, list[int]] = {i: [] for i in range(self.p.nodes)}
        for k in range(len(self.lib.items)):
            out[k % self.p.nodes].append(k)
        return out

    def bucket_bytes(self) -> int:
        """Bytes in the bucket: every blob some item in it names."""
        return self.bucket_size

    def bucket_put(self, b: int) -> None:
        """A PUT of blob ``b``."""
        if b not in self.bucket:
            self.bucket.add(b)
            self.bucket_size += self.lib.sizes[b]

    def bucket_delete(self, b: int) -> None:
        """A DELETE of blob ``b``."""
        if b in self.bucket:
            self.bucket.discard(b)
            self.bucket_size -= self.lib.sizes[b]

    def _stored(self) -> None:
        self.stored_integral += self.stored_now * (self.now - self.stored_at)
        self.stored_at = self.now
        self.stored_now = self.bucket_bytes()

    def put(self, n: Node, blob: int, at: float) -> None:
        """``n`` now holds ``blob``."""
        if blob in n.held:
            return
        n.held[blob] = at
        n.used += self.lib.sizes[blob]
        for k in self.blob_items[blob]:
            c = n.have.get(k, 0) + 1
            n.have[k] = c
            if c == len(self.lib.items[k].blobs):
                self.holders[k].add(n.index)

    def drop(self, n: Node, blob: int) -> None:
        """``n`` evicted ``blob``."""
        if n.held.pop(blob, None) is None:
            return
        n.used -= self.lib.sizes[blob]
        for k in self.blob_items[blob]:
            n.have[k] -= 1
            self.holders[k].discard(n.index)

    def op_b(self, what: str, n: Node | None = None) -> None:
        """A class B request at the bucket, by what made it (``node_counters``); ``n``: the
        node that made it (its ledger counts it at once), None: a viewer."""
        self.class_b += 1
        self.count(f"class_b:{what}")
        if n is not None:
            n.req_b += 1

    def allows(self, n: Node, purpose: Purpose) -> bool:
        """``RequestLedger.allows``: whether one more class B request for ``purpose`` fits
        ``n``'s budget (:func:`spendable`); a refusal is counted."""
        left = self.p.budget_class_b_per_month - n.req_b
        if spendable(left, self.p.budget_class_b_per_month, purpose) >= 1:
            return True
        self.count(f"budget_refused:{purpose}")
        return False

    def count(self, what: str) -> None:
        """One more of a node-side event (``summary()['node_counters']``)."""
        self.counters[what] = self.counters.get(what, 0) + 1

    def row_changed(self, n: Node, blob: int) -> None:
        """A blob row of ``n`` changed: its inventory reports its r2_state at the next
        heartbeat."""
        n.changed[blob] = blob in n.r2_rows

    def in_r2(self, item: int) -> bool:
        """``routing.in_r2``: every blob of the item ``present`` as the nodes' inventories last
        said (and no viewer failed at the bucket for it in the last ``r2_retry_s``)."""
        if self.policy == "no_r2":
            return False
        if self.now - self.r2_missing.get(item, -1e9) < self.p.r2_retry_s:
            return False
        get = self.coord_r2.get
        return all(get(b, True) for b in self.lib.items[item].blobs)

    # -- the event loop ------------------------------------------------------------------------

    def at(self, t: float, kind: int, what: Any) -> None:
        """Schedule an event."""
        self.seq += 1
        heapq.heappush(self.events, (t, self.seq, kind, what))

    def start(self, proc: Proc) -> None:
        """Run a process until its first step."""
        self.step(proc)

    def step(self, proc: Proc) -> None:
        """Resume ``proc`` and schedule what it asks for."""
        try:
            kind, arg = next(proc)
        except StopIteration:
            return
        if kind == "wait":
            self.at(self.now + max(0.0, arg), 0, proc)
        else:  # ("flow", (node, bytes))
            node, size = arg
            link = self.nodes[node].link
            if size <= 0 or math.isinf(link.capacity):
                self.at(self.now, 0, proc)
                return
            fid = self.next_flow
            self.next_flow += 1
            self.waiting[fid] = proc
            if self.excess is not None:
                mbit = link.capacity * 8 / 1e6
                u = self.net_rng.random()
                self.extra[fid] = self.excess.draw(mbit, size, len(link.flows), u)
            link.add(fid, size, self.now)
            self.at(link.next_done(), 1, (node, link.version))

    def run(self, until: float) -> None:
        """Process events until none is left (or ``until``)."""
        while self.events:
            t, _, kind, what = heapq.heappop(self.events)
            if t > until:
                break
            self.now = t
            if kind == 0:
                self.step(what)
            elif kind == 1:
                node, version = what
                link = self.nodes[node].link
                if version != link.version:
                    continue
                for fid in link.pop_done(t):
                    extra = self.extra.pop(fid, 0.0)
                    if extra > 0:
                        self.at(t + extra, 0, self.waiting.pop(fid))
                    else:
                        self.step(self.waiting.pop(fid))
                if link.flows:
                    self.at(link.next_done(), 1, (node, link.version))
            else:
                what()

    # -- the coordinator (routing.py) ----------------------------------------------------------

    def spare(self, n: Node) -> float:
        """``routing.spare``: uplink the coordinator may still give away."""
        return n.coord_uplink_Bps * self.p.admit_fraction - max(n.reported_Bps, n.assigned_Bps)

    def takes(self, n: Node, need: float, in_r2: bool) -> bool:
        """``routing.takes``: room in the coordinator's count (less ``r2_reserve`` of the uplink
        for an item the bucket holds), not in overflow at its last heartbeat, no 503 whose
        Retry-After still runs."""
        reserve = self.p.r2_reserve * n.coord_uplink_Bps if in_r2 else 0.0
        return (
            self.spare(n) >= need + reserve
            and n.admission != "overflow"
            and n.refusing_until <= self.now
        )

    def route(self, item: int, avoid: dict[int, tuple[float, str]]) -> Node | None:
        """A node for a viewer of ``item``, or None for the bucket (``routing.route``);
        ``avoid``: what the viewer met (node or -1, the bucket -> until when, why)."""
        now = self.now
        shunned: set[int] = set()
        for i, (until, why) in avoid.items():
            if until <= now:
                continue
            if i == -1:
                self.r2_missing[item] = max(self.r2_missing.get(item, 0.0), now)
                continue
            shunned.add(i)
            if why == "down":
                self.nodes[i].down = True  # not alive until its next heartbeat
            elif why == "refused":
                self.nodes[i].refusing_until = max(self.nodes[i].refusing_until, until)
            elif why == "missing":
                self.node_missing[(i, item)] = now
        if self.policy == "all_r2":
            return None
        need = self.lib.items[item].need_Bps
        r2_ok = self.in_r2(item)
        held = self.holders[item]
        retry = self.p.r2_retry_s

        def live(n: Node) -> bool:
            return (
                not n.down
                and n.index not in shunned
                and (n.index in held or now - self.node_missing.get((n.index, item), -1e9) > retry)
            )

        holders = [self.nodes[i] for i in held if not self.nodes[i].down]
        tiers: list[list[Node]] = [
            [n for n in holders if live(n)],
            [
                self.nodes[j]
                for j in sorted({n.lan_peer for n in holders if n.lan_peer is not None})
                if live(self.nodes[j])
            ],
        ]
        if r2_ok or self.p.route == "any":
            # routing.reaches: the bucket (with class B budget left for the read), or a LAN
            # partner holding it (no libp2p here)
            pool = (
                self.nodes
                if self.p.nodes <= self.p.any_sample
                else self.rng.sample(self.nodes, self.p.any_sample)
            )
            tiers.append(
                [
                    n
                    for n in pool
                    if live(n)
                    and (
                        (r2_ok and n.class_b_left != 0)
                        or (n.lan_peer is not None and n.lan_peer in held)
                    )
                ]
            )
        for tier in tiers:
            fit = [n for n in tier if self.takes(n, need, r2_ok)]
            if fit:
                return max(fit, key=self.spare)
        if r2_ok:
            redirecting = [
                n
                for n in tiers[0]
                if n.admission == "overflow" and n.spill and n.refusing_until <= now
            ]
            if redirecting:
                return max(redirecting, key=self.spare)
            return None
        # The bucket cannot take it: a holder or its LAN partner that takes it at its lowest
        # rendition (not one that must pull it through another uplink)
        floor = self.lib.items[item].rungs[0].bandwidth / 8
        for tier in tiers[:2]:
            fit = [n for n in tier if n.refusing_until <= now and n.floor_spare_Bps >= floor]
            if fit:
                best = max(fit, key=lambda n: n.floor_spare_Bps)
                best.floor_spare_Bps -= floor
                return best
        for tier in tiers:
            if tier:
                return min(tier, key=lambda n: (n.refusing_until, -self.spare(n)))
        fallback = [n for n in holders if n.index not in shunned] or holders
        if fallback:
            return min(fallback, key=lambda n: (n.refusing_until, -self.spare(n)))
        return None

    # -- a node serving a blob -----------------------------------------------------------------

    def serve(self, n: Node, v: ViewerStats, blob: int, src: dict[str, str]) -> Proc:
        """``n`` sends ``blob`` to ``v``: admission, resolution (source order), the flow."""
        size = self.lib.sizes[blob]
        # peerd's stream key is (media id, client address, token): the testbed's players share
        # one address, and the coordinator mints one token per route
        key = (v.item, self.stream_key.get(v.viewer, 0))
        spill = self.spills(n, blob)
        if n.meter.enabled and not self.admit(n, key, v.item, spill):
            # hls.demand, on a redirect or a 503: peerd records it where its catalog has the
            # blob's row (held, or of media it knows)
            demand = self.p.refused_access and (
                blob in n.held or any(k in n.known for k in self.blob_items[blob])
            )
            admitted = False
            if spill:
                # BucketLink: a HEAD first (the node's own class B request, if its budget
                # allows one); a 404 corrects its catalog, else a 302 the player follows
                if self.allows(n, "viewer"):
                    yield "wait", self.p.r2_request_s
                    self.op_b("head_redirect", n)
                    if blob in self.bucket:
                        if demand:
                            self.record(n, blob, size)
                        src["via"] = "r2_redirect"
                        yield "wait", self.p.r2_request_s
                        self.op_b("viewer_redirect")
                        yield "wait", size / self.p.r2_flow_Bps
                        return
                    n.r2_rows.discard(blob)
                    self.row_changed(n, blob)
                else:
                    # no link, the row still 'present': no redirect tried for a while
                    n.bucket_down_until = self.now + self.p.retry_after_s
                # decided again as a stream only the node can serve (at its floor, if any)
                admitted = self.admit(n, key, v.item, False)
            if not admitted:
                if demand:
                    self.record(n, blob, size)
                raise Failed("503", "refused", self.p.retry_after_s)
        if n.meter.enabled:
            self.admission_log.append((n.index, self.now, n.meter.rate(self.now)))
        yield "wait", self.p.node_request_s
        origin = "local"
        item = v.item
        if blob not in n.held:
            done = n.inflight.get(blob)
            if done is not None:
                # Resolver single flight: the viewer joins the fetch ahead under way
                yield "wait", done[0] - self.now
                origin = done[1]
                stored = blob in n.held
            else:
                origin = self.fetch_source(n, blob)
                if origin == "":
                    raise Failed("404", "missing")
                if origin == "budget":
                    # Resolver: BudgetSpent once the other sources had their turn: 503
                    raise Failed("503: R2 budget", "refused", float(BudgetSpent.retry_after_s))
                yield "wait", self.p.lan_request_s if origin == "lan" else self.p.r2_request_s
                stored = self.store(n, blob, origin)
            # hls._send: the fetch opened, the media is remote and the next segments are
            # fetched ahead, before the relay that StoreFull may cut
            n.remote.add(item)
            self.fetch_ahead(n, item, blob, key)
            if not stored:
                self.count("relay_cut")
                # a relay from the bucket is cut before its last bytes; a LAN fetch answers 507
                raise Failed("StoreFull", "down" if self.nodes_use_r2 else "missing")
        elif item in n.remote:
            self.fetch_ahead(n, item, blob, key)
        self.access(n, blob, size)
        yield "flow", (n.index, size)
        n.meter.sent(size, self.now)
        n.egress.sent(size, self.now)
        n.served[origin] = n.served.get(origin, 0.0) + size
        src["via"] = "node"

    def spills(self, n: Node, blob: int) -> bool:
        """``hls._admit``'s ``spill``: the node's row says the bucket holds the blob (and it
        has a bucket), and no redirect failed within its ``Retry-After``."""
        return self.nodes_use_r2 and blob in n.r2_rows and self.now >= n.bucket_down_until

    def admit(self, n: Node, key: tuple[int, int], item: int, spill: bool) -> bool:
        """``Uplink.admit`` as ``peerd.http.hls._admit`` calls it: the media's bit rate, its
        lowest rendition's, and ``spill``."""
        it = self.lib.items[item]
        return n.meter.admit(key, self.now, it.rate_Bps or it.need_Bps, spill, it.floor_Bps)

    def access(self, n: Node, blob: int, size: int) -> None:
        """``n`` sent ``blob``: its last access and decayed score (``rt.access.record``)."""
        n.held[blob] = self.now
        self.record(n, blob, size)

    def record(self, n: Node, blob: int, size: int) -> None:
        """``rt.access.record``: the blob's decayed score (demand, served or turned away); a
        blob asked for is no longer spared by eviction."""
        n.unasked.pop(blob, None)
        sc, at = n.score.get(blob, (0.0, self.now))
        n.score[blob] = (fold(sc, at, size, self.now, self.p.access_half_life_s), self.now)

    def lan(self, n: Node) -> Node | None:
        """The LAN partner ``n``'s directory knows now (:attr:`SimParams.lan_lost_s`)."""
        if n.lan_peer is None:
            return None
        lost = self.p.lan_lost_s
        if lost is not None and self.now >= lost[n.index]:
            return None
        return self.nodes[n.lan_peer]

    def fetch_source(self, n: Node, blob: int) -> str:
        """The first source of :func:`source_order` that has ``blob`` for ``n`` (``lan``,
        ``r2``; its request counted), "budget" when only the bucket could have it and ``n``'s
        class B budget allows no read (``R2Source.offers``: BudgetSpent), or "" when none has
        it."""
        size = self.lib.sizes[blob]
        peer = self.lan(n)
        sources: list[Any] = [
            PeerSource("lan", peer is not None),
            PeerSource("p2p", False),  # the testbed's nodes fetch nothing over libp2p
        ]
        if self.nodes_use_r2:
            sources.append(BucketSource())
        for s in source_order(sources):
            if s.name == "lan" and peer is not None and blob in peer.held:
                peer.served["lan-peer"] = peer.served.get("lan-peer", 0.0) + size
                self.access(peer, blob, size)
                return "lan"
            if s.name == "r2":
                if not self.allows(n, "viewer"):
                    return "budget"
                self.op_b("node_get", n)
                if blob in self.bucket:
                    self.node_gets.append((n.index, blob))
                    return "r2"
                if blob in n.r2_rows:  # replication.source.forget_stale: a 404 corrects it
                    n.r2_rows.discard(blob)
                    self.row_changed(n, blob)
        return ""

    def store(self, n: Node, blob: int, origin: str) -> bool:
        """``n`` stores ``blob`` fetched from ``origin``; False when ``BlobStore._check_room``
        refuses it (StoreFull: the bytes were read, and are dropped)."""
        size = self.lib.sizes[blob]
        if blob in n.held:
            return True
        if n.used + size > n.quota:
            return False
        n.fetched[origin] = n.fetched.get(origin, 0.0) + size
        self.put(n, blob, self.now)
        n.unasked[blob] = self.now
        if origin == "r2":
            # R2Source.report: a verified fetch from the bucket confirms its copy (the row's
            # r2_state becomes 'present', which the inventory tells the coordinator, and its
            # r2_checked_at now)
            n.r2_rows.add(blob)
            n.checked[blob] = self.now
        self.row_changed(n, blob)
        self.grown(n)
        return True

    def grown(self, n: Node) -> None:
        """``BlobStore.on_grow``: past its high watermark the tiering service evicts at once
        (then pauses ``EVICT_PAUSE_S``), not at its next round."""
        if (
            self.policy not in ("peerd", "lru")
            or n.evict_due
            or n.used <= self.p.evict_high * n.quota
        ):
            return
        n.evict_due = True
        self.at(max(self.now, n.evict_ready), 2, lambda: self.evict_now(n))

    def evict_now(self, n: Node) -> None:
        """The tiering service's wake-up between rounds: fold the accesses, evict."""
        n.evict_due = False
        self.evict(n)
        n.evict_ready = self.now + EVICT_PAUSE_S

    def fetch_ahead(self, n: Node, item: int, blob: int, stream: tuple[int, int]) -> None:
        """``HlsRoutes.fetch_ahead``: the segments :class:`peerd.core.lookahead.Lookahead`
        names after ``blob`` for ``stream``, each not held a ``Resolver.prefetch``."""
        if not self.p.prefetch_segments:
            return
        for nxt in n.lookahead.ahead(self.orders[item], str(blob), stream):
            b = int(nxt)
            if b not in n.held:
                self.prefetch(n, b)

    def prefetch(self, n: Node, blob: int) -> None:
        """``Resolver.prefetch``: skipped when the blob is being fetched or
        ``max_prefetches`` fetches run; else a fetch in the background, stored when its body
        has arrived (or failed by StoreFull then)."""
        if (
            blob in n.inflight
            or n.prefetching >= self.p.max_prefetches
            or (self.nodes_use_r2 and not self.allows(n, "optional"))
        ):
            self.count("prefetch_skipped")
            return
        origin = self.fetch_source(n, blob)
        if origin in ("", "budget"):
            return
        self.count("prefetch_started")
        latency = self.p.lan_request_s if origin == "lan" else self.p.r2_request_s
        done = self.now + latency + self.lib.sizes[blob] / self.p.r2_flow_Bps
        n.inflight[blob] = (done, origin)
        n.prefetching += 1
        self.start(self._prefetched(n, blob, origin, done))

    def _prefetched(self, n: Node, blob: int, origin: str, done: float) -> Proc:
        yield "wait", done - self.now
        n.prefetching -= 1
        n.inflight.pop(blob, None)
        if not self.store(n, blob, origin):
            self.count("prefetch_failed")

    def resolve_media(self, n: Node, item: int) -> Generator[Step, None, None]:
        """``n`` is asked for an item its catalog lacks (``--route any``): the manifest from the
        first source of :func:`source_order` that has it, recorded as not in R2."""
        peer = self.lan(n)
        sources: list[Any] = [PeerSource("lan", peer is not None), PeerSource("p2p", False)]
        if self.nodes_use_r2:
            sources.append(BucketSource())
        for s in source_order(sources):
            if s.name == "lan" and peer is not None and item in peer.known:
                yield "wait", self.p.lan_request_s
                break
            if s.name == "r2":
                if not self.allows(n, "viewer"):
                    # MediaResolver: the R2 source's BudgetSpent is not retried, 503 at once
                    raise Failed("503: R2 budget", "refused", float(BudgetSpent.retry_after_s))
                yield "wait", self.p.r2_request_s
                self.op_b("node_manifest", n)
                if item in self.r2_items:
                    break
        else:
            raise Failed("404: no source has the media", "missing")
        n.known.add(item)

    # -- a viewer (player.py) ------------------------------------------------------------------

    def get_blob(self, v: ViewerStats, n: Node | None, blob: int) -> Proc:
        """One GET of a blob from the route (node or bucket); counts its bytes."""
        size = self.lib.sizes[blob]
        yield "wait", self.p.client_request_s
        if n is None:
            yield "wait", self.p.r2_request_s
            self.op_b("viewer_get")
            if blob not in self.bucket:
                raise Failed("404 from the bucket", "missing")
            yield "wait", size / self.p.r2_flow_Bps
            via = "r2"
        else:
            yield "wait", n.rtt_s
            src: dict[str, str] = {}
            yield from self.serve(n, v, blob, src)
            via = src["via"]
            self.asked.setdefault(n.index, set()).add(blob)
        v.bytes_by_source[via] = v.bytes_by_source.get(via, 0) + size
        self.totals[via] = self.totals.get(via, 0) + size

    def open_route(self, v: ViewerStats, avoid: dict[int, tuple[float, str]]) -> Node | None:
        """Ask the coordinator (``routing.route``; a node route counts against the node at
        once)."""
        n = self.route(v.item, avoid)
        self.routes.append((self.now, v.item, "node" if n else "r2", n.index if n else None))
        self.tokens += 1
        self.stream_key[v.viewer] = self.tokens
        if n is not None:
            v.nodes.append(n.index)
            n.assigned_Bps += self.lib.items[v.item].need_Bps
            n.streams += 1
            self.streams += 1
        return n

    def avoid_current(
        self, avoid: dict[int, tuple[float, str]], node: Node | None, exc: Failed
    ) -> None:
        """``player.Player._avoid_current``: what the viewer tells the coordinator next."""
        key = -1 if exc.bucket or node is None else node.index
        wait = self.p.player.avoid_s
        if exc.why == "refused" and exc.retry_after_s is not None:
            wait = exc.retry_after_s
        avoid[key] = (self.now + wait, exc.why)
        if exc.bucket and node is not None:
            avoid[node.index] = (self.now + wait, "redirected")  # it would redirect it again

    def read_start(self, v: ViewerStats, n: Node | None) -> Proc:
        """What the player reads to start: the master and media playlists from a node (which
        resolves an item its catalog lacks first), or the manifest from the bucket."""
        if n is None:
            yield "wait", self.p.client_request_s
            yield "wait", self.p.r2_request_s
            self.op_b("viewer_manifest")
            if v.item not in self.r2_items:
                raise Failed("404: the manifest is not in the bucket", "missing")
            return
        for i in range(1 + len(self.lib.items[v.item].rungs)):
            yield "wait", self.p.client_request_s
            yield "wait", n.rtt_s
            yield "wait", self.p.node_request_s
            if i == 0 and v.item not in n.known:
                yield from self.resolve_media(n, v.item)
            yield "flow", (n.index, self.p.playlist_bytes)

    def release(self, v: ViewerStats, n: Node | None) -> None:
        """``routing.release``."""
        if n is not None:
            n.assigned_Bps = max(0.0, n.assigned_Bps - self.lib.items[v.item].need_Bps)
            n.streams = max(0, n.streams - 1)
            self.streams -= 1

    def viewer(self, v: ViewerStats) -> Proc:
        """``player.Player.run`` as a process."""
        cfg = self.p.player
        item = self.lib.items[v.item]
        t0 = self.now
        buffer = 0.0
        playing = False
        estimate = 0.0
        rung = 0
        inits: set[int] = set()
        # node (or -1, the bucket) -> (until when, why): player.Player.avoid
        avoid: dict[int, tuple[float, str]] = {}
        node: Node | None = None
        opened = False
        started = False
        self.active += 1
        try:
            n_segs = len(item.rungs[0].segments)
            for seq in range(n_segs):
                if playing and buffer > cfg.max_buffer_s:
                    yield "wait", buffer - cfg.max_buffer_s
                    buffer = cfg.max_buffer_s
                t = self.now
                last_progress = self.now
                moved = False
                while True:
                    try:
                        if not opened:
                            avoid = {k: a for k, a in avoid.items() if a[0] > self.now}
                            node = self.open_route(v, dict(avoid))
                            opened = True
                            until, why = avoid.get(-1 if node is None else node.index, (0.0, ""))
                            if until > self.now and node is None:
                                # nothing but the bucket that just failed: not at once again
                                yield "wait", min(until - self.now, 1.0)
                            elif until > self.now and why == "refused":
                                yield "wait", until - self.now  # back when the node said to
                            yield from self.read_start(v, node)
                            started = True
                        # after a failover: the lowest rendition (player._fetch)
                        r = item.rungs[0 if moved else min(rung, len(item.rungs) - 1)]
                        size = 0
                        if r.init not in inits:
                            yield from self.get_blob(v, node, r.init)
                            inits.add(r.init)
                            size += self.lib.sizes[r.init]
                        key, nbytes, secs = r.segments[seq]
                        yield from self.get_blob(v, node, key)
                        size += nbytes
                        break
                    except Failed as exc:
                        if self.now - last_progress > cfg.give_up_s:
                            raise
                        if opened:
                            self.release(v, node)
                        if opened:
                            self.avoid_current(avoid, node, exc)
                        v.reroutes += 1
                        opened = False
                        node = None
                        inits.clear()
                        # a failed first open is retried before the first segment (_open_first)
                        moved = started
                        yield "wait", 0.2
                dt = max(self.now - t, 1e-3)
                if moved:
                    rung, estimate = 0, 0.0  # a new source: measured anew, from the bottom
                if playing:
                    if dt > buffer:
                        v.stall_s += dt - buffer
                        v.stalls += 1
                        self.stall_count += 1
                        v.stall_times.append((self.now, dt - buffer))
                        v.played_s += buffer
                        buffer = 0.0
                    else:
                        buffer -= dt
                        v.played_s += dt
                buffer += secs
                bps = size * 8 / dt
                if not moved:  # the time spent failing over is not the new source's throughput
                    estimate = bps if estimate == 0 else 0.5 * estimate + 0.5 * bps
                rung = max(
                    (
                        i
                        for i, g in enumerate(item.rungs)
                        if g.bandwidth <= estimate * cfg.abr_safety
                    ),
                    default=0,
                )
                if not playing and buffer >= cfg.start_buffer_s:
                    playing = True
                    v.startup_s = self.now - t0
            if not playing:
                v.startup_s = self.now - t0
            yield "wait", buffer
            v.played_s += buffer
        except Failed:
            v.gave_up = True
        finally:
            v.ended = self.now
            self.active -= 1
            if opened:
                self.release(v, node)

    # -- tiering (peerd/replication/tiering.py on the pure policy) -----------------------------

    def tier(self, n: Node) -> None:
        """One tiering round of ``n``: plan_tiering, then plan_eviction."""
        p = self.p
        # TieringService.account_requests: the node's requests so far against its budgets
        budget = request_budget(
            n.req_a, n.req_b, p.budget_class_a_per_month, p.budget_class_b_per_month
        )
        a0 = self.class_a
        try:
            self._tier(n, budget.promote)
        finally:
            n.req_a += self.class_a - a0

    def _tier(self, n: Node, promote: bool) -> None:
        p = self.p
        hl = p.access_half_life_s
        now = self.now
        if self.policy == "peerd":
            demand: dict[int, float] = {}
            shared = 0.0  # the init segments every item of a rung names (library.py)
            for b, (sc, at) in n.score.items():
                d = decayed(sc, at, now, hl)
                if b < 0:
                    shared += d
                    continue
                for k in self.blob_items[b]:
                    demand[k] = demand.get(k, 0.0) + d
            # Only items the node holds a segment of or served: the others (in the bucket, not
            # held, no demand but the shared inits') are kept where they are by plan_tiering
            # and change nothing but the bytes counted against the R2 budget, which never binds
            # here (10 GiB); leaving them out keeps a round linear in what the node touches.
            # The items in its catalog it holds a segment of, served, or holds as not in R2
            # (their demand counts as local): the others (believed in the bucket, not held, no
            # demand but the shared inits') are kept where they are by plan_tiering and change
            # nothing but the bytes counted against the R2 budget, which never binds here
            # (10 GiB); leaving them out keeps a round linear in what the node touches.
            lan = self.lan(n)
            per_item = p.segments_per_item * len(self.lib.items[0].rungs)
            mine = set(demand) | {b // per_item for b in n.held if b >= 0}
            mine = (mine | (n.known - n.media_r2.keys())) & n.known
            for k in mine:
                demand[k] = demand.get(k, 0.0) + shared
            stats = [
                MediaStat(
                    str(k),
                    self.lib.items[k].size,
                    demand_bps(demand.get(k, 0.0), hl),
                    k in n.media_r2,
                    n.media_r2.get(k),
                    n.index in self.holders[k],
                    int(lan is not None and lan.index in self.holders[k]),
                )
                for k in sorted(mine)
            ]
            limits = TieringLimits(
                uplink_bps=n.uplink_Bps,
                r2_budget_bytes=p.r2_budget_bytes,
                headroom=p.uplink_headroom,
                cold_bps=p.cold_bytes_per_s,
                min_residence_s=p.min_residence_s,
                promotions_allowed=promote,
                min_copies=p.min_copies,
            )
            plan = plan_tiering(stats, limits, now)
            if p.min_copies > 1 and "min_copies" in TieringLimits.__dataclass_fields__:
                # peerd's TieringService: the candidates' full copies as its peers report them
                # (the testbed's homes reach only their LAN partner: mDNS, no libp2p bootstrap)
                peer = lan.index if lan is not None else None
                copies = {
                    a.media_id: int(peer is not None and peer in self.holders[int(a.media_id)])
                    for a in plan
                    if isinstance(a, Demote)
                }
                stats = [dc_replace(m, copies=copies.get(m.media_id)) for m in stats]
                limits = dc_replace(limits, min_copies=p.min_copies)
                plan = plan_tiering(stats, limits, now)
            for act in plan:
                k = int(act.media_id)
                if isinstance(act, Promote) and k not in n.media_r2:
                    for b in self.lib.items[k].blobs:
                        if b not in n.r2_rows:
                            self.push(n, b)
                    self.class_a += 1  # the manifest
                    self.r2_items[k] = now
                    n.media_r2[k] = now
                elif isinstance(act, Demote) and k in n.media_r2:
                    del n.media_r2[k]
                    self.r2_items.pop(k, None)  # DELETE of the manifest (free)
                    for b in self.lib.items[k].blobs:
                        # DELETE (free), unless an item this node's catalog has in the bucket
                        # names it (r2_users: the inits)
                        if not any(j in n.media_r2 for j in self.blob_items[b]):
                            self.bucket_delete(b)
                            n.r2_rows.discard(b)
                            self.row_changed(n, b)
            self._stored()
        self.evict(n)

    def evict(self, n: Node) -> None:
        """``TieringService.evict``: past the high watermark, :func:`plan_eviction` with the
        HEADs ``n``'s class B budget allows for eviction, blobs confirmed in the bucket within
        an hour evicted without one, blobs stored a moment ago that nobody asked for spared."""
        p = self.p
        now = self.now
        n.unasked = {b: t for b, t in n.unasked.items() if now - t < SPARE_STORED_S}
        if self.policy not in ("peerd", "lru") or n.used <= p.evict_high * n.quota:
            return
        hl = p.access_half_life_s
        blobs = [
            BlobStat(
                str(b),
                self.lib.sizes[b],
                decayed(*n.score.get(b, (0.0, 0.0)), now, hl),
                last,  # a blob never asked for: when it was stored (Catalog.evictable)
                b in n.r2_rows,  # the catalog's r2_state: what this node last knew
                False,
                n.checked.get(b),
            )
            for b, last in n.held.items()
        ]
        left = p.budget_class_b_per_month - n.req_b
        evictions = plan_eviction(
            blobs,
            n.used,
            n.quota,
            high=p.evict_high,
            low=p.evict_low,
            order="lru" if self.policy == "lru" else "demand",
            now=now if p.head_free_eviction else None,
            heads=spendable(left, p.budget_class_b_per_month, "evict"),
            spare={str(b) for b in n.unasked},
        )
        for ev in evictions:
            b = int(ev.cid)
            if not ev.head:
                self.count("evict_fresh")
                self.drop(n, b)
                self.row_changed(n, b)
            elif self.verify(n, b):
                self.drop(n, b)
                self.row_changed(n, b)
            else:
                # Not confirmed (another node deleted it, or the driver wrote it): not
                # evicted; marked not in R2 and pushed again.
                n.r2_rows.discard(b)
                self.push(n, b)
        self._stored()

    def verify(self, n: Node, b: int) -> bool:
        """``R2Client.verify_blob`` by ``n``: a HEAD, and a whole GET when the object has no
        SHA-256 checksum (the driver's); whether the copy is confirmed."""
        self.op_b("check_head", n)
        if b not in self.bucket:
            return False
        if b in self.seeded or b not in self.written:
            self.op_b("check_get", n)
            self.node_gets.append((n.index, b))
        if b in self.seeded:
            return False
        n.checked[b] = self.now
        return True

    def push(self, n: Node, b: int) -> None:
        """A ``push_blob`` job (``Replicator.upload_blob``): a PUT ``If-None-Match: *``; on an
        object already there (412) its check, and when that fails a DELETE and the job's
        retry; then the check of the object written."""
        self.class_a += 1
        puts = 1
        if b in self.bucket:
            if not self.verify(n, b):
                self.bucket_delete(b)
                self.seeded.discard(b)
                self.class_a += 1  # the retry's PUT
                puts = 2
                self.bucket_put(b)
                self.written.add(b)
                self.op_b("put_check", n)
        else:
            self.bucket_put(b)
            self.written.add(b)
            self.op_b("put_check", n)  # the HEAD after the PUT (its SHA-256 checksum)
        n.r2_rows.add(b)
        n.checked[b] = self.now
        self.row_changed(n, b)
        self.start(self.upload(n, self.lib.sizes[b] * puts))

    def upload(self, n: Node, size: int) -> Proc:
        """A PUT's body leaves by the home's uplink, beside the viewers' segments (a PUT
        refused with 412 sends its body too: ``If-None-Match`` is checked on the whole
        request)."""
        yield "flow", (n.index, size)

    def ticker(self, n: Node) -> Proc:
        """Tiering rounds of ``n`` every interval, one interval after the daemon was ready."""
        iv = self.p.tiering_interval_s
        if self.p.ready_ages_s is not None:
            yield "wait", (iv - self.p.ready_ages_s[n.index]) % iv
        else:
            yield "wait", self.rng.random() * iv
        self.tier(n)
        while self.active or self.now < self.p.duration_s:
            yield "wait", self.p.tiering_interval_s
            self.tier(n)

    def heartbeats(self) -> Proc:
        """Every node's heartbeat every 2 s: the egress the coordinator routes on."""
        while self.active or self.now < self.p.duration_s:
            for n in self.nodes:
                self.heartbeat(n)
            yield "wait", self.p.heartbeat_s

    def heartbeat(self, n: Node) -> None:
        """``n``'s heartbeat as ``routing._report`` reads it."""
        n.down = False
        # with a budget, the node's own meter, state and budget
        if n.meter.enabled:
            rep = n.meter.report(self.now)
            n.admission = rep.state
            n.reported_Bps = float(rep.send_bps)
            n.coord_uplink_Bps = float(rep.budget_bps)
            n.floor_spare_Bps = float(rep.floor_spare_bps)
        else:
            n.reported_Bps = n.egress.rate(self.now)
        # NodeApi.admission: BucketLink.ready (no HEAD fails here: the bucket is up)
        budget = self.p.budget_class_b_per_month
        left = spendable(budget - n.req_b, budget, "viewer")
        n.spill = can_spill(self.nodes_use_r2, left, False)
        n.class_b_left = max(0, budget - n.req_b) if self.nodes_use_r2 else None
        # the inventory the coordinator pages through after a heartbeat whose seq moved
        for b, present in n.changed.items():
            # routing._sync: a node's 'none' overrides another's 'present' only when it had said
            # 'present' itself (it learned the bucket lost the blob), not when it never knew
            if (
                self.p.coord_latest_wins
                or present
                or n.said_r2.get(b, False)
                or b not in self.coord_r2
            ):
                self.coord_r2[b] = present
            n.said_r2[b] = present
        n.changed.clear()

    def sampler(self) -> Proc:
        """The driver's 2 s series (viewer bytes, node bytes, active, stalls)."""
        while self.active or self.now < self.p.duration_s:
            node_bytes: dict[str, float] = {}
            for n in self.nodes:
                for k, val in n.served.items():
                    node_bytes[k] = node_bytes.get(k, 0.0) + val
            self.series.append(
                {
                    "t": round(self.now, 1),
                    "viewer_bytes": dict(self.totals),
                    "node_bytes": node_bytes,
                    "active": self.active,
                    "stalls": self.stall_count,
                }
            )
            yield "wait", 2.0

    def arrivals(self, trace: list[Any]) -> Proc:
        """Start each viewer at its time."""
        for a in trace:
            yield "wait", a.at_s - self.now
            v = ViewerStats(a.viewer, a.item, self.now)
            self.viewers.append(v)
            self.start(self.viewer(v))

    def play(self, trace: list[Any]) -> dict[str, Any]:
        """Replay ``trace``; the summary object (``driver.summarise``'s keys)."""
        self.start(self.arrivals(trace))
        if self.policy in ("peerd", "lru"):
            for n in self.nodes:
                self.start(self.ticker(n))
        self.start(self.sampler())
        self.start(self.heartbeats())
        self.run(math.inf)
        self._stored()
        return self.summary()

    def fetch_waste(self) -> dict[str, Any]:
        """``driver.fetch_waste`` on the model's events: each blob GET a node made is
        ``needed``, ``refetch_placed``, ``repeat``, ``unasked_other_rendition`` or ``unasked``
        (bytes per kind, in all and per node)."""
        kinds = ("needed", "refetch_placed", "repeat", "unasked_other_rendition", "unasked")
        per_item = self.p.segments_per_item
        rungs = len(self.lib.items[0].rungs)

        def role(b: int) -> tuple[int, int]:  # (item, segment number; -1 for an init)
            if b < 0:
                return (-1, -1)
            return (b // (per_item * rungs), b % per_item)

        sibling = {n: {role(b) for b in bs} for n, bs in self.asked.items()}
        per: dict[int, dict[str, float]] = {}
        seen: set[tuple[int, int]] = set()
        for node, b in self.node_gets:
            row = per.setdefault(node, dict.fromkeys(kinds, 0.0))
            k, _ = role(b)
            if (node, b) in seen:
                kind = "repeat"
            elif k in self.place[node] or b < 0:
                kind = "refetch_placed"
            elif b in self.asked.get(node, set()):
                kind = "needed"
            elif role(b) in sibling.get(node, set()):
                kind = "unasked_other_rendition"
            else:
                kind = "unasked"
            seen.add((node, b))
            row[kind] += self.lib.sizes[b]
        total = {key: sum(r[key] for r in per.values()) for key in kinds}
        return {"total": total, "per_node": {f"node{n}": r for n, r in sorted(per.items())}}

    def summary(self) -> dict[str, Any]:
        """The same keys as ``driver.summarise``."""
        stats = self.viewers
        startups = sorted(s.startup_s for s in stats if s.startup_s is not None and not s.gave_up)
        stall = sum(s.stall_s for s in stats)
        played = sum(s.played_s for s in stats)
        by_source: dict[str, int] = {}
        for s in stats:
            for k, val in s.bytes_by_source.items():
                by_source[k] = by_source.get(k, 0) + val
        origin: dict[str, float] = {}
        for n in self.nodes:
            for k, x in n.served.items():
                origin[f"served_{k}"] = origin.get(f"served_{k}", 0.0) + x
            for k, x in n.fetched.items():
                origin[f"fetched_{k}"] = origin.get(f"fetched_{k}", 0.0) + x
        wall = self.now
        stored = self.stored_integral / max(wall, 1e-9)
        gb_months = stored / 1e9 * wall / MONTH_S
        cost = (
            self.class_a * PRICE_CLASS_A
            + self.class_b * PRICE_CLASS_B
            + gb_months * PRICE_STORAGE_GB_MONTH
        )
        total = sum(by_source.values())
        minutes = played / 60
        return {
            "policy": self.policy,
            "viewers": len(stats),
            "gave_up": sum(1 for s in stats if s.gave_up),
            "startup_p50_s": round(_pct(startups, 50), 3),
            "startup_p95_s": round(_pct(startups, 95), 3),
            "rebuffer_ratio": round(stall / max(stall + played, 1e-9), 5),
            "stalls": sum(s.stalls for s in stats),
            "stall_s": round(stall, 2),
            "played_s": round(played, 1),
            "reroutes": sum(s.reroutes for s in stats),
            "bytes_by_source": by_source,
            "node_share": round(by_source.get("node", 0) / max(total, 1), 4),
            "node_bytes_by_origin": origin,
            "r2_read_bytes": origin.get("fetched_r2", 0.0)
            + by_source.get("r2", 0)
            + by_source.get("r2_redirect", 0),
            "r2_class_a": self.class_a,
            "r2_class_b": self.class_b,
            "r2_gb_months": gb_months,
            "r2_bucket_bytes": {"before": self.bucket_before, "after": self.bucket_bytes()},
            "corrupt_bytes": 0,
            "cost_usd": round(cost, 6),
            "minutes_delivered": round(minutes, 2),
            "stream_cost_usd": round(minutes * PRICE_STREAM_MINUTE, 6),
            "prices": {
                "r2_storage_gb_month": PRICE_STORAGE_GB_MONTH,
                "r2_class_a_per_million": 4.50,
                "r2_class_b_per_million": 0.36,
                "r2_egress": 0.0,
                "stream_per_1000_minutes": 1.0,
                "read": "2026-12-06",
            },
            "bound": {"measured_over_belady": float("nan")},
            "fetch_waste": self.fetch_waste(),
            "first_routes": first_routes(
                [(v.item, v.nodes[0] if v.nodes else None) for v in stats],
                self.p.nodes,
                self.p.lan_pairs,
            ),
            "node_counters": dict(sorted(self.counters.items())),
            "faults": [],
            "wall_s": round(wall, 1),
        }


def first_routes(
    firsts: list[tuple[int, int | None]], nodes: int, lan_pairs: list[tuple[int, int]]
) -> dict[str, int]:
    """Where the coordinator first sent each viewer (item, node or None): the item's
    ``holder`` (its placement), that node's LAN ``partner``, an ``other`` node, or the
    ``bucket``."""
    peer: dict[int, int] = {}
    for a, b in lan_pairs:
        peer[a], peer[b] = b, a
    out = dict.fromkeys(("holder", "partner", "other", "bucket"), 0)
    for item, node in firsts:
        if node is None:
            kind = "bucket"
        elif node == item % nodes:
            kind = "holder"
        elif peer.get(item % nodes) == node:
            kind = "partner"
        else:
            kind = "other"
        out[kind] += 1
    return out


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(p) - 1]


def simulate(p: SimParams, lib: Library, policy: str) -> Sim:
    """Run one policy on the scenario's trace; the finished model (``.summary()``)."""
    trace = make_trace(
        seed=p.seed,
        duration_s=p.duration_s,
        mean_per_s=p.mean_per_s,
        peak_ratio=p.peak_ratio,
        items=p.items,
        zipf_s=p.zipf_s,
    )
    sim = Sim(p, lib, policy)
    sim.play(trace)
    return sim


# -- calibration and the command line ------------------------------------------------------------

HEADLINE = (
    "startup_p50_s",
    "startup_p95_s",
    "rebuffer_ratio",
    "node_share",
    "r2_class_a",
    "r2_class_b",
    "cost_usd",
)


TOLERANCE_REL = 0.10
# Figures whose testbed values can sit near 0, where a relative error says nothing (0.03%
# against 0.01% is "+200%" yet both meet the 1% goal thirty times over): they also pass within
# an absolute difference -- the rebuffer ratio within 0.1 percentage point (a tenth of the
# issue's 1% goal), R2 operations within 10 of either class (the new-default quick runs make 0
# to 3 class A, `no_r2` 9 class B: the sanity players'), the cost within $0.00005 (ten class A
# operations). Two zeros agree.
TOLERANCE_ABS = {
    "rebuffer_ratio": 0.001,
    "r2_class_a": 10.0,
    "r2_class_b": 10.0,
    "cost_usd": 0.00005,
}


def compare(testbed: dict[str, Any], sim: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per headline figure: testbed, sim, the relative error (None when the testbed's is 0),
    the absolute difference, and whether it passes (within :data:`TOLERANCE_REL`, or for the
    figures of :data:`TOLERANCE_ABS` within that absolute difference)."""
    out = {}
    for k in HEADLINE:
        a, b = float(testbed[k]), float(sim[k])
        rel = None if a == 0 else round((b - a) / a, 4)
        ok = a == b or (rel is not None and abs(rel) <= TOLERANCE_REL)
        tol = f"±{TOLERANCE_REL:.0%}"
        if k in TOLERANCE_ABS:
            ok = ok or abs(b - a) <= TOLERANCE_ABS[k]
            tol += f" or ±{TOLERANCE_ABS[k]:g}"
        out[k] = {
            "testbed": a,
            "sim": b,
            "rel_err": rel,
            "abs_err": round(b - a, 6),
            "tolerance": tol,
            "pass": ok,
        }
    return out


def _err(k: str, c: dict[str, Any]) -> str:
    if k == "rebuffer_ratio" or c["rel_err"] is None:
        return f"{c['abs_err']:+.4g}"
    return f"{c['rel_err']:+.1%}"


def load_library(run_dir: Path, sc: dict[str, Any]) -> Library:
    """The run's library: ``DIR/library.json`` (written here from ``DIR/work/media`` the first
    time)."""
    path = run_dir / "library.json"
    if not path.exists():
        path.write_text(json.dumps({"rungs": read_rungs(run_dir / "work" / "media")}))
    rungs = json.loads(path.read_text())["rungs"]
    return library_from_rungs(rungs, int(sc["items"]), int(sc["segments_per_item"]))


def replicated(p: SimParams, lib: Library, policy: str, replicas: int) -> dict[str, Any]:
    """The summary of one run (the first seed) with its headline figures averaged over
    ``replicas`` runs of the model's own randomness (service times, sampled nodes) on the same
    trace: a quick run has a few hundred viewers, and one draw of the model is as noisy."""
    runs = []
    for r in range(replicas):
        sim = Sim(p, lib, policy)
        sim.rng.seed(p.seed + 1 + r)
        sim.net_rng.seed(p.seed + 2 + 1000 * r)
        sim.play(_trace(p))
        runs.append(sim.summary())
    out = dict(runs[0])
    for k in HEADLINE:
        out[k] = round(statistics.fmean(float(x[k]) for x in runs), 6)
    out["replicas"] = replicas
    return out


def _trace(p: SimParams) -> list[Any]:
    return make_trace(
        seed=p.seed,
        duration_s=p.duration_s,
        mean_per_s=p.mean_per_s,
        peak_ratio=p.peak_ratio,
        items=p.items,
        zipf_s=p.zipf_s,
    )


def calibrate(
    run_dir: Path,
    replicas: int = 5,
    seed_s_per_node: float | None = None,
    ages: dict[str, list[float]] | None = None,
    unverified: bool | None = None,
    clocks: dict[str, tuple[list[float], list[float], list[float]]] | None = None,
) -> dict[str, Any]:
    """Simulate every policy of the testbed run in ``run_dir``; write ``sim_compare.json`` and
    ``sim_compare.md``. The nodes' seed ages are read from the run (:func:`seed_ages`), or
    given per policy in ``ages`` (a run whose work directory is gone), else
    ``seed_s_per_node`` (every clock :func:`node_clocks` reads, given per policy in
    ``clocks``); whether the nodes' check failed on the driver's objects
    (:attr:`SimParams.seeded_unverified`) from the run (:func:`checks_failed`) unless given."""
    summary = json.loads((run_dir / "summary.json").read_text())
    sc = summary["scenario"]
    p = params_from_scenario(sc)
    if seed_s_per_node is not None:
        p.seed_s_per_node = seed_s_per_node
    lib = load_library(run_dir, sc)
    result: dict[str, Any] = {"params": _jsonable(asdict(p)), "policies": {}}
    rows = [
        "| policy | figure | testbed | sim | error | tolerance | within |",
        "|---|---|---|---|---|---|---|",
    ]
    mech = [
        "Not judged, the mechanisms behind the figures (the model's first replica): node GETs "
        "at the bucket by cause (MB, as `fetch_waste`), first routes by tier (viewers).",
        "",
        "| policy | what | testbed | sim |",
        "|---|---|---|---|",
    ]
    for name, tb in summary["policies"].items():
        clock = (clocks or {}).get(name)
        if clock is None and seed_s_per_node is None:
            clock = node_clocks(run_dir, name)
        p.seeded_unverified = unverified if unverified is not None else checks_failed(run_dir, name)
        p.seed_ages_s = (ages or {}).get(name) or (clock[0] if clock else None)
        p.ready_ages_s = clock[1] if clock else None
        p.lan_lost_s = clock[2] if clock else None
        s = replicated(p, lib, name, replicas)
        cmp = compare(tb, s)
        result["policies"][name] = {"compare": cmp, "sim": s}
        for k, c in cmp.items():
            rows.append(
                f"| {name} | {k} | {c['testbed']:.6g} | {c['sim']:.6g} | {_err(k, c)} "
                f"| {c['tolerance']} | {'yes' if c['pass'] else 'no'} |"
            )
        mech.extend(mechanisms(run_dir, name, tb, s, p))
    rows += ["", *mech]
    (run_dir / "sim_compare.json").write_text(json.dumps(result, indent=1, default=float))
    (run_dir / "sim_compare.md").write_text("\n".join(rows) + "\n")
    return result


def mechanisms(
    run_dir: Path, policy: str, tb: dict[str, Any], sim: dict[str, Any], p: SimParams
) -> list[str]:
    """Rows comparing what the run's nodes and coordinator did with the model's: the nodes'
    bucket GETs by cause (``fetch_waste``) and the viewers' first routes by tier (from the
    run's per-viewer records, ``DIR/<policy>.json``, when kept)."""
    rows = []
    tw = tb.get("fetch_waste", {}).get("total", {})
    for k, x in sim["fetch_waste"]["total"].items():
        if k in tw:
            rows.append(f"| {policy} | GET {k} | {tw[k] / 1e6:.1f} | {x / 1e6:.1f} |")
    path = run_dir / f"{policy}.json"
    if path.exists():
        viewers = json.loads(path.read_text()).get("viewers", [])
        firsts = [(int(v["item"]), v["nodes"][0] if v["nodes"] else None) for v in viewers]
        got = first_routes(firsts, p.nodes, p.lan_pairs)
        for k, n in got.items():
            rows.append(f"| {policy} | first route: {k} | {n} | {sim['first_routes'][k]} |")
    return rows


def node_clocks(run_dir: Path, policy: str) -> tuple[list[float], list[float], list[float]] | None:
    """Per node, how long before the first viewer (a) its catalog was seeded and (b) the daemon
    was ready (its tiering rounds run every interval from then), as the run left them: the
    earliest media row of ``DIR/work/<policy>/node<i>/catalog.sqlite3`` (the seeding writes them
    all at once) and the ``peerd ready`` line of its ``daemon.log``, against the last node's
    registration with the coordinator (the driver starts the viewers once every node registered
    and its inventory was read, a second or so later); and (c) how long after it the node's
    LAN directory lost its partner (its first ``peer expired`` or ``peer withdrew`` line; inf:
    never). None when the work directory is gone."""
    import datetime
    import sqlite3

    def ts_of(line: str) -> float:
        ts = json.loads(line)["ts"].replace("Z", "+00:00")
        return datetime.datetime.fromisoformat(ts).timestamp()

    seeded_at, ready_at, registered, lost_at = [], [], [], []
    nodes = sorted((run_dir / "work" / policy).glob("node*"), key=lambda d: int(d.name[4:]))
    for node_dir in nodes:
        try:
            con = sqlite3.connect(f"file:{node_dir / 'catalog.sqlite3'}?mode=ro", uri=True)
            try:
                (seeded,) = con.execute("SELECT min(created_at) FROM media").fetchone()
            finally:
                con.close()
            lines = (node_dir / "daemon.log").read_text().splitlines()
        except (OSError, sqlite3.Error):
            return None
        ready = [ts_of(x) for x in lines if '"peerd ready"' in x]
        reg = [ts_of(x) for x in lines if '"registered with the coordinator"' in x]
        lost = [ts_of(x) for x in lines if '"peer expired"' in x or '"peer withdrew"' in x]
        if seeded is None or not ready or not reg:
            return None
        lost_at.append(lost[0] if lost else math.inf)
        seeded_at.append(float(seeded))
        ready_at.append(ready[0])
        registered.append(reg[0])
    if not nodes:
        return None
    first_viewer = max(registered)
    return (
        [round(first_viewer - a, 2) for a in seeded_at],
        [round(first_viewer - a, 2) for a in ready_at],
        [round(a - first_viewer, 2) for a in lost_at],
    )


def checks_failed(run_dir: Path, policy: str) -> bool:
    """Whether the run's nodes deleted objects of the bucket as failing their check (a push
    job's error in a ``daemon.log``): the peerd of before 27d9b58, whose check of an object
    without a SHA-256 checksum always failed."""
    for log_path in (run_dir / "work" / policy).glob("node*/daemon.log"):
        with contextlib.suppress(OSError), log_path.open() as f:
            if any("failed verification; deleted it" in line for line in f):
                return True
    return False


def seed_ages(run_dir: Path, policy: str) -> list[float] | None:
    """:func:`node_clocks`' seed ages."""
    clocks = node_clocks(run_dir, policy)
    return clocks[0] if clocks else None


def calibrate_repeats(run_dirs: list[Path], replicas: int = 5) -> str:
    """Runs of one scenario (the same ``scenario`` object): the testbed's own spread per figure
    next to the model's error against their mean -- a figure two identical testbed runs put
    further apart than the tolerance cannot be reproduced within it by any model. A markdown
    table."""
    sums = [json.loads((d / "summary.json").read_text()) for d in run_dirs]
    sc = sums[0]["scenario"]
    if any(x["scenario"] != sc for x in sums):
        raise SystemExit("--repeats: the runs' scenarios differ")
    p = params_from_scenario(sc)
    lib = load_library(run_dirs[0], sc)
    rows = [
        "| policy | figure | testbed runs | mean | spread | sim | error | tolerance | within |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name in sums[0]["policies"]:
        clocks = [cl for d in run_dirs if (cl := node_clocks(d, name)) is not None]
        p.seeded_unverified = any(checks_failed(d, name) for d in run_dirs)
        p.seed_ages_s = p.ready_ages_s = p.lan_lost_s = None
        if clocks:
            p.lan_lost_s = [min(x) for x in zip(*(c[2] for c in clocks), strict=True)]
            p.seed_ages_s = [statistics.fmean(x) for x in zip(*(c[0] for c in clocks), strict=True)]
            p.ready_ages_s = [
                statistics.fmean(x) for x in zip(*(c[1] for c in clocks), strict=True)
            ]
        s = replicated(p, lib, name, replicas)
        vals = {k: [float(x["policies"][name][k]) for x in sums] for k in HEADLINE}
        mean = {k: statistics.fmean(v) for k, v in vals.items()}
        for k, c in compare(mean, s).items():
            v = vals[k]
            spread = (
                f"{(max(v) - min(v)) / c['testbed']:.0%}"
                if c["testbed"] and k != "rebuffer_ratio"
                else f"{max(v) - min(v):.4g}"
            )
            rows.append(
                f"| {name} | {k} | {' / '.join(f'{x:.4g}' for x in v)} | {c['testbed']:.4g} "
                f"| {spread} | {c['sim']:.4g} | {_err(k, c)} | {c['tolerance']} "
                f"| {'yes' if c['pass'] else 'no'} |"
            )
    return "\n".join(rows) + "\n"


def _jsonable(x: Any) -> Any:
    return json.loads(
        json.dumps(x, default=lambda o: asdict(o) if hasattr(o, "__dataclass_fields__") else str(o))
    )


def run_scaled(args: argparse.Namespace) -> int:
    """The ``--nodes/--viewers`` run: summary.json, per-policy files, table and plots."""
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    p = scaled(args.nodes, args.viewers, args.duration)
    if args.policies:
        p.policies = args.policies.split(",")
    p.route = args.route or p.route
    p.manifests = args.manifests or p.manifests
    if args.admission is not None:
        p.admission_fraction = args.admission
    rungs = json.loads(Path(args.library).read_text())["rungs"]
    lib = library_from_rungs(rungs, p.items, p.segments_per_item)
    summary: dict[str, Any] = {
        "scenario": _jsonable(asdict(p)) | {"lan_pairs": len(p.lan_pairs), "sim": True},
        "total_uplink_mbit": sum(p.uplinks_mbit),
        "policies": {},
    }
    for policy in p.policies:
        t = time.monotonic()
        sim = simulate(p, lib, policy)
        s = sim.summary()
        s["sim_cpu_s"] = round(time.monotonic() - t, 1)
        summary["policies"][policy] = s
        print(f"[sim] {policy}: {len(sim.viewers)} viewers, {s['sim_cpu_s']} s", file=sys.stderr)
        (out / f"{policy}.json").write_text(
            json.dumps(
                {
                    "summary": s,
                    "series": sim.series,
                    "viewers": [
                        {"startup_s": v.startup_s, "stall_times": v.stall_times}
                        for v in sim.viewers
                    ],
                },
                default=float,
            )
        )
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
    (out / "table.md").write_text(table(summary))
    plots_written = write_plots(out, p.policies)
    print(f"[sim] wrote {out / 'summary.json'}; plots: {plots_written}", file=sys.stderr)
    return 0


def table(summary: dict[str, Any]) -> str:
    """``driver.table`` without the bound column (the sim keeps no Belady replay)."""
    rows = [
        "| policy | viewers | startup p50 / p95 (s) | rebuffer | bytes from nodes | "
        "from R2 | R2 class A / B | R2 cost ($) | Stream ($) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary["policies"].items():
        by = s["bytes_by_source"]
        r2 = by.get("r2", 0) + by.get("r2_redirect", 0)
        rows.append(
            f"| {name} | {s['viewers']} | {s['startup_p50_s']:.2f} / {s['startup_p95_s']:.2f} "
            f"| {s['rebuffer_ratio']:.2%} | {by.get('node', 0) / 1e9:.1f} GB "
            f"({s['node_share']:.0%}) | {r2 / 1e9:.1f} GB | {s['r2_class_a']} / "
            f"{s['r2_class_b']} | {s['cost_usd']:.4f} | {s['stream_cost_usd']:.2f} |"
        )
    return "\n".join(rows) + "\n"


def write_plots(out: Path, policies: list[str]) -> str:
    """The testbed's own plots (``plots.py``: matplotlib is not in the venv, so SVG rendered to
    PNG by headless Chromium) from the per-policy files written here in its format."""
    from scripts.testbed import plots

    try:
        plots.write_all(out, policies)
    except Exception as exc:  # noqa: BLE001 (plots are a by-product of the figures)
        return f"none ({type(exc).__name__}: {exc})"
    return "bytes_<policy>.png, startup_cdf.png, stalls.png"


DEFAULT_LIBRARY = (
    Path(__file__).resolve().parents[2] / "tests" / "fixtures" / "testbed_quick" / "library.json"
)


def main() -> int:
    """Command line (see the module doc)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibrate", type=Path, metavar="DIR", help="a testbed run's --out")
    ap.add_argument(
        "--repeats",
        type=Path,
        nargs="+",
        metavar="DIR",
        help="testbed runs of one scenario: their spread and the model's error on their mean",
    )
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--viewers", type=int, default=100_000)
    ap.add_argument("--duration", type=float, default=240.0, help="seconds of arrivals")
    ap.add_argument("--policies", help="comma-separated: peerd,lru,no_r2,all_r2")
    ap.add_argument("--library", default=str(DEFAULT_LIBRARY), help="library.json (rungs)")
    ap.add_argument("--out", type=Path)
    ap.add_argument(
        "--admission",
        type=float,
        metavar="FRACTION",
        help="[uplink] budget as a fraction of each node's uplink (0: off; default: the "
        "testbed's, from its node_set)",
    )
    ap.add_argument("--route", choices=["holders", "any"], help="default: the testbed's")
    ap.add_argument("--manifests", choices=["all", "placed"], help="default: the testbed's")
    ap.add_argument(
        "--seed-s-per-node",
        type=float,
        help="seconds the driver took to seed one node's catalog (its log: policy starting to "
        "daemons ready, over the nodes); default 2.75, the quick run's",
    )
    args = ap.parse_args()
    if args.repeats:
        print(calibrate_repeats(args.repeats))
        return 0
    if args.calibrate:
        res = calibrate(args.calibrate, seed_s_per_node=args.seed_s_per_node)
        print((args.calibrate / "sim_compare.md").read_text())
        bad = [
            (pol, k)
            for pol, r in res["policies"].items()
            for k, c in r["compare"].items()
            if not c["pass"]
        ]
        return 1 if bad else 0
    if args.out is None:
        ap.error("--out DIR (or --calibrate DIR)")
    return run_scaled(args)


if __name__ == "__main__":
    sys.exit(main())
