"""A node keeps within its monthly R2 class B budget while a viewer plays from the bucket.

Real daemon, moto as R2 behind a counting proxy, ffmpeg as the independent player. The node
never had the media item: its manifest and every blob are only in the bucket. Its store holds
about half of the item, so it must evict while the viewer plays; its class B budget is exactly
one GET per object the viewer needs (manifest, init, segments). Every blob it evicts it read
from the bucket (verified) a moment ago, so eviction needs no HEAD; and a blob prefetched for
the viewer is not evicted before the viewer asked for it (it would cost a second GET). The
viewer plays to the end, and the GETs and HEADs the bucket saw from the node never exceed the
budget. Asked next for the blobs it no longer holds, the node answers 503 with ``Retry-After``
once the budget is spent -- never a 404 -- and still makes no class B request past it.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from peerd.catalog.media import media_blobs, media_manifest
from peerd.config import load_settings
from peerd.core.ids import Cid
from peerd.core.manifest import decode
from peerd.replication.r2 import blob_key, manifest_key
from peerd.runtime import open_runtime
from tests.support.faultproxy import FaultProxy
from tests.support.p2p import metric
from tests.support.process import PeerdProcess
from tests.support.r2media import hls_url, write_r2_secrets
from tests.support.s3server import MotoServer
from tests.support.whep_media import add_media, make_hls

pytestmark = pytest.mark.timeout(300)


async def bucket_only(
    scratch: Path, clip_dir: Path, moto: MotoServer, bucket: str
) -> tuple[Cid, list[Cid], int, set[str]]:
    """Package a clip in a scratch node and put its blobs and manifest in the bucket only;
    returns the media id, its blobs, their total size and the init segments among them."""
    clip = await asyncio.to_thread(make_hls, clip_dir, seconds=10, segment_seconds=1, bframes=0)
    rt = await open_runtime(load_settings(None, node={"state_dir": scratch}))
    try:
        media_id = await add_media(rt, clip)
        cids = await media_blobs(rt.catalog, media_id)
        size = 0
        for cid in cids:
            data = await rt.store.read(cid)
            size += len(data)
            await asyncio.to_thread(moto.put, bucket, blob_key(cid), data)
        manifest = await media_manifest(rt.catalog, media_id)
        assert manifest is not None
        await asyncio.to_thread(moto.put, bucket, manifest_key(media_id), manifest)
        inits = {r.init for r in decode(manifest).renditions if r.init}
        return media_id, cids, size, inits
    finally:
        await rt.close()


def class_b(proxy: FaultProxy) -> int:
    """Class B requests the bucket saw: GETs and HEADs of objects (listings are class A)."""
    return sum(
        1
        for method, path, _ in proxy.log
        if method in ("GET", "HEAD") and "list-type" not in path and "uploads" not in path
    )


async def test_a_node_plays_from_the_bucket_within_its_class_b_budget(
    tmp_path: Path, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "ffmpeg (Debian package) is the independent HLS client here"
    media_id, cids, size, inits = await bucket_only(
        tmp_path / "scratch", tmp_path / "clip", moto, bucket
    )
    # One GET for each blob and for the manifest, and two to spare (a retried request on a
    # busy machine must not fail the playback).
    budget = len(cids) + 1 + 2
    node = PeerdProcess(
        tmp_path / "node",
        config={
            "store": {"quota_bytes": size // 2, "min_free_bytes": 0},
            "mdns": {"enabled": False},
            "p2p": {"enabled": False},
            "r2": {
                "endpoint": proxy.url,
                "bucket": bucket,
                "tiering_interval_s": 0.2,
                "budget_class_b_per_month": budget,
            },
        },
    )
    await asyncio.to_thread(node.init)
    write_r2_secrets(node.state_dir)
    await asyncio.to_thread(node.start)
    try:
        url = hls_url(node.base_url, node.state_dir, media_id)
        # -re: a viewer's pace, so the node evicts while it plays
        res = await asyncio.to_thread(
            subprocess.run,
            [ffmpeg, "-v", "error", "-xerror", "-re", "-i", url, "-f", "null", "-"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stderr.strip() == "", res.stderr[-2000:]
        assert class_b(proxy) <= budget, proxy.log
        assert proxy.count("HEAD") == 0  # every eviction was of a blob read a moment ago
        held = {p.name for p in (node.state_dir / "blobs").rglob("b*") if p.is_file()}
        assert len(held) < len(cids)  # it did evict: the item does not fit its store

        # Blobs only the bucket holds now: once the budget is spent, 503 + Retry-After (never
        # 404), and no request past the budget.
        answers = []
        for gone in [c for c in cids if c not in held]:
            ext = "mp4" if gone in inits else "m4s"
            seg = hls_url(node.base_url, node.state_dir, media_id, f"b/{gone}.{ext}")
            try:
                with await asyncio.to_thread(urllib.request.urlopen, seg, timeout=30) as r:
                    answers.append((r.status, r.headers.get("Retry-After")))
            except urllib.error.HTTPError as exc:
                exc.close()
                answers.append((exc.code, exc.headers.get("Retry-After")))
        assert {status for status, _ in answers} <= {200, 503}, answers
        assert (503, "60") in answers, answers
        assert class_b(proxy) <= budget, proxy.log
        refusals = await asyncio.to_thread(
            metric, node.base_url, "peerd_r2_budget_refusals_total", purpose="viewer"
        )
        assert refusals >= 1
    finally:
        await asyncio.to_thread(node.stop)
