"""Fragmented MP4 written from live tracks and samples: an init segment and ``moof``+``mdat``
fragments (pure byte building, no libav).

Why not libavformat as the on-demand packager does (:mod:`peerd.media.mux`): a live part is a
fraction of a second, and a muxer opened per part would cost more than the part's bytes, while
the codec configuration arrives as bytes (``avcC``, AudioSpecificConfig, OpusHead) with no
stream to copy parameters from. The boxes are few and fixed, so they are written here by the
same rules: no clocks (creation and modification times 0), no names or version strings, one
fragment per part with ``mfhd`` numbering parts along the publication and ``tfdt`` the track's
decode time since media time zero. The bytes depend only on the samples, so the same input
gives the same parts and segments (and content ids) every time.

Layout: ``ftyp`` (iso6), ``moov`` (``mvhd``, one ``trak`` per track with an empty sample table
and an ``avc1``/``avcC``, ``mp4a``/``esds`` or ``Opus``/``dOps`` sample entry, ``mvex``/``trex``);
a fragment is ``moof`` (``mfhd``, one ``traf`` per track with samples: ``tfhd``
default-base-is-moof, ``tfdt`` version 1, ``trun`` version 1 with per-sample duration, size,
flags and signed composition offset) and one ``mdat`` holding the tracks' data in ``traf``
order.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from peerd.core.live import LiveTrack

_MATRIX = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
_SYNC = 0x02000000  # sample_depends_on = 2 (no other), is_non_sync = 0
_NON_SYNC = 0x01010000  # depends on others, non-sync


def box(kind: bytes, *payload: bytes) -> bytes:
    """An ISO-BMFF box of ``kind`` around ``payload``."""
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    """A full box (version and 24-bit flags first)."""
    return box(kind, struct.pack(">I", (version << 24) | flags), *payload)


@dataclass(frozen=True)
class Sample:
    """One access unit placed on its track's media clock."""

    dts: int  # decode time in the track's media timescale, since media time zero
    duration: int
    cts: int  # composition offset (pts - dts), may be negative
    keyframe: bool
    data: bytes


def media_timescale(track: LiveTrack) -> int:
    """The ``mdhd`` timescale of a track: audio at its sample rate (a frame's duration is then
    exact), video at the publisher's clock."""
    if track.kind == "audio" and track.sample_rate > 0:
        return track.sample_rate
    if track.codec == "opus":
        return 48000
    return track.timescale


def _descriptor(tag: int, body: bytes) -> bytes:
    n = len(body)
    size = bytes(
        [0x80 | (n >> 21) & 0x7F, 0x80 | (n >> 14) & 0x7F, 0x80 | (n >> 7) & 0x7F, n & 0x7F]
    )
    return bytes([tag]) + size + body


def _esds(track_id: int, asc: bytes) -> bytes:
    dec_specific = _descriptor(0x05, asc)
    # objectTypeIndication 0x40 (MPEG-4 audio), streamType 5 (audio) << 2 | 1, no bit rates.
    dec_config = _descriptor(
        0x04, struct.pack(">BB3sII", 0x40, 0x15, b"\0\0\0", 0, 0) + dec_specific
    )
    es = _descriptor(
        0x03, struct.pack(">HB", track_id, 0) + dec_config + _descriptor(0x06, b"\x02")
    )
    return full_box(b"esds", 0, 0, es)


def _dops(track: LiveTrack) -> bytes:
    head = track.config
    if len(head) >= 19 and head[:8] == b"OpusHead":
        channels = head[9]
        pre_skip, rate, gain = struct.unpack_from("<HIh", head, 10)
        family = head[18]
        table = head[19:] if family != 0 else b""
    else:  # WebRTC sends no OpusHead: stereo at 48 kHz, no pre-skip
        channels, pre_skip, rate, gain, family, table = track.channels or 2, 0, 48000, 0, 0, b""
    return box(b"dOps", struct.pack(">BBHIhB", 0, channels, pre_skip, rate, gain, family), table)


def _audio_entry(kind: bytes, track: LiveTrack, rate: int, child: bytes) -> bytes:
    channels = track.channels or 2
    return box(
        kind,
        b"\0" * 6,
        struct.pack(">H", 1),  # data_reference_index
        b"\0" * 8,
        struct.pack(">HHHH", channels, 16, 0, 0),
        struct.pack(">I", (rate if rate < 65536 else 0) << 16),
        child,
    )


def _sample_entry(track: LiveTrack, track_id: int) -> bytes:
    if track.codec == "h264":
        return box(
            b"avc1",
            b"\0" * 6,
            struct.pack(">H", 1),
            b"\0" * 16,
            struct.pack(">HH", track.width, track.height),
            struct.pack(">II", 0x00480000, 0x00480000),
            b"\0" * 4,
            struct.pack(">H", 1),  # frame_count
            b"\0" * 32,  # compressorname: none
            struct.pack(">Hh", 0x18, -1),
            box(b"avcC", track.config),
        )
    if track.codec == "aac":
        return _audio_entry(b"mp4a", track, track.sample_rate, _esds(track_id, track.config))
    return _audio_entry(b"Opus", track, 48000, _dops(track))


def _trak(track: LiveTrack, track_id: int) -> bytes:
    video = track.kind == "video"
    tkhd = full_box(
        b"tkhd",
        0,
        3,  # enabled, in movie
        struct.pack(">IIIII", 0, 0, track_id, 0, 0),
        b"\0" * 8,
        struct.pack(">hhhH", 0, 0, 0 if video else 0x0100, 0),
        _MATRIX,
        struct.pack(
            ">II", (track.width << 16) if video else 0, (track.height << 16) if video else 0
        ),
    )
    mdhd = full_box(
        b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, media_timescale(track), 0, 0x55C4, 0)
    )
    handler = b"vide" if video else b"soun"
    hdlr = full_box(b"hdlr", 0, 0, struct.pack(">I4s", 0, handler), b"\0" * 12, b"\0")
    header = full_box(b"vmhd", 0, 1, b"\0" * 8) if video else full_box(b"smhd", 0, 0, b"\0" * 4)
    dinf = box(b"dinf", full_box(b"dref", 0, 0, struct.pack(">I", 1), full_box(b"url ", 0, 1)))
    stbl = box(
        b"stbl",
        full_box(b"stsd", 0, 0, struct.pack(">I", 1), _sample_entry(track, track_id)),
        full_box(b"stts", 0, 0, struct.pack(">I", 0)),
        full_box(b"stsc", 0, 0, struct.pack(">I", 0)),
        full_box(b"stsz", 0, 0, struct.pack(">II", 0, 0)),
        full_box(b"stco", 0, 0, struct.pack(">I", 0)),
    )
    return box(b"trak", tkhd, box(b"mdia", mdhd, hdlr, box(b"minf", header, dinf, stbl)))


def init_segment(tracks: Sequence[LiveTrack]) -> bytes:
    """``ftyp`` + ``moov`` for ``tracks`` (track ids 1, 2, ... in order)."""
    ftyp = box(b"ftyp", b"iso6", struct.pack(">I", 0), b"iso6", b"iso5", b"mp41")
    mvhd = full_box(
        b"mvhd",
        0,
        0,
        struct.pack(">IIII", 0, 0, 1000, 0),
        struct.pack(">IH", 0x00010000, 0x0100),
        b"\0" * 10,
        _MATRIX,
        b"\0" * 24,
        struct.pack(">I", len(tracks) + 1),
    )
    traks = [_trak(t, i + 1) for i, t in enumerate(tracks)]
    trex = [
        full_box(b"trex", 0, 0, struct.pack(">IIIII", i + 1, 1, 0, 0, 0))
        for i in range(len(tracks))
    ]
    return ftyp + box(b"moov", mvhd, *traks, box(b"mvex", *trex))


def fragment(sequence: int, runs: Sequence[tuple[int, Sequence[Sample]]]) -> bytes:
    """One ``moof`` + ``mdat``: ``runs`` is (track id, samples) per track with samples; the
    first sample's ``dts`` is the track's ``tfdt``."""
    runs = [(tid, s) for tid, s in runs if s]

    def build(offsets: Sequence[int]) -> bytes:
        trafs = []
        for (tid, samples), offset in zip(runs, offsets, strict=True):
            entries = b"".join(
                struct.pack(
                    ">IIIi", s.duration, len(s.data), _SYNC if s.keyframe else _NON_SYNC, s.cts
                )
                for s in samples
            )
            trafs.append(
                box(
                    b"traf",
                    full_box(b"tfhd", 0, 0x020000, struct.pack(">I", tid)),
                    full_box(b"tfdt", 1, 0, struct.pack(">Q", samples[0].dts)),
                    full_box(
                        b"trun", 1, 0x000F01, struct.pack(">Ii", len(samples), offset), entries
                    ),
                )
            )
        return box(b"moof", full_box(b"mfhd", 0, 0, struct.pack(">I", sequence)), *trafs)

    # The data offsets are from the start of moof; its size does not depend on their values.
    size = len(build([0] * len(runs)))
    offsets = []
    at = size + 8
    for _, samples in runs:
        offsets.append(at)
        at += sum(len(s.data) for s in samples)
    data = b"".join(s.data for _, samples in runs for s in samples)
    return build(offsets) + box(b"mdat", data)
