#!/usr/bin/env python3
"""Goodput of the testbed's shaped uplink when several segment transfers share it.

The testbed caps each home's uplink with ``tbf`` (``scripts/testbed/netns.py``: 50 ms of queue,
a burst of 10 ms or 16 kB). TCP flows sharing it fill the queue and lose packets, so the link
carries less than its rate; the simulator (``scripts/testbed/fluid.py``) takes the figure
measured here. One home namespace with a 6 Mbit/s uplink serves a ``--size`` byte file over
HTTP (``python -m http.server`` inside the namespace); the host fetches it ``n`` times at once,
``--rounds`` times for each ``n``, and prints the median of ``n * size / (last finish) / rate``
(1.0: the shaper's nominal rate; above 1 for one or two flows, which ride the burst). Needs root
(namespaces); a few minutes.

    python scripts/bench/tbf_goodput.py [--size 62630] [--rounds 20] [--mbit 6]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from scripts.testbed.netns import Network  # noqa: E402


async def measure(url: str, size: int, rate: float, rounds: int) -> dict[int, float]:
    """Median goodput (fraction of ``rate``) per number of concurrent transfers."""
    out: dict[int, float] = {}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:

        async def one() -> float:
            t = time.monotonic()
            async with s.get(url) as r:
                await r.read()
            return time.monotonic() - t

        for n in (1, 2, 3, 4, 6, 8, 12, 16, 24):
            good = []
            for _ in range(rounds):
                times = await asyncio.gather(*(one() for _ in range(n)))
                good.append(n * size / max(times) / rate)
                await asyncio.sleep(0.3)
            out[n] = statistics.median(good)
            print(f"{n:3d} transfers at once: goodput {out[n]:.3f} of the rate", flush=True)
    return out


def main() -> int:
    """Command line (see the module doc)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=62630, help="bytes per transfer (a segment)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--mbit", type=float, default=6.0)
    args = ap.parse_args()
    net = Network().build([args.mbit], [0.02], [])
    home = net.homes[0]
    with tempfile.TemporaryDirectory() as www:
        (Path(www) / "seg").write_bytes(os.urandom(args.size))
        server = subprocess.Popen(  # noqa: S603
            ["ip", "netns", "exec", home.ns, sys.executable, "-m", "http.server", "8999"]  # noqa: S607
            + ["--bind", "0.0.0.0", "--directory", www],  # noqa: S104
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            time.sleep(1.5)
            res = asyncio.run(
                measure(f"http://{home.addr}:8999/seg", args.size, args.mbit * 1e6 / 8, args.rounds)
            )
        finally:
            server.terminate()
            server.wait()
            net.close()
    many = [g for n, g in res.items() if n >= 3]
    print(f"median over 3 or more at once: {statistics.median(many):.2f} of the rate")
    return 0


if __name__ == "__main__":
    sys.exit(main())
