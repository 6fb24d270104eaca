"""The multi-node testbed (``scripts/testbed/run.sh``): real peerd daemons, one per network
namespace, a real S3 server as R2, a routing coordinator and hundreds of modelled viewers.

    scripts/testbed/run.sh [--quick] --out DIR [--policies peerd,lru,no_r2,all_r2] [--faults]
        [--route any|holders] [--manifests placed|all] [--node-set SECTION.KEY=VALUE ...]

What one run does, per policy on the same trace (see README "Testbed"):

1. makes the library (``library.py``: >= 40 two-rendition items), uploads every blob and
   manifest to the bucket (moto_server) once; the nodes reach the bucket through a delaying
   proxy (``FaultProxy(latency_s=...)``), which also counts R2 operations and plays the outage;
2. builds the network (``netns.py``: a namespace per node, ``tbf`` uplinks, LAN pairs);
3. seeds each node's catalog with the manifests and blobs of the items placed on it (round
   robin by popularity; ``--manifests all``: every manifest, blobs absent, in R2), starts
   ``peerd run`` in each namespace with its uplink budget set to its uplink;
4. starts the coordinator (``routing.py``), waits until it has read every node's inventory;
5. replays the trace (``workload.py``) with the player model (``player.py``); mid-run, one
   ffmpeg and one hls.js in Chromium play a routed URL as sanity checks; with ``--faults``, a
   node is SIGKILLed mid-playback, a LAN pair is partitioned and R2 is down for 60 s;
6. writes ``DIR/summary.json`` and ``DIR/<policy>.json`` (per viewer), plots (``plots.py``).

Prices (R2 list prices and Cloudflare Stream, read 2026-12-06): storage $0.015/GB-month, class A
$4.50 per million, class B $0.36 per million, egress free; Stream $1 per 1,000 minutes delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import boto3
from aiohttp import web
from botocore.config import Config as BotoConfig

from peerd.catalog.media import record_media
from peerd.config import load_settings
from peerd.core import tokens
from peerd.core.ids import parse_cid
from peerd.runtime import open_runtime
from scripts.testbed import plots
from scripts.testbed.library import Item, make_library
from scripts.testbed.netns import Network
from scripts.testbed.player import Player, PlayerConfig, Route, ViewerStats
from scripts.testbed.routing import NodeView, RoutingCoordinator
from scripts.testbed.workload import Arrival, cache_misses, make_trace
from tests.support.browser import Browser
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.process import PeerdProcess
from tests.support.r2media import write_r2_secrets
from tests.support.s3server import ACCESS_KEY, SECRET_KEY, MotoServer

ROOT = Path(__file__).resolve().parents[2]
HLS_JS = ROOT / ".venv" / "web" / "node_modules" / "hls.js" / "dist" / "hls.min.js"
BUCKET = "testbed"
PORT = 8737
PRICE_STORAGE_GB_MONTH = 0.015
PRICE_CLASS_A = 4.50 / 1e6
PRICE_CLASS_B = 0.36 / 1e6
PRICE_STREAM_MINUTE = 1.0 / 1000
MONTH_S = 30 * 86400.0


@dataclass
class Scenario:
    """The knobs of one run."""

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
    faults: bool = False
    policies: list[str] = field(default_factory=lambda: ["peerd"])
    # The network as it runs: extra config per node (``{uplink_mbit}`` in a value is that
    # node's uplink; by default each node's uplink budget is its uplink), catalogs holding only
    # their own items' manifests (any node resolves the others from the network), and a
    # coordinator that may send a viewer to a node that does not hold the item.
    node_set: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {"uplink": {"budget_mbps": "{uplink_mbit}"}}
    )
    manifests: str = "placed"
    route: str = "any"
    # R2 request budgets of one node for a month (class A, class B): R2's free tier (1M class A,
    # 10M class B) shared by 1,000 homes. A run is one day of a 30-day month, so each node is
    # configured with a thirtieth (see :func:`run_budgets`) and must stay within it.
    r2_budget_per_month: tuple[int, int] = (1000, 10000)
    days_per_month: int = 30


def quick() -> Scenario:
    """4 nodes (one LAN pair), 40 items, ~70 s of arrivals: a few minutes in all."""
    return Scenario(
        nodes=4,
        uplinks_mbit=[6, 9, 7, 5],
        rtts_ms=[20, 35, 60, 80],
        lan_pairs=[(0, 1)],
        items=40,
        segments_per_item=4,
        duration_s=70,
        mean_per_s=3.5,
        peak_ratio=1.9,
    )


def full() -> Scenario:
    """8 nodes (two LAN pairs), 60 items, 4 minutes of arrivals per policy."""
    return Scenario(
        nodes=8,
        uplinks_mbit=[10, 6, 8, 12, 5, 9, 7, 11],
        rtts_ms=[20, 28, 36, 44, 52, 60, 70, 80],
        lan_pairs=[(0, 1), (2, 3)],
        items=60,
        segments_per_item=6,
        duration_s=240,
        mean_per_s=4.0,
        peak_ratio=1.9,
        policies=["peerd", "lru", "no_r2", "all_r2"],
    )


def log(msg: str) -> None:
    """Progress on stderr."""
    print(f"[testbed {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def scrape(base_url: str) -> dict[str, float]:
    """A node's ``/metrics`` as ``{"name{labels}": value}``."""
    out: dict[str, float] = {}
    with urllib.request.urlopen(base_url + "/metrics", timeout=5) as r:  # noqa: S310
        for line in r.read().decode().splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                with contextlib.suppress(ValueError):
                    out[key] = float(value)
    return out


def by_label(metrics: dict[str, float], name: str, label: str) -> dict[str, float]:
    """Sum of a metric's samples grouped by one label."""
    out: dict[str, float] = {}
    for key, v in metrics.items():
        if key.startswith(name + "{"):
            for part in key[len(name) + 1 : -1].split(","):
                k, _, val = part.partition("=")
                if k == label:
                    out[val.strip('"')] = out.get(val.strip('"'), 0.0) + v
    return out


def node_counters(metrics: dict[str, float]) -> dict[str, float]:
    """The counters of one node that explain what it fetched and what it asked of R2:
    R2 requests by operation, prefetches by outcome, fetches by source and outcome, store
    writes, replication jobs, requests sent to the bucket or refused over the uplink budget."""
    out: dict[str, float] = {}
    for name in (
        "peerd_r2_requests_total",
        "peerd_prefetches_total",
        "peerd_fetches_total",
        "peerd_store_writes_total",
        "peerd_r2_jobs_total",
        "peerd_uplink_overflow_total",
    ):
        for key, v in metrics.items():
            if key == name or key.startswith(name + "{"):
                labels = key[len(name) :].strip("{}").replace('"', "").replace(",", ";")
                out[name.removeprefix("peerd_").removesuffix("_total") + ":" + labels] = v
    return out


async def seed_node(
    state_dir: Path, library: list[Item], placed: set[int], in_r2: bool, manifests: str = "all"
) -> None:
    """Every manifest in the catalog (``manifests="placed"``: only those of ``placed``); blobs of
    ``placed`` items local, the rest absent."""
    rt = await open_runtime(load_settings(None, node={"state_dir": state_dir}))
    try:
        now = time.time()
        for k, item in enumerate(library):
            if manifests == "placed" and k not in placed:
                continue
            for cid, data in item.blobs.items():
                kind = "init" if any(r.init == cid for r in item.manifest.renditions) else "segment"
                await rt.store.put(data, kind=kind, expected=parse_cid(cid))
            async with rt.catalog.transaction() as tx:
                await record_media(
                    tx, item.media_id, item.manifest_bytes, item.manifest, now,
                    title=f"item{k}", in_r2=in_r2,
                )  # fmt: skip
            if k not in placed:
                for r in item.manifest.renditions:
                    for s in r.segments:
                        if s.cid is not None:  # None only for on-demand renditions
                            await rt.store.evict_local(parse_cid(s.cid))
        await rt.catalog.set_state("clean_shutdown", "1")
    finally:
        await rt.close()


class Testbed:
    """One run of every policy (see the module doc)."""

    def __init__(self, sc: Scenario, out: Path) -> None:
        self.sc = sc
        self.out = out
        self.work = out / "work"
        self.net = Network()
        self.moto = MotoServer()
        self.proxy: FaultProxy | None = None
        self.r2_down = False
        self.library: list[Item] = []
        self.signing_secret = secrets.token_hex(24)
        self.api_token = secrets.token_hex(24)
        self.nodes: list[PeerdProcess] = []
        self.summary: dict[str, Any] = {}

    # -- setup ---------------------------------------------------------------------------------

    def setup(self) -> None:
        """Library, bucket, network."""
        log("making the library")
        self.library = make_library(self.work / "media", self.sc.items, self.sc.segments_per_item)
        log(f"{len(self.library)} items, {sum(i.size for i in self.library) / 1e6:.1f} MB")
        self.moto.start()
        self.upload_all()
        self.net.build(
            self.sc.uplinks_mbit,
            [ms / 1000 for ms in self.sc.rtts_ms],
            self.sc.lan_pairs,
        )
        log(f"network {self.net.bridge}: {len(self.net.homes)} namespaces")

    def upload_all(self) -> None:
        """Every blob and manifest into a fresh bucket (the library entered through R2 once)."""
        c = self.moto.client()
        with contextlib.suppress(Exception):
            for o in c.list_objects_v2(Bucket=BUCKET).get("Contents", []):
                c.delete_object(Bucket=BUCKET, Key=o["Key"])
        with contextlib.suppress(Exception):
            self.moto.create_bucket(BUCKET)
        done: set[str] = set()
        for item in self.library:
            c.put_object(Bucket=BUCKET, Key=f"media/{item.media_id}.json", Body=item.manifest_bytes)
            for cid, data in item.blobs.items():
                if cid not in done:
                    # Checksummed as a node's push leaves it: a HEAD confirms it (no GET).
                    c.put_object(
                        Bucket=BUCKET, Key=f"blobs/{cid}", Body=data, ChecksumAlgorithm="SHA256"
                    )
                    done.add(cid)

    def presigner(self) -> Callable[[str], str]:
        """Presigned GET URLs through the R2 proxy (what the coordinator hands a viewer)."""
        assert self.proxy is not None
        client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.proxy.url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=BotoConfig(signature_version="s3v4", s3={"addressing_style": "path"}),
        )

        def sign(key: str) -> str:
            return str(
                client.generate_presigned_url(
                    "get_object", Params={"Bucket": BUCKET, "Key": key}, ExpiresIn=3600
                )
            )

        return sign

    def bucket_bytes(self) -> int:
        """Bytes stored in the bucket now."""
        total = 0
        paginator = self.moto.client().get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=BUCKET):
            total += sum(int(o["Size"]) for o in page.get("Contents", []))
        return total

    def placement(self) -> dict[int, set[int]]:
        """Item ``k`` (popularity rank ``k``) on node ``k mod N``."""
        out: dict[int, set[int]] = {i: set() for i in range(self.sc.nodes)}
        for k in range(len(self.library)):
            out[k % self.sc.nodes].add(k)
        return out

    def quota(self) -> int:
        """Each node's store quota: ``quota_factor`` times its share of the library."""
        lib = sum(i.size for i in self.library)
        return int(lib / self.sc.nodes * self.sc.quota_factor)

    async def start_nodes(self, policy: str, coord_url: str) -> None:
        """Fresh state, seeded catalogs, ``peerd run`` in every namespace."""
        assert self.proxy is not None
        place = self.placement()
        self.nodes = []
        for h in self.net.homes:
            state = self.work / policy / f"node{h.index}"
            shutil.rmtree(state, ignore_errors=True)
            cfg: dict[str, dict[str, Any]] = {
                "node": {"name": f"node{h.index}"},
                "http": {"host": "0.0.0.0", "port": PORT},  # noqa: S104 (inside its namespace)
                "log": {"level": "info"},
                "store": {"quota_bytes": self.quota(), "min_free_bytes": 0},
                "coordinator": {"url": coord_url, "heartbeat_interval_s": 2.0},
                "api": {"uplink_bps": int(h.uplink_mbit * 1e6 / 8)},
                "webrtc": {"enabled": False},
                "ui": {"enabled": False},
            }
            if h.lan_addr is not None:
                cfg["mdns"] = {
                    "enabled": True,
                    "interfaces": [h.lan_addr],
                    "advertise_addresses": [h.lan_addr],
                    "recheck_s": 2.0,
                }
            if policy not in ("no_r2", "all_r2"):
                cfg["r2"] = {
                    "endpoint": self.proxy.url,
                    "bucket": BUCKET,
                    "uplink_bytes_per_s": int(h.uplink_mbit * 1e6 / 8),
                    # The run compresses a day into minutes: tiering's clocks with it.
                    "tiering_interval_s": self.sc.tiering_interval_s,
                    "min_residence_s": 30.0,
                    "access_half_life_s": 60.0,
                    "fetch_timeout_s": 10.0,
                    **run_budgets(self.sc),
                }
                if policy == "lru":
                    # Plain LRU: nothing leaves the bucket for being cold; disks evict by recency.
                    cfg["r2"].update({"eviction": "lru", "cold_bytes_per_s": 0.0})
            for section, values in self.sc.node_set.items():
                cfg.setdefault(section, {}).update(
                    {
                        k: v.replace("{uplink_mbit}", f"{h.uplink_mbit:g}")
                        if isinstance(v, str)
                        else v
                        for k, v in values.items()
                    }
                )
            node = PeerdProcess(
                state, config=cfg, host=h.addr, prefix=["ip", "netns", "exec", h.ns]
            )
            await asyncio.to_thread(node.init)
            sec = state / "secrets"
            (sec / "hls_signing_key").write_text(self.signing_secret)
            (sec / "api_token").write_text(self.api_token)
            write_r2_secrets(state)
            await seed_node(
                state,
                self.library,
                place[h.index],
                policy not in ("no_r2", "all_r2"),
                self.sc.manifests,
            )
            self.nodes.append(node)
        for n in self.nodes:
            n.start(wait=False)
        for n in self.nodes:
            await asyncio.to_thread(n.wait_ready, 60)
        log(f"{len(self.nodes)} daemons ready")

    def stop_nodes(self) -> None:
        """SIGTERM every daemon still running."""
        for n in self.nodes:
            with contextlib.suppress(Exception):
                n.stop()

    # -- one policy ----------------------------------------------------------------------------

    async def run_policy(self, policy: str, trace: list[Arrival]) -> dict[str, Any]:
        """Replay ``trace`` under ``policy``; returns its summary object."""
        log(f"policy {policy}: starting")
        if policy != self.sc.policies[0]:
            await asyncio.to_thread(self.upload_all)
        assert self.proxy is not None
        coord = RoutingCoordinator(
            host=self.net.host_addr,
            api_token=self.api_token,
            signing_key=tokens.key_from_secret(self.signing_secret),
            presign=self.presigner(),
            policy=policy,
            any_node=self.sc.route == "any",
        )
        need = [max(r.bandwidth for r in i.manifest.renditions) / 8 for i in self.library]
        coord.items = [
            (i.media_id, frozenset(i.blobs), need[k]) for k, i in enumerate(self.library)
        ]
        coord.floors = [min(r.bandwidth for r in i.manifest.renditions) / 8 for i in self.library]
        await coord.start()
        for h in self.net.homes:
            coord.add_node(
                NodeView(
                    h.index,
                    f"http://{h.addr}:{PORT}",
                    h.uplink_mbit * 1e6 / 8,
                    h.rtt_s,
                    h.lan_peer,
                ),
                f"node{h.index}",
            )
        start_mark = len(self.proxy.log)  # a node's month starts with its state dir
        await self.start_nodes(policy, coord.url)
        try:
            deadline = time.monotonic() + 60
            while not coord.synced():
                if time.monotonic() > deadline:
                    raise RuntimeError("the coordinator never synced every node's inventory")
                await asyncio.sleep(0.2)
            log("coordinator synced")
            proxy_mark = len(self.proxy.log)
            bucket_before = await asyncio.to_thread(self.bucket_bytes)
            result = await self.replay(policy, coord, trace)
            ops = self.proxy.log[proxy_mark:]
            r2_clients = self.proxy.clients[proxy_mark:]
            day_end = proxy_mark + len(ops)
            bucket_after = await asyncio.to_thread(self.bucket_bytes)
        finally:
            # In a thread: the daemons' drain notices need the coordinator answering meanwhile.
            await asyncio.to_thread(self.stop_nodes)
            await coord.close()
        result["bucket_bytes_before"] = bucket_before
        result["bucket_bytes_after"] = bucket_after
        result["r2_clients"] = r2_clients
        log_, clients = self.proxy.log, self.proxy.clients
        result["r2_since_start"] = (log_[start_mark:day_end], clients[start_mark:day_end])
        result["r2_at_stop"] = (log_[day_end:], clients[day_end:])
        return self.summarise(policy, result, ops, coord, trace)

    async def replay(
        self, policy: str, coord: RoutingCoordinator, trace: list[Arrival]
    ) -> dict[str, Any]:
        """Run every viewer of ``trace`` at its time; sample the nodes meanwhile."""
        stats: list[ViewerStats] = []
        series: list[dict[str, Any]] = []
        totals: dict[str, int] = {}
        active = [0]
        faults: list[dict[str, Any]] = []
        checks: dict[str, Any] = {}

        def on_bytes(source: str, n: int) -> None:
            totals[source] = totals.get(source, 0) + n

        conn = aiohttp.TCPConnector(limit=0, limit_per_host=0)
        http = aiohttp.ClientSession(connector=conn)
        t0 = time.monotonic()
        cfg = PlayerConfig()

        async def viewer(a: Arrival) -> None:
            await asyncio.sleep(max(0.0, a.at_s - (time.monotonic() - t0)))
            st = ViewerStats(a.viewer, a.item, time.monotonic() - t0)
            stats.append(st)
            active[0] += 1

            def done(route: Route | None) -> None:
                coord.release(route, a.item)

            try:
                await Player(
                    http, st, self.library[a.item].media_id, coord.route, done, cfg, on_bytes
                ).run()
            finally:
                active[0] -= 1

        async def sampler() -> None:
            while True:
                node_bytes: dict[str, float] = {}
                # node -> [send rate (bytes/s), redirects, refusals] of its uplink admission
                uplink: dict[str, list[float]] = {}
                for n in self.nodes:
                    if n.proc is None or n.proc.poll() is not None:
                        continue
                    with contextlib.suppress(Exception):
                        m = await asyncio.to_thread(scrape, n.base_url)
                        for k, v in by_label(m, "peerd_bytes_served_total", "source").items():
                            node_bytes[k] = node_bytes.get(k, 0.0) + v
                        over = by_label(m, "peerd_uplink_overflow_total", "answer")
                        uplink[n.config["node"]["name"]] = [
                            m.get("peerd_uplink_send_bytes_per_second", 0.0),
                            over.get("redirect", 0.0),
                            over.get("refused", 0.0),
                        ]
                series.append(
                    {
                        "t": round(time.monotonic() - t0, 1),
                        "viewer_bytes": dict(totals),
                        "node_bytes": node_bytes,
                        "uplink": uplink,
                        "active": active[0],
                        "stalls": sum(s.stalls for s in stats),
                    }
                )
                await asyncio.sleep(2.0)

        sample = asyncio.create_task(sampler())
        extras = [asyncio.create_task(self.sanity(coord, checks, t0))]
        if self.sc.faults:
            extras.append(asyncio.create_task(self.faults(coord, faults, t0)))
        try:
            await asyncio.gather(*(viewer(a) for a in trace))
            await asyncio.gather(*extras)
        finally:
            sample.cancel()
            for t in extras:
                t.cancel()
            await http.close()
        node_metrics: dict[str, dict[str, float]] = {}
        counters: dict[str, dict[str, float]] = {}
        for n in self.nodes:
            with contextlib.suppress(Exception):
                m = await asyncio.to_thread(scrape, n.base_url)
                counters[n.config["node"]["name"]] = node_counters(m)
                node_metrics[n.config["node"]["name"]] = {
                    **{
                        f"served_{k}": v
                        for k, v in by_label(m, "peerd_bytes_served_total", "source").items()
                    },
                    **{
                        f"fetched_{k}": v
                        for k, v in by_label(m, "peerd_fetched_bytes_total", "source").items()
                    },
                }
        return {
            "stats": stats,
            "series": series,
            "faults": faults,
            "checks": checks,
            "node_metrics": node_metrics,
            "node_counters": counters,
            "wall_s": time.monotonic() - t0,
        }

    # -- sanity players and faults -------------------------------------------------------------

    async def sanity(self, coord: RoutingCoordinator, checks: dict[str, Any], t0: float) -> None:
        """One ffmpeg and one hls.js in Chromium play routed URLs a third of the way in."""
        await asyncio.sleep(self.sc.duration_s / 3)
        route = await coord.route(0, force_node=True)
        try:
            url = route.url if route.kind == "node" else ""
            if url:
                done = await asyncio.to_thread(
                    subprocess.run,
                    ["ffmpeg", "-nostdin", "-v", "error", "-xerror", "-i", url, "-f", "null", "-"],
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=False,
                )
                checks["ffmpeg"] = {"rc": done.returncode, "stderr": done.stderr[-500:]}
            else:
                checks["ffmpeg"] = {"rc": None, "note": "routed to the bucket"}
        finally:
            coord.release(route, 0)
        route = await coord.route(1, force_node=True)
        try:
            checks["hlsjs"] = await self.hlsjs(route.url) if route.kind == "node" else {}
        finally:
            coord.release(route, 1)

    async def hlsjs(self, url: str) -> dict[str, Any]:
        """hls.js plays ``url`` in headless Chromium for 5 s (another origin: CORS applies);
        its errors are listed, fatal ones end the check (a non-fatal one was retried)."""
        page_html = (
            '<!doctype html><meta charset="utf-8"><link rel="icon" href="data:,">'
            '<script src="/hls.min.js"></script><video id="v" muted playsinline></video><script>'
            "window.hlsErrors=[];const v=document.getElementById('v');"
            "const h=new Hls({enableWorker:false});"
            "h.on(Hls.Events.ERROR,(_e,d)=>window.hlsErrors.push(`${d.type}:${d.details}:${d.fatal}`));"
            f"h.loadSource({json.dumps(url)});h.attachMedia(v);"
            "h.on(Hls.Events.MANIFEST_PARSED,()=>v.play());</script>"
        )

        async def page(_r: web.Request) -> web.Response:
            return web.Response(text=page_html, content_type="text/html")

        async def script(_r: web.Request) -> web.FileResponse:
            return web.FileResponse(HLS_JS, headers={"Content-Type": "text/javascript"})

        app = web.Application()
        app.router.add_get("/player.html", page)
        app.router.add_get("/hls.min.js", script)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}"
        try:
            async with Browser.launch(self.work / "chromium") as browser:
                pg = await browser.new_page()
                await pg.goto(base + "/player.html")
                await pg.wait_for(
                    "document.getElementById('v').currentTime >= 5"
                    " || window.hlsErrors.some((e) => e.endsWith(':true'))",
                    timeout_s=60,
                )
                return {
                    "current_time_s": await pg.evaluate("document.getElementById('v').currentTime"),
                    "errors": await pg.evaluate("window.hlsErrors"),
                }
        except Exception as exc:  # noqa: BLE001 (reported in the summary, not fatal)
            return {"error": f"{type(exc).__name__}: {exc}"[:300]}
        finally:
            await runner.cleanup()

    async def faults(
        self, coord: RoutingCoordinator, faults: list[dict[str, Any]], t0: float
    ) -> None:
        """SIGKILL the busiest node at 40% of the run (restarted 10 s later, as systemd does),
        partition the first LAN pair at 55% for 20 s, and take R2 down for 60 s at 65%."""
        at = self.sc.duration_s

        def now() -> float:
            return round(time.monotonic() - t0, 1)

        await asyncio.sleep(max(0.0, 0.4 * at - (time.monotonic() - t0)))
        victim = max(coord.by_index.values(), key=lambda v: v.streams)
        node = self.nodes[victim.index]
        if node.proc is not None:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()
        faults.append(
            {"t": now(), "fault": "sigkill", "node": victim.index, "streams": victim.streams}
        )
        log(f"fault: SIGKILL node{victim.index} with {victim.streams} streams")
        # systemd restarts a killed daemon (Restart=on-failure); items only it holds come back.
        await asyncio.sleep(10)
        await asyncio.to_thread(node.start, wait=False)
        faults.append({"t": now(), "fault": "restart", "node": victim.index})
        if self.sc.lan_pairs:
            await asyncio.sleep(max(0.0, 0.55 * at - (time.monotonic() - t0)))
            a = self.sc.lan_pairs[0][0]
            self.net.partition(a)
            faults.append({"t": now(), "fault": "partition", "homes": list(self.sc.lan_pairs[0])})
            await asyncio.sleep(20)
            self.net.heal(a)
            faults.append({"t": now(), "fault": "heal", "homes": list(self.sc.lan_pairs[0])})
        await asyncio.sleep(max(0.0, 0.65 * at - (time.monotonic() - t0)))
        self.r2_down = True
        faults.append({"t": now(), "fault": "r2_down"})
        log("fault: R2 down for 60 s")
        await asyncio.sleep(60)
        self.r2_down = False
        faults.append({"t": now(), "fault": "r2_up"})

    # -- results -------------------------------------------------------------------------------

    def summarise(
        self,
        policy: str,
        res: dict[str, Any],
        ops: list[tuple[str, str, str]],
        coord: RoutingCoordinator,
        trace: list[Arrival],
    ) -> dict[str, Any]:
        """The summary object of one policy (and its per-viewer file)."""
        stats: list[ViewerStats] = res["stats"]
        startups = sorted(s.startup_s for s in stats if s.startup_s is not None and not s.gave_up)
        stall = sum(s.stall_s for s in stats)
        played = sum(s.played_s for s in stats)
        by_source: dict[str, float] = {}
        for s in stats:
            for k, v in s.bytes_by_source.items():
                by_source[k] = by_source.get(k, 0) + v
        nodes_served: dict[str, float] = {}
        for m in res["node_metrics"].values():
            for k, v in m.items():
                nodes_served[k] = nodes_served.get(k, 0.0) + v
        class_a = sum(1 for m, p, _ in ops if _r2_class(m, p) == 0)
        class_b = sum(1 for m, p, _ in ops if _r2_class(m, p) == 1)
        stored = (res["bucket_bytes_before"] + res["bucket_bytes_after"]) / 2
        wall = res["wall_s"]
        gb_months = stored / 1e9 * wall / MONTH_S
        cost = (
            class_a * PRICE_CLASS_A + class_b * PRICE_CLASS_B + gb_months * PRICE_STORAGE_GB_MONTH
        )
        minutes = played / 60
        total_bytes = sum(by_source.values())
        node_bytes = by_source.get("node", 0)
        r2_read = (
            nodes_served.get("fetched_r2", 0.0)
            + by_source.get("r2", 0)
            + by_source.get("r2_redirect", 0)
        )
        bound = self.bound(
            stats,
            nodes_served.get("fetched_r2", 0.0),
            nodes_served.get("fetched_lan", 0.0),
            by_source.get("r2", 0) + by_source.get("r2_redirect", 0),
        )
        bound["viewer_bytes_over_uplinks"] = self.over_uplinks(res["series"])
        out = {
            "policy": policy,
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
            "node_share": round(node_bytes / max(total_bytes, 1), 4),
            "node_bytes_by_origin": {
                k: v for k, v in nodes_served.items() if k.startswith(("served_", "fetched_"))
            },
            "r2_read_bytes": r2_read,
            "r2_class_a": class_a,
            "r2_class_b": class_b,
            "r2_class_a_setup": sum(len(i.blobs) + 1 for i in self.library),
            "r2_gb_months": gb_months,
            "r2_bucket_bytes": {
                "before": res["bucket_bytes_before"],
                "after": res["bucket_bytes_after"],
            },
            "corrupt_bytes": sum(s.corrupt_bytes for s in stats),
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
            "bound": bound,
            "fetch_waste": self.fetch_waste(stats, ops, res["r2_clients"]),
            "r2_budget": self.r2_budget_check(
                policy, res["r2_since_start"][0], res["r2_since_start"][1], res["r2_at_stop"]
            ),
            "node_counters": res["node_counters"],
            "faults": res["faults"],
            "fault_impact": _fault_impact(stats, res["faults"]),
            "checks": res["checks"],
            "wall_s": round(wall, 1),
        }
        (self.out / f"{policy}.json").write_text(
            json.dumps(
                {
                    "summary": out,
                    "series": res["series"],
                    "viewers": [{**asdict(s), "blobs": len(s.blobs)} for s in stats],
                },
                default=float,
            )
        )
        return out

    def bound(
        self, stats: list[ViewerStats], fetched_r2: float, fetched_lan: float, viewer_r2: float
    ) -> dict[str, Any]:
        """Offline bounds on what the nodes fetched, from the blobs viewers asked them for,
        replayed in the order asked on caches of the store quota holding the initial placement.

        * Per node (LRU, and Belady's furthest-next-use): the bytes a node had to fetch from R2
          or a LAN peer, against ``fetched_r2 + fetched_lan`` (prefetch included).
        * R2 bytes (README "Testbed"): every byte read out of the bucket, by nodes
          (``fetched_r2``) and by viewers sent there or redirected (``viewer_r2``). The bound
          keeps the viewers' requests and routing as they were (the same renditions, so the
          same stall rate) and replaces the nodes' cache decisions by Belady's, with a LAN pair
          as one cache of both quotas (a blob either holds costs the other no R2 read)."""
        size: dict[str, int] = {}
        for i in self.library:
            size.update({c: len(b) for c, b in i.blobs.items()})
        index = {c: k for k, c in enumerate(size)}
        sizes = list(size.values())
        place = self.placement()
        asked = sorted((t, node, cid) for s in stats for t, node, cid in s.blobs)

        def replay(nodes: set[int], pol: str) -> int:
            seq = [index[c] for _, node, c in asked if node in nodes]
            initial = sorted(
                {index[c] for n in nodes for k in place[n] for c in self.library[k].blobs}
            )
            return cache_misses(seq, sizes, self.quota() * len(nodes), initial, pol)

        groups = [set(p) for p in self.sc.lan_pairs]
        groups += [{n} for n in range(self.sc.nodes) if not any(n in g for g in groups)]
        lru = sum(replay({n}, "lru") for n in range(self.sc.nodes))
        belady = sum(replay({n}, "belady") for n in range(self.sc.nodes))
        r2_belady = sum(replay(g, "belady") for g in groups)
        measured = fetched_r2 + fetched_lan
        r2_measured = fetched_r2 + viewer_r2
        r2_bound = r2_belady + viewer_r2
        return {
            "node_fetch_bytes_measured": measured,
            "node_fetch_bytes_lru": lru,
            "node_fetch_bytes_belady": belady,
            "measured_over_belady": round(measured / max(belady, 1), 3),
            "node_r2_fetch_bytes_measured": fetched_r2,
            "node_r2_fetch_bytes_belady": r2_belady,
            "viewer_r2_bytes": viewer_r2,
            "r2_bytes_measured": r2_measured,
            "r2_bytes_bound": r2_bound,
            "r2_over_bound": round(r2_measured / max(r2_bound, 1), 3),
        }

    def over_uplinks(self, series: list[dict[str, Any]], window_s: float = 10.0) -> float:
        """Bytes viewers received beyond what every node's uplink together could have sent in
        the same ``window_s`` (from the run's samples): what no routing could have kept off
        the bucket, were players unable to shift bytes by more than a window (their buffer
        holds at most ``PlayerConfig.max_buffer_s``); a yardstick for ``viewer_r2_bytes``."""
        rate = sum(self.sc.uplinks_mbit) * 1e6 / 8
        over = 0.0
        last_t, last_b = 0.0, 0.0
        for row in series:
            if row["t"] - last_t < window_s and row is not series[-1]:
                continue
            got = float(sum(row["viewer_bytes"].values()))
            over += max(0.0, got - last_b - rate * (row["t"] - last_t))
            last_t, last_b = row["t"], got
        return over

    def blob_roles(self) -> dict[str, tuple[int, str, int]]:
        """Every blob of the library: (item, rendition id, segment number; -1 for an init)."""
        out: dict[str, tuple[int, str, int]] = {}
        for k, item in enumerate(self.library):
            for r in item.manifest.renditions:
                if r.init:
                    out[r.init] = (k, r.id, -1)
                for n, seg in enumerate(r.segments):
                    if seg.cid is not None:
                        out[seg.cid] = (k, r.id, n)
        return out

    def fetch_waste(
        self, stats: list[ViewerStats], ops: list[tuple[str, str, str]], clients: list[str]
    ) -> dict[str, Any]:
        """Where the nodes' R2 reads of blobs went. Each blob GET a node made (seen at the
        bucket's proxy from the node's address) is one of: ``needed`` (first read of a blob a
        viewer asked that node for, not placed on it), ``refetch_placed`` (placed on it at the
        start, so evicted and read back), ``repeat`` (read again by the same node),
        ``unasked_other_rendition`` (no viewer asked that node for it, but for the same segment
        of another rendition: a prefetch the player's ABR switch left unused), ``unasked``.
        Bytes per kind, per node and in all; HEADs (eviction checks) and PUTs (pushes) counted."""
        size = {c: len(b) for i in self.library for c, b in i.blobs.items()}
        roles = self.blob_roles()
        place = self.placement()
        by_addr = {h.addr: h.index for h in self.net.homes}
        asked: dict[int, set[str]] = {}
        for s in stats:
            for _, node, cid in s.blobs:
                asked.setdefault(node, set()).add(cid)
        sibling: dict[int, set[tuple[int, int]]] = {
            n: {(roles[c][0], roles[c][2]) for c in cids} for n, cids in asked.items()
        }
        kinds = ("needed", "refetch_placed", "repeat", "unasked_other_rendition", "unasked")
        per: dict[int, dict[str, float]] = {}
        seen: set[tuple[int, str]] = set()
        for (method, path, fault), addr in zip(ops, clients, strict=True):
            home = by_addr.get(addr)
            if home is None or fault != "ok" or "/blobs/" not in path:
                continue
            node = home
            row = per.setdefault(node, {**dict.fromkeys(kinds, 0.0), "heads": 0, "puts": 0})
            cid = path.rsplit("/", 1)[1].split("?", 1)[0]
            if method == "HEAD":
                row["heads"] += 1
            elif method == "PUT":
                row["puts"] += 1
            if method != "GET" or cid not in size:
                continue
            k, _, seg = roles[cid]
            if (node, cid) in seen:
                kind = "repeat"
            elif k in place[node]:
                kind = "refetch_placed"
            elif cid in asked.get(node, set()):
                kind = "needed"
            elif (k, seg) in sibling.get(node, set()):
                kind = "unasked_other_rendition"
            else:
                kind = "unasked"
            seen.add((node, cid))
            row[kind] += size[cid]
        total = {key: sum(r[key] for r in per.values()) for key in (*kinds, "heads", "puts")}
        return {"total": total, "per_node": {f"node{n}": r for n, r in sorted(per.items())}}

    def r2_budget_check(
        self,
        policy: str,
        ops: list[tuple[str, str, str]],
        clients: list[str],
        at_stop: tuple[list[tuple[str, str, str]], list[str]],
    ) -> dict[str, Any]:
        """Per node, the R2 operations it made from its start to its stop (seen at the bucket's
        proxy from its address) against the budgets it was configured with
        (:func:`run_budgets`), and whether every node kept within them; those of the stop at
        the run's end, when each node uploads the last copies it holds, are also given apart
        (``at_stop_*``). Viewers' own reads (sent to the bucket, or redirected there by a node)
        are no node's operations: listed apart, outside the verdict."""
        configured = policy not in ("no_r2", "all_r2")
        budget = {**run_budgets(self.sc), **self.sc.node_set.get("r2", {})}  # as start_nodes
        limit_a = budget["budget_class_a_per_month"] if configured else 0
        limit_b = budget["budget_class_b_per_month"] if configured else 0
        by_addr = {h.addr: h.index for h in self.net.homes}
        used = {n: [0, 0] for n in range(self.sc.nodes)}
        stop = {n: [0, 0] for n in range(self.sc.nodes)}
        viewers = [0, 0]
        for tally, (log_, addrs) in ((used, (ops, clients)), (stop, at_stop)):
            for (method, path, _), addr in zip(log_, addrs, strict=True):
                cls = _r2_class(method, path)
                if cls is None:
                    continue
                node = by_addr.get(addr)
                (tally[node] if node is not None else viewers)[cls] += 1
        per_node = {
            f"node{n}": {
                "class_a": a + stop[n][0],
                "class_b": b + stop[n][1],
                "ok": a + stop[n][0] <= limit_a and b + stop[n][1] <= limit_b,
                "at_stop_class_a": stop[n][0],
                "at_stop_class_b": stop[n][1],
            }
            for n, (a, b) in used.items()
        }
        return {
            "per_month": list(self.sc.r2_budget_per_month) if configured else None,
            "days_per_month": self.sc.days_per_month,
            "budget_class_a": limit_a,
            "budget_class_b": limit_b,
            "per_node": per_node,
            "viewers_class_b": viewers[1],
            "pass": all(r["ok"] for r in per_node.values()),
        }

    def close(self) -> None:
        """Stop everything and remove the network."""
        self.stop_nodes()
        self.moto.stop()
        self.net.close()


def table(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table, one row per policy (README's figures)."""
    rows = [
        "| policy | viewers | startup p50 / p95 (s) | rebuffer | bytes from nodes | "
        "from R2 | R2 class A / B | R2 budget | corrupt | R2 cost ($) | Stream ($) | "
        "fetched / Belady | R2 bytes / bound |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary["policies"].items():
        by = s["bytes_by_source"]
        r2 = by.get("r2", 0) + by.get("r2_redirect", 0)
        rows.append(
            f"| {name} | {s['viewers']} | {s['startup_p50_s']:.2f} / {s['startup_p95_s']:.2f} "
            f"| {s['rebuffer_ratio']:.2%} | {by.get('node', 0) / 1e6:.0f} MB "
            f"({s['node_share']:.0%}) | {r2 / 1e6:.0f} MB | {s['r2_class_a']} / "
            f"{s['r2_class_b']} | {_budget_cell(s.get('r2_budget'))} | {s['corrupt_bytes']} | "
            f"{s['cost_usd']:.4f} | {s['stream_cost_usd']:.4f} | "
            f"{s['bound']['measured_over_belady']:.2f} | "
            f"{s['bound'].get('r2_over_bound', float('nan')):.2f} |"
        )
    return "\n".join(rows) + "\n"


def run_budgets(sc: Scenario) -> dict[str, int]:
    """The ``[r2]`` request budgets of every node in one run: a month's over the month's days,
    because a run is one compressed day and its fresh state dir starts the node's month."""
    a, b = sc.r2_budget_per_month
    return {
        "budget_class_a_per_month": math.ceil(a / sc.days_per_month),
        "budget_class_b_per_month": math.ceil(b / sc.days_per_month),
    }


def _r2_class(method: str, path: str) -> int | None:
    """0 for a class A operation (writes, lists), 1 for class B (reads), None if free."""
    listing = "list-type" in path or re.search(r"[?&]uploads(?:[=&]|$)", path) is not None
    if method in ("PUT", "POST") or (method == "GET" and listing):
        return 0
    if method in ("GET", "HEAD"):
        return 1
    return None


def _budget_cell(b: dict[str, Any] | None) -> str:
    """Most class A / B operations one node made against its run's budget, and the verdict."""
    if not b:
        return "-"
    most_a = max((r["class_a"] for r in b["per_node"].values()), default=0)
    most_b = max((r["class_b"] for r in b["per_node"].values()), default=0)
    if b["per_month"] is None:
        return f"{most_a} / {most_b}, none set"
    verdict = "pass" if b["pass"] else "FAIL"
    return f"{most_a} / {most_b} of {b['budget_class_a']} / {b['budget_class_b']}: {verdict}"


def _fault_impact(stats: list[ViewerStats], faults: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per fault: stalls that ended in its window (20 s after it; an outage: until it ends),
    the viewers who arrived in it (how many gave up, startup p95 of the others), and for a
    SIGKILL the viewers of the node then playing and their longest stall."""
    out = []
    for k, f in enumerate(faults):
        if f["fault"] in ("heal", "r2_up", "restart"):
            continue
        end = f["t"] + 20.0
        if f["fault"] in ("partition", "r2_down"):
            end = next((g["t"] for g in faults[k + 1 :] if g["fault"] in ("heal", "r2_up")), end)
            end += 10.0
        window = [(t, d) for s in stats for t, d in s.stall_times if f["t"] <= t <= end]
        row: dict[str, Any] = {
            **f,
            "window_s": round(end - f["t"], 1),
            "stalls": len(window),
            "stall_s": round(sum(d for _, d in window), 2),
            "corrupt_bytes": sum(s.corrupt_bytes for s in stats),
        }
        arrived = [s for s in stats if f["t"] <= s.arrived <= end]
        started = [s.startup_s for s in arrived if s.startup_s is not None and not s.gave_up]
        row["arrived"] = len(arrived)
        row["arrived_gave_up"] = sum(1 for s in arrived if s.gave_up)
        row["arrived_startup_p95_s"] = round(_pct(sorted(started), 95), 3)
        if f["fault"] == "sigkill":
            hit = [s for s in stats if f["node"] in s.nodes and s.arrived <= f["t"] <= s.ended]
            worst = [max((d for t, d in s.stall_times if t >= f["t"]), default=0.0) for s in hit]
            row["viewers_on_node"] = len(hit)
            row["moved"] = sum(1 for s in hit if s.reroutes > 0)
            row["gave_up"] = sum(1 for s in hit if s.gave_up)
            row["longest_stall_s"] = round(max(worst, default=0.0), 2)
        out.append(row)
    return out


def _pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    if len(xs) == 1:
        return xs[0]
    return statistics.quantiles(xs, n=100, method="inclusive")[int(p) - 1]


async def amain(sc: Scenario, out: Path) -> int:
    """Run every policy; write the summary and plots."""
    tb = Testbed(sc, out)
    main = asyncio.current_task()
    assert main is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        # Stopped early (even from a background shell, where SIGINT is ignored): cancel, so the
        # daemons stop and the namespaces go.
        loop.add_signal_handler(sig, main.cancel)
    try:
        await asyncio.to_thread(tb.setup)
        tb.proxy = FaultProxy(
            "127.0.0.1", tb.moto.port, latency_s=sc.r2_latency_s, host=tb.net.host_addr
        )
        tb.proxy.add(lambda _r: tb.r2_down, Fault("status", 503), times=10**9)
        await tb.proxy.start()
        trace = make_trace(
            seed=sc.seed,
            duration_s=sc.duration_s,
            mean_per_s=sc.mean_per_s,
            peak_ratio=sc.peak_ratio,
            items=sc.items,
            zipf_s=sc.zipf_s,
        )
        log(f"trace: {len(trace)} viewers over {sc.duration_s:.0f} s")
        summary: dict[str, Any] = {
            "scenario": asdict(sc),
            "bridge": tb.net.bridge,
            "total_uplink_mbit": sum(sc.uplinks_mbit),
            "peak_demand_mbit": _peak_demand(tb.library, trace, sc),
            "policies": {},
        }
        for policy in sc.policies:
            summary["policies"][policy] = await tb.run_policy(policy, trace)
            (out / "summary.json").write_text(json.dumps(summary, indent=1, default=float))
        plots.write_all(out, sc.policies)
        (out / "table.md").write_text(table(summary))
        log(f"wrote {out / 'summary.json'}")
        return 0
    finally:
        if tb.proxy is not None:
            await tb.proxy.stop()
        tb.close()


def _peak_demand(library: list[Item], trace: list[Arrival], sc: Scenario) -> float:
    """Peak over 5 s windows of the top-rung bit rate of viewers watching at once (Mbit/s)."""
    worst = 0.0
    t = 0.0
    while t < sc.duration_s:
        bits = sum(
            max(r.bandwidth for r in library[a.item].manifest.renditions)
            for a in trace
            if a.at_s <= t < a.at_s + library[a.item].duration_s
        )
        worst = max(worst, bits / 1e6)
        t += 5.0
    return round(worst, 1)


def main() -> int:
    """Command line."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="4 nodes, one policy, a few minutes")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--policies", help="comma-separated: peerd,lru,no_r2,all_r2")
    ap.add_argument("--faults", action="store_true", help="SIGKILL, partition, R2 outage")
    ap.add_argument("--duration", type=float, help="seconds of arrivals per policy")
    ap.add_argument(
        "--node-set",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="extra node config (JSON value, else a string; {uplink_mbit} is the node's); "
        "the default sets uplink.budget_mbps={uplink_mbit} (uplink.budget_mbps=0: no admission)",
    )
    ap.add_argument(
        "--manifests",
        choices=["all", "placed"],
        help="manifests in each catalog: every item's, or (default) its own items' only",
    )
    ap.add_argument(
        "--route",
        choices=["holders", "any"],
        help="coordinator: (default) any node that can get the item, or holders and their "
        "LAN partners (and any node only for items in the bucket)",
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("the testbed needs root (network namespaces, tc)", file=sys.stderr)
        return 2
    sc = quick() if args.quick else full()
    if args.policies:
        sc.policies = args.policies.split(",")
    if args.faults:
        sc.faults = True
    if args.duration:
        sc.duration_s = args.duration
    for item in args.node_set:
        key, _, raw = item.partition("=")
        section, _, name = key.partition(".")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        sc.node_set.setdefault(section, {})[name] = value
    sc.manifests = args.manifests or sc.manifests
    sc.route = args.route or sc.route
    args.out.mkdir(parents=True, exist_ok=True)
    return asyncio.run(amain(sc, args.out.resolve()))


if __name__ == "__main__":
    sys.exit(main())
