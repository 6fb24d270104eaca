"""A second node relays a live stream to its own viewers (issue 22, Network), end to end.

Two real daemons on loopback, LAN peers through mDNS: the origin A has the live input, the relay
B does not (its ``[live] inputs`` is empty). ffmpeg publishes to A over RTMP; four viewers play
``/live/<input>/index.m3u8`` from B with B's tokens: two ffmpeg ``-xerror`` players, hls.js in
Chromium (low-latency mode by default: parts, blocking reloads) and a client that follows the
playlist and fetches every segment, init segment and part it lists. A sends
each blob to B once: A's bytes served to LAN peers equal the sizes of the distinct blobs B
listed, and B fetched no more parts from A than A made. When the publisher stops, B's playlist
ends (``EXT-X-ENDLIST``) and the players finish. When A vanishes mid-stream, B answers 503 with
``Retry-After`` (never 404), as it does for an input nobody has live.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import secrets
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from peerd.core import tokens
from tests.support.browser import Browser, hls_page, player_origin
from tests.support.live_media import make_live_clip
from tests.support.media import ffmpeg_path
from tests.support.p2p import loopback_multicast, metric
from tests.support.poll import until
from tests.support.process import PeerdProcess
from tests.test_live import finish, publish

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MDNS = {"enabled": True, "interfaces": ["127.0.0.1"], "recheck_s": 1.0}
LIVE = {"rtmp_listen": "127.0.0.1:0", "idle_timeout_s": 3.0, "segment_s": 1.0, "part_s": 0.5}
KEY = "relay-key-" + "r" * 32


@dataclass
class Pair:
    """The origin A (input ``input``) and the relay B."""

    a: PeerdProcess
    b: PeerdProcess
    input: str

    def rtmp(self) -> str:
        addr = (self.a.state_dir / "rtmp.addr").read_text().strip()
        return f"rtmp://{addr}/live/{KEY}"

    def token(self, node: PeerdProcess, input: str) -> str:
        secret = (node.state_dir / "secrets" / "hls_signing_key").read_text().strip()
        return tokens.mint(tokens.key_from_secret(secret), f"live:{input}", "hls", 10**10)

    def url(self, input: str | None = None) -> str:
        """B's playlist of ``input`` with a token of B's key."""
        input = input or self.input
        return f"{self.b.base_url}/live/{input}/index.m3u8?token={self.token(self.b, input)}"


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    # A name of its own: other daemons on this host's loopback mDNS may have a "studio" live.
    input = "r" + secrets.token_hex(6)
    a = PeerdProcess(
        tmp_path / "a", config={"mdns": MDNS, "live": {**LIVE, "inputs": [{"name": input}]}}
    )
    b = PeerdProcess(tmp_path / "b", config={"mdns": MDNS, "live": {**LIVE, "inputs": []}})
    with loopback_multicast():
        await asyncio.to_thread(a.init)
        (a.state_dir / "secrets" / f"live-{input}.key").write_text(KEY + "\n")
        await asyncio.to_thread(a.start)
        await asyncio.to_thread(b.start)
        try:
            yield Pair(a, b, input)
        finally:
            for p in (a, b):
                if p.proc is not None and p.proc.poll() is None:
                    await asyncio.to_thread(p.stop)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_live_clip(tmp_path_factory.mktemp("relay") / "clip.mp4", seconds=16.0)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_live_clip(tmp_path_factory.mktemp("relay") / "long.mp4", seconds=60.0)


async def status_of(session: aiohttp.ClientSession, url: str) -> tuple[int, str | None]:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status, resp.headers.get("Retry-After")


async def wait_live(session: aiohttp.ClientSession, pair: Pair) -> None:
    """B serves the relayed playlist (A found over mDNS, a whole segment made)."""

    async def ok() -> bool:
        return (await status_of(session, pair.url()))[0] == 200

    await until(ok, timeout_s=60, step_s=0.3)


async def ffmpeg_viewer(url: str) -> asyncio.subprocess.Process:
    """ffmpeg playing the live playlist to its end; any decoding error fails it."""
    return await asyncio.create_subprocess_exec(
        ffmpeg_path(),
        *("-hide_banner", "-loglevel", "error", "-nostdin", "-xerror"),
        *("-live_start_index", "0", "-i", url, "-map", "0", "-f", "null", "-"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def follower(session: aiohttp.ClientSession, pair: Pair) -> tuple[dict[str, int], str]:
    """Follow B's playlist to its end (blocking reloads), fetching every listed blob and part
    once; the sizes of the distinct blobs (init and segments) and the last playlist."""
    sizes: dict[str, int] = {}
    parts: set[str] = set()
    base = pair.url().rsplit("/", 1)[0] + "/"
    query = ""
    while True:
        async with session.get(pair.url() + query) as resp:
            assert resp.status == 200, (resp.status, await resp.text())
            text = await resp.text()
        for uri in re.findall(r"^(b/[^\s?]+)\?", text, re.M) + re.findall(
            r'URI="(b/[^"?]+)\?', text
        ):
            if uri not in sizes:
                async with session.get(
                    base + uri + f"?token={pair.token(pair.b, pair.input)}"
                ) as r:
                    assert r.status == 200, (uri, r.status)
                    sizes[uri] = len(await r.read())
        for uri in re.findall(r'#EXT-X-PART:[^\n]*URI="(part/[^"?]+)\?', text):
            if uri not in parts:
                async with session.get(
                    base + uri + f"?token={pair.token(pair.b, pair.input)}"
                ) as r:
                    assert r.status == 200, (uri, r.status)
                parts.add(uri)
        if "#EXT-X-ENDLIST" in text:
            return sizes, text
        seq = int(re.search(r"#EXT-X-MEDIA-SEQUENCE:(\d+)", text).group(1))  # type: ignore[union-attr]
        n = text.count("#EXTINF")
        query = f"&_HLS_msn={seq + n}"


async def test_a_second_node_relays_a_live_stream(pair: Pair, clip: Path, tmp_path: Path) -> None:
    async with (
        aiohttp.ClientSession() as session,
        Browser.launch(tmp_path / "chromium") as browser,
        player_origin(lambda: hls_page(pair.url(), "live")) as origin,
    ):
        # Nobody has the input live yet: 503 with Retry-After, not 404.
        status, retry = await status_of(session, pair.url())
        assert (status, retry is not None) == (503, True), status
        publisher = await publish(pair.rtmp(), clip)
        await wait_live(session, pair)
        # The node-to-node route B follows takes only signed requests of known peers.
        unsigned = await status_of(session, f"{pair.a.base_url}/p2p/v1/live/{pair.input}")
        assert unsigned[0] == 401, unsigned
        viewers = [await ffmpeg_viewer(pair.url()) for _ in range(2)]
        following = asyncio.create_task(follower(session, pair))
        # hls.js (low-latency mode: parts and blocking reloads) plays from B as well.
        page = await browser.new_page()
        await page.goto(f"{origin}/player.html")
        await page.wait_for("document.getElementById('v').currentTime > 2", timeout_s=30)
        assert await page.evaluate("window.hlsErrors.filter(e => e.endsWith(':true'))") == []
        assert await page.evaluate("window.mediaErrors") == []
        sizes, last = await following
        assert "#EXT-X-ENDLIST" in last
        code, err = await finish(publisher)
        assert code == 0, err
        for v in viewers:
            code, err = await finish(v)
            assert code == 0, err + pair.b.logs()[-3000:]
    a, b = pair.a.base_url, pair.b.base_url
    assert len(sizes) >= 4, sizes

    async def m(url: str, name: str, **labels: str) -> float:
        return await asyncio.to_thread(metric, url, name, **labels)

    # Every blob B's viewers got crossed from A to B once (B stored it and served it itself).
    assert await m(a, "peerd_bytes_served_total", source="lan-peer") == sum(sizes.values())
    assert await m(b, "peerd_fetches_total", source="lan", outcome="ok") == len(sizes)
    # Parts: one fetch from A per part, whatever the number of B's viewers.
    made = await m(a, "peerd_live_hls_parts_total")
    assert 0 < await m(b, "peerd_live_relay_parts_fetched_total") <= made
    # One upstream request per input follows the stream, not one per viewer.
    assert await m(b, "peerd_live_relay_upstream_requests_total", result="ok") <= made + 40


async def test_the_relay_answers_503_when_the_origin_vanishes(pair: Pair, long_clip: Path) -> None:
    async with aiohttp.ClientSession() as session:
        publisher = await publish(pair.rtmp(), long_clip)
        try:
            await wait_live(session, pair)
            assert pair.a.proc is not None
            pair.a.proc.send_signal(signal.SIGKILL)
            await asyncio.to_thread(pair.a.proc.wait)

            async def gone() -> bool:
                return (await status_of(session, pair.url()))[0] != 200

            await until(gone, timeout_s=60, step_s=0.5)
            status, retry = await status_of(session, pair.url())
            assert (status, retry is not None) == (503, True), status
        finally:
            with contextlib.suppress(ProcessLookupError):
                publisher.kill()
            await publisher.wait()
