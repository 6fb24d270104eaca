"""The testbed's media library: many short two-rendition clips made by two ffmpeg runs.

One long synthetic stream is encoded once per rendition (``testsrc2``, H.264, 2 s GOPs) and cut
by ffmpeg's HLS muxer into 2 s fMP4 segments; item ``k`` is segments ``[k*n, (k+1)*n)`` of both
renditions (the init segment of a rendition is shared). Every item therefore has its own segment
blobs and its own manifest (media id), and making 40 items costs two encodes, not 80.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from peerd.core.ids import cid_of
from peerd.core.manifest import Manifest, Rendition, Segment, encode, media_id_of

TIMESCALE = 90000
RUNGS = (("v180", 320, 180, "250k"), ("v360", 640, 360, "800k"))


@dataclass(frozen=True)
class Item:
    """One media item: id, manifest bytes and its blobs (cid -> bytes)."""

    media_id: str
    manifest: Manifest
    manifest_bytes: bytes
    blobs: dict[str, bytes]
    duration_s: float

    @property
    def size(self) -> int:
        """Bytes of all its blobs (every rendition)."""
        return sum(len(b) for b in self.blobs.values())


def _encode(out: Path, name: str, w: int, h: int, rate: str, seconds: int) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    playlist = out / f"{name}.m3u8"
    if playlist.exists():
        return playlist
    cmd = [
        "ffmpeg", "-nostdin", "-loglevel", "error", "-y",
        "-f", "lavfi", "-i", f"testsrc2=size={w}x{h}:rate=25", "-t", str(seconds),
        "-c:v", "libx264", "-preset", "ultrafast", "-pix_fmt", "yuv420p",
        "-b:v", rate, "-maxrate", rate, "-bufsize", rate,
        "-g", "50", "-keyint_min", "50", "-sc_threshold", "0", "-threads", "1",
        "-f", "hls", "-hls_time", "2", "-hls_playlist_type", "vod",
        "-hls_segment_type", "fmp4", "-hls_fmp4_init_filename", f"{name}_init.mp4",
        "-hls_segment_filename", str(out / f"{name}_%05d.m4s"), str(out / f"{name}.tmp.m3u8"),
    ]  # fmt: skip
    subprocess.run(cmd, check=True, timeout=600)  # noqa: S603
    (out / f"{name}.tmp.m3u8").rename(playlist)
    return playlist


def _read(playlist: Path) -> tuple[bytes, list[tuple[bytes, int]]]:
    init = b""
    segs: list[tuple[bytes, int]] = []
    ticks = 0
    for line in playlist.read_text().splitlines():
        if line.startswith("#EXT-X-MAP:"):
            init = (playlist.parent / line.split('URI="', 1)[1].split('"', 1)[0]).read_bytes()
        elif line.startswith("#EXTINF:"):
            ticks = int(Decimal(line[8:].split(",", 1)[0]) * TIMESCALE)
        elif line and not line.startswith("#"):
            segs.append(((playlist.parent / line).read_bytes(), ticks))
    return init, segs


def _avc1(init: bytes) -> str:
    at = init.find(b"avcC")
    return "avc1." + init[at + 5 : at + 8].hex()


def make_library(workdir: Path, items: int, segments_per_item: int) -> list[Item]:
    """``items`` media items of ``segments_per_item`` 2 s segments in two renditions."""
    seconds = items * segments_per_item * 2 + 2
    rungs = []
    for name, w, h, rate in RUNGS:
        init, segs = _read(_encode(workdir, name, w, h, rate, seconds))
        rungs.append((name, w, h, init, segs))
    library = []
    for k in range(items):
        blobs: dict[str, bytes] = {}
        renditions = []
        for name, w, h, init, segs in rungs:
            init_cid = str(cid_of(init))
            blobs[init_cid] = init
            chunk = segs[k * segments_per_item : (k + 1) * segments_per_item]
            segments = []
            peak = 1
            for data, ticks in chunk:
                cid = str(cid_of(data))
                blobs[cid] = data
                segments.append(Segment(duration=ticks, cid=cid))
                peak = max(peak, int(len(data) * 8 * TIMESCALE / max(ticks, 1)))
            total = sum(t for _, t in chunk)
            renditions.append(
                Rendition(
                    id=name,
                    kind="video",
                    codecs=_avc1(init),
                    bandwidth=peak,
                    average_bandwidth=int(sum(len(d) for d, _ in chunk) * 8 * TIMESCALE / total),
                    timescale=TIMESCALE,
                    segments=tuple(segments),
                    width=w,
                    height=h,
                    frame_rate=(25, 1),
                    start=sum(t for _, t in segs[: k * segments_per_item]),
                    init=init_cid,
                )
            )
        manifest = Manifest(container="fmp4", renditions=tuple(renditions))
        library.append(
            Item(
                media_id=str(media_id_of(manifest)),
                manifest=manifest,
                manifest_bytes=encode(manifest),
                blobs=blobs,
                duration_s=segments_per_item * 2.0,
            )
        )
    return library
