"""The transcoder: decode, scale in a libavfilter graph, encode with libx264 (deterministic).

Video is encoded at constant quality (CRF; x264's bit-rate modes are not repeatable with
threads), with decoder frame threads and encoder frame threads at a *fixed* count, because x264's
output depends on it, and without macroblock-tree rate control and x264's SEI (see
`x264_options`, `SeiFilter`).

`derive_segment` makes one segment of a ladder rung (or the audio-only rendition) from the same
segment of the top rendition: decode that segment's blob, scale, encode with a new encoder (so
the segment starts with an IDR and depends on nothing else), copy its audio. The same function
serves eager rungs at ingest and on-demand rungs later, so both give byte-identical blobs on any
node with the same PyAV build and options.
"""

from __future__ import annotations

import io
import math
from fractions import Fraction
from typing import Any

import av
import av.error
from av.video.frame import PictureType

from peerd.core.manifest import Recipe
from peerd.errors import MediaError
from peerd.media import codecs
from peerd.media.cut import TIMESCALE
from peerd.media.mux import SegmentBytes, SegmentMuxer

SCALE_FLAGS = "bicubic"


def _even(x: float) -> int:
    return max(2, int(round(x / 2)) * 2)


def scaled_size(width: int, height: int, target_h: int) -> tuple[int, int]:
    """Even width and height for a picture scaled down to `target_h` (never up)."""
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


def new_holder(container: str) -> av.container.OutputContainer:
    """An output container that only owns encoder streams (never written to)."""
    # A muxer that is never written to, only used to own encoder streams: the mp4 one makes x264
    # put SPS/PPS in extradata (global header, needed in the fMP4 init), mpegts keeps them inline.
    return av.open(io.BytesIO(), "w", format="mp4" if container == "fmp4" else "mpegts")


def add_x264(
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
    """A libx264 stream on `holder` with the deterministic settings (see the module doc)."""
    opts = _x264_options(preset, crf, bframes)
    coded_w, coded_h = _coded_size(width, height)
    if (coded_w, coded_h) != (width, height):
        # Frames arrive padded to whole macroblocks (see Scaler); the SPS crops the padding off.
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
        vs = add_x264(holder, width, height, rate, Fraction(1, TIMESCALE), crf, preset, 1, bframes)
        vs.codec_context.open()
        return codecs.avc_codec(vs.codec_context.extradata)
    finally:
        holder.close()


class SeiFilter:
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
        """The packet(s) with SEI NAL units removed."""
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


class Scaler:
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


def prepare_frame(
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
            holder = new_holder(container)
            vin.thread_type = "AUTO"  # decoder frame threads: output frames are the same
            vin.thread_count = 0
            enc = add_x264(
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
            sei_filter = SeiFilter(enc)
            scaler = Scaler(vin, recipe.width, recipe.height)
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

            for pkt in inp.demux(*([vin] + ([ain] if ain is not None else []))):
                if pkt.stream is ain:
                    if pkt.dts is not None:
                        audio_pkts.append(pkt)
                    continue
                for frame in pkt.decode():
                    assert isinstance(frame, av.VideoFrame)
                    for f in scaler(frame):
                        encode(f)
            for f in scaler(None):
                encode(f)
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
