"""Low-latency HLS of a live input, from outside: ffmpeg records it while it is live, hls.js in
headless Chromium plays it in low-latency mode, and raw HTTP checks blocking reloads, delta
updates, parts against segment blobs and the end of the stream.

The live service (ingest, keys) is not needed: each test feeds a publication straight into the
packager consumer with ``tests/support/livefeed.feed`` in real time, from a clip made by
``make_media`` (H.264 + AAC, a keyframe every second), and serves the consumer's routes from a
real listener (the node's fast path in front, as in the daemon).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from peerd.config import load_settings
from peerd.core import tokens
from peerd.http import hls
from peerd.http.server import Listener, build_app, listen, runner_for
from peerd.live import llhls
from peerd.runtime import Runtime, open_runtime
from tests.support.browser import Browser, player_origin
from tests.support.livefeed import feed
from tests.support.media import ffmpeg_path, make_media
from tests.support.poll import until

KEY_TEXT = "test-signing-key-0123456789abcdef-0123456789"
INPUT = "studio"


@dataclass
class LiveNode:
    """The packager consumer and its routes on a loopback listener."""

    rt: Runtime
    out: llhls.LiveHls
    base: str

    expires: int = 0

    def token(self, input: str = INPUT) -> str:
        """A viewer token for the live input (one per input: a viewer is a token at an address)."""
        self.expires = self.expires or int(time.time()) + 600
        return tokens.mint(KEY_TEXT.encode(), f"live:{input}", "hls", self.expires)

    def part(self, n: int, input: str = INPUT) -> str:
        """The path of part ``n`` of the input's publication, under the input."""
        return f"part/{self.out.streams[input].id}/{n}.m4s"

    def url(self, path: str = "index.m3u8", input: str = INPUT, **query: str) -> str:
        """A URL under the input, with a valid token and ``query``."""
        q = "&".join(f"{k}={v}" for k, v in {"token": self.token(input), **query}.items())
        return f"{self.base}/live/{input}/{path}?{q}"


@contextlib.asynccontextmanager
async def live_node(tmp: Path, keep_s: float = 60.0, **live: Any) -> AsyncIterator[LiveNode]:
    """A node's runtime in ``tmp`` serving ``/live/`` (and ``/hls/``, for its fast path)."""
    secrets = tmp / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    (secrets / "hls_signing_key").write_text(KEY_TEXT + "\n")
    settings = load_settings(
        None,
        node={"state_dir": tmp / "state", "secrets_dir": secrets},
        http={"port": 0},
        live={"inputs": [{"name": INPUT}, {"name": "garden"}], **live},
    )
    rt = await open_runtime(settings)
    out = llhls.LiveHls(rt, ended_keep_s=keep_s)
    runner: web.AppRunner | None = None
    listener: Listener | None = None
    try:
        app = build_app(rt, [hls.install, partial(llhls.install, hls=out)])
        runner = runner_for(app, settings.http)
        await runner.setup()
        listener = await listen(runner, settings.http)
        yield LiveNode(rt, out, f"http://127.0.0.1:{listener.port}")
    finally:
        if listener is not None:
            await listener.stop(1.0)
        if runner is not None:
            await runner.cleanup()
        await out.close()
        await rt.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve seconds of 320x240 H.264 (keyframe every second) + AAC."""
    return make_media(tmp_path_factory.mktemp("llhls") / "clip.mp4", seconds=12, size=(320, 240))


async def _get(url: str) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return r.status, dict(r.headers), await r.read()


async def _started(node: LiveNode) -> str:
    """The playlist once the first segment is complete."""

    async def ready() -> bool:
        status, _, body = await _get(node.url())
        return status == 200 and b"#EXTINF" in body

    await until(ready, timeout_s=30, step_s=0.1)
    return (await _get(node.url()))[2].decode()


@pytest.mark.timeout(120)
async def test_refusals_and_headers(tmp_path: Path, clip: Path) -> None:
    async with live_node(tmp_path) as node:
        status, headers, body = await _get(node.url(input="nowhere"))
        assert status == 404, body
        status, headers, body = await _get(node.url())
        assert status == 503
        assert headers["Retry-After"] == "2"
        assert b"not live now" in body
        status, _, _ = await _get(node.url(input="garden").replace(INPUT, "garden"))
        assert status == 503
        status, _, body = await _get(f"{node.base}/live/{INPUT}/index.m3u8?token=v1.hls.1.x")
        assert status == 403
        # a token for another input does not open this one
        other = node.token("garden")
        status, _, _ = await _get(f"{node.base}/live/{INPUT}/index.m3u8?token={other}")
        assert status == 403

        task = asyncio.create_task(feed(node.out.publication(INPUT), clip, speed=1.0))
        try:
            text = await _started(node)
            status, headers, _ = await _get(node.url())
            assert headers["Cache-Control"] == "no-store"
            assert headers["Content-Type"] == "application/vnd.apple.mpegurl"
            seg = re.search(r"^b/(b[a-z2-7]{58})\.m4s", text, re.M)
            assert seg is not None
            status, headers, _ = await _get(node.url(f"b/{seg.group(1)}.m4s"))
            assert status == 200
            assert headers["Cache-Control"] == "public, max-age=31536000, immutable"
            assert headers["Content-Type"] == "video/iso.segment"
            part = re.search(r'URI="part/[0-9a-f]{8}/(\d+)\.m4s', text)
            assert part is not None
            status, headers, _ = await _get(node.url(node.part(int(part.group(1)))))
            assert status == 200
            assert "immutable" in headers["Cache-Control"]
            assert node.out.viewers(INPUT) == 1
            # far ahead of the live edge: 400 at once, no wait
            status, _, _ = await _get(node.url(_HLS_msn="99", _HLS_part="0"))
            assert status == 400
            status, _, _ = await _get(node.url(_HLS_part="0"))
            assert status == 400
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _lists_part(text: str, number: int) -> bool:
    return any(x.startswith("#EXT-X-PART:") and f"/{number}.m4s?" in x for x in text.splitlines())


def _last_part(text: str) -> tuple[int, int, int]:
    """(msn, part index, running part number) of a playlist's newest part."""
    lines = text.splitlines()
    msn = int(next(x for x in lines if x.startswith("#EXT-X-MEDIA-SEQUENCE:")).split(":")[1])
    index = -1
    number = -1
    for line in lines:
        if line.startswith("#EXT-X-PART:"):
            index += 1
            number = int(re.search(r"part/[0-9a-f]{8}/(\d+)\.m4s", line).group(1))  # type: ignore[union-attr]
        elif line.startswith("b/"):
            msn += 1
            index = -1
    if index == -1:  # the newest part ended a segment
        return msn - 1, -1, number
    return msn, index, number


@pytest.mark.timeout(120)
async def test_blocking_reload_waits_for_the_next_part(tmp_path: Path, clip: Path) -> None:
    async with live_node(tmp_path) as node:
        task = asyncio.create_task(feed(node.out.publication(INPUT), clip, speed=1.0))
        try:
            text = await _started(node)
            for _ in range(4):
                msn, index, number = _last_part(text)
                if index == -1:
                    msn, index = msn + 1, -1
                assert not _lists_part(text, number + 1)
                assert node.out.streams[INPUT].parts.get(number + 1) is None
                # the preload hint names the part that does not exist yet
                assert f'PRELOAD-HINT:TYPE=PART,URI="{node.part(number + 1)}?' in text
                hinted = asyncio.create_task(_get(node.url(node.part(number + 1))))
                status, _, body = await _get(node.url(_HLS_msn=str(msn), _HLS_part=str(index + 1)))
                assert status == 200
                text = body.decode()
                assert _lists_part(text, number + 1)  # answered only once the part exists
                status, _, part = await hinted
                assert status == 200
                assert part == node.out.streams[INPUT].parts[number + 1]
            blocking = node.rt.metrics.registry.get_sample_value(
                "peerd_live_hls_blocking_reloads_total", {"result": "waited"}
            )
            assert blocking is not None
            assert blocking >= 4
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.mark.timeout(120)
async def test_a_silent_publisher_times_blocking_requests_out(tmp_path: Path, clip: Path) -> None:
    async with live_node(tmp_path) as node:
        short = await asyncio.to_thread(make_media, tmp_path / "short.mp4", seconds=3)
        await feed(node.out.publication(INPUT), short, speed=0, end=None)
        text = await _started(node)
        msn, index, _ = _last_part(text)
        status, headers, _ = await _get(node.url(_HLS_msn=str(msn + 1), _HLS_part="0"))
        assert status == 503
        assert headers["Retry-After"] == "1"
        node.out.streams[INPUT].end("unpublished")
        await until(lambda: node.out.streams[INPUT].timeline.ended, timeout_s=10)  # type: ignore[union-attr]


@pytest.mark.timeout(180)
async def test_parts_segments_skip_and_determinism(tmp_path: Path, clip: Path) -> None:
    # One-second segments and a long window, so a delta update has segments to skip.
    async with live_node(tmp_path, segment_s=1.0, window_segments=12) as node:
        await feed(node.out.publication(INPUT), clip, speed=1.0)
        stream = node.out.streams[INPUT]
        await until(lambda: stream.timeline.ended, timeout_s=10)  # type: ignore[union-attr]
        full = (await _get(node.url()))[2].decode()
        status, _, body = await _get(node.url(_HLS_skip="YES"))
        delta = body.decode()
        assert full.rstrip().endswith("#EXT-X-ENDLIST")
        skipped = int(re.search(r"#EXT-X-SKIP:SKIPPED-SEGMENTS=(\d+)", delta).group(1))  # type: ignore[union-attr]
        assert skipped > 0
        assert "#EXT-X-VERSION:9" in delta
        full_segs = re.findall(r"^b/\S+", full, re.M)
        delta_segs = re.findall(r"^b/\S+", delta, re.M)
        assert delta_segs == full_segs[skipped:]
        # parts of each segment still listed with its parts, fetched over HTTP, make the blob
        checked = 0
        for block in re.findall(r"((?:#EXT-X-PART:[^\n]*\n)+)#EXTINF:[^\n]*\n(b/\S+)", full):
            parts, seg = block
            data = b""
            for n in re.findall(r"part/[0-9a-f]{8}/(\d+)\.m4s", parts):
                status, _, got = await _get(node.url(node.part(int(n))))
                assert status == 200
                data += got
            status, _, blob = await _get(f"{node.base}/live/{INPUT}/{seg}")
            assert status == 200
            assert blob == data
            checked += 1
        assert checked >= 2
        await stream.flushed()
        cids = [s.cid for s in stream.timeline.segments]  # type: ignore[union-attr]
        for cid in cids:
            assert await node.rt.store.has(cid)  # type: ignore[arg-type]
        assert stream.init is not None
        assert await node.rt.store.has(stream.init[0])

        # The same file again (as fast as it goes): the same blobs.
        await feed(node.out.publication(INPUT), clip, speed=0)
        again = node.out.streams[INPUT]
        await until(lambda: again.timeline.ended, timeout_s=20)  # type: ignore[union-attr]
        assert [s.cid for s in again.timeline.segments] == cids  # type: ignore[union-attr]
        assert again.init == stream.init
        # but parts, numbered from 0 again, have new URLs: an old one cached can't stand in
        assert again.id != stream.id
        old = f"{node.base}/live/{INPUT}/part/{stream.id}/0.m4s?token={node.token()}"
        assert (await _get(old))[0] == 404


@pytest.mark.timeout(180)
async def test_ffmpeg_records_it_live_and_stops_at_the_end(tmp_path: Path, clip: Path) -> None:
    async with live_node(tmp_path) as node:
        task = asyncio.create_task(feed(node.out.publication(INPUT), clip, speed=1.0))
        await _started(node)
        out = tmp_path / "recorded.mp4"
        proc = await asyncio.create_subprocess_exec(
            ffmpeg_path(),
            "-hide_banner",
            "-loglevel",
            "error",
            "-nostdin",
            "-i",
            node.url(),
            "-c",
            "copy",
            str(out),
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await asyncio.wait_for(proc.communicate(), timeout=90)
        assert proc.returncode == 0, err.decode()
        assert task.done()  # ffmpeg stopped at EXT-X-ENDLIST, after the publication ended
        await task
        check = await asyncio.create_subprocess_exec(
            ffmpeg_path(),
            "-v",
            "error",
            "-xerror",
            "-i",
            str(out),
            "-f",
            "null",
            "-",
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await check.communicate()
        assert check.returncode == 0, err.decode()
        assert not err, err.decode()
        probe = await asyncio.create_subprocess_exec(
            "ffprobe",
            "-v",
            "error",
            "-show_streams",
            "-show_format",
            "-of",
            "json",
            str(out),
            stdout=asyncio.subprocess.PIPE,
        )
        doc = json.loads((await probe.communicate())[0])
        assert sorted(s["codec_name"] for s in doc["streams"]) == ["aac", "h264"]
        # it joined live (three segments from the end) and kept up to the end
        assert float(doc["format"]["duration"]) >= 6


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>live</title><link rel="icon" href="data:,">
<script src="/hls.min.js"></script></head>
<body><video id="v" muted playsinline></video>
<script>
window.hlsErrors = [];
window.mediaErrors = [];
window.latency = [];
window.ended = false;
window.requests = [];
const v = document.getElementById("v");
v.addEventListener("error", () => window.mediaErrors.push(String(v.error && v.error.code)));
v.addEventListener("ended", () => { window.ended = true; });
const hls = new Hls({enableWorker: false, lowLatencyMode: true});
hls.on(Hls.Events.ERROR, (_e, d) => window.hlsErrors.push(`${d.type}:${d.details}:${d.fatal}`));
hls.on(Hls.Events.LEVEL_LOADING, (_e, d) => window.requests.push(d.url));
window.skipped = 0;
hls.on(Hls.Events.LEVEL_LOADED, (_e, d) => {
  window.skipped = Math.max(window.skipped, d.details.skippedSegments);
});
setInterval(() => {
  const date = hls.playingDate;
  if (v.currentTime > 0 && !v.paused && date) {
    window.latency.push({
      hls: hls.latency, pdt: (Date.now() - date.getTime()) / 1000,
      now: Date.now() / 1000, t: v.currentTime,
    });
  }
}, 250);
hls.loadSource(SRC);
hls.attachMedia(v);
hls.on(Hls.Events.MANIFEST_PARSED, () => v.play());
</script></body></html>
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    "variant",
    [
        "defaults",
        # Opus audio, and 1 s segments in a 10-segment window: hls.js gets delta updates
        "opus-delta",
    ],
)
async def test_hlsjs_plays_it_live_in_low_latency_mode(
    tmp_path: Path, clip: Path, variant: str
) -> None:
    slot: dict[str, str] = {}
    live: dict[str, Any] = {}
    if variant == "opus-delta":
        clip = await asyncio.to_thread(
            make_media, tmp_path / "opus.mp4", seconds=12, size=(320, 240), acodec="opus"
        )
        live = {"segment_s": 1.0, "window_segments": 10}
    async with (
        live_node(tmp_path, **live) as node,
        player_origin(lambda: PAGE.replace("SRC", json.dumps(slot["src"]))) as origin,
        Browser.launch(tmp_path / "profile") as browser,
    ):
        fed = time.time()  # the feed hands over media time t at about fed + t (same clock)
        task = asyncio.create_task(feed(node.out.publication(INPUT), clip, speed=1.0))
        try:
            await _started(node)
            slot["src"] = node.url()
            page = await browser.new_page()
            await page.goto(origin + "/player.html")
            await page.wait_for(
                "window.latency.length >= 8 || window.hlsErrors.length > 0", timeout_s=60
            )
            assert not task.done()  # it plays while the input is live
            samples = await page.evaluate("window.latency")
            assert await page.evaluate("window.hlsErrors") == []
            pdt = sorted(s["pdt"] for s in samples)
            edge = sorted(s["hls"] for s in samples)
            # Frame on screen against the moment the publisher handed it over: no clock of
            # the packager's in it (Chromium and this process read the same system clock).
            feed_lag = sorted(s["now"] - fed - s["t"] for s in samples)
            print(
                f"\nLL-HLS behind live ({variant}, hls.js 1.7.4, part 0.5 s): median"
                f" {feed_lag[len(feed_lag) // 2]:.2f} s behind the feed,"
                f" {pdt[len(pdt) // 2]:.2f} s by program date time,"
                f" {edge[len(edge) // 2]:.2f} s by hls.latency ({len(samples)} samples)"
            )
            requests = await page.evaluate("window.requests")
            assert any("_HLS_msn=" in r and "_HLS_part=" in r for r in requests)
            await task
            # the end: ENDLIST reaches the player, which plays out and stops
            await page.wait_for("window.ended || window.hlsErrors.length > 0", timeout_s=60)
            assert await page.evaluate("window.hlsErrors") == []
            assert await page.evaluate("window.mediaErrors") == []
            assert page.console_errors == []
            assert node.out.viewers(INPUT) >= 1
            if variant == "opus-delta":
                assert await page.evaluate("window.skipped") > 0
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


@pytest.mark.timeout(120)
async def test_blobs_leave_the_store_after_the_window_and_the_end(
    tmp_path: Path, clip: Path
) -> None:
    async with live_node(tmp_path, keep_s=1.0, segment_s=1.0, window_segments=3) as node:
        store = node.rt.store
        task = asyncio.create_task(feed(node.out.publication(INPUT), clip, speed=1.0))
        text = await _started(node)
        first = re.search(r"^b/(b[a-z2-7]{58})\.m4s", text, re.M).group(1)  # type: ignore[union-attr]
        stream = node.out.streams[INPUT]
        await until(lambda: store.has(first), timeout_s=10)  # type: ignore[arg-type]
        await task
        # one window (3 s) after it left the playlist, its blob is gone; the window's are held
        await until(lambda: stream.timeline.ended, timeout_s=10)  # type: ignore[union-attr]
        await stream.flushed()
        assert not await store.has(first)  # type: ignore[arg-type]
        window = [s.cid for s in stream.timeline.segments]  # type: ignore[union-attr]
        for cid in window:
            assert await store.has(cid)  # type: ignore[arg-type]
        status, _, body = await _get(node.url())
        assert status == 200
        assert body.rstrip().endswith(b"#EXT-X-ENDLIST")
        # past the ended playlist's time: not live (503), and nothing of it is left
        await until(lambda: INPUT not in node.out.streams, timeout_s=10)
        await stream.flushed()
        status, _, _ = await _get(node.url())
        assert status == 503
        assert stream.init is not None
        for cid in [*window, stream.init[0]]:
            assert not await store.has(cid)  # type: ignore[arg-type]
