"""A publisher without a protocol: a media file's H.264/AAC/Opus, as LiveTrack/LiveFrame.

Tests of the live consumers (packager, WHEP fan-out, recorder) feed a :class:`~peerd.core.live.
LiveSink` with this instead of an RTMP or WHIP publisher, in real time or as fast as wanted.
It reads an MP4/MKV (``make_media(..., path.mp4)``): H.264 packets there are already
length-prefixed with an ``avcC`` as extradata, AAC packets raw with an AudioSpecificConfig.
"""

from __future__ import annotations

import asyncio
from fractions import Fraction
from pathlib import Path
from typing import Any

import av

from peerd.core.live import LiveFrame, LiveSink, LiveTrack

_CODECS = {"h264": "h264", "aac": "aac", "opus": "opus"}


def read_file(path: Path) -> tuple[list[LiveTrack], list[LiveFrame]]:
    """Every track and frame of ``path`` (frames in file order, i.e. interleaved decode order)."""
    tracks: list[LiveTrack] = []
    frames: list[LiveFrame] = []
    with av.open(str(path)) as c:
        streams: list[Any] = [s for s in c.streams if s.type in ("video", "audio")]
        index: dict[int, int] = {}
        for s in streams:
            codec = _CODECS.get(s.codec_context.name)
            if codec is None:
                raise ValueError(f"{path}: codec {s.codec_context.name} is not live-ingestible")
            tb: Fraction = s.time_base
            if tb.numerator != 1:
                raise ValueError(f"{path}: time base {tb} is not 1/N")
            index[s.index] = len(tracks)
            cc = s.codec_context
            tracks.append(
                LiveTrack(
                    index=len(tracks),
                    kind=s.type,
                    codec=codec,  # type: ignore[arg-type]
                    timescale=tb.denominator,
                    config=bytes(cc.extradata or b""),
                    width=cc.width if s.type == "video" else 0,
                    height=cc.height if s.type == "video" else 0,
                    sample_rate=cc.sample_rate if s.type == "audio" else 0,
                    channels=cc.channels if s.type == "audio" else 0,
                )
            )
        for pkt in c.demux(streams):
            if pkt.size == 0 or pkt.dts is None:
                continue
            frames.append(
                LiveFrame(
                    track=index[pkt.stream.index],
                    dts=int(pkt.dts),
                    pts=int(pkt.pts if pkt.pts is not None else pkt.dts),
                    keyframe=bool(pkt.is_keyframe),
                    data=bytes(pkt),
                )
            )
    return tracks, frames


async def feed(
    sink: LiveSink, path: Path, *, speed: float = 1.0, end: str | None = "unpublished"
) -> None:
    """Publish ``path`` into ``sink``: ``begin``, each frame when its decode time comes (``speed``
    times real time; 0 = at once), then ``end(end)`` unless ``end`` is None (a vanished
    publisher is then the test's to simulate)."""
    tracks, frames = read_file(path)
    loop = asyncio.get_running_loop()
    sink.begin(tracks)
    start = loop.time()
    for f in frames:
        if speed > 0:
            due = start + f.dts / tracks[f.track].timescale / speed
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
        sink.frame(f)
    if end is not None:
        sink.end(end)
