"""MPEG-TS segments join as one stream: continuity counters carry on across segments.

A player reads an HLS rendition as one transport stream; a counter jump at a segment join makes
strict demuxers (ffmpeg ``-xerror``) drop the frame in flight as corrupt. Checked three ways:
the counters of every rendition's segments, concatenated, read packet by packet here; ffmpeg
``-xerror`` decoding those concatenations (top rendition remuxed and transcoded, an eager ladder
rung, the audio-only rendition, and an on-demand rung produced out of order); and a real daemon
whose every media playlist ffmpeg ``-xerror`` decodes over HTTP. hls.js plays them in Chromium.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from hls_node import run_node
from test_hls_browser import page_server  # noqa: F401 - the fixture, shared

from peerd.catalog import Catalog
from peerd.core import tokens
from peerd.errors import MediaError
from peerd.media.ingest import Ingestor
from peerd.media.mpegts import pad_continuity
from peerd.media.options import PackagingOptions, Rung
from peerd.media.package import package
from peerd.store import BlobStore
from tests.support.browser import Browser
from tests.support.media import MemorySink, export_hls, ffmpeg_path, make_media
from tests.support.process import PeerdProcess, run_cli

PACKET = 188


def _packets(data: bytes) -> Iterator[tuple[int, bool, int]]:
    """(PID, has payload, continuity counter) of each packet."""
    assert len(data) % PACKET == 0
    for off in range(0, len(data), PACKET):
        assert data[off] == 0x47, off
        pid = ((data[off + 1] & 0x1F) << 8) | data[off + 2]
        yield pid, bool(data[off + 3] & 0x10), data[off + 3] & 0x0F


def assert_continuous(segments: list[bytes]) -> None:
    """Every PID's counter grows by one per payload packet across the whole concatenation
    (payload-less packets repeat it), and each segment starts it at 0: the segment before ended
    a whole cycle, whichever it was."""
    last: dict[int, int] = {}
    for seq, seg in enumerate(segments):
        seen: set[int] = set()
        for pid, payload, cc in _packets(seg):
            if pid == 0x1FFF:
                continue
            prev = last.get(pid, 15)
            want = (prev + 1) % 16 if payload else prev
            assert cc == want, f"segment {seq}: PID {pid:#x} counter {cc}, expected {want}"
            if payload and pid not in seen:
                assert cc == 0, f"segment {seq}: PID {pid:#x} starts at {cc}"
            seen.add(pid)
            last[pid] = cc
        for pid in seen:
            assert last[pid] == 15, f"segment {seq}: PID {pid:#x} ends at {last[pid]}"


def ffmpeg_xerror(source: str) -> tuple[int, str]:
    """ffmpeg ``-xerror`` decoding every stream of `source`: (exit code, stderr)."""
    res = subprocess.run(  # noqa: S603 - fixed argument list
        [ffmpeg_path(), "-nostdin", "-v", "error", "-xerror", "-i", source]
        + ["-map", "0", "-f", "null", "-"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return res.returncode, res.stderr


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_media(tmp_path_factory.mktemp("media") / "clip.mp4", seconds=5.0, size=(320, 240))


@pytest.mark.parametrize("transcode", ["auto", "always"])
async def test_every_rendition_joins_as_one_stream(
    clip: Path, tmp_path: Path, transcode: Literal["auto", "always"]
) -> None:
    opts = PackagingOptions(
        container="ts",
        segment_seconds=1.0,
        transcode=transcode,
        ladder=(Rung(120), Rung(96, on_demand=True)),
        audio_only=True,
    )
    cat = await Catalog.open(tmp_path / "catalog.sqlite3")
    store = BlobStore(tmp_path / "blobs", cat)
    await store.open()
    try:
        ing = Ingestor(cat, store, opts)
        res = await ing.ingest(clip)
        assert res.media_id is not None, res.error
        m = await ing.load_manifest(res.media_id)
        assert {r.id for r in m.renditions} == {"v240", "v120", "v96", "audio"}
        lazy = m.rendition("v96")
        assert lazy.on_demand
        # On-demand segments come out of order (a viewer seeks): each must still fit its place.
        made = {
            seq: await ing.produce_segment(res.media_id, "v96", seq)
            for seq in reversed(range(len(lazy.segments)))
        }
        for r in m.renditions:
            assert len(r.segments) >= 4, r.id
            cids = [made[seq] if r.on_demand else s.cid for seq, s in enumerate(r.segments)]
            segs = [store.path_for(c).read_bytes() for c in cids if c is not None]
            assert len(segs) == len(r.segments), r.id
            assert_continuous(segs)
            joined = tmp_path / f"{r.id}.ts"
            joined.write_bytes(b"".join(segs))
            code, err = await asyncio.to_thread(ffmpeg_xerror, str(joined))
            assert (code, err) == (0, ""), (r.id, err)
    finally:
        await cat.close()


def test_padding_keeps_the_elementary_streams(tmp_path: Path) -> None:
    """Low-rate mono audio, one frame per PES, puts every audio PES in one packet that starts
    with its PES header and random-access flag (only the PES itself can be cut); a PCR leads the
    video: padding keeps every demuxed packet's bytes, gives whole cycles, and padding twice
    changes nothing."""
    src = tmp_path / "in.ts"
    subprocess.run(  # noqa: S603 - fixed argument list
        [ffmpeg_path(), "-nostdin", "-v", "error", "-y"]
        + ["-f", "lavfi", "-i", "testsrc2=size=64x48:rate=10:duration=0.7"]
        + ["-f", "lavfi", "-i", "sine=sample_rate=16000:duration=0.7"]
        + ["-c:v", "libx264", "-c:a", "aac", "-b:a", "8k", "-ac", "1"]
        + ["-fflags", "+bitexact", "-pes_payload_size", "0", "-f", "mpegts", str(src)],
        check=True,
    )
    data = src.read_bytes()
    # The case meant: audio to pad, and every audio packet (PID 0x101) starts a PES.
    offsets = range(0, len(data), PACKET)
    starts = [data[o + 1] & 0x40 for o in offsets if data[o + 1] & 0x1F == 1 and data[o + 2] == 1]
    assert len(starts) % 16
    assert all(starts)
    padded = pad_continuity(data)
    assert len(padded) > len(data)
    assert pad_continuity(padded) == padded
    assert_continuous([padded, padded])
    out = tmp_path / "out.ts"
    out.write_bytes(padded)

    def frames(path: Path) -> str:
        res = subprocess.run(  # noqa: S603 - fixed argument list
            [ffmpeg_path(), "-nostdin", "-v", "error", "-i", str(path)]
            + ["-map", "0", "-c", "copy", "-f", "framemd5", "-"],
            capture_output=True,
            text=True,
            check=True,
        )
        return res.stdout

    assert frames(src) == frames(out)
    assert len(frames(out).splitlines()) > 10


def test_what_is_not_a_fresh_muxers_segment_is_refused() -> None:
    """Not whole packets, or counters that did not start at 0: an error, never wrong bytes."""
    with pytest.raises(MediaError, match="not whole packets"):
        pad_continuity(b"\x47" + bytes(200))
    pat = (
        bytes.fromhex("474000")
        + bytes([0x10 | 5])
        + bytes.fromhex("0000b00d0001c100000001f0002ab104b2")
    )
    pat += b"\xff" * (PACKET - len(pat))
    with pytest.raises(MediaError, match="did not start at 0"):
        pad_continuity(pat)
    assert_continuous([pad_continuity(pat[:3] + b"\x10" + pat[4:])])


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as r:  # noqa: S310 - loopback test URL
        data: bytes = r.read()
        return data


def test_ffmpeg_xerror_plays_every_rendition_from_a_daemon(clip: Path, tmp_path: Path) -> None:
    media = {
        "container": "ts",
        "segment_seconds": 1.0,
        "transcode": "always",
        "ladder": [{"height": 120}, {"height": 96, "on_demand": True}],
        "audio_only": True,
    }
    daemon = PeerdProcess(tmp_path / "node", config={"webrtc": {"enabled": False}, "media": media})
    daemon.start()
    try:
        out = run_cli(
            "-c", str(daemon.state_dir / "test.toml"), "ingest", "--no-progress", "--json",
            str(clip), timeout=300,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr
        media_id = re.search(r'"media_id": "([a-z0-9]+)"', out.stdout)
        assert media_id is not None, out.stdout
        secret = (daemon.state_dir / "secrets" / "hls_signing_key").read_text()
        token = tokens.mint(
            tokens.key_from_secret(secret), media_id[1], "hls", int(time.time()) + 600
        )
        base = f"{daemon.base_url}/hls/{media_id[1]}"
        master = _get(f"{base}/master.m3u8?token={token}").decode()
        names = sorted(set(re.findall(r"([a-z0-9_-]+)\.m3u8", master)))
        assert names == ["audio", "v120", "v240", "v96"], master
        # Audio PES have a length, so ffmpeg passes a jump in the audio-only rendition; the
        # counters are checked below for every rendition.
        decoded = {name: ffmpeg_xerror(f"{base}/{name}.m3u8?token={token}") for name in names}
        assert decoded == {name: (0, "") for name in names}
        for name in names:
            playlist = _get(f"{base}/{name}.m3u8?token={token}").decode()
            uris = [ln for ln in playlist.splitlines() if ln and not ln.startswith("#")]
            assert len(uris) >= 4, playlist
            assert_continuous([_get(f"{base}/{u}") for u in uris])
    finally:
        daemon.stop()


@pytest.mark.timeout(120)
async def test_hlsjs_plays_padded_ts(
    clip: Path,
    tmp_path: Path,
    page_server: tuple[str, dict[str, str]],  # noqa: F811 - the fixture imported above
) -> None:
    """hls.js (its own TS demuxer) in Chromium plays the padded segments: split PES packets and
    repeated tables are ordinary MPEG-TS to it."""
    sink = MemorySink()
    opts = PackagingOptions(container="ts", segment_seconds=1.0)
    m, _ = await asyncio.to_thread(package, clip, opts, sink)
    await asyncio.to_thread(export_hls, m, sink.blobs.__getitem__, tmp_path / "hls")
    base, slot = page_server
    async with run_node(tmp_path / "node", {"ts": tmp_path / "hls" / "v240.m3u8"}) as node:
        slot["src"] = node.url("ts")
        async with Browser.launch(tmp_path / "profile") as browser:
            page = await browser.new_page()
            await page.goto(base.replace("127.0.0.1", "localhost") + "/player.html")
            fatal = "window.hlsErrors.filter(e => !e.endsWith(':false'))"
            await page.wait_for(
                "document.getElementById('v').currentTime >= 4"
                f" || {fatal}.length > 0 || window.mediaErrors.length > 0",
                timeout_s=60,
            )
            errors = await page.evaluate("window.hlsErrors")
            assert set(errors) <= {"mediaError:bufferSeekOverHole:false"}, errors
            assert await page.evaluate("window.mediaErrors") == []
            assert await page.evaluate("document.getElementById('v').currentTime") >= 4
            assert page.console_errors == []
