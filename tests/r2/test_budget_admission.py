"""A node whose R2 class B budget is spent serves a new viewer itself when its uplink can.

A real daemon with its bucket (moto) behind the fault proxy and ``budget_class_b_per_month =
0``: no read of the bucket may be made, so the node cannot check a blob there before a redirect
(:class:`peerd.replication.source.BucketLink` gives None). Viewer A plays the top rendition;
viewer B's stream fits the uplink budget but passes ``resume_ratio`` of it, the band where
streams of media the bucket holds are redirected first. Without a link, B is decided again as a
stream only the node can serve, and gets every segment from the node (never 503), and the node
makes no class B request.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from peerd.catalog.media import media_manifest
from peerd.config import load_settings
from peerd.core.ids import cid_of
from peerd.core.manifest import decode
from peerd.runtime import open_runtime
from tests.r2.test_outage_admission import add_ladder, cid_in
from tests.r2.test_overflow import Viewer, token_for
from tests.support.faultproxy import FaultProxy
from tests.support.process import PeerdProcess
from tests.support.r2media import write_r2_secrets
from tests.support.s3server import MotoServer
from tests.support.whep_media import make_hls


@pytest.mark.timeout(240)
async def test_a_stream_in_the_redirect_band_is_served_when_the_read_budget_is_spent(
    tmp_path: Path, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    clips = {
        rid: await asyncio.to_thread(
            make_hls, tmp_path / rid, seconds=8, bframes=0, audio=False, video_bitrate=rate
        )
        for rid, rate in (("top", 800_000), ("low", 400_000))
    }
    node = PeerdProcess(tmp_path / "node", config={})
    await asyncio.to_thread(node.init)
    write_r2_secrets(node.state_dir)
    media_id = await add_ladder(node.state_dir, clips, moto, bucket)
    rt = await open_runtime(load_settings(None, node={"state_dir": node.state_dir}))
    try:
        raw = await media_manifest(rt.catalog, media_id)
        assert raw is not None
        top = decode(raw).renditions[0].bandwidth / 8  # bytes/s
    finally:
        await rt.close()
    # Two streams at the top rate fit, but pass resume_ratio (0.8) of the budget.
    budget = 2 * top / 0.9
    node.config.update(
        r2={
            "endpoint": proxy.url,
            "bucket": bucket,
            "tiering_interval_s": 3600.0,
            "budget_class_b_per_month": 0,
        },
        uplink={"budget_mbps": budget * 8 / 1e6, "window_s": 30.0, "stream_mbps": 0.0},
    )
    await asyncio.to_thread(node.start)
    a = Viewer(node, media_id, token_for(node.state_dir, media_id))
    b = Viewer(node, media_id, token_for(node.state_dir, media_id))
    try:
        a_paths = await asyncio.to_thread(a.segments)
        for p in a_paths[:2]:
            status, _, body = await asyncio.to_thread(a.get, p)
            assert status == 200
            assert cid_of(body) == cid_in(p)
        b_paths = await asyncio.to_thread(b.segments)
        assert b_paths == a_paths  # B starts at the top rendition too: the node takes it
        for p in b_paths:
            status, headers, body = await asyncio.to_thread(b.get, p)
            assert status == 200, (p, status, headers)
            assert cid_of(body) == cid_in(p)
        assert not [e for e in proxy.log if e[0] in ("GET", "HEAD") and "/blobs/" in e[1]]
    finally:
        a.close()
        b.close()
        code = await asyncio.to_thread(node.stop)
    assert code == 0, node.logs()[-3000:]
