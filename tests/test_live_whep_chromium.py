"""Headless Chromium watches a live input over WHEP: the node's player page, H.264 passed through.

The publication is a Main-profile H.264 + AAC clip fed in real time (``tests/support/livefeed``),
as an RTMP publisher sends it; the page is ``/whep/live/player/<input>`` served by peerd's own
app. Chromium must decode pictures steadily (``framesDecoded`` from ``getStats()`` growing every
second) and receive sound (Opus made once by the node from the AAC); the video reaches it under
the input's own H.264 profile, never re-encoded.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest

from peerd.core import avc
from tests.support.browser import Browser
from tests.support.live_media import make_live_clip
from tests.support.livefeed import feed, read_file
from tests.test_live_whep import Node, node  # noqa: F401 - the fixture
from tests.test_whep_chromium import WEBRTC_FLAGS, h264_labels, play_and_watch

pytestmark = pytest.mark.slow


async def test_chromium_decodes_a_live_input(node: Node, tmp_path: Path) -> None:  # noqa: F811
    clip = await asyncio.to_thread(make_live_clip, tmp_path / "main.mp4", seconds=40)
    tracks, _ = await asyncio.to_thread(read_file, clip)
    sink = node.live.publication("cam")
    publisher = asyncio.create_task(feed(sink, clip, speed=1.0))
    try:
        async with Browser.launch(tmp_path / "chromium", *WEBRTC_FLAGS) as browser:
            page = await browser.new_page()
            await page.goto(node.url("cam", path="/whep/live/player/"))
            samples, stats = await play_and_watch(page, seconds=5)
            await page.screenshot(tmp_path / "live.png")
            assert samples[0] > 0, stats
            assert all(b > a for a, b in zip(samples, samples[1:], strict=False)), samples
            assert samples[-1] - samples[0] >= 50, samples  # 25 fps for 5 s, with slack
            assert stats["codec"].startswith("video/H264"), stats
            assert stats["audioPackets"] > 50, stats
            answer = await page.evaluate("window.whep.pc.remoteDescription.sdp")
            assert h264_labels(answer) == [avc.profile_level_id(tracks[0].config)], answer
            assert re.search(r"a=rtpmap:\d+ opus/48000", answer), answer
            for s in node.whep.sessions.values():
                assert all(getattr(t, "frames", 0) == 0 for t in s.tracks)
            assert await page.evaluate("window.whep.stop()") == 200
            assert not node.whep.sessions
            assert page.console_errors == []
    finally:
        publisher.cancel()
        await asyncio.gather(publisher, return_exceptions=True)
        sink.end("unpublished")
