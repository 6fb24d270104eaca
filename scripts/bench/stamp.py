"""A wall-clock timestamp burned into video frames as big black and white blocks, and read back.

The live latency bench (``scripts/bench/live_latency.py``) paints the time a frame is handed to
the encoder into the frame itself, and every reader (LL-HLS, WHEP, the ffmpeg anchor) reads it
back from the frame it decoded: latency is then "now" minus the painted time, on one clock.

Layout
------
The top :data:`ROWS` rows of a 16-by-9 grid of blocks (each block ``width/16`` by ``height/9``,
so 40 by 40 pixels at 640x360) carry 64 bits, row-major, most significant bit first: the time in
milliseconds since the Unix epoch (48 bits, enough until the year 10889) then its CRC-16
(CCITT-FALSE, over the 6 big-endian bytes). A 1 is a white block (luma 235), a 0 a black one
(luma 16). Positions are fractions of the frame, so a scaled copy (a player's canvas) reads the
same.

A reader averages the luma of each block's middle half (the edges ring after compression),
rejects the frame if any block is neither clearly dark nor clearly bright, and rejects it if the
CRC does not match: a frame without a code, or a damaged one, reads as ``None``, never as a
wrong time. Blocks this large survive H.264 at a few hundred kbit/s untouched.

Pure Python over the luma plane's bytes (no numpy): :func:`paint` and :func:`read` work on a
plane buffer and its stride; :func:`stamped_frame` and :func:`read_frame` wrap them for PyAV.
"""

from __future__ import annotations

from fractions import Fraction
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import av

COLS = 16
GRID_ROWS = 9
ROWS = 4  # 64 bits: 48 of time, 16 of CRC
TIME_BITS = 48
BLACK = 16
WHITE = 235
# A block whose mean luma falls between these is neither a 0 nor a 1: the frame is refused.
DARK_MAX = 90
BRIGHT_MIN = 160

# The publisher's encoding (the bench's and the test's): 640x360 at 30 fps, H.264 Constrained
# Baseline (no B-frames, so no reordering delay), a keyframe every second, x264's zerolatency
# tune (no lookahead, no frame threads: a frame leaves the encoder as soon as it enters).
WIDTH = 640
HEIGHT = 360
FPS = 30
VIDEO_BITRATE = 800_000
X264_OPTIONS = {
    "preset": "veryfast",
    "tune": "zerolatency",
    "profile": "baseline",
    "x264-params": f"keyint={FPS}:min-keyint={FPS}:scenecut=0",
}


def crc16(data: bytes) -> int:
    """CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF) of ``data``."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def bits_of(ms: int) -> list[int]:
    """The 64 bits painted for the time ``ms`` (48 bits of time, then its CRC-16)."""
    if not 0 <= ms < 1 << TIME_BITS:
        raise ValueError(f"time {ms} does not fit in {TIME_BITS} bits")
    word = (ms << 16) | crc16(ms.to_bytes(6, "big"))
    n = COLS * ROWS
    return [(word >> (n - 1 - i)) & 1 for i in range(n)]


def _block(col: int, row: int, width: int, height: int) -> tuple[int, int, int, int]:
    """x0, x1, y0, y1 of a block of the grid in a ``width`` x ``height`` plane."""
    return (
        col * width // COLS,
        (col + 1) * width // COLS,
        row * height // GRID_ROWS,
        (row + 1) * height // GRID_ROWS,
    )


def paint(plane: bytearray, stride: int, width: int, height: int, ms: int) -> None:
    """Paint the time ``ms`` into the top rows of a luma ``plane`` (``stride`` bytes a line)."""
    for i, bit in enumerate(bits_of(ms)):
        x0, x1, y0, y1 = _block(i % COLS, i // COLS, width, height)
        run = bytes([WHITE if bit else BLACK]) * (x1 - x0)
        for y in range(y0, y1):
            plane[y * stride + x0 : y * stride + x1] = run


def read(plane: bytes | memoryview, stride: int, width: int, height: int) -> int | None:
    """The time painted in a luma ``plane``, or ``None`` if it carries no valid code."""
    word = 0
    for i in range(COLS * ROWS):
        x0, x1, y0, y1 = _block(i % COLS, i // COLS, width, height)
        qx, qy = (x1 - x0) // 4, (y1 - y0) // 4
        xa, xb = x0 + qx, x1 - qx
        total = 0
        for y in range(y0 + qy, y1 - qy):
            total += sum(plane[y * stride + xa : y * stride + xb])
        mean = total / ((xb - xa) * (y1 - qy - y0 - qy))
        if mean <= DARK_MAX:
            word <<= 1
        elif mean >= BRIGHT_MIN:
            word = (word << 1) | 1
        else:
            return None
    ms, crc = word >> 16, word & 0xFFFF
    return ms if crc16(ms.to_bytes(6, "big")) == crc else None


class Canvas:
    """Makes stamped ``yuv420p`` frames of one size: the code on top, a moving pattern below.

    The pattern (diagonal stripes scrolling a few pixels a frame) gives the encoder motion to
    code, as a camera would, so the bitrate and the encoder's work are not those of a still.
    """

    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self._ramp = bytes(40 + (x * 7) % 176 for x in range(width * 3))

    def frame(self, ms: int, index: int) -> av.VideoFrame:
        """A frame painted with the time ``ms``; ``index`` moves the pattern."""
        import av

        w, h = self.width, self.height
        frame = av.VideoFrame(w, h, "yuv420p")
        y_plane = frame.planes[0]
        stride = y_plane.line_size
        luma = bytearray(stride * h)
        top = ROWS * h // GRID_ROWS
        shift = (index * 4) % w
        for y in range(top, h):
            off = (shift + y) % w
            luma[y * stride : y * stride + w] = self._ramp[off : off + w]
        paint(luma, stride, w, h, ms)
        y_plane.update(bytes(luma))
        for plane in frame.planes[1:]:
            plane.update(b"\x80" * plane.buffer_size)
        return frame


def encoder() -> av.VideoCodecContext:
    """A libx264 encoder with the publisher's settings (for tests that compress stamps)."""
    import av

    ctx = av.CodecContext.create("libx264", "w")
    assert isinstance(ctx, av.VideoCodecContext)
    configure(ctx)
    ctx.time_base = Fraction(1, FPS)
    ctx.open()
    return ctx


def configure(
    ctx: av.VideoCodecContext,
    width: int = WIDTH,
    height: int = HEIGHT,
    bitrate: int = VIDEO_BITRATE,
) -> None:
    """Set the publisher's encoding on a video codec context (a stream's or a standalone one)."""
    ctx.width = width
    ctx.height = height
    ctx.pix_fmt = "yuv420p"
    ctx.bit_rate = bitrate
    ctx.gop_size = FPS
    ctx.framerate = Fraction(FPS)
    ctx.options = dict(X264_OPTIONS)


def read_frame(frame: av.VideoFrame) -> int | None:
    """The time painted in a decoded PyAV frame, or ``None`` if it carries no valid code."""
    if frame.format.name not in ("yuv420p", "yuvj420p", "nv12", "yuv422p", "yuv444p"):
        frame = frame.reformat(format="yuv420p")
    plane = frame.planes[0]
    return read(memoryview(plane), plane.line_size, frame.width, frame.height)
