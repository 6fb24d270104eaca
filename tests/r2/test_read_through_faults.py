"""Read-through under a failing bucket: a real daemon, R2 on moto behind the fault proxy.

A bucket that answers 503, resets the connection or cuts a body is failing, not saying the blob
does not exist: viewers get the segment (the node retries within the request's time) or a 503
with ``Retry-After``, never a 404. A 404 is for a blob every source says it lacks. Checked with a
plain HTTP client, segment by segment, and with ffmpeg playing the whole media while every blob's
first GETs fail.
"""

from __future__ import annotations

import asyncio
import http.client
import shutil
import subprocess
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from peerd.core.ids import cid_of
from peerd.replication.r2 import blob_key
from tests.support.faultproxy import Fault, FaultProxy, ProxyRequest
from tests.support.process import PeerdProcess
from tests.support.r2media import hls_url, media_in_bucket_only, r2_config, write_r2_secrets
from tests.support.s3server import MotoServer
from tests.support.whep_media import HlsClip, make_hls

FOREVER = 10**9


def _fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    """A GET as a player sends it (keep-alive): status, headers, body."""
    u = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(u.netloc, timeout=60)
    try:
        conn.request("GET", f"{u.path}?{u.query}")
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


class _PerBlob:
    """Matchers of the ``nth`` GET (1-based) of each blob key, resumed ranges included."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}
        self.index: dict[int, int] = {}

    def nth(self, n: int) -> Callable[[ProxyRequest], bool]:
        """A matcher of each blob's ``n``-th GET."""
        return lambda r: r.method == "GET" and "/blobs/" in r.path and self._number(r) == n

    def _number(self, r: ProxyRequest) -> int:
        # Every rule's matcher sees the request: it is numbered once.
        if r.index not in self.index:
            self.seen[r.path] = self.seen.get(r.path, 0) + 1
            self.index[r.index] = self.seen[r.path]
        return self.index[r.index]


def _blob_get(r: ProxyRequest) -> bool:
    return r.method == "GET" and "/blobs/" in r.path


async def _node(
    tmp_path: Path,
    moto: MotoServer,
    bucket: str,
    proxy: FaultProxy,
    clip: HlsClip,
    http: dict[str, object],
) -> tuple[PeerdProcess, str]:
    state = tmp_path / "node"
    r2 = {**r2_config(moto, bucket), "endpoint": proxy.url, "read_timeout_s": 2.0}
    # Retries of failing sources get half the request time: 5 s here.
    config = {"r2": r2, "http": {"request_timeout_s": 10.0, **http}}
    node = PeerdProcess(state, config=config)
    await asyncio.to_thread(node.init)
    write_r2_secrets(state)
    media_id, _ = await media_in_bucket_only(state, clip, moto, bucket)
    await asyncio.to_thread(node.start)
    return node, media_id


async def test_bucket_faults_answer_200_or_503_never_404(
    tmp_path: Path, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    clip = await asyncio.to_thread(make_hls, tmp_path / "clip", seconds=10, audio=False)
    segs = [await asyncio.to_thread(p.read_bytes) for p in clip.segments]
    assert len(segs) >= 5
    # No fetching ahead: each fault below must meet the segment the viewer asks for.
    node, media_id = await _node(tmp_path, moto, bucket, proxy, clip, {"prefetch_segments": 0})
    try:

        def url(i: int) -> str:
            return hls_url(node.base_url, node.state_dir, media_id, f"b/{cid_of(segs[i])}.m4s")

        # The bucket answers 503 to every blob GET: 503 with Retry-After, not 404.
        proxy.add(_blob_get, Fault("status", 503), FOREVER)
        status, headers, _ = await asyncio.to_thread(_fetch, url(0))
        assert status == 503, (status, node.logs()[-3000:])
        assert int(headers["Retry-After"]) >= 1
        assert proxy.count("GET", "/blobs/") > 3  # retried beyond the R2 client's own attempts
        proxy.rules.clear()

        # Each kind of fault, more times in a row than the R2 client retries by itself: the
        # viewer still gets the whole segment, byte for byte.
        for i, fault in enumerate(
            (Fault("status", 503), Fault("drop"), Fault("cut", fraction=0.3), Fault("slowdown"))
        ):
            proxy.add(_blob_get, fault, times=4)
            status, _, body = await asyncio.to_thread(_fetch, url(i))
            assert status == 200, (fault, status, body[:200])
            assert body == segs[i], fault
            proxy.rules.clear()

        # Held now, faults or not.
        proxy.add(lambda r: r.method == "GET", Fault("status", 503), FOREVER)
        status, _, body = await asyncio.to_thread(_fetch, url(0))
        assert (status, body) == (200, segs[0])
        proxy.rules.clear()

        # A blob the bucket does not have (and no other source): 404.
        gone = cid_of(segs[-1])
        await asyncio.to_thread(moto.client().delete_object, Bucket=bucket, Key=blob_key(gone))
        status, headers, _ = await asyncio.to_thread(_fetch, url(len(segs) - 1))
        assert status == 404
        assert "Retry-After" not in headers
    finally:
        code = await asyncio.to_thread(node.stop)
    assert code == 0, node.logs()[-3000:]


async def test_ffmpeg_plays_through_a_failing_bucket(
    tmp_path: Path, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "ffmpeg (Debian package) is needed as the independent HLS client"
    clip = await asyncio.to_thread(make_hls, tmp_path / "clip", seconds=8)
    # The first four GETs of every blob fail (a 503, a reset, a cut body, SlowDown): the R2
    # client's own three attempts are not enough, the node must try again.
    per_blob = _PerBlob()
    for n, fault in enumerate(
        (Fault("status", 503), Fault("drop"), Fault("cut", fraction=0.4), Fault("slowdown")), 1
    ):
        proxy.add(per_blob.nth(n), fault, FOREVER)
    node, media_id = await _node(tmp_path, moto, bucket, proxy, clip, {})
    try:
        res = await asyncio.create_subprocess_exec(
            ffmpeg,
            "-v",
            "error",
            "-i",
            hls_url(node.base_url, node.state_dir, media_id),
            "-f",
            "null",
            "-",
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(res.communicate(), 180)
        assert res.returncode == 0, err.decode()[-2000:]
        assert err.decode().strip() == "", err.decode()[-2000:]
        faults = [kind for m, p, kind in proxy.log if m == "GET" and "/blobs/" in p]
        assert {"status", "drop", "cut", "slowdown"} <= set(faults)
    finally:
        code = await asyncio.to_thread(node.stop)
    assert code == 0, node.logs()[-3000:]
