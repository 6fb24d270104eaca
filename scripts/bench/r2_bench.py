"""R2 replication benchmark against anchors measured in the same run, on a local moto server.

1. push: peerd's outbox push of a media library vs ``rclone copy`` of the same files to the same
   server (A/B alternated, fresh bucket per run); ratio = rclone time / peerd time (goal >= 1.0).
   rclone runs with its defaults (it lists the destination, PUTs each file and HEADs it
   afterwards -- the same PUT+HEAD per blob as peerd) except ``--transfers 8 --checkers 8``
   (peerd's concurrency; rclone's default is 4 transfers) and ``--s3-no-check-bucket`` (the
   bucket exists; peerd does not try to create it either).
2. cold-miss TTFB: an HTTP GET to a peerd-style blob route (aiohttp, ``Resolver.open_stream`` on
   an R2 source) for a blob the node lacks, vs a direct HTTP GET of the object from the server;
   also store-then-serve (``ensure_local`` then the file). Ratio = peerd / direct (goal <= 1.2).
3. single flight: 100 concurrent requests for one missing blob through the route; upstream GETs
   counted by a proxy between peerd and the server (goal: exactly 1).
4. cold-miss TTFB through a real daemon (``peerd run`` in its own process, R2 configured at the
   moto server, a media item whose blobs are only in the bucket): a signed
   ``GET /hls/<media>/b/<cid>.m4s`` for a blob the node lacks vs a direct GET of the object, the
   two alternated blob by blob. This is the production path, with the viewer in another process.
   Run three times: with ``http.prefetch_segments = 0`` (every request a true cold miss), the
   same with libp2p on (loopback, no peer: a node's default sources before it has found a
   peer, which look idle, so R2 is still asked first), and with the default prefetch of 2, the
   blobs asked for in play order (what a viewer playing R2-only media sees).

Usage (from the repo root)::

    .venv/bin/python scripts/bench/r2_bench.py [--files 40] [--size-mib 2] [--rounds 2] \
        [--delay-ms 20] [--parts push,daemon]

``--delay-ms`` puts the fault proxy (``latency_s``) between the server and both TTFB paths;
``--parts`` runs only the named sections (default: all); ``--baseline-tree`` adds, to the daemon
sections, a daemon run from another checkout (e.g. ``git archive <rev> | tar -x -C DIR``),
alternated with this one blob by blob: the fair way to compare two versions on a shared machine.

Results: printed, and written to /tmp/peerd-bench/r2.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from peerd.catalog.media import record_media  # noqa: E402
from peerd.catalog.outbox import Outbox  # noqa: E402
from peerd.config import load_settings  # noqa: E402
from peerd.core.ids import Cid, cid_of  # noqa: E402
from peerd.core.manifest import Manifest, Rendition, Segment, encode, media_id_of  # noqa: E402
from peerd.core.outbox import RetryPolicy  # noqa: E402
from peerd.delivery import Resolver  # noqa: E402
from peerd.replication.r2 import R2Client, R2Config, blob_key  # noqa: E402
from peerd.replication.service import Replicator  # noqa: E402
from peerd.replication.source import R2Source  # noqa: E402
from peerd.runtime import Runtime, open_runtime  # noqa: E402
from tests.support.faultproxy import FaultProxy  # noqa: E402
from tests.support.process import PeerdProcess  # noqa: E402
from tests.support.r2media import hls_url, write_r2_secrets  # noqa: E402
from tests.support.s3server import ACCESS_KEY, SECRET_KEY, MotoServer  # noqa: E402

OUT = Path("/tmp/peerd-bench")
PARTS = ("push", "ttfb", "flight", "daemon", "daemon-p2p", "daemon-playing")
CONCURRENCY = 8


def r2cfg(url: str, bucket: str) -> R2Config:
    return R2Config(
        endpoint=url,
        bucket=bucket,
        access_key_id=ACCESS_KEY,
        secret_access_key=SECRET_KEY,
        max_concurrency=CONCURRENCY,
    )


def rclone_copy(moto: MotoServer, src: Path, bucket: str) -> float:
    # AWS_CA_BUNDLE (set on some machines) makes rclone's SDK refuse its own HTTP transport.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        {
            "RCLONE_CONFIG_BENCH_TYPE": "s3",
            "RCLONE_CONFIG_BENCH_PROVIDER": "Other",
            "RCLONE_CONFIG_BENCH_ENDPOINT": moto.url,
            "RCLONE_CONFIG_BENCH_ACCESS_KEY_ID": ACCESS_KEY,
            "RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY": SECRET_KEY,
            "RCLONE_CONFIG_BENCH_REGION": "auto",
        }
    )
    started = time.perf_counter()
    subprocess.run(
        [
            "rclone",
            "copy",
            str(src),
            f"bench:{bucket}/blobs",
            "--transfers",
            str(CONCURRENCY),
            "--checkers",
            str(CONCURRENCY),
            "--s3-no-check-bucket",
        ],
        env=env,
        check=True,
    )
    return time.perf_counter() - started


async def peerd_push(rt: Runtime, moto: MotoServer, bucket: str, cids: list[Cid]) -> float:
    client = R2Client(r2cfg(moto.url, bucket))
    try:
        rep = Replicator(
            rt, client, outbox=Outbox(rt.catalog, RetryPolicy(base_s=0.05)), concurrency=CONCURRENCY
        )
        async with rt.catalog.transaction() as tx:
            await tx.execute("UPDATE blobs SET r2_state='none'")
        started = time.perf_counter()
        await rep.outbox.enqueue_many("push_blob", list(cids))
        await rep.run_until_idle()
        elapsed = time.perf_counter() - started
        async with rt.catalog.conn.execute(
            "SELECT COUNT(*) FROM blobs WHERE r2_state='present'"
        ) as cur:
            row = await cur.fetchone()
        assert row is not None
        assert row[0] == len(cids), "push incomplete"
        return elapsed
    finally:
        await client.close()


async def ttfb(session: aiohttp.ClientSession, url: str) -> tuple[float, float, int]:
    started = time.perf_counter()
    async with session.get(url) as resp:
        resp.raise_for_status()
        first = await resp.content.readany()
        t_first = time.perf_counter() - started
        n = len(first)
        while chunk := await resp.content.readany():
            n += len(chunk)
    return t_first, time.perf_counter() - started, n


def blob_app(resolver: Resolver, mode: str) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        cid = Cid(request.match_info["cid"])
        if mode == "store-then-serve":
            return web.FileResponse(await resolver.ensure_local(cid))
        s = await resolver.open_stream(cid)
        if s.path is not None:
            return web.FileResponse(s.path)
        assert s.chunks is not None
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = s.size
        await resp.prepare(request)
        async for chunk in s.chunks:
            await resp.write(chunk)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/blob/{cid}", handle)
    return app


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def daemon_ttfb(
    moto: MotoServer,
    tmp: Path,
    args: argparse.Namespace,
    *,
    prefetch: int = 0,
    p2p: bool = False,
) -> dict[str, object]:
    """Section 4: TTFB through ``peerd run`` of blobs only in the bucket vs a direct GET.

    ``prefetch`` is the node's ``http.prefetch_segments``. With 0 every request is a true cold
    miss; with the default (2), the blobs, asked for in play order, are what a viewer playing
    media the node does not hold sees: the node fetches ahead of it. ``p2p``: libp2p runs too
    (on loopback, with no peer), so the resolver has a peer source before R2.
    """
    bucket = f"ttfb-daemon-{prefetch}-{int(p2p)}"
    await asyncio.to_thread(moto.create_bucket, bucket)
    tsize = int(args.ttfb_size_mib * 1024 * 1024)
    blobs = [os.urandom(tsize) for _ in range(args.ttfb_blobs + 1)]
    cids = [cid_of(b) for b in blobs]
    for c, b in zip(cids, blobs, strict=True):
        await asyncio.to_thread(moto.put, bucket, blob_key(c), b)
    wan = await FaultProxy("127.0.0.1", moto.port, latency_s=args.delay_ms / 1000).start()
    upstream = wan.url if args.delay_ms else moto.url
    r2 = {"endpoint": upstream, "bucket": bucket, "tiering_interval_s": 3600.0}
    config: dict[str, object] = {
        "r2": r2,
        "log": {"level": "warning"},
        "http": {"prefetch_segments": prefetch},
    }
    if p2p:
        config["p2p"] = {"enabled": True, "host": "127.0.0.1", "tcp_port": 0, "ws_port": 0}
    trees = (
        {"daemon": None, "baseline": args.baseline_tree} if args.baseline_tree else {"daemon": None}
    )
    nodes: dict[str, tuple[PeerdProcess, Path, str]] = {}
    res: dict[str, list[float]] = {"direct": [], **{name: [] for name in trees}}
    try:
        for name, tree in trees.items():
            state = tmp / f"{name}-{prefetch}-{int(p2p)}"
            env = {"PYTHONPATH": str(tree)} if tree else {}
            node = PeerdProcess(state, config=config, env=env)
            await asyncio.to_thread(node.init)
            write_r2_secrets(state)
            nodes[name] = (node, state, await record_synthetic_media(state, cids))
            await asyncio.to_thread(node.start)
        direct = moto.client()

        def presigned(c: Cid) -> str:
            url = str(
                direct.generate_presigned_url(
                    "get_object", Params={"Bucket": bucket, "Key": blob_key(c)}
                )
            )
            return url.replace(moto.url, upstream, 1)

        def url(name: str, c: Cid, ext: str) -> str:
            node, state, media_id = nodes[name]
            return hls_url(node.base_url, state, media_id, f"b/{c}.{ext}")

        async with aiohttp.ClientSession() as session:
            # Warm every path's connections on a blob that is not measured (the init segment).
            await ttfb(session, presigned(cids[0]))
            for name in nodes:
                await ttfb(session, url(name, cids[0], "mp4"))
            order = list(res)
            for i, c in enumerate(cids[1:]):
                # Rotated blob by blob, so no path always follows the same one.
                for who in order[i % len(order) :] + order[: i % len(order)]:
                    got = await ttfb(
                        session, presigned(c) if who == "direct" else url(who, c, "m4s")
                    )
                    assert got[2] == tsize, (who, got)
                    res[who].append(got[0])
    finally:
        for node, _, _ in nodes.values():
            await asyncio.to_thread(node.stop)
        await wan.stop()
    med = {k: statistics.median(v) for k, v in res.items()}
    what = "cold misses" if not prefetch else f"in play order, prefetch_segments={prefetch}"
    if p2p:
        what += ", libp2p on with no peer"
    print(
        f"TTFB through the daemon ({what}): {med['daemon'] * 1000:.2f} ms vs direct "
        f"{med['direct'] * 1000:.2f} ms = {med['daemon'] / med['direct']:.2f}x"
    )
    if "baseline" in med:
        print(
            f"  baseline ({args.baseline_tree}): {med['baseline'] * 1000:.2f} ms = "
            f"{med['baseline'] / med['direct']:.2f}x"
        )
    return {
        "blob_bytes": tsize,
        "blobs": len(cids) - 1,
        "prefetch_segments": prefetch,
        "p2p": p2p,
        "delay_ms": args.delay_ms,
        "median_ttfb_s": med,
        "ratio_daemon_over_direct": med["daemon"] / med["direct"],
        **(
            {"ratio_baseline_over_direct": med["baseline"] / med["direct"]}
            if "baseline" in med
            else {}
        ),
    }


async def record_synthetic_media(state: Path, cids: list[Cid]) -> str:
    """A media item on the stopped node whose segments are ``cids`` (held only in the bucket)."""
    segments = tuple(Segment(duration=4000, cid=c) for c in cids)
    rendition = Rendition(
        id="v0",
        kind="video",
        codecs="avc1.64001f",
        bandwidth=5_000_000,
        timescale=1000,
        segments=segments[1:],
        width=1920,
        height=1080,
        init=cids[0],
    )
    manifest = Manifest(container="fmp4", renditions=(rendition,))
    data = encode(manifest)
    media_id = media_id_of(manifest)
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        async with rt.catalog.transaction() as tx:
            await record_media(tx, media_id, data, manifest, time.time(), in_r2=True)
        await rt.catalog.set_state("clean_shutdown", "1")
    finally:
        await rt.close()
    return media_id


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--size-mib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--ttfb-blobs", type=int, default=15)
    ap.add_argument("--ttfb-size-mib", type=float, default=2.0)
    ap.add_argument(
        "--delay-ms",
        type=float,
        default=0.0,
        help="TTFB: a fault proxy between the server and both paths adds this much to every "
        "round trip, and one more round trip to a new connection (R2 over a WAN)",
    )
    ap.add_argument(
        "--baseline-tree",
        type=Path,
        help="daemon TTFB: also run a daemon from this checkout of peerd, alternated blob by "
        "blob with this one and the direct GET (an A/B in one session)",
    )
    ap.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"comma-separated sections to run, of {','.join(PARTS)}",
    )
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS):
        ap.error(f"unknown parts: {', '.join(sorted(parts - set(PARTS)))}")
    OUT.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 -- before any work starts
    results: dict[str, object] = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    }
    with MotoServer() as moto, tempfile.TemporaryDirectory(prefix="peerd-r2-bench-") as tmp:
        rt = await open_runtime(load_settings(None, node={"state_dir": Path(tmp) / "state"}))
        try:
            lib = Path(tmp) / "lib"
            lib.mkdir()
            cids: list[Cid] = []
            size = int(args.size_mib * 1024 * 1024)
            for _ in range(args.files):
                data = os.urandom(size)
                cid = await rt.store.put(data)
                (lib / cid).write_bytes(data)
                cids.append(cid)
            total = size * args.files
            # -- push vs rclone --------------------------------------------------------------
            if "push" in parts:
                times: dict[str, list[float]] = {"rclone": [], "peerd": []}
                for r in range(args.rounds):
                    b1, b2 = f"rclone-{r}", f"peerd-{r}"
                    await asyncio.to_thread(moto.create_bucket, b1)
                    await asyncio.to_thread(moto.create_bucket, b2)
                    order = ["rclone", "peerd"] if r % 2 == 0 else ["peerd", "rclone"]
                    for who in order:
                        if who == "rclone":
                            t = await asyncio.to_thread(rclone_copy, moto, lib, b1)
                        else:
                            t = await peerd_push(rt, moto, b2, cids)
                        times[who].append(t)
                        print(f"push round {r} {who}: {t:.2f} s ({total / t / 1e6:.1f} MB/s)")
                best = {k: min(v) for k, v in times.items()}
                results["push"] = {
                    "bytes": total,
                    "files": args.files,
                    "seconds": times,
                    "ratio_rclone_over_peerd": best["rclone"] / best["peerd"],
                }
            # -- TTFB --------------------------------------------------------------------------
            if "ttfb" in parts:
                tsize = int(args.ttfb_size_mib * 1024 * 1024)
                await asyncio.to_thread(moto.create_bucket, "ttfb")
                blobs: list[Cid] = []
                for _ in range(args.ttfb_blobs * 2):
                    data = os.urandom(tsize)
                    c = cid_of(data)
                    await asyncio.to_thread(moto.put, "ttfb", blob_key(c), data)
                    blobs.append(c)
                wan = await FaultProxy(
                    "127.0.0.1", moto.port, latency_s=args.delay_ms / 1000
                ).start()
                upstream = wan.url if args.delay_ms else moto.url
                client = R2Client(r2cfg(upstream, "ttfb"))
                ttfb_res: dict[str, list[float]] = {
                    "direct": [],
                    "stream": [],
                    "store-then-serve": [],
                }
                total_res: dict[str, list[float]] = {k: [] for k in ttfb_res}
                try:
                    resolver = Resolver(rt.store, [R2Source(client)])
                    runners = {}
                    for mode in ("stream", "store-then-serve"):
                        runners[mode] = await serve(blob_app(resolver, mode))
                    direct = moto.client()

                    def presigned(c: Cid) -> str:
                        url = str(
                            direct.generate_presigned_url(
                                "get_object", Params={"Bucket": "ttfb", "Key": blob_key(c)}
                            )
                        )
                        return url.replace(moto.url, upstream, 1)

                    async with aiohttp.ClientSession() as session:
                        await ttfb(session, presigned(blobs[0]))  # warm up
                        for i in range(args.ttfb_blobs):
                            for mode, cid in (
                                ("stream", blobs[2 * i]),
                                ("store-then-serve", blobs[2 * i + 1]),
                            ):
                                d = await ttfb(session, presigned(cid))
                                p = await ttfb(session, f"{runners[mode][1]}/blob/{cid}")
                                assert p[2] == tsize
                                assert d[2] == tsize
                                if mode == "stream":
                                    ttfb_res["direct"].append(d[0])
                                    total_res["direct"].append(d[1])
                                ttfb_res[mode].append(p[0])
                                total_res[mode].append(p[1])
                    med = {k: statistics.median(v) for k, v in ttfb_res.items()}
                    results["ttfb"] = {
                        "blob_bytes": tsize,
                        "delay_ms": args.delay_ms,
                        "median_ttfb_s": med,
                        "median_total_s": {k: statistics.median(v) for k, v in total_res.items()},
                        "ratio_stream_over_direct": med["stream"] / med["direct"],
                        "ratio_store_then_serve_over_direct": med["store-then-serve"]
                        / med["direct"],
                    }
                    for r_, _url in runners.values():
                        await r_.cleanup()
                finally:
                    await client.close()
                    await wan.stop()
            # -- single flight -----------------------------------------------------------------
            if "flight" in parts:
                proxy = await FaultProxy("127.0.0.1", moto.port).start()
                pclient = R2Client(r2cfg(proxy.url, "ttfb"))
                try:
                    data = os.urandom(tsize)
                    one = cid_of(data)
                    await asyncio.to_thread(moto.put, "ttfb", blob_key(one), data)
                    resolver = Resolver(rt.store, [R2Source(pclient)])
                    runner, url = await serve(blob_app(resolver, "stream"))
                    conn = aiohttp.TCPConnector(limit=200)
                    async with aiohttp.ClientSession(connector=conn) as session:
                        got = await asyncio.gather(
                            *(ttfb(session, f"{url}/blob/{one}") for _ in range(100))
                        )
                    await runner.cleanup()
                    results["single_flight"] = {
                        "requests": 100,
                        "all_complete": all(g[2] == tsize for g in got),
                        "upstream_gets": proxy.count("GET", "/blobs/"),
                    }
                finally:
                    await pclient.close()
                    await proxy.stop()
            # -- TTFB through a real daemon ---------------------------------------------------
            if "daemon" in parts:
                results["ttfb_daemon"] = await daemon_ttfb(moto, Path(tmp), args)
            if "daemon-p2p" in parts:
                results["ttfb_daemon_p2p"] = await daemon_ttfb(moto, Path(tmp), args, p2p=True)
            if "daemon-playing" in parts:
                results["ttfb_daemon_playing"] = await daemon_ttfb(
                    moto, Path(tmp), args, prefetch=2
                )
        finally:
            await rt.close()
    (OUT / "r2.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
