"""The operator dashboard: sessions, access control, the summary document, the page in headless
Chromium (login, every card, the MSE player; no console errors; a screenshot), and its wiring in
the real daemon."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer, make_mocked_request

from peerd.config import Settings, load_settings
from peerd.core import tokens
from peerd.core.ids import cid_of
from peerd.errors import Forbidden
from peerd.http.access import make_auth
from peerd.http.server import build_app
from peerd.runtime import Runtime, open_runtime
from peerd.ui import Dashboard, install
from peerd.ui.auth import make_session, session_valid, token_matches
from peerd.ui.summary import BandwidthHistory, savings
from tests.support.browser import Browser
from tests.support.poll import until
from tests.support.process import PeerdProcess

TOKEN = "test-admin-token-" + "x" * 24


# -- sessions (pure) ---------------------------------------------------------------------------


def test_sessions() -> None:
    now = 1_000_000.0
    cookie = make_session(TOKEN, now, 3600)
    assert session_valid(TOKEN, cookie, now + 10)
    assert not session_valid(TOKEN, cookie, now + 3601)
    assert not session_valid("rotated-token", cookie, now + 10)
    expiry, _, mac = cookie.partition(".")
    assert not session_valid(TOKEN, f"{int(expiry) + 999}.{mac}", now)
    assert not session_valid(TOKEN, "", now)
    assert not session_valid(TOKEN, "garbage", now)
    assert TOKEN not in cookie
    assert token_matches(TOKEN, TOKEN + "\n")
    assert not token_matches(TOKEN, TOKEN[:-1])
    assert not token_matches("", "")


def test_bandwidth_history_and_savings() -> None:
    h = BandwidthHistory(max_points=3)
    h.sample(0, {"lan": 0, "r2": 0})
    h.sample(10, {"lan": 1000, "r2": 500})
    h.sample(20, {"lan": 1000, "r2": 1500})
    h.sample(30, {"lan": 4000, "r2": 1500})
    assert len(h.points) == 3
    assert [r["bytes_per_s"] for r in h.rates()] == [
        {"lan": 0.0, "r2": 100.0},
        {"lan": 300.0, "r2": 0.0},
    ]
    s = savings({"local": 6000, "lan": 3000, "libp2p": 1000, "r2": 1000})
    assert s["p2p_bytes"] == 4000
    assert s["share_of_fetched"] == pytest.approx(0.8)
    assert s["share_of_served"] == pytest.approx(4000 / 11000)
    assert savings({})["share_of_fetched"] is None


# -- a populated node ----------------------------------------------------------------------------


def _make_fmp4(out: Path) -> tuple[str, bytes, list[tuple[float, bytes]]]:
    """A 4 s, 160x120 H.264 rendition as fMP4 HLS: (codecs, init bytes, [(duration, segment)])."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "ffmpeg", "-loglevel", "error", "-y", "-f", "lavfi",
            "-i", "testsrc=size=160x120:rate=25:duration=4",
            "-c:v", "libx264", "-profile:v", "baseline", "-pix_fmt", "yuv420p", "-g", "25",
            "-f", "hls", "-hls_time", "1", "-hls_segment_type", "fmp4",
            "-hls_playlist_type", "vod", "-hls_fmp4_init_filename", "init.mp4",
            str(out / "index.m3u8"),
        ],
        check=True,
        timeout=60,
    )  # fmt: skip
    init = (out / "init.mp4").read_bytes()
    i = init.index(b"avcC") + 4
    codecs = f"avc1.{init[i + 1]:02X}{init[i + 2]:02X}{init[i + 3]:02X}"
    playlist = (out / "index.m3u8").read_text()
    segs = [
        (float(d), (out / name).read_bytes())
        for d, name in re.findall(r"#EXTINF:([0-9.]+),\n(\S+)", playlist)
    ]
    assert len(segs) >= 3
    return codecs, init, segs


async def populate(rt: Runtime, media_dir: Path) -> str:
    """One playable fMP4 item, one TS-only item, peers, a failed replication job, usage rows."""
    codecs, init, segs = await asyncio.to_thread(_make_fmp4, media_dir)
    init_cid = await rt.store.put(init, kind="init")
    seg_cids = [await rt.store.put(data, kind="segment") for _, data in segs]
    manifest = json.dumps({"test": "dashboard", "init": init_cid}).encode()
    media_id = cid_of(manifest)
    ts_manifest = b'{"test": "ts-only"}'
    ts_id = cid_of(ts_manifest)
    now = time.time()
    async with rt.catalog.transaction() as conn:
        await conn.execute(
            "INSERT INTO media (media_id, title, manifest, duration_s, created_at) "
            "VALUES (?,?,?,?,?)",
            (media_id, "Test pattern <b>bold</b>", manifest, sum(d for d, _ in segs), now),
        )
        await conn.execute(
            "INSERT INTO renditions (media_id, rendition_id, position, kind, container, codecs, "
            "bandwidth, width, height, init_cid) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (media_id, "v120", 0, "video", "fmp4", codecs, 200_000, 160, 120, init_cid),
        )
        for seq, ((dur, _), cid) in enumerate(zip(segs, seg_cids, strict=True)):
            await conn.execute(
                "INSERT INTO segments (media_id, rendition_id, seq, duration_s, cid) "
                "VALUES (?,?,?,?,?)",
                (media_id, "v120", seq, dur, cid),
            )
        await conn.execute(
            "INSERT INTO media (media_id, title, manifest, duration_s, created_at) "
            "VALUES (?,?,?,?,?)",
            (ts_id, "Old TS item", ts_manifest, 60.0, now - 100),
        )
        await conn.execute(
            "INSERT INTO renditions (media_id, rendition_id, position, kind, container, codecs, "
            "bandwidth) VALUES (?,?,?,?,?,?,?)",
            (ts_id, "v1", 0, "video", "ts", "avc1.42C01E", 800_000),
        )
        await conn.execute(
            "INSERT INTO peers (peer_id, via, http_url, first_seen, last_seen, rtt_ms) "
            "VALUES (?,?,?,?,?,?)",
            (
                "12D3KooWLanPeerAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                "mdns",
                "http://192.168.1.20:8737",
                now - 600,
                now - 5,
                1.7,
            ),
        )
        await conn.execute(
            "INSERT INTO peers (peer_id, via, first_seen, last_seen, failures) VALUES (?,?,?,?,?)",
            (
                "12D3KooWNetPeerBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB",
                "libp2p",
                now - 900,
                now - 60,
                2,
            ),
        )
        await conn.execute(
            "INSERT INTO replication_jobs (kind, target, state, attempts, last_error, created_at, "
            "updated_at) VALUES (?,?,?,?,?,?,?)",
            ("push_blob", seg_cids[0], "queued", 3, "R2 unreachable: timeout", now - 300, now - 30),
        )
        await conn.execute(
            "INSERT INTO replication_jobs (kind, target, state, created_at, updated_at) "
            "VALUES (?,?,?,?,?)",
            ("push_manifest", media_id, "done", now - 400, now - 200),
        )
        for source, value in (("lan", 5 << 20), ("r2", 1 << 20), ("local", 9 << 20)):
            await conn.execute(
                "INSERT INTO usage (day, metric, label, value) VALUES (?,?,?,?)",
                ("2026-11-21", "bytes_served", f"source={source}", value),
            )
    return media_id


def _settings(tmp_path: Path, **ui: Any) -> Settings:
    secrets = tmp_path / "state" / "secrets"
    secrets.mkdir(parents=True)
    (secrets / "admin_token").write_text(TOKEN + "\n")
    return load_settings(
        None, node={"state_dir": tmp_path / "state", "name": "den"}, http={"port": 0}, ui=ui
    )


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Runtime, str, str]]:
    """A populated runtime and the dashboard served on loopback: (rt, base url, media id)."""
    rt = await open_runtime(_settings(tmp_path, sample_interval_s=1.0))
    media_id = await populate(rt, tmp_path / "media")
    rt.node.ready = True
    rt.metrics.bytes_served.labels(source="local").inc(40 << 20)
    rt.metrics.bytes_served.labels(source="lan").inc(12 << 20)
    rt.metrics.bytes_served.labels(source="libp2p").inc(3 << 20)
    rt.metrics.bytes_served.labels(source="r2").inc(5 << 20)
    app = build_app(rt, [install])  # as the daemon (analytics off: the panel hides)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield rt, f"http://127.0.0.1:{port}", media_id
    finally:
        await runner.cleanup()
        await rt.close()


# -- HTTP ----------------------------------------------------------------------------------------


async def test_summary_document(served: tuple[Runtime, str, str]) -> None:
    rt, base, media_id = served
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/ui/api/summary") as r:
            assert r.status == 401
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with s.get(f"{base}/ui/api/summary", headers=headers) as r:
            assert r.status == 200
            assert r.headers["Cache-Control"] == "no-store"
            assert "default-src 'none'" in r.headers["Content-Security-Policy"]
            doc = await r.json()
    assert doc["node"]["name"] == "den"
    assert doc["node"]["peer_id"] == rt.identity.peer_id
    assert doc["node"]["ready"] is True
    st = doc["storage"]
    assert st["blobs"] == rt.store.count >= 4
    assert st["by_kind"]["init"]["blobs"] == 1
    assert st["disk_free_bytes"] > 0
    rep = doc["replication"]
    assert rep["by_state"] == {"queued": 1, "done": 1}
    assert rep["open_by_kind"] == {"push_blob": 1}
    assert rep["recent_failures"][0]["last_error"] == "R2 unreachable: timeout"
    assert 250 < rep["oldest_open_age_s"] < 400
    assert [p["via"] for p in doc["peers"]["lan"]] == ["mdns"]
    assert doc["peers"]["libp2p"][0]["failures"] == 2
    t = doc["traffic"]
    assert t["bytes_by_source"] == {
        "local": 40 << 20,
        "lan": 12 << 20,
        "libp2p": 3 << 20,
        "r2": 5 << 20,
    }
    assert t["savings"]["share_of_fetched"] == pytest.approx(15 / 20)
    assert t["daily"] == [
        {"day": "2026-11-21", "bytes_by_source": {"lan": 5 << 20, "local": 9 << 20, "r2": 1 << 20}}
    ]
    media = {m["media_id"]: m for m in doc["media"]}
    item = media[media_id]
    assert item["title"] == "Test pattern <b>bold</b>"
    assert item["segments"] == item["local_segments"] >= 3
    assert item["renditions"][0]["container"] == "fmp4"
    assert len(media) == 2


async def test_blob_and_media_endpoints(served: tuple[Runtime, str, str]) -> None:
    rt, base, media_id = served
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.get(f"{base}/ui/api/media/{media_id}") as r:
            assert r.status == 200
            detail = await r.json()
        rend = detail["renditions"][0]
        async with s.get(f"{base}/ui/api/blob/{rend['init_cid']}") as r:
            assert r.status == 200
            assert cid_of(await r.read()) == rend["init_cid"]
        async with s.get(f"{base}/ui/api/blob/not-a-cid") as r:
            assert r.status == 400
        async with s.get(f"{base}/ui/api/blob/{cid_of(b'nothing')}") as r:
            assert r.status == 404
        async with s.get(f"{base}/ui/api/media/{cid_of(b'nothing')}") as r:
            assert r.status == 404


async def test_whep_player_link(served: tuple[Runtime, str, str]) -> None:
    """The WebRTC play link: admin only, known media only; without the signing key it says so
    (every viewer is refused)."""
    rt, base, media_id = served
    async with aiohttp.ClientSession() as anon, anon.get(f"{base}/ui/api/whep/{media_id}") as r:
        assert r.status == 401
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.get(f"{base}/ui/api/whep/{cid_of(b'nothing')}") as r:
            assert r.status == 404
        async with s.get(f"{base}/ui/api/whep/{media_id}") as r:
            assert r.status == 409
            assert "hls_signing_key" in (await r.json())["message"]
        rt.settings.webrtc.enabled = False
        async with s.get(f"{base}/ui/api/whep/{media_id}") as r:
            assert r.status == 409
            assert "enabled" in (await r.json())["message"]


async def test_whep_player_link_token_from_viewer_auth(tmp_path: Path) -> None:
    """The link's token is minted with the configured signing key, for scope whep only."""
    settings = _settings(tmp_path)
    settings.http.signing_key_secret = "viewer_key"
    key = "k" * 40
    (settings.secrets_path / "viewer_key").write_text(key)
    (settings.secrets_path / "hls_signing_key").write_text("x" * 40)
    rt = await open_runtime(settings)
    media_id = await populate(rt, tmp_path / "media")
    server = TestServer(build_app(rt, [install]), host="127.0.0.1")
    try:
        async with TestClient(server) as client:
            r = await client.get(
                f"/ui/api/whep/{media_id}", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            link = (await r.json())["player"]
    finally:
        await rt.close()
    path, _, token = link.partition("?token=")
    assert path == f"/whep/player/{media_id}"
    signing = tokens.key_from_secret(key)
    assert tokens.verify(signing, token, media_id, "whep", time.time()).ok
    assert not tokens.verify(signing, token, media_id, "hls", time.time()).ok


async def test_login_flow_and_wrong_token(served: tuple[Runtime, str, str]) -> None:
    _, base, _ = served
    # unsafe=True: aiohttp's jar ignores cookies set by bare IP addresses otherwise.
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.get(f"{base}/ui") as r:
            assert r.status == 200
            assert 'action="/ui/login"' in await r.text()
        async with s.post(f"{base}/ui/login", data={"token": "wrong"}, allow_redirects=False) as r:
            assert r.status == 303
            assert r.headers["Location"] == "/ui?failed=1"
            assert "peerd_ui" not in r.cookies
        async with s.post(f"{base}/ui/login", data={"token": TOKEN}, allow_redirects=False) as r:
            assert r.status == 303
            cookie = r.cookies["peerd_ui"]
            assert cookie["httponly"]
            assert cookie["samesite"] == "Strict"
            assert TOKEN not in cookie.value
        async with s.get(f"{base}/ui") as r:
            assert 'id="library"' in await r.text()
        async with s.get(f"{base}/ui/api/summary") as r:
            assert r.status == 200


@pytest.mark.parametrize("header", ["CF-Connecting-IP", "Cf-Ray", "X-Forwarded-For"])
async def test_tunnelled_requests_are_refused(
    served: tuple[Runtime, str, str], header: str
) -> None:
    _, base, _ = served
    async with aiohttp.ClientSession() as s:
        h = {header: "203.0.113.9", "Authorization": f"Bearer {TOKEN}"}
        async with s.get(f"{base}/ui/api/summary", headers=h) as r:
            assert r.status == 403
        async with s.get(f"{base}/ui", headers={header: "203.0.113.9"}) as r:
            assert r.status == 403


class _Transport:
    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default


@pytest.mark.parametrize(
    ("peer", "allow_remote", "ok"),
    [
        (("127.0.0.1", 5000), False, True),
        (("127.8.9.10", 5000), False, True),
        (("::1", 5000), False, True),
        (("192.168.1.5", 5000), False, False),
        (("2001:db8::1", 5000), False, False),
        (("192.168.1.5", 5000), True, True),
    ],
)
async def test_loopback_only(
    runtime: Runtime, peer: tuple[str, int], allow_remote: bool, ok: bool
) -> None:
    runtime.settings.ui.allow_remote = allow_remote
    d = Dashboard(runtime, make_auth(runtime))
    req = make_mocked_request("GET", "/ui", transport=_Transport(peer))  # type: ignore[arg-type]
    if ok:
        d._check_origin(req)
    else:
        with pytest.raises(Forbidden):
            d._check_origin(req)


async def test_no_admin_token_is_503(tmp_path: Path) -> None:
    settings = load_settings(None, node={"state_dir": tmp_path / "state"}, http={"port": 0})
    rt = await open_runtime(settings)
    runner = web.AppRunner(build_app(rt, [install]))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{runner.addresses[0][1]}/ui") as r:
                assert r.status == 503
                assert "admin_token" in (await r.json())["message"]
    finally:
        await runner.cleanup()
        await rt.close()


async def test_disabled(tmp_path: Path) -> None:
    rt = await open_runtime(_settings(tmp_path, enabled=False))
    app = build_app(rt, [install])
    try:
        assert not any(
            r.resource and r.resource.canonical.startswith("/ui") for r in app.router.routes()
        )
    finally:
        await rt.close()


# -- the page in Chromium --------------------------------------------------------------------------


@pytest.mark.slow
async def test_dashboard_in_chromium(served: tuple[Runtime, str, str], tmp_path: Path) -> None:
    rt, base, media_id = served
    # Three bandwidth samples (one a second), the last after 2 MiB more from a peer, so the chart
    # has a line.
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s:

        async def sampled(n: int) -> bool:
            async with s.get(f"{base}/ui/api/summary") as r:
                return len((await r.json())["traffic"]["rates"]) >= n

        await until(lambda: sampled(1), timeout_s=10, step_s=0.05)
        rt.metrics.bytes_served.labels(source="lan").inc(2 << 20)
        await until(lambda: sampled(2), timeout_s=10, step_s=0.05)
    # Viewers' players reported 3 MiB from each other and 1 MiB over HTTP (swarm beacons).
    rt.metrics.swarm_viewer_bytes.labels(source="peer").inc(3 << 20)
    rt.metrics.swarm_viewer_bytes.labels(source="http").inc(1 << 20)
    async with Browser.launch(tmp_path / "chromium") as browser:
        page = await browser.new_page()
        await page.goto(f"{base}/ui")
        assert await page.evaluate("document.title") == "peerd — log in"
        # Log in through the form, like an operator.
        loaded = page.expect("Page.loadEventFired")
        await page.evaluate(
            f"document.getElementById('token').value = {json.dumps(TOKEN)};"
            "document.getElementById('login').submit(); true"
        )
        await asyncio.wait_for(loaded, 20)
        await page.wait_for("Number(document.body.dataset.renders || 0) >= 1")
        text = await page.evaluate("document.body.innerText")
        assert "ready" in text
        assert rt.identity.peer_id in text
        assert "Test pattern <b>bold</b>" in text  # shown as text, not markup
        assert await page.evaluate("document.querySelectorAll('#media b').length") == 0
        assert "Old TS item" in text
        # The TS item has no MSE "Play" (Chromium's MSE takes no MPEG-TS), only "WebRTC".
        buttons = await page.evaluate(
            "[...document.querySelectorAll('#media tr')].filter((r) =>"
            " r.innerText.includes('Old TS item')).map((r) => r.innerText.split('\\t').pop())"
        )
        assert [b.strip() for b in buttons] == ["WebRTC"], buttons
        # P2P share of fetched bytes: (12 + 2 + 3) MiB from peers, 5 MiB from R2.
        share = await page.evaluate("document.getElementById('savings-share').textContent")
        assert share == "77.3 %"
        assert "Viewers got 3.0 MiB from each other (75.0 % of their segment bytes)" in text
        assert "R2 unreachable: timeout" in text
        assert "192.168.1.20" in text
        assert "2026-11-21" in text
        assert await page.evaluate("document.querySelectorAll('#chart path').length") >= 4
        # Play the fMP4 item through MSE.
        await page.evaluate(
            f"document.querySelector('button.play[data-media=\"{media_id}\"]').click(); true"
        )
        await page.wait_for("document.getElementById('player').currentTime > 1.0", timeout_s=30)
        state = await page.evaluate(
            "(() => { const v = document.getElementById('player');"
            " return {w: v.videoWidth, err: v.error}; })()"
        )
        assert state == {"w": 160, "err": None}
        shot = await page.screenshot(tmp_path / "dashboard.png")
        print(f"dashboard screenshot: {shot}")
        assert shot.stat().st_size > 10_000
        errors = [str(e) for e in page.console_errors]
        assert errors == [], errors


# -- wiring in the real daemon ---------------------------------------------------------------------


def test_daemon_serves_the_dashboard(tmp_path: Path) -> None:
    node = PeerdProcess(tmp_path / "node")
    node.start()
    try:
        token = (tmp_path / "node" / "secrets" / "admin_token").read_text().strip()
        req = urllib.request.Request(
            node.base_url + "/ui/api/summary", headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
            doc = json.loads(r.read())
        assert doc["node"]["ready"] is True
        assert doc["media"] == []
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(node.base_url + "/ui/api/summary", timeout=10)  # noqa: S310
        assert exc.value.code == 401
        exc.value.close()
    finally:
        assert node.stop() == 0
