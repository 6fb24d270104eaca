"""Live streaming end to end on a real daemon, every party outside it.

Publishers: Debian's ffmpeg over RTMP (``-re -c copy -f flv``, as OBS would send), an aiortc
client over WHIP (``tests/support/whip_publisher``). Viewers: ffmpeg and hls.js (headless
Chromium) on the low-latency HLS playlist while it is live, Chromium over WHEP. Afterwards the
recording is played as on-demand media (``ffmpeg -xerror``), and the same input file published
twice gives the same media id. Refusals: a wrong key, a second publisher on a key in use; a
publisher that vanishes (SIGKILL) ends the live item cleanly, and its recording still plays.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from peerd.core import tokens
from tests.support.browser import Browser, hls_page, player_origin
from tests.support.coordinator import NodeApiClient
from tests.support.live_media import make_live_clip
from tests.support.media import ffmpeg_path
from tests.support.poll import until
from tests.support.process import PeerdProcess
from tests.support.whip_publisher import PublisherProcess
from tests.test_whep_chromium import WEBRTC_FLAGS, play_and_watch

pytestmark = pytest.mark.slow

KEY = "studio-key-" + "k" * 32
CAM_KEY = "cam-key-" + "c" * 32
FPS = 25


@dataclass
class Node:
    """A running daemon with two live inputs, ``studio`` and ``cam``."""

    proc: PeerdProcess

    @property
    def base(self) -> str:
        return self.proc.base_url

    def secret(self, name: str) -> str:
        return (self.proc.state_dir / "secrets" / name).read_text().strip()

    def rtmp(self, key: str) -> str:
        addr = (self.proc.state_dir / "rtmp.addr").read_text().strip()
        return f"rtmp://{addr}/live/{key}"

    def token(self, media_id: str, scope: str = "hls") -> str:
        key = tokens.key_from_secret(self.secret("hls_signing_key"))
        return tokens.mint(key, media_id, scope, int(time.time()) + 600)

    def live_url(self, input: str) -> str:
        return f"{self.base}/live/{input}/index.m3u8?token={self.token('live:' + input)}"

    def media_url(self, media_id: str) -> str:
        return f"{self.base}/hls/{media_id}/master.m3u8?token={self.token(media_id)}"

    async def status(self) -> dict[str, dict[str, Any]]:
        """``GET /api/v1/live`` as the coordinator calls it (checked against the OpenAPI doc)."""
        client = NodeApiClient(self.base, self.secret("api_token"))
        try:
            ans = await client.call("GET", "/api/v1/live")
        finally:
            await client.close()
        assert ans.status == 200, ans
        return {i["input"]: i for i in ans.body["inputs"]}


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    proc = PeerdProcess(
        tmp_path / "node",
        config={
            "live": {
                "inputs": [{"name": "studio"}, {"name": "cam"}],
                "rtmp_listen": "127.0.0.1:0",
                "idle_timeout_s": 3.0,
                "segment_s": 1.0,
                "part_s": 0.5,
            },
            "webrtc": {"max_sessions": 4},
            "analytics": {"flush_interval_s": 1.0},
        },
    )
    await asyncio.to_thread(proc.init)
    secrets = proc.state_dir / "secrets"
    (secrets / "live-studio.key").write_text(KEY + "\n")
    (secrets / "live-cam.key").write_text(CAM_KEY + "\n")
    await asyncio.to_thread(proc.start)
    try:
        yield Node(proc)
    finally:
        await asyncio.to_thread(proc.stop)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 s of Main-profile H.264 without B-frames (WebRTC passes it through) + AAC."""
    return make_live_clip(tmp_path_factory.mktemp("live") / "clip.mp4", seconds=8.0, fps=FPS)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_live_clip(tmp_path_factory.mktemp("live") / "long.mp4", seconds=40.0, fps=FPS)


async def publish(url: str, clip: Path) -> asyncio.subprocess.Process:
    """ffmpeg publishing ``clip`` in real time over RTMP, copying its streams."""
    return await asyncio.create_subprocess_exec(
        ffmpeg_path(),
        *("-hide_banner", "-loglevel", "error", "-nostdin", "-re", "-i", str(clip)),
        *("-c", "copy", "-f", "flv", url),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def finish(proc: asyncio.subprocess.Process, timeout_s: float = 90) -> tuple[int, str]:
    _, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return proc.returncode, err.decode(errors="replace")


@contextlib.asynccontextmanager
async def stopping(proc: asyncio.subprocess.Process) -> AsyncIterator[None]:
    try:
        yield
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def playlist(node: Node, input: str) -> str | None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(node.live_url(input)) as r,
    ):
        return await r.text() if r.status == 200 else None


async def ended(node: Node, input: str) -> bool:
    """The live playlist says the publication ended (``EXT-X-ENDLIST``)."""
    text = await playlist(node, input)
    return text is not None and "#EXT-X-ENDLIST" in text


async def connected(node: Node, input: str) -> bool:
    return bool((await node.status())[input]["connected"])


def decoded_frames(url: str) -> Counter[str]:
    """Frames per stream ``ffmpeg -xerror`` decodes from ``url`` (any error fails)."""
    out = subprocess.run(  # noqa: S603
        [ffmpeg_path(), "-hide_banner", "-nostdin", "-xerror", "-i", url]
        + ["-map", "0", "-f", "framecrc", "-"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return Counter(line.split(",")[0] for line in out.stdout.splitlines() if line[:1].isdigit())


def recordings(node: Node, input: str) -> list[str]:
    """Media ids of ``input``'s recordings, in the order the daemon ingested them (its log)."""
    found = []
    for line in node.proc.logs().splitlines():
        if '"live recording ingested"' not in line:
            continue
        entry = json.loads(line)
        if entry.get("input") == input:
            found.append(entry["media_id"])
    return found


async def recording(node: Node, input: str, n: int) -> str:
    """The ``n``-th recording of ``input`` (1-based), once ingested; the status names it."""
    await until(lambda: len(recordings(node, input)) >= n, timeout_s=90, step_s=0.5)
    media_id = recordings(node, input)[n - 1]
    assert (await node.status())[input]["last_recording"] == recordings(node, input)[-1]
    return media_id


async def test_an_rtmp_publisher_plays_live_then_as_its_recording(
    node: Node, clip: Path, tmp_path: Path
) -> None:
    """ffmpeg publishes over RTMP; ffmpeg and hls.js play the LL-HLS playlist while it is live;
    the coordinator's status shows the input; the recording plays as on-demand media and the
    same file published again is the same media."""
    pub = await publish(node.rtmp(KEY), clip)
    async with stopping(pub):
        await until(lambda: playlist(node, "studio"), timeout_s=30, step_s=0.2)
        status = (await node.status())["studio"]
        assert status["connected"], status
        assert status["protocol"] == "rtmp", status
        assert any(c.startswith("avc1.") for c in status["codecs"]), status
        assert any(c.startswith("mp4a.") for c in status["codecs"]), status
        text = await playlist(node, "studio")
        assert text is not None
        assert "#EXT-X-PART:" in text
        assert "#EXT-X-ENDLIST" not in text
        # ffmpeg records the live playlist until its end
        out = tmp_path / "live.mp4"
        recorder = await asyncio.create_subprocess_exec(
            ffmpeg_path(),
            *("-hide_banner", "-loglevel", "error", "-nostdin", "-i", node.live_url("studio")),
            *("-c", "copy", "-y", str(out)),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        async with (
            stopping(recorder),
            Browser.launch(tmp_path / "chromium") as browser,
            player_origin(lambda: hls_page(node.live_url("studio"), "live")) as origin,
        ):
            page = await browser.new_page()
            await page.goto(f"{origin}/player.html")
            await page.wait_for("document.getElementById('v').currentTime > 2", timeout_s=30)
            assert await connected(node, "studio"), "hls.js played after the publisher left"
            assert (await node.status())["studio"]["viewers"] >= 1
            assert await page.evaluate("window.hlsErrors.filter(e => e.endsWith(':true'))") == []
            assert await page.evaluate("window.mediaErrors") == []
            rc, err = await finish(pub)
            assert rc == 0, err
            rc, err = await finish(recorder)
            assert rc == 0, err
    frames = await asyncio.to_thread(decoded_frames, str(out))
    assert frames["0"] >= FPS * 4, frames  # the viewer joined after the start: most of 8 s
    await until(lambda: ended(node, "studio"), timeout_s=30, step_s=0.2)
    assert not await connected(node, "studio")
    first = await recording(node, "studio", 1)
    got = await asyncio.to_thread(decoded_frames, node.media_url(first))
    assert got["0"] == FPS * 8, got  # every frame of the clip, none lost
    assert got["1"] > 0, got
    # the same input file again: the same media
    rc, err = await finish(await publish(node.rtmp(KEY), clip))
    assert rc == 0, err
    assert await recording(node, "studio", 2) == first


async def test_refusals_and_a_vanished_publisher(node: Node, long_clip: Path) -> None:
    """A wrong key is refused; a second publisher on a key in use is refused while the first
    goes on; a publisher killed mid-stream ends the live item cleanly within the idle timeout,
    and what it sent is recorded and plays."""
    rc, _ = await finish(await publish(node.rtmp("not-the-key"), long_clip), timeout_s=30)
    assert rc != 0
    assert not await connected(node, "studio")
    first = await publish(node.rtmp(KEY), long_clip)
    async with stopping(first):
        await until(lambda: connected(node, "studio"), timeout_s=30, step_s=0.2)
        rc, _ = await finish(await publish(node.rtmp(KEY), long_clip), timeout_s=30)
        assert rc != 0
        assert first.returncode is None
        assert await connected(node, "studio")
        await until(lambda: playlist(node, "studio"), timeout_s=30, step_s=0.2)
        await asyncio.sleep(3)  # a few segments on air
        first.send_signal(signal.SIGKILL)
        await first.wait()
        killed = time.monotonic()
        await until(lambda: _not(connected(node, "studio")), timeout_s=30, step_s=0.2)
        assert time.monotonic() - killed < 3.0 + 10.0  # idle timeout, generous for a busy host
    await until(lambda: ended(node, "studio"), timeout_s=30, step_s=0.2)
    rec = await recording(node, "studio", 1)
    got = await asyncio.to_thread(decoded_frames, node.media_url(rec))
    assert got["0"] >= FPS * 2, got
    # the input takes a publisher again at once
    again = await publish(node.rtmp(KEY), long_clip)
    async with stopping(again):
        await until(lambda: connected(node, "studio"), timeout_s=30, step_s=0.2)


async def _not(c: Any) -> bool:
    return not await c


async def test_whip_publisher_plays_as_llhls_and_a_chromium_whep_viewer_decodes_rtmp(
    node: Node, long_clip: Path, tmp_path: Path
) -> None:
    """An aiortc client publishes over WHIP (H.264 + Opus) and ffmpeg decodes the node's LL-HLS
    of it; meanwhile ffmpeg publishes over RTMP to another input and Chromium watches that one
    over WHEP, decoding frames."""
    whip = await PublisherProcess.start(
        f"{node.base}/whip/cam", str(long_clip), key=CAM_KEY, vcodec="H264"
    )
    assert whip.status == 201, whip.sdp
    rtmp = await publish(node.rtmp(KEY), long_clip)
    try:
        async with stopping(rtmp):
            await until(lambda: playlist(node, "cam"), timeout_s=45, step_s=0.3)
            status = await node.status()
            assert status["cam"]["protocol"] == "whip", status
            assert "Opus" in status["cam"]["codecs"], status
            out = tmp_path / "whip.mp4"
            grab = await asyncio.create_subprocess_exec(
                ffmpeg_path(),
                *("-hide_banner", "-loglevel", "error", "-nostdin"),
                *("-i", node.live_url("cam"), "-t", "4", "-c", "copy", "-y", str(out)),
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
            rc, err = await finish(grab, timeout_s=60)
            assert rc == 0, err
            frames = await asyncio.to_thread(decoded_frames, str(out))
            assert frames["0"] > 20, frames
            assert frames["1"] > 20, frames
            await until(lambda: connected(node, "studio"), timeout_s=30, step_s=0.2)
            async with Browser.launch(tmp_path / "chromium", *WEBRTC_FLAGS) as browser:
                page = await browser.new_page()
                token = node.token("live:studio", "whep")
                await page.goto(f"{node.base}/whep/live/player/studio?token={token}")
                samples, stats = await play_and_watch(page, seconds=4)
                assert samples[-1] - samples[0] >= 40, (samples, stats)
                assert stats["codec"].startswith("video/H264"), stats
                assert page.console_errors == []
    finally:
        assert await whip.delete() == 200
    await until(lambda: _not(connected(node, "cam")), timeout_s=30, step_s=0.2)


async def test_live_viewers_count_in_playback_analytics(
    node: Node, long_clip: Path, tmp_path: Path
) -> None:
    """hls.js with CMCD on plays a live input: the node counts the session under the media id
    ``live:<input>``, path ``http``, the input's H.264 codec, started (``GET /api/v1/analytics``,
    as the coordinator asks, checked against the OpenAPI document)."""
    pub = await publish(node.rtmp(KEY), long_clip)
    async with stopping(pub):
        await until(lambda: playlist(node, "studio"), timeout_s=30, step_s=0.2)
        page_html = hls_page(node.live_url("studio"), "live").replace(
            "new Hls({enableWorker: false})", "new Hls({enableWorker: false, cmcd: {}})"
        )
        assert "cmcd: {}" in page_html
        async with (
            Browser.launch(tmp_path / "chromium") as browser,
            player_origin(lambda: page_html) as origin,
        ):
            page = await browser.new_page()
            await page.goto(f"{origin}/player.html")
            await page.wait_for("document.getElementById('v').currentTime > 2", timeout_s=30)
            assert await page.evaluate("window.hlsErrors.filter(e => e.endsWith(':true'))") == []
            client = NodeApiClient(node.base, node.secret("api_token"))
            rows: list[dict[str, Any]] = []

            async def counted() -> bool:
                ans = await client.call(
                    "GET",
                    "/api/v1/analytics",
                    params={"group_by": "media,path,codec", "media": "live:studio"},
                )
                assert ans.status == 200, ans
                rows[:] = ans.body["rows"]
                return any(r["started"] >= 1 for r in rows)

            try:
                await until(counted, timeout_s=30, step_s=0.5)
            finally:
                await client.close()
    (row,) = rows
    assert row["media"] == "live:studio", row
    assert row["path"] == "http", row
    assert row["codec"].startswith("avc1."), row
    assert (row["sessions"], row["started"], row["failures"]) == (1, 1, 0), row
    assert row["startup_mean_s"] is not None, row
