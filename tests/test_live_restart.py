"""A daemon restarted mid-stream, and the live status seen from outside, on a real daemon.

ffmpeg publishes a long clip in real time over RTMP while another ffmpeg reads the node's
LL-HLS playlist. After a few segments the daemon is killed (SIGKILL) or stopped (SIGTERM) and
started again on the same state directory and ports. Then:

* the recording of what was published before the stop is ingested and plays with
  ``ffmpeg -xerror``, at most one segment plus one GOP short of what the publisher had sent
  (frames sent = seconds since the input connected x frame rate);
* a new publisher is taken at once and its publication plays;
* the viewer of the old publication ends (a clean end after SIGTERM: ``EXT-X-ENDLIST``, exit 0)
  and is never answered 404 nor left hanging.

The live status (``GET /api/v1/live``) shows a plausible ``latency_s`` while the input is live
and null when it is not; the coordinator's heartbeat (the fake coordinator) shows the RTMP input
connected soon after ffmpeg starts and disconnected after it stops.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.coordinator import FakeCoordinator, NodeApiClient
from tests.support.live_media import make_live_clip
from tests.support.media import ffmpeg_path
from tests.support.poll import until
from tests.support.process import PeerdProcess
from tests.test_live import (
    FPS,
    KEY,
    Node,
    connected,
    decoded_frames,
    finish,
    publish,
    stopping,
)

pytestmark = pytest.mark.slow

SEGMENT_S = 1.0
GOP_S = 1.0  # make_live_clip: a keyframe a second


def free_port() -> int:
    """A TCP port free on loopback now, below the ephemeral range: the daemon binds it again
    after its restart, and no other process's port-0 bind takes it in between."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(max(1024, low - 8000), low), 200):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


def live_config(rtmp_port: int) -> dict[str, dict[str, Any]]:
    return {
        "http": {"port": free_port()},
        "live": {
            "inputs": [{"name": "studio"}],
            "rtmp_listen": f"127.0.0.1:{rtmp_port}",
            "idle_timeout_s": 3.0,
            "segment_s": SEGMENT_S,
            "part_s": 0.5,
        },
    }


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    proc = PeerdProcess(tmp_path / "node", config=live_config(free_port()))
    await asyncio.to_thread(proc.init)
    (proc.state_dir / "secrets" / "live-studio.key").write_text(KEY + "\n")
    await asyncio.to_thread(proc.start)
    try:
        yield Node(proc)
    finally:
        await asyncio.to_thread(proc.stop)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_live_clip(tmp_path_factory.mktemp("live") / "long.mp4", seconds=60.0, fps=FPS)


def ingested(node: Node) -> list[dict[str, Any]]:
    """The daemon's ``live recording ingested`` log entries, over every run in its log."""
    return [
        json.loads(line)
        for line in node.proc.logs().splitlines()
        if '"live recording ingested"' in line
    ]


async def segments(url: str) -> int:
    """Segments in the live playlist at ``url`` now (0 while it is not served)."""
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        return (await r.text()).count("#EXTINF:") if r.status == 200 else 0


async def viewer(url: str) -> asyncio.subprocess.Process:
    """ffmpeg reading the live playlist (copying, discarding), its warnings on stderr."""
    return await asyncio.create_subprocess_exec(
        ffmpeg_path(),
        *("-hide_banner", "-loglevel", "warning", "-nostdin", "-i", url),
        *("-map", "0", "-c", "copy", "-f", "null", "-"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill", "term"])
async def test_a_restart_mid_stream_keeps_the_recording_and_takes_the_publisher_again(
    node: Node, long_clip: Path, sig: signal.Signals
) -> None:
    pub = await publish(node.rtmp(KEY), long_clip)
    async with stopping(pub):
        await until(lambda: connected(node, "studio"), timeout_s=30, step_s=0.05)
        since = time.monotonic()
        url = node.live_url("studio")  # one token: the test's probes and the viewer are one
        await until(lambda: segments(url), timeout_s=30, step_s=0.2)
        watch = await viewer(url)
        async with stopping(watch):
            await until(lambda: _at_least(segments(url), 4), timeout_s=30, step_s=0.2)
            status = (await node.status())["studio"]
            latency = status["latency_s"]
            assert latency is not None, status
            assert 0 < latency < 10, status
            sent = (time.monotonic() - since) * FPS
            window = await window_blobs(url)
            assert window, "no live blob in the playlist"
            assert window <= await held_blobs(node)  # the window is in the store
            node.proc.proc.send_signal(sig)  # type: ignore[union-attr]
            code = await asyncio.to_thread(node.proc.proc.wait, 30)  # type: ignore[union-attr]
            node.proc.proc = None
            if sig == signal.SIGTERM:
                assert code == 0, node.proc.logs()[-3000:]
                # A clean stop ends the playlist: the viewer finishes what it has, exit 0.
                rc, err = await finish(watch, timeout_s=30)
                assert rc == 0, err
                # It ended on EXT-X-ENDLIST, not on a refused or failed reload.
                assert "reload" not in err, err
                assert "Connection refused" not in err, err
                assert "404" not in err, err
            rc, _ = await finish(pub, timeout_s=30)
            assert rc != 0  # its node went away under it
            await asyncio.to_thread(node.proc.start)
            again = await publish_from(node.rtmp(KEY), long_clip, 30)
            async with stopping(again):
                await until(lambda: connected(node, "studio"), timeout_s=30, step_s=0.1)
                await until(lambda: len(ingested(node)) == 1, timeout_s=90, step_s=0.5)
                if sig == signal.SIGKILL:
                    # The viewer of the killed node's publication ends by itself (refused, then
                    # 503 + Retry-After): no hang, and never a 404 for the configured input.
                    rc, err = await finish(watch, timeout_s=60)
                    assert "404" not in err, err
                # The new publication plays.
                got = await asyncio.to_thread(
                    decoded_frames_for, node.live_url("studio"), seconds=3
                )
                assert got >= FPS * 2, got
                status = (await node.status())["studio"]
                assert status["connected"], status
                assert status["last_recording"] == ingested(node)[0]["media_id"], status
                # The stopped publication's window left the store with it (but for what the
                # new one uses too: the same tracks make the same init segment).
                gone = window - await window_blobs(node.live_url("studio"))
                assert len(gone) >= 3, (gone, window)
                await until(lambda: _none_held(node, gone), timeout_s=30, step_s=0.5)
    entry = ingested(node)[0]
    assert entry["input"] == "studio"
    assert entry["recovered"] is (sig == signal.SIGKILL), entry
    frames = await asyncio.to_thread(decoded_frames, node.media_url(entry["media_id"]))
    # At most the segment in flight is lost (a segment and one GOP, in frames).
    assert frames["0"] >= sent - (SEGMENT_S + GOP_S) * FPS, (frames, sent)
    assert frames["1"] > 0, frames


async def publish_from(url: str, clip: Path, start_s: float) -> asyncio.subprocess.Process:
    """:func:`tests.test_live.publish` from ``start_s`` into the clip (other frames: other
    segments; the same tracks: the same init segment)."""
    return await asyncio.create_subprocess_exec(
        ffmpeg_path(),
        *("-hide_banner", "-loglevel", "error", "-nostdin", "-re", "-ss", str(start_s)),
        *("-i", str(clip), "-c", "copy", "-f", "flv", url),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


async def window_blobs(url: str) -> set[str]:
    """Content ids of the init and segments the live playlist at ``url`` names now."""
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        text = await r.text()
    return set(re.findall(r"b/(b[a-z2-7]{58})\.m(?:p4|4s)", text))


async def held_blobs(node: Node) -> set[str]:
    """Blobs the node's store holds now, as the coordinator's inventory sync sees them."""
    client = NodeApiClient(node.base, node.secret("api_token"))
    state: dict[str, str] = {}
    since = 0
    try:
        while True:
            ans = await client.call("GET", "/api/v1/inventory", params={"since": since})
            assert ans.status == 200, ans
            for item in ans.body["items"]:
                if item["kind"] == "blob":
                    state[item["id"]] = item["state"]
            since = ans.body["next_since"]
            if not ans.body["more"]:
                return {cid for cid, st in state.items() if st == "present"}
    finally:
        await client.close()


async def _none_held(node: Node, blobs: set[str]) -> bool:
    return not blobs & await held_blobs(node)


async def _at_least(n: Any, k: int) -> bool:
    return bool(await n >= k)


def decoded_frames_for(url: str, *, seconds: float) -> int:
    """Video frames ``ffmpeg -xerror`` decodes from the first ``seconds`` of ``url``."""
    import subprocess

    out = subprocess.run(  # noqa: S603
        [ffmpeg_path(), "-hide_banner", "-nostdin", "-xerror", "-i", url, "-t", str(seconds)]
        + ["-map", "0:v", "-f", "framecrc", "-"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return sum(1 for line in out.stdout.splitlines() if line[:1].isdigit())


async def test_latency_is_null_when_not_live_and_the_heartbeat_shows_the_rtmp_input(
    tmp_path: Path, long_clip: Path
) -> None:
    fake = FakeCoordinator()
    fake.heartbeat_interval_s = 3600  # only the early heartbeats of a connect or drop come
    url = await fake.start()
    cfg = live_config(free_port())
    cfg["coordinator"] = {"url": url}
    proc = PeerdProcess(tmp_path / "node", config=cfg)
    await asyncio.to_thread(proc.init)
    (proc.state_dir / "secrets" / "live-studio.key").write_text(KEY + "\n")
    await asyncio.to_thread(proc.start)
    node = Node(proc)

    def live_in_heartbeats() -> list[bool]:
        return [
            bool(r.payload["live"][0]["connected"])
            for r in fake.of_kind("heartbeat")
            if r.payload.get("live")
        ]

    try:
        await fake.wait_for(lambda: len(fake.of_kind("register")) == 1, 30)
        status = (await node.status())["studio"]
        assert status["connected"] is False
        assert status["latency_s"] is None
        pub = await publish(node.rtmp(KEY), long_clip)
        async with stopping(pub):
            started = time.monotonic()
            await fake.wait_for(lambda: True in live_in_heartbeats(), 30)
            connected_after = time.monotonic() - started
            first = next(
                r.payload["live"][0]
                for r in fake.of_kind("heartbeat")
                if r.payload.get("live") and r.payload["live"][0]["connected"]
            )
            assert first["protocol"] == "rtmp", first
            await until(lambda: segments(node.live_url("studio")), timeout_s=30, step_s=0.2)
            status = (await node.status())["studio"]
            assert status["latency_s"] is not None, status
            assert 0 < status["latency_s"] < 10, status
            panel = await dashboard(node)
            assert panel["latency_s"] is not None, panel
            pub.send_signal(signal.SIGINT)  # ffmpeg stops and unpublishes
            await pub.wait()
            stopped = time.monotonic()
            await fake.wait_for(lambda: live_in_heartbeats()[-1] is False, 30)
            dropped_after = time.monotonic() - stopped
        await until(lambda: _not_live(node), timeout_s=30, step_s=0.2)
        assert (await dashboard(node))["latency_s"] is None
        assert not fake.refused  # every report fit the NodeReport schema
        # Upper bounds for a hang only (a busy host): a few seconds are expected.
        assert connected_after < 20, connected_after
        assert dropped_after < 20, dropped_after
    finally:
        await asyncio.to_thread(proc.stop)
        await fake.close()


async def dashboard(node: Node) -> dict[str, Any]:
    """The ``studio`` row of the dashboard's Live panel (``/ui/api/live``, the operator's token)."""
    auth = {"Authorization": f"Bearer {node.secret('admin_token')}"}
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{node.base}/ui/api/live", headers=auth) as r,
    ):
        assert r.status == 200, await r.text()
        doc = await r.json()
    row: dict[str, Any] = doc["inputs"][0]
    return row


async def _not_live(node: Node) -> bool:
    status = (await node.status())["studio"]
    return not status["connected"] and status["latency_s"] is None
