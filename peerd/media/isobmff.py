"""Native MP4/MOV remux: sample tables in, CMAF-style fMP4 out (pure byte handling, no libav).

Why: remuxing through libav costs several Python calls per packet (demux, rescale, mux) and a
fresh muxer per segment. For an MP4/MOV source everything the packager needs is in the ``moov``
box: sample sizes and file offsets, decode times, composition offsets and sync samples. This
module reads those tables from the ``moov`` bytes, decides the segment cuts in integer ticks and
writes the init segment and each ``moof``+``mdat`` itself; the caller (`peerd.media.remux`)
only reads byte ranges of the file and hands the blobs to its sink.

Theory of operation
-------------------
* **Parsing.** `parse_movie` walks ``moov``: for each ``trak`` it keeps ``tkhd``, ``mdhd``,
  ``hdlr``, the media header (``vmhd``/``smhd``), ``dinf`` and ``stsd`` verbatim (the sample
  entry, with its ``avcC``/``hvcC``/``esds``/``dOps``, is copied as it is into the output) and
  expands ``stts``/``ctts``/``stss``/``stsc``/``stsz``/``stco``/``co64`` into per-sample lists.
* **Timeline.** As libavformat's mov demuxer presents it: a sample's presentation time is its
  composition time minus the media time of the track's edit, plus the length of a leading empty
  edit; decode times move by the same amount (so a B-frame delay makes the first decode times
  negative and AAC priming puts the first audio frame before zero).
* **Cutting** (`plan`), the rules of ``cut.Cutter`` on integers: video samples before the
  first sync sample are dropped; a segment starts at the first video sync sample whose
  presentation time is at or after the next multiple of `step` after the previous cut; audio
  goes to the segment whose video span contains its presentation time (earlier audio to the
  first, later to the last); a last segment shorter than a quarter step joins the one before.
  The timeline origin is the earliest of the first cut and the first video and audio decode
  times, and every ``tfdt`` is relative to it.
* **Writing.** `init_segment` writes ``ftyp`` + ``moov`` (empty sample tables, ``mvex``/``trex``)
  with the video track first (track id 1) and audio second (id 2); `fragment_header` writes one
  ``moof`` (``mfhd`` with the segment's sequence number, one ``traf`` per track with ``tfhd``
  (default-base-is-moof), ``tfdt`` v1 and ``trun``) plus the ``mdat`` header; the samples
  follow in the ``mdat``, video first, in decode order. HEVC ``hev1`` entries are renamed
  ``hvc1`` (what Apple players want; the libav path does the same).

Fallback rule: `Unsupported` is raised for anything this module does not handle exactly - no
``moov`` or a fragmented source (``moof``/``mvex``), more than one sample description, sample
entries other than ``avc1`` (H.264; ``avc3`` with in-band parameter sets is not), ``hvc1``/
``hev1``, ``mp4a`` and ``Opus``, external data references, edit lists other than (one
optional empty edit, then) one normal-rate edit that keeps the media to its end, sample tables
that disagree with each other or point past the end of the file. The packager then uses the
PyAV path, which also gives the user-facing errors for corrupt and truncated files.
"""

from __future__ import annotations

import math
import struct
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from itertools import accumulate

from peerd.errors import MediaError

VIDEO_ENTRIES = frozenset({b"avc1", b"hvc1", b"hev1"})
AUDIO_ENTRIES = frozenset({b"mp4a", b"Opus"})
TIMESCALE = 90_000

_SYNC_FLAGS = 0x02000000  # sample_depends_on = 2 (an I picture)
_NON_SYNC_FLAGS = 0x01010000  # depends on others, sample_is_non_sync_sample


class Unsupported(MediaError):
    """This file cannot be remuxed natively (the reason is the message); use the PyAV path.

    :mod:`peerd.media.remux` catches it and falls back; it reaches nobody else."""


@dataclass
class Track:
    """One ``trak`` of the source: the boxes copied into the output and per-sample tables.

    `dts` are decode times in the track's timescale, already moved onto the presentation
    timeline (see the module doc); `cto` composition offsets (pts = dts + cto); `durations`
    from ``stts``; `offsets`/`sizes` the sample bytes in the file.
    """

    index: int
    track_id: int
    handler: bytes
    timescale: int
    tkhd: bytes
    mdhd: bytes
    hdlr: bytes
    media_header: bytes
    stsd: bytes
    entry: bytes
    dts: list[int]
    cto: list[int]
    durations: list[int]
    sizes: list[int]
    offsets: list[int]
    sync: list[bool]
    width: int = 0
    height: int = 0


@dataclass(frozen=True)
class Movie:
    """The parsed ``moov``: movie timescale and tracks in file order."""

    timescale: int
    tracks: tuple[Track, ...]


@dataclass(frozen=True)
class SegmentPlan:
    """One output segment: sample index ranges [v0, v1) and [a0, a1), times in seconds."""

    v0: int
    v1: int
    a0: int
    a1: int
    start: Fraction
    end: Fraction


@dataclass(frozen=True)
class Plan:
    """The cuts of a whole file, the timeline origin and what the manifest needs."""

    segments: tuple[SegmentPlan, ...]
    origin: Fraction
    start_ticks: int
    video_end: Fraction
    first_start: Fraction

    def begin_ticks(self, seq: int) -> int:
        """Start of segment `seq` in 90 kHz ticks from the origin (segment 0: `start_ticks`)."""
        if seq == 0:
            return self.start_ticks
        return _ticks(self.segments[seq].start - self.origin)

    def duration_ticks(self, seq: int) -> int:
        """Duration of segment `seq` in 90 kHz ticks (at least 1), as the playlist states it."""
        end = _ticks(self.segments[seq].end - self.origin)
        return max(end - self.begin_ticks(seq), 1)


def _ticks(t: Fraction) -> int:
    return math.floor(t * TIMESCALE + Fraction(1, 2))


def rescale(t: Fraction, timescale: int) -> int:
    """`t` seconds in units of 1/timescale, rounded half up."""
    return math.floor(t * timescale + Fraction(1, 2))


# ---- parsing ---------------------------------------------------------------------------------


def boxes(
    data: bytes | memoryview, start: int = 0, end: int | None = None
) -> Iterator[tuple[bytes, int, int, int]]:
    """Yield (type, offset, header size, size) of each box in data[start:end]; Unsupported if
    they are not well formed."""
    end = len(data) if end is None else end
    off = start
    while off < end:
        if end - off < 8:
            raise Unsupported(f"truncated box header at {off}")
        size, typ = struct.unpack_from(">I4s", data, off)
        header = 8
        if size == 1:
            if end - off < 16:
                raise Unsupported(f"truncated box header at {off}")
            (size,) = struct.unpack_from(">Q", data, off + 8)
            header = 16
        elif size == 0:
            size = end - off
        if size < header or off + size > end:
            raise Unsupported(f"box {typ!r} at {off} has a bad size")
        yield typ, off, header, size
        off += size


def _children(data: bytes, off: int, header: int, size: int) -> dict[bytes, tuple[int, int, int]]:
    out: dict[bytes, tuple[int, int, int]] = {}
    for typ, o, h, s in boxes(data, off + header, off + size):
        out.setdefault(typ, (o, h, s))
    return out


def _full(data: bytes, box: tuple[int, int, int]) -> tuple[int, int, int]:
    """(version, payload start after version/flags, end) of a full box."""
    off, header, size = box
    if size < header + 4:
        raise Unsupported("truncated full box")
    return data[off + header], off + header + 4, off + size


def _table(data: bytes, box: tuple[int, int, int], fields: int, fmt: str = "I") -> list[int]:
    _, p, end = _full(data, box)
    if end - p < 4:
        raise Unsupported("truncated sample table")
    (n,) = struct.unpack_from(">I", data, p)
    width = 4 if fmt in "Ii" else 8
    if p + 4 + n * fields * width > end:
        raise Unsupported("sample table longer than its box")
    return list(struct.unpack_from(f">{n * fields}{fmt}", data, p + 4))


def _edit_shift(
    data: bytes, elst: tuple[int, int, int] | None, movie_ts: int, ts: int, media_len: int
) -> int:
    """Ticks to add to composition times to get presentation times (see the module doc)."""
    if elst is None:
        return 0
    version, p, end = _full(data, elst)
    (n,) = struct.unpack_from(">I", data, p)
    fmt, width = (">QqHH", 20) if version == 1 else (">IiHH", 12)
    if p + 4 + n * width > end:
        raise Unsupported("edit list longer than its box")
    edits = [struct.unpack_from(fmt, data, p + 4 + i * width) for i in range(n)]
    empty = 0
    if edits and edits[0][1] == -1:
        empty = edits[0][0]
        edits = edits[1:]
    if len(edits) != 1:
        raise Unsupported(f"edit list with {len(edits)} media edits")
    duration, media_time, rate_int, rate_frac = edits[0]
    if media_time < 0 or (rate_int, rate_frac) != (1, 0):
        raise Unsupported("edit list with a dwell or a rate other than 1")
    if duration and movie_ts:
        kept = duration * ts // movie_ts
        if media_time + kept < media_len - ts // 2:
            raise Unsupported("edit list cuts the track short")
    return rescale(Fraction(empty, movie_ts or 1), ts) - int(media_time)


def _sample_entry(data: bytes, stsd: tuple[int, int, int]) -> tuple[bytes, int, int]:
    """(fourcc, width, height) of the one sample description."""
    _, p, end = _full(data, stsd)
    (n,) = struct.unpack_from(">I", data, p)
    if n != 1:
        raise Unsupported(f"{n} sample descriptions")
    entries = list(boxes(data, p + 4, end))
    if len(entries) != 1:
        raise Unsupported("malformed sample description")
    typ, off, header, size = entries[0]
    if stsd[1] != 8 or header != 8:
        raise Unsupported("64-bit sizes in the sample description")  # init_segment needs 8
    width = height = 0
    if typ in VIDEO_ENTRIES:
        if size < header + 36:
            raise Unsupported("truncated visual sample entry")
        width, height = struct.unpack_from(">HH", data, off + header + 24)
    return typ, width, height


def _track(
    data: bytes, trak: tuple[int, int, int], index: int, movie_ts: int, file_size: int
) -> Track | None:
    kids = _children(data, *trak)
    mdia = kids.get(b"mdia")
    tkhd = kids.get(b"tkhd")
    if mdia is None or tkhd is None:
        raise Unsupported("trak without tkhd or mdia")
    mk = _children(data, *mdia)
    if b"mdhd" not in mk or b"hdlr" not in mk or b"minf" not in mk:
        raise Unsupported("mdia without mdhd, hdlr or minf")
    _, hp, _ = _full(data, mk[b"hdlr"])
    handler = data[hp + 4 : hp + 8]
    if handler not in (b"vide", b"soun"):
        return None
    version, mp, _ = _full(data, mk[b"mdhd"])
    (ts,) = struct.unpack_from(">I", data, mp + (16 if version == 1 else 8))
    if ts == 0:
        raise Unsupported("timescale 0")
    minf = _children(data, *mk[b"minf"])
    mhd = minf.get(b"vmhd" if handler == b"vide" else b"smhd")
    dinf = minf.get(b"dinf")
    stbl_box = minf.get(b"stbl")
    if mhd is None or stbl_box is None:
        raise Unsupported("minf without a media header or stbl")
    if dinf is not None:
        dref = _children(data, *dinf).get(b"dref")
        if dref is not None:
            _, dp, dend = _full(data, dref)
            for _typ, o, _h, _s in boxes(data, dp + 4, dend):
                if not data[o + 11] & 1:  # flag 1: the data is in this file
                    raise Unsupported("external data reference")
    st = _children(data, *stbl_box)
    for need in (b"stsd", b"stts", b"stsc", b"stsz"):
        if need not in st:
            raise Unsupported(f"stbl without {need.decode()}")
    entry, width, height = _sample_entry(data, st[b"stsd"])
    allowed = VIDEO_ENTRIES if handler == b"vide" else AUDIO_ENTRIES
    if entry not in allowed:
        raise Unsupported(f"sample entry {entry.decode('latin-1')!r}")

    # stsz: one size for all, or one per sample.
    _, zp, zend = _full(data, st[b"stsz"])
    uniform, count = struct.unpack_from(">II", data, zp)
    if uniform:
        sizes = [uniform] * count
    else:
        if zp + 8 + 4 * count > zend:
            raise Unsupported("stsz longer than its box")
        sizes = list(struct.unpack_from(f">{count}I", data, zp + 8))
    if count == 0:
        raise Unsupported("track without samples (fragmented source?)")

    stts = _table(data, st[b"stts"], 2)
    durations: list[int] = []
    for i in range(0, len(stts), 2):
        durations += [stts[i + 1]] * stts[i]
    if len(durations) != count:
        raise Unsupported("stts and stsz disagree")
    raw_dts = [0, *accumulate(durations)]
    media_len = raw_dts[-1]
    del raw_dts[-1]

    cto = [0] * count
    if b"ctts" in st:
        version = data[st[b"ctts"][0] + st[b"ctts"][1]]
        ctts = _table(data, st[b"ctts"], 2, "i" if version == 1 else "I")
        cto = []
        for i in range(0, len(ctts), 2):
            if version == 0 and ctts[i + 1] >= 1 << 31:
                ctts[i + 1] -= 1 << 32  # some writers store negative offsets in version 0
            cto += [ctts[i + 1]] * ctts[i]
        if len(cto) != count:
            raise Unsupported("ctts and stsz disagree")

    if b"stss" in st:
        sync = [False] * count
        for s in _table(data, st[b"stss"], 1):
            if not 1 <= s <= count:
                raise Unsupported("stss names a sample that does not exist")
            sync[s - 1] = True
    else:
        sync = [True] * count

    if b"stco" in st:
        chunks = _table(data, st[b"stco"], 1)
    elif b"co64" in st:
        chunks = _table(data, st[b"co64"], 1, "Q")
    else:
        raise Unsupported("stbl without stco/co64")
    stsc = _table(data, st[b"stsc"], 3)
    offsets: list[int] = []
    n_chunks = len(chunks)
    runs = [(stsc[i], stsc[i + 1], stsc[i + 2]) for i in range(0, len(stsc), 3)]
    for r, (first, per, desc) in enumerate(runs):
        if desc != 1:
            raise Unsupported("sample description index other than 1")
        last = runs[r + 1][0] - 1 if r + 1 < len(runs) else n_chunks
        if not 1 <= first <= last + 1 or last > n_chunks:
            raise Unsupported("stsc does not match stco")
        for c in range(first - 1, last):
            pos = chunks[c]
            k = len(offsets)
            for size in sizes[k : k + per]:
                offsets.append(pos)
                pos += size
    if len(offsets) != count:
        raise Unsupported("stsc/stco and stsz disagree")
    if max(o + s for o, s in zip(offsets, sizes, strict=True)) > file_size:
        raise Unsupported("sample data past the end of the file (truncated)")

    edts = kids.get(b"edts")
    elst = _children(data, *edts).get(b"elst") if edts is not None else None
    shift = _edit_shift(data, elst, movie_ts, ts, media_len)
    dts = [t + shift for t in raw_dts] if shift else raw_dts
    (track_id,) = struct.unpack_from(
        ">I", data, _full(data, tkhd)[1] + (16 if data[tkhd[0] + tkhd[1]] == 1 else 8)
    )
    return Track(
        index=index,
        track_id=track_id,
        handler=handler,
        timescale=ts,
        tkhd=_box_bytes(data, tkhd),
        mdhd=_box_bytes(data, mk[b"mdhd"]),
        hdlr=_box_bytes(data, mk[b"hdlr"]),
        media_header=_box_bytes(data, mhd),
        stsd=_box_bytes(data, st[b"stsd"]),
        entry=entry,
        dts=dts,
        cto=cto,
        durations=durations,
        sizes=sizes,
        offsets=offsets,
        sync=sync,
        width=width,
        height=height,
    )


def _box_bytes(data: bytes, box: tuple[int, int, int]) -> bytes:
    off, _, size = box
    return data[off : off + size]


def parse_movie(moov: bytes, file_size: int) -> Movie:
    """Parse a ``moov`` box (its whole bytes, header included) of a file of `file_size` bytes.

    Only video and audio tracks are kept, in file order (`Track.index` counts every trak).
    Raises `Unsupported`.
    """
    top = list(boxes(moov))
    if len(top) != 1 or top[0][0] != b"moov":
        raise Unsupported("not a moov box")
    kids = list(boxes(moov, top[0][2], top[0][3]))
    if any(t == b"mvex" for t, _, _, _ in kids):
        raise Unsupported("fragmented MP4 source")
    mvhd = next(((o, h, s) for t, o, h, s in kids if t == b"mvhd"), None)
    if mvhd is None:
        raise Unsupported("moov without mvhd")
    version, p, _ = _full(moov, mvhd)
    (movie_ts,) = struct.unpack_from(">I", moov, p + (16 if version == 1 else 8))
    tracks = []
    traks = [(o, h, s) for t, o, h, s in kids if t == b"trak"]
    for index, trak in enumerate(traks):
        # libavformat makes one stream per trak, so `index` is the probe's stream index.
        tr = _track(moov, trak, index, movie_ts, file_size)
        if tr is not None:
            tracks.append(tr)
    return Movie(movie_ts, tuple(tracks))


# ---- cutting ---------------------------------------------------------------------------------


def plan(video: Track, audio: Track | None, step: Fraction) -> Plan:
    """Cut the file into segments by the rules in the module doc; Unsupported if no sync sample."""
    vts = video.timescale
    try:
        first = video.sync.index(True)
    except ValueError:
        raise Unsupported("no video sync sample") from None
    vdts, vcto, vdur = video.dts, video.cto, video.durations
    n = len(vdts)
    # Cut points as video sample indices; `grid` the next multiple of step (in video ticks
    # it is a fraction, so the comparison pts >= grid is done as pts * den >= num * vts).
    starts = [first]
    start_pts = [vdts[first] + vcto[first]]

    def grid_after(pts: int) -> Fraction:
        return (math.floor(Fraction(pts, vts) / step) + 1) * step

    nxt = grid_after(start_pts[0])
    num, den = nxt.numerator, nxt.denominator
    video_end = start_pts[0] + vdur[first]
    sync = video.sync
    for i in range(first + 1, n):
        pts = vdts[i] + vcto[i]
        if sync[i] and pts * den >= num * vts:
            starts.append(i)
            start_pts.append(pts)
            nxt = grid_after(pts)
            num, den = nxt.numerator, nxt.denominator
        end = pts + vdur[i]
        if end > video_end:
            video_end = end
    bounds = [Fraction(p, vts) for p in start_pts]
    vend = Fraction(video_end, vts)
    last_end = max(vend, bounds[-1] + Fraction(1, TIMESCALE))
    ends = [*bounds[1:], last_end]
    if len(starts) >= 2 and ends[-1] - bounds[-1] < step / 4:
        starts.pop()
        bounds.pop()
        ends.pop()
        ends[-1] = last_end
    # Audio: the segment whose span holds its pts; before the first cut -> the first segment.
    a_cuts = [0] * len(starts)
    a_total = 0
    first_audio_dts: Fraction | None = None
    first_audio_pts: Fraction | None = None
    if audio is not None and audio.dts:
        ats = audio.timescale
        apts = [d + c for d, c in zip(audio.dts, audio.cto, strict=True)]
        if any(b < a for a, b in zip(apts, apts[1:], strict=False)):
            raise Unsupported("audio presentation times go backwards")
        a_total = len(apts)
        for k in range(1, len(starts)):
            # The first audio sample with pts >= the cut (pts are integers: >= ceil(cut)).
            a_cuts[k] = bisect_left(apts, math.ceil(bounds[k] * ats))
        first_audio_dts = Fraction(audio.dts[0], ats)
        first_audio_pts = Fraction(apts[0], ats)
    segs = []
    for k in range(len(starts)):
        v1 = starts[k + 1] if k + 1 < len(starts) else n
        a1 = a_cuts[k + 1] if k + 1 < len(starts) else a_total
        segs.append(SegmentPlan(starts[k], v1, a_cuts[k], a1, bounds[k], ends[k]))
    cands = [bounds[0], Fraction(vdts[first], vts)]
    if first_audio_dts is not None:
        cands.append(first_audio_dts)
    origin = min(cands)
    lead = min([bounds[0]] + ([first_audio_pts] if first_audio_pts is not None else []))
    start_ticks = _ticks(max(lead, origin) - origin)
    return Plan(tuple(segs), origin, start_ticks, vend, bounds[0])


# ---- writing ---------------------------------------------------------------------------------


def _box(typ: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), typ) + body


def _fullbox(typ: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(typ, struct.pack(">I", (version << 24) | flags), *payload)


def _zero_duration(box: bytes, fields: tuple[int, int]) -> bytes:
    """Set the duration field of a tkhd/mdhd (offsets after the header for version 0 / 1)."""
    version = box[8]
    b = bytearray(box)
    if version == 1:
        struct.pack_into(">Q", b, fields[1], 0)
    else:
        struct.pack_into(">I", b, fields[0], 0)
    return bytes(b)


def _tkhd(src: bytes, track_id: int) -> bytes:
    b = bytearray(_zero_duration(src, (28, 36)))
    struct.pack_into(">I", b, 28 if b[8] == 1 else 20, track_id)
    b[9:12] = b"\x00\x00\x03"  # enabled, in movie
    return bytes(b)


def init_segment(tracks: list[Track]) -> bytes:
    """``ftyp`` + ``moov`` for these tracks (ids 1, 2, ... in this order), no samples."""
    ftyp = _box(b"ftyp", b"iso5", struct.pack(">I", 512), b"iso5iso6mp41")
    matrix = struct.pack(">9I", 0x10000, 0, 0, 0, 0x10000, 0, 0, 0, 0x40000000)
    mvhd = _fullbox(
        b"mvhd",
        0,
        0,
        struct.pack(">IIII", 0, 0, 1000, 0),
        struct.pack(">IH10x", 0x10000, 0x100),
        matrix,
        bytes(24),
        struct.pack(">I", len(tracks) + 1),
    )
    empty = (
        _fullbox(b"stts", 0, 0, bytes(4))
        + _fullbox(b"stsc", 0, 0, bytes(4))
        + _fullbox(b"stsz", 0, 0, bytes(8))
        + _fullbox(b"stco", 0, 0, bytes(4))
    )
    dinf = _box(b"dinf", _fullbox(b"dref", 0, 0, struct.pack(">I", 1), _fullbox(b"url ", 0, 1)))
    traks = []
    trex = []
    for tid, t in enumerate(tracks, start=1):
        stsd = t.stsd
        if t.entry == b"hev1":
            # stsd header (8), version/flags (4), entry count (4), entry size (4), entry type.
            stsd = stsd[:20] + b"hvc1" + stsd[24:]
        stbl = _box(b"stbl", stsd, empty)
        minf = _box(b"minf", t.media_header, dinf, stbl)
        mdia = _box(b"mdia", _zero_duration(t.mdhd, (24, 32)), t.hdlr, minf)
        traks.append(_box(b"trak", _tkhd(t.tkhd, tid), mdia))
        trex.append(_fullbox(b"trex", 0, 0, struct.pack(">IIIII", tid, 1, 0, 0, 0)))
    moov = _box(b"moov", mvhd, *traks, _box(b"mvex", *trex))
    return ftyp + moov


@dataclass(frozen=True)
class TrackRun:
    """The samples [i0, i1) of one track that go into a fragment, and its decode time there."""

    track: Track
    i0: int
    i1: int
    base_dts: int


def fragment_header(sequence: int, runs: list[TrackRun]) -> bytes:
    """``moof`` + ``mdat`` header for these runs (track ids 1, 2, ... in order); the caller
    appends the runs' sample bytes, in the same order, to make the ``mdat``."""
    # Sizes first: the trun data offsets point past the moof into the mdat payload. A run whose
    # samples all last as long states that once, in tfhd (a smaller moof).
    parts: list[tuple[int, int, int | None, bytes]] = []  # (trun version+flags, n, default, rows)
    payload = 0
    for r in runs:
        t = r.track
        n = r.i1 - r.i0
        sizes = t.sizes[r.i0 : r.i1]
        durs = t.durations[r.i0 : r.i1]
        default = durs[0] if min(durs) == max(durs) else None
        cols: list[list[int]] = [] if default is not None else [durs]
        cols.append(sizes)
        fmt = "I" * len(cols)
        trun_flags = 0x201 if default is not None else 0x301
        if t.handler == b"vide":
            ctos = t.cto[r.i0 : r.i1]
            cols.append([_SYNC_FLAGS if s else _NON_SYNC_FLAGS for s in t.sync[r.i0 : r.i1]])
            cols.append(ctos)
            signed = any(c < 0 for c in ctos)
            fmt += "Ii" if signed else "II"
            trun_flags |= 0xC00 | (1 << 24 if signed else 0)
        flat = [x for row in zip(*cols, strict=True) for x in row]
        parts.append((trun_flags, n, default, struct.pack(">" + fmt * n, *flat)))
        payload += sum(sizes)
    traf_sizes = [
        8 + 20 + (4 if d is not None else 0) + 20 + 20 + len(rows) for _, _, d, rows in parts
    ]  # traf header, tfhd, tfdt, trun header + rows
    moof_size = 8 + 16 + sum(traf_sizes)
    data_offset = moof_size + 8
    trafs = []
    for tid, (r, (trun_flags, n, default, rows)) in enumerate(zip(runs, parts, strict=True), 1):
        sample_flags = 0 if r.track.handler == b"vide" else _SYNC_FLAGS
        if default is None:
            tfhd = _fullbox(b"tfhd", 0, 0x020020, struct.pack(">II", tid, sample_flags))
        else:
            tfhd = _fullbox(b"tfhd", 0, 0x020028, struct.pack(">III", tid, default, sample_flags))
        tfdt = _fullbox(b"tfdt", 1, 0, struct.pack(">Q", r.base_dts))
        version, fl = trun_flags >> 24, trun_flags & 0xFFFFFF
        trun = _fullbox(b"trun", version, fl, struct.pack(">Ii", n, data_offset), rows)
        trafs.append(_box(b"traf", tfhd, tfdt, trun))
        data_offset += sum(r.track.sizes[r.i0 : r.i1])
    moof = _box(b"moof", _fullbox(b"mfhd", 0, 0, struct.pack(">I", sequence)), *trafs)
    assert len(moof) == moof_size
    return moof + struct.pack(">I4s", 8 + payload, b"mdat")


__all__ = [
    "Movie",
    "Plan",
    "SegmentPlan",
    "Track",
    "TrackRun",
    "Unsupported",
    "boxes",
    "fragment_header",
    "init_segment",
    "parse_movie",
    "plan",
    "rescale",
]
