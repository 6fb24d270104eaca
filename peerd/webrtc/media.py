"""Media for a WHEP session: stored segments, demuxed off the loop, paced in real time.

Theory of operation
-------------------
A session plays one ready video rendition of a media item (the best one within
``webrtc.max_height``), segment after segment, from the node's blob store (through the delivery
resolver when the daemon has one, so a segment the node lacks is fetched like any other blob).
Its sound is the audio muxed in that rendition; a media item packaged with alternate audio
renditions (several audio tracks: its video renditions carry none) plays its default audio
rendition beside the video, and audio-only media plays that rendition alone. The viewer cannot
pick another track over WHEP.

A :class:`Feeder` task reads each segment in a worker thread (:class:`SegmentDemuxer`, PyAV) and
queues what the tracks send, one reading loop per rendition played (video with its muxed audio,
or video and alternate audio side by side, on the same media timeline):

* video, **passthrough**: the H.264 packets as stored, turned from length-prefixed (MP4) to Annex B
  with in-band SPS/PPS (``h264_mp4toannexb``), timestamps on a 90 kHz clock; aiortc packetizes
  an ``av.Packet`` without decoding it (``RTCRtpSender`` calls the codec's ``pack``);
* video, **transcode**: decoded frames, encoded by aiortc in the negotiated codec (VP8 or H.264);
* audio: AAC decoded and resampled to 48 kHz stereo s16 in 20 ms frames, encoded to Opus by aiortc
  (WebRTC has no AAC).

Both tracks share one :class:`PlayoutClock`: the first ``recv()`` of either track pins media time
to the event loop's clock, and each track then releases an item when its media time comes (video
by decode time, audio by presentation time), so the two stay in sync and the sender never bursts.
The feeder stays at most ``read_ahead_s`` of media ahead of the clock, so memory per session stays
small whatever the length of the media. With ``loop_playback`` the renditions restart at the
end of the video (of the audio for audio-only media) with timestamps that keep increasing;
otherwise each track ends with its rendition.
"""

from __future__ import annotations

import asyncio
import io
import logging
from concurrent.futures import Executor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

import av
import av.container
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from peerd.catalog.media import media_manifest
from peerd.core.ids import Cid
from peerd.core.manifest import Container, Manifest, Rendition, decode
from peerd.core.whep import stream_profile
from peerd.delivery import Resolver
from peerd.errors import MediaError, NotFound
from peerd.media.codecs import avc_codec
from peerd.runtime import Runtime

log = logging.getLogger("peerd.webrtc")

VIDEO_CLOCK = 90_000
AUDIO_RATE = 48_000
AUDIO_FRAME = 960  # 20 ms, what aiortc's Opus encoder packs per RTP packet
VideoMode = Literal["passthrough", "transcode"]


@dataclass(frozen=True)
class Playable:
    """The renditions a session plays, with what the WHEP negotiation needs to know about them.

    ``rendition`` is the video (None for audio-only media), ``audio`` the alternate audio
    rendition played beside it (None when the video carries its own sound, or there is none);
    ``has_audio`` says whether there is any sound to send.
    """

    media_id: str
    container: Container
    rendition: Rendition | None
    profile: str | None
    has_audio: bool
    reorders: bool
    init: bytes | None  # the init segment (a few KiB), read once for every session
    audio: Rendition | None = None
    audio_init: bytes | None = None


def pick_rendition(manifest: Manifest, max_height: int) -> Rendition:
    """The best ready video rendition no taller than ``max_height`` (else the smallest one).

    A rendition packaged without B-frames (a ``bframes = 0`` ladder rung) comes first: its
    packets can be passed through to the viewer as stored, where any other H.264 stream has to
    be transcoded (Chromium's WebRTC decoder shows only the keyframes of a stream with
    B-frames), which costs a core's worth of CPU per few viewers.
    """
    ready = [r for r in manifest.renditions if r.kind == "video" and not r.on_demand]
    if not ready:
        raise MediaError("media has no ready video rendition to play")
    fitting = [r for r in ready if (r.height or 0) <= max_height]
    if fitting:
        no_bframes = [r for r in fitting if r.recipe is not None and r.recipe.bframes == 0]
        return max(no_bframes or fitting, key=lambda r: (r.height or 0, r.bandwidth))
    return min(ready, key=lambda r: (r.height or 0, r.bandwidth))


def pick_audio(manifest: Manifest) -> Rendition | None:
    """The audio rendition to play: the default track (``Alternate.default``), else the first
    ready one; None if the media has no audio rendition of its own."""
    ready = [r for r in manifest.renditions if r.kind == "audio" and not r.on_demand]
    default = [r for r in ready if r.alternate is not None and r.alternate.default]
    return next(iter(default or ready), None)


def _carries_audio(r: Rendition) -> bool:
    return any(c.strip().startswith(("mp4a", "opus", "Opus")) for c in r.codecs.split(","))


async def load_playable(
    rt: Runtime,
    media_id: str,
    max_height: int,
    pool: Executor | None = None,
    resolver: Resolver | None = None,
) -> Playable:
    """Read the media's manifest from the catalog, pick the renditions to play (video, and the
    default audio rendition when the video carries no sound), and probe the video's first
    segment for B-frames and its SPS's profile (see :func:`peerd.core.whep.choose_video`);
    file work runs in ``pool`` (default: the loop's executor), blobs the node lacks come through
    ``resolver``.
    """
    loop = asyncio.get_running_loop()
    raw = await media_manifest(rt.catalog, media_id)
    if raw is None:
        raise NotFound(f"no media {media_id}")
    manifest = decode(raw)

    async def read_init(r: Rendition) -> bytes | None:
        if r.init is None:
            return None
        return await loop.run_in_executor(pool, (await blob_path(rt, resolver, r.init)).read_bytes)

    r = None
    init = sps = None
    reorders = False
    if any(v.kind == "video" for v in manifest.renditions):
        r = pick_rendition(manifest, max_height)
        first = r.segments[0].cid
        assert first is not None  # a ready rendition pins every segment
        init = await read_init(r)
        seg = await blob_path(rt, resolver, first)
        reorders = await loop.run_in_executor(pool, probe_reorders, manifest.container, init, seg)
        sps = await loop.run_in_executor(pool, probe_profile, manifest.container, init, seg)
    audio = None if r is not None and _carries_audio(r) else pick_audio(manifest)
    if r is None and audio is None:
        raise MediaError("media has no ready video or audio rendition to play")
    return Playable(
        media_id=media_id,
        container=manifest.container,
        rendition=r,
        profile=sps or (stream_profile(r.codecs) if r is not None else None),
        has_audio=audio is not None or (r is not None and _carries_audio(r)),
        reorders=reorders,
        init=init,
        audio=audio,
        audio_init=await read_init(audio) if audio is not None else None,
    )


def _open_segment(container: Container, init: bytes | None, data: bytes) -> Any:
    if container == "fmp4":
        if init is None:
            raise MediaError("fMP4 rendition without an init segment")
        return av.open(io.BytesIO(init + data), format="mp4")
    return av.open(io.BytesIO(data), format="mpegts")


def probe_reorders(container: Container, init: bytes | None, segment: Path) -> bool:
    """True if the segment's video is stored out of presentation order (it has B-frames)."""
    try:
        with _open_segment(container, init, segment.read_bytes()) as c:
            if not c.streams.video:
                return False
            last = None
            for pkt in c.demux(c.streams.video[0]):
                if pkt.pts is None:
                    continue
                if last is not None and pkt.pts < last:
                    return True
                last = pkt.pts
    except av.FFmpegError as exc:
        raise MediaError(f"cannot read segment {segment.name}: {exc}") from exc
    return False


def probe_profile(container: Container, init: bytes | None, segment: Path) -> str | None:
    """The H.264 ``profile-level-id`` of the segment's video as its SPS states it (from the avcC
    of the init segment, or the in-band SPS of MPEG-TS); None if it is not H.264."""
    try:
        with _open_segment(container, init, segment.read_bytes()) as c:
            if not c.streams.video or c.streams.video[0].codec_context.name != "h264":
                return None
            extradata = c.streams.video[0].codec_context.extradata
    except av.FFmpegError as exc:
        raise MediaError(f"cannot read segment {segment.name}: {exc}") from exc
    return stream_profile(avc_codec(extradata)) if extradata else None


async def blob_path(rt: Runtime, resolver: Resolver | None, cid: str) -> Path:
    """A local path for a blob: through the resolver when there is one, else the store alone."""
    if resolver is not None:
        return await resolver.ensure_local(Cid(cid))
    return await rt.store.open_path(Cid(cid))


@dataclass
class Item:
    """One thing for a track to send at media time ``due`` (seconds)."""

    due: float
    payload: Any  # av.Packet | av.VideoFrame | av.AudioFrame


class SegmentDemuxer:
    """Turns segments into track items (blocking; one session's segments, one at a time).

    Keeps the audio resampler and sample counter across segments so Opus gets an unbroken
    stream of 20 ms frames.
    """

    def __init__(self, container: Container, video: VideoMode | None, audio: bool) -> None:
        self.container = container
        self.video = video
        self.audio = audio
        self._resampler: av.AudioResampler | None = None
        self._samples = 0

    def demux(
        self, init: bytes | None, segment: Path, offset_s: float
    ) -> tuple[list[Item], list[Item]]:
        """Video and audio items of one segment, timestamps shifted by ``offset_s``."""
        data = segment.read_bytes()
        try:
            with _open_segment(self.container, init, data) as c:
                return self._demux(c, offset_s)
        except av.FFmpegError as exc:
            raise MediaError(f"cannot demux segment {segment.name}: {exc}") from exc

    def _demux(
        self, c: av.container.InputContainer, offset_s: float
    ) -> tuple[list[Item], list[Item]]:
        vs = c.streams.video[0] if c.streams.video and self.video else None
        as_ = c.streams.audio[0] if c.streams.audio and self.audio else None
        streams = [s for s in (vs, as_) if s is not None]
        video: list[Item] = []
        audio: list[Item] = []
        if not streams:
            return video, audio
        bsf = None
        if vs is not None and self.video == "passthrough":
            if vs.codec_context.name != "h264":
                raise MediaError(f"cannot pass {vs.codec_context.name} through as H.264")
            # MP4 stores length-prefixed NAL units with SPS/PPS in the init; RTP wants Annex B
            # with parameter sets before each IDR. MPEG-TS is Annex B already.
            if self.container == "fmp4":
                bsf = av.bitstream.BitStreamFilterContext("h264_mp4toannexb", vs)
        audio_start: float | None = None
        seg_samples = 0
        for pkt in c.demux(*streams):
            if pkt.size == 0 and pkt.pts is None:
                continue  # demuxer flush packet
            if pkt.stream is vs:
                if self.video == "passthrough":
                    for out in bsf.filter(pkt) if bsf is not None else [pkt]:
                        video.append(self._video_packet(out, offset_s))
                else:
                    for frame in pkt.decode():
                        if isinstance(frame, av.VideoFrame):
                            video.append(self._video_frame(frame, vs.time_base, offset_s))
            elif pkt.stream is as_:
                for aframe in pkt.decode():
                    if not isinstance(aframe, av.AudioFrame):
                        continue
                    if audio_start is None:
                        tb = aframe.time_base or as_.time_base
                        pts = aframe.pts
                        audio_start = offset_s + (float(pts * tb) if pts is not None and tb else 0)
                    for chunk in self._resample(aframe):
                        audio.append(Item(audio_start + seg_samples / AUDIO_RATE, chunk))
                        seg_samples += chunk.samples
        if vs is not None and self.video == "transcode":
            for frame in vs.codec_context.decode(None):
                if isinstance(frame, av.VideoFrame):
                    video.append(self._video_frame(frame, vs.time_base, offset_s))
        return video, audio

    @staticmethod
    def _video_packet(pkt: av.Packet[Any], offset_s: float) -> Item:
        tb = pkt.time_base
        pts = pkt.pts if pkt.pts is not None else pkt.dts
        dts = pkt.dts if pkt.dts is not None else pts
        if pts is None or dts is None or tb is None:
            raise MediaError("video packet without timestamps")
        # aiortc reads the RTP timestamp from pts (presentation time, as RFC 6184 wants); the
        # packet is sent in decode order, when its decode time comes.
        pkt.pts = round((pts * tb + Fraction(offset_s)) * VIDEO_CLOCK)
        pkt.dts = round((dts * tb + Fraction(offset_s)) * VIDEO_CLOCK)
        pkt.time_base = Fraction(1, VIDEO_CLOCK)
        return Item(float(dts * tb) + offset_s, pkt)

    @staticmethod
    def _video_frame(frame: av.VideoFrame, tb: Fraction | None, offset_s: float) -> Item:
        tb = frame.time_base or tb
        if frame.pts is None or tb is None:
            raise MediaError("video frame without a timestamp")
        t = float(frame.pts * tb) + offset_s
        frame.pts = round(t * VIDEO_CLOCK)
        frame.time_base = Fraction(1, VIDEO_CLOCK)
        return Item(t, frame)

    def _resample(self, frame: av.AudioFrame) -> list[av.AudioFrame]:
        if self._resampler is None:
            self._resampler = av.AudioResampler(
                format="s16", layout="stereo", rate=AUDIO_RATE, frame_size=AUDIO_FRAME
            )
        frame.pts = None  # the resampler's output is timed by the running sample count
        out = self._resampler.resample(frame)
        for f in out:
            f.pts = self._samples
            f.time_base = Fraction(1, AUDIO_RATE)
            self._samples += f.samples
        return out


class PlayoutClock:
    """Maps media time to event-loop time, pinned when the first track asks for media."""

    def __init__(self) -> None:
        self._origin: float | None = None
        self.started = asyncio.Event()

    def deadline(self, due: float) -> float:
        """Loop time at which media time ``due`` plays (pins the clock on first use)."""
        now = asyncio.get_running_loop().time()
        if self._origin is None:
            self._origin = now - due
            self.started.set()
        return self._origin + due

    def media_now(self) -> float | None:
        """Current media time, or None before playout starts."""
        if self._origin is None:
            return None
        return asyncio.get_running_loop().time() - self._origin


class PacedTrack(MediaStreamTrack):
    """A track that hands aiortc queued items when their media time comes."""

    # The feeder keeps queues about read_ahead_s long; this bound only matters for a track that
    # is never pulled (a viewer that declined it), whose queue would otherwise grow forever.
    MAX_QUEUED = 1500

    def __init__(self, kind: str, clock: PlayoutClock) -> None:
        super().__init__()
        self.kind = kind
        self._clock = clock
        self.queue: asyncio.Queue[Item | None] = asyncio.Queue(self.MAX_QUEUED)
        self.sent = 0
        self.dropped = 0

    def offer(self, item: Item) -> None:
        """Queue an item, or drop it when nobody pulls this track."""
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.dropped += 1

    def end(self) -> None:
        """Queue the end of the track (making room for it if needed)."""
        while self.queue.full():
            self.queue.get_nowait()
        self.queue.put_nowait(None)

    async def recv(self) -> Any:
        """The next packet or frame, at its time; ``MediaStreamError`` at the end."""
        if self.readyState != "live":
            raise MediaStreamError
        item = await self.queue.get()
        if item is None:
            self.stop()
            raise MediaStreamError
        loop = asyncio.get_running_loop()
        delay = self._clock.deadline(item.due) - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        self.sent += 1
        return item.payload


@dataclass
class _Lane:
    """One rendition read by the feeder, and the tracks its segments feed."""

    rendition: Rendition
    init: bytes | None
    demuxer: SegmentDemuxer
    video: PacedTrack | None
    audio: PacedTrack | None


class Feeder:
    """Reads segments ahead of the clock and fills the tracks' queues."""

    def __init__(
        self,
        rt: Runtime,
        playable: Playable,
        *,
        video: PacedTrack | None,
        video_mode: VideoMode,
        audio: PacedTrack | None,
        clock: PlayoutClock,
        read_ahead_s: float,
        loop_playback: bool,
        pool: Executor | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        self.rt = rt
        self.pool = pool
        self.resolver = resolver
        self.playable = playable
        self.video = video
        self.audio = audio
        self.clock = clock
        self.read_ahead_s = read_ahead_s
        self.loop_playback = loop_playback
        self.lanes: list[_Lane] = []
        r, alt = playable.rendition, playable.audio
        # Sound muxed in the video rendition comes with it; an alternate one is read beside it.
        muxed = audio if alt is None and playable.has_audio else None
        if r is not None and (video is not None or muxed is not None):
            mode = video_mode if video is not None else None
            demuxer = SegmentDemuxer(playable.container, mode, muxed is not None)
            self.lanes.append(_Lane(r, playable.init, demuxer, video, muxed))
        if alt is not None and audio is not None:
            demuxer = SegmentDemuxer(playable.container, None, True)
            self.lanes.append(_Lane(alt, playable.audio_init, demuxer, None, audio))
        # Every lane restarts after the same span (the video's), so sound and picture stay in
        # step however many times the media loops.
        main = r or alt
        assert main is not None  # load_playable refuses media with nothing to play
        self.period = main.duration_seconds
        self.segments_read = 0

    async def run(self) -> None:
        """Feed until the media ends (or forever when looping); ends the tracks at the end."""
        tasks = [asyncio.create_task(self._play(lane)) for lane in self.lanes]
        try:
            await asyncio.gather(*tasks)  # the first failure is the session's
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _play(self, lane: _Lane) -> None:
        r = lane.rendition
        loop = asyncio.get_running_loop()
        offset = 0.0
        try:
            while True:
                t = r.start / r.timescale
                for seg in r.segments:
                    assert seg.cid is not None  # a ready rendition pins every segment
                    await self._wait_room(r, offset + t)
                    path = await blob_path(self.rt, self.resolver, seg.cid)
                    vitems, aitems = await loop.run_in_executor(
                        self.pool, lane.demuxer.demux, lane.init, path, offset
                    )
                    self.segments_read += 1
                    if lane.video is not None:
                        for it in vitems:
                            lane.video.offer(it)
                    if lane.audio is not None:
                        for it in aitems:
                            lane.audio.offer(it)
                    t += seg.duration / r.timescale
                if not self.loop_playback:
                    break
                offset += self.period
        finally:
            for track in (lane.video, lane.audio):
                if track is not None:
                    track.end()

    async def _wait_room(self, r: Rendition, next_start: float) -> None:
        """Wait until the segment starting at media time ``next_start`` is due within reach."""
        while True:
            now = self.clock.media_now()
            if now is None:
                # Before playout: read ahead from the start of the rendition only.
                first = r.start / r.timescale
                if next_start - first < self.read_ahead_s:
                    return
                await self.clock.started.wait()
                continue
            ahead = next_start - now
            if ahead < self.read_ahead_s:
                return
            await asyncio.sleep(ahead - self.read_ahead_s)
