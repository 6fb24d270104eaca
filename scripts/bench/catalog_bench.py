#!/usr/bin/env python3
"""Catalog benchmark: 1,000,000 segment rows (and their blob rows).

Measures (1) blob lookup latency through the daemon's own path (``Catalog.get_blob`` over
aiosqlite), p50/p99 over random cids, and (2) daemon start time with that catalog: wall time from
``exec`` to ``/readyz`` answering 200, and the daemon's own ``startup_s`` (runtime open -> ready).
Goals (issue 2): lookup p99 < 1 ms, start < 2 s.

    python scripts/bench/catalog_bench.py [--rows 1000000] [--dir /tmp/peerd-bench/catalog]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import random
import sqlite3
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from peerd.catalog import Catalog  # noqa: E402
from peerd.core.ids import cid_from_digest  # noqa: E402
from tests.support.process import PeerdProcess  # noqa: E402

SEGS_PER_MEDIA = 1000


def build(state: Path, rows: int) -> list[str]:
    """Create a node state whose catalog has ``rows`` segments; returns the segment cids."""
    state.mkdir(parents=True, exist_ok=True)
    asyncio.run(_create(state / "catalog.sqlite3"))
    con = sqlite3.connect(state / "catalog.sqlite3")
    con.execute("PRAGMA synchronous=OFF")
    now = time.time()
    cids: list[str] = []
    media_count = max(1, rows // SEGS_PER_MEDIA)
    with con:
        for m in range(media_count):
            media_id = cid_from_digest(hashlib.sha256(f"media{m}".encode()).digest())
            manifest = json.dumps({"n": m}).encode()
            con.execute(
                "INSERT INTO media(media_id, manifest, duration_s, created_at) VALUES(?,?,?,?)",
                (media_id, manifest, SEGS_PER_MEDIA * 4.0, now),
            )
            con.execute(
                "INSERT INTO renditions(media_id, rendition_id, position, kind, container, codecs,"
                " bandwidth) VALUES(?, 'v0', 0, 'video', 'fmp4', 'avc1.64001f', 3000000)",
                (media_id,),
            )
            seg_rows = []
            blob_rows = []
            for s in range(SEGS_PER_MEDIA):
                cid = cid_from_digest(hashlib.sha256(f"{m}/{s}".encode()).digest())
                cids.append(cid)
                seg_rows.append((media_id, "v0", s, 4.0, cid))
                blob_rows.append((cid, 3_000_000, now))
            con.executemany(
                "INSERT INTO segments(media_id, rendition_id, seq, duration_s, cid) "
                "VALUES(?,?,?,?,?)",
                seg_rows,
            )
            con.executemany(
                "INSERT INTO blobs(cid, size, local_state, created_at) VALUES(?,?,'present',?)",
                blob_rows,
            )
        con.execute("INSERT OR REPLACE INTO node_state(key, value) VALUES('clean_shutdown','1')")
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()
    return cids


async def _create(path: Path) -> None:
    cat = await Catalog.open(path)
    await cat.close()


async def lookups(path: Path, cids: list[str], n: int) -> list[float]:
    """Latencies (s) of ``n`` random ``get_blob`` calls."""
    cat = await Catalog.open(path)
    rng = random.Random(1)
    out = []
    try:
        for _ in range(200):  # warm the page cache and the connection
            await cat.get_blob(rng.choice(cids))
        for _ in range(n):
            cid = rng.choice(cids)
            t0 = time.perf_counter()
            row = await cat.get_blob(cid)
            out.append(time.perf_counter() - t0)
            assert row is not None
    finally:
        await cat.close()
    return out


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of values."""
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def main() -> int:
    """Build (or reuse) the catalog, measure, print a JSON summary."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/peerd-bench/catalog"))
    ap.add_argument("--lookups", type=int, default=20000)
    ap.add_argument("--starts", type=int, default=5)
    args = ap.parse_args()
    state = args.dir / f"state-{args.rows}-present"
    marker = state / "cids.txt"
    if marker.exists():
        cids = marker.read_text().split()
    else:
        t0 = time.monotonic()
        cids = build(state, args.rows)
        marker.write_text("\n".join(cids))
        print(f"built {len(cids)} segment rows in {time.monotonic() - t0:.1f}s", file=sys.stderr)
    lat = asyncio.run(lookups(state / "catalog.sqlite3", cids, args.lookups))
    starts = []
    inner = []
    for _ in range(args.starts):
        node = PeerdProcess(state, config={"log": {"level": "info"}})
        t0 = time.monotonic()
        node.start(timeout=60)
        starts.append(time.monotonic() - t0)
        assert node.stop() == 0
        for line in node.logs().splitlines():
            if '"msg":"peerd ready"' in line:
                last = json.loads(line)["startup_s"]
        inner.append(last)
        (state / "daemon.log").unlink()
    result = {
        "segment_rows": len(cids),
        "lookup_p50_ms": round(pct(lat, 0.5) * 1000, 4),
        "lookup_p99_ms": round(pct(lat, 0.99) * 1000, 4),
        "lookup_max_ms": round(max(lat) * 1000, 4),
        "start_to_ready_s_median": round(statistics.median(starts), 3),
        "start_to_ready_s_max": round(max(starts), 3),
        "daemon_startup_s_median": round(statistics.median(inner), 3),
        "goal": "lookup p99 < 1 ms, start < 2 s",
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
