"""Live segments past the uplink budget go to the bucket, and new viewers after them (issue 22,
Network; the overflow of the network issue applied to live), end to end.

A real daemon with one live input, R2 on a moto server and a tiny uplink budget; ffmpeg publishes
over RTMP and an ffmpeg viewer (``-xerror``) plays the live playlist, which takes the node's
uplink past its budget. The live segments then appear in the bucket under their content
addressed keys (``blobs/<cid>``, bytes hashing to the id); a new viewer's segment request is
answered with a 302 to the bucket, whose bytes are the segment.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from peerd.core import tokens
from peerd.core.ids import cid_of
from peerd.replication.r2 import blob_key
from tests.support.live_media import make_live_clip
from tests.support.p2p import metric
from tests.support.poll import until
from tests.support.process import PeerdProcess
from tests.support.r2media import r2_config, write_r2_secrets
from tests.support.s3server import MotoServer
from tests.test_live import finish, publish
from tests.test_live_relay import ffmpeg_viewer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

KEY = "over-key-" + "o" * 32
BUCKET = "peerd-live"


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
async def node(tmp_path: Path, moto: MotoServer) -> AsyncIterator[PeerdProcess]:
    proc = PeerdProcess(
        tmp_path / "node",
        config={
            "live": {
                "inputs": [{"name": "studio"}],
                "rtmp_listen": "127.0.0.1:0",
                "idle_timeout_s": 3.0,
                "segment_s": 1.0,
                "part_s": 0.5,
            },
            "r2": r2_config(moto, BUCKET),
            # 50 kbit/s: one viewer of the clip is well past it.
            "uplink": {"budget_mbps": 0.05},
        },
    )
    await asyncio.to_thread(proc.init)
    write_r2_secrets(proc.state_dir)
    (proc.state_dir / "secrets" / "live-studio.key").write_text(KEY + "\n")
    await asyncio.to_thread(proc.start)
    try:
        yield proc
    finally:
        await asyncio.to_thread(proc.stop)


def token(node: PeerdProcess, expires: int) -> str:
    """A viewer token of ``live:studio``; each expiry makes another viewer (another stream)."""
    secret = (node.state_dir / "secrets" / "hls_signing_key").read_text().strip()
    return tokens.mint(tokens.key_from_secret(secret), "live:studio", "hls", expires)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_live_clip(tmp_path_factory.mktemp("overflow") / "clip.mp4", seconds=30.0)


async def test_live_segments_overflow_to_the_bucket(
    node: PeerdProcess, moto: MotoServer, clip: Path
) -> None:
    addr = (node.state_dir / "rtmp.addr").read_text().strip()
    base = f"{node.base_url}/live/studio/"
    first = token(node, int(time.time()) + 3600)
    publisher = await publish(f"rtmp://{addr}/live/{KEY}", clip)
    async with aiohttp.ClientSession() as session:

        async def live() -> bool:
            async with session.get(f"{base}index.m3u8?token={first}") as r:
                return r.status == 200

        await until(live, timeout_s=60, step_s=0.3)
        viewer = await ffmpeg_viewer(f"{base}index.m3u8?token={first}")
        redirected: list[tuple[str, bytes]] = []
        n = 0

        async def spilled() -> bool:
            """A new viewer asks for a segment the bucket holds: sent there."""
            nonlocal n
            async with session.get(f"{base}index.m3u8?token={first}") as r:
                text = await r.text()
            held = await asyncio.to_thread(moto.keys, BUCKET)
            cids = [c for c in re.findall(r"^b/(b[a-z2-7]{58})\.m4s", text, re.M)]
            cids = [c for c in cids if blob_key(c) in held]
            if not cids:
                return False
            n += 1
            fresh = token(node, int(time.time()) + 3600 + n)
            url = f"{base}b/{cids[-1]}.m4s?token={fresh}"
            async with session.get(url, allow_redirects=False) as r:
                if r.status != 302:
                    return False
                location = r.headers["Location"]
            async with session.get(location) as r:
                assert r.status == 200
                redirected.append((cids[-1], await r.read()))
            return True

        await until(spilled, timeout_s=90, step_s=0.5)
        cid, data = redirected[0]
        assert cid_of(data) == cid
        code, err = await finish(publisher)
        assert code == 0, err
        code, err = await finish(viewer)
        assert code == 0, err
    # What the bucket holds under the live keys is what their ids say.
    objects = await asyncio.to_thread(moto.objects, BUCKET)
    live = {k: v for k, v in objects.items() if k.startswith("blobs/")}
    assert len(live) >= 2
    for key, body in live.items():
        assert key == blob_key(cid_of(body))
    pushed = await asyncio.to_thread(metric, node.base_url, "peerd_live_r2_pushed_total")
    assert pushed >= len(live)
    redirects = await asyncio.to_thread(metric, node.base_url, "peerd_live_r2_redirects_total")
    assert redirects >= 1
