"""The live ABR ladder: which rungs an input gets, their size, the master playlist, and the CPU
budget that sheds rungs (pure, no I/O, no clock).

Theory of operation
-------------------
``[live] ladder`` lists rungs (:class:`LiveRung`: an output height and a video bitrate). An
input whose video is taller than a rung gets that rung (:func:`applicable`: rungs at or above
the publisher's own height are pointless and skipped); the publisher's own stream stays the
top rendition, passed through. The node decodes the input once and scales and encodes each
rung from the same decoded pictures, forcing a keyframe on every source keyframe and nowhere
else, so every rendition cuts its segments at the same media times and players switch at any
segment boundary.

:func:`master_playlist` lists the renditions a player may choose from (``EXT-X-STREAM-INF``
with ``BANDWIDTH``, ``RESOLUTION``, ``CODECS``). Each rendition is muxed (its video and the
source's audio, passed through): hls.js and Apple players take muxed variants without an
audio group, and the source rendition keeps its shape.

:class:`CpuBudget` keeps the transcodes of every input together within ``[live]
ladder_cpu_percent`` of one core. The transcode threads charge the CPU time each step took
(decoding an input, scaling and encoding one rung) to a key (input, rung; rung ``""`` is the
input's shared decode). Once a window of ``window_s`` wall-clock seconds has passed,
:meth:`CpuBudget.check` compares the CPU spent in it with the budget: over it, the most
expensive rung in that window is to be dropped (its input's decode goes too once it has no
rung left); within it, nothing happens. Either way a new window starts, so a rung is dropped
only for a whole window over budget (a sustained excess, never a single slow frame), and at
most one rung per window (the next window measures what the drop saved).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

DECODE = ""  # the rung key of an input's shared decode


@dataclass(frozen=True)
class LiveRung:
    """One lower rendition of a live input: its height and video bitrate."""

    height: int
    bitrate_kbps: int

    @property
    def name(self) -> str:
        """The rendition's path segment under ``/live/<input>/`` (``r360``)."""
        return f"r{self.height}"


def applicable(rungs: Iterable[LiveRung], source_height: int) -> tuple[LiveRung, ...]:
    """The rungs below ``source_height``, tallest first, one per height."""
    by_height = {r.height: r for r in rungs if r.height < source_height}
    return tuple(sorted(by_height.values(), key=lambda r: -r.height))


def rung_size(width: int, height: int, rung_height: int) -> tuple[int, int]:
    """The picture size of a rung ``rung_height`` tall for a ``width`` x ``height`` source: the
    source's aspect kept, both sides even (4:2:0 chroma needs them)."""
    if width <= 0 or height <= 0 or rung_height <= 0:
        raise ValueError("sizes must be positive")
    h = max(2, rung_height - rung_height % 2)
    w = round(Fraction(width * h, height) / 2) * 2
    return max(2, w), h


@dataclass(frozen=True)
class Variant:
    """One rendition as the master playlist lists it."""

    uri: str
    bandwidth: int  # bits per second, peak
    width: int
    height: int
    codecs: tuple[str, ...]  # RFC 6381, one per track


def peak_bandwidth(segments: Iterable[tuple[int, Fraction]]) -> int:
    """``BANDWIDTH`` from segments as (bytes, duration): the highest bit rate of one (0 for
    none)."""
    return max((round(8 * n / d) for n, d in segments if d > 0), default=0)


def _checked(uri: str) -> str:
    if not uri or any(c in uri for c in "\r\n"):
        raise ValueError(f"unusable URI: {uri!r}")
    return uri


def master_playlist(variants: Sequence[Variant]) -> str:
    """The master playlist listing ``variants`` in order (the first is where Apple players
    start; hls.js orders them by bandwidth)."""
    lines = ["#EXTM3U", "#EXT-X-VERSION:6", "#EXT-X-INDEPENDENT-SEGMENTS"]
    for v in variants:
        attrs = [f"BANDWIDTH={max(1, v.bandwidth)}"]
        if v.width and v.height:
            attrs.append(f"RESOLUTION={v.width}x{v.height}")
        if v.codecs:
            if any('"' in c or "," in c for c in v.codecs):
                raise ValueError(f"unusable codec string in {v.codecs!r}")
            attrs.append(f'CODECS="{",".join(v.codecs)}"')
        lines += ["#EXT-X-STREAM-INF:" + ",".join(attrs), _checked(v.uri)]
    return "\n".join(lines) + "\n"


Key = tuple[str, str]  # (input, rung name or DECODE)


class CpuBudget:
    """CPU of every live transcode against one budget, judged per window (see the module)."""

    def __init__(self, cores: float, window_s: float) -> None:
        if cores <= 0 or window_s <= 0:
            raise ValueError("the budget and its window must be positive")
        self.cores = cores  # the budget: CPU seconds per wall second (1.0 = one core)
        self.window_s = window_s
        self.start: float | None = None
        self.spent: dict[Key, float] = {}
        self.last_ratio = 0.0  # CPU per second in the last complete window

    def charge(self, key: Key, cpu_s: float, now: float) -> None:
        """``cpu_s`` seconds of CPU spent on ``key`` just now."""
        if self.start is None:
            self.start = now
        self.spent[key] = self.spent.get(key, 0.0) + cpu_s

    def forget(self, input: str, rung: str | None = None) -> None:
        """Stop counting ``input``'s ``rung`` (every key of the input when None)."""
        for k in [k for k in self.spent if k[0] == input and rung in (None, k[1])]:
            del self.spent[k]

    def check(self, now: float) -> Key | None:
        """At the end of a window: the rung to drop if the window was over budget, else None
        (also None before the window is over)."""
        if self.start is None or now - self.start < self.window_s:
            return None
        elapsed = now - self.start
        total = sum(self.spent.values())
        self.last_ratio = total / elapsed
        rungs = {k: v for k, v in self.spent.items() if k[1] != DECODE}
        self.start, self.spent = now, {}
        if self.last_ratio <= self.cores or not rungs:
            return None
        return max(rungs, key=lambda k: (rungs[k], k))
