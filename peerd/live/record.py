"""Recording: each publication of an input with ``record = true`` becomes a media item.

Theory of operation
-------------------
The :class:`Recorder` is a :class:`~peerd.live.service.LiveConsumer`. Its sink appends the
publication to a recording file under ``<state_dir>/live/`` in a record format of its own:

``PEERDREC1\\n`` then records, each ``length (u32 BE) | crc32 (u32 BE) | body``, the body's first
byte its type: ``T`` (JSON: input, start time, tracks with their codec configuration in hex),
``F`` (a frame: track u8, keyframe u8, dts i64, pts i64, then the access unit) or ``E`` (JSON:
the end reason). A record whose length runs past the end of the file or whose CRC does not match
is a torn tail: it and everything after it are cut.

Frames are buffered on the event loop and handed to a writer task that writes and fsyncs them
(in a thread) at every video keyframe, so a daemon that dies mid-stream loses at most the
segment in flight (the GOP since the last keyframe); audio-only publications are cut every
``[live] segment_s`` of media time.

When the publication ends, the recording is turned into an MP4 off the event loop (PyAV, a
remux with no re-encoding, ``+bitexact`` and no metadata; timestamps are the frames' own,
rebased so the earliest is 0, and video before its first keyframe is dropped) and ingested
through the node's :class:`~peerd.media.ingest.Ingestor` like any file, so it is a normal media
item: deterministic id (the same frames give the same id), replicated and tiered like the rest.
The recording file and the MP4 are then removed and the media id kept as the input's last
recording (``last.json``), logged and announced (the coordinator's early heartbeat).

On start (:meth:`Recorder.recover`), recording files a crash left behind are cut at their torn
tail and ingested the same way: the live item ends cleanly. A daemon that stops (SIGTERM) seals
its recordings and leaves their ingest to the next start. A recording that cannot be media
(``MediaError``) is renamed ``*.rec.failed`` and left for the operator.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import struct
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

from peerd.config import LiveInputSettings
from peerd.core.live import LiveFrame, LiveSink, LiveTrack
from peerd.errors import MediaError, PeerdError
from peerd.media.ingest import Ingestor

log = logging.getLogger("peerd.live.record")

MAGIC = b"PEERDREC1\n"
SUFFIX = ".rec"
LAST_FILE = "last.json"
MAX_BUFFER = 8 << 20  # a GOP larger than this is written in pieces
_HEAD = struct.Struct(">II")
_FRAME = struct.Struct(">cBBqq")


# -- the record format ---------------------------------------------------------------------------


def record(body: bytes) -> bytes:
    """One record: length, CRC-32 and ``body``."""
    return _HEAD.pack(len(body), zlib.crc32(body)) + body


def header_record(input: str, started: float, tracks: Sequence[LiveTrack]) -> bytes:
    """The ``T`` record: which input, when, and its tracks."""
    doc = {
        "input": input,
        "started": started,
        "tracks": [{**asdict(t), "config": t.config.hex()} for t in tracks],
    }
    return record(b"T" + json.dumps(doc, sort_keys=True).encode())


def frame_record(f: LiveFrame) -> bytes:
    """The ``F`` record of one frame."""
    return record(_FRAME.pack(b"F", f.track, 1 if f.keyframe else 0, f.dts, f.pts) + f.data)


def end_record(reason: str) -> bytes:
    """The ``E`` record: the publication ended (why)."""
    return record(b"E" + json.dumps({"reason": reason}).encode())


def _read_records(fh: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    """(end offset, body) of each whole record; stops at the first torn one."""
    if fh.read(len(MAGIC)) != MAGIC:
        return
    offset = len(MAGIC)
    while True:
        head = fh.read(_HEAD.size)
        if len(head) < _HEAD.size:
            return
        length, crc = _HEAD.unpack(head)
        body = fh.read(length)
        if len(body) < length or zlib.crc32(body) != crc:
            return
        offset += _HEAD.size + length
        yield offset, body


def _track(d: dict[str, Any]) -> LiveTrack:
    return LiveTrack(**{**d, "config": bytes.fromhex(d["config"])})


def _frame(body: bytes) -> LiveFrame:
    _, track, key, dts, pts = _FRAME.unpack_from(body)
    return LiveFrame(track=track, dts=dts, pts=pts, keyframe=bool(key), data=body[_FRAME.size :])


def read_header(path: Path) -> tuple[dict[str, Any] | None, int, bool]:
    """(the ``T`` document or None, the offset where whole records end, an ``E`` record seen)."""
    head: dict[str, Any] | None = None
    end = 0
    ended = False
    with path.open("rb") as fh:
        for offset, body in _read_records(fh):
            end = offset
            if body[:1] == b"T" and head is None:
                head = json.loads(body[1:])
            elif body[:1] == b"E":
                ended = True
    return head, end, ended


def frames_of(path: Path) -> Iterator[LiveFrame]:
    """Every whole frame of a recording, in the order received."""
    with path.open("rb") as fh:
        for _, body in _read_records(fh):
            if body[:1] == b"F":
                yield _frame(body)


# -- the MP4 -------------------------------------------------------------------------------------


def _vint(n: int) -> bytes:
    for size in range(1, 9):
        if n < (1 << (7 * size)) - 1:
            return (n | (1 << (7 * size))).to_bytes(size, "big")
    raise ValueError(n)


def _el(eid: int, data: bytes) -> bytes:
    return eid.to_bytes((eid.bit_length() + 7) // 8, "big") + _vint(len(data)) + data


def _uint(n: int) -> bytes:
    return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")


def opus_head(track: LiveTrack) -> bytes:
    """An OpusHead for a track announced without one (WebRTC sends none)."""
    channels = track.channels or 2
    return b"OpusHead" + struct.pack("<BBHIhB", 1, channels, 0, track.sample_rate or 48000, 0, 0)


def track_header(tracks: Sequence[LiveTrack]) -> bytes:
    """A Matroska file with the tracks and no frame.

    PyAV makes an output stream that copies (rather than encodes) only from a template stream
    of an input; this is the smallest input libavformat turns into exactly these codec
    parameters (``avcC``, AudioSpecificConfig, OpusHead as the codec's extradata).
    """
    ebml = _el(
        0x1A45DFA3,
        _el(0x4286, _uint(1))
        + _el(0x42F7, _uint(1))
        + _el(0x42F2, _uint(4))
        + _el(0x42F3, _uint(8))
        + _el(0x4282, b"matroska")
        + _el(0x4287, _uint(4))
        + _el(0x4285, _uint(2)),
    )
    entries = b""
    for t in tracks:
        body = _el(0xD7, _uint(t.index + 1)) + _el(0x73C5, _uint(t.index + 1))
        if t.kind == "video":
            size = _el(0xB0, _uint(t.width)) + _el(0xBA, _uint(t.height))
            body += _el(0x83, _uint(1)) + _el(0x86, b"V_MPEG4/ISO/AVC") + _el(0x63A2, t.config)
            body += _el(0xE0, size)
        else:
            codec, config = (
                (b"A_AAC", t.config) if t.codec == "aac" else (b"A_OPUS", t.config or opus_head(t))
            )
            audio = _el(0xB5, struct.pack(">d", float(t.sample_rate or 48000)))
            audio += _el(0x9F, _uint(t.channels or 2))
            body += _el(0x83, _uint(2)) + _el(0x86, codec) + _el(0x63A2, config) + _el(0xE1, audio)
        entries += _el(0xAE, body)
    info = _el(0x2AD7B1, _uint(1_000_000)) + _el(0x4D80, b"peerd") + _el(0x5741, b"peerd")
    segment = _el(0x1549A966, info) + _el(0x1654AE6B, entries) + _el(0x1F43B675, _el(0xE7, b"\0"))
    return ebml + _el(0x18538067, segment)


def write_mp4(path: Path, tracks: Sequence[LiveTrack], out: Path) -> int:
    """Remux the recording at ``path`` into the MP4 ``out`` (blocking); the frames written.

    Video frames before their track's first keyframe are dropped (a decoder cannot start
    there); timestamps move back so the earliest kept decode time is 0, in every track's own
    time base, so the same frames always give the same bytes.
    """
    import io

    import av

    def kept() -> Iterator[LiveFrame]:
        started: set[int] = set()
        for f in frames_of(path):
            if f.track >= len(tracks):
                continue
            if tracks[f.track].kind == "video" and f.track not in started:
                if not f.keyframe:
                    continue
                started.add(f.track)
            yield f

    start: Fraction | None = None
    for f in kept():
        at = Fraction(f.dts, tracks[f.track].timescale)
        start = at if start is None else min(start, at)
    if start is None:
        return 0
    shifts = [round(start * tr.timescale) for tr in tracks]
    n = 0
    with av.open(io.BytesIO(track_header(tracks)), "r", format="matroska") as template:
        opts = {"fflags": "+bitexact", "avoid_negative_ts": "disabled"}
        with av.open(str(out), "w", format="mp4", container_options=opts) as mp4:
            streams = []
            for t, s in zip(tracks, template.streams, strict=True):
                o = mp4.add_stream_from_template(s)
                o.time_base = Fraction(1, t.timescale)
                streams.append(o)
            for f in kept():
                p = av.Packet(f.data)
                p.dts = f.dts - shifts[f.track]
                p.pts = f.pts - shifts[f.track]
                p.time_base = Fraction(1, tracks[f.track].timescale)
                p.is_keyframe = f.keyframe
                p.stream = streams[f.track]
                mp4.mux(p)
                n += 1
    return n


# -- the recorder --------------------------------------------------------------------------------


class _Discard:
    """The sink of an input that is not recorded."""

    def begin(self, tracks: Sequence[LiveTrack]) -> None:
        """Nothing to do."""

    def frame(self, frame: LiveFrame) -> None:
        """Nothing to do."""

    def end(self, reason: str) -> None:
        """Nothing to do."""


def _open_for_append(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o640)
    os.write(fd, MAGIC)
    os.fsync(fd)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)  # the file's name survives a power cut too
    finally:
        os.close(dfd)
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
    os.fsync(fd)


class _Recording:
    """The sink of one recorded publication."""

    def __init__(self, recorder: Recorder, input: str, path: Path, started: float) -> None:
        self.recorder = recorder
        self.input = input
        self.path = path
        self.started = started
        self.tracks: tuple[LiveTrack, ...] = ()
        self.video: frozenset[int] = frozenset()
        self.buf = bytearray()
        self.buf_start: tuple[int, int] | None = None  # (track, dts) of the buffer's first frame
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.failed = False
        self.ended = False
        self.writer = asyncio.create_task(self._write(), name=f"record-{input}")

    def begin(self, tracks: Sequence[LiveTrack]) -> None:
        """Write the header record at once (a crash leaves an identifiable file)."""
        self.tracks = tuple(tracks)
        self.video = frozenset(t.index for t in tracks if t.kind == "video")
        self.queue.put_nowait(header_record(self.input, self.started, tracks))

    def frame(self, frame: LiveFrame) -> None:
        """Buffer the frame; hand the buffer to the writer at a cut point."""
        if self.failed:
            return
        if self.buf and self._cut_before(frame):
            self._flush()
        if not self.buf:
            self.buf_start = (frame.track, frame.dts)
        self.buf += frame_record(frame)

    def _cut_before(self, f: LiveFrame) -> bool:
        if len(self.buf) >= MAX_BUFFER:
            return True
        if self.video:
            return f.keyframe and f.track in self.video
        if self.buf_start is None or self.buf_start[0] != f.track or f.track >= len(self.tracks):
            return False
        span = (f.dts - self.buf_start[1]) / self.tracks[f.track].timescale
        return span >= self.recorder.segment_s

    def _flush(self) -> None:
        if self.buf:
            self.queue.put_nowait(bytes(self.buf))
            self.buf.clear()

    def end(self, reason: str) -> None:
        """Write what is buffered and the end record; then the recorder ingests it."""
        if self.ended:
            return
        self.ended = True
        self._flush()
        self.queue.put_nowait(end_record(reason))
        self.queue.put_nowait(None)
        self.recorder._finished(self)

    async def _write(self) -> None:
        fd: int | None = None
        try:
            fd = await asyncio.to_thread(_open_for_append, self.path)
            while (chunk := await self.queue.get()) is not None:
                await asyncio.to_thread(_write_all, fd, chunk)
        except OSError as exc:
            self.failed = True
            log.error(
                "live recording cannot be written; what is on disk is kept",
                extra={"input": self.input, "path": str(self.path), "error": str(exc)},
            )
        finally:
            if fd is not None:
                await asyncio.shield(asyncio.to_thread(os.close, fd))


class Recorder:
    """Records publications and ingests them as media items (see the module doc)."""

    def __init__(
        self,
        directory: Path,
        ingestor: Ingestor,
        inputs: Sequence[LiveInputSettings],
        *,
        segment_s: float = 2.0,
        wall: Callable[[], float] | None = None,
    ) -> None:
        import time

        self.directory = directory
        self.ingestor = ingestor
        self.recorded = {i.name for i in inputs if i.record}
        self.segment_s = segment_s
        self.wall = wall or time.time
        self.on_recorded: list[Callable[[str, str], None]] = []
        self.stopping = False
        self._last: dict[str, str] = {}
        self._open: set[_Recording] = set()
        self._tasks: set[asyncio.Task[str | None]] = set()
        self._lock = asyncio.Lock()  # one recording converted and ingested at a time
        self._serial = 0

    # -- LiveConsumer --------------------------------------------------------------------------

    def publication(self, input: str) -> LiveSink:
        """A recording sink for ``input`` (nothing recorded when its ``record`` is off)."""
        if input not in self.recorded:
            return _Discard()
        started = self.wall()
        # Unique within this run; a name an earlier run left is refused by O_EXCL (logged).
        self._serial += 1
        path = self.directory / f"{input}-{int(started * 1000)}-{self._serial}{SUFFIX}"
        rec = _Recording(self, input, path, started)
        self._open.add(rec)
        return rec

    def last(self, input: str) -> str | None:
        """The media id of ``input``'s last recording, if any."""
        return self._last.get(input)

    # -- after the publication -------------------------------------------------------------------

    def _finished(self, rec: _Recording) -> None:
        task = asyncio.create_task(self._seal(rec), name=f"record-ingest-{rec.input}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _seal(self, rec: _Recording) -> str | None:
        try:
            await asyncio.shield(rec.writer)
        finally:
            self._open.discard(rec)
        if self.stopping:
            return None  # ingested at the next start
        return await self.publish(rec.path)

    async def flush(self) -> None:
        """Wait until every ended recording is on disk (the daemon is stopping)."""
        writers = [r.writer for r in list(self._open)]
        if writers:
            await asyncio.gather(*writers, return_exceptions=True)

    async def wait(self) -> list[str | None]:
        """Wait for the recordings that ended to be ingested; their media ids."""
        out: list[str | None] = []
        while tasks := list(self._tasks):
            for res in await asyncio.gather(*tasks, return_exceptions=True):
                out.append(res if isinstance(res, str) else None)
        return out

    async def publish(self, path: Path) -> str | None:
        """Cut a torn tail, remux, ingest; the media id (None: nothing to keep)."""
        async with self._lock:
            try:
                return await self._publish(path)
            except MediaError as exc:
                failed = path.with_name(path.name + ".failed")
                await asyncio.to_thread(path.replace, failed)
                log.error(
                    "live recording is not playable media; kept for the operator",
                    extra={"path": str(failed), "error": exc.message},
                )
            except (PeerdError, OSError) as exc:
                log.error(
                    "live recording not ingested; retried at the next start",
                    extra={"path": str(path), "error": str(exc)},
                )
            return None

    async def _publish(self, path: Path) -> str | None:
        head, end, ended = await asyncio.to_thread(read_header, path)
        size = (await asyncio.to_thread(path.stat)).st_size
        if size > end and end > 0:
            await asyncio.to_thread(os.truncate, path, end)
            log.warning(
                "live recording had a torn tail; cut",
                extra={"path": str(path), "cut_bytes": size - end},
            )
        if head is None:
            log.warning("live recording has no header; removed", extra={"path": str(path)})
            await asyncio.to_thread(path.unlink, True)
            return None
        input = str(head["input"])
        tracks = [_track(t) for t in head["tracks"]]
        mp4 = path.with_suffix(".mp4")
        try:
            frames = await asyncio.to_thread(write_mp4, path, tracks, mp4)
            if frames == 0:
                log.info("live recording has no frame; removed", extra={"input": input})
                await asyncio.to_thread(path.unlink, True)
                return None
            when = datetime.fromtimestamp(float(head["started"]), UTC)
            title = f"{input} live {when:%Y-%m-%d %H:%M:%S} UTC"
            res = await self.ingestor.ingest(mp4, force=True, title=title)
        finally:
            await asyncio.to_thread(mp4.unlink, True)
        media_id = str(res.media_id)
        self._last[input] = media_id
        await asyncio.to_thread(self._save_last)
        await asyncio.to_thread(path.unlink, True)
        log.info(
            "live recording ingested",
            extra={
                "input": input,
                "media_id": media_id,
                "duration_s": round(res.duration_s, 3),
                "frames": frames,
                "recovered": not ended,
            },
        )
        for cb in self.on_recorded:
            cb(input, media_id)
        return media_id

    def _save_last(self) -> None:
        tmp = self.directory / (LAST_FILE + ".tmp")
        tmp.write_text(json.dumps(self._last, sort_keys=True))
        tmp.replace(self.directory / LAST_FILE)

    async def recover(self) -> list[str | None]:
        """Load the last recordings; ingest the recordings a crash (or a stop) left behind."""

        def scan() -> tuple[dict[str, str], list[Path]]:
            last: dict[str, str] = {}
            try:
                last = json.loads((self.directory / LAST_FILE).read_text())
            except FileNotFoundError:
                pass
            except (OSError, ValueError) as exc:
                log.warning("live last.json unreadable; ignored", extra={"error": str(exc)})
            if not self.directory.is_dir():
                return last, []
            return last, sorted(self.directory.glob("*" + SUFFIX))

        last, left = await asyncio.to_thread(scan)
        self._last = {**last, **self._last}
        busy = {r.path for r in self._open}
        out = []
        for path in left:
            if path in busy:
                continue
            log.info("live recording left by the last run; ingesting", extra={"path": str(path)})
            out.append(await self.publish(path))
        return out
