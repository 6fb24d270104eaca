"""Live status where others read it: the coordinator's heartbeat (sent at once on a connect or a
drop, its ``live`` field fitting the OpenAPI document; absent on a node without inputs), and the
dashboard's Live panel (the JSON behind it, and the page in Chromium previewing a connected
input's playlist with hls.js).

The LL-HLS routes (``/live/<input>/``) belong to the packager; the browser test serves a
stand-in playlist at that URL, checking the token the panel put in it.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from peerd.api.commands import Subsystems
from peerd.api.node import NodeApi
from peerd.config import LiveInputSettings, LiveSettings, Settings, load_settings
from peerd.coordinator.client import CoordinatorService
from peerd.core import tokens
from peerd.core.live import LiveFrame, LiveTrack
from peerd.http import swarm
from peerd.http.server import build_app
from peerd.live.service import LiveService
from peerd.runtime import Runtime, open_runtime
from peerd.ui import install
from tests.support.browser import Browser
from tests.support.coordinator import FakeCoordinator
from tests.support.media import ffmpeg_path

KEY = "cam-stream-key-" + "c" * 24
ADMIN = "test-admin-token-" + "x" * 24
SIGNING = "s" * 40
AVCC = bytes.fromhex("01640028ffe1")
TRACKS = (
    LiveTrack(0, "video", "h264", 90000, AVCC, width=640, height=360),
    LiveTrack(1, "audio", "aac", 48000, bytes([0x11, 0x90]), sample_rate=48000, channels=2),
)


def _live(inputs: list[str], registry: Any = None) -> LiveService:
    settings = LiveSettings(inputs=[LiveInputSettings(name=n) for n in inputs])
    svc = LiveService(
        settings, secret={"live-cam.key": KEY}.get, registry=registry, wall=lambda: 1_700_000_000.0
    )
    svc.load_keys()
    return svc


# -- the heartbeat --------------------------------------------------------------------------------


async def test_a_connect_and_a_drop_are_reported_at_once(runtime: Runtime) -> None:
    fake = FakeCoordinator()
    fake.heartbeat_interval_s = 3600  # no heartbeat comes on its own during the test
    runtime.settings.coordinator.url = await fake.start()
    svc = _live(["cam", "stage"], runtime.metrics.registry)
    coordinator = CoordinatorService(runtime, NodeApi(runtime, Subsystems(live=svc)))
    svc.add_listener(coordinator.report_soon)
    ready = asyncio.Event()
    task = asyncio.create_task(coordinator.run(ready.set))
    try:
        await fake.wait_for(lambda: len(fake.of_kind("register")) == 1, 10)
        reg = fake.of_kind("register")[0].payload
        assert [(i["input"], i["connected"]) for i in reg["live"]] == [
            ("cam", False),
            ("stage", False),
        ]
        pub = svc.open(KEY, input=None, protocol="rtmp", remote="192.0.2.9:40000")
        pub.sink.begin(TRACKS)
        await fake.wait_for(lambda: len(fake.of_kind("heartbeat")) == 1, 10)
        cam = fake.of_kind("heartbeat")[0].payload["live"][0]
        assert cam["connected"] is True
        assert cam["protocol"] == "rtmp"
        assert cam["remote"] == "192.0.2.9"
        assert cam["since"] == 1_700_000_000.0
        pub.sink.frame(LiveFrame(0, 0, 0, True, b"\0" * 100))
        pub.sink.end("unpublished")
        await fake.wait_for(lambda: len(fake.of_kind("heartbeat")) == 2, 10)
        assert fake.of_kind("heartbeat")[1].payload["live"][0]["connected"] is False
        assert not fake.refused  # every body fit the NodeReport schema
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await fake.close()


async def test_a_node_without_inputs_sends_no_live_key(runtime: Runtime) -> None:
    fake = FakeCoordinator()
    runtime.settings.coordinator.url = await fake.start()
    svc = _live([], runtime.metrics.registry)
    coordinator = CoordinatorService(runtime, NodeApi(runtime, Subsystems(live=svc)))
    task = asyncio.create_task(coordinator.run(lambda: None))
    try:
        await fake.wait_for(lambda: len(fake.of_kind("register")) == 1, 10)
        assert "live" not in fake.of_kind("register")[0].payload
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await fake.close()


# -- the dashboard --------------------------------------------------------------------------------


def _settings(tmp_path: Path) -> Settings:
    secrets = tmp_path / "state" / "secrets"
    secrets.mkdir(parents=True)
    (secrets / "admin_token").write_text(ADMIN + "\n")
    (secrets / "hls_signing_key").write_text(SIGNING + "\n")
    return load_settings(None, node={"state_dir": tmp_path / "state"}, http={"port": 0})


def _stand_in_hls(out: Path) -> Path:
    """A 6 s fMP4 HLS playlist, standing in for the packager's live playlist."""
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run(  # noqa: S603
        [ffmpeg_path(), "-loglevel", "error", "-y", "-f", "lavfi"]
        + ["-i", "testsrc=size=160x120:rate=25:duration=6", "-c:v", "libx264"]
        + ["-profile:v", "baseline", "-pix_fmt", "yuv420p", "-g", "25", "-f", "hls"]
        + ["-hls_time", "1", "-hls_segment_type", "fmp4", "-hls_playlist_type", "event"]
        + [str(out / "index.m3u8")],
        check=True,
        timeout=60,
    )
    return out


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[Runtime, LiveService, str, list[str]]]:
    """The dashboard and /swarm/lib/ on loopback, a live service with ``cam`` connected, and a
    stand-in ``/live/cam/`` that records the tokens it was given."""
    rt = await open_runtime(_settings(tmp_path))
    hls_dir = await asyncio.to_thread(_stand_in_hls, tmp_path / "hls")
    svc = _live(["cam", "stage"], rt.metrics.registry)
    svc.add_viewer_counter(lambda name: 2 if name == "cam" else 0)
    pub = svc.open(KEY, input=None, protocol="whip", remote="[2001:db8::7]:5000")
    pub.sink.begin(TRACKS)
    pub.sink.frame(LiveFrame(0, 0, 0, True, b"\0" * 1000))
    seen: list[str] = []

    async def live_file(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name == "index.m3u8":  # the segments' URIs are the stand-in's, token-free
            token = request.query.get("token", "")
            seen.append(token)
            key = tokens.key_from_secret(SIGNING)
            if not tokens.verify(key, token, "live:cam", "hls", time.time()).ok:
                raise web.HTTPForbidden()
        return web.FileResponse(hls_dir / name)

    def stand_in(app: web.Application, rt: Runtime) -> None:
        app.router.add_get("/live/cam/{name}", live_file)

    app = build_app(rt, [partial(install, live=svc), swarm.install, stand_in])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield rt, svc, f"http://127.0.0.1:{runner.addresses[0][1]}", seen
    finally:
        pub.sink.end("unpublished")
        await runner.cleanup()
        await rt.close()


async def test_the_live_document_links_a_preview_for_connected_inputs(
    served: tuple[Runtime, LiveService, str, list[str]],
) -> None:
    _, _, base, _ = served
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{base}/ui/api/live") as r:
            assert r.status == 401
        async with s.get(f"{base}/ui/api/live", headers={"Authorization": f"Bearer {ADMIN}"}) as r:
            assert r.status == 200
            doc = await r.json()
    cam, stage = doc["inputs"]
    assert cam["connected"] is True
    assert cam["codecs"] == ["avc1.640028", "mp4a.40.2"]
    assert cam["remote"] == "2001:db8::7"
    assert cam["viewers"] == 2
    path, _, token = cam["preview"].partition("?token=")
    assert path == "/live/cam/index.m3u8"
    key = tokens.key_from_secret(SIGNING)
    assert tokens.verify(key, token, "live:cam", "hls", time.time()).ok
    assert not tokens.verify(key, token, "live:stage", "hls", time.time()).ok
    assert stage["connected"] is False
    assert stage["preview"] is None


@pytest.mark.slow
async def test_the_live_panel_previews_an_input_in_chromium(
    served: tuple[Runtime, LiveService, str, list[str]], tmp_path: Path
) -> None:
    _, _, base, seen = served
    async with Browser.launch(tmp_path / "chromium") as browser:
        page = await browser.new_page()
        await page.goto(f"{base}/ui")
        loaded = page.expect("Page.loadEventFired")
        await page.evaluate(
            f"document.getElementById('token').value = {json.dumps(ADMIN)};"
            "document.getElementById('login').submit(); true"
        )
        await asyncio.wait_for(loaded, 20)
        await page.wait_for("document.querySelectorAll('#live-inputs tbody tr').length == 2")
        rows = await page.evaluate(
            "[...document.querySelectorAll('#live-inputs tbody tr')].map((r) => r.innerText)"
        )
        assert "cam\tlive" in rows[0]
        assert "whip from 2001:db8::7" in rows[0]
        assert "avc1.640028, mp4a.40.2" in rows[0]
        assert "stage\toffline" in rows[1]
        assert await page.evaluate("document.querySelectorAll('#live-inputs button').length") == 1
        await page.evaluate("document.querySelector('button.preview').click(); true")
        await page.wait_for(
            "document.getElementById('live-player').currentTime > 1.0", timeout_s=30
        )
        assert await page.evaluate("document.getElementById('live-player').videoWidth") == 160
        assert seen  # the playlist was asked for, every time with the panel's token
        errors = [str(e) for e in page.console_errors]
        assert errors == [], errors
