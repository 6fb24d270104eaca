"""Tiny HLS test media made by the ffmpeg CLI, imported into a node's store and catalog.

Used by the HLS delivery tests and by ``scripts/bench/serve_bench.py`` (which imports the bench
tree nginx serves, so both servers send the same bytes). The import reads an ffmpeg-written media
playlist (one rendition, muxed audio+video), stores the init and media segments as blobs, builds a
manifest with ``peerd.core.manifest`` and inserts the catalog rows the HTTP layer reads.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from peerd.catalog.media import record_media
from peerd.core.manifest import Manifest, Rendition, Segment, encode, media_id_of
from peerd.runtime import Runtime

TIMESCALE = 90000


@dataclass(frozen=True)
class HlsDir:
    """An ffmpeg-written HLS rendition: its playlist, init segment (fMP4) and segment files."""

    playlist: Path
    container: str
    init: Path | None
    segments: tuple[tuple[Path, int], ...]  # (file, duration in TIMESCALE ticks)


def make_hls(out: Path, container: str, *, seconds: int = 6, size: str = "320x240") -> Path:
    """Write a tiny A/V HLS rendition with ffmpeg (lavfi sources); returns the playlist path."""
    out.mkdir(parents=True, exist_ok=True)
    ext = "m4s" if container == "fmp4" else "ts"
    cmd = [
        "ffmpeg", "-nostdin", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"testsrc2=size={size}:rate=25",
        "-f", "lavfi", "-i", "sine=frequency=440:sample_rate=48000",
        "-t", str(seconds),
        "-c:v", "libx264", "-profile:v", "main", "-preset", "veryfast", "-pix_fmt", "yuv420p",
        "-g", "50", "-keyint_min", "50", "-sc_threshold", "0", "-threads", "1",
        "-c:a", "aac", "-b:a", "64k",
        "-f", "hls", "-hls_time", "2", "-hls_playlist_type", "vod",
        "-hls_segment_type", "fmp4" if container == "fmp4" else "mpegts",
        "-hls_segment_filename", str(out / f"seg_%03d.{ext}"),
    ]  # fmt: skip
    if container == "fmp4":
        cmd += ["-hls_fmp4_init_filename", "init.mp4"]
    cmd.append(str(out / "index.m3u8"))
    subprocess.run(cmd, check=True, timeout=120)  # noqa: S603
    return out / "index.m3u8"


def read_hls(playlist: Path) -> HlsDir:
    """Parse an ffmpeg-written VOD media playlist."""
    init: Path | None = None
    segs: list[tuple[Path, int]] = []
    duration: int | None = None
    for line in playlist.read_text().splitlines():
        if line.startswith("#EXT-X-MAP:"):
            uri = line.split('URI="', 1)[1].split('"', 1)[0]
            init = playlist.parent / uri
        elif line.startswith("#EXTINF:"):
            secs = Decimal(line[len("#EXTINF:") :].split(",", 1)[0])
            duration = int(secs * TIMESCALE)
        elif line and not line.startswith("#"):
            if duration is None:
                raise ValueError(f"{playlist}: segment {line} without EXTINF")
            segs.append((playlist.parent / line, duration))
            duration = None
    container = "fmp4" if init is not None else "ts"
    return HlsDir(playlist, container, init, tuple(segs))


def _probe(first: Path) -> tuple[str, int, int]:
    out = subprocess.run(  # noqa: S603
        [  # noqa: S607
            "ffprobe",
            "-v",
            "error",
            "-show_entries",
            "stream=codec_type,codec_name,profile,level,width,height",
            "-of",
            "json",
            str(first),
        ],  # fmt: skip
        check=True,
        capture_output=True,
        timeout=60,
    )
    codecs: list[str] = []
    width = height = 0
    profiles = {"Baseline": 0x42, "Constrained Baseline": 0x42, "Main": 0x4D, "High": 0x64}
    for s in json.loads(out.stdout)["streams"]:
        if s.get("codec_name") == "h264":
            p = profiles.get(s.get("profile", ""), 0x64)
            flags = 0xC0 if s.get("profile") == "Constrained Baseline" else 0
            codecs.append(f"avc1.{p:02x}{flags:02x}{int(s.get('level', 30)):02x}")
            width, height = int(s["width"]), int(s["height"])
        elif s.get("codec_name") == "aac":
            codecs.append("mp4a.40.2")
    return ",".join(codecs), width, height


async def import_hls(rt: Runtime, hls: HlsDir, *, title: str = "test") -> tuple[str, Manifest]:
    """Store the blobs of ``hls``, add manifest and catalog rows; returns (media id, manifest)."""
    probe_target = hls.segments[0][0]
    if hls.init is not None:
        # An fMP4 media segment alone has no codec parameters: probe init + first segment.
        joined = hls.segments[0][0].with_suffix(".probe.mp4")
        await asyncio.to_thread(
            joined.write_bytes, hls.init.read_bytes() + hls.segments[0][0].read_bytes()
        )
        probe_target = joined
    codecs, width, height = await asyncio.to_thread(_probe, probe_target)
    init_cid: str | None = None
    if hls.init is not None:
        init_cid = await rt.store.put(await asyncio.to_thread(hls.init.read_bytes), kind="init")
    segments: list[Segment] = []
    peak = 0
    total_bits = 0
    for path, ticks in hls.segments:
        data = await asyncio.to_thread(path.read_bytes)
        cid = await rt.store.put(data, kind="segment")
        segments.append(Segment(duration=ticks, cid=cid))
        peak = max(peak, int(len(data) * 8 * TIMESCALE / max(ticks, 1)))
        total_bits += len(data) * 8
    total_ticks = sum(s.duration for s in segments)
    rendition = Rendition(
        id="v0",
        kind="video",
        codecs=codecs,
        bandwidth=peak,
        average_bandwidth=int(total_bits * TIMESCALE / total_ticks),
        timescale=TIMESCALE,
        segments=tuple(segments),
        width=width,
        height=height,
        frame_rate=None,
        init=init_cid,
    )
    manifest = Manifest(container="fmp4" if hls.init else "ts", renditions=(rendition,))
    media_id = str(media_id_of(manifest))
    async with rt.catalog.transaction() as tx:
        await record_media(tx, media_id, encode(manifest), manifest, time.time(), title=title)
    return media_id, manifest
