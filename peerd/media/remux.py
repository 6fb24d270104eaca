"""The native remux: segments of an MP4/MOV source read straight from its sample tables.

`open_native` decides whether a source takes this path (the packager's rule, see
`peerd.media.package.PACKAGER_VERSION`): fMP4 output, video remuxed, audio (if any) copied, and
`peerd.media.isobmff` understands the file. The decision is made from the file's bytes and the
options alone, so every node makes the same one; I/O errors are errors, never a reason to fall
back. Each segment (`isobmff.fragment_header` + its samples) is then read (`read_samples`) and
hashed at once (`read_hashed`), in a hashing thread.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import cast

from peerd.core.ids import Cid, cid_of
from peerd.errors import MediaError
from peerd.media import isobmff
from peerd.media.options import PackagingOptions
from peerd.media.probe import SourceInfo

log = logging.getLogger("peerd.media")


@dataclass
class Native:
    """An MP4/MOV source the native remux handles (see `peerd.media.isobmff`)."""

    fd: int
    video: isobmff.Track
    audio: isobmff.Track | None
    plan: isobmff.Plan


def _read_moov(fd: int, size: int) -> bytes:
    """The bytes of the file's top-level ``moov`` box; Unsupported if there is none."""
    off = 0
    while off + 8 <= size:
        head = os.pread(fd, 16, off)
        if len(head) < 8:
            break
        box_size, typ = int.from_bytes(head[:4], "big"), head[4:8]
        if box_size == 1:
            if len(head) < 16:
                break
            box_size = int.from_bytes(head[8:16], "big")
        elif box_size == 0:
            box_size = size - off
        if box_size < 8 or off + box_size > size:
            raise isobmff.Unsupported(f"top-level box {typ!r} at {off} has a bad size")
        if typ == b"moof":
            raise isobmff.Unsupported("fragmented MP4 source")
        if typ == b"moov":
            data = os.pread(fd, box_size, off)
            if len(data) != box_size:
                raise isobmff.Unsupported("short read of moov")
            return data
        off += box_size
    raise isobmff.Unsupported("no moov box")


def open_native(src: SourceInfo, opts: PackagingOptions) -> Native | None:
    """The native remux of a source whose video is remuxed, or None if it goes through PyAV.

    Native when: fMP4 output, the audio (if any) is copied, and `isobmff` understands the file
    (its module doc lists the rule). Decided before any blob is produced, from the file's bytes
    and the options alone, so it is the same on every node: a read error raises `MediaError`
    instead of choosing the other path.
    """
    if opts.container != "fmp4" or (src.audio is not None and not src.can_copy_audio("fmp4")):
        return None
    assert src.video is not None
    try:
        fd = os.open(src.path, os.O_RDONLY)
    except OSError as exc:
        raise MediaError(f"{src.path}: cannot read: {exc}", path=str(src.path)) from None
    try:
        movie = isobmff.parse_movie(_read_moov(fd, src.size), src.size)
        by_index = {t.index: t for t in movie.tracks}
        video = by_index.get(src.video.index)
        audio = by_index.get(src.audio.index) if src.audio is not None else None
        if video is None or video.handler != b"vide":
            raise isobmff.Unsupported("the probed video stream is not an MP4 video track")
        if src.audio is not None and (audio is None or audio.handler != b"soun"):
            raise isobmff.Unsupported("the probed audio stream is not an MP4 audio track")
        step = Fraction(opts.segment_seconds).limit_denominator(1000)
        cuts = isobmff.plan(video, audio, step)
    except (isobmff.Unsupported, struct.error) as exc:
        os.close(fd)
        log.debug("remux through PyAV", extra={"path": str(src.path), "reason": str(exc)})
        return None
    except OSError as exc:
        os.close(fd)
        raise MediaError(f"{src.path}: cannot read: {exc}", path=str(src.path)) from None
    return Native(fd, video, audio, cuts)


Read = Callable[[], tuple[bytes, Cid]]
"""Reads one segment and returns its bytes and cid (run in a hashing thread)."""


def sample_ranges(runs: list[isobmff.TrackRun]) -> list[tuple[int, int]]:
    """The runs' samples as (offset, end) file ranges in segment order, contiguous ones merged."""
    ranges: list[tuple[int, int]] = []
    for r in runs:
        offs, sizes = r.track.offsets, r.track.sizes
        for i in range(r.i0, r.i1):
            o = offs[i]
            e = o + sizes[i]
            if ranges and ranges[-1][1] == o:
                ranges[-1] = (ranges[-1][0], e)
            else:
                ranges.append((o, e))
    return ranges


def read_samples(fd: int, path: Path, header: bytes, ranges: list[tuple[int, int]]) -> bytes:
    """header + the ranges' bytes in order, each range read straight into its place."""
    own = bytearray(len(header) + sum(e - o for o, e in ranges))
    own[: len(header)] = header
    at = len(header)
    with memoryview(own) as out:
        for o, e in ranges:
            if os.preadv(fd, [out[at : at + e - o]], o) != e - o:
                raise MediaError(f"{path}: truncated or changed while reading", path=str(path))
            at += e - o
    # Bytes that nobody changes from here on (they are hashed and written): no copy to bytes.
    return cast("bytes", own)


def read_hashed(
    fd: int, path: Path, header: bytes, ranges: list[tuple[int, int]]
) -> tuple[bytes, Cid]:
    """`read_samples` and the cid of what it read, hashed while it is still in the cache."""
    data = read_samples(fd, path, header, ranges)
    return data, cid_of(data)
