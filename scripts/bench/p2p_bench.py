"""Peer-to-peer blob throughput against nginx serving the same blob, in one run.

Measures, on loopback, one blob of ``--mib`` MiB (default 64), ``--runs`` times each (median):

- nginx: one HTTP GET of the blob file (sendfile), read by an aiohttp client (the anchor);
- LAN HTTP node-to-node: a node-signed GET of ``/p2p/v1/blobs/<cid>`` from a running peerd
  daemon, read by the same client LanSource uses;
- libp2p per stream: ``/peerd/blob/1.0.0`` from the same daemon over TCP + Noise + yamux, read by
  an in-process peerd libp2p host in its trio thread through the asyncio bridge (what
  Libp2pSource does), one stream at a time.

Prints a JSON object with MB/s and the ratios; goals: LAN HTTP >= 0.8x nginx, libp2p >= 60 MB/s.
Output files go under /tmp/peerd-bench/p2p.

Usage: ``.venv/bin/python scripts/bench/p2p_bench.py [--mib 64] [--runs 7]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import aiohttp  # noqa: E402

from peerd.config import load_settings  # noqa: E402
from peerd.core.ids import cid_of  # noqa: E402
from peerd.core.signing import sign_headers  # noqa: E402
from peerd.identity import Identity  # noqa: E402
from peerd.p2p.service import P2PService  # noqa: E402
from peerd.runtime import open_runtime  # noqa: E402
from tests.support.p2p import p2p_addrs, seed_blobs  # noqa: E402
from tests.support.process import PeerdProcess  # noqa: E402

OUT = Path("/tmp/peerd-bench/p2p")
CHUNK = 256 * 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def http_rate(url: str, size: int, headers: dict[str, str] | None = None) -> float:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        t0 = time.perf_counter()
        async with s.get(url, headers=headers or {}) as r:
            assert r.status == 200, r.status
            n = 0
            async for chunk in r.content.iter_chunked(CHUNK):
                n += len(chunk)
        dt = time.perf_counter() - t0
    assert n == size, (n, size)
    return size / dt / 1e6


async def libp2p_rate(svc: P2PService, addr: str, cid: str, size: int) -> float:
    assert svc.node is not None
    peer = addr.rsplit("/p2p/", 1)[1]
    t0 = time.perf_counter()
    status, got_size, stream = await svc.bridge.call(svc.node.open_blob, peer, [addr], cid)
    assert status == 0, status
    assert got_size == size
    n = 0
    try:
        while n < size:
            chunk = await svc.bridge.call(svc.node.read, stream, min(1 << 20, size - n))
            if not chunk:
                break
            n += len(chunk)
    finally:
        await svc.bridge.call(svc.node.close_stream, stream)
    dt = time.perf_counter() - t0
    assert n == size, (n, size)
    return size / dt / 1e6


def shared_bench() -> Path:
    """The team's anchor scripts: ``../shared/bench`` from the repo root (or from a worktree)."""
    for base in (REPO.parent, REPO.parent.parent):
        if (base / "shared/bench/nginx_conf.sh").exists():
            return base / "shared/bench"
    raise SystemExit("cannot find shared/bench/nginx_conf.sh next to the repository")


async def measure(
    nginx_url: str, node: PeerdProcess, me: Identity, cid: str, size: int, runs: int
) -> dict[str, list[float]]:
    """Interleaved runs of the three transfers (a noisy neighbour hits all alike)."""
    results: dict[str, list[float]] = {"nginx": [], "lan_http": [], "libp2p": []}
    for _ in range(50):
        try:
            await http_rate(nginx_url, size)
            break
        except aiohttp.ClientError:
            await asyncio.sleep(0.1)
    addr = next(a for a in p2p_addrs(node.state_dir) if "/ws" not in a)
    async with AsyncExitStack() as stack:
        rt = await open_runtime(
            load_settings(
                None,
                node={"state_dir": OUT / "client"},
                p2p={"host": "127.0.0.1", "tcp_port": 0, "ws_port": 0, "provide": False},
            )
        )
        stack.push_async_callback(rt.close)
        svc = P2PService(rt)
        task = asyncio.create_task(svc.run(lambda: None))

        async def stop() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        stack.push_async_callback(stop)
        await asyncio.wait_for(svc.started.wait(), 30)
        path = f"/p2p/v1/blobs/{cid}"
        for _ in range(runs):
            results["nginx"].append(await http_rate(nginx_url, size))
            headers = sign_headers("GET", path, time.time(), me.peer_id, me.public_bytes, me.sign)
            results["lan_http"].append(await http_rate(node.base_url + path, size, headers))
            results["libp2p"].append(await libp2p_rate(svc, addr, cid, size))
    return results


def bench(mib: int, runs: int) -> dict[str, object]:
    """Set up nginx and a daemon holding the same blob, measure, report."""
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    data = os.urandom(mib * 1024 * 1024)
    cid = cid_of(data)
    size = len(data)
    me = Identity.generate()
    root = OUT / "www"
    root.mkdir()
    (root / cid).write_bytes(data)
    nport = free_port()
    conf = subprocess.run(  # noqa: S603
        [
            "bash",
            str(shared_bench() / "nginx_conf.sh"),
            str(root),
            str(nport),
            str(OUT / "nginx"),
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    nginx = subprocess.Popen(["nginx", "-p", str(OUT / "nginx"), "-c", conf])  # noqa: S603,S607
    node = PeerdProcess(
        OUT / "node",
        config={
            "p2p": {"enabled": True, "host": "127.0.0.1", "tcp_port": 0, "ws_port": 0},
            "mdns": {"trusted_peers": [me.peer_id]},
            "log": {"level": "info"},
        },
    )
    try:
        node.init()
        seed_blobs(node.state_dir, [data])
        node.start()
        results = asyncio.run(measure(f"http://127.0.0.1:{nport}/{cid}", node, me, cid, size, runs))
    finally:
        node.stop()
        nginx.terminate()
        nginx.wait()
    med = {k: round(statistics.median(v), 1) for k, v in results.items()}
    report: dict[str, object] = {
        "blob_mib": mib,
        "runs": runs,
        "median_MBps": med,
        "all_MBps": {k: [round(x, 1) for x in v] for k, v in results.items()},
        "lan_http_vs_nginx": round(med["lan_http"] / med["nginx"], 3),
        "libp2p_MBps_per_stream": med["libp2p"],
        "libp2p_vs_nginx": round(med["libp2p"] / med["nginx"], 3),
        "goals": {"lan_http_vs_nginx": 0.8, "libp2p_MBps_per_stream": 60},
    }
    (OUT / "result.json").write_text(json.dumps(report, indent=2))
    return report


def main() -> None:
    """Run the benchmark and print the JSON report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=64)
    ap.add_argument("--runs", type=int, default=7)
    args = ap.parse_args()
    print(json.dumps(bench(args.mib, args.runs), indent=2))


if __name__ == "__main__":
    main()
