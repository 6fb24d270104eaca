"""The node's swarm player (hls.js + P2P Media Loader, served by the node) in headless Chromium:
viewers of one media share segments over WebRTC through the node's tracker, every peer segment
checked against the content id in its URL.

The node sits behind :class:`tests.support.shaper.Shaper`, a shaped uplink. One Chromium, one
page per viewer. The only time bound is the issue's stall bound, measured from each player's own
``waiting``/``playing`` events; other deadlines are upper bounds for hangs.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hls_node import KEY, Node, run_node

from peerd.core import tokens
from peerd.core.ids import digest_of
from peerd.http import swarm
from tests.support.browser import Browser, Page
from tests.support.hlsmedia import make_hls
from tests.support.poll import until
from tests.support.shaper import Shaper

SECONDS = 20
UPLINK_BPS = 100_000  # bytes/s shared by every viewer: below four viewers' ~180 kB/s
FLAGS = (
    # WebRTC between pages of one headless browser on this host: real host candidates (no mDNS
    # names, which need a resolver), loopback allowed, and no throttling of background pages.
    "--disable-features=Translate,MediaRouter,OptimizationHints,WebRtcHideLocalIpsWithMdns",
    "--allow-loopback-in-peer-connection",
    "--disable-background-timer-throttling",
    "--disable-renderer-backgrounding",
    "--disable-backgrounding-occluded-windows",
)

# An independent check on what reaches hls.js: each fragment's SHA-256, with its URL.
CHECK_FRAGS = """
window.fragChecks = [];
window.peerdPlayerHook = (hls) => hls.on("hlsFragLoaded", (_e, d) => {
  const url = d.frag.url, bytes = d.payload.slice(0);
  crypto.subtle.digest("SHA-256", bytes).then((h) => window.fragChecks.push([url, Array.from(
    new Uint8Array(h)).map((b) => b.toString(16).padStart(2, "0")).join("")]));
});
"""
# A viewer whose tracker socket carries a forged token (its playlists and segments do not).
FORGED = """
const WS = window.WebSocket;
window.WebSocket = function (url, ...rest) {
  return new WS(String(url).replace(/token=[^&]*/, "token=forged"), ...rest);
};
window.WebSocket.prototype = WS.prototype;
"""
# A lying viewer: every large message its data channels send (segment data) has a byte flipped.
LIAR = """
const send = RTCDataChannel.prototype.send;
RTCDataChannel.prototype.send = function (data) {
  if (data && data.byteLength > 4096) {
    const copy = new Uint8Array(data.byteLength);
    copy.set(new Uint8Array(data.buffer || data, data.byteOffset || 0, data.byteLength));
    copy[copy.length >> 1] ^= 0xff;
    data = copy;
  }
  return send.call(this, data);
};
"""


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    pl = await asyncio.to_thread(make_hls, tmp_path / "media", "fmp4", seconds=SECONDS)
    async with run_node(tmp_path / "node", {"fmp4": pl}, extra=[swarm.install]) as n:
        yield n


VIEWERS = itertools.count()


def token(media: str) -> str:
    """A viewer's own token (so its URLs are its own: no page reads another's HTTP cache)."""
    return tokens.mint(KEY, media, "hls", int(time.time()) + 600 + next(VIEWERS))


def blob_bytes(node: Node) -> float:
    """Segment bytes the node sent (its own counter)."""
    total = 0.0
    for metric in node.rt.metrics.registry.collect():
        for s in metric.samples:
            if s.name == "peerd_http_blob_bytes_total":
                total += s.value
    return total


def viewer_bytes(node: Node, source: str) -> float:
    v = node.rt.metrics.registry.get_sample_value(
        "peerd_swarm_viewer_bytes_total", {"source": source}
    )
    return v or 0.0


async def open_viewer(
    browser: Browser, base: str, media: str, *, scripts: tuple[str, ...] = ()
) -> Page:
    page = await browser.new_page()
    # Every viewer's page counts as visible and focused (a hidden tab defers its playback).
    await page.send("Emulation.setFocusEmulationEnabled", {"enabled": True})
    for s in scripts:
        await page.send("Page.addScriptToEvaluateOnNewDocument", {"source": s})
    await page.goto(f"{base}/swarm/player/{media}?token={token(media)}")
    await page.wait_for("window.peerdPlayer !== undefined", timeout_s=60)
    return page


async def stats(page: Page) -> dict[str, Any]:
    out = await page.evaluate("JSON.parse(JSON.stringify(window.peerdPlayer.stats))")
    assert isinstance(out, dict)
    return out


async def played_out(page: Page) -> dict[str, Any]:
    try:
        await page.wait_for(
            "window.peerdPlayer.stats.ended"
            " || window.peerdPlayer.stats.errors.some(e => e.endsWith(':true'))",
            timeout_s=120,
        )
    except TimeoutError:
        v = await page.evaluate(
            "(v => [v.currentTime, v.readyState, v.paused, v.buffered.length &&"
            " v.buffered.end(0)])(document.querySelector('video'))"
        )
        logs = [str(e) for e in page.console][-20:]
        raise AssertionError(f"did not play out: video {v}, {await stats(page)} {logs}") from None
    return await stats(page)


@pytest.mark.timeout(600)
async def test_later_viewers_get_most_segment_bytes_from_peers(tmp_path: Path, node: Node) -> None:
    media = node.media["fmp4"]
    port = int(node.base.rsplit(":", 1)[1])
    async with (
        Shaper(port, UPLINK_BPS) as uplink,
        Browser.launch(tmp_path / "profile", *FLAGS) as browser,
    ):
        base = f"http://127.0.0.1:{uplink.port}"
        first = await open_viewer(browser, base, media)
        # the others come while the first still plays, after it has loaded the whole media
        await first.wait_for(
            "(v => v.currentTime > 0 && v.buffered.length > 0 && v.duration > 0 &&"
            " v.buffered.end(v.buffered.length - 1) >= v.duration - 0.1)"
            "(document.querySelector('video'))",
            timeout_s=120,
        )
        alone = blob_bytes(node)
        later = [await open_viewer(browser, base, media) for _ in range(3)]
        s1 = await played_out(first)
        results = [await played_out(p) for p in later]
        together = blob_bytes(node) - alone

        async def reported() -> bool:
            # a beacon sooner than half an interval after the last is refused (429): retry
            done = [
                await p.evaluate(
                    "window.peerdPlayer.report().then(() => (s => s.reportedPeer === s.peerBytes"
                    " && s.reportedHttp === s.httpBytes)(window.peerdPlayer.stats))"
                )
                for p in [first, *later]
            ]
            return all(done)

        await until(reported, timeout_s=120, step_s=1.0)
        peer = sum(r["peerBytes"] for r in results)
        http = sum(r["httpBytes"] for r in results)
        share = peer / (peer + http)
        print(
            f"later viewers: {share:.1%} of segment bytes from peers ({peer} of {peer + http}); "
            f"node sent {alone:.0f} "
            f"segment bytes for the first viewer, {together:.0f} for the next three "
            f"({together / (3 * alone):.2%} of three times the first); shaper passed "
            f"{uplink.sent} bytes; stalls "
            f"{[r['stalls'] for r in [s1, *results]]}"
        )
        for r in [s1, *results]:
            assert r["ended"], r
            assert r["errors"] == [], r
            assert all(stall <= 1.0 for stall in r["stalls"]), r
        assert share >= 0.5, results
        # measured at the node: what the later viewers did not get from peers, no more
        assert together <= 0.5 * 3 * alone, (together, alone)
        assert viewer_bytes(node, "peer") == peer + s1["peerBytes"]
        assert viewer_bytes(node, "http") == http + s1["httpBytes"]
        for p in [first, *later]:
            assert p.console_errors == []


async def seeded_first(browser: Browser, base: str, media: str, *scripts: str) -> Page:
    """A first viewer that has loaded the whole media and still plays."""
    first = await open_viewer(browser, base, media, scripts=scripts)
    await first.wait_for(
        "(v => v.currentTime > 0 && v.buffered.length > 0 && v.duration > 0 &&"
        " v.buffered.end(v.buffered.length - 1) >= v.duration - 0.1)"
        "(document.querySelector('video'))",
        timeout_s=120,
    )
    return first


@pytest.mark.timeout(600)
async def test_lying_viewer_is_caught_by_hash_and_dropped(tmp_path: Path, node: Node) -> None:
    media = node.media["fmp4"]
    async with Browser.launch(tmp_path / "profile", *FLAGS) as browser:
        await seeded_first(browser, node.base, media, LIAR)
        honest = await open_viewer(browser, node.base, media, scripts=(CHECK_FRAGS,))
        s = await played_out(honest)
        print(f"honest viewer: refused {s['refusedSegments']} segments from {s['refusedPeers']}")
        assert s["refusedSegments"] >= 1, s
        assert s["refusedPeers"], s
        assert set(s["refusedPeers"]) <= set(s["peersClosed"]), s  # dropped
        assert s["ended"], s
        assert s["errors"] == [], s
        assert all(stall <= 1.0 for stall in s["stalls"]), s
        checks = await honest.evaluate("window.fragChecks")
        assert checks
        for url, digest in checks:  # every byte hls.js got is the content its URL names
            cid = url.split("/b/")[1].split(".")[0]
            assert digest == digest_of(cid).hex(), url
        assert honest.console_errors == []


@pytest.mark.timeout(600)
async def test_viewer_without_valid_token_cannot_join(tmp_path: Path, node: Node) -> None:
    media = node.media["fmp4"]
    registry = node.rt.metrics.registry
    refused0 = registry.get_sample_value("peerd_swarm_rejects_total", {"reason": "token"}) or 0
    async with Browser.launch(tmp_path / "profile", *FLAGS) as browser:
        first = await seeded_first(browser, node.base, media)
        intruder = await open_viewer(browser, node.base, media, scripts=(FORGED,))
        s = await played_out(intruder)  # plays, over HTTP only
        refused = registry.get_sample_value("peerd_swarm_rejects_total", {"reason": "token"})
        assert (refused or 0) > refused0
        assert s["peersConnected"] == 0, s
        assert s["peerBytes"] == 0, s
        assert (await stats(first))["peersConnected"] == 0
        async with aiohttp.ClientSession() as http:
            url = f"{node.base}/swarm/player/{media}?token=forged"
            async with http.get(url) as r:
                assert r.status == 403


@pytest.mark.timeout(600)
async def test_relay_only_viewers_never_connect_directly(tmp_path: Path, node: Node) -> None:
    """``[swarm] relay_only``: candidates only through TURN, so without a TURN server viewers
    never reach each other (nobody learns another's address) and play over HTTP."""
    node.rt.settings.swarm.relay_only = True  # the running node's player reads it per page
    media = node.media["fmp4"]
    async with Browser.launch(tmp_path / "profile", *FLAGS) as browser:
        first = await seeded_first(browser, node.base, media)
        second = await open_viewer(browser, node.base, media)
        s = await played_out(second)
        assert s["ended"], s
        assert s["errors"] == [], s
        assert s["peersConnected"] == 0, s
        assert s["peerBytes"] == 0, s
        assert (await stats(first))["peersConnected"] == 0
