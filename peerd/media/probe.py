"""Probe an input file with PyAV: what it holds and whether it can be remuxed as it is.

Every failure is a `MediaError` whose message names the file and the reason (empty file, not a
media file, truncated, no video or audio stream, unsupported codec). Every audio stream and every
text subtitle stream is listed with its language and disposition; a stream peerd cannot package
(a bitmap subtitle, a stream without a decoder) is named in `SourceInfo.warnings`, never dropped
without a word.
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
TEXT_SUBTITLES = frozenset({"subrip", "srt", "ass", "ssa", "mov_text", "webvtt", "text"})


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
    """An audio stream."""

    index: int
    codec: str
    profile: str | None
    sample_rate: int
    channels: int
    bit_rate: int | None
    config: bool = True
    """Whether the stream carries its decoder configuration out of band (AAC in MPEG-TS does
    not: ADTS headers in every frame, which an MP4 sample entry cannot take as they are)."""
    language: str | None = None
    title: str | None = None
    default: bool = False


@dataclass(frozen=True)
class SubtitleInfo:
    """A text subtitle stream (SRT, ASS/SSA, mov_text, WebVTT)."""

    index: int
    codec: str
    language: str | None = None
    title: str | None = None
    default: bool = False
    forced: bool = False


@dataclass(frozen=True)
class SourceInfo:
    """What `probe` found, plus the file identity used to notice changes during ingest."""

    path: Path
    size: int
    mtime_ns: int
    inode: int
    duration: float
    bit_rate: int | None
    video: VideoInfo | None
    """None for an audio-only file."""
    audio: AudioInfo | None
    """The first audio stream: the one muxed into the video renditions."""
    audios: tuple[AudioInfo, ...] = ()
    """Every audio stream with a decoder, in file order (`audio` first)."""
    subtitles: tuple[SubtitleInfo, ...] = ()
    warnings: tuple[str, ...] = ()
    """Streams of the file that are not packaged, and why."""

    def can_remux(self) -> bool:
        """True if the video can be packaged without re-encoding (H.264/HEVC, 8/10-bit 4:2:0)."""
        v = self.video
        if v is None:
            return False
        return v.codec in REMUX_VIDEO and (v.pix_fmt or "yuv420p").startswith(
            ("yuv420p", "yuvj420p")
        )

    def can_copy_audio(self, container: str, audio: AudioInfo | None = None) -> bool:
        """True if the audio (`audio`, or the first stream) can be copied as it is into
        `container`."""
        a = self.audio if audio is None else audio
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
        video = _video_info(path, c)
        streams, warnings = _streams(c)
        subtitles = tuple(x for x in streams if isinstance(x, SubtitleInfo))
        sound = tuple(x for x in streams if isinstance(x, AudioInfo))
        if video is None and not sound:
            raise MediaError(f"{path}: no video or audio stream", path=str(path))
        duration = 0.0
        if c.duration is not None:
            duration = c.duration / av.time_base
        else:
            first = c.streams.video[0] if video is not None else c.streams.audio[0]
            if first.duration is not None and first.time_base is not None:
                duration = float(first.duration * first.time_base)
        return SourceInfo(
            path=path,
            size=size,
            mtime_ns=mtime_ns,
            inode=inode,
            duration=duration,
            bit_rate=c.bit_rate or None,
            video=video,
            audio=sound[0] if sound else None,
            audios=sound,
            subtitles=subtitles,
            warnings=warnings,
        )


def _video_info(path: Path, c: av.container.InputContainer) -> VideoInfo | None:
    """The first video stream, None if there is none; MediaError if it cannot be decoded."""
    # Cover art (an attached picture) is not a video stream.
    streams = [s for s in c.streams.video if not s.disposition & av.stream.Disposition.attached_pic]
    if not streams:
        return None
    vstreams = [s for s in streams if s.codec_context is not None]
    if not vstreams:
        raise MediaError(
            f"{path}: unsupported video codec (no decoder for stream #{streams[0].index})",
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
    return VideoInfo(
        index=vs.index,
        codec=cc.name,
        width=cc.width,
        height=cc.height,
        pix_fmt=cc.pix_fmt,
        frame_rate=Fraction(rate) if rate else None,
        bit_rate=cc.bit_rate or None,
    )


def _tag(s: av.stream.Stream, key: str) -> str | None:
    value = s.metadata.get(key) or None
    return value if value != "und" else None


def _streams(
    c: av.container.InputContainer,
) -> tuple[list[AudioInfo | SubtitleInfo], tuple[str, ...]]:
    """Audio and text subtitle streams in file order, and a warning per stream left out."""
    out: list[AudioInfo | SubtitleInfo] = []
    warnings: list[str] = []
    for a in c.streams.audio:
        ac = a.codec_context
        if ac is None:
            warnings.append(f"audio stream #{a.index} skipped: no decoder for its codec")
            continue
        out.append(
            AudioInfo(
                index=a.index,
                codec=ac.name,
                profile=ac.profile,
                sample_rate=ac.sample_rate,
                channels=ac.channels,
                bit_rate=ac.bit_rate or None,
                config=bool(ac.extradata),
                language=_tag(a, "language"),
                title=_tag(a, "title"),
                default=bool(a.disposition & av.stream.Disposition.default),
            )
        )
    for s in c.streams.subtitles:
        name = s.codec_context.name if s.codec_context is not None else "unknown"
        if name not in TEXT_SUBTITLES:
            warnings.append(
                f"subtitle stream #{s.index} ({name}) skipped: bitmap subtitles cannot "
                "become WebVTT"
            )
            continue
        out.append(
            SubtitleInfo(
                index=s.index,
                codec=name,
                language=_tag(s, "language"),
                title=_tag(s, "title"),
                default=bool(s.disposition & av.stream.Disposition.default),
                forced=bool(s.disposition & av.stream.Disposition.forced),
            )
        )
    return out, tuple(warnings)
