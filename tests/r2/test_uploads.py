"""Media enters the network through the bucket: real daemons, moto over HTTP, ffmpeg.

A source file put under ``uploads/`` is downloaded, packaged, pushed (blobs, then
``media/<id>.json``) and archived, by ``peerd ingest --from-bucket`` or by daemons watching the
prefix, which claim each upload so that exactly one of them packages it; a fresh node then plays
the media from the bucket. Corrupt uploads are marked failed once; a claimant killed mid-ingest
is taken over once its claim expires.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

from peerd.core import manifest as mf
from peerd.core import uploads as up
from peerd.replication import r2 as r2_module
from peerd.replication.r2 import R2Client
from tests.support.coordinator import FakeCoordinator, NodeApiClient
from tests.support.faultproxy import Fault, FaultProxy, ProxyRequest
from tests.support.media import make_bad, make_media
from tests.support.poll import until
from tests.support.process import PeerdProcess, run_cli
from tests.support.r2media import hls_url, r2_config, write_r2_secrets
from tests.support.s3server import MotoServer

UPLOAD = "uploads/film.mp4"


def _metric(base_url: str, pattern: str) -> float:
    with urllib.request.urlopen(base_url + "/metrics", timeout=5) as r:  # noqa: S310
        text = r.read().decode()
    return sum(float(m.group(1)) for m in re.finditer(pattern + r" ([0-9.e+-]+)$", text, re.M))


def _keys(moto: MotoServer, bucket: str) -> set[str]:
    listed = moto.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    return {o["Key"] for o in listed}


def _get(moto: MotoServer, bucket: str, key: str) -> bytes:
    return bytes(moto.client().get_object(Bucket=bucket, Key=key)["Body"].read())


async def keys(moto: MotoServer, bucket: str) -> set[str]:
    """Every key in the bucket (read directly, not through peerd)."""
    return await asyncio.to_thread(_keys, moto, bucket)


async def _node(
    tmp_path: Path, name: str, r2: dict[str, Any], extra: dict[str, dict[str, Any]] | None = None
) -> PeerdProcess:
    node = PeerdProcess(tmp_path / name, config={"r2": r2, "node": {"name": name}, **(extra or {})})
    await asyncio.to_thread(node.init)
    write_r2_secrets(node.state_dir)
    return node


def _cli(node: PeerdProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("-c", str(node.state_dir / "test.toml"), *args, timeout=300)


def _published(found: set[str], media_id: str) -> bool:
    return f"media/{media_id}.json" in found


async def test_ingest_from_bucket_publishes_and_a_fresh_node_plays_it(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "ffmpeg (Debian package) is the independent HLS client"
    src = await asyncio.to_thread(make_media, tmp_path / "film.mp4", seconds=4)
    await asyncio.to_thread(moto.put, bucket, UPLOAD, src.read_bytes())
    a = await _node(tmp_path, "a", r2_config(moto, bucket))
    await asyncio.to_thread(a.start)
    try:
        # The daemon runs it (control socket): its replicator pushes, its catalog keeps it.
        res = await asyncio.to_thread(_cli, a, "ingest", "--from-bucket", "--json", UPLOAD)
        assert res.returncode == 0, res.stdout + res.stderr + a.logs()[-3000:]
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["upload"] == "ok", out
        media_id = out["media_id"]
        assert "control ingest from the bucket" in a.logs()
    finally:
        assert await asyncio.to_thread(a.stop) == 0, a.logs()[-3000:]
    found = await keys(moto, bucket)
    assert _published(found, media_id)
    manifest = mf.decode(await asyncio.to_thread(_get, moto, bucket, f"media/{media_id}.json"))
    assert mf.media_id_of(manifest) == media_id
    assert {f"blobs/{c}" for c in manifest.blob_cids()} <= found
    # Archived, claims never taken (an operator's order), nothing left in the work directory.
    assert UPLOAD not in found
    assert "archive/film.mp4" in found
    assert not [k for k in found if k.startswith(("claims/", "failed/"))]
    assert not list((a.state_dir / "cache" / "uploads").glob("*/*"))

    b = await _node(tmp_path, "b", r2_config(moto, bucket))
    pull = await asyncio.to_thread(_cli, b, "replicate", "pull", "--no-progress", media_id)
    assert pull.returncode == 0, pull.stdout + pull.stderr
    await asyncio.to_thread(b.start)
    try:
        url = hls_url(b.base_url, b.state_dir, media_id)
        play = await asyncio.to_thread(
            subprocess.run,
            [ffmpeg, "-v", "error", "-xerror", "-i", url, "-map", "0", "-f", "null", "-"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert play.returncode == 0, play.stderr[-2000:]
        assert play.stderr.strip() == "", play.stderr[-2000:]
    finally:
        assert await asyncio.to_thread(b.stop) == 0, b.logs()[-3000:]


async def test_two_watchers_package_each_upload_once_and_report_it(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    fake = FakeCoordinator()
    await fake.start()
    r2 = {
        **r2_config(moto, bucket),
        "watch_uploads": True,
        "uploads_interval_s": 0.3,
        "claim_lease_s": 30.0,
    }
    # Heartbeats once an hour: a report the fake gets in this test was asked for at once.
    coord = {"coordinator": {"url": fake.url, "heartbeat_interval_s": 3600.0}}
    nodes = [await _node(tmp_path, n, r2, coord) for n in ("a", "b")]
    names = ["uploads/one.mp4", "uploads/two.mp4"]
    for i, name in enumerate(names):
        clip = await asyncio.to_thread(make_media, tmp_path / f"{i}.mp4", seconds=2 + i)
        await asyncio.to_thread(moto.put, bucket, name, clip.read_bytes())
    for node in nodes:
        await asyncio.to_thread(node.start)
    try:
        await fake.wait_for(lambda: len(fake.of_kind("register")) == 2)

        async def done() -> bool:
            found = await keys(moto, bucket)
            media = [k for k in found if k.startswith("media/")]
            archived = {f"archive/{n.removeprefix('uploads/')}" for n in names}
            return len(media) == 2 and archived <= found and not (set(names) & found)

        await until(done, timeout_s=240, step_s=0.2)
        # Counted once the upload is archived and the coordinator told.
        await until(lambda: sum(map(_ok, nodes)) >= 2, timeout_s=30, step_s=0.1)
        ok = [_ok(n) for n in nodes]
        packaged = [
            await asyncio.to_thread(
                _metric, n.base_url, r'peerd_media_ingests_total\{result="ok"\}'
            )
            for n in nodes
        ]
        assert sum(ok) == 2, (ok, [n.logs()[-2000:] for n in nodes])
        assert packaged == ok  # nothing packaged twice, by either node
        found = await keys(moto, bucket)
        assert not [k for k in found if k.startswith(("claims/", "failed/"))]

        # Each node that published told the coordinator at once: a heartbeat (not due for an
        # hour) whose inventory counts the media, which the node's inventory API names.
        for node, n_ok in zip(nodes, ok, strict=True):
            if not n_ok:
                continue
            token = (node.state_dir / "secrets" / "api_token").read_text().strip()
            api = NodeApiClient(node.base_url, token)
            try:
                inv = await api.call("GET", "/api/v1/inventory", params={"limit": 1000})
            finally:
                await api.close()
            media = [i for i in inv.body["items"] if i["kind"] == "media"]
            assert len(media) == n_ok
            assert {m["title"] for m in media} <= {"one", "two"}
            digest = inv.body["summary"]["digest"]
            await fake.wait_for(partial(_heartbeat_with, fake, digest))
    finally:
        for node in nodes:
            assert await asyncio.to_thread(node.stop) == 0, node.logs()[-3000:]
        await fake.close()


async def test_two_nodes_packaging_the_same_upload_agree_on_the_media_id(
    tmp_path: Path, moto: MotoServer, bucket: str
) -> None:
    src = await asyncio.to_thread(make_media, tmp_path / "film.mp4", seconds=3)
    data = src.read_bytes()
    ids = []
    for name in ("a", "b"):
        # The same upload, put again after the first node archived it (or an operator who ran
        # the command on both nodes): no claims, no daemon, each node packages it itself.
        await asyncio.to_thread(moto.put, bucket, UPLOAD, data)
        node = await _node(tmp_path, name, r2_config(moto, bucket))
        res = await asyncio.to_thread(_cli, node, "ingest", "--from-bucket", "--json", UPLOAD)
        assert res.returncode == 0, res.stdout + res.stderr
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert out["upload"] == "ok", out
        assert out["new_blobs"] > 0  # packaged here, not found in this node's catalog
        ids.append(out["media_id"])
    assert ids[0] == ids[1]
    found = await keys(moto, bucket)
    assert len([k for k in found if k.startswith("media/")]) == 1


def _lists(proxy: FaultProxy, prefix: str) -> int:
    return sum(1 for m, p, _ in proxy.log if m == "GET" and "list-type=2" in p and prefix in p)


async def test_a_corrupt_upload_is_marked_failed_once_and_never_retried(
    tmp_path: Path, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    bad = await asyncio.to_thread(make_bad, tmp_path / "bad.mp4", "text")
    await asyncio.to_thread(moto.put, bucket, "uploads/bad.mp4", bad.read_bytes())
    r2 = {
        **r2_config(moto, bucket),
        "endpoint": proxy.url,
        "watch_uploads": True,
        "uploads_interval_s": 0.2,
    }
    a = await _node(tmp_path, "a", r2)
    await asyncio.to_thread(a.start)
    b = await _node(tmp_path, "b", r2)
    try:
        marker_key = up.failed_key("uploads/bad.mp4")
        await until(lambda: marker_key in _keys(moto, bucket), timeout_s=120, step_s=0.1)
        marker = json.loads(await asyncio.to_thread(_get, moto, bucket, marker_key))
        assert "bad.mp4" in marker["reason"], marker
        assert marker["node"] == "a"
        # A second node, started after the failure, skips it too (the marker, not memory).
        await asyncio.to_thread(b.start)
        seen = _lists(proxy, "prefix=uploads")
        await until(lambda: _lists(proxy, "prefix=uploads") >= seen + 10, timeout_s=60)
        for node, failed in ((a, 1), (b, 0)):
            got = await asyncio.to_thread(
                _metric, node.base_url, r'peerd_uploads_total\{result="failed"\}'
            )
            assert got == failed, node.logs()[-3000:]
        # Downloaded once in all; left in place for its owner; no claim held.
        gets = [p for m, p, _ in proxy.log if m == "GET" and p.split("?")[0].endswith("bad.mp4")]
        assert len(gets) == 1, gets
        found = await keys(moto, bucket)
        assert "uploads/bad.mp4" in found
        assert not [k for k in found if k.startswith(("claims/", "media/"))]
        assert "upload failed" in a.logs()
    finally:
        for node in (a, b):
            await asyncio.to_thread(node.stop)
    # Nothing of it kept: no blob, no media row, no download.
    assert not [f for f in (a.state_dir / "blobs").rglob("*") if f.is_file()]
    assert not list((a.state_dir / "cache" / "uploads").glob("*/*"))
    status = await asyncio.to_thread(_cli, a, "status", "--json")
    assert json.loads(status.stdout)["media"] == 0


async def test_a_bucket_outage_is_retried_with_backoff(
    tmp_path: Path, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    src = await asyncio.to_thread(make_media, tmp_path / "film.mp4", seconds=2)
    await asyncio.to_thread(moto.put, bucket, UPLOAD, src.read_bytes())
    path = f"/{bucket}/{UPLOAD}"

    def listing(r: ProxyRequest) -> bool:
        return r.method == "GET" and "list-type=2" in r.path and "prefix=uploads" in r.path

    def download(r: ProxyRequest) -> bool:
        return r.method == "GET" and r.path.split("?")[0] == path

    def manifest_put(r: ProxyRequest) -> bool:
        return r.method == "PUT" and f"/{bucket}/media/" in r.path

    proxy.add(listing, Fault("slowdown"), times=3)
    proxy.add(download, Fault("status", status=500), times=4)  # past one read's own retries
    proxy.add(manifest_put, Fault("status", status=503), times=2)
    r2 = {
        **r2_config(moto, bucket),
        "endpoint": proxy.url,
        "watch_uploads": True,
        "uploads_interval_s": 0.2,
        "retry_base_s": 0.1,
    }
    a = await _node(tmp_path, "a", r2)
    await asyncio.to_thread(a.start)
    try:
        await until(lambda: _ok(a) == 1, timeout_s=120, step_s=0.1)
        faults = [(m, f) for m, _, f in proxy.log if f != "ok"]
        assert len(faults) == 9, faults
        assert "cannot list bucket uploads; backing off" in a.logs()
        assert "upload download failed; retrying" in a.logs()
        assert _metric(a.base_url, r'peerd_media_ingests_total\{result="ok"\}') == 1
    finally:
        assert await asyncio.to_thread(a.stop) == 0, a.logs()[-3000:]
    found = await keys(moto, bucket)
    assert "archive/film.mp4" in found
    assert len([k for k in found if k.startswith("media/")]) == 1


async def test_a_claimant_killed_mid_ingest_is_taken_over_after_its_claim_expires(
    tmp_path: Path, moto: MotoServer, bucket: str, proxy: FaultProxy
) -> None:
    src = await asyncio.to_thread(make_media, tmp_path / "film.mp4", seconds=3)
    await asyncio.to_thread(moto.put, bucket, UPLOAD, src.read_bytes())
    path = f"/{bucket}/{UPLOAD}"

    def upload_get(r: ProxyRequest) -> bool:
        return r.method == "GET" and r.path.split("?")[0] == path

    # Node a's download of the upload hangs (a slow link): it holds the claim, renewing it.
    proxy.add(upload_get, Fault("stall", seconds=120.0), times=100)
    r2 = {**r2_config(moto, bucket), "watch_uploads": True, "uploads_interval_s": 0.2}
    a = await _node(tmp_path, "a", {**r2, "endpoint": proxy.url, "claim_lease_s": 6.0})
    b = await _node(tmp_path, "b", {**r2, "claim_lease_s": 30.0})
    await asyncio.to_thread(a.start)
    try:
        await until(lambda: sum(map(upload_get, _requests(proxy))) >= 1, timeout_s=60)
        claims = [k for k in await keys(moto, bucket) if k.startswith("claims/")]
        assert claims, "node a downloads without a claim"
        await asyncio.to_thread(b.start)
        # While a lives it renews its claim (a new generation every third of its 6 s lease):
        # b leaves the upload alone.
        await until(lambda: _skipped(b) >= 3, timeout_s=60, step_s=0.1)

        def renewed() -> bool:
            found = _keys(moto, bucket)
            return up.latest_gen(found, UPLOAD) >= 3

        await until(renewed, timeout_s=60, step_s=0.1)
        assert UPLOAD in await keys(moto, bucket)
        assert "claimed upload" not in b.logs()
        assert a.proc is not None
        a.proc.send_signal(signal.SIGKILL)
        await asyncio.to_thread(a.proc.wait, 10)
        a.proc = None

        async def taken_over() -> bool:
            found = await keys(moto, bucket)
            return "archive/film.mp4" in found and any(k.startswith("media/") for k in found)

        await until(taken_over, timeout_s=180, step_s=0.2)
        await until(lambda: _ok(b) == 1, timeout_s=30, step_s=0.1)
        assert "expired" in b.logs()
        assert not [k for k in await keys(moto, bucket) if k.startswith("claims/")]
    finally:
        await asyncio.to_thread(b.stop)
        if a.proc is not None:
            await asyncio.to_thread(a.stop)


def _requests(proxy: FaultProxy) -> list[ProxyRequest]:
    return [ProxyRequest(m, p, {}, 0) for m, p, _ in proxy.log]


def _skipped(node: PeerdProcess) -> float:
    return _metric(node.base_url, r'peerd_uploads_total\{result="skipped"\}')


def _ok(node: PeerdProcess) -> float:
    return _metric(node.base_url, r'peerd_uploads_total\{result="ok"\}')


def _heartbeat_with(fake: FakeCoordinator, digest: str) -> bool:
    return any(r.payload["inventory"]["digest"] == digest for r in fake.of_kind("heartbeat"))


async def test_archiving_copies_an_object_over_the_copy_limit_by_parts(
    client: R2Client, moto: MotoServer, bucket: str, proxy: FaultProxy, monkeypatch: Any
) -> None:
    # R2 and S3 copy at most 5 GiB in one request: here the limit is lowered to 5 MiB.
    monkeypatch.setattr(r2_module, "COPY_LIMIT", 5 * 1024 * 1024)
    data = os.urandom(11 * 1024 * 1024 + 3)
    await asyncio.to_thread(moto.put, bucket, "uploads/big.bin", data)
    await client.copy("uploads/big.bin", "archive/big.bin", len(data))
    assert await asyncio.to_thread(_get, moto, bucket, "archive/big.bin") == data
    assert sum(1 for m, p, _ in proxy.log if m == "PUT" and "partNumber=" in p) == 3
    await client.copy("uploads/big.bin", "archive/small.bin", 5 * 1024 * 1024)  # one request
    assert proxy.count("PUT", "/archive/small.bin") == 1
