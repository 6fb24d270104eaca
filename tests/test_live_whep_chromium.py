"""Headless Chromium watches a live input over WHEP: the node's player page, H.264 passed through.

The publication is a Main-profile H.264 + AAC clip fed in real time (``tests/support/livefeed``),
as an RTMP publisher sends it; the page is ``/whep/live/player/<input>`` served by peerd's own
app. Chromium must decode pictures steadily (``framesDecoded`` from ``getStats()`` growing every
second) and receive sound (Opus made once by the node from the AAC); the video reaches it under
the input's own H.264 profile, never re-encoded.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from peerd.core import avc
from tests.support.browser import Browser, player_origin
from tests.support.live_media import make_live_clip
from tests.support.livefeed import feed, read_file
from tests.support.poll import until
from tests.support.whep_viewer import ViewerProcess
from tests.test_live_whep import WHIP_KEY, Node, grows, node  # noqa: F401 - the fixture
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


PUBLISHER_PAGE = """<!doctype html><html><head><title>publisher</title></head><body><script>
const URL_ = {url}, KEY = {key};
window.pub = {{error: null, status: 0, location: null}};
window.pub.ready = (async () => {{
  try {{
    const stream = await navigator.mediaDevices.getUserMedia(
      {{video: {{width: 320, height: 240, frameRate: 25}}, audio: true}});
    const pc = new RTCPeerConnection();
    window.pub.pc = pc;
    const video = pc.addTransceiver(stream.getVideoTracks()[0], {{direction: "sendonly"}});
    pc.addTransceiver(stream.getAudioTracks()[0], {{direction: "sendonly"}});
    video.setCodecPreferences(RTCRtpSender.getCapabilities("video").codecs
      .filter((c) => c.mimeType.toLowerCase() === "video/h264"));
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((done) => {{
      if (pc.iceGatheringState === "complete") return done();
      pc.addEventListener("icegatheringstatechange",
        () => pc.iceGatheringState === "complete" && done());
    }});
    const headers = {{"Content-Type": "application/sdp", "Authorization": "Bearer " + KEY}};
    const resp = await fetch(URL_, {{method: "POST", headers, body: pc.localDescription.sdp}});
    window.pub.status = resp.status;
    window.pub.location = resp.headers.get("Location");
    const answer = await resp.text();
    if (resp.status !== 201) throw new Error(answer);
    await pc.setRemoteDescription({{type: "answer", sdp: answer}});
    window.pub.stop = async () => {{
      const del = new URL(window.pub.location, URL_);
      const auth = {{"Authorization": "Bearer " + KEY}};
      const r = await fetch(del, {{method: "DELETE", headers: auth}});
      pc.close();
      return r.status;
    }};
  }} catch (e) {{ window.pub.error = String(e); }}
}})();
</script></body></html>"""


async def test_chromium_publishes_over_whip(node: Node, tmp_path: Path) -> None:  # noqa: F811
    """A browser publishes its camera and microphone (Chromium's fake devices) over WHIP from
    another origin (CORS), H.264 and Opus; an aiortc WHEP viewer decodes what the node passed
    on without decoding it."""
    page_html = PUBLISHER_PAGE.format(
        url=json.dumps(f"{node.base}/whip/cam"), key=json.dumps(WHIP_KEY)
    )
    flags = (*WEBRTC_FLAGS, "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream")
    viewer: ViewerProcess | None = None
    async with (
        player_origin(lambda: page_html) as origin,
        Browser.launch(tmp_path / "chromium", *flags) as browser,
    ):
        page = await browser.new_page()
        await page.goto(f"{origin}/player.html")
        await page.evaluate("window.pub.ready")
        assert await page.evaluate("window.pub.error") is None
        assert await page.evaluate("window.pub.status") == 201
        try:
            await until(lambda: "cam" in node.live.fanouts and node.live.fanouts["cam"].begun, 30)
            fan = node.live.fanouts["cam"]
            assert fan.video is not None
            assert fan.video.codec == "h264"
            assert (fan.video.width, fan.video.height) == (320, 240)
            assert fan.audio is not None
            assert fan.audio.codec == "opus"
            viewer = await ViewerProcess.start(node.url("cam"))
            assert viewer.status == 201, viewer.sdp
            stats = await grows(viewer, video=50, audio=50)
            assert stats["widths"], stats
            assert await page.evaluate("window.pub.stop()") == 200
            await until(lambda: not node.whep.sessions, timeout_s=20)
            # The page's origin has no favicon: its 404 is not the publisher's.
            errors = [e for e in page.console_errors if not e.url.endswith("/favicon.ico")]
            assert errors == []
        finally:
            if viewer is not None:
                await viewer.close()
