"""hls.js (from npm) in headless Chromium plays signed HLS from a node for 5+ seconds, cross-origin.

The page comes from a second loopback server (another origin), so the node's CORS headers are
exercised the way a player on the coordinator's site uses them. hls.js is installed by
``make web-deps`` into ``.venv/web``; the test fails (not skips) when it is missing.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hls_node import run_node

from peerd.core.ids import Cid, cid_of
from peerd.media import remux
from peerd.media.options import PackagingOptions
from peerd.media.package import package
from tests.support.browser import Browser, player_origin
from tests.support.hlsmedia import make_hls
from tests.support.media import export_hls, make_media

ROOT = Path(__file__).resolve().parent.parent

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>hls test</title><link rel="icon" href="data:,">
<script src="/hls.min.js"></script></head>
<body><video id="v" muted playsinline></video>
<script>
window.hlsErrors = [];
window.mediaErrors = [];
const v = document.getElementById("v");
v.addEventListener("error", () => window.mediaErrors.push(String(v.error && v.error.code)));
const hls = new Hls({enableWorker: false});
hls.on(Hls.Events.ERROR, (_e, d) => window.hlsErrors.push(`${d.type}:${d.details}:${d.fatal}`));
hls.loadSource(SRC);
hls.attachMedia(v);
hls.on(Hls.Events.MANIFEST_PARSED, () => v.play());
</script></body></html>
"""


@pytest.fixture
async def page_server() -> AsyncIterator[tuple[str, dict[str, str]]]:
    """A second origin serving the player page and hls.js; returns its base URL and a slot for
    the source URL."""
    slot: dict[str, str] = {}
    async with player_origin(lambda: PAGE.replace("SRC", json.dumps(slot["src"]))) as base:
        yield base.replace("localhost", "127.0.0.1"), slot


@pytest.mark.timeout(120)
async def test_hlsjs_plays_five_seconds_without_errors(
    tmp_path: Path, page_server: tuple[str, dict[str, str]]
) -> None:
    pl = await asyncio.to_thread(make_hls, tmp_path / "media", "fmp4", seconds=8)
    base, slot = page_server
    async with run_node(tmp_path / "node", {"fmp4": pl}) as node:
        slot["src"] = node.url("fmp4")
        async with Browser.launch(tmp_path / "profile") as browser:
            page = await browser.new_page()
            # localhost vs 127.0.0.1: a different origin from the node, so CORS applies.
            await page.goto(base.replace("127.0.0.1", "localhost") + "/player.html")
            await page.wait_for(
                "document.getElementById('v').currentTime >= 5.5"
                " || window.hlsErrors.length > 0 || window.mediaErrors.length > 0",
                timeout_s=60,
            )
            assert await page.evaluate("window.hlsErrors") == []
            assert await page.evaluate("window.mediaErrors") == []
            assert await page.evaluate("document.getElementById('v').currentTime") >= 5.5
            assert page.console_errors == []


@pytest.mark.timeout(120)
@pytest.mark.parametrize("native", [True, False])
async def test_hlsjs_plays_remuxed_fmp4(
    tmp_path: Path,
    page_server: tuple[str, dict[str, str]],
    native: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The packager's remux, native (peerd.media.isobmff) or PyAV, plays in hls.js/Chromium."""

    if not native:
        monkeypatch.setattr(remux, "open_native", lambda src, opts: None)

    src = await asyncio.to_thread(make_media, tmp_path / "src.mp4", seconds=8, size=(320, 240))
    blobs: dict[str, bytes] = {}

    def sink(data: bytes, kind: str, cid: Cid) -> Cid:
        assert cid == cid_of(data)
        blobs[cid] = data
        return cid

    m, _ = await asyncio.to_thread(package, src, PackagingOptions(segment_seconds=2.0), sink)
    await asyncio.to_thread(export_hls, m, blobs.__getitem__, tmp_path / "hls")
    base, slot = page_server
    async with run_node(tmp_path / "node", {"fmp4": tmp_path / "hls" / "v240.m3u8"}) as node:
        slot["src"] = node.url("fmp4")
        async with Browser.launch(tmp_path / "profile") as browser:
            page = await browser.new_page()
            await page.goto(base.replace("127.0.0.1", "localhost") + "/player.html")
            # hls.js may report a non-fatal bufferSeekOverHole at the start: the packager's
            # timeline begins at the first decode time, so video shows from its B-frame delay
            # on (both paths do this); anything fatal or a media error fails the test.
            fatal = "window.hlsErrors.filter(e => !e.endsWith(':false'))"
            await page.wait_for(
                "document.getElementById('v').currentTime >= 5.5"
                f" || {fatal}.length > 0 || window.mediaErrors.length > 0",
                timeout_s=60,
            )
            errors = await page.evaluate("window.hlsErrors")
            assert set(errors) <= {"mediaError:bufferSeekOverHole:false"}, errors
            assert await page.evaluate("window.mediaErrors") == []
            assert await page.evaluate("document.getElementById('v').currentTime") >= 5.5
            assert page.console_errors == []
