"""Alternate tracks: every audio stream and text subtitle stream, cut along one timeline.

The packager's top rendition carries the video and the file's first audio stream. A file with
more audio streams, or with text subtitles, gets one more pass over it (`track_pass`) that demuxes
those streams together and cuts them along a `Timeline`:

* **Video files**: the top rendition's segments. Each track has exactly the top's segments
  (same start, same durations), so a player switching tracks finds the same boundaries. A
  packet goes to the segment whose time span holds its presentation time (earlier ones to the
  first, later ones to the last), as the cutter places audio.
* **Audio-only files**: a grid of ``segment_seconds`` from the file's start; each track ends
  with its last packet.

Audio is copied when the container takes it as it is (`SourceInfo.can_copy_audio`), otherwise
encoded to AAC exactly as the top pass does; each segment is muxed alone (`SegmentMuxer`) with the
same timeline origin as the top rendition, so its timestamps line up with the video's.

Subtitles become segmented WebVTT (`webvtt_segment`): the cues that overlap a segment, with
times on the media timeline (tick 0 = the origin), text reduced to plain WebVTT (ASS override
tags dropped, ``&``/``<``/``>`` escaped), and an ``X-TIMESTAMP-MAP`` header that maps them to the
media's clock (MPEG-TS PTS, or the fMP4 decode time in 90 kHz), which hls.js needs to place them.
A cue spanning a boundary is repeated in each segment it overlaps (players drop the duplicate).

Everything is a function of the input bytes and the options: the same file gives the same blobs.
"""

from __future__ import annotations

import functools
import itertools
import math
import re
from bisect import bisect_right
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import av
import av.error

from peerd.core.ids import Cid
from peerd.errors import MediaError
from peerd.media import codecs
from peerd.media.cut import TIMESCALE, rescale, t_of, ticks
from peerd.media.mux import SegmentMuxer
from peerd.media.probe import AudioInfo, SourceInfo, SubtitleInfo, open_input
from peerd.media.transcode import new_holder

AAC_RATES = frozenset({96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 8000})
"""Sample rates the AAC encoder takes as they are (others are resampled to 48 kHz)."""

Put = Callable[[bytes, str], "Future[Cid]"]
"""Hands one blob (bytes, kind "init" | "segment") to the sink; the future gives its id."""

# The media clock of tick 0 in 90 kHz units (X-TIMESTAMP-MAP MPEGTS): libavformat's MPEG-TS muxer
# writes timestamps as they are (no mux delay unless asked), fMP4 decode times start at 0.
_MPEGTS_ZERO = 0
_ASS_TAG = re.compile(r"\{[^}]*\}")


@dataclass(frozen=True)
class Timeline:
    """Segment boundaries shared by every track, in ticks of `TIMESCALE` from `origin`.

    `durations` is None for an audio-only file: then segments are `step` long and each track
    ends where it ends.
    """

    origin: Fraction
    start: int
    durations: tuple[int, ...] | None
    step: Fraction

    def index(self, t: Fraction) -> int:
        """The segment that holds presentation time `t` (seconds, source clock)."""
        rel = (t - self.origin) * TIMESCALE
        if self.durations is None:
            return max(0, math.floor(rel / (self.step * TIMESCALE)))
        return max(0, min(len(self.durations) - 1, bisect_right(self._starts, rel) - 1))

    @functools.cached_property
    def _starts(self) -> list[int]:
        """Start of every segment (ticks from the origin), computed once."""
        assert self.durations is not None
        return list(itertools.accumulate(self.durations[:-1], initial=self.start))

    def begin(self, seq: int) -> int:
        """Start of segment `seq` in ticks from the origin."""
        if self.durations is None:
            return ticks(seq * self.step)
        return self._starts[seq]


@dataclass
class Track:
    """One produced track: its segments' (duration ticks, blob id, size) and CODECS entry."""

    info: AudioInfo | SubtitleInfo
    codecs: str
    start: int = 0
    init: Future[Cid] | None = None
    segs: list[tuple[int, Future[Cid], int]] = field(default_factory=list)


class _Audio:
    """Cuts, (re-encodes) and muxes one audio stream along the timeline."""

    def __init__(
        self,
        src: SourceInfo,
        info: AudioInfo,
        stream: Any,
        container: str,
        bitrate: int,
        start: int,
    ) -> None:
        self.info = info
        self.stream = stream
        self.copy = src.can_copy_audio(container, info)
        self.holder: av.container.OutputContainer | None = None
        self.encoder: Any = None
        self.resampler: av.AudioResampler | None = None
        self.next_pts: int | None = None
        template: Any = stream
        name = codecs.audio_codec(info.codec, info.profile) if self.copy else codecs.aac_codec("LC")
        if not self.copy:
            # As the top pass encodes audio (`peerd.media.package._top_pass`).
            self.holder = new_holder(container)
            sr = info.sample_rate if info.sample_rate in AAC_RATES else 48000
            layout = "mono" if info.channels == 1 else "stereo"
            self.encoder = self.holder.add_stream("aac", rate=sr)
            self.encoder.layout = layout
            self.encoder.bit_rate = bitrate
            self.atb = Fraction(1, sr)
            self.encoder.time_base = self.atb
            self.resampler = av.AudioResampler(
                format="fltp", layout=layout, rate=sr, frame_size=1024
            )
            self.holder.start_encoding()
            template = self.encoder
        self.muxer = SegmentMuxer(container, None, template)
        self.track = Track(info, name, start=start)
        self.pending: dict[int, list[Any]] = {}
        self.next_seq = 0  # the first timeline segment not yet muxed
        self.gap = 0  # ticks of empty segments since the last one muxed
        self.last_end = Fraction(0)

    def packets(self, pkt: Any | None) -> list[Any]:
        """The packets to cut for one input packet (None: flush the encoder)."""
        if self.copy:
            return [pkt] if pkt is not None and pkt.dts is not None else []
        assert self.resampler is not None
        out: list[Any] = []
        frames = pkt.decode() if pkt is not None else [None]
        for frame in frames:
            if frame is not None and self.next_pts is None:
                t0 = t_of(frame.pts, frame.time_base) or Fraction(0)
                self.next_pts = rescale(t0, self.atb)
            for rf in self.resampler.resample(frame):
                rf.pts = self.next_pts
                rf.time_base = self.atb
                self.next_pts = (self.next_pts or 0) + rf.samples
                out += self.encoder.encode(rf)
        if pkt is None:
            out += self.encoder.encode(None)
        return out

    def close(self) -> None:
        if self.holder is not None:
            self.holder.close()


@dataclass
class _Cue:
    start: Fraction
    end: Fraction
    text: str


def _cue_text(sub: Any) -> str:
    raw = getattr(sub, "dialogue", None)
    if raw is None:  # not an ASS event (libavcodec turns every text format into one)
        return ""
    text = _ASS_TAG.sub("", bytes(raw).decode("utf-8", "replace"))
    text = text.replace("\\N", "\n").replace("\\n", "\n").replace("\\h", " ")
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    # A blank line would end the cue, and "-->" inside its text would start a timing line.
    lines = [ln.strip() for ln in text.replace("-->", "--&gt;").splitlines()]
    return "\n".join(ln for ln in lines if ln)


def _stamp(t: int) -> str:
    """Ticks as a WebVTT timestamp HH:MM:SS.mmm (milliseconds rounded half up, never < 0)."""
    ms = max(0, (t * 1000 + TIMESCALE // 2) // TIMESCALE)
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}.{ms:03d}"


def webvtt_segment(cues: Sequence[tuple[int, int, str]]) -> bytes:
    """One WebVTT segment: header with X-TIMESTAMP-MAP, then (start, end ticks, text) cues."""
    out = [f"WEBVTT\nX-TIMESTAMP-MAP=MPEGTS:{_MPEGTS_ZERO},LOCAL:00:00:00.000\n"]
    for start, end, text in cues:
        out.append(f"{_stamp(start)} --> {_stamp(end)}\n{text}\n")
    return "\n".join(out).encode("utf-8")


def track_pass(
    src: SourceInfo,
    container: str,
    audio_bitrate: int,
    timeline: Timeline,
    audios: Sequence[AudioInfo],
    subtitles: Sequence[SubtitleInfo],
    put: Put,
    check: Callable[[], None],
    progress: Callable[[float], None] | None = None,
) -> list[Track]:
    """Package `audios` and `subtitles` of `src` along `timeline`; see the module doc.

    `progress` is called with the seconds of the timeline read so far."""
    path = src.path
    inp = open_input(path)
    tracks: list[_Audio] = []
    try:
        for a in audios:
            stream = inp.streams[a.index]
            tracks.append(_Audio(src, a, stream, container, audio_bitrate, timeline.begin(0)))
        by_stream: dict[int, _Audio] = {t.info.index: t for t in tracks}
        cues: dict[int, list[_Cue]] = {s.index: [] for s in subtitles}
        streams = [t.stream for t in tracks] + [inp.streams[s.index] for s in subtitles]
        try:
            for pkt in inp.demux(*streams):
                check()
                index = pkt.stream.index
                if index in cues:
                    _add_cues(pkt, cues[index])
                    continue
                t = by_stream[index]
                _cut(t, t.packets(pkt), timeline, put, final=False)
                if progress is not None and pkt.pts is not None and pkt.time_base is not None:
                    progress(max(0.0, float(pkt.pts * pkt.time_base - timeline.origin)))
            for t in tracks:
                _cut(t, t.packets(None), timeline, put, final=True)
        except av.error.FFmpegError as exc:
            raise MediaError(f"{path}: corrupt or truncated media while reading: {exc}") from None
        out = [t.track for t in tracks]
        for s in subtitles:
            out.append(_subtitle_track(s, cues[s.index], timeline, put, _audio_end(tracks)))
        return out
    finally:
        inp.close()
        for t in tracks:
            t.close()


def _audio_end(tracks: Sequence[_Audio]) -> Fraction:
    """Where the last audio ends (source seconds): how long subtitles of an audio-only file run."""
    return max((t.last_end for t in tracks), default=Fraction(0))


def _add_cues(pkt: Any, into: list[_Cue]) -> None:
    start = t_of(pkt.pts, pkt.time_base)
    if start is None:
        return
    dur = t_of(pkt.duration, pkt.time_base) or Fraction(3)
    for sub in pkt.decode():
        text = _cue_text(sub)
        if text:
            into.append(_Cue(start, start + dur, text))


def _cut(t: _Audio, pkts: list[Any], timeline: Timeline, put: Put, *, final: bool) -> None:
    """Place packets in their segments and mux every segment that can no longer grow."""
    done = t.next_seq
    for p in pkts:
        pts = t_of(p.pts if p.pts is not None else p.dts, p.time_base)
        if pts is None:
            continue
        end = pts + (t_of(p.duration, p.time_base) or Fraction(0))
        if end <= timeline.origin:
            # Before the video's timeline (an AAC priming frame when the video starts at 0):
            # it would need a negative timestamp, which fMP4 decode times cannot hold.
            continue
        # Never into a segment already muxed (timestamps run forwards; this is a guard).
        t.pending.setdefault(max(done, timeline.index(pts)), []).append(p)
        t.last_end = max(t.last_end, end)
    if not final:
        upto = max(t.pending, default=done)  # a packet of a later segment closes the ones before
    elif timeline.durations is not None:
        upto = len(timeline.durations)
    else:
        upto = max(t.pending, default=done - 1) + 1
    for seq in range(t.next_seq, upto):
        pkts = t.pending.pop(seq, [])
        if timeline.durations is not None:
            duration = timeline.durations[seq]
        elif final and seq == upto - 1:
            duration = ticks(t.last_end - timeline.origin) - timeline.begin(seq)
        else:
            duration = timeline.begin(seq + 1) - timeline.begin(seq)
        duration = max(duration, 1)
        segs = t.track.segs
        if not pkts:
            # No audio in this span: no empty segment. A track that starts late starts later;
            # a pause is covered by the segment before it; a track that ends early ends.
            if segs:
                t.gap += duration
            elif timeline.durations is None or seq + 1 < len(timeline.durations):
                t.track.start = timeline.begin(seq + 1)
            continue
        if t.gap:
            d, cid, size = segs[-1]
            segs[-1] = (d + t.gap, cid, size)
            t.gap = 0
        data = t.muxer.mux(len(segs), [], pkts, timeline.origin)
        if data.init is not None and t.track.init is None:
            t.track.init = put(data.init, "init")
        t.track.segs.append((duration, put(data.data, "segment"), len(data.data)))
    t.next_seq = max(t.next_seq, upto)


def _subtitle_track(
    info: SubtitleInfo, cues: list[_Cue], timeline: Timeline, put: Put, end: Fraction
) -> Track:
    track = Track(info, "wvtt", start=timeline.start if timeline.durations is not None else 0)
    if timeline.durations is not None:
        durations = list(timeline.durations)
    else:
        total = max([ticks(end - timeline.origin)] + [ticks(c.end - timeline.origin) for c in cues])
        step = ticks(timeline.step)
        durations = [step] * max(1, math.ceil(total / step))
        durations[-1] = max(1, total - step * (len(durations) - 1))
    at = track.start
    for seq, d in enumerate(durations):
        lo = -(10**18) if seq == 0 else at
        hi = 10**18 if seq == len(durations) - 1 else at + d
        in_seg = []
        for c in cues:
            s, e = ticks(c.start - timeline.origin), ticks(c.end - timeline.origin)
            if e > lo and s < hi and e > s:
                in_seg.append((s, e, c.text))
        data = webvtt_segment(in_seg)
        track.segs.append((d, put(data, "segment"), len(data)))
        at += d
    return track
