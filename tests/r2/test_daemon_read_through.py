"""A real daemon serves media whose blobs are only in R2: the production read-through path.

The node's catalog knows the media item but holds none of its blobs (as after tiering evicted
it); ffmpeg, as an independent HLS client, plays it through the node, which fetches every
segment from the bucket (moto over HTTP), verifies it and serves it. Afterwards the node holds
every blob, `peerd verify` is clean, and the bytes are counted as served from R2.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

from peerd.testing.process import PeerdProcess, run_cli
from peerd.testing.r2media import hls_url, media_in_bucket_only, r2_config, write_r2_secrets
from peerd.testing.s3server import MotoServer
from peerd.testing.whep_media import make_hls


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
