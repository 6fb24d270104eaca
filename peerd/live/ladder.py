"""The live ABR ladder: lower renditions of a live input, transcoded within a CPU budget, and the
master playlist that lists them.

:class:`LiveLadder` is a consumer of the live service (``publication(input) -> LiveSink``),
beside the LL-HLS packager. With ``[live] ladder`` rungs configured, each publication with
H.264 video gets one :class:`Transcoder` thread: it decodes the input's video ONCE, and for
each rung below the publisher's height (:func:`peerd.core.ladder.applicable`) scales the
decoded picture and encodes it (libx264 ``veryfast``/``zerolatency``, the rung's bitrate as a
1 s VBV cap), forcing an IDR on each source keyframe and nowhere else (``keyint=infinite``,
``scenecut=0``) so every rendition's segments cut at the same media times. The rung's frames,
with the source's audio frames passed through, go to a :class:`RungStream`: an ordinary
LL-HLS :class:`~peerd.live.llhls.Stream` (its own packager thread, parts, segments,
playlist), served at ``/live/<input>/r<height>/index.m3u8``.
``GET /live/<input>/master.m3u8`` lists the source rendition (``index.m3u8``, untouched) and
the rungs (:func:`peerd.core.ladder.master_playlist`).

CPU budget: the decoder and encoders run single-threaded in the transcode thread, so
``time.thread_time`` there is the whole cost. Each step is charged to the one
:class:`~peerd.core.ladder.CpuBudget` of the node (every input together); a window of
``[live] ladder_window_s`` over ``ladder_cpu_percent`` drops the most expensive rung (logged,
counted, its routes 404 so hls.js switches to another level, the master playlist stops listing
it). The source
rendition never waits for the ladder: the transcoder has its own bounded queue, and when it
falls behind it drops what the publisher sends until the next keyframe (counted) instead of
holding anything back.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Sequence
from fractions import Fraction
from functools import partial
from typing import Any

import av
from aiohttp import web
from prometheus_client import Counter, Gauge

from peerd.core import avc
from peerd.core.ladder import (
    DECODE,
    CpuBudget,
    LiveRung,
    Variant,
    applicable,
    peak_bandwidth,
    rung_size,
)
from peerd.core.ladder import master_playlist as render_master
from peerd.core.live import LiveFrame, LiveSink, LiveTrack
from peerd.core.playlist import MIME_PLAYLIST
from peerd.errors import Unavailable
from peerd.live.llhls import BLOCK_S, Event, LiveHls, LiveRoutes, PartReady, Stream
from peerd.live.service import track_codec
from peerd.runtime import Runtime

log = logging.getLogger("peerd.live.ladder")

QUEUE_LIMIT = 150  # frames waiting for the transcoder (~2 s of 30 fps video + 48 kHz AAC)
_INBAND = (avc.NAL_SPS, avc.NAL_PPS, 6, 9)  # SPS/PPS are in the avcC; SEI, AUD not needed
_I = av.video.frame.PictureType.I
_AUTO = av.video.frame.PictureType.NONE


class LadderMetrics:
    """What operators count: rungs on air per input, rungs dropped, frames the ladder lost."""

    def __init__(self, rt: Runtime) -> None:
        reg = rt.metrics.registry
        self.rungs = Gauge(
            "peerd_live_ladder_rungs", "Ladder renditions transcoded now", ["input"], registry=reg
        )
        self.dropped = Counter(
            "peerd_live_ladder_dropped", "Ladder rungs dropped over the CPU budget", registry=reg
        )
        self.lost = Counter(
            "peerd_live_ladder_frames_lost",
            "Publisher frames the ladder skipped because its transcoder fell behind",
            registry=reg,
        )
        self.cpu = Gauge(
            "peerd_live_ladder_cpu_cores",
            "CPU of every ladder transcode in the last budget window (1 = one core)",
            registry=reg,
        )


class RungStream(Stream):
    """A ladder rendition's LL-HLS stream: its clock is the source rendition's, so its
    ``EXT-X-PROGRAM-DATE-TIME`` lines agree with the source's (players align levels by it)."""

    def __init__(self, hls: LiveHls, input: str, rung: LiveRung, source: Stream | None) -> None:
        super().__init__(hls, input)
        self.rung = rung
        self.source = source

    def _apply(self, e: Event) -> None:
        tl = self.timeline
        first = isinstance(e, PartReady) and tl is not None and not tl.current and not tl.segments
        super()._apply(e)
        src = self.source.timeline if self.source is not None else None
        if first and tl is not None and src is not None and (src.current or src.segments):
            tl.wall_start = src.wall_start


class _Coder:
    """One rung's scaler and encoder (in the transcode thread)."""

    def __init__(
        self, rung: LiveRung, video: LiveTrack, width: int, height: int, fps: Fraction
    ) -> None:
        self.rung = rung
        self.width, self.height = rung_size(width, height, rung.height)
        enc: Any = av.CodecContext.create("libx264", "w")
        enc.width, enc.height = self.width, self.height
        enc.pix_fmt = "yuv420p"
        enc.time_base = Fraction(1, video.timescale)
        enc.framerate = fps
        enc.bit_rate = rung.bitrate_kbps * 1000
        enc.thread_count = 1  # thread_time of the transcode thread is then the whole cost
        enc.flags |= int(av.codec.context.Flags.global_header)
        rate = f"{rung.bitrate_kbps}k"
        enc.options = {
            "preset": "veryfast",
            "tune": "zerolatency",
            "forced-idr": "1",
            "x264-params": "keyint=infinite:scenecut=0",
            "maxrate": rate,
            "bufsize": rate,
        }
        enc.open()
        nals = avc.split_annexb(bytes(enc.extradata or b""))
        sps = [n for n in nals if avc.nal_type(n) == avc.NAL_SPS]
        pps = [n for n in nals if avc.nal_type(n) == avc.NAL_PPS]
        self.encoder = enc
        self.track = LiveTrack(
            video.index,
            "video",
            "h264",
            video.timescale,
            avc.avcc(sps, pps),
            width=self.width,
            height=self.height,
        )

    def encode(self, picture: av.VideoFrame, shift: int) -> list[LiveFrame]:
        """The rung's frames for one decoded source picture (one in, one out: zerolatency),
        decoded ``shift`` ticks before shown, as the source's first keyframe was: the rung's
        media time zero is then the source's (the packager starts at a keyframe's dts)."""
        scaled = picture.reformat(width=self.width, height=self.height, format="yuv420p")
        scaled.pts, scaled.time_base = picture.pts, self.encoder.time_base
        scaled.pict_type = _I if picture.key_frame else _AUTO
        out = []
        for p in self.encoder.encode(scaled):
            nals = [n for n in avc.split_annexb(bytes(p)) if avc.nal_type(n) not in _INBAND]
            if p.pts is None or not nals:
                continue
            dts = p.pts - shift
            out.append(
                LiveFrame(
                    self.track.index, dts, p.pts, bool(p.is_keyframe), avc.length_prefixed(nals)
                )
            )
        return out


_STOP = object()


class Transcoder:
    """One publication's ladder: a thread decoding the video once and encoding every rung."""

    def __init__(
        self,
        ladder: LiveLadder,
        input: str,
        video: LiveTrack,
        audio: Sequence[LiveTrack],
        source: Stream | None,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.ladder = ladder
        self.input = input
        self.video = video
        self.audio = list(audio)
        self.audio_ids = {t.index for t in audio}
        self.source = source
        self.loop = loop
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.queued = 0  # frames in the queue (approximate: read on the loop, lowered here)
        self.waiting_key = True
        self.done = False  # no rung left (or ended): frames are no longer taken
        self.coders: list[_Coder] = []
        self.streams: dict[str, RungStream] = {}
        self.held: list[LiveFrame] = []  # audio until the rungs exist
        self.shift: int | None = None  # pts - dts of the source's first keyframe
        self.thread = threading.Thread(target=self._run, name=f"ladder-{input}", daemon=True)

    # on the loop

    def offer(self, frame: LiveFrame) -> None:
        """Queue a publisher's frame; behind real time, skip to the next keyframe."""
        if self.done:
            return
        if frame.track == self.video.index:
            if self.waiting_key and not frame.keyframe:
                return
            if self.queued >= QUEUE_LIMIT:
                self.waiting_key = True
                self.ladder.metrics.lost.inc()
                return
            self.waiting_key = False
        elif frame.track not in self.audio_ids or self.waiting_key:
            return
        self.queued += 1
        self.queue.put(frame)

    def stop(self, reason: str) -> None:
        """The publication ended: the rungs end after what is queued."""
        self.queue.put(reason)

    # in the thread

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # a failing ladder must never touch the source rendition
            log.exception("live ladder failed", extra={"input": self.input, "error": repr(exc)})
            for stream in self.streams.values():
                self.loop.call_soon_threadsafe(self.ladder.remove, self, stream, "ladder failed")
        finally:
            self.done = True
            with self.ladder.lock:
                self.ladder.budget.forget(self.input)
            self.loop.call_soon_threadsafe(self.ladder.gone, self)

    def _loop(self) -> None:
        decoder: Any = av.CodecContext.create("h264", "r")
        decoder.extradata = self.video.config
        decoder.thread_count = 1
        pictures: list[av.VideoFrame] = []  # decoded before the encoders could open
        while True:
            item = self.queue.get()
            if item is _STOP:
                return
            if isinstance(item, str):
                self._end(item)
                return
            self.queued -= 1
            frame: LiveFrame = item
            if frame.track != self.video.index:
                self._audio(frame)
                continue
            if self.shift is None:
                self.shift = max(0, frame.pts - frame.dts)
            t0 = time.thread_time()
            decoded = _decode(decoder, frame)
            self._charge(DECODE, time.thread_time() - t0)
            for picture in decoded:
                if not self.coders:
                    pictures.append(picture)
                    if len(pictures) < 2 or not self._open(pictures):
                        continue
                    ready, pictures = pictures, []
                else:
                    ready = [picture]
                for pic in ready:
                    self._encode(pic)
            if self.done or self._shed():
                return

    def _open(self, pictures: list[av.VideoFrame]) -> bool:
        """Open the rungs once two pictures tell the size and frame rate; False: no rung."""
        first, second = pictures[0], pictures[1]
        tick = (second.pts or 0) - (first.pts or 0)
        fps = (
            Fraction(self.video.timescale, tick).limit_denominator(1001)
            if tick > 0
            else Fraction(30)
        )
        rungs = applicable(self.ladder.rungs, first.height)
        if not rungs:
            log.info(
                "live ladder: no rung below the publisher's height",
                extra={"input": self.input, "height": first.height},
            )
            self._end("no rung")
            self.done = True
            return False
        self.coders = [_Coder(r, self.video, first.width, first.height, fps) for r in rungs]
        begun = asyncio.run_coroutine_threadsafe(self._begin(), self.loop)
        self.streams = begun.result(timeout=30)
        for f in self.held:
            self._audio(f)
        self.held = []
        log.info(
            "live ladder started",
            extra={
                "input": self.input,
                "rungs": [f"{c.width}x{c.height}@{c.rung.bitrate_kbps}k" for c in self.coders],
            },
        )
        return True

    async def _begin(self) -> dict[str, RungStream]:
        """The rungs' LL-HLS streams (on the loop: they start their packagers there)."""
        hls = self.ladder.hls
        streams = {}
        for c in self.coders:
            s = RungStream(hls, self.input, c.rung, self.source)
            s.begin([c.track, *self.audio])
            streams[c.rung.name] = s
        if not self.done:
            hls.renditions[self.input] = dict(streams)
            self.ladder.metrics.rungs.labels(input=self.input).set(len(streams))
        return streams

    def _audio(self, frame: LiveFrame) -> None:
        if not self.streams:
            self.held.append(frame)
            return
        for c in self.coders:
            # Stream.frame only hands the frame to the rung's packager queue (thread-safe).
            self.streams[c.rung.name].frame(frame)

    def _encode(self, picture: av.VideoFrame) -> None:
        for c in self.coders:
            t0 = time.thread_time()
            frames = c.encode(picture, self.shift or 0)
            self._charge(c.rung.name, time.thread_time() - t0)
            stream = self.streams[c.rung.name]
            for f in frames:
                stream.frame(f)

    def _charge(self, rung: str, cpu_s: float) -> None:
        with self.ladder.lock:
            self.ladder.budget.charge((self.input, rung), cpu_s, time.monotonic())

    def _shed(self) -> bool:
        """Drop rungs over the budget; True when none is left (the thread ends)."""
        self.ladder.decide(time.monotonic())
        doomed = [c for c in self.coders if (self.input, c.rung.name) in self.ladder.doomed]
        if not doomed:
            return False
        self.coders = [c for c in self.coders if c not in doomed]
        for c in doomed:
            self.ladder.doomed.discard((self.input, c.rung.name))
            stream = self.streams.pop(c.rung.name)
            self.loop.call_soon_threadsafe(self.ladder.dropped, self, stream)
        return not self.coders

    def _end(self, reason: str) -> None:
        for s in self.streams.values():
            self.loop.call_soon_threadsafe(s.end, reason)


def _decode(ctx: Any, frame: LiveFrame) -> list[av.VideoFrame]:
    pkt = av.Packet(frame.data)
    pkt.pts, pkt.dts = frame.pts, frame.dts
    try:
        return [f for f in ctx.decode(pkt) if isinstance(f, av.VideoFrame) and f.pts is not None]
    except av.FFmpegError as exc:
        log.warning("live ladder: frame not decoded", extra={"error": str(exc)})
        return []


class LadderSink(LiveSink):
    """One publication as the ladder takes it."""

    def __init__(self, ladder: LiveLadder, input: str, source: Stream | None) -> None:
        self.ladder = ladder
        self.input = input
        self.source = source
        self.transcoder: Transcoder | None = None

    def begin(self, tracks: Sequence[LiveTrack]) -> None:
        """Start the transcoder if the input has H.264 video and the ladder rungs."""
        video = next((t for t in tracks if t.codec == "h264"), None)
        if video is None or not self.ladder.rungs:
            return
        audio = [t for t in tracks if t.kind == "audio"]
        t = Transcoder(
            self.ladder, self.input, video, audio, self.source, asyncio.get_running_loop()
        )
        self.transcoder = t
        self.ladder.transcoders.add(t)
        t.thread.start()

    def frame(self, frame: LiveFrame) -> None:
        """Hand the frame to the transcoder (never blocks)."""
        if self.transcoder is not None:
            self.transcoder.offer(frame)

    def end(self, reason: str) -> None:
        """The rungs end with the publication."""
        if self.transcoder is not None:
            self.transcoder.stop(reason or "ended")


class LiveLadder:
    """The ABR ladder consumer of live publications, with the node's one CPU budget."""

    def __init__(self, rt: Runtime, hls: LiveHls) -> None:
        cfg = rt.settings.live
        self.hls = hls
        self.rungs = tuple(LiveRung(r.height, r.bitrate_kbps) for r in cfg.ladder)
        self.budget = CpuBudget(cfg.ladder_cpu_percent / 100, cfg.ladder_window_s)
        self.lock = threading.Lock()
        self.doomed: set[tuple[str, str]] = set()
        self.transcoders: set[Transcoder] = set()
        self.metrics = LadderMetrics(rt)
        hls.more_routes.append(partial(install, hls=hls, ladder=self))

    def publication(self, input: str) -> LiveSink:
        """A sink for a new publication of ``input`` (its source stream is the LL-HLS one)."""
        self.hls.renditions[input] = {}
        return LadderSink(self, input, self.hls.streams.get(input))

    def decide(self, now: float) -> None:
        """At the end of a budget window, doom the most expensive rung if it was over budget
        (any transcode thread calls this; the rung's own thread drops it)."""
        with self.lock:
            key = self.budget.check(now)
            ratio = self.budget.last_ratio
            if key is not None:
                self.doomed.add(key)
                self.budget.forget(*key)
        self.metrics.cpu.set(ratio)  # prometheus_client metrics are thread-safe
        if key is not None:
            log.warning(
                "live ladder rung dropped: over the CPU budget",
                extra={
                    "input": key[0],
                    "rung": key[1],
                    "cpu_cores": round(ratio, 3),
                    "budget_cores": self.budget.cores,
                },
            )

    def dropped(self, t: Transcoder, stream: RungStream) -> None:
        """On the loop: a rung dropped over the budget goes."""
        self.metrics.dropped.inc()
        self.remove(t, stream, "dropped: over the ladder's CPU budget")

    def remove(self, t: Transcoder, stream: RungStream, reason: str) -> None:
        """On the loop: a rung's routes 404 (players switch away), the master playlist stops
        listing it, and its stream ends."""
        rungs = self.hls.renditions.get(t.input, {})
        if rungs.get(stream.rung.name) is stream:
            del rungs[stream.rung.name]
            self.metrics.rungs.labels(input=t.input).set(len(rungs))
        stream.end(reason)

    def gone(self, t: Transcoder) -> None:
        """On the loop: a transcoder's thread ended."""
        self.transcoders.discard(t)
        if not t.streams or all(s.ended_at is not None for s in t.streams.values()):
            self.metrics.rungs.labels(input=t.input).set(0)

    async def close(self) -> None:
        """Stop every transcoder thread (daemon shutdown)."""
        threads = []
        for t in list(self.transcoders):
            t.queue.put(_STOP)
            threads.append(t.thread)
        for th in threads:
            await asyncio.to_thread(th.join)


# -- the master playlist -----------------------------------------------------------------


def _size(track: LiveTrack) -> tuple[int, int]:
    if track.width and track.height:
        return track.width, track.height
    try:
        sps, _ = avc.avcc_parameter_sets(track.config)
        return avc.sps_dimensions(sps[0])
    except (ValueError, IndexError):
        return 0, 0


def variants(hls: LiveHls, input: str, stream: Stream, query: str) -> list[Variant]:
    """The source rendition and the ladder's rungs on air, as the master playlist lists them."""
    out = []
    for name, s in [("", stream), *hls.renditions.get(input, {}).items()]:
        tl = s.timeline
        if tl is None or s.packager is None:
            continue
        tracks = s.packager.muxer.tracks
        video = next((t for t in tracks if t.kind == "video"), None)
        width, height = _size(video) if video is not None else (0, 0)
        peak = peak_bandwidth(
            (len(s.segments[seg.cid]), seg.duration) for seg in tl.segments if seg.cid in s.segments
        )
        if isinstance(s, RungStream):
            peak = max(peak, s.rung.bitrate_kbps * 1000)
        uri = f"{name}/index.m3u8{query}" if name else f"index.m3u8{query}"
        out.append(Variant(uri, peak, width, height, tuple(track_codec(t) for t in tracks)))
    return out


def install(app: web.Application, routes: LiveRoutes, hls: LiveHls, ladder: LiveLadder) -> None:
    """Add ``GET /live/<input>/master.m3u8`` beside the LL-HLS routes (``routes``, whose viewer
    check and headers it shares) and stop the ladder's threads at shutdown."""

    async def master(request: web.Request) -> web.Response:
        input, token = await routes._check(request)  # the LL-HLS routes' viewer check
        stream = hls.stream(input)
        deadline = asyncio.get_running_loop().time() + BLOCK_S
        # Listed once the source has a segment: its BANDWIDTH is measured, and the source
        # playlist is served from then on.
        while (tl := stream.timeline) is None or not (tl.segments or tl.ended):
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or not await stream.changed(left):
                raise Unavailable("the input has no segment yet", retry_after=1)
        q = f"?token={token}" if token else ""
        body = render_master(variants(hls, input, stream, q)).encode()
        return web.Response(body=body, headers=routes._headers(MIME_PLAYLIST, "no-store"))

    name = r"{input:[a-z0-9][a-z0-9_-]{0,31}}"
    app.router.add_get(f"/live/{name}/master.m3u8", routes.wrap(master))

    async def close(_app: web.Application) -> None:
        await ladder.close()

    app.on_cleanup.insert(0, close)
