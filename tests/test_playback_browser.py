"""Playback analytics from outside: hls.js 1.7.4 with CMCD on (``cmcd: {}``, query mode) in
headless Chromium plays media from a real ``peerd run``, and the node's figures
(``GET /api/v1/analytics``) match what the page measured itself.

The page measures with hls.js events and its video element, not with CMCD: startup is the
time from its first manifest request (``MANIFEST_LOADING``) to the first fragment request
made while media was buffered (``FRAG_LOADING`` with at least 50 ms ahead of the playhead);
a stall is one or more ``waiting`` events after playback began, up to the next fragment
request. A codec headless Chromium cannot decode (HEVC) shows up as failures of that codec,
a burst of such failures raises one anomaly, and steady playback raises none.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from peerd.catalog.media import record_media
from peerd.config import load_settings
from peerd.core import tokens
from peerd.core.cmcd import Cmcd, parse
from peerd.core.ids import Cid, cid_of
from peerd.core.manifest import encode, media_id_of
from peerd.media.options import PackagingOptions
from peerd.media.package import package
from peerd.runtime import Runtime, open_runtime
from tests.support.browser import Browser, Page, player_origin
from tests.support.hlsmedia import import_hls, make_hls, read_hls
from tests.support.media import make_media
from tests.support.process import PeerdProcess
from tests.support.shaper import Shaper
from tests.support.whep_media import add_media, sign_viewers, whep_url
from tests.support.whep_media import make_hls as whep_make_hls

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>cmcd</title><link rel="icon" href="data:,">
<script src="/hls.min.js"></script></head>
<body><video id="v" muted playsinline></video>
<script>
const m = window.measured = {startup: null, stalls: 0, waiting: 0, errors: [], ended: false};
const v = document.getElementById("v");
let t0 = null, playing = false, pending = false;
const hls = new Hls({
  enableWorker: false, cmcd: CMCD_CONFIG, maxBufferLength: 4, maxMaxBufferLength: 4,
});
hls.on(Hls.Events.MANIFEST_LOADING, () => { if (t0 === null) t0 = performance.now(); });
hls.on(Hls.Events.FRAG_LOADING, (_e, d) => {
  if (d.frag.type !== "main") return;
  const info = hls.mainForwardBufferInfo;
  const bl = info ? Math.round(info.len * 10) * 100 : 0;  // CMCD's rounding of bl (ms)
  if (m.startup === null && bl > 0 && d.frag.sn !== "initSegment") {
    m.startup = (performance.now() - t0) / 1000;
  }
  if (pending) { m.stalls += 1; pending = false; }
});
v.addEventListener("playing", () => { playing = true; });
v.addEventListener("waiting", () => { if (playing) { m.waiting += 1; pending = true; } });
v.addEventListener("ended", () => { m.ended = true; });
hls.on(Hls.Events.ERROR, (_e, d) => m.errors.push(`${d.type}:${d.details}:${d.fatal}`));
hls.loadSource(SRC);
hls.attachMedia(v);
hls.on(Hls.Events.MANIFEST_PARSED, () => v.play());
</script></body></html>
"""

ANALYTICS = {
    "startup_timeout_s": 6.0,
    "flush_interval_s": 1.0,
    "anomaly_window_s": 5.0,
    "anomaly_min_sessions": 3,
}


T = TypeVar("T")


async def _poll(probe: Callable[[], T | None], timeout_s: float) -> T:
    """``probe()`` (in a thread) every 0.25 s until it answers, at most ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = await asyncio.to_thread(probe)
        if got is not None:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met in {timeout_s} s")
        await asyncio.sleep(0.25)


async def _import(rt: Runtime, playlist: Path) -> str:
    media, _ = await import_hls(rt, read_hls(playlist))
    return media


class Daemon:
    """A real ``peerd run`` holding one media item, and a way to mint its viewers' URLs."""

    def __init__(self, proc: PeerdProcess, media: str) -> None:
        self.proc = proc
        self.media = media
        secrets = proc.state_dir / "secrets"
        self.key = (secrets / "hls_signing_key").read_text().strip().encode()
        self.api_token = (secrets / "api_token").read_text().strip()

    def url(self, base: str | None = None) -> str:
        token = tokens.mint(self.key, self.media, "hls", int(time.time()) + 600)
        return f"{base or self.proc.base_url}/hls/{self.media}/master.m3u8?token={token}"

    def analytics(self, query: str = "group_by=codec") -> dict[str, Any]:
        req = urllib.request.Request(  # noqa: S310 -- loopback
            f"{self.proc.base_url}/api/v1/analytics?{query}",
            headers={"Authorization": f"Bearer {self.api_token}"},
        )
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
            out: dict[str, Any] = json.loads(r.read())
        return out

    def dashboard(self) -> dict[str, Any]:
        """The dashboard's playback panel data (loopback, with the admin token)."""
        admin = (self.proc.state_dir / "secrets" / "admin_token").read_text().strip()
        req = urllib.request.Request(  # noqa: S310 -- loopback
            f"{self.proc.base_url}/ui/api/playback", headers={"Authorization": f"Bearer {admin}"}
        )
        with urllib.request.urlopen(req, timeout=10) as r:  # noqa: S310
            out: dict[str, Any] = json.loads(r.read())
        return out

    def metric(self, name: str, labels: dict[str, str]) -> float:
        with urllib.request.urlopen(f"{self.proc.base_url}/metrics", timeout=10) as r:  # noqa: S310
            text = r.read().decode()
        want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        total = 0.0
        for line in text.splitlines():
            if not labels and line.startswith(name + " "):
                total += float(line.rsplit(" ", 1)[1])
            elif line.startswith(name + "{"):
                got = ",".join(sorted(line[len(name) + 1 : line.index("}")].split(",")))
                if all(part in got.split(",") for part in want.split(",")):
                    total += float(line.rsplit(" ", 1)[1])
        return total


async def _daemon(tmp: Path, seed: Callable[[Runtime], Awaitable[str]]) -> Daemon:
    proc = PeerdProcess(tmp / "node", config={"analytics": ANALYTICS, "log": {"level": "info"}})
    await asyncio.to_thread(proc.init)
    rt = await open_runtime(load_settings(None, node={"state_dir": proc.state_dir}))
    try:
        media = await seed(rt)
    finally:
        await rt.close()
    await asyncio.to_thread(proc.start)
    return Daemon(proc, media)


@pytest.fixture
def stopped() -> Iterator[list[Daemon]]:
    daemons: list[Daemon] = []
    yield daemons
    for d in daemons:
        code = d.proc.stop()
        assert "unhandled error" not in d.proc.logs()
        assert code == 0


def _page(slot: dict[str, str]) -> str:
    return PAGE.replace("SRC", json.dumps(slot["src"])).replace(
        "CMCD_CONFIG", slot.get("cmcd", "{}")
    )


async def _open(browser: Browser, origin: str, slot: dict[str, str], src: str) -> Page:
    slot["src"] = src
    page = await browser.new_page()
    await page.send("Emulation.setFocusEmulationEnabled", {"enabled": True})
    await page.goto(origin.replace("127.0.0.1", "localhost") + "/player.html")
    return page


async def _played(page: Page, timeout_s: float = 120) -> dict[str, Any]:
    await page.wait_for(
        "window.measured.ended || window.measured.errors.some(e => e.endsWith(':true'))",
        timeout_s=timeout_s,
    )
    measured: dict[str, Any] = await page.evaluate("JSON.parse(JSON.stringify(window.measured))")
    return measured


def _row(report: dict[str, Any], codec_prefix: str) -> dict[str, Any] | None:
    rows = [r for r in report["rows"] if (r.get("codec") or "").startswith(codec_prefix)]
    assert len(rows) <= 1, rows
    return rows[0] if rows else None


def _media_bitrate(playlist: Path) -> float:
    size = sum(p.stat().st_size for p in playlist.parent.iterdir() if p.suffix != ".m3u8")
    return size / 12.0


@pytest.mark.timeout(400)
async def test_the_nodes_figures_match_the_page_normal_and_throttled(
    tmp_path: Path, stopped: list[Daemon]
) -> None:
    playlist = await asyncio.to_thread(make_hls, tmp_path / "media", "fmp4", seconds=12)
    node = await _daemon(tmp_path, lambda rt: _import(rt, playlist))
    stopped.append(node)
    slot: dict[str, str] = {}
    async with (
        player_origin(lambda: _page(slot)) as origin,
        Browser.launch(tmp_path / "profile") as browser,
    ):
        # A normal run.
        page = await _open(browser, origin, slot, node.url())
        normal = await _played(page)
        assert normal["errors"] == []
        assert normal["startup"] is not None
        # Every CMCD value hls.js sent (read back from the page's own resource timings) is
        # one the reader takes.
        sent = await page.evaluate(
            "performance.getEntriesByType('resource').map(e => e.name)"
            ".filter(u => u.includes('CMCD='))"
        )
        assert len(sent) >= 5, sent
        for url in sent:
            (value,) = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query)["CMCD"]
            assert isinstance(parse(value), Cmcd), value
        await page.close()

        def one_session() -> dict[str, Any] | None:
            row = _row(node.analytics(), "avc1")
            return row if row is not None and row["sessions"] >= 1 else None

        row = await _poll(one_session, 30)
        assert (row["sessions"], row["started"], row["failures"]) == (1, 1, 0)
        assert abs(row["startup_mean_s"] - normal["startup"]) <= 0.2, (row, normal)
        assert row["stalls"] == normal["stalls"], (row, normal)

        # A throttled link (the node's uplink at half the media's bit rate) forces stalls.
        port = node.proc.port
        async with Shaper(port, _media_bitrate(playlist) * 0.5) as uplink:
            page = await _open(browser, origin, slot, node.url(f"http://127.0.0.1:{uplink.port}"))
            slow = await _played(page, timeout_s=200)
            await page.close()
        assert slow["errors"] == [] or all(e.endswith(":false") for e in slow["errors"])
        assert slow["stalls"] >= 1, slow

        def two_sessions() -> dict[str, Any] | None:
            row = _row(node.analytics(), "avc1")
            return row if row is not None and row["sessions"] >= 2 else None

        both = await _poll(two_sessions, 30)
        assert (both["sessions"], both["started"], both["failures"]) == (2, 2, 0)
        assert both["stalls"] == normal["stalls"] + slow["stalls"], (both, normal, slow)
        print("page normal", normal, "page throttled", slow, "node", both)  # figures for -s
        slow_on_node = both["startup_mean_s"] * 2 - row["startup_mean_s"]
        assert abs(slow_on_node - slow["startup"]) <= 0.2, (both, row, slow)
        # Steady playback raises no anomaly.
        assert node.analytics()["anomalies"] == []
        panel = await asyncio.to_thread(node.dashboard)
        (codec,) = panel["codecs"]
        assert (codec["sessions"], codec["success_ratio"]) == (2, 1.0)
        assert sum(h["stalls"] for h in panel["hours"]) == both["stalls"]
        assert panel["anomalies"] == []
    assert node.metric("peerd_playback_sessions_total", {"outcome": "started"}) == 2
    assert node.metric("peerd_cmcd_invalid_total", {}) == 0
    assert node.metric("peerd_playback_stalls_total", {"codec": "avc1"}) == both["stalls"]


@pytest.mark.timeout(400)
async def test_hevc_sessions_fail_and_a_burst_raises_one_anomaly(
    tmp_path: Path, stopped: list[Daemon]
) -> None:
    src = await asyncio.to_thread(
        make_media, tmp_path / "src.mp4", seconds=6, size=(320, 240), vcodec="hevc"
    )
    blobs: dict[str, bytes] = {}

    def sink(data: bytes, kind: str, cid: Cid) -> Cid:
        assert cid == cid_of(data)
        blobs[cid] = data
        return cid

    m, _ = await asyncio.to_thread(package, src, PackagingOptions(segment_seconds=2.0), sink)
    assert any(r.codecs.startswith(("hvc1", "hev1")) for r in m.renditions), m.renditions

    async def seed(rt: Runtime) -> str:
        inits = {r.init for r in m.renditions}
        for cid, data in blobs.items():
            await rt.store.put(data, kind="init" if cid in inits else "segment")
        media_id = str(media_id_of(m))
        async with rt.catalog.transaction() as tx:
            await record_media(tx, media_id, encode(m), m, time.time(), title="hevc")
        return media_id

    node = await _daemon(tmp_path, seed)
    stopped.append(node)
    slot: dict[str, str] = {}
    async with (
        player_origin(lambda: _page(slot)) as origin,
        Browser.launch(tmp_path / "profile") as browser,
    ):
        pages = [await _open(browser, origin, slot, node.url()) for _ in range(4)]
        for p in pages:
            await p.wait_for("window.measured.errors.some(e => e.endsWith(':true'))", 60)
            errors = await p.evaluate("window.measured.errors")
            assert any("IncompatibleCodecs" in e for e in errors), errors

        def failed() -> dict[str, Any] | None:
            report = node.analytics()
            row = _row(report, "hvc1") or _row(report, "hev1")
            return report if row is not None and row["failures"] >= 4 else None

        report = await _poll(failed, 60)
        row = _row(report, "hvc1") or _row(report, "hev1")
        assert row is not None
        assert (row["sessions"], row["started"], row["failures"]) == (4, 0, 4)
        assert row["success_ratio"] == 0

        def anomalies() -> list[dict[str, Any]] | None:
            found: list[dict[str, Any]] = node.analytics()["anomalies"]
            return found or None

        (anomaly,) = await _poll(anomalies, 30)
        assert anomaly["kind"] == "failure"
        assert anomaly["codec"] in ("hvc1", "hev1")
        assert anomaly["observed"] == 1.0
        assert anomaly["sessions"] == 4

        # The operator's dashboard shows the codec's failures and the anomaly.
        page = await browser.new_page()
        await page.goto(f"{node.proc.base_url}/ui")
        loaded = page.expect("Page.loadEventFired")
        admin = (node.proc.state_dir / "secrets" / "admin_token").read_text().strip()
        await page.evaluate(
            f"document.getElementById('token').value = {json.dumps(admin)};"
            "document.getElementById('login').submit(); true"
        )
        await asyncio.wait_for(loaded, 20)
        await page.wait_for("document.getElementById('playback').dataset.loaded === '1'", 30)
        panel = await page.evaluate("document.getElementById('playback').innerText")
        assert "0.0 %" in panel, panel  # success of the HEVC sessions
        assert "failure rate 1.00 over 4 sessions of codec" in panel, panel
        bars = await page.evaluate("document.querySelectorAll('#playback-stalls rect').length")
        assert bars >= 1
        assert page.console_errors == []
    # Raised once: logged once, counted once, however many windows follow.
    await asyncio.sleep(ANALYTICS["anomaly_window_s"] * 2)
    assert len(node.analytics()["anomalies"]) == 1
    assert node.proc.logs().count('"playback anomaly"') == 1
    assert node.metric("peerd_playback_anomalies_total", {"kind": "failure"}) == 1


@pytest.mark.timeout(300)
async def test_a_whep_session_in_chromium_counts_as_started(tmp_path: Path) -> None:
    """WHEP reports through the node's peer connection (the viewer's receiver reports): the
    session shows up started, under path ``whep`` and its rendition's codec."""
    clip = await asyncio.to_thread(
        whep_make_hls, tmp_path / "plain", seconds=4, bframes=0, profile="main"
    )
    state = tmp_path / "node"
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        media = await add_media(rt, clip)
    finally:
        await rt.close()
    sign_viewers(state)
    proc = PeerdProcess(state, config={"webrtc": {"loop_playback": True}, "analytics": ANALYTICS})
    await asyncio.to_thread(proc.init)  # keeps the signing key, adds the API token
    node = Daemon(proc, media)
    await asyncio.to_thread(proc.start)
    try:
        async with Browser.launch(
            tmp_path / "chromium",
            "--allow-loopback-in-peer-connection",
            "--disable-features=WebRtcHideLocalIpsWithMdns",
        ) as browser:
            page = await browser.new_page()
            await page.goto(whep_url(proc.base_url, media, "/whep/player/"))
            await page.evaluate("window.whep.ready")
            deadline = time.monotonic() + 30
            while (await page.evaluate("window.whep.stats()"))["framesDecoded"] == 0:
                assert time.monotonic() < deadline, "no frame decoded"
                await asyncio.sleep(0.2)

            def started() -> dict[str, Any] | None:
                rows = node.analytics("group_by=path,codec")["rows"]
                got = [r for r in rows if r["path"] == "whep" and r["started"] >= 1]
                return got[0] if got else None

            row = await _poll(started, 30)
            assert row["codec"].startswith("avc1"), row
            assert (row["sessions"], row["failures"]) == (1, 0), row
            assert row["startup_mean_s"] is not None
            assert await page.evaluate("window.whep.stop()") == 200
    finally:
        code = await asyncio.to_thread(proc.stop)
    assert code == 0, proc.logs()[-3000:]


@pytest.mark.timeout(300)
async def test_the_swarm_players_own_figures_reach_the_node(
    tmp_path: Path, stopped: list[Daemon]
) -> None:
    """The node's swarm player page reports its startup and stalls with its byte beacon: the
    node counts them under the path ``swarm``, as the page measured them."""
    playlist = await asyncio.to_thread(make_hls, tmp_path / "media", "fmp4", seconds=6)
    node = await _daemon(tmp_path, lambda rt: _import(rt, playlist))
    stopped.append(node)
    token = tokens.mint(node.key, node.media, "hls", int(time.time()) + 600)
    async with Browser.launch(tmp_path / "profile") as browser:
        page = await browser.new_page()
        await page.send("Emulation.setFocusEmulationEnabled", {"enabled": True})
        await page.goto(f"{node.proc.base_url}/swarm/player/{node.media}?token={token}")
        await page.wait_for("window.peerdPlayer !== undefined", timeout_s=60)
        await page.wait_for("window.peerdPlayer.stats.ended", timeout_s=120)
        await page.wait_for("window.peerdPlayer.report().then(() => true)", timeout_s=30)
        stats = await page.evaluate("JSON.parse(JSON.stringify(window.peerdPlayer.stats))")

    def reported() -> dict[str, Any] | None:
        rows = node.analytics("group_by=path,codec")["rows"]
        got = [r for r in rows if r["path"] == "swarm" and r["started"] >= 1]
        return got[0] if got else None

    row = await _poll(reported, 30)
    assert stats["startupMs"] is not None
    assert abs(row["startup_mean_s"] - stats["startupMs"] / 1000) < 0.001, (row, stats)
    assert row["stalls"] == len(stats["stalls"])
    assert (row["sessions"], row["failures"]) == (1, 0)
    assert row["codec"].startswith("avc1"), row


@pytest.mark.timeout(300)
async def test_cmcd_in_headers_crosses_origins(tmp_path: Path, stopped: list[Daemon]) -> None:
    """``cmcd: {useHeaders: true}``: the page's origin is not the node's, so every request
    with CMCD-* headers is preflighted; the node allows them and counts the session."""
    playlist = await asyncio.to_thread(make_hls, tmp_path / "media", "fmp4", seconds=6)
    node = await _daemon(tmp_path, lambda rt: _import(rt, playlist))
    stopped.append(node)
    slot: dict[str, str] = {"cmcd": "{useHeaders: true}"}
    async with (
        player_origin(lambda: _page(slot)) as origin,
        Browser.launch(tmp_path / "profile") as browser,
    ):
        page = await _open(browser, origin, slot, node.url())
        measured = await _played(page)
        assert measured["errors"] == []
        assert page.console_errors == []

    def started() -> dict[str, Any] | None:
        row = _row(node.analytics(), "avc1")
        return row if row is not None and row["started"] >= 1 else None

    row = await _poll(started, 30)
    assert (row["sessions"], row["failures"]) == (1, 0)
    assert abs(row["startup_mean_s"] - measured["startup"]) <= 0.2, (row, measured)
    assert node.metric("peerd_cmcd_invalid_total", {}) == 0
