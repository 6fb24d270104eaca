"""Low-latency HLS of one live publication: where parts and segments are cut, what the playlist
says, and when a blocking playlist reload may be answered (pure, no I/O, no clock).

Theory of operation
-------------------
A publication is one timeline of media time (seconds as :class:`~fractions.Fraction`, zero at
its first video keyframe). Two pieces follow it, on two sides of a thread boundary:

* :class:`Cutter` (the packager's worker thread) is shown each sample of the *lead* track (the
  video track, or the audio track of an audio-only input) before the sample is added, and says
  whether the part being filled ends just before it (:class:`Cut`). A part ends when adding the
  sample would take it past ``part_s`` (judged with the last sample interval, so a part never
  exceeds the Part Target at a steady frame rate); a *segment* ends at the first video keyframe
  at or after ``segment_s`` of media (audio-only: by duration, like parts). A part whose first
  sample is a keyframe is independent (``INDEPENDENT=YES``); so is every audio-only part.
* :class:`Timeline` (the event loop) is told what the packager produced: each part
  (:meth:`Timeline.add_part`), each completed segment with its content id
  (:meth:`Timeline.close_segment`) and the end (:meth:`Timeline.end`). It numbers segments by
  media sequence number (MSN, from 0) and parts by a running part number (``Part.number``,
  from 0 for the publication) as well as their index in their segment, keeps a window of
  ``window`` complete segments, renders the playlist and decides blocking reloads.

Playlists (RFC 8216bis, as hls.js 1.7 reads them)
-------------------------------------------------
``#EXT-X-VERSION:6`` (``EXT-X-MAP``; ``9`` for a delta update, ``EXT-X-SKIP``),
``EXT-X-TARGETDURATION`` (ceiling of the longest segment, at least the configured segment
target), ``EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,PART-HOLD-BACK=<3 x part target>,
CAN-SKIP-UNTIL=<6 x target duration>``, ``EXT-X-PART-INF:PART-TARGET``, ``EXT-X-MEDIA-SEQUENCE``,
``EXT-X-MAP``, ``EXT-X-PROGRAM-DATE-TIME`` of the first listed segment (wall clock of media time
zero plus its start), then the segments: those ending within three target durations of the
playlist's end keep their ``EXT-X-PART`` lines (the spec's removal rule), the in-progress
segment is its parts only, and ``EXT-X-PRELOAD-HINT:TYPE=PART`` names the next part's URI (by
running number, so it is known before anyone knows which segment the part will belong to).
A delta update (``_HLS_skip=YES``) replaces the oldest segments whose end lies at least the Skip
Boundary (``CAN-SKIP-UNTIL``) before the playlist's end by ``EXT-X-SKIP:SKIPPED-SEGMENTS=n``.
After the end: no hint, ``EXT-X-ENDLIST``.

Blocking reload (RFC 8216bis 6.2.5.2)
-------------------------------------
``_HLS_msn=M`` alone waits for segment M to be complete; with ``_HLS_part=P`` for part P of
segment M, or anything later (a complete segment M satisfies any P). ``_HLS_part`` without
``_HLS_msn``, an M more than two past the last complete segment, or a P past the last part by
more than the Advance Part Limit (3 / part target parts, at least 3) is a bad request. After the
end every request is ready (the playlist will not grow).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import ROUND_CEILING, Decimal
from enum import Enum
from fractions import Fraction

# A part is cut when its next sample would take it past the target by more than this; absorbs
# clocks (RTMP's milliseconds) whose frame intervals alternate around the exact value.
EPSILON = Fraction(1, 1000)
# Parts stay listed for complete segments ending this many target durations before the end.
PART_LIST_TARGETS = 3


@dataclass(frozen=True)
class Cut:
    """The part being filled ends just before the sample shown (at media time ``at``); if
    ``segment``, its segment ends there too."""

    at: Fraction
    segment: bool


class Cutter:
    """Where parts and segments end, from the lead track's samples in decode order."""

    def __init__(self, part_s: float, segment_s: float, *, video: bool) -> None:
        self.part_s = Fraction(part_s).limit_denominator(1000)
        self.segment_s = Fraction(segment_s).limit_denominator(1000)
        self.video = video
        self.part_start: Fraction | None = None
        self.segment_start = Fraction(0)
        self.last: Fraction | None = None
        self.delta = Fraction(0)
        self.independent = True  # of the part being filled

    def place(self, t: Fraction, keyframe: bool) -> Cut | None:
        """Show the next lead sample (media time ``t``); a :class:`Cut` if the part being filled
        ends before it (the sample then starts the next part)."""
        if self.last is not None and t > self.last:
            self.delta = t - self.last
        self.last = t
        if self.part_start is None:
            self.part_start = self.segment_start = t
            self.independent = keyframe or not self.video
            return None
        if t <= self.part_start:
            return None
        if self.video:
            segment = keyframe and t - self.segment_start >= self.segment_s - EPSILON
        else:
            segment = t - self.segment_start + self.delta > self.segment_s + EPSILON
        if not segment and t - self.part_start + self.delta <= self.part_s + EPSILON:
            return None
        self.part_start = t
        if segment:
            self.segment_start = t
        self.independent = keyframe or not self.video
        return Cut(t, segment)


@dataclass(frozen=True)
class Part:
    """A partial segment: its running number in the publication, its segment and index there."""

    number: int
    msn: int
    index: int
    start: Fraction
    duration: Fraction
    independent: bool


@dataclass(frozen=True)
class Segment:
    """A complete media segment (its parts concatenated are its blob, ``cid``)."""

    msn: int
    start: Fraction
    duration: Fraction
    cid: str
    parts: tuple[Part, ...]


class Ready(Enum):
    """A blocking reload's fate now."""

    NOW = "now"
    WAIT = "wait"
    BAD = "bad"


@dataclass(frozen=True)
class Uris:
    """The URIs a playlist names (the HTTP layer adds the viewer's token)."""

    init: Callable[[str], str]  # init segment by content id
    segment: Callable[[str], str]  # media segment by content id
    part: Callable[[int], str]  # part by running number


def _dec(x: Fraction, places: int = 5) -> str:
    d = Decimal(x.numerator) / Decimal(x.denominator)
    return str(d.quantize(Decimal(1).scaleb(-places)))


def _ceil(x: Fraction) -> int:
    d = Decimal(x.numerator) / Decimal(x.denominator)
    return int(d.to_integral_value(rounding=ROUND_CEILING))


def _checked(uri: str) -> str:
    # Each URI lands inside a quoted attribute or on its own line.
    if not uri or any(c in uri for c in '\r\n"'):
        raise ValueError(f"unusable URI: {uri!r}")
    return uri


def _pdt(epoch_s: float) -> str:
    t = datetime.fromtimestamp(epoch_s, UTC)
    return t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"


class Timeline:
    """The playlist state of one publication, fed by the packager on the event loop."""

    def __init__(self, *, part_s: float, segment_s: float, window: int, wall_start: float) -> None:
        self.part_target = Fraction(part_s).limit_denominator(1000)
        self.segment_target = Fraction(segment_s).limit_denominator(1000)
        self.window = window
        self.wall_start = wall_start  # Unix time of media time zero
        self.init: str | None = None
        self.segments: deque[Segment] = deque()
        self.current: list[Part] = []  # the in-progress segment's parts
        self.next_msn = 0
        self.next_part = 0
        self.longest = Fraction(0)
        self.ended = False

    # -- what the packager produced --------------------------------------------------------

    def add_part(self, start: Fraction, duration: Fraction, independent: bool) -> Part:
        """Record the next part (of the in-progress segment)."""
        p = Part(self.next_part, self.next_msn, len(self.current), start, duration, independent)
        self.current.append(p)
        self.next_part += 1
        return p

    def close_segment(self, cid: str) -> Segment:
        """The in-progress segment is complete (its parts concatenated hash to ``cid``)."""
        if not self.current:
            raise ValueError("a segment has at least one part")
        parts = tuple(self.current)
        seg = Segment(
            self.next_msn, parts[0].start, sum((p.duration for p in parts), Fraction(0)), cid, parts
        )
        self.segments.append(seg)
        self.longest = max(self.longest, seg.duration)
        self.current = []
        self.next_msn += 1
        while len(self.segments) > self.window:
            self.segments.popleft()
        return seg

    def end(self) -> None:
        """The publication ended: no part or segment follows."""
        self.ended = True

    # -- facts ------------------------------------------------------------------------------

    @property
    def target_duration(self) -> int:
        """``EXT-X-TARGETDURATION``: the longest segment rounded up (at least the target)."""
        return max(1, _ceil(self.segment_target), _ceil(self.longest))

    @property
    def skip_boundary(self) -> int:
        """``CAN-SKIP-UNTIL`` in seconds: six target durations (the spec's minimum)."""
        return 6 * self.target_duration

    @property
    def advance_part_limit(self) -> int:
        """How far past the last part a blocking request may ask (RFC 8216bis 6.2.5.2)."""
        if self.part_target < 1:
            return math.ceil(3 / self.part_target)
        return 3

    def last_msn(self) -> int:
        """MSN of the last complete segment (-1 before the first)."""
        return self.next_msn - 1

    def last_part(self) -> tuple[int, int] | None:
        """(MSN, index) of the newest part, or None before the first."""
        if self.current:
            p = self.current[-1]
        elif self.segments:
            p = self.segments[-1].parts[-1]
        else:
            return None
        return p.msn, p.index

    def part(self, number: int) -> Part | None:
        """A part still listed or kept (by running number), or None."""
        for p in reversed(self.current):
            if p.number == number:
                return p
        for s in reversed(self.segments):
            if s.parts[0].number <= number <= s.parts[-1].number:
                return s.parts[number - s.parts[0].number]
        return None

    def segment(self, cid: str) -> Segment | None:
        """A segment of the window by content id."""
        return next((s for s in self.segments if s.cid == cid), None)

    # -- blocking reload --------------------------------------------------------------------

    def ready(self, msn: int | None, part: int | None) -> Ready:
        """Whether a playlist request with ``_HLS_msn=msn`` / ``_HLS_part=part`` is answered
        now, waits for more media, or is a bad request."""
        if msn is None:
            return Ready.BAD if part is not None else Ready.NOW
        if msn < 0 or (part is not None and part < 0):
            return Ready.BAD
        if msn > self.last_msn() + 2:
            return Ready.BAD
        last = self.last_part()
        if part is not None and last is not None and msn == last[0]:
            if part > last[1] + self.advance_part_limit:
                return Ready.BAD
        if self.ended or msn <= self.last_msn():
            return Ready.NOW
        if part is None or last is None:
            return Ready.WAIT
        return Ready.NOW if (msn, part) <= last else Ready.WAIT

    # -- rendering --------------------------------------------------------------------------

    def _skipped(self) -> int:
        end = self._end_time()
        n = 0
        for s in self.segments:
            if end - (s.start + s.duration) < self.skip_boundary:
                break
            n += 1
        return n

    def _end_time(self) -> Fraction:
        if self.current:
            return self.current[-1].start + self.current[-1].duration
        if self.segments:
            s = self.segments[-1]
            return s.start + s.duration
        return Fraction(0)

    def render(self, uris: Uris, *, skip: bool = False) -> str:
        """The media playlist now (a delta update if ``skip`` and segments can be skipped)."""
        if self.init is None:
            raise ValueError("no init segment yet")
        skipped = self._skipped() if skip else 0
        pt = self.part_target
        lines = [
            "#EXTM3U",
            f"#EXT-X-VERSION:{9 if skipped else 6}",
            f"#EXT-X-TARGETDURATION:{self.target_duration}",
            "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,"
            f"PART-HOLD-BACK={_dec(3 * pt, 3)},CAN-SKIP-UNTIL={self.skip_boundary}",
            f"#EXT-X-PART-INF:PART-TARGET={_dec(pt, 3)}",
            f"#EXT-X-MEDIA-SEQUENCE:{self.segments[0].msn if self.segments else self.next_msn}",
            f'#EXT-X-MAP:URI="{_checked(uris.init(self.init))}"',
        ]
        if skipped:
            lines.append(f"#EXT-X-SKIP:SKIPPED-SEGMENTS={skipped}")
        listed = list(self.segments)[skipped:]
        first = listed[0].parts[0] if listed else (self.current[0] if self.current else None)
        if first is not None:
            lines.append(f"#EXT-X-PROGRAM-DATE-TIME:{_pdt(self.wall_start + float(first.start))}")
        keep_parts = self._end_time() - PART_LIST_TARGETS * self.target_duration
        for s in listed:
            if s.start + s.duration > keep_parts:
                lines += [self._part_line(p, uris) for p in s.parts]
            lines.append(f"#EXTINF:{_dec(s.duration)},")
            lines.append(_checked(uris.segment(s.cid)))
        lines += [self._part_line(p, uris) for p in self.current]
        if self.ended:
            lines.append("#EXT-X-ENDLIST")
        else:
            hint = _checked(uris.part(self.next_part))
            lines.append(f'#EXT-X-PRELOAD-HINT:TYPE=PART,URI="{hint}"')
        return "\n".join(lines) + "\n"

    @staticmethod
    def _part_line(p: Part, uris: Uris) -> str:
        ind = ",INDEPENDENT=YES" if p.independent else ""
        return f'#EXT-X-PART:DURATION={_dec(p.duration)},URI="{_checked(uris.part(p.number))}"{ind}'
