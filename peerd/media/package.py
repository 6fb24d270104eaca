"""The packager: one input file -> content-addressed HLS segments and a `Manifest` (blocking).

Everything here is synchronous PyAV work meant to run in a worker thread (`peerd.media.ingest`
does that); blobs leave through a `Sink` callback that the caller wires to the BlobStore.

Theory of operation
-------------------
1. **Top rendition.** If the source video is H.264/HEVC (and `transcode = "auto"`), its packets
   are remuxed as they are; otherwise it is decoded, scaled in a libavfilter graph and encoded with
   libx264 at constant quality (CRF; x264's bit-rate modes are not repeatable with threads), with
   decoder frame threads and encoder frame threads at a *fixed* count, because x264's output
   depends on it. AAC (and Opus in fMP4) audio is copied, anything else becomes AAC.
   A transcode runs in two Python threads (`_ahead`): a reader demuxes, decodes and scales a few
   frames ahead while the calling thread encodes, cuts and muxes (libav releases the GIL there).
   The reader hands its items on in the order one serial loop would handle them, so the bytes do
   not depend on the threads' timing.
2. **Cutting.** A `_Cutter` starts a segment at the first video keyframe at or after each multiple
   of `segment_seconds` (transcodes force an IDR exactly there). Audio goes to the segment whose
   video time span contains it. Timestamps are shifted so the earliest one is zero.
3. **Muxing.** Each segment gets a fresh libavformat muxer (`mp4` with an empty moov and one
   fragment, or `mpegts`) with `+bitexact` and no metadata, so there are no clocks or version
   strings in the bytes. For fMP4 the init segment (ftyp+moov) is split off and the fragment's
   `mfhd`/`tfdt` are rewritten to the rendition's sequence and decode time (`peerd.media.fmp4`).
   **Native remux.** An MP4/MOV source whose video is remuxed and whose audio (if any) is
   copied into fMP4 skips libav after the probe: `peerd.media.isobmff` reads the sample tables
   from its ``moov``, applies the same cutting rules in integer ticks and writes the init
   segment and fragments itself; each segment's sample bytes are read with one ``preadv``
   and hashed at once by one of the hashing threads, into a few reused page-aligned buffers
   that the daemon's store writes with ``O_DIRECT`` (`_native_top_pass`, `SegmentBuffers`).
   Same packets, timestamps and segment durations as the libav muxer
   (tests/test_remux_native.py), in a fraction of the time. What goes native and what falls
   back to the PyAV path is listed in that module's docstring; the choice depends on the file
   only, so every node makes the same one.
4. **Lower rungs and audio-only.** A ladder rendition is derived from the top rendition one
   segment at a time (`derive_segment`): decode that segment's blob, scale, encode with a new
   encoder (so the segment starts with an IDR and depends on nothing else), copy its audio. The
   same function serves eager rungs at ingest and on-demand rungs later (`produce_segment`), so
   both give byte-identical blobs on any node with the same PyAV build and options.
"""

from __future__ import annotations

import functools
import io
import logging
import math
import mmap
import os
import queue
import struct
import threading
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent import futures
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import av
import av.error
from av.video.frame import PictureType

from peerd.core.ids import Cid, cid_of
from peerd.core.manifest import Manifest, Recipe, Rendition, RenditionKind, Segment
from peerd.errors import MediaError, PeerdError
from peerd.media import codecs, fmp4, isobmff
from peerd.media.options import PackagingOptions, Rung
from peerd.media.probe import SourceInfo, file_identity, open_input, probe

log = logging.getLogger("peerd.media")

TIMESCALE = 90_000
AAC_RATES = frozenset({96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 8000})
# mp4: an empty moov up front and one fragment per segment (written at close); no mfra trailer.
MP4_FLAGS = "empty_moov+default_base_moof+frag_custom+skip_trailer"
SCALE_FLAGS = "bicubic"

Sink = Callable[[bytes, str, Cid], Cid]
"""Stores one blob (bytes, kind "init" | "segment", its content id) and returns the id; may block.

Called from one helper thread, in the order the blobs are produced (see `_Job.put`); the id is
already computed (`cid_of(data)`, in a hashing thread), so the sink does not hash again."""

HASH_THREADS = 2

POOLED_BUFFERS = 8
"""Segment buffers a `SegmentBuffers` keeps for reuse: about as many as are in flight at once
(read, being hashed, queued for the sink, being written)."""

MAX_QUEUED = 2

READ_AHEAD = 8
"""Decoded, scaled frames (or audio items) the reader thread of a transcode may be ahead."""

# What the reader of `_top_pass` hands on: (kind, packet or frame).
_VIDEO_FRAME, _VIDEO_PACKET, _AUDIO_PACKET, _AUDIO_FRAME = range(4)

Progress = Callable[[float], None]
"""Called with the number of media seconds done so far (across every pass)."""


class Cancelled(PeerdError):
    """The packaging job was cancelled."""

    code = "cancelled"


class SegmentBuffers:
    """Reusable buffers for the segments of a native remux, handed back by the sink.

    A fresh multi-megabyte ``bytearray`` per segment costs more than reading the segment into
    it: the allocator maps new pages for each one, and the kernel faults in and zeroes every
    page (here ~1.4 ms per 3 MB segment, against ~0.4 ms for the read itself; 30-45 ms of a
    0.17 s remux of the 120 s 1080p file). A job has only a few segments in flight at a time,
    so a few buffers, each reused once its segment is written, serve the whole file. They are
    anonymous mappings, so page-aligned: the store can write them with ``O_DIRECT``
    (`BlobBatch.add(direct=True)`).

    Ownership: :meth:`take` gives the packager a buffer, exactly the asked length, as a
    ``memoryview``; the packager fills it and hands it to the sink as the segment's bytes, and
    the sink calls :meth:`give` once nothing reads them any more (its write has finished). A
    buffer never given back is just freed by the garbage collector; one given back too early
    would change a blob's bytes under a reader, which is why only a sink that is written for it
    gets pooled buffers (``package(..., buffers=...)``). :meth:`give` releases the view, so a
    stray later read of that view raises instead of seeing another segment.
    """

    def __init__(self, keep: int = POOLED_BUFFERS) -> None:
        self.keep = keep
        self._free: list[mmap.mmap] = []
        self._lock = threading.Lock()
        self.allocated = 0  # buffers made, for tests and logs

    def take(self, n: int) -> memoryview:
        """A writable view of ``n`` bytes (contents undefined) over a free or new buffer."""
        buf = None
        with self._lock:
            for i, b in enumerate(self._free):
                if len(b) >= n:
                    buf = self._free.pop(i)
                    break
        if buf is None:
            # Headroom: the next segments are often a little larger than this one.
            buf = mmap.mmap(-1, max(n + n // 4, 1), flags=mmap.MAP_PRIVATE)
            self.allocated += 1
        return memoryview(buf)[:n]

    @staticmethod
    def owns(data: bytes | memoryview) -> bool:
        """Whether ``data`` is a buffer from :meth:`take` (page-aligned, to be given back)."""
        return isinstance(data, memoryview) and isinstance(data.obj, mmap.mmap)

    def give(self, data: bytes | memoryview) -> None:
        """Take back a buffer from :meth:`take` (anything else is ignored)."""
        if not isinstance(data, memoryview) or not isinstance(buf := data.obj, mmap.mmap):
            return
        data.release()
        with self._lock:
            if len(self._free) < self.keep:
                self._free.append(buf)


@dataclass
class _Seg:
    start: Fraction
    end: Fraction | None = None
    video: list[Any] = field(default_factory=list)
    audio: list[Any] = field(default_factory=list)


@dataclass(frozen=True)
class SegmentBytes:
    """One produced media segment (and the rendition's init segment, for fMP4)."""

    seq: int
    init: bytes | None
    data: bytes


def _t(ts: int | None, tb: Fraction | None) -> Fraction | None:
    if ts is None or tb is None:
        return None
    # One constructor call instead of Fraction(ts) * tb (two Fractions and a multiplication):
    # called for every packet, this was a tenth of a remux's Python time. Same exact value.
    return Fraction(ts * tb.numerator, tb.denominator)


def _ticks(t: Fraction) -> int:
    return math.floor(t * TIMESCALE + Fraction(1, 2))


def _rescale(t: Fraction, tb: Fraction) -> int:
    """t (seconds) in units of tb, rounded half up (deterministic)."""
    return math.floor(t / tb + Fraction(1, 2))


def _ahead(items: Iterator[Any], depth: int, name: str) -> Generator[Any, None, None]:
    """Yield what `items` yields, in order, with `items` run in its own thread up to `depth` ahead.

    An exception raised by `items` is raised here, where its item would have come. Closing this
    generator (or leaving it by an exception) stops the thread and joins it before returning, so
    nothing `items` uses is touched once the caller goes on.
    """
    q: queue.Queue[tuple[int, Any]] = queue.Queue(depth)
    stop = threading.Event()

    def run() -> None:
        end: tuple[int, Any] = (1, None)
        try:
            for item in items:
                q.put((0, item))
                if stop.is_set():
                    return
        except BaseException as exc:  # handed to the consumer, which raises it
            end = (2, exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
        q.put(end)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == 0:
                yield value
            elif kind == 1:
                return
            else:
                raise value
    finally:
        stop.set()
        while thread.is_alive():
            try:  # unblock a put waiting for room
                q.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


# ---- cutting ---------------------------------------------------------------------------------


class _Cutter:
    """Groups video and audio packets into segments that start on video keyframes."""

    def __init__(self, seconds: float, has_audio: bool, emit: Callable[[_Seg, int], None]) -> None:
        self.step = Fraction(seconds).limit_denominator(1000)
        self.has_audio = has_audio
        self.emit = emit
        self.segs: list[_Seg] = []  # not yet emitted; the last one is open
        self.pending_audio: list[tuple[Fraction, Any]] = []
        self.max_audio = Fraction(-(10**9))
        self.next_cut = Fraction(0)
        self.emitted = 0
        self.video_end = Fraction(0)
        self.first_start = Fraction(0)
        self.dropped = 0

    def _grid_after(self, t: Fraction) -> Fraction:
        return (math.floor(t / self.step) + 1) * self.step

    def video(self, pkt: Any, pts: Fraction, key: bool, dur: Fraction) -> None:
        if not self.segs and self.emitted == 0:
            if not key:
                self.dropped += 1  # undecodable without the keyframe before it
                return
            self.segs.append(_Seg(start=pts))
            self.first_start = pts
            self.next_cut = self._grid_after(pts)
            self._place_audio()
        elif key and pts >= self.next_cut:
            self.segs[-1].end = pts
            self.segs.append(_Seg(start=pts))
            self.next_cut = self._grid_after(pts)
            self._place_audio()
            self._flush(final=False)
        self.segs[-1].video.append(pkt)
        self.video_end = max(self.video_end, pts + dur)

    def audio(self, pkt: Any, pts: Fraction) -> None:
        self.pending_audio.append((pts, pkt))
        self.max_audio = max(self.max_audio, pts)
        self._place_audio()
        self._flush(final=False)

    def _place_audio(self) -> None:
        if not self.segs:
            return
        keep: list[tuple[Fraction, Any]] = []
        for t, p in self.pending_audio:
            target = None
            for s in self.segs:
                if s.end is not None and t < s.end:
                    target = s
                    break
            if target is None:
                last = self.segs[-1]
                # A cut can only happen at or after next_cut, so earlier audio is the open one's.
                if t < self.next_cut or last.end is not None:
                    target = last
            if target is None:
                keep.append((t, p))
            else:
                target.audio.append(p)
        self.pending_audio = keep

    def _flush(self, final: bool) -> None:
        while self.segs:
            s = self.segs[0]
            if s.end is None and not final:
                return
            if not final and len(self.segs) < 3:
                # Keep one closed segment back: a tiny last segment is merged into it.
                return
            if not final and self.has_audio and s.end is not None and self.max_audio < s.end:
                # Wait for the audio of this span, unless video is far ahead (no audio left).
                if self.segs[-1].start - s.end < 10 * self.step:
                    return
            self.segs.pop(0)
            self.emit(s, self.emitted)
            self.emitted += 1

    def finish(self) -> None:
        if self.segs:
            last = self.segs[-1]
            last.end = max(self.video_end, last.start + Fraction(1, TIMESCALE))
            for t, p in self.pending_audio:
                (last if t >= last.start else self.segs[0]).audio.append(p)
            self.pending_audio = []
            if len(self.segs) >= 2 and last.end - last.start < self.step / 4:
                # A sliver at the end (a frame or two past the last cut) joins the segment
                # before it instead of becoming a segment of its own.
                prev = self.segs[-2]
                prev.end = last.end
                prev.video += last.video
                prev.audio += last.audio
                self.segs.pop()
        self._flush(final=True)


# ---- muxing ----------------------------------------------------------------------------------


class SegmentMuxer:
    """Muxes segments one at a time for fixed template streams (deterministic bytes)."""

    def __init__(
        self,
        container: str,
        video: Any | None,
        audio: Any | None,
        hevc: bool = False,
        size: tuple[int, int] | None = None,
    ) -> None:
        self.container = container
        self.video = video
        self.audio = audio
        self.hevc = hevc
        self.size = size  # display size when the encoder's coded size is padded
        self.init: bytes | None = None

    def mux(
        self, seq: int, video: Sequence[Any], audio: Sequence[Any], shift: Fraction
    ) -> SegmentBytes:
        """Mux one segment's packets; timestamps are moved back by `shift` seconds."""
        buf = io.BytesIO()
        fmt = "mp4" if self.container == "fmp4" else "mpegts"
        opts = {"fflags": "+bitexact", "avoid_negative_ts": "disabled"}
        if fmt == "mp4":
            opts["movflags"] = MP4_FLAGS
        out = av.open(buf, "w", format=fmt, container_options=opts)
        try:
            streams: list[tuple[Any, Sequence[Any]]] = []
            if self.video is not None:
                vo = out.add_stream_from_template(self.video)
                if self.hevc and fmt == "mp4":
                    vo.codec_context.codec_tag = "hvc1"  # Apple players want hvc1, not hev1
                if self.size is not None:
                    vo.width, vo.height = self.size
                streams.append((vo, video))
            if self.audio is not None:
                streams.append((out.add_stream_from_template(self.audio), audio))
            firsts: list[Fraction | None] = []
            merged: list[tuple[float, int, int, Any, Any]] = []
            for si, (ost, pkts) in enumerate(streams):
                first: Fraction | None = None
                if pkts:
                    # One time base per stream: the shift is computed once, exactly; the float
                    # key below only orders packets (ties broken by stream and position).
                    tb = pkts[0].time_base
                    d = _rescale(shift, tb)
                    num, den = tb.numerator, tb.denominator
                    for i, p in enumerate(pkts):
                        if p.pts is not None:
                            p.pts -= d
                        if p.dts is not None:
                            p.dts -= d
                        ts = p.dts if p.dts is not None else (p.pts or 0)
                        if first is None:
                            first = Fraction(ts * num, den)
                        merged.append((ts * num / den, si, i, p, ost))
                firsts.append(first)
            merged.sort(key=lambda x: (x[0], x[1], x[2]))
            for _, _, _, p, ost in merged:
                p.stream = ost
                out.mux(p)
            if not merged:
                out.start_encoding()
            tbs = [ost.time_base for ost, _ in streams]
        finally:
            out.close()
        if fmt == "mpegts":
            return SegmentBytes(seq, None, buf.getvalue())
        # The fragment is patched inside the muxer's buffer and copied out once (a segment is
        # megabytes; getvalue + split + rebuild copied it three times).
        view = buf.getbuffer()
        try:
            cut = fmp4.init_end(view)
            init = bytes(view[:cut])
            ids = fmp4.track_ids(init)
            offsets = {}
            for tid, first, tb in zip(ids, firsts, tbs, strict=True):
                if first is not None and tb is not None:
                    offsets[tid] = max(0, _rescale(first, Fraction(tb)))
            fmp4.patch_fragments_in_place(view, cut, len(view), seq + 1, offsets)
            media = bytes(view[cut:])
        finally:
            view.release()
        if self.init is None:
            self.init = init
        elif init != self.init:
            raise MediaError("internal: fMP4 init segment changed between segments")
        return SegmentBytes(seq, init, media)


# ---- encoding helpers ------------------------------------------------------------------------


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def _scaled_size(width: int, height: int, target_h: int) -> tuple[int, int]:
    if target_h >= height:
        return _even(width), _even(height)
    return _even(width * target_h / height), _even(target_h)


def _x264_options(preset: str, crf: int, bframes: int | None = None) -> dict[str, str]:
    opts = {
        "preset": preset,
        "crf": str(crf),
        "forced-idr": "1",
        # Segment starts are forced IDRs; x264's own keyframes only at scene cuts.
        "g": "600",
        "keyint_min": "25",
        # Macroblock-tree rate control made x264's output vary from run to run (with frame
        # threads, and single-threaded when other threads were busy); without it every
        # repeated ingest here was byte-identical. Costs a few percent of bit rate.
        "x264-params": "mbtree=0",
    }
    if bframes is not None:
        opts["bf"] = str(bframes)
    return opts


def _new_holder(container: str) -> av.container.OutputContainer:
    # A muxer that is never written to, only used to own encoder streams: the mp4 one makes x264
    # put SPS/PPS in extradata (global header, needed in the fMP4 init), mpegts keeps them inline.
    return av.open(io.BytesIO(), "w", format="mp4" if container == "fmp4" else "mpegts")


def _add_x264(
    holder: av.container.OutputContainer,
    width: int,
    height: int,
    rate: Fraction | None,
    time_base: Fraction,
    crf: int,
    preset: str,
    threads: int,
    bframes: int | None = None,
) -> Any:
    opts = _x264_options(preset, crf, bframes)
    coded_w, coded_h = _coded_size(width, height)
    if (coded_w, coded_h) != (width, height):
        # Frames arrive padded to whole macroblocks (see _Scaler); the SPS crops the padding off.
        crop = f"crop-rect=0,0,{coded_w - width},{coded_h - height}"
        opts["x264-params"] = f"{opts['x264-params']}:{crop}"
    vs = holder.add_stream("libx264", rate=rate or Fraction(30), options=opts)
    vs.width = coded_w
    vs.height = coded_h
    vs.pix_fmt = "yuv420p"
    vs.time_base = time_base
    vs.codec_context.time_base = time_base
    # x264's output depends on its thread count: fixed, never "number of cores".
    vs.codec_context.thread_type = "FRAME"
    vs.codec_context.thread_count = threads
    return vs


def x264_codec_string(
    width: int,
    height: int,
    rate: Fraction | None,
    crf: int,
    preset: str,
    bframes: int | None = None,
) -> str:
    """The CODECS string libx264 produces for these settings (reads its SPS, encodes nothing)."""
    holder = av.open(io.BytesIO(), "w", format="mp4")
    try:
        vs = _add_x264(holder, width, height, rate, Fraction(1, TIMESCALE), crf, preset, 1, bframes)
        vs.codec_context.open()
        return codecs.avc_codec(vs.codec_context.extradata)
    finally:
        holder.close()


class _SeiFilter:
    """Drops SEI NAL units from libx264's output (bitstream filter ``filter_units``).

    x264 writes its version and full option string into an SEI on the first frame of every
    encode, i.e. every derived segment: ~700 bytes that carry no picture and name the build.
    """

    def __init__(self, encoder: Any | None) -> None:
        self.bsf = (
            av.BitStreamFilterContext("filter_units=remove_types=6", in_stream=encoder)
            if encoder is not None
            else None
        )

    def filter(self, packet: Any) -> list[Any]:
        if self.bsf is None:
            return [packet]
        tb = packet.time_base  # the filter takes the packet's contents, time base included
        out = self.bsf.filter(packet)
        for q in out:
            if q.time_base is None and tb is not None:
                q.time_base = tb
        return out


def _coded_size(width: int, height: int) -> tuple[int, int]:
    """Width and height rounded up to whole 16x16 macroblocks."""
    return (width + 15) // 16 * 16, (height + 15) // 16 * 16


class _Scaler:
    """libavfilter graph: scale to the output size, convert to yuv420p, pad to whole macroblocks.

    Why the padding: libx264 given frames whose size is not a multiple of 16 produced different
    bytes from run to run for identical pictures (seen at 240x180, single-threaded); padded frames
    plus an SPS cropping rectangle are repeatable, and decoders show exactly width x height.
    """

    def __init__(self, template: Any, width: int, height: int) -> None:
        self.graph = av.filter.Graph()
        src = self.graph.add_buffer(template=template)
        chain = [
            self.graph.add("scale", f"{width}:{height}:flags={SCALE_FLAGS}"),
            self.graph.add("format", "yuv420p"),
        ]
        coded_w, coded_h = _coded_size(width, height)
        if (coded_w, coded_h) != (width, height):
            chain.append(self.graph.add("pad", f"{coded_w}:{coded_h}:0:0:black"))
        chain.append(self.graph.add("buffersink"))
        prev = src
        for node in chain:
            prev.link_to(node)
            prev = node
        self.graph.configure()

    def __call__(self, frame: av.VideoFrame | None) -> list[av.VideoFrame]:
        self.graph.push(frame)
        out: list[av.VideoFrame] = []
        while True:
            try:
                f = self.graph.pull()
            except (av.error.BlockingIOError, av.error.EOFError):
                return out
            assert isinstance(f, av.VideoFrame)
            out.append(f)


# ---- the passes ------------------------------------------------------------------------------


@dataclass
class _Job:
    src: SourceInfo
    opts: PackagingOptions
    sink: Sink
    progress: Progress | None
    cancel: threading.Event | None
    buffers: SegmentBuffers | None = None
    top_done: float = 0.0
    extra_done: float = 0.0
    passes: int = 1
    blobs: list[tuple[Future[Cid], str]] = field(default_factory=list)
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

    def put_read(self, read: Callable[[], tuple[bytes, Cid]], kind: str) -> Future[Cid]:
        """Like :meth:`put` for a blob that ``read`` makes and hashes in a hashing thread.

        Reading a segment and hashing it in the same thread, at once, finds its bytes still in
        the CPU's cache: the 120 s 1080p remux reads and hashes its 92 MB in ~30 ms on two
        threads this way, against ~80 ms when the packaging thread read each segment and a
        hashing thread hashed it later. Reads not yet finished are kept in :attr:`reads`
        (finished ones are dropped: their results hold the segments' bytes).
        """
        got = self.hasher.submit(read)
        self.reads = [f for f in self.reads if not f.done()]
        self.reads.append(got)
        return self._to_sink(got.result, kind)

    def _to_sink(self, ready: Callable[[], tuple[bytes, Cid]], kind: str) -> Future[Cid]:
        def store() -> Cid:
            data, cid = ready()
            return self.sink(data, kind, cid)

        fut = self.pool.submit(store)
        self.blobs.append((fut, kind))
        # At most MAX_QUEUED blobs wait for the sink (bounded memory); a sink error (e.g. a
        # full store) stops packaging at the next blob instead of at the end.
        waiting = [f for f, _ in self.blobs if not f.done()]
        if len(waiting) > MAX_QUEUED:
            waiting[0].result()
        for f, _ in self.blobs:
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
    buffers: SegmentBuffers | None = None,
) -> tuple[Manifest, SourceInfo, list[tuple[Cid, str]]]:
    """Package `path` into blobs (through `sink`) and return (manifest, source info, blobs put).

    `info` is the caller's `probe(path)` if it already has one (saves opening the file twice).
    `buffers`: the sink gives each segment's bytes back to this pool once it is done with them
    (see `SegmentBuffers`); a native remux then reads its segments into reused buffers.
    Raises MediaError naming the file and the reason for bad input, `Cancelled` when `cancel` is
    set, and whatever `sink` raises (e.g. StoreFull).
    """
    src = info if info is not None else probe(path)
    job = _Job(src, opts, sink, progress, cancel, buffers)
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
    return manifest, src, [(f.result(), kind) for f, kind in job.blobs]


def _package(job: _Job) -> Manifest:
    src, opts = job.src, job.opts
    v = src.video
    remux = opts.transcode == "auto" and src.can_remux()
    if remux and opts.max_height is not None and v.height > opts.max_height:
        remux = False
    if remux:
        top_w, top_h = v.width, v.height
    else:
        top_w, top_h = _scaled_size(v.width, v.height, opts.max_height or v.height)
    rate = v.frame_rate
    top = _Out(rid=f"v{top_h}", kind="video", width=top_w, height=top_h)
    rungs = _rungs_below(opts, top_h)
    eager = [r for r in rungs if not r.on_demand]
    derived: list[tuple[_Out, Recipe]] = []
    for r in rungs:
        w, h = _scaled_size(top_w, top_h, r.height)
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
    job.passes = 1 + len(eager)
    producers = [(o, rec) for o, rec in derived if any(o.rid == r.rendition_id for r in eager)]
    if audio_out is not None and audio_out.recipe is not None:
        producers.append((audio_out, audio_out.recipe))

    def on_top_segment(seg: SegmentBytes, duration: int) -> None:
        job.check()
        job.still_there()
        if seg.init is not None and top.init_cid is None:
            top.init_cid = job.put(seg.init, "init")
        top.segs.append((duration, job.put(seg.data, "segment"), len(seg.data)))
        for o, rec in producers:
            job.check()
            d = derive_segment(opts.container, top.mux_init, seg.data, rec, seg.seq)
            if d.init is not None and o.init_cid is None:
                o.init_cid = job.put(d.init, "init")
            o.segs.append((duration, job.put(d.data, "segment"), len(d.data)))
            if o.kind == "video":
                job.extra_done += duration / TIMESCALE
                _report(job)

    def on_top_read(seq: int, init: bytes, duration: int, size: int, read: _Read) -> None:
        job.check()
        job.still_there()
        if top.init_cid is None:
            top.init_cid = job.put(init, "init")
        top.segs.append((duration, job.put_read(read, "segment"), size))

    native = _native_source(job) if remux else None
    if native is not None:
        # Rungs derived from the top segments need each one's bytes in this thread, after it
        # went to the sink: read here then, never into a pooled buffer the sink gives back.
        on_read = None if producers else on_top_read
        start = _native_top_pass(job, top, native, on_top_segment, on_read)
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
    return Manifest(container=opts.container, renditions=tuple(renditions))


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
    inp = open_input(path)
    holder: av.container.OutputContainer | None = None
    try:
        vin: Any = inp.streams[src.video.index]
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
            holder = _new_holder(opts.container)
            vin.thread_type = "AUTO"  # decoder frame+slice threads; does not change output
            vin.thread_count = 0
            encoder = _add_x264(
                holder,
                width,
                height,
                src.video.frame_rate,
                tb,
                opts.crf,
                opts.preset,
                opts.encoder_threads,
            )
            scaler = _Scaler(vin, width, height)
            vtemplate = encoder
        if ain is not None and not copy_audio:
            holder = holder or _new_holder(opts.container)
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
        sei_filter = _SeiFilter(encoder)
        muxer = SegmentMuxer(
            opts.container,
            vtemplate,
            atemplate,
            hevc=remux and src.video.codec == "hevc",
            size=None if remux else (width, height),
        )
        state: dict[str, Any] = {"origin": None, "start": 0}

        def emit(seg: _Seg, seq: int) -> None:
            _fill_dts(seg.video)
            if seq == 0 and seg.video:
                state["first_video"] = bytes(seg.video[0])
            if state["origin"] is None:
                cands = [seg.start]
                cands += [
                    _t(p.dts, p.time_base) or seg.start for p in seg.video[:1] + seg.audio[:1]
                ]
                first_origin = min(cands)
                state["origin"] = first_origin
                # The timeline starts with whichever stream presents first (audio often leads
                # video by the B-frame delay), so segment 0's EXTINF covers that lead too.
                lead = [_t(p.pts, p.time_base) for p in seg.audio[:1]]
                first = min([seg.start] + [t for t in lead if t is not None])
                state["start"] = _ticks(max(first, first_origin) - first_origin)
            origin: Fraction = state["origin"]
            assert seg.end is not None
            begin = state["start"] if seq == 0 else _ticks(seg.start - origin)
            duration = _ticks(seg.end - origin) - begin
            out = muxer.mux(seq, seg.video, seg.audio, origin)
            top.mux_init = muxer.init
            on_segment(out, max(duration, 1))

        cutter = _Cutter(opts.segment_seconds, atemplate is not None, emit)
        vdur_default = Fraction(1) / (src.video.frame_rate or 30)
        last_pts: list[int | None] = [None]
        audio_next: list[int | None] = [None]

        def feed_video_packet(p: Any) -> None:
            pts = _t(p.pts, p.time_base)
            if pts is None:
                pts = _t(p.dts, p.time_base)
            if pts is None:
                return
            dur = _t(p.duration, p.time_base) or vdur_default
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
                t0 = _t(frame.pts, frame.time_base) or Fraction(0)
                audio_next[0] = _rescale(t0, atb)
            for rf in resampler.resample(frame):
                rf.pts = audio_next[0]
                rf.time_base = atb
                audio_next[0] = (audio_next[0] or 0) + rf.samples
                for p in aencoder.encode(rf):
                    cutter.audio(p, _t(p.pts, p.time_base) or Fraction(0))
            if frame is None:
                for p in aencoder.encode(None):
                    cutter.audio(p, _t(p.pts, p.time_base) or Fraction(0))

        streams = [vin] + ([ain] if ain is not None else [])
        next_i = [Fraction(0)]
        step = Fraction(opts.segment_seconds).limit_denominator(1000)

        def read() -> Generator[tuple[int, Any], None, None]:
            # Demux, decode and scale: everything that only depends on the input. Yields the
            # items in the order the serial loop handled them, so what the encoder and the
            # cutter see (and the bytes) does not depend on how far ahead this runs.
            for pkt in inp.demux(*streams):
                job.check()
                if pkt.stream is ain:
                    if copy_audio:
                        if pkt.dts is not None:
                            yield _AUDIO_PACKET, pkt
                    else:
                        for af in pkt.decode():
                            yield _AUDIO_FRAME, af
                    continue
                if remux:
                    if pkt.dts is not None or pkt.pts is not None:
                        yield _VIDEO_PACKET, pkt
                    continue
                assert scaler is not None
                for frame in pkt.decode():
                    assert isinstance(frame, av.VideoFrame)
                    for f in scaler(frame):
                        _prepare_frame(f, last_pts, next_i, step, tb)
                        if f.pts is not None:
                            yield _VIDEO_FRAME, f
            if not remux:
                assert scaler is not None
                for f in scaler(None):
                    _prepare_frame(f, last_pts, next_i, step, tb)
                    if f.pts is not None:
                        yield _VIDEO_FRAME, f

        # A transcode decodes and scales in a reader thread while this one encodes, cuts and
        # muxes (libav releases the GIL), so neither stage waits for the other. Where the codec
        # threads already keep every core busy (2 cores) this measured neutral; it pays where
        # cores are spare. A remux has nothing worth overlapping.
        items = read() if remux else _ahead(read(), READ_AHEAD, "peerd-decode")
        try:
            for what, item in items:
                if what == _VIDEO_FRAME:
                    encode_frame(item)
                elif what == _VIDEO_PACKET:
                    feed_video_packet(item)
                elif what == _AUDIO_PACKET:
                    cutter.audio(item, _t(item.pts, item.time_base) or Fraction(0))
                else:
                    assert isinstance(item, av.AudioFrame)
                    feed_audio_frame(item)
            if not remux:
                encode_frame(None)
            if aencoder is not None:
                feed_audio_frame(None)
        except av.error.FFmpegError as exc:
            raise _wrap_av(path, exc, "while reading") from None
        finally:
            items.close()  # stops and joins the reader thread before the input is closed
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
        vcodec = codecs.video_codec(src.video.codec if remux else "h264", extradata)
        if muxer.init is not None and remux:
            box = b"hvcC" if src.video.codec == "hevc" else b"avcC"
            cfg = fmp4.codec_config(muxer.init, box)
            if cfg:
                vcodec = codecs.video_codec(src.video.codec, cfg)
        top.codecs = vcodec
        if src.audio is not None:
            top.codecs += "," + _audio_codecs(src, opts)
        return int(state["start"])
    finally:
        inp.close()
        if holder is not None:
            holder.close()


@dataclass
class _Native:
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


def _native_source(job: _Job) -> _Native | None:
    """The native remux of this job's source, or None if it has to go through PyAV.

    Native when: fMP4 output, the video is remuxed, the audio (if any) is copied, and
    `isobmff` understands the file (its module doc lists the rule). Decided before any blob is
    produced, from the file alone, so it is the same on every node.
    """
    src, opts = job.src, job.opts
    if opts.container != "fmp4" or (src.audio is not None and not src.can_copy_audio("fmp4")):
        return None
    try:
        fd = os.open(src.path, os.O_RDONLY)
    except OSError:
        return None  # the PyAV path reports it
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
    except (isobmff.Unsupported, struct.error, OSError) as exc:
        os.close(fd)
        log.debug("remux through PyAV", extra={"path": str(src.path), "reason": str(exc)})
        return None
    return _Native(fd, video, audio, cuts)


_Read = Callable[[], tuple[bytes, Cid]]
"""Reads one segment and returns its bytes and cid (run in a hashing thread)."""


def _native_top_pass(
    job: _Job,
    top: _Out,
    native: _Native,
    on_segment: Callable[[SegmentBytes, int], None],
    on_read: Callable[[int, bytes, int, int, _Read], None] | None = None,
) -> int:
    """`_top_pass` for a native remux: sample bytes read straight from the file.

    With ``on_read``, each segment is handed on unread, as a function that reads and hashes it
    (in a hashing thread, into a buffer of ``job.buffers``); otherwise it is read here and
    handed to ``on_segment`` with its bytes.
    """
    src = job.src
    path = src.path
    try:
        video, audio, cuts = native.video, native.audio, native.plan
        end = float(cuts.video_end - cuts.first_start)
        if src.duration > 0 and end < 0.9 * src.duration - 0.5:
            raise MediaError(
                f"{path}: truncated: video ends at {end:.1f} s of {src.duration:.1f} s",
                path=str(path),
            )
        tracks = [video] + ([audio] if audio is not None else [])
        init = isobmff.init_segment(tracks)
        top.mux_init = init
        origins = [isobmff.rescale(cuts.origin, t.timescale) for t in tracks]
        scratch = threading.local()
        for seq, seg in enumerate(cuts.segments):
            job.check()
            runs = [isobmff.TrackRun(video, seg.v0, seg.v1, video.dts[seg.v0] - origins[0])]
            if audio is not None and seg.a1 > seg.a0:
                runs.append(isobmff.TrackRun(audio, seg.a0, seg.a1, audio.dts[seg.a0] - origins[1]))
            header = isobmff.fragment_header(seq + 1, runs)
            ranges = _sample_ranges(runs)
            last = seg.v1 - 1
            job.top_done = max(job.top_done, (video.dts[last] + video.cto[last]) / video.timescale)
            if on_read is not None:
                size = len(header) + sum(e - o for o, e in ranges)
                read = functools.partial(
                    _read_hashed, native.fd, path, header, ranges, scratch, job.buffers
                )
                on_read(seq, init, cuts.duration_ticks(seq), size, read)
                _report(job)
                continue
            data = _read_samples(native.fd, path, header, ranges, scratch)
            _report(job)
            on_segment(SegmentBytes(seq, init, data), cuts.duration_ticks(seq))
        # Every read has ended (the descriptor is closed below) before the file is checked.
        futures.wait(job.reads)
        job.still_there()
        entry = b"hvcC" if src.video.codec == "hevc" else b"avcC"
        top.codecs = codecs.video_codec(src.video.codec, fmp4.codec_config(init, entry))
        if src.audio is not None:
            top.codecs += "," + _audio_codecs(src, job.opts)
        return cuts.start_ticks
    finally:
        for f in job.reads:
            f.cancel()  # on an error: reads not yet started never start
        futures.wait(job.reads)
        os.close(native.fd)


# Reading a segment's whole byte span at once is cheaper than one read per chunk unless the
# span holds much more than the segment's samples (other tracks interleaved in big chunks).
_SPAN_SLACK = 1 << 20


_MAX_IOV = 1024  # IOV_MAX on Linux: longer scatter lists go in several preadv calls


def _scatter_read(
    fd: int,
    path: Path,
    header: bytes,
    ranges: list[tuple[int, int]],
    total: int,
    scratch: bytearray,
    buffers: SegmentBuffers | None = None,
) -> bytes:
    """header + ``ranges`` of the file, in that order, read by ``preadv`` over their span.

    Each range lands straight in its place in the segment (bytes of other tracks between them go
    to ``scratch``): no copy from a read buffer into the segment afterwards. The segment is a
    buffer of ``buffers`` if given, else a new one.
    """
    n = len(header) + total
    own: bytearray | None = None
    if buffers is None:
        own = bytearray(n)
        out = memoryview(own)
    else:
        out = buffers.take(n)
    out[: len(header)] = header
    at = len(header)
    placed: list[tuple[int, int, int]] = []  # (file offset, end, offset in out)
    for o, e in ranges:
        placed.append((o, e, at))
        at += e - o
    placed.sort()
    gap = max((b[0] - a[1] for a, b in zip(placed, placed[1:], strict=False)), default=0)
    if len(scratch) < gap:
        scratch.extend(bytes(gap - len(scratch)))
    junk = memoryview(scratch)
    iov: list[memoryview] = []
    done = False
    try:
        pos = start = placed[0][0]
        for o, e, dst in placed:
            if o > pos:
                iov.append(junk[: o - pos])
            iov.append(out[dst : dst + e - o])
            pos = e
        for i in range(0, len(iov), _MAX_IOV):
            batch = iov[i : i + _MAX_IOV]
            want = sum(len(v) for v in batch)
            if os.preadv(fd, batch, start) != want:
                raise MediaError(f"{path}: truncated or changed while reading", path=str(path))
            start += want
        done = True
    finally:
        for v in iov:
            v.release()
        junk.release()
        if buffers is None:
            out.release()
        elif not done:
            buffers.give(out)
    # Bytes that nobody changes from here on (they are hashed and written): no copy to bytes.
    if own is not None:
        return cast("bytes", own)
    return cast("bytes", out)


def _sample_ranges(runs: list[isobmff.TrackRun]) -> list[tuple[int, int]]:
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


def _read_samples(
    fd: int,
    path: Path,
    header: bytes,
    ranges: list[tuple[int, int]],
    scratch: threading.local,
    buffers: SegmentBuffers | None = None,
) -> bytes:
    """header + the ranges' bytes in order, read with as few preads as possible.

    ``scratch`` holds this thread's buffer for the bytes of other tracks between the ranges.
    """
    total = sum(e - o for o, e in ranges)
    lo = min(o for o, _ in ranges)
    hi = max(e for _, e in ranges)
    if hi - lo <= 2 * total + _SPAN_SLACK:
        junk = getattr(scratch, "buf", None)
        if junk is None:
            junk = scratch.buf = bytearray()
        return _scatter_read(fd, path, header, ranges, total, junk, buffers)
    parts: list[bytes] = [header]
    for o, e in ranges:
        chunk = os.pread(fd, e - o, o)
        if len(chunk) != e - o:
            raise MediaError(f"{path}: truncated or changed while reading", path=str(path))
        parts.append(chunk)
    return b"".join(parts)


def _read_hashed(
    fd: int,
    path: Path,
    header: bytes,
    ranges: list[tuple[int, int]],
    scratch: threading.local,
    buffers: SegmentBuffers | None,
) -> tuple[bytes, Cid]:
    """`_read_samples` and the cid of what it read, hashed while it is still in the cache."""
    data = _read_samples(fd, path, header, ranges, scratch, buffers)
    return data, cid_of(data)


def _fill_dts(packets: list[Any]) -> None:
    """Give every packet a decode timestamp when the demuxer left some unset (Matroska).

    The i-th decode time is the i-th smallest presentation time moved back by the reorder
    delay, which keeps decode times increasing and never after their presentation times.
    """
    if all(p.dts is not None for p in packets) or any(p.pts is None for p in packets):
        return
    pts = [int(p.pts) for p in packets]
    ordered = sorted(pts)
    delay = max(0, max(o - q for o, q in zip(ordered, pts, strict=True)))
    for p, o in zip(packets, ordered, strict=True):
        p.dts = o - delay


def _prepare_frame(
    f: av.VideoFrame,
    last_pts: list[int | None],
    next_i: list[Fraction],
    step: Fraction,
    tb: Fraction,
) -> None:
    """Fix missing/non-increasing pts and force an IDR on the first frame of each segment slot."""
    if f.pts is None:
        f.pts = (last_pts[0] + 1) if last_pts[0] is not None else 0
    if last_pts[0] is not None and f.pts <= last_pts[0]:
        f.pts = None  # duplicate timestamp: the caller drops the frame
        return
    last_pts[0] = f.pts
    t = Fraction(f.pts * tb.numerator, tb.denominator)
    if t >= next_i[0]:
        f.pict_type = PictureType.I
        next_i[0] = (math.floor(t / step) + 1) * step
    else:
        f.pict_type = PictureType.NONE


# ---- derived renditions ----------------------------------------------------------------------


def derive_segment(
    container: str, init: bytes | None, segment: bytes, recipe: Recipe, seq: int
) -> SegmentBytes:
    """Produce segment `seq` of a derived rendition from the same segment of its source rendition.

    Deterministic: the same (init, segment, recipe) give the same bytes, whether called during
    ingest or on demand later.
    """
    data = (init or b"") + segment
    inp = av.open(io.BytesIO(data), "r", format="mp4" if container == "fmp4" else "mpegts")
    holder = None
    try:
        vin = inp.streams.video[0] if inp.streams.video else None
        ain = inp.streams.audio[0] if inp.streams.audio and recipe.audio else None
        video_pkts: list[Any] = []
        audio_pkts: list[Any] = []
        vtemplate: Any = None
        if recipe.width is not None and vin is not None:
            assert recipe.height is not None
            assert recipe.crf is not None, "bit-rate recipes are not produced by this node"
            holder = _new_holder(container)
            vin.thread_type = "AUTO"  # decoder frame threads: output frames are the same
            vin.thread_count = 0
            enc = _add_x264(
                holder,
                recipe.width,
                recipe.height,
                vin.average_rate,
                vin.time_base or Fraction(1, TIMESCALE),
                recipe.crf,
                recipe.preset,
                recipe.threads,
                recipe.bframes,
            )
            holder.start_encoding()
            sei_filter = _SeiFilter(enc)
            scaler = _Scaler(vin, recipe.width, recipe.height)
            vtemplate = enc
            last: int | None = None

            def encode(frame: av.VideoFrame | None) -> None:
                nonlocal last
                if frame is not None:
                    if frame.pts is None or (last is not None and frame.pts <= last):
                        return
                    last = frame.pts
                    frame.pict_type = PictureType.NONE
                for p in enc.encode(frame):
                    video_pkts.extend(sei_filter.filter(p))

            streams = [vin] + ([ain] if ain is not None else [])

            def read() -> Generator[tuple[int, Any], None, None]:
                for pkt in inp.demux(*streams):
                    if pkt.stream is ain:
                        if pkt.dts is not None:
                            yield _AUDIO_PACKET, pkt
                        continue
                    for frame in pkt.decode():
                        assert isinstance(frame, av.VideoFrame)
                        for f in scaler(frame):
                            yield _VIDEO_FRAME, f
                for f in scaler(None):
                    yield _VIDEO_FRAME, f

            # As in the top pass: decode and scale ahead in a thread, same order, same bytes.
            items = _ahead(read(), READ_AHEAD, "peerd-decode")
            try:
                for what, item in items:
                    if what == _AUDIO_PACKET:
                        audio_pkts.append(item)
                    else:
                        encode(item)
            finally:
                items.close()  # the reader is joined before the input is closed
            encode(None)
        elif ain is not None:
            audio_pkts = [p for p in inp.demux(ain) if p.dts is not None]
        else:
            raise MediaError("derived rendition has neither video nor audio to produce")
        size = (recipe.width, recipe.height) if recipe.width and recipe.height else None
        muxer = SegmentMuxer(container, vtemplate, ain, size=size)
        return muxer.mux(seq, video_pkts, audio_pkts, Fraction(0))
    except av.error.FFmpegError as exc:
        raise MediaError(f"cannot derive segment {seq} ({recipe.source}): {exc}") from None
    finally:
        inp.close()
        if holder is not None:
            holder.close()
