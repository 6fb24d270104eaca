"""A real daemon with a capped uplink sends new streams to the bucket and keeps admitted ones.

The node's uplink budget is tiny (``[uplink] budget_mbps``), so the first viewer's first segment
uses it up. From then on: that viewer's stream is still served by the node to its last segment;
a new stream's segments are answered with a 302 to a presigned URL of the bucket, which curl -L,
ffmpeg (the whole master, exit 0) and hls.js in Chromium (another origin: the bucket's CORS
rule, set by ``peerd replicate cors``) follow to the right bytes; a media the bucket lacks gets
503 + ``Retry-After``; a forged or expired token gets 403, never a redirect; presigned URLs
expire; the heartbeat carries the admission state and spare uplink. Last, the same with a real
cap: the node in a network namespace whose uplink ``tc tbf`` holds at 4 Mbit/s.

The bucket is moto behind :class:`tests.support.bucketfront.BucketFront`, which refuses expired
or forged presigned URLs as R2 does (moto checks neither). moto answers CORS itself from the
bucket's rule (PutBucketCors), once its global ``Access-Control-Allow-Origin: *`` is turned off
(``MOTO_DISABLE_GLOBAL_CORS``): as on R2, a bucket without the rule fails hls.js
(``fragLoadError``; checked by hand with the ``replicate cors`` step removed).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import re
import secrets
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from peerd.catalog import Catalog
from peerd.catalog.media import media_blobs, media_manifest
from peerd.config import load_settings
from peerd.core import tokens
from peerd.core.ids import Cid, cid_of
from peerd.core.manifest import decode
from peerd.identity import Identity
from peerd.replication.r2 import blob_key
from peerd.runtime import open_runtime
from tests.support.browser import Browser, hls_page, player_origin
from tests.support.bucketfront import BucketFront
from tests.support.coordinator import FakeCoordinator
from tests.support.p2p import signed_request
from tests.support.poll import until
from tests.support.process import PeerdProcess, run_cli
from tests.support.r2media import write_r2_secrets
from tests.support.s3server import MotoServer
from tests.support.whep_media import HlsClip, add_media, make_hls

# 125 bytes/s: the first segment a viewer gets uses the budget up for the whole window.
BUDGET_MBPS = 0.001
WINDOW_S = 60.0


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    """moto as R2 answers browsers: no CORS header unless the bucket has a CORS rule (moto_server
    otherwise adds ``Access-Control-Allow-Origin: *`` to every answer)."""
    with MotoServer(env={"MOTO_DISABLE_GLOBAL_CORS": "1"}) as server:
        yield server


@pytest.fixture
async def front(moto: MotoServer) -> AsyncIterator[BucketFront]:
    f = await BucketFront(moto.url).start()
    try:
        yield f
    finally:
        await f.stop()


async def catalog_media(
    state: Path, clip: HlsClip, moto: MotoServer, bucket: str, *, in_bucket: bool
) -> tuple[Cid, list[Cid]]:
    """Catalog ``clip`` on the stopped node (blobs held), and with ``in_bucket`` also upload
    every blob to the bucket and mark it there, as promotion leaves it."""
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        media_id = await add_media(rt, clip)
        cids = await media_blobs(rt.catalog, media_id)
        if in_bucket:
            async with rt.catalog.transaction() as tx:
                for cid in cids:
                    await Catalog.set_blob_r2(tx, cid, "present", time.time())
            for cid in cids:
                data = await rt.store.read(cid)
                await asyncio.to_thread(moto.put, bucket, blob_key(cid), data)
        await rt.catalog.set_state("clean_shutdown", "1")
        return media_id, cids
    finally:
        await rt.close()


class Viewer:
    """One viewer (its own token and keep-alive connection, as a player has)."""

    def __init__(self, node: PeerdProcess, media_id: str, token: str) -> None:
        self.node = node
        self.media_id = media_id
        self.token = token
        self.conn = http.client.HTTPConnection(node.host, node.port, timeout=60)

    def get(self, path: str, token: str | None = None) -> tuple[int, dict[str, str], bytes]:
        """GET ``/hls/<media>/<path>?token=`` without following redirects."""
        self.conn.request("GET", f"/hls/{self.media_id}/{path}?token={token or self.token}")
        resp = self.conn.getresponse()
        body = resp.read()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body

    def segments(self) -> list[str]:
        """The blob paths (``b/<cid>.<ext>``) of the media's first rendition, init first."""
        status, _, master = self.get("master.m3u8")
        assert status == 200
        playlist = next(x for x in master.decode().splitlines() if ".m3u8" in x)
        status, _, body = self.get(playlist.split("?", 1)[0])
        assert status == 200
        return re.findall(r'(?:URI=")?(b/\w+\.(?:mp4|m4s|ts))\?', body.decode())

    def close(self) -> None:
        self.conn.close()


def token_for(state: Path, media_id: str, ttl_s: int = 600) -> str:
    """A fresh signed token (a distinct viewer: its own random lifetime)."""
    secret = (state / "secrets" / "hls_signing_key").read_text()
    exp = int(time.time()) + ttl_s + secrets.randbelow(100_000)
    return tokens.mint(tokens.key_from_secret(secret), media_id, "hls", exp)


def metric(node: PeerdProcess, name: str) -> float:
    with urllib.request.urlopen(node.base_url + "/metrics", timeout=10) as r:  # noqa: S310
        text = r.read().decode()
    pat = re.escape(name) + r" ([0-9.e+-]+)$"
    return sum(float(m.group(1)) for m in re.finditer(pat, text, re.M))


async def start_node(
    tmp_path: Path, front: BucketFront, bucket: str, *, ns: str = "", host: str = "", **uplink: Any
) -> PeerdProcess:
    """A daemon using the bucket through ``front`` (in network namespace ``ns`` at ``host``)."""
    config: dict[str, dict[str, Any]] = {
        "r2": {"endpoint": front.url, "bucket": bucket, "tiering_interval_s": 3600.0},
        "uplink": {"budget_mbps": BUDGET_MBPS, "window_s": WINDOW_S, **uplink},
    }
    node = PeerdProcess(tmp_path / "node", config=config)
    if ns:
        config["http"] = {"host": host, "port": 0}
        node.host = host
        node.prefix = ["ip", "netns", "exec", ns]
    await asyncio.to_thread(node.init)
    write_r2_secrets(node.state_dir)
    return node


@pytest.mark.timeout(240)
async def test_overflow_redirects_new_streams_and_keeps_admitted_ones(
    tmp_path: Path, moto: MotoServer, bucket: str, front: BucketFront
) -> None:
    ffmpeg, curl = shutil.which("ffmpeg"), shutil.which("curl")
    assert ffmpeg, "ffmpeg is the independent HLS client here"
    assert curl, "curl follows the redirect here"
    clip = await asyncio.to_thread(make_hls, tmp_path / "clip", seconds=8, bframes=0)
    local_clip = await asyncio.to_thread(
        make_hls, tmp_path / "local", seconds=4, bframes=0, width=256, height=192
    )
    coordinator = FakeCoordinator()
    await coordinator.start()
    node = await start_node(tmp_path, front, bucket)
    node.config["coordinator"] = {"url": coordinator.url, "heartbeat_interval_s": 1.0}
    state = node.state_dir
    media_id, cids = await catalog_media(state, clip, moto, bucket, in_bucket=True)
    local_id, _ = await catalog_media(state, local_clip, moto, bucket, in_bucket=False)
    await asyncio.to_thread(node.start)
    viewers: list[Viewer] = []
    try:
        # (g) the heartbeat says the node takes new streams, with its budget.
        def admission(state_: str) -> bool:
            return any(
                r.payload["admission"]["state"] == state_
                for r in coordinator.reports
                if r.payload["kind"] in ("register", "heartbeat")
            )

        await coordinator.wait_for(lambda: admission("open"), within_s=30)
        first = next(r.payload for r in coordinator.reports if "admission" in r.payload)
        assert first["admission"]["budget_bps"] == 125
        assert first["capacity"]["uplink_bps"] == 125

        # The first viewer is admitted: its first segments come from the node, and use the
        # budget up.
        a = Viewer(node, media_id, token_for(state, media_id))
        viewers.append(a)
        paths = await asyncio.to_thread(a.segments)
        assert len(paths) >= 4, paths
        for p in paths[:2]:
            status, _, body = await asyncio.to_thread(a.get, p)
            assert status == 200
            assert cid_of(body) == p.split("/")[1].split(".")[0]

        # (a) a new stream's segment: a redirect to a presigned bucket URL, never cached.
        b = Viewer(node, media_id, token_for(state, media_id))
        viewers.append(b)
        status, headers, _ = await asyncio.to_thread(b.get, paths[1])
        assert status == 302, (status, headers)
        location = headers["location"]
        assert location.startswith(front.url + f"/{bucket}/blobs/")
        assert "X-Amz-Signature=" in location
        assert headers["cache-control"] == "no-store"
        # ... which curl -L follows (from the node's URL) to the right bytes.
        got = tmp_path / "curl.out"
        url = f"{node.base_url}/hls/{media_id}/{paths[1]}?token={b.token}"
        res = await asyncio.to_thread(
            subprocess.run,
            [curl, "-sS", "-f", "-L", "-o", str(got), url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert res.returncode == 0, res.stderr
        want = paths[1].split("/")[1].split(".")[0]
        assert cid_of(got.read_bytes()) == want

        # ffmpeg plays the whole master as a new viewer: every segment from the bucket.
        before = front.presigned_ok
        master = f"{node.base_url}/hls/{media_id}/master.m3u8?token={token_for(state, media_id)}"
        res = await asyncio.to_thread(
            subprocess.run,
            [ffmpeg, "-v", "error", "-i", master, "-f", "null", "-"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr[-2000:]
        # ffmpeg's HLS demuxer says so (at error level) when a segment lives on another host
        # than its kept-alive connection, and opens a new connection: not a playback error.
        errors = [
            line
            for line in res.stderr.splitlines()
            if "Cannot reuse HTTP connection for different host" not in line
        ]
        assert errors == [], res.stderr[-2000:]
        assert front.presigned_ok - before >= len(paths) - 1  # init and segments (audio too)

        # (c) the admitted stream is served by the node to its end, over budget or not.
        for p in paths[2:]:
            status, headers, body = await asyncio.to_thread(a.get, p)
            assert status == 200, (p, status, headers)
            assert cid_of(body) == p.split("/")[1].split(".")[0]

        # (e) a forged or expired token: 403, never a redirect (checked before admission).
        forged = a.token[:-2] + ("AA" if not a.token.endswith("AA") else "BB")
        expired = token_for(state, media_id, ttl_s=-200_000)
        for bad in (forged, expired):
            status, headers, _ = await asyncio.to_thread(b.get, paths[1], bad)
            assert status == 403, (status, headers)
            assert "location" not in headers

        # (f) a media the bucket lacks: 503 + Retry-After for a new stream.
        d = Viewer(node, local_id, token_for(state, local_id))
        viewers.append(d)
        local_paths = await asyncio.to_thread(d.segments)
        status, headers, _ = await asyncio.to_thread(d.get, local_paths[1])
        assert status == 503, (status, headers)
        assert int(headers["retry-after"]) >= 1
        assert "location" not in headers

        # (g) the heartbeat reports the overflow; metrics count it.
        await coordinator.wait_for(lambda: admission("overflow"), within_s=30)
        last = [r.payload for r in coordinator.reports if "admission" in r.payload][-1]
        assert last["admission"]["spare_bps"] == 0
        assert last["capacity"]["spare_uplink_bps"] == 0
        assert last["admission"]["streams"] >= 1
        redirects = await asyncio.to_thread(
            metric, node, 'peerd_uplink_overflow_total{answer="redirect"}'
        )
        refused = await asyncio.to_thread(
            metric, node, 'peerd_uplink_overflow_total{answer="refused"}'
        )
        assert redirects >= len(paths)
        assert refused >= 1
        assert await asyncio.to_thread(metric, node, "peerd_uplink_budget_bytes_per_second") == 125
        assert await asyncio.to_thread(metric, node, "peerd_uplink_send_bytes_per_second") > 125
    finally:
        for v in viewers:
            v.close()
        code = await asyncio.to_thread(node.stop)
        await coordinator.close()
    assert code == 0, node.logs()[-3000:]
    assert cids


@pytest.mark.timeout(120)
async def test_presigned_urls_expire(
    tmp_path: Path, moto: MotoServer, bucket: str, front: BucketFront
) -> None:
    clip = await asyncio.to_thread(make_hls, tmp_path / "clip", seconds=4, bframes=0)
    node = await start_node(tmp_path, front, bucket, presign_expiry_s=1)
    media_id, _ = await catalog_media(node.state_dir, clip, moto, bucket, in_bucket=True)
    await asyncio.to_thread(node.start)
    try:
        a = Viewer(node, media_id, token_for(node.state_dir, media_id))
        paths = await asyncio.to_thread(a.segments)
        for p in paths[:2]:  # init and first segment: the budget is used up
            assert (await asyncio.to_thread(a.get, p))[0] == 200
        b = Viewer(node, media_id, token_for(node.state_dir, media_id))
        status, headers, _ = await asyncio.to_thread(b.get, paths[1])
        assert status == 302
        location = headers["location"]
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(location).query))
        assert query["X-Amz-Expires"] == "1"
        signed = time.mktime(time.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ")) - time.timezone
        await until(lambda: time.time() > signed + 2, timeout_s=10, step_s=0.1)
        refused = len(front.refused)

        def fetch() -> int:
            try:
                with urllib.request.urlopen(location, timeout=10) as r:  # noqa: S310
                    return int(r.status)
            except urllib.error.HTTPError as exc:
                return exc.code

        assert await asyncio.to_thread(fetch) == 403
        assert front.refused[refused:] == ["Request has expired"]
        a.close()
        b.close()
    finally:
        code = await asyncio.to_thread(node.stop)
    assert code == 0, node.logs()[-3000:]


@pytest.mark.timeout(180)
async def test_hlsjs_follows_overflow_redirects_to_the_bucket(
    tmp_path: Path, moto: MotoServer, bucket: str, front: BucketFront
) -> None:
    clip = await asyncio.to_thread(make_hls, tmp_path / "clip", seconds=8, bframes=0)
    node = await start_node(tmp_path, front, bucket)
    state = node.state_dir
    media_id, _ = await catalog_media(state, clip, moto, bucket, in_bucket=True)
    # The operator's one-time setup: the bucket lets players read across origins.
    res = await asyncio.to_thread(run_cli, "-c", str(state / "test.toml"), "replicate", "cors")
    assert res.returncode == 0, res.stdout + res.stderr
    slot: dict[str, str] = {}

    await asyncio.to_thread(node.start)
    try:
        a = Viewer(node, media_id, token_for(state, media_id))
        paths = await asyncio.to_thread(a.segments)
        for p in paths[:2]:  # init and first segment: the budget is used up
            assert (await asyncio.to_thread(a.get, p))[0] == 200
        a.close()
        slot["src"] = f"{node.base_url}/hls/{media_id}/master.m3u8?token=" + token_for(
            state, media_id
        )
        async with (
            player_origin(lambda: hls_page(slot["src"], "overflow")) as base,
            Browser.launch(tmp_path / "profile") as browser,
        ):
            pg = await browser.new_page()
            await pg.goto(base + "/player.html")
            await pg.wait_for(
                "document.getElementById('v').currentTime >= 5.5"
                " || window.hlsErrors.length > 0 || window.mediaErrors.length > 0",
                timeout_s=90,
            )
            assert await pg.evaluate("window.hlsErrors") == []
            assert await pg.evaluate("window.mediaErrors") == []
            assert await pg.evaluate("document.getElementById('v').currentTime") >= 5.5
            urls = await pg.evaluate("window.fragUrls")
            assert urls, "no fragment loaded"
            assert all(u.startswith(front.url + f"/{bucket}/blobs/") for u in urls), urls
            assert pg.console_errors == []
    finally:
        code = await asyncio.to_thread(node.stop)
    assert code == 0, node.logs()[-3000:]


@pytest.mark.timeout(120)
async def test_public_domain_redirects_without_signature(
    tmp_path: Path, moto: MotoServer, bucket: str, front: BucketFront
) -> None:
    """With ``[r2] public_base_url`` the redirect names the bucket's public domain (here moto's
    path-style bucket URL with public-read objects, as an R2 custom domain serves a bucket)."""
    clip = await asyncio.to_thread(make_hls, tmp_path / "clip", seconds=4, bframes=0)
    node = await start_node(tmp_path, front, bucket)
    public = f"{front.url}/{bucket}"
    node.config["r2"]["public_base_url"] = public
    media_id, cids = await catalog_media(node.state_dir, clip, moto, bucket, in_bucket=True)
    for cid in cids:
        data = await asyncio.to_thread(next((node.state_dir / "blobs").rglob(cid)).read_bytes)
        await asyncio.to_thread(
            moto.client().put_object, Bucket=bucket, Key=blob_key(cid), Body=data, ACL="public-read"
        )
    await asyncio.to_thread(node.start)
    try:
        a = Viewer(node, media_id, token_for(node.state_dir, media_id))
        paths = await asyncio.to_thread(a.segments)
        for p in paths[:2]:
            assert (await asyncio.to_thread(a.get, p))[0] == 200
        b = Viewer(node, media_id, token_for(node.state_dir, media_id))
        status, headers, _ = await asyncio.to_thread(b.get, paths[1])
        cid = paths[1].split("/")[1].split(".")[0]
        assert status == 302
        assert headers["location"] == f"{public}/blobs/{cid}"

        def fetch(url: str) -> bytes:
            with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310
                return bytes(r.read())

        assert cid_of(await asyncio.to_thread(fetch, headers["location"])) == cid
        a.close()
        b.close()
    finally:
        code = await asyncio.to_thread(node.stop)
    assert code == 0, node.logs()[-3000:]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)  # noqa: S603, S607


@pytest.fixture
def capped_link() -> Iterator[dict[str, str]]:
    """A network namespace joined to the host by a veth pair, its uplink (the namespace side's
    egress) capped by ``tc tbf`` at 4 Mbit/s; the namespace is 10.207.N.1, the host .254."""
    tag = secrets.token_hex(3)
    net = f"10.207.{int(tag[:2], 16)}"
    ns, outer, inner = f"peerdup-{tag}", f"puo{tag}", f"pui{tag}"
    ip("netns", "add", ns)
    try:
        ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        ip("link", "set", inner, "netns", ns)
        ip("addr", "add", f"{net}.254/24", "dev", outer)
        ip("link", "set", outer, "up")
        ip("-n", ns, "addr", "add", f"{net}.1/24", "dev", inner)
        ip("-n", ns, "link", "set", inner, "up")
        ip("-n", ns, "link", "set", "lo", "up")
        subprocess.run(  # noqa: S603
            ["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", inner, "root", "tbf"]  # noqa: S607
            + ["rate", "4mbit", "burst", "32kb", "latency", "100ms"],
            check=True,
            capture_output=True,
        )
        yield {"ns": ns, "node": f"{net}.1", "host": f"{net}.254"}
    finally:
        subprocess.run(["ip", "link", "del", outer], check=False)  # noqa: S603, S607
        subprocess.run(["ip", "netns", "del", ns], check=False)  # noqa: S603, S607


@pytest.mark.timeout(180)
async def test_real_uplink_cap_overflows_new_streams_and_keeps_the_admitted_one(
    tmp_path: Path, moto: MotoServer, bucket: str, capped_link: dict[str, str]
) -> None:
    """The node in a namespace whose uplink ``tc tbf`` caps at 4 Mbit/s, its budget 3 Mbit/s:
    one viewer downloading as fast as the link allows fills the budget; a new viewer is then
    redirected to the bucket, while the first is served by the node to the end of every pass."""
    front = await BucketFront(moto.url, host=capped_link["host"]).start()
    clip = await asyncio.to_thread(
        make_hls, tmp_path / "clip", seconds=12, bframes=0, video_bitrate=2_000_000
    )
    node = await start_node(
        tmp_path,
        front,
        bucket,
        ns=capped_link["ns"],
        host=capped_link["node"],
        budget_mbps=3.0,
        window_s=3.0,
        stream_mbps=0.5,
    )
    media_id, _ = await catalog_media(node.state_dir, clip, moto, bucket, in_bucket=True)
    stop = threading.Event()
    player: asyncio.Task[None] | None = None
    try:
        await asyncio.to_thread(node.start)
        a = Viewer(node, media_id, token_for(node.state_dir, media_id))
        paths = await asyncio.to_thread(a.segments)
        statuses: list[tuple[str, int, bool]] = []

        def play_a() -> None:
            # Pass after pass over every segment, as fast as the capped link carries them.
            while True:
                for p in paths:
                    status, _, body = a.get(p)
                    statuses.append((p, status, cid_of(body) == p.split("/")[1].split(".")[0]))
                if stop.is_set():
                    return

        player = asyncio.create_task(asyncio.to_thread(play_a))
        budget = 3e6 / 8

        rates: list[float] = []

        async def filled() -> bool:
            rate = await asyncio.to_thread(metric, node, "peerd_uplink_send_bytes_per_second")
            rates.append(rate)
            return rate > budget / 2  # two streams like this one would exceed the budget

        await until(filled, timeout_s=60, step_s=0.2)
        b = Viewer(node, media_id, token_for(node.state_dir, media_id))
        status, headers, _ = await asyncio.to_thread(b.get, paths[1])
        assert status == 302, (status, headers)
        assert headers["location"].startswith(front.url + f"/{bucket}/blobs/")
        b.close()
        passes = len(statuses) // len(paths)
        await until(lambda: len(statuses) >= (passes + 1) * len(paths), timeout_s=60, step_s=0.2)
        stop.set()
        await player
        a.close()
        # The cap was real: what the node measured never got far past 4 Mbit/s.
        assert max(rates) < 4e6 / 8 * 1.5, rates
        assert statuses
        assert all(s == 200 and ok for _, s, ok in statuses), statuses
    finally:
        stop.set()
        code = await asyncio.to_thread(node.stop)
        if player is not None and not player.done():
            with contextlib.suppress(Exception):
                await player
        await front.stop()
    assert code == 0, node.logs()[-3000:]


@pytest.mark.timeout(120)
async def test_a_stream_costs_its_media_bit_rate_not_a_fixed_guess(
    tmp_path: Path, moto: MotoServer, bucket: str, front: BucketFront
) -> None:
    """Under a 2 Mbit/s budget, three viewers of a ~0.4 Mbit/s media item are all served by the
    node: each new stream is taken to cost its media's bit rate (the node used to assume
    ``stream_mbps``, 3 Mbit/s, for every stream, and turned the second viewer away with most of
    its uplink idle)."""
    clip = await asyncio.to_thread(
        make_hls, tmp_path / "clip", seconds=6, bframes=0, audio=False, video_bitrate=400_000
    )
    node = await start_node(tmp_path, front, bucket, budget_mbps=2.0, window_s=5.0)
    media_id, _ = await catalog_media(node.state_dir, clip, moto, bucket, in_bucket=False)
    await asyncio.to_thread(node.start)
    viewers: list[Viewer] = []
    try:
        for _ in range(3):
            v = Viewer(node, media_id, token_for(node.state_dir, media_id))
            viewers.append(v)
            paths = await asyncio.to_thread(v.segments)
            status, headers, body = await asyncio.to_thread(v.get, paths[1])
            assert status == 200, (len(viewers), status, headers)
            assert cid_of(body) == paths[1].split("/")[1].split(".")[0]
        refused = await asyncio.to_thread(
            metric, node, 'peerd_uplink_overflow_total{answer="refused"}'
        )
        assert refused == 0
    finally:
        for v in viewers:
            v.close()
        code = await asyncio.to_thread(node.stop)
    assert code == 0, node.logs()[-3000:]


@pytest.mark.timeout(150)
async def test_demand_turned_away_brings_the_media_to_the_bucket(
    tmp_path: Path, moto: MotoServer, bucket: str, front: BucketFront
) -> None:
    """A media item the bucket lacks, wanted by more viewers than the uplink budget takes: the
    new viewers get 503 at first, and the demand they bring counts for tiering all the same, so
    the node promotes the item and the next new viewer is redirected to the bucket. (Counting
    only the bytes the node sent, one admitted viewer's demand stays under the promotion
    threshold however many are turned away: they got 503 for as long as the item was wanted.)"""
    clip = await asyncio.to_thread(make_hls, tmp_path / "clip", seconds=8, bframes=0)
    node = await start_node(tmp_path, front, bucket, window_s=120.0)
    node.config["r2"]["tiering_interval_s"] = 1.0
    media_id, cids = await catalog_media(node.state_dir, clip, moto, bucket, in_bucket=False)
    await asyncio.to_thread(node.start)
    viewers: list[Viewer] = []
    try:
        a = Viewer(node, media_id, token_for(node.state_dir, media_id))
        viewers.append(a)
        paths = await asyncio.to_thread(a.segments)
        for p in paths[:2]:  # admitted: the budget is used up for the whole window
            assert (await asyncio.to_thread(a.get, p))[0] == 200
        answers: list[int] = []

        def new_viewer() -> bool:
            v = Viewer(node, media_id, token_for(node.state_dir, media_id))
            try:
                status, headers, _ = v.get(paths[1 + len(answers) % (len(paths) - 1)])
            finally:
                v.close()
            answers.append(status)
            assert status in (302, 503), (status, headers)
            if status == 302:
                assert headers["location"].startswith(front.url + f"/{bucket}/blobs/")
            return status == 302

        await until(lambda: asyncio.to_thread(new_viewer), timeout_s=90, step_s=0.2)
        assert answers[0] == 503, answers  # the bucket lacked it at first
        stored = await asyncio.to_thread(moto.client().list_objects_v2, Bucket=bucket)
        keys = {o["Key"] for o in stored.get("Contents", [])}
        assert {blob_key(c) for c in cids} <= keys
    finally:
        for v in viewers:
            v.close()
        code = await asyncio.to_thread(node.stop)
    assert code == 0, node.logs()[-3000:]


@pytest.mark.timeout(120)
async def test_blobs_sent_to_a_lan_peer_leave_the_uplink_budget_alone(
    tmp_path: Path, moto: MotoServer, bucket: str, front: BucketFront
) -> None:
    """A LAN peer fetching the node's blobs (signed ``GET /p2p/v1/blobs``) uses the home's own
    network, not its uplink: the node's next viewer is still served by it. (Counted against the
    budget, those bytes turned the viewer away: 503, the bucket lacking the item.)"""
    clip = await asyncio.to_thread(make_hls, tmp_path / "clip", seconds=6, bframes=0)
    node = await start_node(tmp_path, front, bucket)
    peer = Identity.generate()
    node.config["mdns"] = {"trusted_peers": [peer.peer_id]}
    media_id, cids = await catalog_media(node.state_dir, clip, moto, bucket, in_bucket=False)
    await asyncio.to_thread(node.start)
    try:
        for cid in cids:
            status, body = await asyncio.to_thread(
                signed_request, peer, node.base_url, "GET", f"/p2p/v1/blobs/{cid}"
            )
            assert status == 200
            assert cid_of(body) == cid
        v = Viewer(node, media_id, token_for(node.state_dir, media_id))
        try:
            paths = await asyncio.to_thread(v.segments)
            status, headers, body = await asyncio.to_thread(v.get, paths[1])
        finally:
            v.close()
        assert status == 200, (status, headers)
        assert cid_of(body) == paths[1].split("/")[1].split(".")[0]
        # The meter holds the viewer's segment only.
        rate = await asyncio.to_thread(metric, node, "peerd_uplink_send_bytes_per_second")
        assert rate * WINDOW_S == pytest.approx(len(body), rel=0.01)
    finally:
        code = await asyncio.to_thread(node.stop)
    assert code == 0, node.logs()[-3000:]


async def stream_cost(state: Path, media_id: str) -> float:
    """What a viewer's stream of the media costs (bytes/s): its top rendition of each kind."""
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        raw = await media_manifest(rt.catalog, media_id)
        assert raw is not None
        top: dict[str, int] = {}
        for r in decode(raw).renditions:
            top[r.kind] = max(top.get(r.kind, 0), r.average_bandwidth or r.bandwidth)
        return sum(top.values()) / 8
    finally:
        await rt.close()


@pytest.mark.timeout(120)
async def test_streams_the_bucket_can_take_are_redirected_before_the_others(
    tmp_path: Path, moto: MotoServer, bucket: str, front: BucketFront
) -> None:
    """With one viewer playing, a new viewer of media the bucket holds is redirected there
    once the node would pass ``resume_ratio`` of its budget, while a new viewer of media only
    the node has is still served: the last of the uplink goes to those who cannot go elsewhere.
    (Both were served alike: the uplink then full, the next viewer of local-only media got 503.)"""
    in_bucket = await asyncio.to_thread(
        make_hls, tmp_path / "b", seconds=6, bframes=0, audio=False, video_bitrate=600_000
    )
    local = await asyncio.to_thread(
        make_hls,
        tmp_path / "l",
        seconds=6,
        bframes=0,
        audio=False,
        video_bitrate=400_000,
        width=256,
        height=192,
    )
    node = await start_node(tmp_path, front, bucket)
    state = node.state_dir
    bucket_id, _ = await catalog_media(state, in_bucket, moto, bucket, in_bucket=True)
    local_id, _ = await catalog_media(state, local, moto, bucket, in_bucket=False)
    c_bucket, c_local = await stream_cost(state, bucket_id), await stream_cost(state, local_id)
    assert c_bucket >= c_local
    # A viewer of the local media plus one more of either fits the budget; a viewer of the
    # bucket's media on top of the first passes resume_ratio (0.8) of it.
    budget = 1.1 * (c_local + c_bucket)
    node.config["uplink"].update(budget_mbps=budget * 8 / 1e6, stream_mbps=0.0)
    await asyncio.to_thread(node.start)
    viewers: list[Viewer] = []
    try:
        a = Viewer(node, local_id, token_for(state, local_id))
        viewers.append(a)
        local_paths = await asyncio.to_thread(a.segments)
        assert (await asyncio.to_thread(a.get, local_paths[1]))[0] == 200
        b = Viewer(node, bucket_id, token_for(state, bucket_id))
        viewers.append(b)
        bucket_paths = await asyncio.to_thread(b.segments)
        status, headers, _ = await asyncio.to_thread(b.get, bucket_paths[1])
        assert status == 302, (status, headers)
        assert headers["location"].startswith(front.url + f"/{bucket}/blobs/")
        c = Viewer(node, local_id, token_for(state, local_id))
        viewers.append(c)
        status, headers, body = await asyncio.to_thread(c.get, local_paths[1])
        assert status == 200, (status, headers)
        assert cid_of(body) == local_paths[1].split("/")[1].split(".")[0]
    finally:
        for v in viewers:
            v.close()
        code = await asyncio.to_thread(node.stop)
    assert code == 0, node.logs()[-3000:]
