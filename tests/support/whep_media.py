"""Tiny H.264 + AAC fMP4 media for WebRTC tests and benchmarks.

:func:`make_hls` runs the ffmpeg CLI (lavfi test sources, so no input files) to cut a short
clip into an fMP4 HLS rendition; :func:`add_media` stores its init and media segments as blobs,
builds the canonical :class:`~peerd.core.manifest.Manifest` and inserts the catalog rows (media,
renditions, segments) the way ingest does, so the WHEP code reads exactly what a node holds.
:func:`sign_viewers` gives a node its viewer signing key (without one every viewer is refused)
and :func:`whep_url` an endpoint URL with a token.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from peerd.catalog.media import record_media
from peerd.core import tokens
from peerd.core.ids import Cid
from peerd.core.manifest import Manifest, Rendition, Segment, encode, media_id_of
from peerd.runtime import Runtime

TIMESCALE = 90_000
VIEWER_KEY = b"test-viewer-signing-key-".ljust(32, b"x")


def sign_viewers(state_dir: Path) -> None:
    """Write :data:`VIEWER_KEY` as the secret ``hls_signing_key`` of the node in ``state_dir``."""
    secrets = state_dir / "secrets"
    secrets.mkdir(parents=True, exist_ok=True)
    (secrets / "hls_signing_key").write_bytes(VIEWER_KEY)


def whep_url(base_url: str, media_id: str, path: str = "/whep/", ttl_s: int = 3600) -> str:
    """``<base_url><path><media_id>?token=...`` with a ``whep`` token signed by VIEWER_KEY."""
    token = tokens.mint(VIEWER_KEY, media_id, "whep", int(time.time()) + ttl_s)
    return f"{base_url}{path}{media_id}?token={token}"


@dataclass(frozen=True)
class HlsClip:
    """An fMP4 HLS rendition on disk: init segment, media segments, their durations."""

    init: Path | None
    segments: tuple[Path, ...]
    durations: tuple[float, ...]
    width: int
    height: int
    fps: int


def make_hls(
    out_dir: Path,
    *,
    seconds: float = 6.0,
    width: int = 320,
    height: int = 240,
    fps: int = 25,
    segment_seconds: int = 2,
    bframes: int = 3,
    audio: bool = True,
    video_bitrate: int | None = None,
    container: str = "fmp4",
    profile: str | None = None,
) -> HlsClip:
    """Encode a test pattern (and a tone) to fMP4 HLS with a 1 s GOP (blocking; needs ffmpeg).

    ``video_bitrate`` (bits/s) encodes at a constant rate (x264 CBR with filler), so benchmarks
    send the packet rate of real content rather than of a test pattern that compresses to nothing.
    ``profile`` is x264's H.264 profile (``main``, ``high``); x264 picks High by default.
    """
    ffmpeg = shutil.which("ffmpeg")
    if ffmpeg is None:
        raise RuntimeError("ffmpeg is required to build test media (apt install ffmpeg)")
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [ffmpeg, "-hide_banner", "-loglevel", "error", "-y"]
    cmd += ["-f", "lavfi", "-i", f"testsrc2=size={width}x{height}:rate={fps}:duration={seconds}"]
    if audio:
        cmd += ["-f", "lavfi", "-i", f"sine=frequency=440:sample_rate=48000:duration={seconds}"]
    cmd += ["-c:v", "libx264", "-preset", "veryfast", "-pix_fmt", "yuv420p"]
    cmd += ["-g", str(fps), "-keyint_min", str(fps), "-sc_threshold", "0", "-bf", str(bframes)]
    if profile is not None:
        cmd += ["-profile:v", profile]
    if video_bitrate is not None:
        rate = str(video_bitrate)
        cmd += ["-b:v", rate, "-minrate", rate, "-maxrate", rate, "-bufsize", str(video_bitrate)]
        cmd += ["-x264-params", "nal-hrd=cbr"]
    if audio:
        cmd += ["-c:a", "aac", "-b:a", "64k", "-ac", "2"]
    cmd += ["-f", "hls", "-hls_time", str(segment_seconds), "-hls_playlist_type", "vod"]
    ext = "m4s" if container == "fmp4" else "ts"
    if container == "fmp4":
        cmd += ["-hls_segment_type", "fmp4", "-hls_fmp4_init_filename", "init.mp4"]
    else:
        cmd += ["-hls_segment_type", "mpegts"]
    cmd += ["-hls_segment_filename", str(out_dir / f"seg%03d.{ext}"), str(out_dir / "index.m3u8")]
    subprocess.run(cmd, check=True, timeout=120)  # noqa: S603
    playlist = (out_dir / "index.m3u8").read_text()
    durations = tuple(float(d) for d in re.findall(r"#EXTINF:([0-9.]+),", playlist))
    names = [ln for ln in playlist.splitlines() if ln.endswith(f".{ext}")]
    return HlsClip(
        init=out_dir / "init.mp4" if container == "fmp4" else None,
        segments=tuple(out_dir / n for n in names),
        durations=durations,
        width=width,
        height=height,
        fps=fps,
    )


def _avc1(init: bytes) -> str:
    """``avc1.PPCCLL`` from the avcC box of an init segment."""
    at = init.find(b"avcC")
    if at < 0:
        raise ValueError("init segment has no avcC box")
    return "avc1." + init[at + 5 : at + 8].hex()


def _avc1_annexb(segment: bytes) -> str:
    """``avc1.PPCCLL`` from the first SPS of an Annex B stream (MPEG-TS segment)."""
    at = segment.find(b"\x00\x00\x01\x67")
    if at < 0:
        raise ValueError("segment has no SPS")
    return "avc1." + segment[at + 4 : at + 7].hex()


async def add_media(rt: Runtime, clip: HlsClip, *, title: str = "test clip") -> Cid:
    """Store the clip's blobs and catalog rows; returns the media id."""
    init_bytes = await asyncio.to_thread(clip.init.read_bytes) if clip.init else None
    init_cid = await rt.store.put(init_bytes, kind="init") if init_bytes else None
    segs: list[Segment] = []
    peak = 1
    for path, dur in zip(clip.segments, clip.durations, strict=True):
        data = await asyncio.to_thread(path.read_bytes)
        cid = await rt.store.put(data, kind="segment")
        segs.append(Segment(duration=round(dur * TIMESCALE), cid=cid))
        peak = max(peak, int(len(data) * 8 / max(dur, 0.001)))
    first = await asyncio.to_thread(clip.segments[0].read_bytes)
    if init_bytes is not None:
        has_audio = b"mp4a" in init_bytes
        avc = _avc1(init_bytes)
    else:
        has_audio = b"\xff\xf1" in first  # an ADTS (AAC) frame header
        avc = _avc1_annexb(first)
    codecs = avc + (",mp4a.40.2" if has_audio else "")
    rendition = Rendition(
        id="v0",
        kind="video",
        codecs=codecs,
        bandwidth=peak,
        timescale=TIMESCALE,
        segments=tuple(segs),
        width=clip.width,
        height=clip.height,
        frame_rate=(clip.fps, 1),
        init=init_cid,
    )
    manifest = Manifest(container="fmp4" if init_cid else "ts", renditions=(rendition,))
    media_id = media_id_of(manifest)
    async with rt.catalog.transaction() as tx:
        await record_media(tx, media_id, encode(manifest), manifest, time.time(), title=title)
    return media_id
