"""The viewers' fast path: plain GET/HEAD of playlists and held blobs without aiohttp's stack.

A player asks for the same few URLs over and over on one keep-alive connection. aiohttp spends
most of such a request in its own layers (protocol task, request object, router, middleware,
response object, signals); this module answers the common case on the connection itself and
gives everything else to aiohttp (``[http] fast_path = false`` gives it everything)::

    bytes ──► _Conn (asyncio.Protocol, one per connection)
                │ peerd.core.httphead.parse: a plain head?
                │   and a request the HLS routes let us answer here (:class:`Hls`)?
                │      yes ─► playlist / held blob ─► write ─► next head
                │      no  ─► hand off: a protocol from aiohttp's ``web.Server`` takes the
                ▼             transport and every byte from this request on
              aiohttp (full app: routes, middleware, errors, limits)

Only a target of exactly ``/hls/<media>/<name>.m3u8`` or ``/hls/<media>/b/<cid>.<ext>``, with no
query or exactly ``?token=``, is answered here, and only when :meth:`Hls.admits` lets it through
without a refusal, the media is cached (a media not cached yet is loaded first, for an admitted
viewer, and the request handled again), the playlist or blob belongs to it, a blob is held,
its stream is admitted already under the uplink budget (:meth:`Hls.admitted_stream`; a new
stream is decided on the full path, which looks up whether the bucket could take it) and
a stream slot is free. A refusal, a 404, a 429, a blob to fetch: all come from the full path,
with its log line, reason counter and body; the fast path only ever says 200, with the headers
and counters the full path would have.

Blobs go out with ``loop.sendfile`` from file objects kept open per blob (an open and close per
request costs a thread hop each): the stat that tells whether the blob is held also tells
whether the open file is still that blob's, and files unused for ``_OPEN_IDLE_S`` are closed,
so an evicted blob's disk space is not held for long.

Every connection starts here, fast path on or off, because this is where request heads are read
under a deadline (slowloris: a client holding connections open with a head that never ends).
A connection is closed without an answer when its head is not whole ``header_timeout`` after
the accept, or after the first byte that follows a response, and when no byte of a next request
comes ``keepalive_timeout`` after a response. A head handed to aiohttp before its end keeps
its deadline: the connection stays with this protocol, which relays the bytes to aiohttp until
the head's end has passed (aiohttp has no public way to close a handler only if it still waits
for a head). After a whole request, aiohttp's keep-alive timer bounds the connection (aiohttp
closes one whose next head is not whole by then). At most ``max_connections`` are open
(counting aiohttp's): a new one past it sheds the connection that has waited longest for a head
here, or is closed at once if there is none; so an attacker's slow connections make room for a
newcomer, never the reverse, and a connection being answered is never cut for a newcomer.
On shutdown idle connections close at once and busy ones after their current response (bounded
by the grace time).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import os
import re
import socket
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from peerd.core import httphead
from peerd.core.validators import blob_etag

_CMCD = r"([A-Za-z0-9%._~*+!'()-]{1,12288})"  # URLSearchParams.set's encoding of a CMCD value
_TARGET = re.compile(
    r"/hls/(b[a-z2-7]{58})/(?:([a-z0-9][a-z0-9_-]{0,31})\.m3u8|b/(b[a-z2-7]{58})\.(mp4|m4s|ts|vtt))"
    rf"(?:\?token=([A-Za-z0-9._-]{{1,512}})(?:&CMCD={_CMCD})?|\?CMCD={_CMCD})?"
)
_MAX_BUFFER = 64 * 1024
_MAX_OPEN = 256
_OPEN_IDLE_S = 10.0
_SERVER = f"Server: {SERVER_SOFTWARE}\r\n".encode()

Hot = Coroutine[Any, Any, None]


class Hls(Protocol):
    """What the fast path asks of the HLS routes (:class:`peerd.http.hls.HlsRoutes`)."""

    @property
    def playlist_headers(self) -> Mapping[str, str]:
        """The header fields of every playlist answer."""

    def admits(self, media_id: str, token: str | None, headers: Mapping[str, str]) -> bool:
        """Whether the request may read the media, decided without refusal, I/O or await."""

    def cached(self, media_id: str) -> bool:
        """Whether the media's manifest is in memory."""

    async def load(self, media_id: str) -> None:
        """Bring the media's manifest into memory (raises if there is none)."""

    def playlist_body(self, media_id: str, name: str, token: str | None) -> bytes | None:
        """The playlist's body for a viewer with ``token``, None if the media has no such one."""

    def held_blob(
        self, media_id: str, cid: str, ext: str, token: str | None = None
    ) -> tuple[str, os.stat_result] | None:
        """The file of a held blob of the (cached) media with that extension and its stat;
        None if the blob is not the media's, has another extension, or is not held."""

    def blob_headers(self, ext: str) -> dict[str, str]:
        """The header fields of every answer with a blob of this extension (a new dict)."""

    def admitted_stream(
        self, media_id: str, token: str | None, headers: Mapping[str, str], peer: str
    ) -> bool:
        """Whether the viewer's stream is admitted already under the uplink budget."""

    def open_stream(self) -> bool:
        """Take one of the blob stream slots, False when none is free."""

    def close_stream(self) -> None:
        """Give back a stream slot."""

    def answered(self, blob: bool, seconds: float) -> None:
        """Count a 200 answered here (request counter and latency of its route)."""

    def blob_sent(self, cid: str, nbytes: int, *, ok: bool) -> None:
        """Count a held blob's bytes sent (``ok``: all of them)."""

    def cmcd(
        self,
        media_id: str,
        ref: str,
        token: str | None,
        peer: str,
        headers: Mapping[str, str],
        query: str | None,
        *,
        playlist: bool = False,
    ) -> None:
        """Report a request's CMCD (``query``: the ``CMCD`` argument, still URL-encoded; None:
        its ``CMCD-*`` header fields) to playback analytics, without await."""


def _has_cmcd(headers: Mapping[str, str]) -> bool:
    return "cmcd-request" in headers or "cmcd-object" in headers or "cmcd-session" in headers


HLS_KEY = web.AppKey("fast_hls", Hls)


@dataclass
class _Open:
    """A blob file kept open for sendfile, shared by concurrent responses."""

    file: Any  # io.FileIO
    key: tuple[int, int, int, int]  # (dev, ino, mtime_ns, size) it was opened at
    header: bytes  # the blob's fixed response headers
    users: int = 0
    last_used: float = 0.0
    stale: bool = False


class FastPath:
    """The fast path of one listening socket: its connections, prebuilt headers, open files."""

    def __init__(
        self,
        hls: Hls,
        handler_factory: Callable[[], web.RequestHandler],
        *,
        keepalive_timeout: float,
        limits: httphead.Limits,
        answer: bool = True,
        header_timeout: float = 10.0,
        max_connections: int = 4096,
        count_closed: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.hls = hls
        self.handler_factory = handler_factory
        self.keepalive_timeout = keepalive_timeout
        self.limits = limits
        self.answer = answer  # False: hand every request to aiohttp (heads still read here)
        self.header_timeout = header_timeout
        self.max_connections = max_connections
        self.count_closed = count_closed  # why a connection was closed before a request
        self.conns: set[_Conn] = set()
        # Connections waiting for a head, longest first, and those handed to aiohttp (oldest
        # first; closed ones are dropped when the count matters).
        self.waiting: dict[_Conn, None] = {}
        self.handed: dict[web.RequestHandler, asyncio.BaseTransport] = {}
        self.answered = 0  # responses sent here (tests tell the paths apart by it)
        self.opened = 0  # blob files opened
        self.closing = False
        self._pl_header = self._headers(hls.playlist_headers)
        self._date_at = -1
        self._date = b""
        self._open: dict[str, _Open] = {}
        self._opening: dict[str, asyncio.Future[_Open]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._no_conns = asyncio.Event()

    # -- building blocks -------------------------------------------------------------------

    @staticmethod
    def _headers(headers: Mapping[str, str]) -> bytes:
        return "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1") + _SERVER

    def _date_line(self) -> bytes:
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = f"Date: {email.utils.formatdate(now, usegmt=True)}\r\n".encode()
        return self._date

    def protocol(self) -> asyncio.Protocol:
        """A protocol for a new connection (the listening server's protocol factory)."""
        if self.closing:
            return self.handler_factory()
        return _Conn(self)

    # -- requests --------------------------------------------------------------------------

    def handle(self, conn: _Conn, head: httphead.Head) -> bool | Hot | _Load | None:
        """Answer ``head`` (True), start answering it (a coroutine), load its media first
        (``_Load``: ``head`` is handled again afterwards), or None to hand off."""
        started = time.perf_counter()
        target = _TARGET.fullmatch(head.target)
        if target is None:
            return None
        media_id, name, cid, ext, token, cmcd, cmcd_alone = target.groups()
        hls = self.hls
        if not hls.admits(media_id, token, head.headers):
            return None
        cmcd = cmcd or cmcd_alone
        if not hls.cached(media_id):
            if media_id in conn.loads:
                return None  # loaded once on this connection and still not cached: aiohttp's
            conn.loads.add(media_id)
            return _Load(self._load(media_id))
        head_only = head.method == "HEAD"
        if name is not None:
            body = hls.playlist_body(media_id, name, token)
            if body is None:
                return None
            if cmcd is not None or _has_cmcd(head.headers):
                hls.cmcd(media_id, name, token, conn.peer, head.headers, cmcd, playlist=True)
            start = b"HTTP/1.1 200 OK\r\n%bContent-Length: %d\r\n%b\r\n" % (
                self._pl_header,
                len(body),
                self._date_line(),
            )
            assert conn.transport is not None
            conn.transport.write(start if head_only else start + body)
            self.answered += 1
            hls.answered(False, time.perf_counter() - started)
            return True
        held = hls.held_blob(media_id, cid, ext, token)
        if held is None:
            self._forget(cid)  # an evicted blob's file is not held open
            return None  # the full path fetches it, or answers 404
        if not hls.admitted_stream(media_id, token, head.headers, conn.peer):
            return None  # a new stream: the full path admits it, redirects it, or 503
        if not hls.open_stream():
            return None  # the full path's 429
        if cmcd is not None or _has_cmcd(head.headers):
            hls.cmcd(media_id, cid, token, conn.peer, head.headers, cmcd)
        return self._blob(conn, cid, ext, head_only, held, started)

    async def _load(self, media_id: str) -> None:
        # Only for a viewer already admitted for this media (no catalog work for strangers).
        # Whatever goes wrong is the full path's to answer and log: the request is handled
        # again once this ends, and a media still not cached is handed off.
        with contextlib.suppress(Exception):
            await self.hls.load(media_id)

    async def _blob(
        self,
        conn: _Conn,
        cid: str,
        ext: str,
        head_only: bool,
        held: tuple[str, os.stat_result],
        started: float,
    ) -> None:
        """Send a held blob (a stream slot is taken)."""
        entry: _Open | None = None
        sent = 0
        ok = False
        try:
            entry = await self._acquire(cid, ext, *held)
            size = entry.key[3]
            transport = conn.transport
            if transport is None:
                return  # the client left while the file was being opened
            transport.write(b"HTTP/1.1 200 OK\r\n%b%b\r\n" % (entry.header, self._date_line()))
            if not head_only and size:
                await _sendfile(transport, entry.file, size)
                sent = size
            ok = True
        except (ConnectionError, OSError, RuntimeError):
            # Like the full path: a cut response counts as a request, not as bytes sent.
            # (RuntimeError: loop.sendfile on a transport that is closing.)
            if conn.transport is not None:
                conn.transport.close()
        finally:
            self.hls.close_stream()
            if entry is not None:
                self._release(entry)
            self.hls.blob_sent(cid, sent, ok=ok)
            self.answered += 1
            self.hls.answered(True, time.perf_counter() - started)

    # -- open blob files -------------------------------------------------------------------

    async def _acquire(self, cid: str, ext: str, path: str, st: os.stat_result) -> _Open:
        """The open file of ``cid`` (opened now if ``st`` says the one held is not current)."""
        entry = self._open.get(cid)
        if entry is None or entry.key != (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size):
            # One open per blob however many requests want it at once (a cold start of many
            # viewers would otherwise open each file once per connection).
            opening = self._opening.get(cid)
            if opening is None:
                opening = asyncio.ensure_future(self._open_new(cid, ext, path))
                self._opening[cid] = opening
                opening.add_done_callback(lambda _f: self._opening.pop(cid, None))
            entry = await asyncio.shield(opening)
        entry.users += 1
        return entry

    async def _open_new(self, cid: str, ext: str, path: str) -> _Open:
        loop = asyncio.get_running_loop()
        f, fst = await loop.run_in_executor(None, _open_blob, path)
        self.opened += 1
        self._forget(cid)
        key = (fst.st_dev, fst.st_ino, fst.st_mtime_ns, fst.st_size)
        entry = _Open(f, key, self._blob_header(cid, ext, fst), last_used=time.monotonic())
        if len(self._open) >= _MAX_OPEN:
            self._forget(next(iter(self._open)))
        self._open[cid] = entry
        if self._sweep is None:
            self._sweep = loop.call_later(_OPEN_IDLE_S, self._sweep_idle)
        return entry

    def _blob_header(self, cid: str, ext: str, st: os.stat_result) -> bytes:
        headers = self.hls.blob_headers(ext)
        # As the full path sends it (clients may hold ETags from either path, or another node).
        headers["ETag"] = blob_etag(cid)
        headers["Content-Length"] = str(st.st_size)
        headers["Accept-Ranges"] = "bytes"
        return self._headers(headers)

    def _release(self, entry: _Open) -> None:
        entry.users -= 1
        entry.last_used = time.monotonic()
        if entry.stale and entry.users == 0:
            _close_later(entry)

    def _forget(self, cid: str) -> None:
        entry = self._open.pop(cid, None)
        if entry is not None:
            entry.stale = True
            if entry.users == 0:
                _close_later(entry)

    def _sweep_idle(self) -> None:
        self._sweep = None
        cutoff = time.monotonic() - _OPEN_IDLE_S
        for cid, entry in list(self._open.items()):
            if entry.users == 0 and entry.last_used < cutoff:
                self._forget(cid)
        if self._open:
            self._sweep = asyncio.get_running_loop().call_later(_OPEN_IDLE_S, self._sweep_idle)

    # -- lifecycle -------------------------------------------------------------------------

    def room(self) -> bool:
        """Whether a new connection may stay open, once the cap is enforced (see module doc)."""
        if len(self.conns) + len(self.handed) < self.max_connections:
            return True
        for handler, transport in list(self.handed.items()):
            if transport.is_closing():
                del self.handed[handler]
        if len(self.conns) + len(self.handed) < self.max_connections:
            return True
        if self.waiting:
            next(iter(self.waiting)).shed()
            return True
        return False

    def forget(self, conn: _Conn) -> None:
        """``conn`` is closed or handed to aiohttp."""
        self.waiting.pop(conn, None)
        self.conns.discard(conn)
        if not self.conns:
            self._no_conns.set()

    async def shutdown(self, grace_s: float) -> None:
        """Close idle connections now, busy ones after their response; then the open files."""
        self.closing = True
        for conn in list(self.conns):
            conn.close_when_idle()
        if self.conns:
            self._no_conns.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace_s):
                    await self._no_conns.wait()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.transport.abort()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for cid in list(self._open):
            self._forget(cid)


def _open_blob(path: str) -> tuple[Any, os.stat_result]:
    f = open(path, "rb", buffering=0)  # noqa: PTH123, SIM115 -- kept open across requests
    try:
        return f, os.fstat(f.fileno())
    except OSError:
        f.close()
        raise


def _close_later(entry: _Open) -> None:
    asyncio.get_running_loop().run_in_executor(None, entry.file.close)


async def _sendfile(transport: asyncio.Transport, file: Any, size: int) -> None:
    """Send the file up to ``size``; pread (offsets of its own, the file is shared) if no
    sendfile."""
    loop = asyncio.get_running_loop()
    try:
        await loop.sendfile(transport, file, 0, size, fallback=False)
        return
    except asyncio.SendfileNotAvailableError:
        pass
    fd = file.fileno()
    offset = 0
    while offset < size:
        chunk = await loop.run_in_executor(
            None, os.pread, fd, min(256 * 1024, size - offset), offset
        )
        if not chunk:
            raise ConnectionResetError("blob file shorter than its size")
        transport.write(chunk)
        offset += len(chunk)
        if transport.get_write_buffer_size() > 1024 * 1024:
            await _drained(transport)
    await _drained(transport)


async def _drained(transport: asyncio.Transport) -> None:
    while transport.get_write_buffer_size() > 0:
        if transport.is_closing():
            raise ConnectionResetError("connection lost")
        await asyncio.sleep(0.001)


@dataclass
class _Load:
    """:meth:`FastPath.handle`'s answer for a media not cached yet: load it, then ask again."""

    coro: Hot


class _Conn(asyncio.Protocol):
    """One client connection while the fast path holds it."""

    def __init__(self, fast: FastPath) -> None:
        self.fast = fast
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False
        self.write_paused = False
        self.read_paused = False
        self.closing = False
        self.idle: asyncio.TimerHandle | None = None  # the head or keep-alive deadline
        self.awaits_head = True  # what ``idle`` waits for: a head's end, or its first byte
        self.relay: web.RequestHandler | None = None  # aiohttp's, fed until a head's end
        self.tail = b""  # the last bytes relayed (a head's end may straddle two reads)
        self.loads: set[str] = set()  # media ids this connection had loaded
        self.task: asyncio.Task[None] | None = None  # a response being sent, or a load
        self.loop = asyncio.get_running_loop()  # the server calls the factory in its loop
        self.peer = ""  # the client's address (a stream of the uplink admission)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit the connection (or close it, past the cap) and start its head deadline."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if not self.fast.room():
            self.fast.count_closed("refused")
            transport.abort()
            return
        peername = transport.get_extra_info("peername")
        self.peer = str(peername[0]) if peername else ""
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.fast.conns.add(self)
        self._wait(head=True)

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection (a response being sent fails on its own)."""
        if self.relay is not None:
            self.relay.connection_lost(exc)
        self.fast.forget(self)
        self._disarm_idle()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        """Buffer, and answer what is complete unless a response is being sent."""
        if self.relay is not None:
            self._relay(data)
            return
        self.buf += data
        if self.busy or self.write_paused:
            if len(self.buf) > _MAX_BUFFER and not self.read_paused and self.transport:
                self.transport.pause_reading()
                self.read_paused = True
            return
        self._process()

    def pause_writing(self) -> None:
        """The client reads slowly: stop answering pipelined requests."""
        if self.relay is not None:
            self.relay.pause_writing()
        self.write_paused = True

    def resume_writing(self) -> None:
        """Carry on with buffered requests."""
        if self.relay is not None:
            self.relay.resume_writing()
            return
        self.write_paused = False
        if not self.busy:
            self._process()

    def close_when_idle(self) -> None:
        """Shutdown: close now if idle, else after the current response."""
        self.closing = True
        if not self.busy and self.transport is not None:
            self.transport.close()

    def shed(self) -> None:
        """Close now to make room for a new connection (this one waits for a head)."""
        self.fast.count_closed("shed")
        self.fast.forget(self)  # counted out now, not when the loop reports the close
        self._disarm_idle()
        if self.transport is not None:
            self.transport.abort()

    def _wait(self, *, head: bool) -> None:
        """Start waiting for the end of a head (``head``) or for a next request's first byte."""
        self._disarm_idle()
        self.awaits_head = head
        delay = self.fast.header_timeout if head else self.fast.keepalive_timeout
        self.idle = self.loop.call_later(delay, self._idle_timeout)
        self.fast.waiting.pop(self, None)
        self.fast.waiting[self] = None

    def _disarm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None

    def _idle_timeout(self) -> None:
        self.idle = None
        if not self.busy and self.transport is not None:
            # abort: a client that neither sends nor reads would hold a graceful close open.
            self.fast.count_closed("header_timeout" if self.awaits_head else "idle_timeout")
            self.transport.abort()

    def _process(self) -> None:
        while not self.busy and not self.write_paused and self.transport is not None:
            if self.transport.is_closing():
                # A response was cut (the connection closed mid-body): whatever the client
                # pipelined behind it must not be written into that body.
                self.buf.clear()
                return
            if self.closing:
                self.transport.close()
                return
            head = httphead.parse(self.buf, self.fast.limits)
            if head is httphead.MORE:
                if self.idle is None:
                    self._wait(head=bool(self.buf))
                elif self.buf and not self.awaits_head:
                    # A next request begins: its head has header_timeout from its first byte
                    # (bytes trickling in later do not extend it).
                    self._wait(head=True)
                return
            if head is httphead.HANDOFF:
                self._handoff()
                return
            assert isinstance(head, httphead.Head)
            self._disarm_idle()
            self.fast.waiting.pop(self, None)
            outcome = self.fast.handle(self, head) if self.fast.answer else None
            if outcome is None:
                self._handoff()
                return
            if isinstance(outcome, _Load):
                # The media's manifest is being loaded: the head stays buffered and is
                # handled again afterwards (so the connection stays on the fast path).
                self.busy = True
                self.task = self.loop.create_task(self._run(outcome.coro))
                return
            del self.buf[: head.size]
            if outcome is not True:
                assert not isinstance(outcome, bool)
                self.busy = True
                self.task = self.loop.create_task(self._run(outcome))
                return
        if not self.busy and self.transport is not None and self.idle is None:
            self._wait(head=False)  # paused by a client that does not read: idle too

    async def _run(self, coro: Hot) -> None:
        try:
            await coro
        finally:
            self.busy = False
            self.task = None
            if self.read_paused and self.transport is not None:
                self.read_paused = False
                self.transport.resume_reading()
            self._process()

    def _handoff(self) -> None:
        # aiohttp's handler takes the transport and every byte from this request on.
        transport = self.transport
        assert transport is not None
        deadline = (
            self.idle.when()
            if self.idle is not None and self.awaits_head
            else self.loop.time() + self.fast.header_timeout
        )
        self._disarm_idle()
        self.fast.forget(self)
        handler = self.fast.handler_factory()
        self.fast.handed[handler] = transport
        data = bytes(self.buf)
        self.buf.clear()
        if b"\r\n\r\n" in data:
            transport.set_protocol(handler)
            self.transport = None
        else:
            # Handed before the head's end (too long, or bytes this parser leaves to aiohttp):
            # relay until the end has passed, under the head's deadline.
            self.relay = handler
            self.tail = data[-3:]
            self.awaits_head = True
            self.idle = self.loop.call_at(deadline, self._idle_timeout)
        handler.connection_made(transport)
        if data:
            handler.data_received(data)
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()

    def _relay(self, data: bytes) -> None:
        handler = self.relay
        assert handler is not None
        seen = self.tail + data
        self.tail = seen[-3:]
        if b"\r\n\r\n" in seen and self.transport is not None:
            # The head is whole: aiohttp's from here on (its keep-alive timer bounds the rest).
            self._disarm_idle()
            self.relay = None
            self.transport.set_protocol(handler)
            self.transport = None
        handler.data_received(data)
