"""An R2 outage at the peak: a node at its uplink budget takes a new viewer at its lowest
rendition instead of turning it away.

A real daemon whose bucket (moto) sits behind the fault proxy; the media has two renditions and
the bucket holds all of it. Viewer A plays the top rendition and holds the node's budget (a
second stream at full bit rate would pass it). The bucket goes down (every request 503), so the
node cannot redirect a new viewer there: viewer B is admitted at its lowest rendition's bit
rate (the two streams' floors fit the budget), its master playlist lists the lowest rendition
first, and it plays that rendition to its end while A keeps getting every segment of its own;
ffmpeg decodes B's segments as played, and hls.js in Chromium as such a viewer starts on the
lowest rendition and plays. Viewer C would pass the budget even at the floor: 503 +
``Retry-After``. The heartbeat says how much room is left at the floor. (Before this, B got 503
on its first segment: the node refused every new stream it could not redirect; and its master
listed the top rendition first, where hls.js starts.)
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from peerd.catalog import Catalog
from peerd.catalog.media import media_manifest, record_media
from peerd.config import load_settings
from peerd.core.ids import Cid, cid_of
from peerd.core.manifest import Manifest, Rendition, Segment, decode, encode, media_id_of
from peerd.replication.r2 import blob_key
from peerd.runtime import open_runtime
from tests.r2.test_overflow import Viewer, metric, token_for
from tests.support.browser import Browser, hls_page, player_origin
from tests.support.coordinator import FakeCoordinator
from tests.support.faultproxy import Fault, FaultProxy
from tests.support.process import PeerdProcess
from tests.support.r2media import write_r2_secrets
from tests.support.s3server import MotoServer
from tests.support.whep_media import TIMESCALE, HlsClip, make_hls


async def add_ladder(state: Path, clips: dict[str, HlsClip], moto: MotoServer, bucket: str) -> Cid:
    """Catalog a media item whose renditions are ``clips`` (in that order) on the stopped node,
    its blobs held and also in the bucket (as promotion leaves them); returns its media id."""
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        renditions = []
        for rid, clip in clips.items():
            assert clip.init is not None
            init_bytes = await asyncio.to_thread(clip.init.read_bytes)
            init = await rt.store.put(init_bytes, kind="init")
            segs, peak = [], 1
            for path, seconds in zip(clip.segments, clip.durations, strict=True):
                data = await asyncio.to_thread(path.read_bytes)
                segs.append(Segment(round(seconds * TIMESCALE), await rt.store.put(data)))
                peak = max(peak, int(len(data) * 8 / seconds))
            at = init_bytes.find(b"avcC")
            renditions.append(
                Rendition(
                    id=rid,
                    kind="video",
                    codecs="avc1." + init_bytes[at + 5 : at + 8].hex(),
                    bandwidth=peak,
                    timescale=TIMESCALE,
                    segments=tuple(segs),
                    width=clip.width,
                    height=clip.height,
                    frame_rate=(clip.fps, 1),
                    init=init,
                )
            )
        manifest = Manifest(container="fmp4", renditions=tuple(renditions))
        media_id = media_id_of(manifest)
        cids = list(manifest.blob_cids())
        async with rt.catalog.transaction() as tx:
            await record_media(tx, media_id, encode(manifest), manifest, time.time(), title="m")
            for cid in cids:
                await Catalog.set_blob_r2(tx, cid, "present", time.time())
        for cid in cids:
            data = await rt.store.read(cid)
            await asyncio.to_thread(moto.put, bucket, blob_key(cid), data)
        await rt.catalog.set_state("clean_shutdown", "1")
        return media_id
    finally:
        await rt.close()


def cid_in(path: str) -> str:
    return path.split("/")[1].split(".")[0]


@dataclass
class Outage:
    """A node at its uplink budget (viewer ``a`` on the top rendition) with its bucket down."""

    node: PeerdProcess
    coordinator: FakeCoordinator
    media_id: str
    budget: float  # bytes/s
    low: float  # the lowest rendition's bit rate (bytes/s)
    low_cids: set[str]
    a: Viewer
    a_paths: list[str]
    viewers: list[Viewer] = field(default_factory=list)

    def viewer(self) -> Viewer:
        """A new viewer (its own token and connection)."""
        v = Viewer(self.node, self.media_id, token_for(self.node.state_dir, self.media_id))
        self.viewers.append(v)
        return v


@contextlib.asynccontextmanager
async def outage(
    tmp_path: Path, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> AsyncIterator[Outage]:
    """Start the node, let viewer ``a`` take the budget, then take the bucket down."""
    clips = {
        "top": await asyncio.to_thread(
            make_hls, tmp_path / "top", seconds=8, bframes=0, audio=False, video_bitrate=800_000
        ),
        "low": await asyncio.to_thread(
            make_hls,
            tmp_path / "low",
            seconds=8,
            bframes=0,
            audio=False,
            video_bitrate=400_000,
            width=256,
            height=192,
        ),
    }
    node = PeerdProcess(tmp_path / "node", config={})
    await asyncio.to_thread(node.init)
    write_r2_secrets(node.state_dir)
    state = node.state_dir
    media_id = await add_ladder(state, clips, moto, bucket)
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        raw = await media_manifest(rt.catalog, media_id)
        assert raw is not None
        top_r, low_r = decode(raw).renditions
    finally:
        await rt.close()
    top, low = top_r.bandwidth / 8, low_r.bandwidth / 8  # bytes/s
    # A at its top rendition fits; a second stream at full rate does not (2 top > budget);
    # two floors do, three do not.
    budget = 2.5 * low
    assert top <= budget < 2 * top, (top, low)
    coordinator = FakeCoordinator()
    await coordinator.start()
    node.config.update(
        r2={"endpoint": proxy.url, "bucket": bucket, "tiering_interval_s": 3600.0},
        uplink={"budget_mbps": budget * 8 / 1e6, "window_s": 30.0, "stream_mbps": 0.0},
        coordinator={"url": coordinator.url, "heartbeat_interval_s": 1.0},
    )
    down = False
    proxy.add(lambda _r: down, Fault("status", 503), times=10**9)
    await asyncio.to_thread(node.start)
    a = Viewer(node, media_id, token_for(state, media_id))
    low_cids = {str(c) for c in (low_r.init, *(s.cid for s in low_r.segments)) if c}
    o = Outage(node, coordinator, media_id, budget, low, low_cids, a, [], [a])
    try:
        o.a_paths = await asyncio.to_thread(a.segments)
        for p in o.a_paths[:2]:  # init and first segment of the top rendition
            status, _, body = await asyncio.to_thread(a.get, p)
            assert status == 200
            assert cid_of(body) == cid_in(p)
        down = True  # the R2 outage
        yield o
    finally:
        for v in o.viewers:
            v.close()
        code = await asyncio.to_thread(node.stop)
        await coordinator.close()
    assert code == 0, node.logs()[-3000:]


@pytest.mark.timeout(240)
async def test_a_new_viewer_is_taken_at_its_lowest_rendition_when_the_bucket_is_down(
    tmp_path: Path, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "ffmpeg decodes what the new viewer got"
    async with outage(tmp_path, moto, bucket, proxy) as o:
        a, a_paths = o.a, o.a_paths
        b = o.viewer()
        status, _, master = await asyncio.to_thread(b.get, "master.m3u8")
        assert status == 200
        listed = re.findall(r"^(\w+)\.m3u8", master.decode(), re.M)
        assert listed == ["low", "top"], master.decode()  # the player starts at the lowest
        b_paths = await asyncio.to_thread(b.segments)
        assert {cid_in(p) for p in b_paths} <= o.low_cids
        got = b""
        for i, p in enumerate(b_paths):
            status, headers, body = await asyncio.to_thread(b.get, p)
            assert status == 200, (p, status, headers)
            assert cid_of(body) == cid_in(p)
            got += body
            # A plays on, served by the node as before.
            if i + 2 < len(a_paths):
                status, _, body = await asyncio.to_thread(a.get, a_paths[i + 2])
                assert status == 200
                assert cid_of(body) == cid_in(a_paths[i + 2])
        (tmp_path / "b.mp4").write_bytes(got)
        res = await asyncio.to_thread(
            subprocess.run,
            [ffmpeg, "-v", "error", "-i", str(tmp_path / "b.mp4"), "-f", "null", "-"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stderr == ""
        for p in a_paths[len(b_paths) + 2 :]:
            status, _, body = await asyncio.to_thread(a.get, p)
            assert status == 200
            assert cid_of(body) == cid_in(p)

        # C would pass the budget even at its floor: 503, and the node says when to come back.
        c = o.viewer()
        c_paths = await asyncio.to_thread(c.segments)
        status, headers, _ = await asyncio.to_thread(c.get, c_paths[1])
        assert status == 503, (status, headers)
        assert int(headers["retry-after"]) >= 1

        # The heartbeat: in overflow, with the room left at the floor (budget - 2 floors).
        def reported() -> dict[str, Any] | None:
            for r in reversed(o.coordinator.reports):
                adm = r.payload.get("admission")
                if adm is not None and adm["streams"] == 2:
                    return dict(adm)
            return None

        await o.coordinator.wait_for(lambda: reported() is not None, within_s=30)
        adm = reported()
        assert adm is not None
        assert adm["state"] == "overflow"
        assert adm["floor_spare_bps"] == pytest.approx(o.budget - 2 * o.low, abs=2)
        # The node tried the bucket, found it down, and did not ask again for each viewer.
        heads = [e for e in proxy.log if e[0] == "HEAD" and "/blobs/" in e[1]]
        assert 1 <= len(heads) <= 2, proxy.log
        floor = await asyncio.to_thread(
            metric, o.node, 'peerd_uplink_overflow_total{answer="floor"}'
        )
        refused = await asyncio.to_thread(
            metric, o.node, 'peerd_uplink_overflow_total{answer="refused"}'
        )
        assert (floor, refused) == (1, 1)


@pytest.mark.timeout(240)
async def test_hlsjs_starts_at_the_lowest_rendition_and_plays_when_the_bucket_is_down(
    tmp_path: Path, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    """hls.js in Chromium, a new viewer of the node at its budget with the bucket down: it
    starts on the lowest rendition (listed first) and plays without an error."""
    async with outage(tmp_path, moto, bucket, proxy) as o:
        b = o.viewer()
        src = f"{o.node.base_url}/hls/{o.media_id}/master.m3u8?token={b.token}"
        page = hls_page(src, "outage")
        async with player_origin(lambda: page) as base, Browser.launch(tmp_path / "p") as browser:
            pg = await browser.new_page()
            await pg.goto(base + "/player.html")
            await pg.wait_for(
                "document.getElementById('v').currentTime >= 5.5 || window.hlsErrors.length > 0",
                timeout_s=90,
            )
            assert await pg.evaluate("window.hlsErrors") == []
            frags = await pg.evaluate("window.fragUrls")
            assert frags, "no fragment loaded"
            assert all(u.startswith(o.node.base_url) for u in frags), frags  # from the node
            first = re.search(r"/b/(\w+)\.m4s", frags[0])
            assert first is not None
            assert first.group(1) in o.low_cids, frags
            assert pg.console_errors == []
        # A was served all along.
        for p in o.a_paths[2:]:
            status, _, body = await asyncio.to_thread(o.a.get, p)
            assert status == 200
            assert cid_of(body) == cid_in(p)
