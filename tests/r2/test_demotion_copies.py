"""Demotion from the shared bucket counts the network's copies; stale bucket state is corrected.

Real daemons, moto as R2, ffmpeg as the independent player.

1. Two nodes on one LAN (mDNS on loopback). A holds a media item, in the bucket and cold; B
   never had it. With the default ``[r2] min_copies = 2`` A's tiering asks its LAN peers who
   holds a full copy (``GET /p2p/v1/held/<id>``), finds none, and keeps the bucket copy. A is
   then SIGKILLed and a viewer of B plays the item to its end (``ffmpeg -xerror``): B finds the
   manifest and every segment in the bucket. Now B holds a full copy; A, started again, finds
   it and its tiering removes the item from the bucket.
2. One node over its uplink budget sends a new viewer's segments to the bucket, after a HEAD
   showed the bucket has them. Once the objects are deleted behind its back (another node's
   demotion), the next new viewer gets 503 + ``Retry-After``, not a 302 to a missing object,
   and the node's catalog no longer has the blobs in R2. The same correction on a read-through
   404 (in process).
"""

from __future__ import annotations

import asyncio
import http.client
import re
import secrets
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from peerd.catalog import Catalog
from peerd.catalog.media import media_blobs, media_by_r2_state, media_manifest, set_media_r2
from peerd.config import load_settings
from peerd.core import tokens
from peerd.core.ids import Cid, cid_of
from peerd.replication.metrics import r2_metrics
from peerd.replication.r2 import R2Client, blob_key, manifest_key
from peerd.replication.source import R2Source
from peerd.runtime import Runtime, open_runtime
from tests.r2.test_replication import make_media
from tests.support.p2p import loopback_multicast, metric
from tests.support.poll import until
from tests.support.process import PeerdProcess
from tests.support.r2media import hls_url, write_r2_secrets
from tests.support.s3server import MotoServer
from tests.support.whep_media import HlsClip, add_media, make_hls

pytestmark = pytest.mark.timeout(300)

MDNS = {"enabled": True, "interfaces": ["127.0.0.1"], "recheck_s": 1.0}


async def stock(state: Path, clip: HlsClip, moto: MotoServer, bucket: str) -> tuple[Cid, list[Cid]]:
    """Catalog ``clip`` on the stopped node, with the item and its blobs in the bucket and
    marked there an hour ago (as an old promotion leaves them)."""
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        media_id = await add_media(rt, clip)
        cids = await media_blobs(rt.catalog, media_id)
        for cid in cids:
            await asyncio.to_thread(moto.put, bucket, blob_key(cid), await rt.store.read(cid))
        manifest = await media_manifest(rt.catalog, media_id)
        assert manifest is not None
        await asyncio.to_thread(moto.put, bucket, manifest_key(media_id), manifest)
        then = time.time() - 3600
        async with rt.catalog.transaction() as tx:
            for cid in cids:
                await Catalog.set_blob_r2(tx, cid, "present", then)
            await set_media_r2(tx, media_id, "present", then)
        await rt.catalog.set_state("clean_shutdown", "1")
        return media_id, cids
    finally:
        await rt.close()


def in_bucket(moto: MotoServer, bucket: str, media_id: str, cids: list[Cid]) -> set[str]:
    """Which of the item's keys (manifest, blobs) the bucket lists."""
    keys = {manifest_key(media_id), *(blob_key(c) for c in cids)}
    return keys & moto.keys(bucket)


def held(state: Path) -> set[str]:
    return {p.name for p in (state / "blobs").rglob("b*") if p.is_file()}


async def test_a_last_copy_stays_in_the_bucket_until_another_node_holds_one(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "ffmpeg (Debian package) is the independent HLS client here"
    clip = await asyncio.to_thread(make_hls, tmp_path / "clip", seconds=6, bframes=0)
    r2 = {
        "endpoint": moto.url,
        "bucket": bucket,
        "tiering_interval_s": 0.5,
        "min_residence_s": 0.0,
        "cold_bytes_per_s": 1e12,  # every item is cold: only the copies rule keeps one
    }
    a = PeerdProcess(tmp_path / "a", config={"mdns": MDNS, "r2": r2})
    b = PeerdProcess(tmp_path / "b", config={"mdns": MDNS, "r2": r2})
    for node in (a, b):
        await asyncio.to_thread(node.init)
        write_r2_secrets(node.state_dir)
    media_id, cids = await stock(a.state_dir, clip, moto, bucket)
    keys = await asyncio.to_thread(in_bucket, moto, bucket, media_id, cids)
    assert len(keys) == len(cids) + 1
    with loopback_multicast():
        try:
            await asyncio.to_thread(a.start)
            await asyncio.to_thread(b.start)

            # A's tiering would demote the cold item: it looks for other copies, finds none
            # (B answers that it holds nothing), and keeps it. Unfixed, it deletes it.
            def decided() -> bool:
                kept = metric(a.base_url, "peerd_tiering_demotions_total", outcome="kept_copies")
                return kept >= 3 or manifest_key(media_id) not in moto.keys(bucket)

            await until(lambda: asyncio.to_thread(decided), timeout_s=60, step_s=0.2)
            assert await asyncio.to_thread(in_bucket, moto, bucket, media_id, cids) == keys

            # A dies; a viewer of B plays the item from the bucket, to the end.
            assert await asyncio.to_thread(a.stop, signal.SIGKILL) == -signal.SIGKILL
            url = hls_url(b.base_url, b.state_dir, media_id)
            res = await asyncio.to_thread(
                subprocess.run,
                [ffmpeg, "-v", "error", "-xerror", "-i", url, "-f", "null", "-"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert res.returncode == 0, res.stderr[-2000:]
            assert res.stderr.strip() == "", res.stderr[-2000:]
            assert held(b.state_dir) >= set(cids)  # B now holds a full copy
            assert await asyncio.to_thread(in_bucket, moto, bucket, media_id, cids) == keys

            # A is back: B's copy is the second one, so the bucket's may go.
            await asyncio.to_thread(a.start)

            async def removed() -> bool:
                return not await asyncio.to_thread(in_bucket, moto, bucket, media_id, cids)

            await until(removed, timeout_s=60, step_s=0.2)
            queued = await asyncio.to_thread(
                metric, a.base_url, "peerd_tiering_demotions_total", outcome="queued"
            )
            assert queued >= 1
        finally:
            codes = [await asyncio.to_thread(n.stop) for n in (b, a)]
    assert codes == [0, 0], a.logs()[-3000:] + b.logs()[-3000:]


def token_for(state: Path, media_id: str) -> str:
    """A fresh signed token: a distinct viewer stream."""
    secret = (state / "secrets" / "hls_signing_key").read_text()
    exp = int(time.time()) + 600 + secrets.randbelow(100_000)
    return tokens.mint(tokens.key_from_secret(secret), media_id, "hls", exp)


def get(node: PeerdProcess, media_id: str, path: str, token: str) -> tuple[int, dict[str, str]]:
    """GET ``/hls/<media>/<path>`` as a viewer, not following redirects."""
    conn = http.client.HTTPConnection(node.host, node.port, timeout=60)
    try:
        conn.request("GET", f"/hls/{media_id}/{path}?token={token}")
        resp = conn.getresponse()
        resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}
    finally:
        conn.close()


def read_url(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 -- loopback test bucket
        return bytes(r.read())


def segments(node: PeerdProcess, media_id: str, token: str) -> list[str]:
    """The blob paths (``b/<cid>.<ext>``) of the media's rendition, init first."""
    base = f"{node.base_url}/hls/{media_id}/"
    with urllib.request.urlopen(f"{base}master.m3u8?token={token}", timeout=30) as r:  # noqa: S310
        master = r.read().decode()
    playlist = next(x for x in master.splitlines() if ".m3u8" in x)
    with urllib.request.urlopen(base + playlist, timeout=30) as r:  # noqa: S310
        body = r.read().decode()
    return re.findall(r'(?:URI=")?(b/\w+\.(?:mp4|m4s|ts))\?', body)


async def test_no_redirect_to_an_object_another_node_removed(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    clip = await asyncio.to_thread(make_hls, tmp_path / "clip", seconds=6, bframes=0)
    config: dict[str, dict[str, Any]] = {
        "r2": {"endpoint": moto.url, "bucket": bucket, "tiering_interval_s": 3600.0},
        # 125 bytes/s: the first viewer's first segment uses the budget up for the window.
        "uplink": {"budget_mbps": 0.001, "window_s": 60.0, "retry_after_s": 7},
    }
    node = PeerdProcess(tmp_path / "node", config=config)
    await asyncio.to_thread(node.init)
    write_r2_secrets(node.state_dir)
    media_id, cids = await stock(node.state_dir, clip, moto, bucket)
    await asyncio.to_thread(node.start)
    try:
        first = token_for(node.state_dir, media_id)
        paths = await asyncio.to_thread(segments, node, media_id, first)
        assert len(paths) >= 3, paths
        status, _ = await asyncio.to_thread(get, node, media_id, paths[1], first)
        assert status == 200  # admitted: served by the node, and the budget is used up

        # A new stream while the bucket has the blob: redirected, to the right bytes.
        status, headers = await asyncio.to_thread(
            get, node, media_id, paths[1], token_for(node.state_dir, media_id)
        )
        assert status == 302, (status, headers)
        body = await asyncio.to_thread(read_url, headers["location"])
        assert cid_of(body) == paths[1].split("/")[1].split(".")[0]

        # Another node's demotion removes the item from the bucket behind this node's back.
        s3 = moto.client()
        for key in (manifest_key(media_id), *(blob_key(c) for c in cids)):
            await asyncio.to_thread(s3.delete_object, Bucket=bucket, Key=key)

        # The next new stream: 503 + Retry-After (R2 lacks it), never a 302 to a 404.
        for path in paths[1:3]:
            status, headers = await asyncio.to_thread(
                get, node, media_id, path, token_for(node.state_dir, media_id)
            )
            assert status == 503, (status, headers)
            assert headers["retry-after"] == "7"
        # The catalog was corrected: the blobs asked for are no longer marked as in R2.
        stale = await asyncio.to_thread(
            metric, node.base_url, "peerd_r2_stale_total", found="redirect"
        )
        assert stale == 2
        # The admitted viewer still gets its stream from the node.
        status, _ = await asyncio.to_thread(get, node, media_id, paths[2], first)
        assert status == 200
    finally:
        code = await asyncio.to_thread(node.stop)
    assert code == 0, node.logs()[-3000:]


async def test_a_read_through_404_corrects_the_catalog(
    runtime: Runtime, client: R2Client, moto: MotoServer, bucket: str
) -> None:
    """The catalog has an item in R2, another node removed it: the resolver's GET of a blob
    answers 404, and the blob and the item stop claiming R2 (tiering may promote it again)."""
    media_id, cids = await make_media(runtime, n=2, size=1000)
    async with runtime.catalog.transaction() as tx:
        for cid in cids:
            await Catalog.set_blob_r2(tx, cid, "present", 1.0)
        await set_media_r2(tx, media_id, "present", 1.0)
    metrics = r2_metrics(runtime.metrics.registry)
    source = R2Source(client, catalog=runtime.catalog, metrics=metrics)
    assert [o async for o in source.offers(cids[0])] == []
    rows = await runtime.catalog.get_blobs(cids)
    assert [rows[c].r2_state for c in cids] == ["none", "present", "present"]
    assert await media_by_r2_state(runtime.catalog) == {"none": 1}
    assert metrics.stale.labels(found="read_through")._value.get() == 1
    # A blob the catalog never had in R2: nothing to correct.
    assert [o async for o in source.offers(cids[0])] == []
    assert metrics.stale.labels(found="read_through")._value.get() == 1
