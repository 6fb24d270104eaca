"""The cutter: video and audio packets -> segments that start on video keyframes.

Rules (the native remux, `peerd.media.isobmff.plan`, applies the same ones in integer ticks):
a segment starts at the first video keyframe at or after each multiple of ``segment_seconds``
after the previous cut (transcodes force an IDR exactly there); video before the first keyframe
is dropped; audio goes to the segment whose video time span contains it; a last segment shorter
than a quarter step joins the one before. Times are exact `Fraction` seconds.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

TIMESCALE = 90_000


@dataclass
class Seg:
    start: Fraction
    end: Fraction | None = None
    video: list[Any] = field(default_factory=list)
    audio: list[Any] = field(default_factory=list)


def t_of(ts: int | None, tb: Fraction | None) -> Fraction | None:
    """A timestamp in seconds (None if either part is unknown)."""
    if ts is None or tb is None:
        return None
    # One constructor call instead of Fraction(ts) * tb (two Fractions and a multiplication):
    # called for every packet, this was a tenth of a remux's Python time. Same exact value.
    return Fraction(ts * tb.numerator, tb.denominator)


def ticks(t: Fraction) -> int:
    """Seconds in ticks of `TIMESCALE`, rounded half up."""
    return math.floor(t * TIMESCALE + Fraction(1, 2))


def rescale(t: Fraction, tb: Fraction) -> int:
    """t (seconds) in units of tb, rounded half up (deterministic)."""
    return math.floor(t / tb + Fraction(1, 2))


class Cutter:
    """Groups video and audio packets into segments that start on video keyframes."""

    def __init__(self, seconds: float, has_audio: bool, emit: Callable[[Seg, int], None]) -> None:
        self.step = Fraction(seconds).limit_denominator(1000)
        self.has_audio = has_audio
        self.emit = emit
        self.segs: list[Seg] = []  # not yet emitted; the last one is open
        self.pending_audio: list[tuple[Fraction, Any]] = []
        self.max_audio = Fraction(-(10**9))
        self.next_cut = Fraction(0)
        self.emitted = 0
        self.video_end = Fraction(0)
        self.first_start = Fraction(0)

    def _grid_after(self, t: Fraction) -> Fraction:
        return (math.floor(t / self.step) + 1) * self.step

    def video(self, pkt: Any, pts: Fraction, key: bool, dur: Fraction) -> None:
        if not self.segs and self.emitted == 0:
            if not key:
                return  # undecodable without the keyframe before it
            self.segs.append(Seg(start=pts))
            self.first_start = pts
            self.next_cut = self._grid_after(pts)
            self._place_audio()
        elif key and pts >= self.next_cut:
            self.segs[-1].end = pts
            self.segs.append(Seg(start=pts))
            self.next_cut = self._grid_after(pts)
            self._place_audio()
            self._flush(final=False)
        self.segs[-1].video.append(pkt)
        self.video_end = max(self.video_end, pts + dur)

    def audio(self, pkt: Any, pts: Fraction) -> None:
        self.pending_audio.append((pts, pkt))
        self.max_audio = max(self.max_audio, pts)
        self._place_audio()
        self._flush(final=False)

    def _place_audio(self) -> None:
        if not self.segs:
            return
        keep: list[tuple[Fraction, Any]] = []
        for t, p in self.pending_audio:
            target = None
            for s in self.segs:
                if s.end is not None and t < s.end:
                    target = s
                    break
            if target is None:
                last = self.segs[-1]
                # A cut can only happen at or after next_cut, so earlier audio is the open one's.
                if t < self.next_cut or last.end is not None:
                    target = last
            if target is None:
                keep.append((t, p))
            else:
                target.audio.append(p)
        self.pending_audio = keep

    def _flush(self, final: bool) -> None:
        while self.segs:
            s = self.segs[0]
            if s.end is None and not final:
                return
            if not final and len(self.segs) < 3:
                # Keep one closed segment back: a tiny last segment is merged into it.
                return
            if not final and self.has_audio and s.end is not None and self.max_audio < s.end:
                # Wait for the audio of this span, unless video is far ahead (no audio left).
                if self.segs[-1].start - s.end < 10 * self.step:
                    return
            self.segs.pop(0)
            self.emit(s, self.emitted)
            self.emitted += 1

    def finish(self) -> None:
        if self.segs:
            last = self.segs[-1]
            last.end = max(self.video_end, last.start + Fraction(1, TIMESCALE))
            for t, p in self.pending_audio:
                (last if t >= last.start else self.segs[0]).audio.append(p)
            self.pending_audio = []
            if len(self.segs) >= 2 and last.end - last.start < self.step / 4:
                # A sliver at the end (a frame or two past the last cut) joins the segment
                # before it instead of becoming a segment of its own.
                prev = self.segs[-2]
                prev.end = last.end
                prev.video += last.video
                prev.audio += last.audio
                self.segs.pop()
        self._flush(final=True)


def fill_dts(packets: list[Any]) -> None:
    """Give every packet a decode timestamp when the demuxer left some unset (Matroska).

    The i-th decode time is the i-th smallest presentation time moved back by the reorder
    delay, which keeps decode times increasing and never after their presentation times.
    """
    if all(p.dts is not None for p in packets) or any(p.pts is None for p in packets):
        return
    pts = [int(p.pts) for p in packets]
    ordered = sorted(pts)
    delay = max(0, max(o - q for o, q in zip(ordered, pts, strict=True)))
    for p, o in zip(packets, ordered, strict=True):
        p.dts = o - delay
