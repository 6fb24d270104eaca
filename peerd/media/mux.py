"""The muxer: one segment's packets -> deterministic fMP4 or MPEG-TS bytes through libavformat.

Each segment gets a fresh muxer (``mp4`` with an empty moov and one fragment, or ``mpegts``) with
``+bitexact`` and no metadata, so there are no clocks or version strings in the bytes. For fMP4
the init segment (ftyp+moov) is split off and the fragment's ``mfhd``/``tfdt`` are rewritten to
the rendition's sequence and decode time (`peerd.media.fmp4`). MPEG-TS segments are padded to
whole continuity-counter cycles per PID, so they join as one stream (`peerd.media.mpegts`).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import av

from peerd.errors import MediaError
from peerd.media import fmp4, mpegts
from peerd.media.cut import rescale

# mp4: an empty moov up front and one fragment per segment (written at close); no mfra trailer.
MP4_FLAGS = "empty_moov+default_base_moof+frag_custom+skip_trailer"


@dataclass(frozen=True)
class SegmentBytes:
    """One produced media segment (and the rendition's init segment, for fMP4)."""

    seq: int
    init: bytes | None
    data: bytes


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
                    d = rescale(shift, tb)
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
            return SegmentBytes(seq, None, mpegts.pad_continuity(buf.getvalue()))
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
                    offsets[tid] = max(0, rescale(first, Fraction(tb)))
            fmp4.patch_fragments_in_place(view, cut, len(view), seq + 1, offsets)
            media = bytes(view[cut:])
        finally:
            view.release()
        if self.init is None:
            self.init = init
        elif init != self.init:
            raise MediaError("internal: fMP4 init segment changed between segments")
        return SegmentBytes(seq, init, media)
