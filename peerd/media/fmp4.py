"""ISO-BMFF box surgery for fragmented MP4 segments (pure byte handling, no libav).

libavformat's mp4 muxer, opened once per segment, writes ``ftyp``+``moov`` (the init segment) and
then one ``moof``+``mdat`` fragment whose decode times start at zero and whose sequence number is
1. A segment cut out of a longer timeline needs its real decode time (``tfdt``) and a sequence
number that grows along the rendition, so `split_init` separates the init segment and
`patch_fragments` rewrites ``mfhd`` and ``tfdt`` in place (same sizes, so no offsets move).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping

from peerd.errors import MediaError

_CONTAINERS = frozenset({b"moov", b"trak", b"mdia", b"minf", b"stbl", b"moof", b"traf", b"mvex"})


class BoxError(MediaError):
    """The bytes are not a well-formed sequence of ISO-BMFF boxes."""


def iter_boxes(
    data: bytes | bytearray | memoryview, start: int = 0, end: int | None = None
) -> Iterator[tuple[bytes, int, int]]:
    """Yield (type, offset, size) of each top-level box in data[start:end]."""
    end = len(data) if end is None else end
    off = start
    while off < end:
        if end - off < 8:
            raise BoxError(f"truncated box header at {off}")
        size, typ = struct.unpack_from(">I4s", data, off)
        header = 8
        if size == 1:
            if end - off < 16:
                raise BoxError(f"truncated large box header at {off}")
            (size,) = struct.unpack_from(">Q", data, off + 8)
            header = 16
        elif size == 0:
            size = end - off
        if size < header or off + size > end:
            raise BoxError(f"box {typ!r} at {off} has bad size {size}")
        yield typ, off, size
        off += size


def split_init(data: bytes) -> tuple[bytes, bytes]:
    """Split a muxer's output into (init segment = ftyp+moov, media segment = the rest)."""
    cut = init_end(data)
    return data[:cut], data[cut:]


def init_end(data: bytes | bytearray | memoryview) -> int:
    """Where the init segment (ftyp+moov) of a muxer's output ends."""
    for typ, off, size in iter_boxes(data):
        if typ == b"moov":
            return off + size
    raise BoxError("no moov box in fMP4 output")


def _find(
    data: bytes | bytearray | memoryview, start: int, end: int, want: bytes
) -> Iterator[tuple[int, int]]:
    for typ, off, size in iter_boxes(data, start, end):
        if typ == want:
            yield off, size


def track_ids(init: bytes) -> list[int]:
    """Track ids in the order of the ``trak`` boxes of an init segment."""
    out = []
    for moov, msize in _find(init, 0, len(init), b"moov"):
        for trak, tsize in _find(init, moov + 8, moov + msize, b"trak"):
            for tkhd, _ in _find(init, trak + 8, trak + tsize, b"tkhd"):
                version = init[tkhd + 8]
                pos = tkhd + 12 + (16 if version == 1 else 8)
                out.append(struct.unpack_from(">I", init, pos)[0])
    return out


def patch_fragments(segment: bytes, sequence: int, offsets: Mapping[int, int]) -> bytes:
    """Renumber fragments from `sequence` and shift each track's tfdt so the first is `offsets[id]`.

    `offsets` maps track id to the decode time (in the track's timescale) that the segment's
    first fragment of that track must carry; later fragments keep their distance to the first.
    """
    buf = bytearray(segment)
    patch_fragments_in_place(buf, 0, len(buf), sequence, offsets)
    return bytes(buf)


def patch_fragments_in_place(
    buf: bytearray | memoryview, start: int, end: int, sequence: int, offsets: Mapping[int, int]
) -> None:
    """`patch_fragments` on the boxes in ``buf[start:end]``, writing into ``buf`` itself.

    Why in place: the packager patches each segment inside the muxer's own buffer and copies it
    once into the blob, instead of copying every megabyte of ``mdat`` into a new object again.
    The patched fields keep their sizes, so no offset moves.
    """
    first: dict[int, int] = {}
    seq = sequence
    for typ, off, size in iter_boxes(buf, start, end):
        if typ != b"moof":
            continue
        for mfhd, _ in _find(buf, off + 8, off + size, b"mfhd"):
            struct.pack_into(">I", buf, mfhd + 12, seq)
        seq += 1
        for traf, tsize in _find(buf, off + 8, off + size, b"traf"):
            track = None
            for tfhd, _ in _find(buf, traf + 8, traf + tsize, b"tfhd"):
                (track,) = struct.unpack_from(">I", buf, tfhd + 12)
            if track is None or track not in offsets:
                continue
            for tfdt, _ in _find(buf, traf + 8, traf + tsize, b"tfdt"):
                version = buf[tfdt + 8]
                fmt = ">Q" if version == 1 else ">I"
                (written,) = struct.unpack_from(fmt, buf, tfdt + 12)
                base = first.setdefault(track, written)
                value = offsets[track] + (written - base)
                if version == 0 and value >= 1 << 32:
                    raise BoxError("tfdt overflows a version 0 box")
                struct.pack_into(fmt, buf, tfdt + 12, value)


def fragment_count(segment: bytes) -> int:
    """Number of ``moof`` boxes in a media segment."""
    return sum(1 for typ, _, _ in iter_boxes(segment) if typ == b"moof")


def codec_config(init: bytes, fourcc: bytes) -> bytes | None:
    """The payload of the first `fourcc` box (e.g. b"avcC", b"hvcC") inside an init segment."""
    idx = init.find(fourcc)
    if idx < 4:
        return None
    (size,) = struct.unpack_from(">I", init, idx - 4)
    return init[idx + 4 : idx - 4 + size]


__all__ = [
    "BoxError",
    "codec_config",
    "fragment_count",
    "init_end",
    "iter_boxes",
    "patch_fragments",
    "patch_fragments_in_place",
    "split_init",
    "track_ids",
]
