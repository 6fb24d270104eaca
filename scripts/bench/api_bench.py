#!/usr/bin/env python3
"""Coordinator API benchmark: possession challenges and inventory digest against a live daemon.

Measures, over loopback against a real ``peerd run``:

1. challenge latency p50/p99 for 4 KiB and 1 MiB ranges (request -> signed answer), with an
   anchor measured in the same run: hashing the same bytes with hashlib in this process (the
   least any answer costs); the ratio shows the overhead of HTTP, auth, catalog and signing;
2. ``GET /api/v1/inventory`` first-page latency with ``--blobs`` rows in the catalog (the digest
   is recomputed after a change and cached otherwise: both cases are timed).

    python scripts/bench/api_bench.py [--blobs 100000] [--n 200] [--dir /tmp/peerd-bench/api]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import shutil
import statistics
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from peerd.config import load_settings  # noqa: E402
from peerd.runtime import open_runtime  # noqa: E402
from tests.support.process import PeerdProcess  # noqa: E402


async def seed(state: Path, blobs: int) -> tuple[str, bytes]:
    """One 4 MiB blob to challenge, plus ``blobs`` catalog rows for the inventory."""
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        data = os.urandom(4 * 1024 * 1024)
        cid = await rt.store.put(data)
        now = time.time()
        async with rt.catalog.transaction() as tx:
            rows = [(hashlib.sha256(i.to_bytes(8, "big")).hexdigest(), now) for i in range(blobs)]
            await tx.executemany(
                "INSERT INTO blobs(cid, size, local_state, created_at) "
                "VALUES('x' || ?, 1000, 'present', ?)",
                rows,
            )
        # The synthetic rows have no files: skip the start-up recovery that would mark them
        # absent (this is a catalog benchmark, not a crash test).
        await rt.catalog.set_state("clean_shutdown", "1")
    finally:
        await rt.close()
    return cid, data


def pct(xs: list[float], p: float) -> float:
    """Percentile in milliseconds."""
    xs = sorted(xs)
    return 1000 * xs[min(len(xs) - 1, int(p * len(xs)))]


async def bench(base: str, token: str, cid: str, data: bytes, n: int) -> None:
    """Run the measurements and print them."""
    headers = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        for length in (4096, 1024 * 1024):
            lat, anchor = [], []
            for _ in range(n):
                nonce = secrets.token_hex(16)
                offset = secrets.randbelow(len(data) - length)
                body = {"nonce": nonce, "cid": cid, "offset": offset, "length": length}
                t = time.perf_counter()
                async with s.post(base + "/api/v1/challenge", json=body) as r:
                    assert r.status == 200, await r.text()
                    await r.read()
                lat.append(time.perf_counter() - t)
                t = time.perf_counter()
                hashlib.sha256(bytes.fromhex(nonce) + data[offset : offset + length]).digest()
                anchor.append(time.perf_counter() - t)
            ratio = statistics.median(lat) / statistics.median(anchor)
            print(
                f"challenge {length:>8} B: p50 {pct(lat, 0.5):.2f} ms  p99 {pct(lat, 0.99):.2f} ms"
                f"  | anchor hashlib p50 {pct(anchor, 0.5):.3f} ms  ratio {ratio:.1f}x"
            )
        for label in ("digest recomputed", "digest cached"):
            t = time.perf_counter()
            async with s.get(base + "/api/v1/inventory", params={"limit": 500}) as r:
                assert r.status == 200
                count = (await r.json())["summary"]["count"]
            ms = 1000 * (time.perf_counter() - t)
            print(f"inventory page (500 items, {label}, {count} entries): {ms:.1f} ms")


def main() -> int:
    """Entry point."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--blobs", type=int, default=100_000)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/peerd-bench/api"))
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    node = PeerdProcess(args.dir, config={"log": {"level": "warning"}})
    node.init()
    cid, data = asyncio.run(seed(args.dir, args.blobs))
    node.start()
    try:
        token = (args.dir / "secrets" / "api_token").read_text().strip()
        asyncio.run(bench(node.base_url, token, cid, data, args.n))
    finally:
        node.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
