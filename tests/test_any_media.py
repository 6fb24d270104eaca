"""Any node serves any media: three real daemons, and nodes that never heard of a media item
play it to ffmpeg from whichever source has it (issue 20, item 1).

Nodes (loopback):
- ``holder`` (A): mDNS + libp2p, holds every clip below; the only holder of ``lib``, ``lan``,
  ``pre`` and ``whep``.
- ``dht`` (B): libp2p only (no mDNS, no R2), bootstraps to A: A is a libp2p-only holder to it.
- ``lan`` (C): mDNS + R2 (moto), no libp2p: A is a LAN holder to it; the bucket holds the
  ``r2`` clip (manifest under ``media/<id>.json``, blobs under ``blobs/<cid>``) and a forged
  manifest.

Neither B nor C has any media in its catalog at start. ffmpeg plays a signed master URL of B
or C (``-xerror``: any decoding error fails it); the node finds the manifest through its
sources, checks it hashes to the id, records it and fetches the segments on demand. A fourth
node whose only source (R2) refuses every connection shows the 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import sqlite3
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from peerd.catalog.media import media_blobs, media_manifest
from peerd.config import load_settings
from peerd.core import tokens
from peerd.core.ids import Cid, cid_of
from peerd.replication.r2 import blob_key, manifest_key
from peerd.runtime import open_runtime
from tests.support.coordinator import NodeApiClient
from tests.support.p2p import loopback_multicast, metric, p2p_addrs
from tests.support.process import PeerdProcess
from tests.support.r2media import hls_url, r2_config, write_r2_secrets
from tests.support.s3server import MotoServer, free_port
from tests.support.whep_media import HlsClip, add_media, make_hls
from tests.support.whep_viewer import ViewerProcess

pytestmark = pytest.mark.timeout(300)

P2P = {"enabled": True, "host": "127.0.0.1", "tcp_port": 0, "ws_port": 0, "provide_tick_s": 0.5}
MDNS = {"enabled": True, "interfaces": ["127.0.0.1"], "recheck_s": 2.0}
# Distinct frame sizes: no blob is shared between clips, so each plays from its own source.
CLIPS = {
    "lib": (320, 240),
    "lan": (256, 192),
    "r2": (352, 288),
    "pre": (288, 224),
    "whep": (240, 176),
}


@dataclass
class Net:
    holder: PeerdProcess
    dht: PeerdProcess
    lan: PeerdProcess
    media: dict[str, Cid]
    blobs: dict[str, list[Cid]]
    moto: MotoServer
    bucket: str


async def _stock(
    state: Path, clips: dict[str, HlsClip]
) -> tuple[dict[str, Cid], dict[str, list[Cid]]]:
    """Catalog the clips on the stopped holder; their media ids and blob ids."""
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        media: dict[str, Cid] = {}
        blobs: dict[str, list[Cid]] = {}
        for name, clip in clips.items():
            media[name] = await add_media(rt, clip)
            blobs[name] = await media_blobs(rt.catalog, media[name])
        await rt.catalog.set_state("clean_shutdown", "1")
        return media, blobs
    finally:
        await rt.close()


async def _to_bucket(state: Path, media_id: Cid, moto: MotoServer, bucket: str) -> None:
    """Put a media item of the stopped holder in the bucket, as its promotion would."""
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        for cid in await media_blobs(rt.catalog, media_id):
            data = await rt.store.read(cid)
            await asyncio.to_thread(moto.put, bucket, blob_key(cid), data)
        manifest = await media_manifest(rt.catalog, media_id)
        assert manifest is not None
        await asyncio.to_thread(moto.put, bucket, manifest_key(media_id), manifest)
    finally:
        await rt.close()


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    with MotoServer() as server:
        yield server


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory, moto: MotoServer) -> Iterator[Net]:
    base = tmp_path_factory.mktemp("anymedia")
    clips = {
        name: make_hls(base / f"clip-{name}", seconds=4, width=w, height=h, bframes=0)
        for name, (w, h) in CLIPS.items()
    }
    bucket = "peerd-any"
    moto.create_bucket(bucket)
    holder = PeerdProcess(base / "holder", config={"p2p": P2P, "mdns": MDNS})
    holder.init()
    media, blobs = asyncio.run(_stock(holder.state_dir, clips))
    asyncio.run(_to_bucket(holder.state_dir, media["r2"], moto, bucket))
    with loopback_multicast():
        holder.start()
        boot = [a for a in p2p_addrs(holder.state_dir) if "/ws" not in a]
        dht = PeerdProcess(
            base / "dht", config={"p2p": {**P2P, "bootstrap": boot}, "mdns": {"enabled": False}}
        )
        lan = PeerdProcess(base / "lan", config={"mdns": MDNS, "r2": r2_config(moto, bucket)})
        lan.init()
        write_r2_secrets(lan.state_dir)
        procs = (holder, dht, lan)
        try:
            dht.start(wait=False)
            lan.start(wait=False)
            dht.wait_ready()
            lan.wait_ready()
            yield Net(holder, dht, lan, media, blobs, moto, bucket)
        finally:
            for p in procs:
                if p.proc is not None:
                    p.stop(signal.SIGKILL)


def _play(node: PeerdProcess, media_id: str) -> None:
    """ffmpeg, an independent HLS client, plays every stream of the media through ``node``."""
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "ffmpeg (Debian package) is needed as the independent HLS client"
    url = hls_url(node.base_url, node.state_dir, media_id)
    res = subprocess.run(  # noqa: S603
        [ffmpeg, "-v", "error", "-xerror", "-i", url, "-map", "0", "-f", "null", "-"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 0, res.stderr[-2000:] + node.logs()[-4000:]


def _status(node: PeerdProcess, media_id: str) -> tuple[int, str | None]:
    """Status and Retry-After of a signed master playlist request."""
    try:
        with urllib.request.urlopen(hls_url(node.base_url, node.state_dir, media_id), timeout=60):  # noqa: S310
            return 200, None
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Retry-After")


def _lookups(node: PeerdProcess, source: str, outcome: str) -> float:
    return metric(node.base_url, "peerd_manifest_lookups_total", source=source, outcome=outcome)


def _catalogued(node: PeerdProcess, media_id: str) -> bool:
    db = sqlite3.connect(f"file:{node.state_dir / 'catalog.sqlite3'}?mode=ro", uri=True)
    try:
        return (
            db.execute("SELECT 1 FROM media WHERE media_id=?", (media_id,)).fetchone() is not None
        )
    finally:
        db.close()


def _wait(cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def _wait_provided(net: Net) -> None:
    """The holder announced its blobs and media ids (B's DHT lookups find it)."""
    want = sum(len(b) for b in net.blobs.values()) + len(net.media)
    _wait(
        lambda: metric(net.holder.base_url, "peerd_p2p_provided_total") >= want,
        "holder never announced its blobs and media ids:\n" + net.holder.logs()[-3000:],
    )


def test_plays_from_a_libp2p_only_holder(net: Net) -> None:
    _wait_provided(net)
    assert not _catalogued(net.dht, net.media["lib"])
    _play(net.dht, net.media["lib"])
    assert _lookups(net.dht, "libp2p", "ok") == 1
    assert metric(net.dht.base_url, "peerd_fetches_total", source="libp2p", outcome="ok") == len(
        net.blobs["lib"]
    )
    assert _catalogued(net.dht, net.media["lib"])


def test_plays_from_a_lan_holder(net: Net) -> None:
    _wait(
        lambda: '"via":"mdns"' in net.lan.logs() and '"peer seen"' in net.lan.logs(),
        "no LAN peer seen:\n" + net.lan.logs()[-3000:],
    )
    _play(net.lan, net.media["lan"])
    assert _lookups(net.lan, "lan", "ok") == 1
    assert metric(net.lan.base_url, "peerd_fetches_total", source="lan", outcome="ok") == len(
        net.blobs["lan"]
    )
    assert metric(net.lan.base_url, "peerd_fetches_total", source="r2", outcome="ok") == 0


def test_unknown_media_is_404_and_remembered(net: Net) -> None:
    nobody = cid_of(b"a media item no node has")
    for node in (net.dht, net.lan):
        assert _status(node, nobody) == (404, None)
        assert _status(node, nobody) == (404, None)
        # The second request was answered from the short negative cache: one lookup in all.
        assert _lookups(node, "all", "not_found") == 1
        assert not _catalogued(node, nobody)


def test_a_manifest_that_is_not_its_id_is_refused(net: Net) -> None:
    forged = cid_of(b"the id a forged manifest is stored under")
    genuine = net.moto.objects(net.bucket)[manifest_key(net.media["r2"])]
    net.moto.put(net.bucket, manifest_key(forged), genuine)
    assert _status(net.lan, forged)[0] == 404
    assert _lookups(net.lan, "r2", "integrity") == 1
    assert not _catalogued(net.lan, forged)


async def test_prefetch_of_media_held_by_a_libp2p_peer(net: Net) -> None:
    await asyncio.to_thread(_wait_provided, net)
    token = (net.dht.state_dir / "secrets" / "api_token").read_text().strip()
    client = NodeApiClient(net.dht.base_url, token)
    try:
        ans = await client.command("prefetch", {"media_id": net.media["pre"]})
        assert ans.status == 202, ans.body
        done = await client.wait_job(ans.body["job_id"], within_s=120)
        assert done["state"] == "done", done
        assert done["result"]["fetched"] == len(net.blobs["pre"])
        unknown = await client.command("prefetch", {"media_id": cid_of(b"prefetch of nothing")})
        assert unknown.status == 404, unknown.body
    finally:
        await client.close()
    held = {p.name for p in (net.dht.state_dir / "blobs").rglob("b*") if p.is_file()}
    assert set(net.blobs["pre"]) <= held


async def test_whep_offer_for_media_held_by_a_libp2p_peer(net: Net) -> None:
    await asyncio.to_thread(_wait_provided, net)
    media_id = net.media["whep"]
    before = await asyncio.to_thread(_lookups, net.dht, "libp2p", "ok")
    secret = (net.dht.state_dir / "secrets" / "hls_signing_key").read_text()
    token = tokens.mint(tokens.key_from_secret(secret), media_id, "whep", int(time.time()) + 600)
    viewer = await ViewerProcess.start(f"{net.dht.base_url}/whep/{media_id}?token={token}")
    try:
        assert viewer.status == 201, net.dht.logs()[-3000:]
        deadline = time.monotonic() + 30
        while (await viewer.stats())["video"] < 1:
            assert time.monotonic() < deadline, "no video frame decoded"
            await asyncio.sleep(0.1)
    finally:
        await viewer.close()
    assert await asyncio.to_thread(_lookups, net.dht, "libp2p", "ok") == before + 1


def test_failing_sources_answer_503_with_retry_after(tmp_path: Path, net: Net) -> None:
    # R2 that refuses every connection: the lookup fails (not "not found"), so 503.
    r2 = {"endpoint": f"http://127.0.0.1:{free_port()}", "bucket": "gone"}
    node = PeerdProcess(tmp_path / "down", config={"r2": r2, "http": {"request_timeout_s": 4.0}})
    node.init()
    write_r2_secrets(node.state_dir)
    node.start()
    try:
        status, retry_after = _status(node, net.media["r2"])
        assert status == 503, node.logs()[-3000:]
        assert retry_after is not None
        assert _lookups(node, "all", "unavailable") >= 1
        assert not _catalogued(node, net.media["r2"])
    finally:
        assert node.stop() == 0, node.logs()[-3000:]


def test_plays_from_r2_when_the_holder_is_gone(net: Net) -> None:
    assert net.holder.stop() == 0
    assert not _catalogued(net.lan, net.media["r2"])
    _play(net.lan, net.media["r2"])
    assert _lookups(net.lan, "r2", "ok") == 1
    assert metric(net.lan.base_url, "peerd_fetches_total", source="r2", outcome="ok") == len(
        net.blobs["r2"]
    )
