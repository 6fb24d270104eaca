"""Recordings of live inputs: the record format, a publication becoming a media item that a real
daemon serves and ffmpeg decodes whole, the same media id for the same frames, and a daemon
that dies mid-stream losing at most the segment in flight.

A publisher here is ``tests.support.livefeed`` (a file's frames, as an ingest adapter hands them
over) into an in-process :class:`LiveService` on a node's state directory; the media item is then
played from outside by ``ffmpeg -xerror`` through a real ``peerd run`` on that directory, and
``GET /api/v1/live`` is called as the coordinator does, every answer checked against the
committed OpenAPI document.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from peerd.config import load_settings
from peerd.core import tokens
from peerd.core.live import LiveFrame, LiveTrack
from peerd.errors import Unavailable
from peerd.live.record import (
    MAGIC,
    SUFFIX,
    Recorder,
    end_record,
    frame_record,
    frames_of,
    header_record,
    read_header,
)
from peerd.live.service import LiveService
from peerd.media.ingest import node_ingestor
from peerd.runtime import Runtime, open_runtime
from tests.support.coordinator import NodeApiClient
from tests.support.livefeed import feed
from tests.support.media import ffmpeg_path, make_media
from tests.support.poll import until
from tests.support.process import REPO_ROOT, PeerdProcess, peerd_env

SECONDS = 4
RATE = 30
KEY = "test-stream-key-" + "k" * 24
INPUTS = [{"name": "cam"}, {"name": "stage", "record": False}]


# -- the record format (no I/O but a temp file) -------------------------------------------------


def test_a_torn_tail_is_cut_at_the_last_whole_record(tmp_path: Path) -> None:
    track = LiveTrack(0, "audio", "opus", 48000, b"", sample_rate=48000, channels=2)
    frames = [LiveFrame(0, i * 960, i * 960, True, bytes([i]) * 100) for i in range(5)]
    whole = MAGIC + header_record("cam", 1.5, [track])
    whole += b"".join(frame_record(f) for f in frames)
    path = tmp_path / "r.rec"
    # Cut inside the last frame's record: the four before it are whole.
    path.write_bytes(whole[:-10])
    head, end, ended = read_header(path)
    assert head is not None
    assert head["input"] == "cam"
    assert not ended
    assert list(frames_of(path)) == frames[:4]
    assert end == len(whole) - len(frame_record(frames[4]))
    # A flipped byte inside a record ends the readable part there too (its CRC fails).
    bad = bytearray(whole + end_record("unpublished"))
    bad[end - 3] ^= 0xFF
    path.write_bytes(bytes(bad))
    assert list(frames_of(path)) == frames[:3]
    path.write_bytes(whole + end_record("unpublished"))
    assert read_header(path)[2] is True


# -- a node with live inputs ---------------------------------------------------------------------


@dataclass
class Node:
    """A node's state directory with its live service and recorder running in this process."""

    proc: PeerdProcess
    rt: Runtime
    service: LiveService
    recorder: Recorder


def _node(path: Path) -> PeerdProcess:
    proc = PeerdProcess(path, config={"live": {"inputs": INPUTS}})
    proc.init()
    (path / "secrets" / "live-cam.key").write_text(KEY + "\n")
    return proc


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    proc = await asyncio.to_thread(_node, tmp_path / "node")
    settings = load_settings(proc.state_dir / "test.toml")
    rt = await open_runtime(settings)
    try:
        live = settings.live
        recorder = Recorder(
            settings.state_dir / "live", node_ingestor(rt), live.inputs, segment_s=live.segment_s
        )
        service = LiveService(
            live, secret=settings.secret, recorder=recorder, registry=rt.metrics.registry
        )
        await asyncio.to_thread(service.load_keys)
        yield Node(proc, rt, service, recorder)
    finally:
        await rt.close()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 s of H.264 + AAC, a keyframe every second."""
    return make_media(
        tmp_path_factory.mktemp("clip") / "clip.mp4", seconds=SECONDS, rate=RATE, gop=RATE
    )


def _api_token(proc: PeerdProcess) -> str:
    return (proc.state_dir / "secrets" / "api_token").read_text().strip()


def _hls_url(proc: PeerdProcess, media_id: str) -> str:
    secret = (proc.state_dir / "secrets" / "hls_signing_key").read_text()
    token = tokens.mint(tokens.key_from_secret(secret), media_id, "hls", int(time.time()) + 600)
    return f"{proc.base_url}/hls/{media_id}/master.m3u8?token={token}"


def _decoded_frames(url: str) -> Counter[str]:
    """Frames per stream ffmpeg decodes from ``url``; any decoding error fails (-xerror)."""
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


async def _live_status(proc: PeerdProcess) -> dict[str, Any]:
    """``GET /api/v1/live`` as the coordinator calls it, checked against the OpenAPI document;
    unauthenticated calls are refused."""
    client = NodeApiClient(proc.base_url, _api_token(proc))
    try:
        assert (await client.call("GET", "/api/v1/live", token="wrong")).status == 403
        ans = await client.call("GET", "/api/v1/live")
    finally:
        await client.close()
    assert ans.status == 200
    return {i["input"]: i for i in ans.body["inputs"]}


def _rec_files(proc: PeerdProcess) -> list[Path]:
    return sorted((proc.state_dir / "live").glob("*" + SUFFIX))


async def test_a_recording_becomes_media_that_plays_the_same_every_time(
    node: Node, clip: Path
) -> None:
    svc = node.service
    # Once as fast as it goes, ended by its publisher.
    pub = svc.open(KEY, input=None, protocol="rtmp", remote="127.0.0.1:50000")
    await feed(pub.sink, clip, speed=0)
    first = await node.recorder.wait()
    # Once at four times real time, vanishing (the idle timer ends it).
    pub = svc.open(KEY, input="cam", protocol="whip", remote="127.0.0.1:50001")
    await feed(pub.sink, clip, speed=4, end=None)
    assert svc.status()[0].connected
    assert svc.check_idle(time.monotonic() + svc.settings.idle_timeout_s) == ["cam"]
    second = await node.recorder.wait()
    assert first == second
    media_id = first[0]
    assert media_id is not None
    cam, stage = svc.status()
    assert cam.last_recording == media_id
    assert stage.last_recording is None
    assert await asyncio.to_thread(_rec_files, node.proc) == []
    async with node.rt.catalog.transaction() as tx:
        rows = await (await tx.execute("SELECT title FROM media")).fetchall()
    assert len(rows) == 1
    assert str(rows[0][0]).startswith("cam live ")
    await node.rt.close()

    # A real daemon on the same state directory: the coordinator sees the inputs and the last
    # recording, and ffmpeg decodes every frame of it over HLS.
    proc = node.proc
    await asyncio.to_thread(proc.start)
    try:
        status = await _live_status(proc)
        assert status["cam"]["connected"] is False
        assert status["cam"]["last_recording"] == media_id
        assert status["stage"]["record"] is False
        frames = await asyncio.to_thread(_decoded_frames, _hls_url(proc, media_id))
        assert frames["0"] == SECONDS * RATE, frames
        assert frames["1"] > 0, frames
        # The input without its key file is named in the log; no key ever is.
        logs = proc.logs()
        [line] = [x for x in logs.splitlines() if "live input has no stream key" in x]
        assert json.loads(line)["key_file"] == "live-stage.key"
        assert KEY not in logs
    finally:
        assert await asyncio.to_thread(proc.stop) == 0, proc.logs()[-3000:]


async def test_a_stopping_node_seals_the_recording_for_the_next_start(
    node: Node, clip: Path
) -> None:
    svc = node.service
    pub = svc.open(KEY, input=None, protocol="rtmp", remote="127.0.0.1:50000")
    await feed(pub.sink, clip, speed=0, end=None)
    await svc.drain()  # SIGTERM: the publication ends, its recording is sealed, not ingested
    assert await node.recorder.wait() == [None]
    [left] = await asyncio.to_thread(_rec_files, node.proc)
    assert (await asyncio.to_thread(read_header, left))[2] is True
    with pytest.raises(Unavailable):
        svc.open(KEY, input=None, protocol="rtmp", remote="127.0.0.1:50001")
    # The next start ingests it: the same item as a publication that ended normally.
    again = Recorder(left.parent, node.recorder.ingestor, svc.settings.inputs)
    [media_id] = await again.recover()
    assert media_id is not None
    assert again.last("cam") == media_id
    assert await asyncio.to_thread(_rec_files, node.proc) == []


def _crash(proc: PeerdProcess, clip: Path, video_frames: int) -> dict[str, int]:
    """Publish the first ``video_frames`` of ``clip`` into a process that then SIGKILLs itself."""
    out = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "tests.support.livecrash", str(proc.state_dir), str(clip)]
        + [str(video_frames)],
        env=peerd_env({"PEERD_TEST_INPUTS": json.dumps(INPUTS)}),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == -9, out.stderr[-3000:]
    fed: dict[str, int] = json.loads(out.stdout.strip().splitlines()[-1])
    return fed


def _video_frames_on_disk(path: Path) -> int:
    head, _, ended = read_header(path)
    assert head is not None
    assert not ended
    video = {t["index"] for t in head["tracks"] if t["kind"] == "video"}
    return sum(1 for f in frames_of(path) if f.track in video)


async def test_a_crash_mid_stream_loses_at_most_the_segment_in_flight(
    tmp_path: Path, clip: Path
) -> None:
    proc = await asyncio.to_thread(_node, tmp_path / "node")
    # Dies just before the last keyframe of the clip: three whole GOPs less one frame fed.
    fed = await asyncio.to_thread(_crash, proc, clip, 3 * RATE - 1)
    assert fed == {"fed_video": 3 * RATE - 1, "gop": RATE}
    [left] = await asyncio.to_thread(_rec_files, proc)
    on_disk = await asyncio.to_thread(_video_frames_on_disk, left)
    assert fed["fed_video"] - fed["gop"] <= on_disk <= fed["fed_video"], on_disk
    # And the write in flight was torn: half a record at the end.
    with left.open("ab") as fh:
        fh.write(frame_record(LiveFrame(0, 0, 0, True, b"\0" * 4000))[:1500])

    await asyncio.to_thread(proc.start)
    try:
        status: dict[str, Any] = {}

        async def recorded() -> bool:
            status.update(await _live_status(proc))
            return status["cam"]["last_recording"] is not None

        await until(recorded, timeout_s=90, step_s=0.2)
        assert status["cam"]["connected"] is False
        assert await asyncio.to_thread(_rec_files, proc) == []
        media_id = status["cam"]["last_recording"]
        frames = await asyncio.to_thread(_decoded_frames, _hls_url(proc, media_id))
        assert frames["0"] == on_disk, (frames, on_disk)
        logs = proc.logs()
        assert "live recording had a torn tail; cut" in logs
        assert "live recording ingested" in logs
    finally:
        assert await asyncio.to_thread(proc.stop) == 0, proc.logs()[-3000:]
