#!/usr/bin/env python3
"""Transfer times through the testbed's shaped uplink, by how many others shared it.

The testbed caps each home's uplink with ``tbf`` (``scripts/testbed/netns.py``: 50 ms of
queue, a burst of 10 ms or 16 kB). TCP flows sharing it fill the queue and lose packets; a lost
tail waits for a probe or a retransmission timeout (200 ms at least: the path's own RTT is the
bridge's, a fraction of a millisecond, since the testbed adds the homes' RTTs in user space,
before each request, where TCP never sees them; so does this bench, by adding none).

For each rate (``--mbits``, the testbed's 5-12 Mbit/s) one home namespace serves bodies of the
testbed's sizes (a playlist, an init segment, a 180p and a 360p segment) from an aiohttp server
with keep-alive, as peerd does; the host fetches them through one shared client session (no
connection limit), as the driver's players do. Arrivals are Poisson at offered loads
``--loads`` (fractions of the rate; ``--phase-s`` each), the sizes mixed as a player asks for
them. Each transfer records its size, its time, and how many others were in flight on the link
when it started. Its *excess* is its time less what it would take on an ideal link shared
equally by the same transfers (:class:`scripts.testbed.fluid.Link` replaying the measured
arrivals): what TCP's recovery at the shaper adds. ``--table OUT.json`` writes the excess as
quantiles per (rate, size class, others in flight); ``scripts/testbed/sim.py`` draws each
flow's extra time from it (``scripts/testbed/tbf_excess.json`` is this command's output:

    python scripts/bench/tbf_goodput.py --table scripts/testbed/tbf_excess.json

Needs root (namespaces); about 2.5 minutes with the defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from peerd.core.ids import cid_of  # noqa: E402
from scripts.testbed.fluid import Link  # noqa: E402
from scripts.testbed.netns import Network  # noqa: E402

# The testbed library's bodies (DIR/work/media): a playlist, an init segment, the medians of
# the 180p and 360p segments; weights as a player asks (3 playlists and 2 inits to start, then
# a segment per 2 s, mostly 360p once its ABR has a measure).
SIZES = {"small": 600, "seg180": 62_400, "seg360": 199_500}
WEIGHTS = {"small": 0.3, "seg180": 0.3, "seg360": 0.4}
SMALL = [400, 830]
# "others in flight when it started" as the table's rows: 0, 1, 2, 3-4, 5-7, 8 or more
OTHERS = [0, 1, 2, 3, 5, 8]
QUANTILES = [i / 100 for i in range(0, 100, 5)] + [0.97, 0.99, 1.0]


def others_row(n: int) -> int:
    """The table row of ``n`` others in flight (its lower bound in :data:`OTHERS`)."""
    return max(b for b in OTHERS if b <= n)


def serve(port: int) -> None:
    """The server half (run inside the home's namespace)."""
    bodies = {s: os.urandom(s) for s in [*SIZES.values(), *SMALL]}

    async def body(r: web.Request) -> web.Response:
        return web.Response(body=bodies[int(r.match_info["size"])])

    app = web.Application()
    app.router.add_get("/b/{size}", body)
    web.run_app(app, host="0.0.0.0", port=port, print=None)  # noqa: S104


async def phase(
    s: aiohttp.ClientSession, base: str, rate: float, load: float, secs: float, rng: random.Random
) -> list[dict[str, Any]]:
    """Poisson arrivals offering ``load`` of ``rate`` bytes/s for ``secs``."""
    mean = sum(WEIGHTS[k] * SIZES[k] for k in SIZES)
    per_s = load * rate / mean
    inflight = 0
    out: list[dict[str, Any]] = []
    t0 = time.monotonic()

    async def one(size: int) -> None:
        nonlocal inflight
        rec = {"start": time.monotonic() - t0, "others": inflight, "size": size}
        inflight += 1
        t = time.monotonic()
        try:
            async with s.get(f"{base}/b/{size}") as r:
                await r.read()
        finally:
            inflight -= 1
        rec["time"] = time.monotonic() - t
        out.append(rec)

    tasks = []
    while time.monotonic() - t0 < secs:
        kind = rng.choices(list(WEIGHTS), list(WEIGHTS.values()))[0]
        size = rng.choice(SMALL) if kind == "small" else SIZES[kind]
        tasks.append(asyncio.create_task(one(size)))
        await asyncio.sleep(rng.expovariate(per_s))
    await asyncio.gather(*tasks)
    ideal(out, rate)
    return out


def ideal(recs: list[dict[str, Any]], rate: float) -> None:
    """Each record's ``ideal`` time: the same arrivals on a link shared equally
    (:class:`Link`), and ``excess``: the measured time less it."""
    link = Link(rate)
    order = sorted(range(len(recs)), key=lambda i: recs[i]["start"])
    done: dict[int, float] = {}
    k = 0
    now = 0.0
    while k < len(order) or link.flows:
        nxt = recs[order[k]]["start"] if k < len(order) else float("inf")
        fin = link.next_done()
        if fin <= nxt:
            now = fin
            for fid in link.pop_done(now):
                done[fid] = now
        else:
            now = nxt
            link.add(order[k], float(recs[order[k]]["size"]), now)
            k += 1
    for i, r in enumerate(recs):
        r["ideal"] = done[i] - r["start"]
        r["excess"] = max(0.0, r["time"] - r["ideal"])


def size_class(size: int) -> str:
    """``small``, ``seg180`` or ``seg360``: the nearest of :data:`SIZES`."""
    return min(SIZES, key=lambda k: abs(SIZES[k] - size))


def quantiles(xs: list[float]) -> list[float]:
    """:data:`QUANTILES` of ``xs`` (nearest rank)."""
    ys = sorted(xs)
    return [round(ys[min(len(ys) - 1, int(q * len(ys)))], 4) for q in QUANTILES]


def table(recs: list[dict[str, Any]], command: str) -> dict[str, Any]:
    """The excess as quantiles per (rate, size class, others row), and per (size class, others
    row) over every rate (where a cell has few transfers)."""
    cells: dict[str, list[float]] = {}
    for r in recs:
        row = others_row(r["others"])
        cls = size_class(r["size"])
        cells.setdefault(f"{r['mbit']:g}/{cls}/{row}", []).append(r["excess"])
        cells.setdefault(f"*/{cls}/{row}", []).append(r["excess"])
    return {
        "command": command,
        "what": "seconds a transfer took past an equal share of the shaped link "
        "(scripts/bench/tbf_goodput.py doc); key: rate Mbit/s or *, size class, others row",
        "sizes": SIZES,
        "others_rows": OTHERS,
        "quantiles": QUANTILES,
        "cells": {
            k: {"n": len(v), "q": quantiles(v)} for k, v in sorted(cells.items()) if len(v) >= 5
        },
    }


async def measure(
    url: str, mbit: float, loads: list[float], secs: float, seed: int
) -> list[dict[str, Any]]:
    """Every phase on one home; records carry ``mbit`` and ``load``."""
    rate = mbit * 1e6 / 8
    rng = random.Random(seed)
    recs: list[dict[str, Any]] = []
    conn = aiohttp.TCPConnector(limit=0, limit_per_host=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        for load in loads:
            got = await phase(s, url, rate, load, secs, rng)
            for r in got:
                r["mbit"], r["load"] = mbit, load
            recs += got
            ex = [r["excess"] for r in got]
            big = [r["excess"] for r in got if r["others"] >= 3]
            print(
                f"{mbit:g} Mbit/s load {load:.2f}: {len(got)} transfers, excess p50 "
                f"{statistics.median(ex):.3f} s p95 {quantiles(ex)[19]:.3f} s; "
                f"with 3+ others: {len(big)}, p95 {quantiles(big)[19] if big else 0:.3f} s",
                flush=True,
            )
            await asyncio.sleep(1.0)
    return recs


async def player_cpu(url: str, n: int) -> dict[str, float]:
    """CPU seconds the player's side spends per GET (aiohttp's client, and the hash of the
    body that ``player.Player._get`` checks), per size class, from a loopback server."""
    out: dict[str, float] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        for cls, size in (
            ("small", SMALL[0]),
            ("seg180", SIZES["seg180"]),
            ("seg360", SIZES["seg360"]),
        ):
            c0 = time.process_time()
            for _ in range(n):
                async with s.get(f"{url}/b/{size}") as r:
                    cid_of(await r.read())
            out[cls] = (time.process_time() - c0) / n
    return out


def main() -> int:
    """Command line (see the module doc)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mbits", default="5,8,12", help="uplink rates, Mbit/s")
    ap.add_argument("--loads", default="0.3,0.6,0.85,1.0", help="offered loads (of the rate)")
    ap.add_argument("--phase-s", type=float, default=12.0)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--table", type=Path, help="write the excess quantile table here")
    ap.add_argument("--raw", type=Path, help="write every transfer's record here (JSON)")
    ap.add_argument("--player-cpu", type=int, metavar="N", help="only the player's CPU per GET")
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve(args.serve)
        return 0
    if args.player_cpu:
        server = subprocess.Popen([sys.executable, __file__, "--serve", "8998"])  # noqa: S603
        try:
            time.sleep(2.0)
            cpu = asyncio.run(player_cpu("http://127.0.0.1:8998", args.player_cpu))
        finally:
            server.terminate()
            server.wait()
        print("player CPU per GET (ms): " + ", ".join(f"{k} {v * 1e3:.3f}" for k, v in cpu.items()))
        return 0
    mbits = [float(x) for x in args.mbits.split(",")]
    loads = [float(x) for x in args.loads.split(",")]
    net = Network().build(mbits, [0.0] * len(mbits), [])
    recs: list[dict[str, Any]] = []
    try:
        for home, mbit in zip(net.homes, mbits, strict=True):
            server = subprocess.Popen(  # noqa: S603
                ["ip", "netns", "exec", home.ns, sys.executable, __file__, "--serve", "8999"],  # noqa: S607
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                time.sleep(2.0)
                recs += asyncio.run(
                    measure(f"http://{home.addr}:8999", mbit, loads, args.phase_s, args.seed)
                )
            finally:
                server.terminate()
                server.wait()
    finally:
        net.close()
    if args.raw:
        args.raw.write_text(json.dumps(recs))
    if args.table:
        cmd = "python scripts/bench/tbf_goodput.py " + " ".join(sys.argv[1:])
        args.table.write_text(json.dumps(table(recs, cmd), indent=1) + "\n")
        print(f"wrote {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
