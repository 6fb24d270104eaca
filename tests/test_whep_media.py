"""Media over WHEP from a real daemon to aiortc viewers (each in its own process).

The viewers decode every frame (aiortc's H.264 decoder), so these tests fail if passthrough sends
a stream a decoder cannot use, if pacing is off, or if sessions are not freed. What the node
did is read from its metrics and its JSON log.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from peerd.config import load_settings
from peerd.core.ids import Cid
from peerd.core.manifest import decode
from peerd.runtime import open_runtime
from tests.support.poll import until
from tests.support.process import PeerdProcess
from tests.support.whep_media import HlsClip, add_media, make_hls, sign_viewers, whep_url
from tests.support.whep_viewer import ViewerProcess


@dataclass
class Daemon:
    node: PeerdProcess
    media: dict[str, str]
    clips: dict[str, HlsClip]

    def url(self, name: str) -> str:
        return whep_url(self.node.base_url, self.media[name])

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.node.base_url + "/metrics", timeout=5) as r:  # noqa: S310
            text = r.read().decode()
        m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    def closed_sessions(self) -> list[dict[str, Any]]:
        lines = [json.loads(x) for x in self.node.logs().splitlines() if x.startswith("{")]
        return [e for e in lines if e.get("msg") == "whep session closed"]


def make_clips(tmp: Path) -> dict[str, HlsClip]:
    return {
        # 3 s in 1 s segments: a few seconds of playback loop it.
        "plain": make_hls(tmp / "plain", seconds=3, bframes=0, segment_seconds=1),
        "ts": make_hls(tmp / "ts", seconds=2, bframes=0, container="ts"),
        # Different bytes (size), so deleting one of its blobs leaves the others intact.
        "broken": make_hls(tmp / "broken", seconds=3, width=256, height=144, segment_seconds=1),
    }


async def start_daemon(state: Path, tmp: Path) -> Daemon:
    clips = await asyncio.to_thread(make_clips, tmp)
    rt = await open_runtime(load_settings(None, node={"state_dir": state}))
    try:
        media = {name: await add_media(rt, clip, title=name) for name, clip in clips.items()}
        rows = await rt.catalog.conn.execute_fetchall(
            "SELECT manifest FROM media WHERE media_id = ?", (media["broken"],)
        )
        last = decode(bytes(next(iter(rows))[0])).renditions[0].segments[-1].cid
        assert last is not None
        assert await rt.store.delete(Cid(last))
    finally:
        await rt.close()
    sign_viewers(state)
    node = PeerdProcess(state, config={"webrtc": {"loop_playback": True, "connect_timeout_s": 5}})
    await asyncio.to_thread(node.start)
    return Daemon(node, media, clips)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    base = tmp_path_factory.mktemp("whep")
    d = asyncio.run(start_daemon(base / "node", base))
    try:
        yield d
    finally:
        assert d.node.stop() == 0, d.node.logs()[-3000:]


async def frames_at_least(viewer: ViewerProcess, kind: str, n: int) -> dict[str, Any]:
    deadline = time.monotonic() + 15
    while True:
        st = await viewer.stats()
        if st[kind] >= n:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"viewer got {st}")
        await asyncio.sleep(0.1)


async def until_in_thread(cond: Callable[[], object]) -> None:
    """``until`` for a condition that blocks (an HTTP probe, a log read): checked in a thread."""
    await until(lambda: asyncio.to_thread(cond), timeout_s=10, step_s=0.1)


async def closed_reason(daemon: Daemon, viewer: ViewerProcess) -> str:
    """Why the viewer's session closed, from its own log line.

    That line is written once the peer connection has closed, after the sessions gauge fell:
    the last line in the log may still be an earlier test's session.
    """
    location = viewer.location
    assert location is not None

    def own() -> list[dict[str, Any]]:
        return [e for e in daemon.closed_sessions() if location.endswith(e["session"])]

    await until_in_thread(own)
    return str(own()[0]["reason"])


async def test_passthrough_decodes_in_real_time_and_delete_frees(daemon: Daemon) -> None:
    before = daemon.metric('peerd_whep_sessions_opened_total{mode="passthrough"}')
    viewer = await ViewerProcess.start(daemon.url("plain"))
    try:
        assert viewer.status == 201
        assert viewer.location is not None
        assert viewer.location.startswith("/whep/sessions/")
        assert "H264/90000" in viewer.sdp
        assert viewer.links == []  # no ICE servers configured: none announced
        opened = daemon.metric('peerd_whep_sessions_opened_total{mode="passthrough"}')
        assert opened == before + 1
        st0 = await frames_at_least(viewer, "video", 1)
        t0 = time.monotonic()
        await asyncio.sleep(4)  # past the end of the 3 s clip: it loops
        st1 = await viewer.stats()
        rate = (st1["video"] - st0["video"]) / (time.monotonic() - t0)
        assert 18 < rate < 32, rate  # the clip is 25 fps: paced, neither burst nor stalled
        assert st1["widths"] == [320]
        assert st1["audio"] > 150  # 20 ms Opus frames
        token = daemon.url("plain").partition("?")[2]
        async with aiohttp.ClientSession() as http:
            async with http.delete(f"{daemon.node.base_url}{viewer.location}?{token}") as r:
                assert r.status == 200
            async with http.delete(f"{daemon.node.base_url}{viewer.location}?{token}") as r:
                assert r.status == 404
        closed = [e for e in daemon.closed_sessions() if viewer.location.endswith(e["session"])]
        assert closed[0]["reason"] == "delete"
        # Looped, and read at most read_ahead_s (1 s) ahead of playback, in 1 s segments.
        played, read = closed[0]["played_s"], closed[0]["segments_read"]
        assert played > 4
        assert played <= read <= played + 2.5, closed[0]
    finally:
        await viewer.close()


def answered_h264(sdp: str) -> list[str]:
    """The profile-level-ids of the H.264 entries of an SDP answer."""
    return re.findall(r"a=fmtp:\d+ .*profile-level-id=([0-9a-fA-F]{6})", sdp)


def sps_profile(clip: HlsClip) -> str:
    """PPCCLL of the clip's SPS, read from the avcC box of its init segment."""
    assert clip.init is not None
    init = clip.init.read_bytes()
    at = init.index(b"avcC")
    return init[at + 5 : at + 8].hex()


async def test_answer_names_the_h264_profile_sent(daemon: Daemon) -> None:
    """A High-profile stream is answered as High at its SPS's level to a viewer that offers
    High, and decoded; a viewer offering only (Constrained) Baseline gets a transcoded stream,
    never the High stream under a Baseline label."""
    sps = sps_profile(daemon.clips["plain"])
    assert sps.startswith("64"), sps  # x264's default: High
    viewer = await ViewerProcess.start(daemon.url("plain"), h264="4d001f,64001f")
    try:
        assert viewer.status == 201
        assert answered_h264(viewer.sdp) == [sps], viewer.sdp
        await frames_at_least(viewer, "video", 10)
    finally:
        await viewer.close()
    before = daemon.metric('peerd_whep_sessions_opened_total{mode="transcode"}')
    viewer = await ViewerProcess.start(daemon.url("plain"), h264="")
    try:
        assert viewer.status == 201
        # Transcoded: VP8, or H.264 from aiortc's encoder, which is Constrained Baseline.
        assert all(p.startswith("42") for p in answered_h264(viewer.sdp)), viewer.sdp
        assert daemon.metric('peerd_whep_sessions_opened_total{mode="transcode"}') == before + 1
        await frames_at_least(viewer, "video", 10)
    finally:
        await viewer.close()


async def test_mpegts_rendition_passes_through(daemon: Daemon) -> None:
    viewer = await ViewerProcess.start(daemon.url("ts"))
    try:
        assert viewer.status == 201
        assert "H264/90000" in viewer.sdp
        await frames_at_least(viewer, "video", 20)
        await frames_at_least(viewer, "audio", 20)
    finally:
        await viewer.close()


async def test_viewer_closing_frees_session(daemon: Daemon) -> None:
    viewer = await ViewerProcess.start(daemon.url("plain"))
    assert viewer.status == 201
    await frames_at_least(viewer, "video", 1)
    await viewer.close()
    # The viewer's DTLS close ends the node's peer connection.
    await until_in_thread(lambda: daemon.metric("peerd_whep_sessions") == 0)
    assert await closed_reason(daemon, viewer) == "closed"


async def test_missing_segment_ends_session(daemon: Daemon) -> None:
    viewer = await ViewerProcess.start(daemon.url("broken"))
    try:
        assert viewer.status == 201
        await frames_at_least(viewer, "video", 1)
        # The first segments play; the missing one ends the session instead of stalling it.
        await until_in_thread(lambda: daemon.metric("peerd_whep_sessions") == 0)
        assert await closed_reason(daemon, viewer) == "media_error"
    finally:
        await viewer.close()


@pytest.fixture
async def own_daemon(tmp_path: Path) -> AsyncIterator[Daemon]:
    d = await start_daemon(tmp_path / "node", tmp_path)
    try:
        yield d
    finally:
        await asyncio.to_thread(d.node.stop)


async def test_sigterm_drains_sessions(own_daemon: Daemon) -> None:
    viewer = await ViewerProcess.start(own_daemon.url("plain"))
    try:
        assert viewer.status == 201
        await frames_at_least(viewer, "video", 1)
        assert own_daemon.node.proc is not None
        own_daemon.node.proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(own_daemon.node.proc.wait, 15) == 0
        assert own_daemon.closed_sessions()[-1]["reason"] == "drain"
        assert (await viewer.stats())["video"] > 0
    finally:
        await viewer.close()
