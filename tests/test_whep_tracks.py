"""Sound over WHEP for media packaged with alternate audio, and for audio-only media (issue 19).

Real daemons, files ingested with ``peerd ingest``, aiortc viewers in their own processes that
decode what they receive and measure the tone they hear: a file with two audio tracks plays its
default track's tone beside the video, an audio-only file plays its tone alone.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.media import TONES, make_audio, make_multitrack
from tests.support.process import PeerdProcess, run_cli
from tests.support.whep_media import sign_viewers, whep_url
from tests.support.whep_viewer import ViewerProcess


def _daemon(state: Path, container: str) -> PeerdProcess:
    sign_viewers(state)
    node = PeerdProcess(
        state,
        config={
            "media": {"container": container, "segment_seconds": 1.0},
            "webrtc": {"loop_playback": True, "connect_timeout_s": 10},
        },
    )
    node.start()
    return node


@pytest.fixture(params=["fmp4", "ts"])
def daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[PeerdProcess]:
    node = _daemon(tmp_path / "node", request.param)
    try:
        yield node
    finally:
        assert node.stop() == 0, node.logs()[-3000:]


def _ingest(node: PeerdProcess, path: Path) -> str:
    out = run_cli(
        "-c",
        str(node.state_dir / "test.toml"),
        "ingest",
        "--no-progress",
        "--json",
        str(path),
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return str(json.loads(out.stdout)["media_id"])


async def _heard(viewer: ViewerProcess, audio_frames: int, video_frames: int) -> dict[str, Any]:
    """Stats once the viewer decoded at least that many frames of each kind (the deadline only
    bounds a hang)."""
    deadline = time.monotonic() + 60
    while True:
        st = await viewer.stats()
        if st["audio"] >= audio_frames and st["video"] >= video_frames:
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"viewer got {st}")
        await asyncio.sleep(0.2)


@pytest.mark.timeout(300)
async def test_multi_audio_media_plays_its_default_track_beside_the_video(
    daemon: PeerdProcess, tmp_path: Path
) -> None:
    src = await asyncio.to_thread(make_multitrack, tmp_path / "multi.mkv", bitmap=False)
    media_id = await asyncio.to_thread(_ingest, daemon, src)
    viewer = await ViewerProcess.start(whep_url(daemon.base_url, media_id))
    try:
        assert viewer.status == 201, viewer.sdp
        assert "opus/48000" in viewer.sdp.lower(), viewer.sdp
        # 100 Opus frames are 2 s of sound: the meter has a second of the tone to count.
        st = await _heard(viewer, audio_frames=100, video_frames=30)
        # The French track is the file's default (880 Hz), not the first one (440 Hz).
        assert abs(st["tone"] - TONES["fra"]) < 0.1 * TONES["fra"], st
    finally:
        await viewer.close()


@pytest.mark.timeout(300)
async def test_audio_only_media_plays_sound(tmp_path: Path) -> None:
    node = await asyncio.to_thread(_daemon, tmp_path / "node", "fmp4")
    try:
        src = await asyncio.to_thread(make_audio, tmp_path / "tone.m4a", seconds=4.0)
        media_id = await asyncio.to_thread(_ingest, node, src)
        viewer = await ViewerProcess.start(whep_url(node.base_url, media_id))
        try:
            assert viewer.status == 201, viewer.sdp
            st = await _heard(viewer, audio_frames=100, video_frames=0)
            assert abs(st["tone"] - 440) < 44, st
            assert st["video"] == 0
        finally:
            await viewer.close()
        # A viewer that takes no sound has nothing to play here: refused, not left silent.
        mute = await ViewerProcess.start(whep_url(node.base_url, media_id), audio=False)
        try:
            assert mute.status == 400, mute.sdp
            assert "audio" in mute.sdp
        finally:
            await mute.close()
    finally:
        assert await asyncio.to_thread(node.stop) == 0, node.logs()[-3000:]
