"""The packager: one input file -> content-addressed HLS segments and a `Manifest` (blocking).

Everything here is synchronous work meant to run in a worker thread (`peerd.media.ingest` does
that); blobs leave through a `Sink` callback that the caller wires to the BlobStore. The stages
live in their own modules: the cutter (`peerd.media.cut`), the muxer (`peerd.media.mux`), the
transcoder and derived rungs (`peerd.media.transcode`) and the native MP4/MOV remux
(`peerd.media.remux` over `peerd.media.isobmff`); this module runs them.

Theory of operation
-------------------
1. **Top rendition.** If the source video is H.264/HEVC (and `transcode = "auto"`, within
   `max_height`), its packets are remuxed as they are; otherwise it is transcoded. AAC (and Opus
   in fMP4) audio is copied, anything else becomes AAC. Which path remuxes is the rule of
   `PACKAGER_VERSION`: the native remux for every input it accepts, libav for everything else.
2. **Native remux** (`_native_top_pass`): reads the sample tables from the ``moov``, cuts in
   integer ticks by the cutter's rules and writes init segment and fragments itself; each
   segment's samples are read (`peerd.media.remux.read_samples`) and hashed at once in a
   hashing thread.
3. **libav path** (`_top_pass`): demux (and for a transcode decode, scale and encode), cut,
   mux each segment.
4. **Lower rungs and audio-only.** Derived from the top rendition one segment at a time
   (`peerd.media.transcode.derive_segment`), at ingest for eager rungs and later for on-demand
   ones, with the same bytes either way.
5. **Alternate tracks** (`peerd.media.tracks`): when a file has several audio streams, every
   one of them (the video renditions then carry none; a file with one audio stream is packaged
   as before), and the text subtitles, cut along the top rendition's segments and listed as
   ``EXT-X-MEDIA`` tracks with their language and default flags. A file without video becomes
   audio-only renditions on a ``segment_seconds`` grid. Streams that cannot be packaged (bitmap
   subtitles) are logged and reported (`SourceInfo.warnings`).

Blob bytes, and so the media id, are a function of (input bytes, `PackagingOptions`,
`PACKAGER_VERSION`) only; the manifest records the version and the path that made the top
rendition (`Manifest.packager`), so a change of either shows as a new media id, never as a
silent difference between nodes.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import av.error

from peerd.core.ids import Cid, cid_of
from peerd.core.manifest import (
    LANGUAGE_RE,
    Alternate,
    Manifest,
    Packager,
    Recipe,
    Rendition,
    RenditionKind,
    Segment,
)
from peerd.errors import MediaError, PeerdError
from peerd.media import codecs, fmp4, isobmff
from peerd.media import remux as remuxer
from peerd.media.cut import TIMESCALE, Cutter, Seg, fill_dts, rescale, t_of, ticks
from peerd.media.mux import SegmentBytes, SegmentMuxer
from peerd.media.options import PackagingOptions, Rung
from peerd.media.probe import AudioInfo, SourceInfo, SubtitleInfo, file_identity, open_input, probe
from peerd.media.tracks import AAC_RATES, Timeline, Track, track_pass
from peerd.media.transcode import (
    Scaler,
    SeiFilter,
    add_x264,
    derive_segment,
    new_holder,
    prepare_frame,
    scaled_size,
    x264_codec_string,
)

log = logging.getLogger("peerd.media")

PACKAGER_VERSION = 2
"""The packager's format version, recorded in every manifest it makes (`Manifest.packager`).

Version 1: the top rendition of a source whose video is remuxed into fMP4, whose audio (if any)
is copied and whose file `peerd.media.isobmff` accepts is made by the native remux
(`peerd.media.remux.open_native`); every other top rendition, and every derived rendition, by
libav. Version 2: MPEG-TS segments are padded to whole continuity-counter cycles per PID
(`peerd.media.mpegts`). Raise it whenever a change makes different bytes from the same input and
options."""

Sink = Callable[[bytes, str, Cid], Cid]
"""Stores one blob (bytes, kind "init" | "segment", its content id) and returns the id; may block.

Called from one helper thread, in the order the blobs are produced (see `_Job.put`); the id is
already computed (`cid_of(data)`, in a hashing thread), so the sink does not hash again."""

HASH_THREADS = 2

MAX_QUEUED = 2

Progress = Callable[[float], None]
"""Called with the number of media seconds done so far (across every pass)."""


class Cancelled(PeerdError):
    """The packaging job was cancelled."""

    code = "cancelled"


# ---- the passes ------------------------------------------------------------------------------


@dataclass
class _Job:
    src: SourceInfo
    opts: PackagingOptions
    sink: Sink
    progress: Progress | None
    cancel: threading.Event | None
    top_done: float = 0.0
    extra_done: float = 0.0
    blobs: list[Future[Cid]] = field(default_factory=list)
    reads: list[Future[tuple[bytes, Cid]]] = field(default_factory=list)
    # The sink runs in this one helper thread, in call order: hashing and storing a segment
    # (sha256 and the write release the GIL) overlap the demuxing and muxing of the next.
    pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="peerd-sink")
    )
    # Hashing is most of the work of a native remux (sha256 of every byte); hashlib releases the
    # GIL on big buffers, so blobs are hashed here, several at once, before the sink gets them.
    hasher: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(HASH_THREADS, thread_name_prefix="peerd-hash")
    )

    def check(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled(f"{self.src.path}: ingest cancelled")

    def still_there(self) -> None:
        ident = file_identity(self.src.path)
        if ident != (self.src.inode, self.src.size, self.src.mtime_ns):
            raise MediaError(
                f"{self.src.path}: file was replaced or modified during ingest",
                path=str(self.src.path),
            )

    def put(self, data: bytes, kind: str) -> Future[Cid]:
        """Hand a blob to the sink (in the helper thread); its cid is the future's result."""
        digest = self.hasher.submit(cid_of, data)
        return self._to_sink(lambda: (data, digest.result()), kind)

    def put_read(
        self, read: remuxer.Read, kind: str
    ) -> tuple[Future[Cid], Future[tuple[bytes, Cid]]]:
        """Like :meth:`put` for a blob that ``read`` makes and hashes in a hashing thread.

        Reading a segment and hashing it in the same thread, at once, finds its bytes still in
        the CPU's cache: the 120 s 1080p remux reads and hashes its 92 MB in ~30 ms on two
        threads this way, against ~80 ms when the packaging thread read each segment and a
        hashing thread hashed it later (and the whole remux ~30% slower in this process, measured
        again for issue 18). Reads not yet finished are kept in :attr:`reads` (finished ones are
        dropped: their results hold the segments' bytes). Returns the sink's future and the
        read's, whose bytes derived rungs wait for.
        """
        got = self.hasher.submit(read)
        self.reads = [f for f in self.reads if not f.done()]
        self.reads.append(got)
        return self._to_sink(got.result, kind), got

    def _to_sink(self, ready: Callable[[], tuple[bytes, Cid]], kind: str) -> Future[Cid]:
        def store() -> Cid:
            data, cid = ready()
            return self.sink(data, kind, cid)

        fut = self.pool.submit(store)
        self.blobs.append(fut)
        # At most MAX_QUEUED blobs wait for the sink (bounded memory); a sink error (e.g. a
        # full store) stops packaging at the next blob instead of at the end.
        waiting = [f for f in self.blobs if not f.done()]
        if len(waiting) > MAX_QUEUED:
            waiting[0].result()
        for f in self.blobs:
            if f.done() and f.exception() is not None:
                f.result()
        return fut

    def close(self) -> None:
        """Wait for every blob handed to the sink (whatever happened), then stop the threads."""
        self.pool.shutdown(wait=True)
        self.hasher.shutdown(wait=True)


@dataclass
class _Out:
    """A rendition being produced: its segments' (duration ticks, cid, size)."""

    rid: str
    kind: RenditionKind
    muxer: SegmentMuxer | None = None
    init_cid: Future[Cid] | None = None
    segs: list[tuple[int, Future[Cid], int]] = field(default_factory=list)
    codecs: str = ""
    width: int | None = None
    height: int | None = None
    recipe: Recipe | None = None
    mux_init: bytes | None = None
    origin: Fraction = Fraction(0)
    """Source time (seconds) of tick 0 of the top rendition's timeline."""


def _wrap_av(path: Path, exc: Exception, where: str) -> MediaError:
    return MediaError(f"{path}: corrupt or truncated media {where}: {exc}", path=str(path))


def package(
    path: Path,
    opts: PackagingOptions,
    sink: Sink,
    *,
    progress: Progress | None = None,
    cancel: threading.Event | None = None,
    info: SourceInfo | None = None,
) -> tuple[Manifest, SourceInfo]:
    """Package `path` into blobs (through `sink`) and return (manifest, source info).

    `info` is the caller's `probe(path)` if it already has one (saves opening the file twice).
    Raises MediaError naming the file and the reason for bad input, `Cancelled` when `cancel` is
    set, and whatever `sink` raises (e.g. StoreFull).
    """
    src = info if info is not None else probe(path)
    for warning in src.warnings:
        log.warning("stream not packaged", extra={"path": str(path), "reason": warning})
    job = _Job(src, opts, sink, progress, cancel)
    started = time.monotonic()
    try:
        manifest = _package(job)
    finally:
        job.close()  # no sink call may still run once package() has returned or raised
    log.info(
        "packaged",
        extra={
            "path": str(path),
            "seconds": round(time.monotonic() - started, 3),
            "duration": round(src.duration, 3),
            "renditions": [r.id for r in manifest.renditions],
        },
    )
    return manifest, src


def _package(job: _Job) -> Manifest:
    src, opts = job.src, job.opts
    v = src.video
    if v is None:
        return _package_audio(job)
    if len(src.audios) > 1:
        # Every audio track becomes an alternate rendition and the video renditions carry none:
        # hls.js cannot play alternate audio beside audio muxed into fMP4 video segments (both
        # would feed audio to the browser's buffers).
        job.src = src = dataclasses.replace(src, audio=None)
    remux = opts.transcode == "auto" and src.can_remux()
    if remux and opts.max_height is not None and v.height > opts.max_height:
        remux = False
    if remux:
        top_w, top_h = v.width, v.height
    else:
        top_w, top_h = scaled_size(v.width, v.height, opts.max_height or v.height)
    rate = v.frame_rate
    top = _Out(rid=f"v{top_h}", kind="video", width=top_w, height=top_h)
    rungs = _rungs_below(opts, top_h)
    eager = [r for r in rungs if not r.on_demand]
    derived: list[tuple[_Out, Recipe]] = []
    for r in rungs:
        w, h = scaled_size(top_w, top_h, r.height)
        rec = Recipe(
            source=top.rid,
            width=w,
            height=h,
            crf=r.crf if r.crf is not None else opts.crf,
            preset=opts.preset,
            threads=opts.encoder_threads,
            audio=src.audio is not None,
            bframes=r.bframes,
        )
        o = _Out(rid=r.rendition_id, kind="video", width=w, height=h, recipe=rec)
        assert rec.crf is not None
        o.codecs = x264_codec_string(w, h, rate, rec.crf, opts.preset, rec.bframes)
        if src.audio is not None:
            o.codecs += "," + _audio_codecs(src, opts)
        derived.append((o, rec))
    audio_out: _Out | None = None
    if opts.audio_only and src.audio is not None:
        rec = Recipe(source=top.rid, audio=True)
        audio_out = _Out(rid="audio", kind="audio", recipe=rec, codecs=_audio_codecs(src, opts))
    producers = [(o, rec) for o, rec in derived if any(o.rid == r.rendition_id for r in eager)]
    if audio_out is not None and audio_out.recipe is not None:
        producers.append((audio_out, audio_out.recipe))

    def derive(seq: int, duration: int, data: bytes) -> None:
        for o, rec in producers:
            job.check()
            d = derive_segment(opts.container, top.mux_init, data, rec, seq)
            if d.init is not None and o.init_cid is None:
                o.init_cid = job.put(d.init, "init")
            o.segs.append((duration, job.put(d.data, "segment"), len(d.data)))
            if o.kind == "video":
                job.extra_done += duration / TIMESCALE
                _report(job)

    def on_top_segment(seg: SegmentBytes, duration: int) -> None:
        job.check()
        job.still_there()
        if seg.init is not None and top.init_cid is None:
            top.init_cid = job.put(seg.init, "init")
        top.segs.append((duration, job.put(seg.data, "segment"), len(seg.data)))
        derive(seg.seq, duration, seg.data)

    def on_top_read(seq: int, init: bytes, duration: int, size: int, read: remuxer.Read) -> None:
        job.check()
        job.still_there()
        if top.init_cid is None:
            top.init_cid = job.put(init, "init")
        stored, got = job.put_read(read, "segment")
        top.segs.append((duration, stored, size))
        if producers:
            derive(seq, duration, got.result()[0])

    native = remuxer.open_native(src, opts) if remux else None
    if native is not None:
        start = _native_top_pass(job, top, native, on_top_read)
    else:
        start = _top_pass(job, top, remux, top_w, top_h, on_top_segment)
    renditions = [_finish(top, opts, src, start, rate)]
    for o, rec in derived:
        if o.segs:
            renditions.append(_finish(o, opts, src, start, rate))
        else:
            renditions.append(_on_demand(o, rec, top, opts, start, rate))
    if audio_out is not None:
        renditions.append(_finish(audio_out, opts, src, start, None))
    packager = Packager(PACKAGER_VERSION, "isobmff" if native is not None else "libav")
    alternates = src.audios if len(src.audios) > 1 else ()
    if alternates or src.subtitles:
        durations = tuple(d for d, _, _ in top.segs)
        timeline = Timeline(top.origin, start, durations, _step(opts))
        tracks = track_pass(
            src,
            opts.container,
            opts.audio_bitrate,
            timeline,
            alternates,
            src.subtitles,
            job.put,
            job.check,
        )
        labels = _alternates(src.audios, src.subtitles)
        renditions += [_track_rendition(t, labels[t.info.index]) for t in _played(tracks)]
        job.still_there()
    return Manifest(
        container=opts.container,
        renditions=tuple(renditions),
        packager=packager,
    )


def _played(tracks: list[Track]) -> list[Track]:
    """The tracks that hold anything (a stream without a single packet has nothing to play)."""
    for t in tracks:
        if not t.segs:
            log.warning("empty stream", extra={"stream": t.info.index})
    return [t for t in tracks if t.segs]


def _step(opts: PackagingOptions) -> Fraction:
    return Fraction(opts.segment_seconds).limit_denominator(1000)


def _package_audio(job: _Job) -> Manifest:
    """An audio-only file: every audio stream (and text subtitles) on a segment grid."""
    src, opts = job.src, job.opts
    with open_input(src.path) as c:
        origin = Fraction(c.start_time, av.time_base) if c.start_time is not None else Fraction(0)
    timeline = Timeline(origin, 0, None, _step(opts))

    def progress(done: float) -> None:
        job.top_done = max(job.top_done, done)
        _report(job)

    tracks = track_pass(
        src,
        opts.container,
        opts.audio_bitrate,
        timeline,
        src.audios,
        src.subtitles,
        job.put,
        job.check,
        progress,
    )
    job.still_there()
    job.top_done = src.duration
    _report(job)
    labels = _alternates(src.audios, src.subtitles)
    tracks = _played(tracks)
    if not any(isinstance(t.info, AudioInfo) for t in tracks):
        raise MediaError(f"{src.path}: no decodable audio", path=str(src.path))
    if len(src.audios) == 1 and not src.subtitles:
        # One track and nothing to choose from: a plain audio-only variant.
        renditions = [_track_rendition(tracks[0], None)]
    else:
        renditions = [_track_rendition(t, labels[t.info.index]) for t in tracks]
    return Manifest(
        container=opts.container,
        renditions=tuple(renditions),
        packager=Packager(PACKAGER_VERSION, "libav"),
    )


def _alternates(
    audios: tuple[AudioInfo, ...], subtitles: tuple[SubtitleInfo, ...]
) -> dict[int, Alternate]:
    """The EXT-X-MEDIA label of every track by stream index: a name unique among the tracks of
    its kind (title, else language, else a number), and one default per kind (audio: the
    source's default, else the first track; subtitles: the source's default, if any)."""
    out: dict[int, Alternate] = {}
    groups: tuple[tuple[str, Sequence[AudioInfo | SubtitleInfo]], ...] = (
        ("audio", audios),
        ("subtitles", subtitles),
    )
    for kind, streams in groups:
        names: set[str] = set()
        default = next((s.index for s in streams if s.default), None)
        if default is None and kind == "audio" and streams:
            default = streams[0].index
        for n, s in enumerate(streams, 1):
            name = _clean_name(s.title) or _clean_name(s.language) or f"{kind} {n}"
            if name in names:
                name = f"{name} ({n})"
            names.add(name)
            lang = s.language if s.language and LANGUAGE_RE.match(s.language) else None
            forced = isinstance(s, SubtitleInfo) and s.forced
            out[s.index] = Alternate(name, lang, s.index == default, forced)
    return out


def _clean_name(title: str | None) -> str | None:
    """A stream title usable as an HLS NAME: no quotes or control characters, and short enough
    (56) that a " (n)" making it unique keeps it within the manifest's 64."""
    if not title:
        return None
    kept = "".join(c for c in title if c != '"' and c.isprintable()).strip()[:56]
    return kept or None


def _track_rendition(t: Track, label: Alternate | None) -> Rendition:
    info = t.info
    kind: RenditionKind = "audio" if isinstance(info, AudioInfo) else "subtitles"
    # Stream indexes: unique in the file, and the same on every node.
    rid = f"a{info.index}" if kind == "audio" else f"t{info.index}"
    peak, avg = _bandwidth(t.segs)
    return Rendition(
        id=rid,
        kind=kind,
        codecs=t.codecs,
        bandwidth=peak,
        average_bandwidth=avg,
        timescale=TIMESCALE,
        start=t.start,
        init=None if t.init is None else t.init.result(),
        segments=tuple(Segment(d, c.result()) for d, c, _ in t.segs),
        alternate=label,
    )


def _audio_codecs(src: SourceInfo, opts: PackagingOptions) -> str:
    a = src.audio
    assert a is not None
    if src.can_copy_audio(opts.container):
        return codecs.audio_codec(a.codec, a.profile)
    return codecs.aac_codec("LC")


def _rungs_below(opts: PackagingOptions, top_h: int) -> list[Rung]:
    """Ladder rungs strictly smaller than the top rendition (never upscaled); a B-frame-free
    rung (for WebRTC passthrough) may also have the top's height."""
    out: list[Rung] = []
    seen: set[str] = set()
    for r in sorted(opts.ladder, key=lambda r: -r.height):
        too_tall = r.height > top_h or (r.height == top_h and r.bframes != 0)
        if too_tall or r.rendition_id in seen:
            continue
        seen.add(r.rendition_id)
        out.append(r)
    return out


def _report(job: _Job) -> None:
    if job.progress is not None:
        job.progress(job.top_done + job.extra_done)


def _bandwidth(segs: list[tuple[int, Future[Cid], int]]) -> tuple[int, int]:
    peak = max(math.ceil(size * 8 * TIMESCALE / max(d, 1)) for d, _, size in segs)
    total_d = sum(d for d, _, _ in segs)
    avg = math.ceil(sum(s for _, _, s in segs) * 8 * TIMESCALE / max(total_d, 1))
    return max(peak, 1), max(min(avg, peak), 1)


def _frame_rate(rate: Fraction | None) -> tuple[int, int] | None:
    if not rate:
        return None
    r = Fraction(rate).limit_denominator(1001)
    return (r.numerator, r.denominator)


def _finish(
    o: _Out, opts: PackagingOptions, src: SourceInfo, start: int, rate: Fraction | None
) -> Rendition:
    peak, avg = _bandwidth(o.segs)
    return Rendition(
        id=o.rid,
        kind=o.kind,
        codecs=o.codecs,
        bandwidth=peak,
        average_bandwidth=avg,
        width=o.width if o.kind == "video" else None,
        height=o.height if o.kind == "video" else None,
        frame_rate=_frame_rate(rate) if o.kind == "video" else None,
        timescale=TIMESCALE,
        start=start,
        init=None if o.init_cid is None else o.init_cid.result(),
        segments=tuple(Segment(d, c.result()) for d, c, _ in o.segs),
        recipe=o.recipe,
    )


def _on_demand(
    o: _Out, rec: Recipe, top: _Out, opts: PackagingOptions, start: int, rate: Fraction | None
) -> Rendition:
    # Not produced yet, so its bit rate is an estimate: the top rendition's scaled by the pixel
    # ratio to the power 0.75 (bits grow sub-linearly with pixels at equal CRF), never above
    # the top's. Producing a segment logs a warning if the estimate was too low.
    assert o.width is not None
    assert o.height is not None
    assert top.width is not None
    assert top.height is not None
    peak, avg = _bandwidth(top.segs)
    ratio = min(1.0, ((o.width * o.height) / (top.width * top.height)) ** 0.75 * 1.25)
    return Rendition(
        id=o.rid,
        kind="video",
        codecs=o.codecs,
        bandwidth=max(1, math.ceil(peak * ratio)),
        average_bandwidth=max(1, math.ceil(avg * ratio)),
        width=o.width,
        height=o.height,
        frame_rate=_frame_rate(rate),
        timescale=TIMESCALE,
        start=start,
        segments=tuple(Segment(d) for d, _, _ in top.segs),
        on_demand=True,
        recipe=rec,
    )


def _top_pass(
    job: _Job,
    top: _Out,
    remux: bool,
    width: int,
    height: int,
    on_segment: Callable[[SegmentBytes, int], None],
) -> int:
    """Produce the top rendition; returns the start time (ticks) of its first segment."""
    src, opts = job.src, job.opts
    path = src.path
    vi = src.video
    assert vi is not None
    inp = open_input(path)
    holder: av.container.OutputContainer | None = None
    try:
        vin: Any = inp.streams[vi.index]
        ain: Any = inp.streams[src.audio.index] if src.audio is not None else None
        tb: Fraction = vin.time_base or Fraction(1, TIMESCALE)
        copy_audio = ain is not None and src.can_copy_audio(opts.container)
        vtemplate: Any = vin
        atemplate: Any = ain if copy_audio else None
        encoder = None
        scaler = None
        aencoder = None
        resampler = None
        atb = Fraction(1, 48000)
        if not remux:
            holder = new_holder(opts.container)
            vin.thread_type = "AUTO"  # decoder frame+slice threads; does not change output
            vin.thread_count = 0
            encoder = add_x264(
                holder,
                width,
                height,
                vi.frame_rate,
                tb,
                opts.crf,
                opts.preset,
                opts.encoder_threads,
            )
            scaler = Scaler(vin, width, height)
            vtemplate = encoder
        if ain is not None and not copy_audio:
            holder = holder or new_holder(opts.container)
            sr = (
                src.audio.sample_rate if src.audio and src.audio.sample_rate in AAC_RATES else 48000
            )
            layout = "mono" if src.audio and src.audio.channels == 1 else "stereo"
            aencoder = holder.add_stream("aac", rate=sr)
            aencoder.layout = layout
            aencoder.bit_rate = opts.audio_bitrate
            atb = Fraction(1, sr)
            aencoder.time_base = atb
            resampler = av.AudioResampler(format="fltp", layout=layout, rate=sr, frame_size=1024)
            atemplate = aencoder
        if holder is not None:
            holder.start_encoding()
        sei_filter = SeiFilter(encoder)
        muxer = SegmentMuxer(
            opts.container,
            vtemplate,
            atemplate,
            hevc=remux and vi.codec == "hevc",
            size=None if remux else (width, height),
        )
        state: dict[str, Any] = {"origin": None, "start": 0}

        def emit(seg: Seg, seq: int) -> None:
            fill_dts(seg.video)
            if seq == 0 and seg.video:
                state["first_video"] = bytes(seg.video[0])
            if state["origin"] is None:
                cands = [seg.start]
                cands += [
                    t_of(p.dts, p.time_base) or seg.start for p in seg.video[:1] + seg.audio[:1]
                ]
                first_origin = min(cands)
                state["origin"] = first_origin
                # The timeline starts with whichever stream presents first (audio often leads
                # video by the B-frame delay), so segment 0's EXTINF covers that lead too.
                lead = [t_of(p.pts, p.time_base) for p in seg.audio[:1]]
                first = min([seg.start] + [t for t in lead if t is not None])
                state["start"] = ticks(max(first, first_origin) - first_origin)
            origin: Fraction = state["origin"]
            top.origin = origin
            assert seg.end is not None
            begin = state["start"] if seq == 0 else ticks(seg.start - origin)
            duration = ticks(seg.end - origin) - begin
            out = muxer.mux(seq, seg.video, seg.audio, origin)
            top.mux_init = muxer.init
            on_segment(out, max(duration, 1))

        cutter = Cutter(opts.segment_seconds, atemplate is not None, emit)
        vdur_default = Fraction(1) / (vi.frame_rate or 30)
        last_pts: list[int | None] = [None]
        audio_next: list[int | None] = [None]

        def feed_video_packet(p: Any) -> None:
            pts = t_of(p.pts, p.time_base)
            if pts is None:
                pts = t_of(p.dts, p.time_base)
            if pts is None:
                return
            dur = t_of(p.duration, p.time_base) or vdur_default
            cutter.video(p, pts, bool(p.is_keyframe), dur)
            job.top_done = max(job.top_done, float(pts))
            _report(job)

        def encode_frame(frame: av.VideoFrame | None) -> None:
            assert encoder is not None
            for p in encoder.encode(frame):
                for q in sei_filter.filter(p):
                    feed_video_packet(q)

        def feed_audio_frame(frame: av.AudioFrame | None) -> None:
            assert aencoder is not None
            assert resampler is not None
            if frame is not None and audio_next[0] is None:
                t0 = t_of(frame.pts, frame.time_base) or Fraction(0)
                audio_next[0] = rescale(t0, atb)
            for rf in resampler.resample(frame):
                rf.pts = audio_next[0]
                rf.time_base = atb
                audio_next[0] = (audio_next[0] or 0) + rf.samples
                for p in aencoder.encode(rf):
                    cutter.audio(p, t_of(p.pts, p.time_base) or Fraction(0))
            if frame is None:
                for p in aencoder.encode(None):
                    cutter.audio(p, t_of(p.pts, p.time_base) or Fraction(0))

        streams = [vin] + ([ain] if ain is not None else [])
        next_i = [Fraction(0)]
        step = Fraction(opts.segment_seconds).limit_denominator(1000)

        def scale_and_encode(frame: av.VideoFrame | None) -> None:
            assert scaler is not None
            for f in scaler(frame):
                prepare_frame(f, last_pts, next_i, step, tb)
                if f.pts is not None:
                    encode_frame(f)

        try:
            for pkt in inp.demux(*streams):
                job.check()
                if pkt.stream is ain:
                    if not copy_audio:
                        for af in pkt.decode():
                            feed_audio_frame(af)
                    elif pkt.dts is not None:
                        cutter.audio(pkt, t_of(pkt.pts, pkt.time_base) or Fraction(0))
                    continue
                if remux:
                    if pkt.dts is not None or pkt.pts is not None:
                        feed_video_packet(pkt)
                    continue
                for frame in pkt.decode():
                    assert isinstance(frame, av.VideoFrame)
                    scale_and_encode(frame)
            if not remux:
                scale_and_encode(None)
                encode_frame(None)
            if aencoder is not None:
                feed_audio_frame(None)
        except av.error.FFmpegError as exc:
            raise _wrap_av(path, exc, "while reading") from None
        if cutter.emitted == 0 and not cutter.segs:
            raise MediaError(f"{path}: no decodable video (no keyframe found)", path=str(path))
        end = float(cutter.video_end - cutter.first_start)
        if src.duration > 0 and end < 0.9 * src.duration - 0.5:
            raise MediaError(
                f"{path}: truncated: video ends at {end:.1f} s of {src.duration:.1f} s",
                path=str(path),
            )
        cutter.finish()
        job.still_there()
        coder: Any = vin if remux else encoder
        extradata = coder.codec_context.extradata
        if not extradata:
            extradata = state.get("first_video")  # Annex B SPS in the first keyframe (TS)
        vcodec = codecs.video_codec(vi.codec if remux else "h264", extradata)
        if muxer.init is not None and remux:
            box = b"hvcC" if vi.codec == "hevc" else b"avcC"
            cfg = fmp4.codec_config(muxer.init, box)
            if cfg:
                vcodec = codecs.video_codec(vi.codec, cfg)
        top.codecs = vcodec
        if src.audio is not None:
            top.codecs += "," + _audio_codecs(src, opts)
        return int(state["start"])
    finally:
        inp.close()
        if holder is not None:
            holder.close()


def _native_top_pass(
    job: _Job,
    top: _Out,
    native: remuxer.Native,
    on_read: Callable[[int, bytes, int, int, remuxer.Read], None],
) -> int:
    """`_top_pass` for a native remux: each segment is handed on unread, as a function that
    reads its samples straight from the file and hashes them (run in a hashing thread)."""
    src = job.src
    path = src.path
    vi = src.video
    assert vi is not None
    try:
        video, audio, cuts = native.video, native.audio, native.plan
        end = float(cuts.video_end - cuts.first_start)
        if src.duration > 0 and end < 0.9 * src.duration - 0.5:
            raise MediaError(
                f"{path}: truncated: video ends at {end:.1f} s of {src.duration:.1f} s",
                path=str(path),
            )
        top.origin = cuts.origin
        tracks = [video] + ([audio] if audio is not None else [])
        init = isobmff.init_segment(tracks)
        top.mux_init = init
        origins = [isobmff.rescale(cuts.origin, t.timescale) for t in tracks]
        for seq, seg in enumerate(cuts.segments):
            job.check()
            runs = [isobmff.TrackRun(video, seg.v0, seg.v1, video.dts[seg.v0] - origins[0])]
            if audio is not None and seg.a1 > seg.a0:
                runs.append(isobmff.TrackRun(audio, seg.a0, seg.a1, audio.dts[seg.a0] - origins[1]))
            header = isobmff.fragment_header(seq + 1, runs)
            ranges = remuxer.sample_ranges(runs)
            last = seg.v1 - 1
            job.top_done = max(job.top_done, (video.dts[last] + video.cto[last]) / video.timescale)
            size = len(header) + sum(e - o for o, e in ranges)
            read = functools.partial(remuxer.read_hashed, native.fd, path, header, ranges)
            on_read(seq, init, cuts.duration_ticks(seq), size, read)
            _report(job)
        # Every read has ended (the descriptor is closed below) before the file is checked.
        futures.wait(job.reads)
        job.still_there()
        entry = b"hvcC" if vi.codec == "hevc" else b"avcC"
        top.codecs = codecs.video_codec(vi.codec, fmp4.codec_config(init, entry))
        if src.audio is not None:
            top.codecs += "," + _audio_codecs(src, job.opts)
        return cuts.start_ticks
    finally:
        for f in job.reads:
            f.cancel()  # on an error: reads not yet started never start
        futures.wait(job.reads)
        os.close(native.fd)
