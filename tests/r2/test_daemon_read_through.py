"""A real daemon serves media whose blobs are only in R2: the production read-through path.

The node's catalog knows the media item but holds none of its blobs (as after tiering evicted
it); ffmpeg, as an independent HLS client, plays it through the node, which fetches every
segment from the bucket (moto over HTTP), verifies it and serves it. Afterwards the node holds
every blob, `peerd verify` is clean, and the bytes are counted as served from R2.
"""

from __future__ import annotations

import asyncio
import http.client
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from pathlib import Path

from tests.support.process import PeerdProcess, run_cli
from tests.support.r2media import hls_url, media_in_bucket_only, r2_config, write_r2_secrets
from tests.support.s3server import MotoServer
from tests.support.whep_media import make_hls


def _metric(base_url: str, pattern: str) -> float:
    with urllib.request.urlopen(base_url + "/metrics", timeout=5) as r:  # noqa: S310
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(pattern + r" ([0-9.e+-]+)$", text, re.M))


async def test_ffmpeg_plays_media_held_only_in_r2(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "ffmpeg (Debian package) is needed as the independent HLS client"
    clip = await asyncio.to_thread(make_hls, tmp_path / "clip", seconds=4, bframes=0)
    state = tmp_path / "node"
    node = PeerdProcess(state, config={"r2": r2_config(moto, bucket)})
    await asyncio.to_thread(node.init)
    write_r2_secrets(state)
    media_id, cids = await media_in_bucket_only(state, clip, moto, bucket)
    assert not list((state / "blobs").rglob("b*"))  # nothing held locally
    await asyncio.to_thread(node.start)
    try:
        url = hls_url(node.base_url, state, media_id)
        res = await asyncio.to_thread(
            subprocess.run,
            [ffmpeg, "-v", "error", "-i", url, "-f", "null", "-"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stderr.strip() == "", res.stderr[-2000:]
        served_r2 = await asyncio.to_thread(
            _metric, node.base_url, r'peerd_bytes_served_total\{source="(?:r2|fetched)"\}'
        )
        assert served_r2 > 0
    finally:
        code = await asyncio.to_thread(node.stop)
    assert code == 0, node.logs()[-3000:]
    held = {p.name for p in (state / "blobs").rglob("b*") if p.is_file()}
    assert held == set(cids)
    verify = await asyncio.to_thread(run_cli, "verify", state_dir=state)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 -- loopback test node
        return bytes(r.read())


def _get_keepalive(url: str) -> bytes:
    """A GET as players send it (keep-alive, no ``Connection: close``): the HTTP fast path."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.netloc, timeout=30)
    try:
        conn.request("GET", f"{u.path}?{u.query}")
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        return resp.read()
    finally:
        conn.close()


async def _held_soon(state: Path, cids: list[str], timeout_s: float = 20.0) -> bool:
    """True once every blob of ``cids`` is a file in the node's store."""
    for _ in range(int(timeout_s / 0.05)):
        held = {p.name for p in (state / "blobs").rglob("b*") if p.is_file()}
        if set(cids) <= held:
            return True
        await asyncio.sleep(0.05)
    return False


async def test_segments_after_a_miss_are_fetched_ahead_once(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    clip = await asyncio.to_thread(make_hls, tmp_path / "clip", seconds=12, audio=False)
    state = tmp_path / "node"
    config = {"r2": r2_config(moto, bucket), "http": {"prefetch_segments": 2}}
    node = PeerdProcess(state, config=config)
    await asyncio.to_thread(node.init)
    write_r2_secrets(state)
    media_id, _ = await media_in_bucket_only(state, clip, moto, bucket)
    await asyncio.to_thread(node.start)
    try:
        master = (await asyncio.to_thread(_get, hls_url(node.base_url, state, media_id))).decode()
        first = next(x for x in master.splitlines() if x.endswith(".m3u8") or ".m3u8?" in x)
        playlist = await asyncio.to_thread(
            _get, f"{node.base_url}/hls/{media_id}/{first.lstrip('./')}"
        )
        segs = re.findall(r"^b/(\w+)\.m4s\?", playlist.decode(), re.M)
        init = re.findall(r'^#EXT-X-MAP:URI="b/(\w+)\.mp4\?', playlist.decode(), re.M)[0]
        assert len(segs) >= 5, playlist
        base = f"{node.base_url}/hls/{media_id}/b"
        token = first.split("?", 1)[1]

        # Startup as a player asks: the init (a miss: the node fetches segment 0, which the
        # player asks for next), then segment 0, at a rendition its ABR may leave at once:
        # nothing is fetched ahead of it.
        await asyncio.to_thread(_get, f"{base}/{init}.mp4?{token}")
        await asyncio.to_thread(_get, f"{base}/{segs[0]}.m4s?{token}")
        started = await asyncio.to_thread(
            _metric, node.base_url, r'peerd_prefetches_total\{outcome="started"\}'
        )
        assert started == 1
        # The player stays on the rendition: segment 1 brings 2 and 3 ahead.
        await asyncio.to_thread(_get, f"{base}/{segs[1]}.m4s?{token}")
        assert await _held_soon(state, segs[:4])
        # Segment 2 is now held; asking for it moves the window: 4 is fetched, 5 is not.
        await asyncio.to_thread(_get_keepalive, f"{base}/{segs[2]}.m4s?{token}")
        assert await _held_soon(state, segs[:5])
        held = {p.name for p in (state / "blobs").rglob("b*") if p.is_file()}
        assert len(segs) == 5 or segs[5] not in held
        # Every blob came up once: no second GET for a segment fetched ahead.
        gets = await asyncio.to_thread(
            _metric, node.base_url, r'peerd_r2_requests_total\{op="GetObject"\}'
        )
        assert gets == 6
    finally:
        code = await asyncio.to_thread(node.stop)
    assert code == 0, node.logs()[-3000:]
