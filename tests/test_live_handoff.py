"""Hand-off of a live input to Cloudflare Stream, from outside: a publication fed in real time,
the audience grown past the threshold, Stream's API (a fake of its real shape) asked for a live
input with the node's token, and the ffmpeg CLI receiving the RTMPS restream (through a TLS
front: ffmpeg cannot listen for RTMPS) and decoding it, frame for frame the published ones."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import pytest
from prometheus_client import CollectorRegistry

from peerd.api.commands import Subsystems
from peerd.api.node import NodeApi
from peerd.config import load_settings
from peerd.coordinator.client import CoordinatorService
from peerd.core.uplink import Uplink
from peerd.live.handoff import HandoffConsumer
from peerd.runtime import Runtime
from tests.support.cf_stream import FakeCloudflareStream, RtmpsFront, make_cert
from tests.support.coordinator import FakeCoordinator
from tests.support.livefeed import feed, read_file
from tests.support.media import ffmpeg_path, ffprobe_json, make_media
from tests.support.poll import until


@dataclass
class Bench:
    clip: Path
    fake: FakeCloudflareStream
    front: RtmpsFront
    receiver_port: int
    tmp: Path
    ca_file: Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def bench(tmp_path: Path) -> AsyncIterator[Bench]:
    clip = await asyncio.to_thread(
        make_media, tmp_path / "clip.mp4", seconds=8.0, size=(160, 120), gop=15
    )
    cert, key = make_cert(tmp_path)
    port = _free_port()
    front = await RtmpsFront(cert, key, port).start()
    fake = await FakeCloudflareStream(f"rtmps://127.0.0.1:{front.port}/live/").start()
    try:
        yield Bench(clip, fake, front, port, tmp_path, cert)
    finally:
        await fake.close()
        await front.close()


def _consumer(
    b: Bench, viewers: dict[str, int], token: str | None
) -> tuple[HandoffConsumer, CollectorRegistry]:
    secrets_dir = b.tmp / "secrets"
    secrets_dir.mkdir(exist_ok=True)
    if token is not None:
        (secrets_dir / "cloudflare-stream-token").write_text(token + "\n")
    settings = load_settings(
        None,
        node={"state_dir": b.tmp / "state", "secrets_dir": secrets_dir, "name": "den"},
        live={
            "handoff": {
                "enabled": True,
                "account_id": b.fake.account_id,
                "api_url": b.fake.base_url,
                "start_viewers": 3,
                "stop_viewers": 1,
                "start_after_s": 0.3,
                "stop_after_s": 0.3,
                "check_interval_s": 0.1,
                "retry_max_s": 0.5,
                "ca_file": b.ca_file,  # the TLS front's self-signed certificate
            }
        },
    )
    registry = CollectorRegistry()
    consumer = HandoffConsumer(
        settings, Uplink(), lambda name: viewers.get(name, 0), registry=registry
    )
    return consumer, registry


def _metric(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def _packets(path: Path) -> dict[str, list[bytes]]:
    out: dict[str, list[bytes]] = {"video": [], "audio": []}
    with av.open(str(path)) as c:
        for pkt in c.demux():
            if pkt.size:
                out[pkt.stream.type].append(bytes(pkt))
    return out


async def _receive(port: int, key: str, out: Path) -> asyncio.subprocess.Process:
    """The ffmpeg CLI as Stream's ingest: one RTMP publisher of ``key``, copied to ``out``."""
    return await asyncio.create_subprocess_exec(
        ffmpeg_path(),
        *("-hide_banner", "-loglevel", "error", "-nostdin", "-y", "-listen", "1"),
        *("-i", f"rtmp://127.0.0.1:{port}/live/{key}", "-c", "copy", str(out)),
        stderr=subprocess.PIPE,
    )


async def _decodes(path: Path) -> None:
    """ffmpeg decodes every frame of ``path`` without an error."""
    check = await asyncio.create_subprocess_exec(
        *(ffmpeg_path(), "-v", "error", "-xerror", "-i", str(path), "-f", "null", "-"),
        stderr=subprocess.PIPE,
    )
    _, err = await check.communicate()
    assert check.returncode == 0, err
    assert err == b""


async def test_a_busy_input_is_restreamed_unchanged_and_ends_with_the_input(
    bench: Bench, caplog: pytest.LogCaptureFixture
) -> None:
    b = bench
    caplog.set_level(logging.INFO, "peerd.live.handoff")
    viewers = {"studio": 0}
    consumer, registry = _consumer(b, viewers, b.fake.api_token)
    sink = consumer.publication("studio")
    publishing = asyncio.create_task(feed(sink, b.clip, speed=1.0))
    receiver: asyncio.subprocess.Process | None = None
    try:
        await asyncio.sleep(0.5)  # a few checks with a small audience: nothing happens
        assert b.fake.requests == []
        viewers["studio"] = 5
        await until(lambda: b.fake.inputs, timeout_s=20)
        listing, create = b.fake.requests  # none of this node's yet: one is created
        assert listing["method"] == "GET"
        assert listing["authorization"] == f"Bearer {b.fake.api_token}"
        assert create["method"] == "POST"
        assert create["path"] == f"/client/v4/accounts/{b.fake.account_id}/stream/live_inputs"
        assert create["authorization"] == f"Bearer {b.fake.api_token}"
        assert create["body"]["recording"]["mode"] == "automatic"
        assert create["body"]["meta"] == {"name": "peerd den studio"}
        (uid,) = b.fake.inputs
        key = b.fake.inputs[uid]["rtmps"]["streamKey"]
        # No receiver yet: the egress fails and retries; the publication goes on.
        await until(
            lambda: _metric(registry, "peerd_live_handoff_failures_total", stage="egress") >= 2,
            timeout_s=20,
        )
        assert not publishing.done()
        (status,) = consumer.status()
        assert status.handed_off
        assert status.stream_uid == uid
        assert status.egress == "retrying"
        assert status.playback_url == f"{b.fake.customer}/{uid}/manifest/video.m3u8"
        assert _metric(registry, "peerd_live_handoff_active") == 1
        failed = [r for r in caplog.records if r.getMessage().startswith("hand-off egress failed")]
        assert failed
        logged = " ".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
        assert "ffmpeg exited" in logged
        assert key not in logged
        assert b.fake.api_token not in logged

        out = b.tmp / "received.flv"
        receiver = await _receive(b.receiver_port, key, out)
        await until(lambda: consumer.status()[0].egress == "sending", timeout_s=30)
        await publishing  # the input ends: so does its hand-off
        assert consumer.status() == []
        assert _metric(registry, "peerd_live_handoff_active") == 0
        # The restream ended: the receiver sees its publisher leave and exits.
        await asyncio.wait_for(receiver.communicate(), timeout=60)
        receiver = None
    finally:
        if receiver is not None:
            receiver.kill()
            await receiver.wait()
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
        await consumer.close()

    await _decodes(out)

    # What ffmpeg received is a run of the published frames from a keyframe to the end, unchanged.
    tracks, frames = await asyncio.to_thread(read_file, b.clip)
    got = await asyncio.to_thread(_packets, out)
    # The bytes counted are what ffmpeg sent: the media and its FLV framing.
    media = sum(len(d) for kind in ("video", "audio") for d in got[kind])
    assert _metric(registry, "peerd_live_handoff_egress_bytes_total") >= media
    for kind in ("video", "audio"):
        published = [f for f in frames if tracks[f.track].kind == kind]
        sent = got[kind]
        assert len(sent) >= 15, kind  # at least a second of it
        start = len(published) - len(sent)
        assert [f.data for f in published[start:]] == sent, kind
        if kind == "video":
            assert published[start].keyframe


async def test_the_audience_coming_back_ends_the_hand_off(bench: Bench) -> None:
    b = bench
    viewers = {"studio": 5}
    consumer, registry = _consumer(b, viewers, b.fake.api_token)
    sink = consumer.publication("studio")
    publishing = asyncio.create_task(feed(sink, b.clip, speed=1.0))
    try:
        await until(lambda: consumer.status() and consumer.status()[0].handed_off, timeout_s=20)
        b.fake.live_viewers = 4  # the audience moved to Stream still counts
        viewers["studio"] = 0
        await asyncio.sleep(1.0)
        assert consumer.status()[0].handed_off
        b.fake.live_viewers = 0
        await until(lambda: not consumer.status()[0].handed_off, timeout_s=20)
        assert _metric(registry, "peerd_live_handoff_active") == 0
        assert not publishing.done()
        (uid,) = b.fake.inputs
        # A restarted daemon hands the input off again to the same Stream live input.
        again, _ = _consumer(b, {"studio": 5}, b.fake.api_token)
        restarted = asyncio.create_task(feed(again.publication("studio"), b.clip, speed=1.0))
        await until(lambda: again.status() and again.status()[0].handed_off, timeout_s=20)
        assert again.status()[0].stream_uid == uid
        assert list(b.fake.inputs) == [uid]
        restarted.cancel()
        await asyncio.gather(restarted, return_exceptions=True)
        await again.close()
    finally:
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
        await consumer.close()


@pytest.mark.parametrize("token", ["forged", None])
async def test_a_forged_or_missing_token_is_a_clear_error_not_a_crash(
    bench: Bench, token: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    b = bench
    viewers = {"studio": 5}
    consumer, registry = _consumer(b, viewers, token)
    sink = consumer.publication("studio")
    caplog.set_level(logging.ERROR, "peerd.live.handoff")
    publishing = asyncio.create_task(feed(sink, b.clip, speed=1.0))
    try:
        await until(
            lambda: _metric(registry, "peerd_live_handoff_failures_total", stage="api") >= 1,
            timeout_s=20,
        )
        (record,) = [r for r in caplog.records if r.name == "peerd.live.handoff"]
        error: Any = record.__dict__["error"]
        if token is None:
            assert b.fake.requests == []
            assert "no Cloudflare API token" in error
        else:
            assert [r["authorization"] for r in b.fake.requests] == ["Bearer forged"]
            assert "403" in error
            assert "Authentication error" in error
            assert "forged" not in record.getMessage() + error
        assert not consumer.status()[0].handed_off
        assert b.fake.inputs == {}
        assert not publishing.done()
    finally:
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
        await consumer.close()


async def test_the_coordinator_hears_of_the_hand_off(bench: Bench, runtime: Runtime) -> None:
    b = bench
    coordinator = FakeCoordinator()
    runtime.settings.coordinator.url = await coordinator.start()
    runtime.settings.coordinator.heartbeat_interval_s = 1.0
    consumer, _ = _consumer(b, {"studio": 5}, b.fake.api_token)
    sink = consumer.publication("studio")
    publishing = asyncio.create_task(feed(sink, b.clip, speed=1.0))
    svc = CoordinatorService(runtime, NodeApi(runtime, Subsystems()), live_handoff=consumer.status)
    ready = asyncio.Event()
    reporting = asyncio.create_task(svc.run(ready.set))
    # As the daemon runs it: a service whose stop ends the hand-offs (no thread left behind).
    supervised = asyncio.create_task(consumer.run(lambda: None))
    try:
        await until(lambda: b.fake.inputs, timeout_s=20)
        (uid,) = b.fake.inputs

        def handed_off() -> list[dict[str, Any]]:
            return [
                h
                for r in coordinator.of_kind("heartbeat")
                for h in r.payload["live_handoff"] or []
                if h["handed_off"]
            ]

        await coordinator.wait_for(lambda: bool(handed_off()), 20)
        h = handed_off()[0]
        assert h["input"] == "studio"
        assert h["stream_uid"] == uid
        assert h["playback_url"] == f"{b.fake.customer}/{uid}/manifest/video.m3u8"
        assert h["since"] > 0
        assert not coordinator.refused  # the reports fit the committed OpenAPI schema
    finally:
        for task in (reporting, publishing, supervised):
            task.cancel()
        await asyncio.gather(reporting, publishing, supervised, return_exceptions=True)
        assert consumer.status() == []
        await coordinator.close()


async def test_opus_audio_reaches_stream_as_aac_and_video_unchanged(bench: Bench) -> None:
    """A WHIP publisher's Opus has no place in FLV: the egress encodes it to AAC, once."""
    b = bench
    clip = await asyncio.to_thread(
        make_media, b.tmp / "opus.mkv", seconds=6.0, size=(160, 120), gop=15, acodec="opus"
    )
    consumer, _ = _consumer(b, {"studio": 5}, b.fake.api_token)
    sink = consumer.publication("studio")
    publishing = asyncio.create_task(feed(sink, clip, speed=1.0))
    out = b.tmp / "received.flv"
    receiver: asyncio.subprocess.Process | None = None
    try:
        await until(lambda: b.fake.inputs, timeout_s=20)
        (uid,) = b.fake.inputs
        key = b.fake.inputs[uid]["rtmps"]["streamKey"]
        receiver = await _receive(b.receiver_port, key, out)
        await until(lambda: consumer.status()[0].egress == "sending", timeout_s=30)
        await publishing
        await asyncio.wait_for(receiver.communicate(), timeout=60)
        receiver = None
    finally:
        if receiver is not None:
            receiver.kill()
            await receiver.wait()
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
        await consumer.close()
    await _decodes(out)
    probe = ffprobe_json(out, "-show_streams")
    assert sorted(s["codec_name"] for s in probe["streams"]) == ["aac", "h264"]
    tracks, frames = await asyncio.to_thread(read_file, clip)
    got = await asyncio.to_thread(_packets, out)
    published = [f.data for f in frames if tracks[f.track].kind == "video"]
    assert len(got["video"]) >= 15
    assert published[len(published) - len(got["video"]) :] == got["video"]
    assert len(got["audio"]) >= 40  # about a second of AAC at least
