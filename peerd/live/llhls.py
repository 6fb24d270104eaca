"""Low-latency HLS out of live inputs: the packager consumer and its routes.

:class:`LiveHls` is a consumer of the live service (``publication(input) -> LiveSink``). Each
publication gets a worker thread (:class:`Packager`, fed through a queue: the sink's methods
never block) that turns the publisher's frames into fMP4 (:mod:`peerd.live.fmp4`; one muxed
rendition carrying every track of the input, H.264 + AAC or Opus passed through, never
re-encoded) cut into parts and segments as :class:`peerd.core.llhls.Cutter` says. What it
produces crosses to the event loop, where :class:`peerd.core.llhls.Timeline` keeps the
playlist. Parts are served from memory (before their segment's id exists); the init segment
and each complete segment (its parts concatenated) are content-addressed blobs written through
the blob store, so LAN and libp2p peers (and anything else serving held blobs) can serve them.
They are the live window's, not the library's: a segment's blob leaves the store one window
after it left the playlist (unless a media item's rows or a pin use it; the recording is the
durable copy), the init segment's when the ended publication is forgotten. Each blob's id is
noted in ``<state_dir>/live/window.blobs`` before it is stored, so the next start
(:meth:`LiveHls.recover`) deletes those a stop or a crash left behind.

Routes (``install``), every one under the viewer authorization of :mod:`peerd.http.access`
(scope ``hls``, media id ``live:<input>``)::

    GET /live/<input>/index.m3u8[?_HLS_msn=M[&_HLS_part=P]][&_HLS_skip=YES]   the playlist
    GET /live/<input>/part/<pub>/<n>.m4s   part n of publication pub (the preload hint waits)
    GET /live/<input>/b/<cid>.m4s       a complete segment by content id
    GET /live/<input>/b/<cid>.mp4       the init segment

A blocking reload (or a request for the hinted next part) waits at most :data:`BLOCK_S` (three
target durations at the default segment target, the spec's advice); then 503 with
``Retry-After: 1``. An input not in ``[live] inputs`` is 404. A configured input with no
publication is 503 + ``Retry-After`` (not 404): it is a passing state (a publisher
reconnecting, a stream about to start), and hls.js retries 5xx playlist loads by its retry
policy while it treats every 4xx as final; ffmpeg gives up either way. After a publication
ends its playlist (with ``EXT-X-ENDLIST``) stays :data:`ENDED_KEEP_S` so players finish.
A node that stops (SIGTERM) ends every publication and keeps serving, at most
:data:`DRAIN_S`, until the viewers seen lately have fetched the ended playlist and then gone
quiet, so they end cleanly instead of on a refused connection.
Playlists are ``no-store``; parts and segments ``immutable``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import Counter

from peerd.catalog.media import is_referenced
from peerd.core import llhls
from peerd.core.ids import Cid, cid_of
from peerd.core.live import LiveFrame, LiveSink, LiveTrack
from peerd.core.playlist import MIME_PLAYLIST
from peerd.errors import BadRequest, Forbidden, NotFound, PeerdError, Unavailable
from peerd.http.access import DENIED_BODY, ViewerAuth, viewer_auth
from peerd.http.clientip import client_ip
from peerd.http.playback import PlaybackAnalytics
from peerd.live import fmp4
from peerd.live.service import track_codec
from peerd.runtime import Runtime

log = logging.getLogger("peerd.live.llhls")

SCOPE = "hls"
BLOCK_S = 6.0  # longest hold of a blocking playlist or part request
ENDED_KEEP_S = 60.0  # an ended publication's playlist (ENDLIST) stays this long
DRAIN_S = 6.0  # longest a stopping node waits for viewers to see EXT-X-ENDLIST
VIEWER_WINDOW_S = 10.0  # a viewer counts while it fetched a playlist this recently
MAX_LAG_S = Fraction(1)  # a track this far behind the lead track no longer holds parts back
RETRY_AFTER_S = 2
JOURNAL = "window.blobs"  # under <state_dir>/live: ids of live blobs stored, one a line
JOURNAL_MAX = 4096  # lines; then it is rewritten with the blobs still held
AAC_FRAME = 1024  # samples per AAC-LC frame
_CT_SEGMENT = "video/iso.segment"


def media_id(input: str) -> str:
    """The media id viewer tokens of a live input are minted for."""
    return f"live:{input}"


# -- the worker thread's muxer (no event loop) -----------------------------------------------


@dataclass(frozen=True)
class InitReady:
    """The init segment (its blob id and bytes), once the tracks are known."""

    cid: Cid
    data: bytes


@dataclass(frozen=True)
class PartReady:
    """One part (a ``moof`` + ``mdat``)."""

    start: Fraction
    duration: Fraction
    independent: bool
    data: bytes


@dataclass(frozen=True)
class SegmentReady:
    """The parts since the last segment make a complete segment."""

    cid: Cid
    data: bytes


@dataclass(frozen=True)
class Ended:
    """The publication is over: nothing follows."""

    reason: str


Event = InitReady | PartReady | SegmentReady | Ended


@dataclass
class _Open:
    """A sample whose duration is known once its track's next sample arrives."""

    ticks: int
    cts: int
    keyframe: bool
    data: bytes
    duration: int = 0


class Muxer:
    """Frames in, :data:`Event` out: parts, segments, the init segment (synchronous).

    Media time zero is the lead track's first keyframe (the first video keyframe; with no video,
    the first audio frame); earlier frames are dropped. A part ends where the cutter says on the
    lead track, once every other track has reached that time (or lags more than
    :data:`MAX_LAG_S`), so each part holds every track's samples before the cut.
    """

    def __init__(self, tracks: Sequence[LiveTrack], part_s: float, segment_s: float) -> None:
        self.tracks = list(tracks)
        videos = [t for t in self.tracks if t.kind == "video"]
        self.lead = (videos or self.tracks)[0].index
        self.pos = {t.index: i for i, t in enumerate(self.tracks)}
        self.scale = [fmp4.media_timescale(t) for t in self.tracks]
        self.cutter = llhls.Cutter(part_s, segment_s, video=bool(videos))
        self.origin: Fraction | None = None
        self.open: list[list[_Open]] = [[] for _ in self.tracks]
        self.last: list[int | None] = [None for _ in self.tracks]  # each track's newest ticks
        self.cuts: list[tuple[llhls.Cut, bool]] = []  # cut, whether the part it ends is independent
        self.part_start = Fraction(0)
        self.parts = 0
        self.segment: list[bytes] = []
        self.init = fmp4.init_segment(self.tracks)

    def _time(self, i: int, ticks: int) -> Fraction:
        return Fraction(ticks, self.scale[i])

    def frame(self, f: LiveFrame) -> list[Event]:
        """Take one frame; what it completed."""
        i = self.pos.get(f.track)
        if i is None:
            return []
        track = self.tracks[i]
        at = Fraction(f.dts, track.timescale)
        if self.origin is None:
            if f.track != self.lead or (track.kind == "video" and not f.keyframe):
                return []
            self.origin = at
        if at < self.origin:
            return []
        scale = self.scale[i]
        ticks = round((at - self.origin) * scale)
        last = self.last[i]
        if (
            track.codec == "aac"
            and scale == track.sample_rate
            and last is not None
            and abs(ticks - last - AAC_FRAME) < AAC_FRAME // 2
        ):
            # An AAC frame is 1024 samples: a publisher's millisecond clock (RTMP) would make
            # them 1008 or 1056 and leave gaps and overlaps in the audio.
            ticks = last + AAC_FRAME
        cts = round(Fraction(f.pts - f.dts, track.timescale) * scale)
        pending = self.open[i]
        if pending:
            if ticks <= pending[-1].ticks:
                return []  # not in decode order: dropped rather than corrupting the timeline
            pending[-1].duration = ticks - pending[-1].ticks
        if f.track == self.lead:
            was = self.cutter.independent
            cut = self.cutter.place(self._time(i, ticks), f.keyframe)
            if cut is not None:
                self.cuts.append((cut, was))
        pending.append(_Open(ticks, cts, f.keyframe, f.data))
        self.last[i] = ticks
        return self._flush(final=False)

    def end(self, reason: str) -> list[Event]:
        """The publisher stopped: what is pending becomes the last part and segment."""
        out = self._flush(final=True)
        out.append(Ended(reason))
        return out

    def _ready(self, at: Fraction) -> bool:
        lead = self.open[self.pos[self.lead]]
        lead_t = self._time(self.pos[self.lead], lead[-1].ticks) if lead else at
        for i, pending in enumerate(self.open):
            if self.tracks[i].index == self.lead:
                continue
            if pending and self._time(i, pending[-1].ticks) >= at:
                continue
            if lead_t - at > MAX_LAG_S:
                continue
            return False
        return True

    def _flush(self, *, final: bool) -> list[Event]:
        out: list[Event] = []
        while self.cuts and (final or self._ready(self.cuts[0][0].at)):
            cut, independent = self.cuts.pop(0)
            out += self._part(cut.at, independent)
            if cut.segment:
                out += self._segment()
        if final and any(self.open):
            li = self.pos[self.lead]
            lead = self.open[li]
            if lead:
                end = self._time(li, lead[-1].ticks + self._last_duration(li))
                out += self._part(end, self.cutter.independent, everything=True)
        if final and self.segment:
            out += self._segment()
        return out

    def _last_duration(self, i: int) -> int:
        pending = self.open[i]
        if len(pending) >= 2:
            return pending[-2].duration
        if self.tracks[i].codec == "aac":
            return AAC_FRAME
        if self.tracks[i].codec == "opus":
            return 960
        return max(1, self.scale[i] // 30)

    def _part(self, at: Fraction, independent: bool, everything: bool = False) -> list[Event]:
        runs: list[tuple[int, list[fmp4.Sample]]] = []
        for i, pending in enumerate(self.open):
            n = len(pending) if everything else 0
            if not everything:
                while n < len(pending) and self._time(i, pending[n].ticks) < at:
                    n += 1
            taken, self.open[i] = pending[:n], pending[n:]
            if taken and taken[-1].duration == 0:  # no successor yet (end, or a lagging track)
                taken[-1].duration = (
                    self._last_duration(i) if len(taken) < 2 else taken[-2].duration
                )
            runs.append(
                (
                    i + 1,
                    [fmp4.Sample(s.ticks, s.duration, s.cts, s.keyframe, s.data) for s in taken],
                )
            )
        if not any(samples for _, samples in runs):
            return []
        self.parts += 1
        data = fmp4.fragment(self.parts, runs)
        part = PartReady(self.part_start, at - self.part_start, independent, data)
        self.part_start = at
        self.segment.append(data)
        return [part]

    def _segment(self) -> list[Event]:
        if not self.segment:
            return []
        data = b"".join(self.segment)
        self.segment = []
        return [SegmentReady(cid_of(data), data)]


_STOP = object()


class Packager:
    """One publication's worker thread: frames from a queue through a :class:`Muxer`, events
    handed to ``deliver`` on the event loop."""

    def __init__(
        self,
        name: str,
        tracks: Sequence[LiveTrack],
        part_s: float,
        segment_s: float,
        deliver: Callable[[Event], None],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.muxer = Muxer(tracks, part_s, segment_s)
        self.deliver = deliver
        self.loop = loop
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"llhls-{name}", daemon=True)

    def start(self) -> None:
        """Start the thread; the init segment goes out first."""
        init = self.muxer.init
        self._send([InitReady(cid_of(init), init)])
        self.thread.start()

    def _send(self, events: list[Event]) -> None:
        for e in events:
            try:
                self.loop.call_soon_threadsafe(self.deliver, e)
            except RuntimeError:  # the loop is closed: nobody to tell
                return

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            try:
                if item is _STOP:
                    return
                if isinstance(item, str):
                    self._send(self.muxer.end(item))
                    return
                self._send(self.muxer.frame(item))
            except Exception as exc:  # a bug here must end the publication, not hang viewers
                log.exception("live packager failed", extra={"error": repr(exc)})
                self._send([Ended(f"packager failed: {exc!r}")])
                return


# -- the event loop's side -------------------------------------------------------------------


class LiveHlsMetrics:
    """What operators count: parts and segments made, blocking reloads by outcome."""

    def __init__(self, rt: Runtime) -> None:
        reg = rt.metrics.registry
        self.parts = Counter("peerd_live_hls_parts", "LL-HLS parts produced", registry=reg)
        self.segments = Counter(
            "peerd_live_hls_segments", "LL-HLS segments produced (blobs stored)", registry=reg
        )
        self.blocking = Counter(
            "peerd_live_hls_blocking_reloads",
            "Blocking playlist and part requests: ready at once, answered after a wait, "
            "timed out (503) or bad (400)",
            ["result"],
            registry=reg,
        )


class Changes:
    """Wakes every viewer waiting for the next change of a live stream (one future, renewed
    after each change; waiters shield it, so a viewer that gives up cancels nobody else)."""

    def __init__(self) -> None:
        self._next: asyncio.Future[None] | None = None

    def notify(self) -> None:
        """Something changed: wake every waiter."""
        if self._next is not None and not self._next.done():
            self._next.set_result(None)
        self._next = None

    async def wait(self, within_s: float) -> bool:
        """Wait for the next change (False after ``within_s`` seconds)."""
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(within_s):
                await asyncio.shield(self._next)
        except TimeoutError:
            return False
        return True


class Stream(LiveSink):
    """One publication of an input, as its viewers see it (the sink the service feeds)."""

    def __init__(self, hls: LiveHls, input: str) -> None:
        self.hls = hls
        self.input = input
        self.codecs = ""  # RFC 6381, video first (playback analytics' codec dimension)
        # Part numbers restart with each publication: this id in their URLs keeps an immutable
        # cached part of an earlier publication from standing in for a new one.
        self.id = secrets.token_hex(4)
        self.timeline: llhls.Timeline | None = None
        self.init: tuple[Cid, bytes] | None = None
        self.parts: dict[int, bytes] = {}
        self.segments: dict[str, bytes] = {}
        self.ended_at: float | None = None
        self.edge_at: float | None = None  # wall time the newest part was published
        self.packager: Packager | None = None
        self._changes = Changes()
        self._writes: set[asyncio.Task[None]] = set()
        self._retired: list[tuple[float, Cid]] = []  # (monotonic due time, blob)

    # LiveSink (on the loop; nothing here blocks)

    def begin(self, tracks: Sequence[LiveTrack]) -> None:
        """Start the publication's packager thread."""
        cfg = self.hls.rt.settings.live
        if not tracks:
            log.warning(
                "live publication without tracks: not packaged", extra={"input": self.input}
            )
            return
        self.codecs = ",".join(
            track_codec(t) for t in sorted(tracks, key=lambda t: t.kind != "video")
        )
        self.timeline = llhls.Timeline(
            part_s=cfg.part_s,
            segment_s=cfg.segment_s,
            window=cfg.window_segments,
            wall_start=self.hls.clock(),
        )
        self.packager = Packager(
            self.input,
            tracks,
            cfg.part_s,
            cfg.segment_s,
            self._apply,
            asyncio.get_running_loop(),
        )
        self.packager.start()
        log.info(
            "live hls started",
            extra={"input": self.input, "codecs": [t.codec for t in tracks]},
        )

    def frame(self, frame: LiveFrame) -> None:
        """Queue one frame for the packager."""
        if self.packager is not None:
            self.packager.queue.put(frame)

    def end(self, reason: str) -> None:
        """Queue the end; the packager flushes the last part and segment."""
        if self.packager is not None:
            self.packager.queue.put(reason or "ended")
        else:
            self._apply(Ended(reason))

    # events from the packager

    def _apply(self, e: Event) -> None:
        tl = self.timeline
        m = self.hls.metrics
        if isinstance(e, InitReady):
            self.init = (e.cid, e.data)
            if tl is not None:
                tl.init = e.cid
            self._store(e.cid, e.data, "init")
        elif isinstance(e, PartReady) and tl is not None:
            if not tl.current and not tl.segments:
                # media time zero is when the first keyframe reached the node (about now)
                tl.wall_start = self.hls.clock() - float(e.duration)
            p = tl.add_part(e.start, e.duration, e.independent)
            self.parts[p.number] = e.data
            self.edge_at = self.hls.clock()
            m.parts.inc()
        elif isinstance(e, SegmentReady) and tl is not None:
            tl.close_segment(e.cid)
            self.segments[e.cid] = e.data
            self._store(e.cid, e.data, "segment")
            m.segments.inc()
            self._forget(tl)
        elif isinstance(e, Ended):
            log.info("live hls ended", extra={"input": self.input, "reason": e.reason})
            if tl is not None and (tl.current or tl.segments):
                # The last part goes out in a live playlist first, EXT-X-ENDLIST one part target
                # later: hls.js 1.7 never loads a final part that first appears in the same
                # update as EXT-X-ENDLIST (it holds that segment as buffered from the parts it
                # already had) and stalls instead of ending.
                loop = asyncio.get_running_loop()
                loop.call_later(float(tl.part_target), self._ended)
            else:
                self._ended()
        self._notify()

    def _ended(self) -> None:
        if self.timeline is not None:
            self.timeline.end()
        self.ended_at = time.monotonic()
        self._notify()
        asyncio.get_running_loop().call_later(self.hls.ended_keep_s, self._release)

    def _release(self) -> None:
        """Past the ended playlist's time: its bytes leave memory and its blobs the store."""
        if self.hls.streams.get(self.input) is self:
            del self.hls.streams[self.input]
        retired = [Cid(c) for c in self.segments]
        if self.init is not None:
            retired.append(self.init[0])
        self.parts.clear()
        self.segments.clear()
        self._retired += [(0.0, c) for c in retired]
        self._spawn(self._delete_due())

    def _forget(self, tl: llhls.Timeline) -> None:
        """Drop bytes of segments (and their parts) that left the window; their blobs leave
        the store one window later (peers relaying the stream may still ask for them)."""
        if not tl.segments:
            return
        oldest = tl.segments[0]
        for n in [n for n in self.parts if n < oldest.parts[0].number]:
            del self.parts[n]
        kept = {s.cid for s in tl.segments}
        due = time.monotonic() + tl.window * float(tl.segment_target)
        for cid in [c for c in self.segments if c not in kept]:
            del self.segments[cid]
            self._retired.append((due, Cid(cid)))
        if self._retired and self._retired[0][0] <= time.monotonic():
            self._spawn(self._delete_due())

    async def _delete_due(self) -> None:
        """Delete retired segment blobs that are due, unless something else uses them (a media
        item's rows, a pin, or another publication's window: the same input packages alike)."""
        now = time.monotonic()
        due = [c for t, c in self._retired if t <= now]
        self._retired = [(t, c) for t, c in self._retired if t > now]
        store = self.hls.rt.store
        for cid in due:
            live = any(
                cid in s.segments or (s.init and s.init[0] == cid)
                for s in self.hls.streams.values()
            )
            row = await store.catalog.get_blob(cid)
            if live or row is None or row.pinned or await is_referenced(store.catalog, cid):
                continue
            await store.delete(cid)

    def _store(self, cid: Cid, data: bytes, kind: str) -> None:
        self._spawn(self._put(cid, data, kind))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, cid: Cid, data: bytes, kind: str) -> None:
        try:
            # Noted first: a crash leaves no blob unnoted.
            await asyncio.to_thread(self.hls.note, cid, self.hls.held_if_full())
            await self.hls.rt.store.put(data, kind=kind, expected=cid)
        except (PeerdError, OSError) as exc:
            # Viewers still get it from memory while it is in the window.
            log.warning("live blob not stored", extra={"cid": cid, "error": str(exc)})

    def _notify(self) -> None:
        self._changes.notify()

    async def changed(self, within_s: float) -> bool:
        """Wait until the packager delivers something (False after ``within_s`` seconds)."""
        return await self._changes.wait(within_s)

    async def flushed(self) -> None:
        """Wait for the blob writes in flight (tests, shutdown)."""
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)


class LiveHls:
    """The LL-HLS consumer of live publications, and what its routes read."""

    def __init__(
        self,
        rt: Runtime,
        *,
        clock: Callable[[], float] = time.time,
        ended_keep_s: float = ENDED_KEEP_S,
    ) -> None:
        self.rt = rt
        self.clock = clock
        self.ended_keep_s = ended_keep_s
        self.inputs = frozenset(i.name for i in rt.settings.live.inputs)
        self.streams: dict[str, Stream] = {}
        # input -> rung name -> its rendition's stream (the ABR ladder, peerd.live.ladder)
        self.renditions: dict[str, dict[str, Stream]] = {}
        self.more_routes: list[Callable[[web.Application, LiveRoutes], None]] = []  # the ladder's
        self.metrics = LiveHlsMetrics(rt)
        self._seen: dict[str, dict[str, float]] = {}  # input -> viewer -> monotonic time
        self.journal = rt.settings.state_dir / "live" / JOURNAL
        self._journal_lock = threading.Lock()
        self._noted = 0
        self._touched: dict[str, float] = {}  # input -> monotonic time of its last request

    def publication(self, input: str) -> LiveSink:
        """A sink for a new publication of ``input`` (it replaces an ended one)."""
        stream = Stream(self, input)
        self.streams[input] = stream
        return stream

    def stream(self, input: str) -> Stream:
        """The publication viewers of ``input`` see: NotFound for an unknown input,
        Unavailable while it has none (or the last one ended long ago)."""
        s = self.streams.get(input)
        if s is None or s.timeline is None:
            if input not in self.inputs and s is None:
                raise NotFound(f"no live input {input!r}")
            raise Unavailable(f"live input {input!r} is not live now", retry_after=RETRY_AFTER_S)
        if s.ended_at is not None and time.monotonic() - s.ended_at > self.ended_keep_s:
            raise Unavailable(f"live input {input!r} is not live now", retry_after=RETRY_AFTER_S)
        return s

    def saw(self, input: str, viewer: str) -> None:
        """A viewer fetched the input's playlist now."""
        now = time.monotonic()
        seen = self._seen.setdefault(input, {})
        seen[viewer] = now
        if len(seen) > 4096:
            self._seen[input] = {v: t for v, t in seen.items() if now - t < VIEWER_WINDOW_S}

    def _held(self) -> set[str]:
        """Ids of the blobs the publications still use or will delete."""
        held: set[str] = set()
        for s in list(self.streams.values()):
            held.update(s.segments)
            held.update(c for _, c in s._retired)
            if s.init is not None:
                held.add(s.init[0])
        return held

    def held_if_full(self) -> set[str] | None:
        """The blobs still held once the journal is due for a rewrite (else None)."""
        return self._held() if self._noted >= JOURNAL_MAX else None

    def note(self, cid: Cid, keep: set[str] | None = None) -> None:
        """Note a live blob about to be stored in the journal, first rewriting it with only
        ``keep`` when given (blocking: in a thread)."""
        with self._journal_lock:
            if keep is not None:
                self._rewrite(keep)
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            with self.journal.open("a") as fh:
                fh.write(cid + "\n")
            self._noted += 1

    def _rewrite(self, keep: set[str]) -> None:
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.journal.with_suffix(".tmp")
        tmp.write_text("".join(c + "\n" for c in sorted(keep)))
        tmp.replace(self.journal)
        self._noted = len(keep)

    async def recover(self) -> int:
        """Delete the live blobs an earlier run left in the store (it stopped or died with a
        window in the store); the number deleted. A blob a media item or a pin uses stays."""

        def read() -> list[str]:
            try:
                return self.journal.read_text().split()
            except FileNotFoundError:
                return []

        noted = await asyncio.to_thread(read)
        store = self.rt.store
        deleted = 0
        for cid in dict.fromkeys(noted):
            if cid in self._held():
                continue
            row = await store.catalog.get_blob(Cid(cid))
            if row is None or row.pinned or await is_referenced(store.catalog, cid):
                continue
            deleted += bool(await store.delete(Cid(cid)))
        await asyncio.to_thread(self._locked_rewrite, self._held())
        if deleted:
            log.info("live blobs of an earlier run deleted", extra={"blobs": deleted})
        return deleted

    def _locked_rewrite(self, keep: set[str]) -> None:
        with self._journal_lock:
            self._rewrite(keep)

    def touched(self, input: str) -> None:
        """A viewer asked for something of the input now (a playlist, part or segment)."""
        self._touched[input] = time.monotonic()

    def _told_end(self, s: Stream) -> bool:
        """Whether the viewers of ``s`` that were playing it (they reload at least once a
        target duration) fetched its ended playlist, and its routes went quiet since."""
        tl = s.timeline
        if tl is None:
            return True
        if s.ended_at is None:
            return False
        now = time.monotonic()
        quiet = now - self._touched.get(s.input, 0.0) >= float(tl.part_target)
        playing = s.ended_at - 2 * tl.target_duration
        return quiet and all(
            t >= s.ended_at for t in self._seen.get(s.input, {}).values() if t > playing
        )

    async def drain(self, within_s: float = DRAIN_S) -> None:
        """The node is stopping and ended its publications: wait (at most ``within_s``) until
        their viewers have seen ``EXT-X-ENDLIST`` and fetched what was left."""
        ending = [s for s in self.streams.values() if s.ended_at is None]
        deadline = time.monotonic() + within_s
        while not all(self._told_end(s) for s in ending):
            if time.monotonic() >= deadline:
                log.info("live hls viewers not all told of the end before the stop")
                return
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        """Stop every packager thread (daemon shutdown; a publication still live just ends)."""
        threads = []
        rungs = [r for rs in self.renditions.values() for r in rs.values()]
        for s in [*self.streams.values(), *rungs]:
            if s.packager is not None and s.packager.thread.is_alive():
                s.packager.queue.put(_STOP)
                threads.append(s.packager.thread)
        for t in threads:
            await asyncio.to_thread(t.join)
        for s in self.streams.values():
            await s.flushed()

    def latency(self, input: str) -> float | None:
        """The node's part of an LL-HLS viewer's glass-to-glass latency now, in seconds: the age
        of the live edge (since the newest part was published; the frame that closed it reached
        the node then) plus the ``PART-HOLD-BACK`` a player keeps behind the edge. None while
        the input has no playlist a viewer can play (not live, not one segment yet, ended).
        The publisher's encoding and uplink and the viewer's network and decoding come on top.
        """
        s = self.streams.get(input)
        tl = s.timeline if s is not None else None
        if s is None or tl is None or tl.ended or s.edge_at is None or not tl.segments:
            return None
        return max(0.0, self.clock() - s.edge_at) + 3 * float(tl.part_target)

    def viewers(self, input: str) -> int:
        """Distinct viewers (token and address) that fetched the playlist in the last ~10 s."""
        now = time.monotonic()
        return sum(1 for t in self._seen.get(input, {}).values() if now - t < VIEWER_WINDOW_S)


# -- routes ----------------------------------------------------------------------------------


def _int_arg(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 12:
        raise BadRequest(f"{name} must be a non-negative integer")
    return int(raw)


class LiveRoutes:
    """Handlers of ``/live/<input>/...``."""

    def __init__(
        self,
        rt: Runtime,
        hls: LiveHls,
        auth: ViewerAuth,
        analytics: PlaybackAnalytics | None = None,
    ) -> None:
        self.rt = rt
        self.hls = hls
        self.auth = auth
        self.analytics = analytics  # None: CMCD is not read
        cfg = rt.settings.http
        self.cors_origin = cfg.cors_origin
        self.blob_cache = (
            "private, max-age=31536000, immutable"
            if cfg.auth == "access"
            else "public, max-age=31536000, immutable"
        )

    def _headers(self, content_type: str | None = None, cache: str | None = None) -> dict[str, str]:
        h = {"Access-Control-Allow-Origin": self.cors_origin}
        if self.cors_origin != "*":
            h["Vary"] = "Origin"
        if content_type is not None:
            h["Content-Type"] = content_type
        if cache is not None:
            h["Cache-Control"] = cache
        return h

    def wrap(self, handler: Callable[[web.Request], Any]) -> Callable[[web.Request], Any]:
        """Errors as bare JSON with CORS headers (players read the status)."""

        async def wrapped(request: web.Request) -> web.StreamResponse:
            try:
                resp: web.StreamResponse = await handler(request)
                return resp
            except PeerdError as exc:
                body = DENIED_BODY if isinstance(exc, Forbidden) else exc.to_json()
                headers = self._headers()
                if exc.retry_after_s is not None:
                    headers["Retry-After"] = str(exc.retry_after_s)
                return web.json_response(body, status=exc.status, headers=headers)

        return wrapped

    def _stream(self, request: web.Request, input: str) -> Stream:
        """The input's publication, or the ladder rendition the path names."""
        stream = self.hls.stream(input)
        name = request.match_info.get("rendition")
        if name is None:
            return stream
        rung = self.hls.renditions.get(input, {}).get(name)
        if rung is None:
            raise NotFound(f"no rendition {name!r} of live input {input!r}")
        if rung.timeline is None:
            raise Unavailable("the rendition is starting", retry_after=1)
        return rung

    def _cmcd(
        self, request: web.Request, stream: Stream, token: str | None, *, playlist: bool
    ) -> None:
        """Hand a request's CMCD to playback analytics (media ``live:<input>``), if it has any."""
        analytics = self.analytics
        if analytics is None:
            return
        h = request.headers
        query = request.query.get("CMCD") if "CMCD" in request.query_string else None
        if query is None and not any(k.startswith("CMCD-") for k in h):
            return
        analytics.hls(
            media_id(stream.input),
            request.match_info.get("rendition", "source"),
            stream.codecs,
            playlist=playlist,
            token=token,
            peer=request.remote or "",
            headers=h,
            query=query,
        )

    async def _check(self, request: web.Request) -> tuple[str, str | None]:
        input = request.match_info["input"]
        token = await self.auth.check(request, media_id(input), SCOPE)
        self.hls.touched(input)
        return input, token

    async def playlist(self, request: web.Request) -> web.Response:
        """The playlist; with ``_HLS_msn``/``_HLS_part`` held until that part exists."""
        input, token = await self._check(request)
        msn, part = _int_arg(request, "_HLS_msn"), _int_arg(request, "_HLS_part")
        skip = request.query.get("_HLS_skip", "").upper() in ("YES", "V2")
        stream = self._stream(request, input)
        self.hls.saw(input, f"{token or ''} {client_ip(request, self.auth.trusted)}")
        self._cmcd(request, stream, token, playlist=True)
        m = self.hls.metrics.blocking
        blocking = msn is not None
        waited = False
        deadline = asyncio.get_running_loop().time() + BLOCK_S
        while True:
            tl = stream.timeline
            assert tl is not None
            # Served once a whole segment exists: a client without LL-HLS (ffmpeg, older
            # players) sees nothing to play in a playlist of parts alone and gives up.
            started = bool(tl.segments) or tl.ended
            state = tl.ready(msn, part) if started else llhls.Ready.WAIT
            if state is llhls.Ready.BAD:
                m.labels(result="bad").inc()
                raise BadRequest("_HLS_msn/_HLS_part out of range")
            if state is llhls.Ready.NOW and tl.init is not None:
                break
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or not await stream.changed(left):
                if blocking:
                    m.labels(result="timeout").inc()
                raise Unavailable("the requested part is not available yet", retry_after=1)
            waited = True
            if "rendition" in request.match_info:  # a ladder rung dropped meanwhile: 404 now
                stream = self._stream(request, input)
        if blocking:
            m.labels(result="waited" if waited else "ready").inc()
        q = f"?token={token}" if token else ""
        uris = llhls.Uris(
            init=lambda cid: f"b/{cid}.mp4{q}",
            segment=lambda cid: f"b/{cid}.m4s{q}",
            part=lambda n: f"part/{stream.id}/{n}.m4s{q}",
        )
        body = tl.render(uris, skip=skip).encode()
        return web.Response(body=body, headers=self._headers(MIME_PLAYLIST, "no-store"))

    async def part(self, request: web.Request) -> web.Response:
        """A part by running number; the next few (the preload hint) are waited for."""
        input, token = await self._check(request)
        stream = self._stream(request, input)
        self._cmcd(request, stream, token, playlist=False)
        if request.match_info["pub"] != stream.id:
            raise NotFound("no such part in this publication")
        number = int(request.match_info["n"])
        deadline = asyncio.get_running_loop().time() + BLOCK_S
        waited = False
        while True:
            data = stream.parts.get(number)
            if data is not None:
                break
            tl = stream.timeline
            assert tl is not None
            if tl.ended or number < tl.next_part or number > tl.next_part + 1:
                raise NotFound("no such part")
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0 or not await stream.changed(left):
                self.hls.metrics.blocking.labels(result="timeout").inc()
                raise Unavailable("the part is not available yet", retry_after=1)
            waited = True
        if waited:
            self.hls.metrics.blocking.labels(result="waited").inc()
        self._sent(len(data))
        return web.Response(body=data, headers=self._headers(_CT_SEGMENT, self.blob_cache))

    async def blob(self, request: web.Request) -> web.StreamResponse:
        """The init segment or a complete segment by content id (memory, else the store)."""
        input, token = await self._check(request)
        stream = self._stream(request, input)
        self._cmcd(request, stream, token, playlist=False)
        cid, ext = request.match_info["cid"], request.match_info["ext"]
        ct = "video/mp4" if ext == "mp4" else _CT_SEGMENT
        headers = self._headers(ct, self.blob_cache)
        headers["ETag"] = f'"{cid}"'
        data: bytes | None = None
        if ext == "mp4":
            if stream.init is not None and stream.init[0] == cid:
                data = stream.init[1]
        else:
            data = stream.segments.get(cid)
        if data is not None:
            self._sent(len(data))
            return web.Response(body=data, headers=headers)
        raise NotFound("no such segment in this publication's window")

    def _sent(self, n: int) -> None:
        """Bytes to a viewer count into the uplink meter and the bytes served, as HLS's do."""
        self.rt.uplink.sent(n, time.monotonic())
        self.rt.metrics.bytes_served.labels(source="local").inc(n)

    async def preflight(self, request: web.Request) -> web.Response:
        """CORS preflight."""
        h = self._headers()
        h["Access-Control-Allow-Methods"] = "GET, HEAD, OPTIONS"
        h["Access-Control-Allow-Headers"] = "Range, If-None-Match"
        h["Access-Control-Max-Age"] = "600"
        return web.Response(status=204, headers=h)


LIVE_HLS_KEY = web.AppKey("live_hls", LiveRoutes)

RelayHandler = Callable[[LiveRoutes, web.Request], Coroutine[Any, Any, web.StreamResponse]]


class Relayed(Protocol):
    """Another node's live inputs served here (:mod:`peerd.live.relay`)."""

    def relays(self, input: str) -> bool:
        """Whether ``input`` is served by relaying (not one of this node's inputs)."""

    async def playlist(self, routes: LiveRoutes, request: web.Request) -> web.Response:
        """The relayed playlist."""

    async def part(self, routes: LiveRoutes, request: web.Request) -> web.Response:
        """A relayed part."""

    async def blob(self, routes: LiveRoutes, request: web.Request) -> web.StreamResponse:
        """A relayed segment or init segment."""

    async def close(self) -> None:
        """Stop relaying."""


Spill = Callable[[LiveRoutes, web.Request], Coroutine[Any, Any, web.Response | None]]


def install(
    app: web.Application,
    rt: Runtime,
    hls: LiveHls,
    relay: Relayed | None = None,
    spill: Spill | None = None,
    analytics: PlaybackAnalytics | None = None,
) -> None:
    """Add ``/live/<input>/...`` (playlist, parts, segments, init) for ``hls``'s publications;
    inputs that are not this node's go to ``relay`` (none: 404); ``spill`` may send a segment
    request to the bucket instead (:mod:`peerd.live.overflow`); requests with CMCD go to
    ``analytics``."""
    if not rt.settings.live.enabled:
        return
    routes = app[LIVE_HLS_KEY] = LiveRoutes(rt, hls, viewer_auth(app, rt), analytics)

    async def blob(request: web.Request) -> web.StreamResponse:
        if spill is not None and (redirect := await spill(routes, request)) is not None:
            return redirect
        return await routes.blob(request)

    def w(
        local: Callable[[web.Request], Any], pick: Callable[[Relayed], RelayHandler]
    ) -> Callable[..., Any]:
        if relay is None:
            return routes.wrap(local)
        remote = pick(relay)

        async def either(request: web.Request) -> web.StreamResponse:
            if relay.relays(request.match_info["input"]):
                return await remote(routes, request)
            resp: web.StreamResponse = await local(request)
            return resp

        return routes.wrap(either)

    name = r"{input:[a-z0-9][a-z0-9_-]{0,31}}"
    app.router.add_get(f"/live/{name}/index.m3u8", w(routes.playlist, lambda r: r.playlist))
    app.router.add_get(
        f"/live/{name}/part/{{pub:[0-9a-f]{{8}}}}/{{n:[0-9]{{1,9}}}}.m4s",
        w(routes.part, lambda r: r.part),
    )
    app.router.add_get(
        f"/live/{name}/b/{{cid:b[a-z2-7]{{58}}}}.{{ext:mp4|m4s}}",
        w(blob, lambda r: r.blob),
    )
    # the ABR ladder's renditions (peerd.live.ladder): the same routes under /live/<input>/r<h>/,
    # served by this node only (a relay serves the source rendition)
    rung = f"/live/{name}/{{rendition:r[0-9]{{2,4}}}}"
    app.router.add_get(f"{rung}/index.m3u8", routes.wrap(routes.playlist))
    app.router.add_get(
        f"{rung}/part/{{pub:[0-9a-f]{{8}}}}/{{n:[0-9]{{1,9}}}}.m4s", routes.wrap(routes.part)
    )
    app.router.add_get(f"{rung}/b/{{cid:b[a-z2-7]{{58}}}}.{{ext:mp4|m4s}}", routes.wrap(blob))
    for more in hls.more_routes:
        more(app, routes)
    app.router.add_route("OPTIONS", "/live/{tail:.*}", routes.preflight)

    async def close(_app: web.Application) -> None:
        if relay is not None:
            await relay.close()
        await hls.close()

    app.on_cleanup.append(close)
