"""Load on the viewer swarm's tracker: N simulated peers announcing to a real daemon.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench/swarm_bench.py [--peers 1000] [--media 10]

Starts ``peerd run`` on loopback with the default ``[swarm]`` settings; N peers
(``tests/support/swarmpeers.py``: raw tracker clients on aiohttp WebSockets, fake SDP) spread
over ``--media`` media items x 2 streams connect with a viewer token each, announce once with 5
offers (what bittorrent-tracker's client sends), and answer every offer relayed to them. Reports
the daemon's CPU seconds (utime + stime from /proc) for that phase, its RSS before and with every
peer connected, and as the anchor the daemon's CPU seconds for 1,000 ``GET /healthz`` in the
same run (the cheapest request it serves), with the ratio per message.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import aiohttp  # noqa: E402

from peerd.core import tokens  # noqa: E402
from tests.support.process import PeerdProcess  # noqa: E402
from tests.support.swarmpeers import binary_id, simulate  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """utime + stime of ``pid``, seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mib(pid: int) -> float:
    """Resident set size of ``pid``, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def anchor(base_url: str, pid: int, n: int = 1000) -> float:
    """The daemon's CPU seconds for ``n`` sequential ``GET /healthz`` on one connection."""
    async with aiohttp.ClientSession() as s:
        before = cpu_s(pid)
        for _ in range(n):
            async with s.get(base_url + "/healthz") as r:
                await r.read()
        return cpu_s(pid) - before


async def bench(peers: int, media: int) -> None:
    """Run one daemon, the anchor, then the peers; print the figures."""
    with tempfile.TemporaryDirectory(prefix="swarm-bench-") as tmp:
        proc = PeerdProcess(Path(tmp) / "node", config={"log": {"level": "warning"}})
        await asyncio.to_thread(proc.start)
        try:
            assert proc.proc is not None
            pid = proc.proc.pid
            key = (proc.state_dir / "secrets" / "hls_signing_key").read_text().strip().encode()
            expires = int(time.time()) + 3600
            swarms = []
            for i in range(media):
                media_id = "b" + f"{i:058d}".translate(str.maketrans("0123456789", "abcdefghij"))
                token = tokens.mint(key, media_id, "hls", expires)
                swarms += [(media_id, token, binary_id()) for _ in range(2)]
            healthz_cpu = await anchor(proc.base_url, pid)
            rss_before = rss_mib(pid)
            rss_connected = 0.0

            async def sample() -> None:
                nonlocal rss_connected
                rss_connected = rss_mib(pid)

            before = cpu_s(pid)
            started = time.monotonic()
            totals = await simulate(
                proc.base_url, swarms, peers, offers=5, timeout_s=600, connected=sample
            )
            wall = time.monotonic() - started
            cpu = cpu_s(pid) - before
        finally:
            proc.stop()
    messages = peers + totals.offers  # announces in, answers in (one per offer relayed)
    print(f"peers                 {peers} over {len(swarms)} swarms ({media} media x 2 streams)")
    print(
        f"connected / replies   {totals.connected} / {totals.replies}, failures "
        f"{totals.failures}, errors {len(totals.errors)}"
    )
    print(f"offers relayed        {totals.offers}, answers relayed {totals.answers}")
    print(
        f"daemon CPU            {cpu:.2f} s for the phase ({wall:.1f} s wall, "
        f"{1000 * cpu / messages:.3f} ms per message received)"
    )
    print(
        f"daemon RSS            {rss_before:.1f} MiB before, {rss_connected:.1f} MiB with "
        f"{totals.connected} peers connected (+{(rss_connected - rss_before) * 1024 / peers:.1f}"
        " KiB per peer)"
    )
    print(
        f"anchor                {healthz_cpu:.2f} s daemon CPU for 1000 GET /healthz "
        f"({healthz_cpu:.3f} ms each)"
    )
    print(
        f"ratio                 one tracker message = "
        f"{(cpu / messages) / (healthz_cpu / 1000):.2f} x one GET /healthz"
    )
    if totals.errors:
        print("first error:", totals.errors[0])


def main() -> int:
    """Parse the arguments and run."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--peers", type=int, default=1000)
    ap.add_argument("--media", type=int, default=10)
    args = ap.parse_args()
    asyncio.run(bench(args.peers, args.media))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
