"""A live playlist's state between nodes: what an origin sends a relay (pure, no I/O).

A relay node (:mod:`peerd.live.relay`) serves another node's live input to its own viewers. It
does not copy the origin's playlist text: the origin sends the state of its
:class:`~peerd.core.llhls.Timeline` (:func:`encode`) and the relay rebuilds one
(:func:`decode`), so the relay renders the playlist with its own URIs (its viewers' tokens),
answers blocking reloads and delta updates by the same rules as the origin, and knows which
content ids the window lists. Media times travel as exact fractions (``"n/d"``).

:func:`wanted` is the blocking reload a relay asks its origin for next: the part after the
newest it has, so one upstream request per input follows the publication part by part.
"""

from __future__ import annotations

from collections import deque
from fractions import Fraction
from typing import Any

from peerd.core.ids import parse_cid
from peerd.core.llhls import Part, Segment, Timeline
from peerd.errors import BadRequest

MAX_SEGMENTS = 100  # the most a window holds (``[live] window_segments`` is at most 100)
MAX_PARTS = 64  # parts per segment a relay accepts


def _frac(x: Fraction) -> str:
    return f"{x.numerator}/{x.denominator}"


def _unfrac(raw: Any) -> Fraction:
    if not isinstance(raw, str) or len(raw) > 40:
        raise ValueError("a media time is a string n/d")
    x = Fraction(raw)
    if x < 0:
        raise ValueError("a media time is never negative")
    return x


def _int(raw: Any) -> int:
    if not isinstance(raw, int) or isinstance(raw, bool) or raw < 0:
        raise ValueError("expected a non-negative integer")
    return raw


def _part(p: Part) -> list[Any]:
    return [p.number, p.msn, p.index, _frac(p.start), _frac(p.duration), p.independent]


def _unpart(raw: Any) -> Part:
    if not isinstance(raw, list) or len(raw) != 6 or not isinstance(raw[5], bool):
        raise ValueError("a part is [number, msn, index, start, duration, independent]")
    return Part(_int(raw[0]), _int(raw[1]), _int(raw[2]), _unfrac(raw[3]), _unfrac(raw[4]), raw[5])


def encode(tl: Timeline, pub: str) -> dict[str, Any]:
    """The state of ``tl`` (publication ``pub``) as JSON-able data."""
    return {
        "pub": pub,
        "part_target": _frac(tl.part_target),
        "segment_target": _frac(tl.segment_target),
        "window": tl.window,
        "wall_start": tl.wall_start,
        "init": tl.init,
        "segments": [
            {
                "msn": s.msn,
                "start": _frac(s.start),
                "duration": _frac(s.duration),
                "cid": s.cid,
                "parts": [_part(p) for p in s.parts],
            }
            for s in tl.segments
        ],
        "current": [_part(p) for p in tl.current],
        "next_msn": tl.next_msn,
        "next_part": tl.next_part,
        "longest": _frac(tl.longest),
        "ended": tl.ended,
    }


def decode(data: Any) -> tuple[Timeline, str]:
    """A timeline and its publication id from :func:`encode`'s output; ValueError if malformed
    (the content ids are checked: the relay fetches blobs by them)."""
    if not isinstance(data, dict):
        raise ValueError("the state is an object")
    try:
        pub = data["pub"]
        if not isinstance(pub, str) or not pub.isalnum() or len(pub) > 16:
            raise ValueError("bad publication id")
        part_target, segment_target = _unfrac(data["part_target"]), _unfrac(data["segment_target"])
        if part_target <= 0 or segment_target <= 0:
            raise ValueError("targets are positive")
        wall = data["wall_start"]
        if not isinstance(wall, int | float) or isinstance(wall, bool):
            raise ValueError("wall_start is a number")
        tl = Timeline(
            part_s=float(part_target),
            segment_s=float(segment_target),
            window=min(_int(data["window"]), MAX_SEGMENTS),
            wall_start=float(wall),
        )
        tl.part_target, tl.segment_target = part_target, segment_target
        init = data["init"]
        tl.init = None if init is None else parse_cid(init)
        raw_segments = data["segments"]
        if not isinstance(raw_segments, list) or len(raw_segments) > MAX_SEGMENTS:
            raise ValueError("too many segments")
        segments: deque[Segment] = deque()
        for s in raw_segments:
            parts = s["parts"]
            if not isinstance(parts, list) or not 0 < len(parts) <= MAX_PARTS:
                raise ValueError("a segment has 1 to 64 parts")
            segments.append(
                Segment(
                    _int(s["msn"]),
                    _unfrac(s["start"]),
                    _unfrac(s["duration"]),
                    parse_cid(s["cid"]),
                    tuple(_unpart(p) for p in parts),
                )
            )
        current = data["current"]
        if not isinstance(current, list) or len(current) > MAX_PARTS:
            raise ValueError("too many parts in progress")
        tl.segments = segments
        tl.current = [_unpart(p) for p in current]
        tl.next_msn, tl.next_part = _int(data["next_msn"]), _int(data["next_part"])
        tl.longest = _unfrac(data["longest"])
        ended = data["ended"]
        if not isinstance(ended, bool):
            raise ValueError("ended is a boolean")
        tl.ended = ended
    except (KeyError, TypeError, AttributeError, ZeroDivisionError, BadRequest) as exc:
        raise ValueError(f"malformed live state: {exc!r}") from exc
    return tl, pub


def wanted(tl: Timeline | None) -> tuple[int, int] | None:
    """``(_HLS_msn, _HLS_part)`` of the next part after what ``tl`` has (None: ask for the
    playlist now, no blocking)."""
    if tl is None or tl.ended:
        return None
    return tl.next_msn, len(tl.current)


def cids(tl: Timeline) -> set[str]:
    """The content ids a timeline lists (the init segment and the window's segments)."""
    out = {s.cid for s in tl.segments}
    if tl.init is not None:
        out.add(tl.init)
    return out
