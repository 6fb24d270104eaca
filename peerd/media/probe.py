"""Probe an input file with PyAV: what it holds and whether it can be remuxed as it is.

Every failure is a `MediaError` whose message names the file and the reason (empty file, not a
media file, truncated, no video stream, unsupported codec).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import av.error

from peerd.errors import MediaError

REMUX_VIDEO = frozenset({"h264", "hevc"})
REMUX_AUDIO = {"fmp4": frozenset({"aac", "opus"}), "ts": frozenset({"aac"})}


@dataclass(frozen=True)
class VideoInfo:
    """The first video stream."""

    index: int
    codec: str
    width: int
    height: int
    pix_fmt: str | None
    frame_rate: Fraction | None
    bit_rate: int | None


@dataclass(frozen=True)
class AudioInfo:
    """The first audio stream."""

    index: int
    codec: str
    profile: str | None
    sample_rate: int
    channels: int
    bit_rate: int | None
    config: bool = True
    """Whether the stream carries its decoder configuration out of band (AAC in MPEG-TS does
    not: ADTS headers in every frame, which an MP4 sample entry cannot take as they are)."""


@dataclass(frozen=True)
class SourceInfo:
    """What `probe` found, plus the file identity used to notice changes during ingest."""

    path: Path
    size: int
    mtime_ns: int
    inode: int
    duration: float
    bit_rate: int | None
    video: VideoInfo
    audio: AudioInfo | None

    def can_remux(self) -> bool:
        """True if the video can be packaged without re-encoding (H.264/HEVC, 8/10-bit 4:2:0)."""
        v = self.video
        return v.codec in REMUX_VIDEO and (v.pix_fmt or "yuv420p").startswith(
            ("yuv420p", "yuvj420p")
        )

    def can_copy_audio(self, container: str) -> bool:
        """True if the audio can be copied as it is into `container`."""
        a = self.audio
        if a is None or a.codec not in REMUX_AUDIO[container]:
            return False
        return a.config or container != "fmp4"

    @property
    def signature(self) -> str:
        """`size:mtime_ns` of the file, as the catalog records it."""
        return f"{self.size}:{self.mtime_ns}"


def file_identity(path: Path) -> tuple[int, int, int]:
    """(inode, size, mtime_ns) of a file; MediaError if it is gone."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise MediaError(f"{path}: file was removed", path=str(path)) from None
    except OSError as exc:
        raise MediaError(f"{path}: cannot read: {exc.strerror}", path=str(path)) from None
    return st.st_ino, st.st_size, st.st_mtime_ns


def open_input(path: Path) -> av.container.InputContainer:
    """Open a media file for demuxing; MediaError (naming the file) if libav cannot."""
    try:
        return av.open(str(path), "r", metadata_errors="ignore")
    except FileNotFoundError:
        raise MediaError(f"{path}: no such file", path=str(path)) from None
    except av.error.InvalidDataError:
        raise MediaError(
            f"{path}: not a media file, or truncated/corrupt (no readable container header)",
            path=str(path),
        ) from None
    except av.error.FFmpegError as exc:
        raise MediaError(f"{path}: cannot open: {exc}", path=str(path)) from None


def probe(path: Path) -> SourceInfo:
    """Inspect `path`; MediaError naming the file and the reason when it cannot be packaged."""
    if not path.exists():
        raise MediaError(f"{path}: no such file", path=str(path))
    inode, size, mtime_ns = file_identity(path)
    if not path.is_file():
        raise MediaError(f"{path}: not a regular file", path=str(path))
    if size == 0:
        raise MediaError(f"{path}: empty file (0 bytes)", path=str(path))
    with open_input(path) as c:
        vstreams = [s for s in c.streams.video if s.codec_context is not None]
        if not c.streams.video:
            raise MediaError(f"{path}: no video stream", path=str(path))
        if not vstreams:
            raise MediaError(
                f"{path}: unsupported video codec (no decoder for stream "
                f"#{c.streams.video[0].index})",
                path=str(path),
            )
        vs = vstreams[0]
        cc = vs.codec_context
        if not cc.width or not cc.height:
            raise MediaError(
                f"{path}: unsupported or unreadable video stream ({vs.codec_context.name})",
                path=str(path),
            )
        rate = vs.average_rate or vs.guessed_rate
        video = VideoInfo(
            index=vs.index,
            codec=cc.name,
            width=cc.width,
            height=cc.height,
            pix_fmt=cc.pix_fmt,
            frame_rate=Fraction(rate) if rate else None,
            bit_rate=cc.bit_rate or None,
        )
        audio = None
        astreams = [s for s in c.streams.audio if s.codec_context is not None]
        if astreams:
            a = astreams[0]
            ac = a.codec_context
            audio = AudioInfo(
                index=a.index,
                codec=ac.name,
                profile=ac.profile,
                sample_rate=ac.sample_rate,
                channels=ac.channels,
                bit_rate=ac.bit_rate or None,
                config=bool(ac.extradata),
            )
        duration = 0.0
        if c.duration is not None:
            duration = c.duration / av.time_base
        elif vs.duration is not None and vs.time_base is not None:
            duration = float(vs.duration * vs.time_base)
        return SourceInfo(
            path=path,
            size=size,
            mtime_ns=mtime_ns,
            inode=inode,
            duration=duration,
            bit_rate=c.bit_rate or None,
            video=video,
            audio=audio,
        )
