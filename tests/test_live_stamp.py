"""The live latency bench's instrument (scripts/bench/stamp.py): times burned into frames survive
H.264 at the bench's settings and read back exactly; frames without a valid code read as None."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import av
import pytest

from scripts.bench import stamp

BASE_MS = 1_796_630_629_350  # a December 2026 wall-clock time in ms


def _roundtrip(times: list[int]) -> list[int | None]:
    """Stamp ``times`` into frames, compress them with the publisher's encoder, decode, read."""
    enc = stamp.encoder()
    canvas = stamp.Canvas(stamp.WIDTH, stamp.HEIGHT)
    packets: list[av.Packet[Any]] = []
    for i, ms in enumerate(times):
        frame = canvas.frame(ms, i)
        frame.pts = i
        frame.time_base = Fraction(1, stamp.FPS)
        packets += enc.encode(frame)
    packets += enc.encode(None)
    dec = av.CodecContext.create("h264", "r")
    read: list[int | None] = []
    for p in packets:
        read += [stamp.read_frame(f) for f in dec.decode(p)]
    return read


def test_times_survive_h264_exactly() -> None:
    # Two seconds (two GOPs, so P-frames at the end of a GOP too), times with every bit pattern
    # the low bits take, and the largest time the code holds.
    times = [BASE_MS + i * 33 + (i % 7) for i in range(2 * stamp.FPS)]
    times[-1] = (1 << stamp.TIME_BITS) - 1
    times[-2] = 0
    assert _roundtrip(times) == times


def test_a_scaled_frame_reads_the_same() -> None:
    # A player draws the picture at its own size; positions are fractions of the frame.
    frame = stamp.Canvas(stamp.WIDTH, stamp.HEIGHT).frame(BASE_MS, 0)
    for w, h in ((1280, 720), (320, 180), (854, 480)):
        assert stamp.read_frame(frame.reformat(width=w, height=h)) == BASE_MS
    assert stamp.read_frame(frame.reformat(format="rgb24")) == BASE_MS


def test_a_frame_without_a_valid_code_reads_none() -> None:
    w, h = stamp.WIDTH, stamp.HEIGHT
    gray = bytes([128]) * (w * h)
    assert stamp.read(gray, w, w, h) is None
    black = bytes([stamp.BLACK]) * (w * h)
    assert stamp.read(black, w, w, h) is None
    # One block flipped: every block is clear, but the CRC no longer matches.
    plane = bytearray(gray)
    stamp.paint(plane, w, w, h, BASE_MS)
    assert stamp.read(bytes(plane), w, w, h) == BASE_MS
    for y in range(h // stamp.GRID_ROWS):
        row = y * w
        first = plane[row]
        plane[row : row + w // stamp.COLS] = bytes([stamp.WHITE + stamp.BLACK - first]) * (
            w // stamp.COLS
        )
    assert stamp.read(bytes(plane), w, w, h) is None
    # A block of mid gray on the side of its own bit is neither a clear 0 nor a clear 1: refused,
    # though a plain threshold would read the right bit and the CRC would match.
    plane = bytearray(gray)
    stamp.paint(plane, w, w, h, BASE_MS)
    bits = stamp.bits_of(BASE_MS)
    i = bits.index(1)
    bw, bh = w // stamp.COLS, h // stamp.GRID_ROWS
    x0, y0 = (i % stamp.COLS) * bw, (i // stamp.COLS) * bh
    for y in range(y0, y0 + bh):
        plane[y * w + x0 : y * w + x0 + bw] = bytes([140]) * bw
    assert stamp.read(bytes(plane), w, w, h) is None


def test_time_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="48 bits"):
        stamp.bits_of(1 << stamp.TIME_BITS)
