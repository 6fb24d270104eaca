#!/usr/bin/env python3
"""First-segment latency of an on-demand rung against the ffmpeg CLI transcoding that segment.

    .venv/bin/python scripts/bench/ondemand_bench.py [--src /tmp/peerd-bench/src_1080p.mp4]
        [--rounds 3] [--height 360] [--segment-seconds 4] [--out /tmp/peerd-bench/ondemand]

1. Starts ``peerd run`` with one on-demand rung (``--height``, ``on_demand_ahead = 0`` so nothing
   is made before it is asked for) and ingests ``--src`` through the daemon (``peerd ingest``).
   Without ``--src`` (or if it is missing) a 720p test clip is made with ffmpeg.
2. Each round picks a segment no one asked for yet and times, from outside, a viewer's GET of
   ``s/<rung>/<seq>.m4s`` (request to last byte; the node transcodes it from the top rendition's
   segment, stores it, sends it). Round 0 is a new viewer's start: the init segment (which makes
   segment 0) and segment 0 in turn.
3. Anchor, in the same round: the ffmpeg CLI transcoding the same input (the top rendition's init
   + segment, fetched from the node beforehand) with the rung's settings (scale to the rung's
   size, libx264 at the recipe's preset, crf and threads, audio copied, fragmented MP4 out),
   its wall time as ``time`` would measure it.

Prints a table per round and the median ratio peerd / ffmpeg; writes it as JSON to
``<out>/ondemand_bench.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


async def load_manifest(path: Path, media_id: str) -> Any:
    """The media item's manifest, read from the node's catalog (WAL: beside the daemon)."""
    from peerd.catalog import Catalog
    from peerd.catalog.media import media_manifest
    from peerd.core import manifest as mf

    catalog = await Catalog.open(path)
    try:
        raw = await media_manifest(catalog, media_id)
    finally:
        await catalog.close()
    assert raw is not None
    return mf.decode(raw)


def get(url: str) -> bytes:
    """The body of a GET (raises on any error status)."""
    with urllib.request.urlopen(url, timeout=300) as r:  # noqa: S310 - loopback URLs we built
        data: bytes = r.read()
    return data


def timed_get(url: str) -> tuple[float, int]:
    """Wall seconds of a GET to its last byte, and the body's size."""
    t0 = time.perf_counter()
    n = len(get(url))
    return time.perf_counter() - t0, n


def make_clip(path: Path) -> Path:
    """A 24 s 720p30 test clip with a keyframe every 2 s (stands in for a real file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(  # noqa: S603
        ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y"]
        + ["-f", "lavfi", "-i", "testsrc2=size=1280x720:rate=30:duration=24"]
        + ["-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000:duration=24"]
        + ["-c:v", "libx264", "-preset", "veryfast", "-g", "60", "-keyint_min", "60"]
        + ["-sc_threshold", "0", "-c:a", "aac", "-b:a", "128k", str(path)],
        check=True,
    )
    return path


def ffmpeg_transcode(src: Path, recipe: dict[str, Any]) -> float:
    """Wall seconds of the ffmpeg CLI making one segment with the rung's recipe."""
    args = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-i", str(src)]
    args += ["-map", "0:v:0", "-map", "0:a:0?", "-c:a", "copy"]
    args += ["-vf", f"scale={recipe['width']}:{recipe['height']}", "-c:v", "libx264"]
    args += ["-preset", recipe["preset"], "-crf", str(recipe["crf"])]
    args += ["-threads", str(recipe["threads"])]
    if recipe.get("bframes") is not None:
        args += ["-bf", str(recipe["bframes"])]
    args += ["-f", "mp4", "-movflags", "frag_keyframe+empty_moov+default_base_moof", "/dev/null"]
    t0 = time.perf_counter()
    subprocess.run(args, check=True)  # noqa: S603
    return time.perf_counter() - t0


def main() -> int:
    """Start the node, alternate peerd and ffmpeg per segment, print the table and ratio."""
    from peerd.core import tokens
    from tests.support.process import PeerdProcess, run_cli

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--src", type=Path, default=Path("/tmp/peerd-bench/src_1080p.mp4"))  # noqa: S108
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--segment-seconds", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=Path("/tmp/peerd-bench/ondemand"))  # noqa: S108
    a = ap.parse_args()
    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    src = a.src if a.src.is_file() else make_clip(a.out / "clip.mp4")
    node = PeerdProcess(
        a.out / "node",
        config={
            "webrtc": {"enabled": False},
            "log": {"level": "info"},
            "media": {
                "segment_seconds": a.segment_seconds,
                "ladder": [{"height": a.height, "on_demand": True}],
                "on_demand_ahead": 0,
            },
        },
    )
    node.start()
    try:
        t0 = time.perf_counter()
        out = run_cli(
            "-c", str(node.state_dir / "test.toml"), "ingest", "--no-progress", "--json", str(src)
        )
        if out.returncode != 0:
            print(out.stderr, file=sys.stderr)
            return 1
        ingest_s = time.perf_counter() - t0
        media_id = json.loads(out.stdout)["media_id"]
        key = (node.state_dir / "secrets" / "hls_signing_key").read_text().strip().encode()
        tok = tokens.mint(key, media_id, "hls", int(time.time()) + 3600)
        base = f"{node.base_url}/hls/{media_id}"
        manifest = asyncio.run(load_manifest(node.state_dir / "catalog.sqlite3", media_id))
        rungs = [r for r in manifest.renditions if r.on_demand]
        if not rungs:
            print("no on-demand rung (is --height below the source's?)", file=sys.stderr)
            return 1
        rung = rungs[0]
        assert rung.recipe is not None
        recipe = dataclasses.asdict(rung.recipe)
        top = manifest.rendition(rung.recipe.source)
        n = len(top.segments)
        rounds = min(a.rounds, n)
        src_init = get(f"{base}/b/{top.init}.mp4?token={tok}")
        rows = []
        for i in range(rounds):
            seq = i * (n - 1) // max(1, rounds - 1) if i else 0
            seg = get(f"{base}/b/{top.segments[seq].cid}.m4s?token={tok}")
            one = a.out / f"src-{seq}.mp4"
            one.write_bytes(src_init + seg)
            anchor = ffmpeg_transcode(one, recipe)
            if seq == 0:  # a new viewer: the init segment (it makes segment 0), then segment 0
                init_s, _ = timed_get(f"{base}/s/{rung.id}/init.mp4?token={tok}")
                seg_s, size = timed_get(f"{base}/s/{rung.id}/0.m4s?token={tok}")
                peerd_s = init_s + seg_s
            else:
                peerd_s, size = timed_get(f"{base}/s/{rung.id}/{seq}.m4s?token={tok}")
            rows.append(
                {
                    "seq": seq,
                    "bytes": size,
                    "peerd_s": round(peerd_s, 3),
                    "ffmpeg_s": round(anchor, 3),
                    "ratio": round(peerd_s / anchor, 2),
                }
            )
        logs = node.logs()
    finally:
        node.stop()
    produced = logs.count('"produced on-demand segment"')
    result = {
        "src": str(src),
        "rung": rung.id,
        "recipe": recipe,
        "segment_seconds": a.segment_seconds,
        "ingest_s": round(ingest_s, 2),
        "rounds": rows,
        "median_ratio": round(statistics.median(r["ratio"] for r in rows), 2),
        "segments_produced": produced,
    }
    (a.out / "ondemand_bench.json").write_text(json.dumps(result, indent=2))
    print(f"source {src} ({n} segments of {a.segment_seconds:g} s), rung {rung.id}: {recipe}")
    print(f"{'seq':>4} {'bytes':>9} {'peerd s':>9} {'ffmpeg s':>9} {'peerd/ffmpeg':>13}")
    for r in rows:
        print(
            f"{r['seq']:>4} {r['bytes']:>9} {r['peerd_s']:>9.3f} {r['ffmpeg_s']:>9.3f}"
            f" {r['ratio']:>12.2f}x"
        )
    print(f"median ratio peerd / ffmpeg CLI: {result['median_ratio']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
