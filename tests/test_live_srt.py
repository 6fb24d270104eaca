"""SRT ingest end to end on a real daemon: Debian's ffmpeg publishes MPEG-TS over SRT with the
input's key as passphrase, ffmpeg plays the low-latency HLS playlist while it is live; a wrong
passphrase is refused by the handshake and publishes nothing; the listener comes back for the
next publisher, also after one that vanished. The key never reaches the daemon's log.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support.live_media import make_live_clip
from tests.support.media import ffmpeg_path
from tests.support.poll import until
from tests.support.process import PeerdProcess
from tests.test_live import FPS, Node, connected, decoded_frames, ended, finish, playlist, stopping

pytestmark = pytest.mark.slow

KEY = "srt-studio-key-" + "s" * 30


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def udp_socket(port: int) -> str | None:
    """The inode of the UDP socket bound to ``port`` on this host, if any (``/proc/net/udp``)."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port:
            return fields[9]
    return None


@pytest.fixture
def port() -> int:
    return free_udp_port()


@pytest.fixture
async def node(tmp_path: Path, port: int) -> AsyncIterator[Node]:
    proc = PeerdProcess(
        tmp_path / "node",
        config={
            "live": {
                "inputs": [{"name": "studio"}],
                "rtmp_listen": "127.0.0.1:0",
                "srt_listen": f"127.0.0.1:{port}",
                "idle_timeout_s": 3.0,
                "segment_s": 1.0,
                "part_s": 0.5,
            },
        },
    )
    await asyncio.to_thread(proc.init)
    (proc.state_dir / "secrets" / "live-studio.key").write_text(KEY + "\n")
    await asyncio.to_thread(proc.start)
    try:
        yield Node(proc)
    finally:
        await asyncio.to_thread(proc.stop)


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_live_clip(tmp_path_factory.mktemp("srt") / "clip.mp4", seconds=8.0, fps=FPS)


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_live_clip(tmp_path_factory.mktemp("srt") / "long.mp4", seconds=40.0, fps=FPS)


async def publish_srt(port: int, passphrase: str, clip: Path) -> asyncio.subprocess.Process:
    """ffmpeg publishing ``clip`` in real time as MPEG-TS over SRT, copying its streams."""
    return await asyncio.create_subprocess_exec(
        ffmpeg_path(),
        *("-hide_banner", "-loglevel", "error", "-nostdin", "-re", "-i", str(clip)),
        *("-c", "copy", "-f", "mpegts", f"srt://127.0.0.1:{port}?passphrase={passphrase}"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )


def connects(node: Node) -> int:
    return node.proc.logs().count('"live input connected"')


async def test_an_srt_publisher_plays_live_and_a_wrong_passphrase_is_refused(
    node: Node, clip: Path, long_clip: Path, port: int
) -> None:
    """Publish over SRT and play LL-HLS while live; when the publisher ends, the listener is
    back: a wrong passphrase fails the handshake and publishes nothing, the right one
    publishes again; a publisher killed mid-stream ends its publication."""
    await until(lambda: udp_socket(port) is not None, timeout_s=30, step_s=0.1)
    first_listener = udp_socket(port)
    pub = await publish_srt(port, KEY, clip)
    async with stopping(pub):
        await until(lambda: playlist(node, "studio"), timeout_s=30, step_s=0.2)
        status = (await node.status())["studio"]
        assert status["connected"], status
        assert status["protocol"] == "rtmp", status  # SRT arrives through the node's own RTMP
        assert any(c.startswith("avc1.") for c in status["codecs"]), status
        frames = await asyncio.to_thread(decoded_frames, node.live_url("studio"))
        rc, err = await finish(pub)
        assert rc == 0, err
    assert frames["0"] >= FPS * 4, frames  # joined after the start: most of 8 s
    assert frames["1"] > 0, frames
    await until(lambda: ended(node, "studio"), timeout_s=30, step_s=0.2)
    assert not await connected(node, "studio")

    # a new listener, for the next publisher
    await until(lambda: udp_socket(port) not in (None, first_listener), timeout_s=30, step_s=0.1)
    before = connects(node)
    rc, err = await finish(await publish_srt(port, "not-the-key-at-all", clip), timeout_s=30)
    assert rc != 0, err
    assert not await connected(node, "studio")
    assert connects(node) == before

    pub = await publish_srt(port, KEY, clip)
    async with stopping(pub):
        await until(lambda: connected(node, "studio"), timeout_s=30, step_s=0.2)
        rc, err = await finish(pub)
        assert rc == 0, err
    await until(lambda: not_connected(node), timeout_s=30, step_s=0.2)
    assert connects(node) == before + 1

    # a publisher that vanishes: SRT notices (peer idle timeout), the publication ends cleanly
    # and the listener comes back once more
    listener = udp_socket(port)
    pub = await publish_srt(port, KEY, long_clip)
    async with stopping(pub):
        await until(lambda: connected(node, "studio"), timeout_s=30, step_s=0.2)
        pub.kill()
        await pub.wait()
    await until(lambda: ended(node, "studio"), timeout_s=60, step_s=0.2)
    assert not await connected(node, "studio")
    await until(lambda: udp_socket(port) not in (None, listener), timeout_s=30, step_s=0.1)
    assert KEY not in node.proc.logs()


async def not_connected(node: Node) -> bool:
    return not await connected(node, "studio")
