"""Headless Chromium plays WHEP from a real daemon over loopback.

The page is the node's own player (``/whep/player/<media id>``); Chromium negotiates, decodes
H.264 passed through untouched (and, for a stream with B-frames, VP8 transcoded by the node), and
the test reads ``getStats()`` until ``framesDecoded`` has grown every second for five seconds.
Stopping the page sends ``DELETE``; the node's metrics show the session gone.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from peerd.config import load_settings
from peerd.runtime import open_runtime
from tests.support.browser import Browser, Page
from tests.support.process import PeerdProcess
from tests.support.whep_media import add_media, make_hls, sign_viewers, whep_url

pytestmark = pytest.mark.slow

# Host candidates on loopback, and real addresses instead of mDNS names (aiortc resolves none).
WEBRTC_FLAGS = (
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns",
)


def metric(base_url: str, name: str) -> float:
    with urllib.request.urlopen(base_url + "/metrics", timeout=5) as r:  # noqa: S310
        text = r.read().decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


async def play_and_watch(page: Page, seconds: int = 5) -> tuple[list[int], dict[str, Any]]:
    await page.evaluate("window.whep.ready")
    assert await page.evaluate("window.whep.error") is None
    stats: dict[str, Any] = {}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        stats = await page.evaluate("window.whep.stats()")
        if stats["framesDecoded"] > 0:
            break
        await asyncio.sleep(0.2)
    samples = [stats["framesDecoded"]]
    for _ in range(seconds):
        await asyncio.sleep(1)
        stats = await page.evaluate("window.whep.stats()")
        samples.append(stats["framesDecoded"])
    return samples, stats


def sps_profile(init: Path) -> str:
    """PPCCLL of a clip's SPS, read from the avcC box of its init segment."""
    data = init.read_bytes()
    at = data.index(b"avcC")
    return data[at + 5 : at + 8].hex()


def h264_labels(sdp: str) -> list[str]:
    """The profile-level-ids of an SDP's H.264 entries with packetization-mode 1."""
    return re.findall(r"a=fmtp:\d+ (?=.*packetization-mode=1).*profile-level-id=(\w{6})", sdp)


async def test_chromium_decodes_whep_and_delete_frees(tmp_path: Path) -> None:
    # Main: a profile every Chromium offers for WebRTC, so the stream passes through.
    plain = await asyncio.to_thread(
        make_hls, tmp_path / "plain", seconds=6, bframes=0, profile="main"
    )
    bframes = await asyncio.to_thread(make_hls, tmp_path / "bf", seconds=4, bframes=3)
    high = await asyncio.to_thread(
        make_hls, tmp_path / "high", seconds=4, bframes=0, profile="high", width=256, height=144
    )
    state = tmp_path / "node"
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        passthrough_id = await add_media(rt, plain)
        transcode_id = await add_media(rt, bframes, title="with b-frames")
        high_id = await add_media(rt, high, title="high profile")
    finally:
        await rt.close()
    sign_viewers(state)
    node = PeerdProcess(state, config={"webrtc": {"loop_playback": True}})
    await asyncio.to_thread(node.start)
    try:
        async with Browser.launch(tmp_path / "chromium", *WEBRTC_FLAGS) as browser:
            page = await browser.new_page()
            await page.goto(whep_url(node.base_url, passthrough_id, "/whep/player/"))
            samples, stats = await play_and_watch(page)
            await page.screenshot(tmp_path / "player.png")
            assert samples[0] > 0, stats
            assert all(b > a for a, b in zip(samples, samples[1:], strict=False)), samples
            # ~25 fps for 5 s, paced (a burst would jump, a stall would not grow).
            assert 80 <= samples[-1] - samples[0] <= 170, samples
            assert stats["codec"].startswith("video/H264"), stats
            # The answer names the profile sent, as the stream's SPS states it.
            assert plain.init is not None
            answer = await page.evaluate("window.whep.pc.remoteDescription.sdp")
            assert h264_labels(answer) == [sps_profile(plain.init)], answer
            assert stats["audioPackets"] > 100, stats
            assert await asyncio.to_thread(metric, node.base_url, "peerd_whep_sessions") == 1
            assert await page.evaluate("window.whep.stop()") == 200
            assert await asyncio.to_thread(metric, node.base_url, "peerd_whep_sessions") == 0
            closed = 'peerd_whep_sessions_closed_total{reason="delete"}'
            assert await asyncio.to_thread(metric, node.base_url, closed) == 1
            assert page.console_errors == []

            # A stream with B-frames is not passed through: the node transcodes it (VP8 here).
            page2 = await browser.new_page()
            await page2.goto(whep_url(node.base_url, transcode_id, "/whep/player/"))
            samples, stats = await play_and_watch(page2, seconds=3)
            assert all(b > a for a, b in zip(samples, samples[1:], strict=False)), samples
            assert stats["codec"].startswith("video/VP8"), stats
            assert await page2.evaluate("window.whep.stop()") == 200
            assert page2.console_errors == []

            # High: passed through under its own label to a Chromium that offers High (one with
            # a hardware decoder); transcoded for one that does not, never labelled Main.
            page3 = await browser.new_page()
            await page3.goto(whep_url(node.base_url, high_id, "/whep/player/"))
            samples, stats = await play_and_watch(page3, seconds=3)
            offer = await page3.evaluate("window.whep.pc.localDescription.sdp")
            answer = await page3.evaluate("window.whep.pc.remoteDescription.sdp")
            assert high.init is not None
            sps = sps_profile(high.init)
            assert sps.startswith("64"), sps
            if any(p.startswith("6400") for p in h264_labels(offer)):
                assert h264_labels(answer) == [sps], answer
            else:
                assert stats["codec"].startswith("video/VP8"), (stats, answer)
            assert samples[0] > 0, stats
            assert all(b > a for a, b in zip(samples, samples[1:], strict=False)), samples
            assert await page3.evaluate("window.whep.error") is None
            assert page3.console_errors == []
    finally:
        code = await asyncio.to_thread(node.stop)
    assert code == 0, node.logs()[-3000:]
    opened = node.logs().count('"whep session opened"')
    assert opened == 3


async def test_dashboard_plays_a_ts_item_over_webrtc(tmp_path: Path) -> None:
    """MSE cannot take MPEG-TS, so the dashboard plays such an item through the WHEP player,
    with a token it mints for the logged-in operator (the node signs: tokens are required)."""
    clip = await asyncio.to_thread(make_hls, tmp_path / "ts", seconds=4, bframes=0, container="ts")
    state = tmp_path / "node"
    node = PeerdProcess(state, config={"webrtc": {"loop_playback": True}})
    await asyncio.to_thread(node.init)  # node key and secrets: admin_token, hls_signing_key
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        media_id = await add_media(rt, clip, title="TS clip")
    finally:
        await rt.close()
    admin = (state / "secrets" / "admin_token").read_text().strip()
    await asyncio.to_thread(node.start)
    try:
        async with Browser.launch(tmp_path / "chromium", *WEBRTC_FLAGS) as browser:
            page = await browser.new_page()
            await page.goto(f"{node.base_url}/ui")
            loaded = page.expect("Page.loadEventFired")
            await page.evaluate(
                f"document.getElementById('token').value = {json.dumps(admin)};"
                "document.getElementById('login').submit(); true"
            )
            await asyncio.wait_for(loaded, 20)
            await page.wait_for("Number(document.body.dataset.renders || 0) >= 1")
            sel = f'[data-media="{media_id}"]'
            # TS only: no MSE button, a WebRTC one.
            assert await page.evaluate(f"document.querySelectorAll('button.play{sel}').length") == 1
            await page.evaluate(f"document.querySelector('button.whep{sel}').click(); true")
            frame = "document.getElementById('whep-frame').contentWindow"
            await page.wait_for(f"!!({frame}.whep && {frame}.whep.pc)", timeout_s=20)
            assert "token=" in await page.evaluate("document.getElementById('whep-frame').src")
            stats = f"{frame}.whep.stats().then((s) => s.framesDecoded)"
            await page.wait_for(f"{stats}.then((n) => n > 0)", timeout_s=30)
            samples = []
            for _ in range(4):
                samples.append(await page.evaluate(stats))
                await asyncio.sleep(1)
            assert all(b > a for a, b in zip(samples, samples[1:], strict=False)), samples
            assert await page.evaluate(f"{frame}.whep.error") is None
            shot = await page.screenshot(tmp_path / "dashboard-whep.png")
            print(f"dashboard WebRTC screenshot: {shot}")
            assert page.console_errors == [], page.console_errors
    finally:
        code = await asyncio.to_thread(node.stop)
    assert code == 0, node.logs()[-3000:]
