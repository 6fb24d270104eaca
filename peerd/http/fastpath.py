"""The viewers' fast path: plain GET/HEAD of playlists and blobs without aiohttp's stack.

A player asks for the same few URLs over and over on one keep-alive connection. aiohttp spends
most of such a request in its own layers (protocol task, request object, router, middleware,
response object, signals); this module answers the common case directly on the connection and
gives everything else to aiohttp::

    bytes ──► _Conn (asyncio.Protocol, one per connection)
                │ a complete head (up to CRLF CRLF)?
                │   simple enough and a hot request we can answer here?
                │      yes ─► playlist / held blob ─► write ─► next head
                │      a GET of a blob not held ─► _Relay: the resolver's fetch writes into
                │             this socket from its own callbacks ─► next head
                │             (nothing sent: the head is handled again, and handed off)
                │      no  ─► hand off: aiohttp's RequestHandler takes the transport and every
                ▼             byte from this request on, for the rest of the connection
              aiohttp (full app: routes, middleware, errors, limits)

"Simple enough" is strict on purpose; whatever is unusual goes to aiohttp, which then answers as
it always did: only ``GET``/``HEAD`` with ``HTTP/1.1``, a target of exactly
``/hls/<media>/<name>.m3u8`` or ``/hls/<media>/b/<cid>.<ext>`` with no query or exactly
``?token=`` and base64url/dot characters (no percent-encoding), header lines within the
configured line/field/count limits with token names and visible values, and no
``Content-Length``, ``Transfer-Encoding``, ``Upgrade``, ``Expect`` or ``Connection`` other than
``keep-alive``. A hot request is answered here only when it passes without a refusal:
:meth:`ViewerAuth.admits` (a good token, or an Access JWT already verified), the media is
cached (a media not cached yet is loaded first, for an admitted viewer, and the request handled
again: a player's first request does not tie its connection to aiohttp), the playlist or blob
belongs to it. Blobs also need no ``Range`` or conditional header
(aiohttp's ``FileResponse`` implements those) and a free stream slot (the 429 is aiohttp's).
A refusal therefore always comes from the full path, with its log line, reason counter and
body, and the fast path only ever says 200.

A plain GET of a blob the node lacks (on the daemon, with a resolver) is relayed here too:
:meth:`Resolver.watch` joins or starts the one streamed fetch of that blob, and the relay's
``wake`` writes the head and each chunk the tee releases (the last only once the blob hashed to
its id) in the callback that brought them; for R2 that is the bucket connection's own
``data_received``, so no task stands between the bucket's bytes and the viewer (a cold miss's
first byte was ~0.4 ms slower through aiohttp's request and the resolver's tasks). The
headers, counters and log line are the full path's (``HlsRoutes._stream``). A relay that
sends nothing (no source has the blob, the fetch failed, or ``request_timeout_s`` passed
before the first byte) leaves the request buffered and marks the blob for this connection: the
request is then handed to aiohttp, which answers from the same fetch's outcome (after a
timeout, a 503 at once: the viewer has waited ``request_timeout_s`` already). A fetch
delivered whole by an untrusted source (peers) is sent from the stored file, labelled with
that source.

What it sends is what the full path sends for the same request: the same headers (CORS,
Cache-Control, Content-Type, ETag and Last-Modified as ``FileResponse`` makes them,
Accept-Ranges, Date, Server, ``X-Peerd-Worker`` with workers), the same counters and
histogram (under the aiohttp route labels), the stream gauge, bytes by source and status, and
access records. Blobs go out with ``loop.sendfile`` from file objects kept open per blob (an
open and close per request would cost a thread hop each, as ``FileResponse`` does): the stat
that tells whether the blob is held (one syscall on a warm directory, as the full path already
does) also tells whether the open file is still that blob's, and files unused for
``_OPEN_IDLE_S`` are closed, so an evicted blob's disk space is not held for long.

Idle connections close after the keep-alive timeout; on shutdown idle connections close at once
and busy ones after their current response (bounded by the shutdown timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import math
import os
import re
import stat
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.tcp_helpers import tcp_keepalive

from peerd.core.ids import Cid
from peerd.delivery.resolver import Tee
from peerd.http.hls import ROUTES_KEY, HlsRoutes
from peerd.http.server import HTTP_METRICS_KEY, WORKER_MARK_KEY

_TARGET = re.compile(
    rb"/hls/(b[a-z2-7]{58})/(?:([a-z0-9][a-z0-9_-]{0,31})\.m3u8|b/(b[a-z2-7]{58})\.(mp4|m4s|ts))"
    rb"(?:\?token=([A-Za-z0-9._-]{1,512}))?"
)
_NAME = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f-\xff]")
# Header names that make a request the full path's business (framing, upgrades).
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"upgrade", b"expect"))
# Headers FileResponse acts on for blobs.
_CONDITIONAL = frozenset(
    (b"range", b"if-match", b"if-none-match", b"if-modified-since", b"if-unmodified-since",
     b"if-range")
)  # fmt: skip
_MAX_BUFFER = 64 * 1024
_MAX_OPEN = 256
_OPEN_IDLE_S = 10.0
log = logging.getLogger("peerd.http.hls")  # the full path's relay logs there too
_SERVER = f"Server: {SERVER_SOFTWARE}\r\n".encode()

Hot = Coroutine[Any, Any, None]


@dataclass
class _Head:
    """The parts of a parsed request head the fast path uses."""

    head_only: bool  # HEAD
    media_id: str
    name: str | None  # playlist name, or None for a blob
    cid: str | None
    ext: str | None
    token: str | None
    jwt: str | None
    conditional: bool  # Range or a conditional header (blobs go to the full path)


@dataclass
class _Open:
    """A blob file kept open for sendfile, shared by concurrent responses."""

    file: Any  # io.FileIO
    key: tuple[int, int, int, int]  # (dev, ino, mtime_ns, size) it was opened at
    header: bytes  # the blob's fixed response headers
    users: int = 0
    last_used: float = 0.0
    stale: bool = False


class _Lazy:
    """A metric child looked up on first use."""

    __slots__ = ("_get", "_child")

    def __init__(self, get: Callable[[], Any]) -> None:
        self._get = get
        self._child: Any = None

    def inc(self, amount: float = 1) -> None:
        """Increment the child counter."""
        child = self._child
        if child is None:
            child = self._child = self._get()
        child.inc(amount)

    def observe(self, value: float) -> None:
        """Observe into the child histogram."""
        child = self._child
        if child is None:
            child = self._child = self._get()
        child.observe(value)


class FastPath:
    """Per-application state of the fast path: prebuilt headers, metrics children, open files."""

    def __init__(
        self,
        app: web.Application,
        handler_factory: Callable[[], asyncio.Protocol],
        *,
        keepalive_timeout: float,
        max_line_size: int,
        max_field_size: int,
        max_headers: int,
    ) -> None:
        self.routes: HlsRoutes = app[ROUTES_KEY]
        self.rt = self.routes.rt
        self.handler_factory = handler_factory
        self.keepalive_timeout = keepalive_timeout
        self.max_line_size = max_line_size
        self.max_field_size = max_field_size
        self.max_headers = max_headers
        self.conns: set[_Conn] = set()
        self.answered = 0  # responses sent here (tests tell the paths apart by it)
        self.opened = 0  # blob files opened
        self.closing = False
        mark = app.get(WORKER_MARK_KEY)
        self._mark = f"X-Peerd-Worker: {mark}\r\n".encode() if mark is not None else b""
        pl_route, blob_route = self.routes.route_names
        hm = app[HTTP_METRICS_KEY]
        m = self.routes.m
        # Label lookups cost more than the increments: each child is looked up once, on first
        # use (so /metrics shows the same series as with the full path alone).
        self.pl_ok = _Lazy(lambda: hm.requests.labels(route=pl_route, status="200"))
        self.pl_time = _Lazy(lambda: hm.latency.labels(route=pl_route))
        self.blob_ok = _Lazy(lambda: hm.requests.labels(route=blob_route, status="200"))
        self.blob_time = _Lazy(lambda: hm.latency.labels(route=blob_route))
        self.bytes_ok = _Lazy(lambda: m.bytes.labels(source="local", status="200"))
        self.served_local = _Lazy(lambda: self.rt.metrics.bytes_served.labels(source="local"))
        self.active = m.active
        self._pl_header = self._headers(self.routes._playlist_headers)
        self._miss_headers: dict[str, bytes] = {}
        self._date_at = -1
        self._date = b""
        self._open: dict[str, _Open] = {}
        self._opening: dict[str, asyncio.Future[_Open]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._no_conns = asyncio.Event()

    # -- building blocks -------------------------------------------------------------------

    def _headers(self, headers: dict[str, str]) -> bytes:
        return (
            "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode("latin-1")
            + _SERVER
            + self._mark
        )

    def miss_header(self, ext: str, size: int) -> bytes:
        """Headers of a relayed blob, as the full path's streamed response has them."""
        fixed = self._miss_headers.get(ext)
        if fixed is None:  # built once per extension: a cold miss's first byte waits on this
            fixed = self._miss_headers[ext] = self._headers(self.routes.blob_headers(ext))
        return b"%bContent-Length: %d\r\n" % (fixed, size)

    def _date_line(self) -> bytes:
        now = int(time.time())
        if now != self._date_at:
            self._date_at = now
            self._date = f"Date: {email.utils.formatdate(now, usegmt=True)}\r\n".encode()
        return self._date

    def protocol(self) -> asyncio.Protocol:
        """A protocol for a new connection (the server's protocol factory)."""
        if self.closing:
            return self.handler_factory()
        return _Conn(self)

    def parse(self, head: bytes) -> _Head | None:
        """The request if it is simple enough for the fast path, else None."""
        lines = head.split(b"\r\n")
        line = lines[0]
        if len(line) > self.max_line_size or len(lines) - 1 > self.max_headers:
            return None
        parts = line.split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1" or parts[0] not in (b"GET", b"HEAD"):
            return None
        target = _TARGET.fullmatch(parts[1])
        if target is None:
            return None
        jwt: str | None = None
        conditional = False
        for h in lines[1:]:
            name, sep, value = h.partition(b":")
            if (
                not sep
                or len(h) > self.max_field_size
                or _NAME.fullmatch(name) is None
                or _BAD_VALUE.search(value) is not None
            ):
                return None
            lname = name.lower()
            if lname in _FRAMING:
                return None
            if lname == b"connection":
                if value.strip(b" \t").lower() != b"keep-alive":
                    return None
            elif lname in _CONDITIONAL:
                conditional = True
            elif lname == b"cf-access-jwt-assertion" and jwt is None:
                jwt = value.strip(b" \t").decode("ascii")
        mid, name_, cid, ext, token = target.groups()
        return _Head(
            head_only=parts[0] == b"HEAD",
            media_id=mid.decode(),
            name=name_.decode() if name_ is not None else None,
            cid=cid.decode() if cid is not None else None,
            ext=ext.decode() if ext is not None else None,
            token=token.decode() if token is not None else None,
            jwt=jwt,
            conditional=conditional,
        )

    # -- requests --------------------------------------------------------------------------

    def handle(self, conn: _Conn, head: bytes) -> bool | Hot | _Load | _Relay | None:
        """Answer ``head`` (True), start answering it (a coroutine), load its media first
        (``_Load``: ``head`` is handled again afterwards), relay a blob the node lacks
        (``_Relay``), or None to hand off."""
        started = time.perf_counter()
        req = self.parse(head)
        if req is None:
            return None
        routes = self.routes
        if not routes.auth.admits(req.token, req.jwt, req.media_id, "hls"):
            return None
        media = routes._media.get(req.media_id)
        if media is None:
            if req.media_id in conn.loads:
                return None  # loaded once on this connection and still not cached: aiohttp's
            conn.loads.add(req.media_id)
            return _Load(self._load(req.media_id))
        if req.name is not None:
            parts = media.templates.get(req.name)
            if parts is None:
                return None
            # Access mode puts no token in URLs (as the full path: its check returns None).
            token = req.token if routes.auth.mode == "token" else None
            body = routes.rendered(req.media_id, req.name, token, parts)
            start = b"HTTP/1.1 200 OK\r\n%bContent-Length: %d\r\n%b\r\n" % (
                self._pl_header,
                len(body),
                self._date_line(),
            )
            assert conn.transport is not None
            conn.transport.write(start if req.head_only else start + body)
            self.pl_ok.inc()
            self.answered += 1
            self.pl_time.observe(time.perf_counter() - started)
            return True
        assert req.cid is not None
        assert req.ext is not None
        if req.conditional or media.blobs.get(req.cid) != req.ext:
            return None
        if routes.streams >= routes.max_streams:
            return None
        path = self.rt.store.file_name(Cid(req.cid))
        try:
            # Whether the blob is held: one stat in a warm directory (the full path does the
            # same), cheaper than a thread hop; of a plain string, as pathlib's joins cost
            # ~20 us on a cold miss's critical path.
            st = os.stat(path)  # noqa: PTH116
        except OSError:
            self._forget(req.cid)
            return self._miss(conn, req, media, started)
        if not stat.S_ISREG(st.st_mode):
            return None
        if media.remote:
            routes.fetch_ahead(media, req.cid)  # keep fetching ahead of a viewer of fetched media
        return self._blob(conn, req, path, st, started)

    def _miss(self, conn: _Conn, req: _Head, media: Any, started: float) -> _Relay | None:
        """Relay a blob the node lacks from the resolver's streamed fetch, or None to hand off.

        Only a plain GET on the daemon (HTTP workers send misses to it), once per blob and
        connection: a relay that ends before its first byte (the blob is nowhere, the fetch
        failed or timed out) leaves the request buffered, and handled again it goes to the
        full path, which answers (404, 503) from the same fetch's outcome.
        """
        routes = self.routes
        resolver = routes.resolver
        if req.head_only or routes.miss is not None or resolver is None:
            return None
        assert req.cid is not None
        if req.cid in conn.missed:
            return None
        relay = _Relay(self, conn, req, media, started)
        tee = resolver.watch(Cid(req.cid), relay.wake)
        if tee is None:
            return None
        relay.tee = tee
        return relay

    async def _load(self, media_id: str) -> None:
        # Only for a viewer the token already admits for this media (no catalog work for
        # strangers). Whatever goes wrong is the full path's to answer and log: the request
        # is handled again once this ends, and a media still not cached is handed off.
        with contextlib.suppress(Exception):
            await self.routes.media(media_id)

    async def _blob(
        self,
        conn: _Conn,
        req: _Head,
        path: str | Path,
        st: os.stat_result,
        started: float,
        source: str = "local",
    ) -> None:
        routes = self.routes
        assert req.cid is not None
        assert req.ext is not None
        routes.streams += 1
        self.active.inc()
        entry: _Open | None = None
        try:
            entry = await self._acquire(req.cid, req.ext, path, st)
            size = entry.key[3]
            transport = conn.transport
            if transport is None:
                return  # the client left while the file was being opened
            transport.write(b"HTTP/1.1 200 OK\r\n%b%b\r\n" % (entry.header, self._date_line()))
            sent = 0
            if not req.head_only and size:
                await _sendfile(transport, entry.file, size)
                sent = size
            self.account(req.cid, source, sent, ok=True)
        except (ConnectionError, OSError, RuntimeError):
            # Like the full path: a cut response counts as a request, not as bytes sent.
            # (RuntimeError: loop.sendfile on a transport that is closing.)
            if conn.transport is not None:
                conn.transport.close()
        finally:
            routes.streams -= 1
            self.active.dec()
            if entry is not None:
                self._release(entry)
            self.blob_ok.inc()
            self.answered += 1
            self.blob_time.observe(time.perf_counter() - started)

    def account(self, cid: str, source: str, sent: int, *, ok: bool) -> None:
        """Count a blob response's bytes as the full path does (access, by source, status)."""
        if sent:
            self.rt.access.record(cid, sent, time.time())
        if source == "local":
            if sent:
                self.served_local.inc(sent)
            if ok:
                self.bytes_ok.inc(sent)
                return
        elif sent:
            self.rt.metrics.bytes_served.labels(source=source).inc(sent)
        status = "200" if ok else "cut"
        self.routes.m.bytes.labels(source=source, status=status).inc(sent)

    # -- open blob files -------------------------------------------------------------------

    async def _acquire(
        self, cid: str, ext: str, path: str | Path, st: os.stat_result | None
    ) -> _Open:
        """The open file of ``cid`` (opened now if ``st`` says the one held is not current)."""
        entry = self._open.get(cid)
        current = st is None or (
            entry is not None and entry.key == (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        )
        if entry is None or not current:
            # One open per blob however many requests want it at once (a cold start of many
            # viewers would otherwise open each file once per connection).
            opening = self._opening.get(cid)
            if opening is None:
                opening = asyncio.ensure_future(self._open_new(cid, ext, path))
                self._opening[cid] = opening
                opening.add_done_callback(lambda _f: self._opening.pop(cid, None))
            entry = await asyncio.shield(opening)
            if entry.stale:  # evicted while this request waited: take the current one
                return await self._acquire(cid, ext, path, None)
        entry.users += 1
        return entry

    async def _open_new(self, cid: str, ext: str, path: str | Path) -> _Open:
        loop = asyncio.get_running_loop()
        f, fst = await loop.run_in_executor(None, _open_blob, path)
        self.opened += 1
        self._forget(cid)
        key = (fst.st_dev, fst.st_ino, fst.st_mtime_ns, fst.st_size)
        entry = _Open(f, key, self._blob_header(ext, fst), last_used=time.monotonic())
        if len(self._open) >= _MAX_OPEN:
            self._forget(next(iter(self._open)))
        self._open[cid] = entry
        if self._sweep is None:
            self._sweep = loop.call_later(_OPEN_IDLE_S, self._sweep_idle)
        return entry

    def _blob_header(self, ext: str, st: os.stat_result) -> bytes:
        headers = self.routes.blob_headers(ext)
        # As aiohttp's FileResponse makes them (clients may hold ETags from either path).
        headers["Etag"] = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
        headers["Last-Modified"] = time.strftime(
            "%a, %d %b %Y %H:%M:%S GMT", time.gmtime(math.ceil(st.st_mtime))
        )
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

    def forget(self, conn: _Conn) -> None:
        """``conn`` is closed or handed to aiohttp."""
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


def _open_blob(path: str | Path) -> tuple[Any, os.stat_result]:
    f = open(path, "rb", buffering=0)  # noqa: PTH123, SIM115 -- kept open across requests
    try:
        return f, os.fstat(f.fileno())
    except OSError:
        f.close()
        raise


def _close_later(entry: _Open) -> None:
    asyncio.get_running_loop().run_in_executor(None, entry.file.close)


async def _sendfile(transport: asyncio.Transport, file: Any, size: int, offset: int = 0) -> None:
    """Send the file up to ``size`` from ``offset``; pread (offsets of its own, the file is
    shared) if no sendfile."""
    loop = asyncio.get_running_loop()
    try:
        await loop.sendfile(transport, file, offset, size - offset, fallback=False)
        return
    except asyncio.SendfileNotAvailableError:
        pass
    fd = file.fileno()
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


class _Relay:
    """A blob the node lacks, written into the viewer's socket by the fetch's own callbacks.

    :meth:`wake` runs whenever the resolver's :class:`~peerd.delivery.resolver.Tee` changes
    (for R2, inside the upstream connection's ``data_received``), when the viewer's socket
    drains, and when it closes: it writes the head and every chunk the tee releases (the last
    only once the blob verified), so no task stands between the bucket's bytes and the viewer.
    :meth:`run` holds the connection meanwhile and settles the outcome.
    """

    def __init__(self, fast: FastPath, conn: _Conn, req: _Head, media: Any, started: float) -> None:
        self.fast = fast
        self.conn = conn
        self.req = req
        assert req.cid is not None
        self.cid = req.cid
        assert req.ext is not None
        self.ext = req.ext
        self.media = media
        self.started = started
        self.tee: Tee | None = None
        self.consumed = 0  # length of the request head in conn.buf
        self.i = 0  # chunks of the tee written
        self.sent = 0
        self.headed = False
        self.expired = False  # request_timeout_s passed before the first byte
        self.outcome: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def _settle(self, outcome: str) -> None:
        if not self.outcome.done():
            self.outcome.set_result(outcome)

    def _expire(self) -> None:
        if not self.headed and not self.outcome.done():
            self.expired = True
            self._settle("none")

    def wake(self) -> None:
        """Write what the tee has for the viewer now; settle once it is all written."""
        tee = self.tee
        if tee is None or self.outcome.done():
            return
        conn = self.conn
        transport = conn.transport
        if transport is None:
            self._settle("cut" if self.headed else "gone")
            return
        if not tee.streaming:
            if tee.done:  # a source that does not stream (peers): the stored file, or nothing
                self._settle("file" if tee.path is not None and tee.error is None else "none")
            return
        if tee.error is not None:
            self._settle("cut" if self.headed else "none")
            return
        if conn.write_paused:
            return
        n = tee.ready()
        assert tee.size is not None
        if not self.headed:
            if not n and not tee.done:
                return
            self.headed = True
            del conn.buf[: self.consumed]
            head = b"HTTP/1.1 200 OK\r\n%b%b\r\n" % (
                self.fast.miss_header(self.ext, tee.size),
                self.fast._date_line(),
            )
            first = tee.chunks[0] if n else b""
            transport.write(head + first)
            self.sent += len(first)
            self.i = 1 if n else 0
            # The first bytes are in the viewer's socket; the process that forwards them
            # (cloudflared, or a local player) was just woken, most likely onto this CPU, and
            # would otherwise wait while this loop receives, hashes and stores the rest.
            os.sched_yield()
            media = self.media
            if media is not None and self.fast.routes.prefetch_segments:
                media.remote = True
                self.fast.routes.fetch_ahead(media, self.cid)
        while self.i < n and not conn.write_paused:
            chunk = tee.chunks[self.i]
            transport.write(chunk)
            self.sent += len(chunk)
            self.i += 1
        if tee.done and self.i == len(tee.chunks):
            self._settle("tail" if self.sent < tee.size else "sent")

    async def run(self) -> None:
        """Hold the connection until the relay settles; account for it; hand off if unsent."""
        fast, conn, req = self.fast, self.conn, self.req
        routes = fast.routes
        tee = self.tee
        assert tee is not None
        cid = self.cid
        conn.waker = self.wake
        routes.streams += 1  # a fetch in progress holds a stream slot too, as on the full path
        fast.active.inc()
        loop = asyncio.get_running_loop()
        # Like the full path's timeout on the fetch: until the head goes out.
        timer = loop.call_later(routes.timeout_s, self._expire)
        outcome = "none"
        try:
            self.wake()  # a viewer joining a fetch under way catches up at once
            outcome = await self.outcome
            if outcome == "tail":
                # The store already held the blob and took no more bytes from the source:
                # the rest comes from the verified file.
                assert tee.path is not None
                assert tee.size is not None
                if conn.transport is None:
                    raise ConnectionResetError("viewer gone")
                entry = await fast._acquire(cid, self.ext, tee.path, None)
                try:
                    await _sendfile(conn.transport, entry.file, tee.size, self.sent)
                    self.sent = tee.size
                    outcome = "sent"
                finally:
                    fast._release(entry)
        except (ConnectionError, OSError, RuntimeError):
            outcome = "cut"
        finally:
            timer.cancel()
            tee.unwatch(self.wake)
            conn.waker = None
            routes.streams -= 1
            fast.active.dec()
        if outcome in ("sent", "cut", "gone"):
            if outcome != "sent":
                log.warning(
                    "blob relay cut",
                    extra={"cid": cid, "sent": self.sent, "error": repr(tee.error)},
                )
                if conn.transport is not None:
                    conn.transport.close()
            fast.account(cid, tee.source, self.sent, ok=outcome == "sent")
            fast.blob_ok.inc()
            fast.answered += 1
            fast.blob_time.observe(time.perf_counter() - self.started)
        elif outcome == "file":
            # Fetched whole and verified (from a peer): sent like a held blob, under the
            # source that delivered it.
            assert tee.path is not None
            try:
                st = tee.path.stat()  # noqa: ASYNC240 -- one stat, as in handle()
            except OSError:
                conn.missed.add(cid)
                return
            del conn.buf[: self.consumed]
            await fast._blob(conn, req, tee.path, st, self.started, tee.path_source)
        else:
            # Nothing sent: handled again, the request goes to the full path, which answers
            # from the fetch's outcome (404, 503) with its log line and counters; after a
            # timeout, at once (it does not wait on the same fetch a second time).
            conn.missed.add(cid)
            if self.expired and conn.transport is not None:
                routes.waited[conn.transport] = (cid, time.monotonic())


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
        self.scanned = 0  # bytes of buf known to hold no complete head
        self.busy = False
        self.write_paused = False
        self.read_paused = False
        self.closing = False
        self.idle: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.loads: set[str] = set()  # media ids this connection had loaded
        self.missed: set[str] = set()  # blobs a relay could not send: the full path's
        self.waker: Callable[[], None] | None = None  # a relay's, on drain and on close
        self.loop = asyncio.get_running_loop()  # the server calls the factory in its loop

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Start the keep-alive timer."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        tcp_keepalive(transport)
        self.fast.conns.add(self)
        self._arm_idle()

    def connection_lost(self, exc: Exception | None) -> None:
        """Forget the connection (a response being sent fails on its own)."""
        self.fast.forget(self)
        self._disarm_idle()
        self.transport = None
        if self.waker is not None:
            self.waker()

    def data_received(self, data: bytes) -> None:
        """Buffer, and answer what is complete unless a response is being sent."""
        self.buf += data
        if self.busy or self.write_paused:
            if len(self.buf) > _MAX_BUFFER and not self.read_paused and self.transport:
                self.transport.pause_reading()
                self.read_paused = True
            return
        self._process()

    def pause_writing(self) -> None:
        """The client reads slowly: stop answering pipelined requests."""
        self.write_paused = True

    def resume_writing(self) -> None:
        """Carry on with buffered requests."""
        self.write_paused = False
        if self.waker is not None:
            self.waker()
        if not self.busy:
            self._process()

    def close_when_idle(self) -> None:
        """Shutdown: close now if idle, else after the current response."""
        self.closing = True
        if not self.busy and self.transport is not None:
            self.transport.close()

    def _arm_idle(self) -> None:
        self._disarm_idle()
        self.idle = self.loop.call_later(self.fast.keepalive_timeout, self._idle_timeout)

    def _disarm_idle(self) -> None:
        if self.idle is not None:
            self.idle.cancel()
            self.idle = None

    def _idle_timeout(self) -> None:
        self.idle = None
        if not self.busy and self.transport is not None:
            self.transport.close()

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
            buf = self.buf
            # Scan only the new bytes (a head trickling in byte by byte stays linear).
            start = max(0, self.scanned - 3)
            end = buf.find(b"\r\n\r\n", start)
            if end < 0:
                # Bare LF line ends, or a head longer than any fast request: aiohttp's
                # parser decides (and applies its limits).
                if len(buf) > _MAX_BUFFER or buf.find(b"\n\n", start) >= 0:
                    self._handoff()
                    return
                self.scanned = len(buf)
                if self.idle is None:
                    # Idle since the last response: bytes trickling in do not extend it.
                    self._arm_idle()
                return
            self.scanned = 0
            self._disarm_idle()
            outcome = self.fast.handle(self, bytes(buf[:end]))
            if outcome is None:
                self._handoff()
                return
            if isinstance(outcome, _Relay):
                # The relay drops the head once it writes the answer; if it cannot, the head
                # is handled again (and goes to the full path).
                outcome.consumed = end + 4
                self.busy = True
                self.task = self.loop.create_task(self._run(outcome.run()))
                return
            if isinstance(outcome, _Load):
                # The media's manifest is being loaded: the head stays buffered and is
                # handled again afterwards (so the connection stays on the fast path).
                self.busy = True
                self.task = self.loop.create_task(self._run(outcome.coro))
                return
            del buf[: end + 4]
            if outcome is not True:
                assert not isinstance(outcome, bool)
                self.busy = True
                self.task = self.loop.create_task(self._run(outcome))
                return
        if not self.busy and self.transport is not None and self.idle is None:
            self._arm_idle()  # paused by a client that does not read: idle too

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
        self._disarm_idle()
        self.fast.forget(self)
        handler = self.fast.handler_factory()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.buf:
            data = bytes(self.buf)
            self.buf.clear()
            handler.data_received(data)
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        self.transport = None


class FastSite(web.TCPSite):
    """A TCP site whose connections start on the fast path (the runner's app has HLS routes)."""

    def __init__(self, runner: web.AppRunner, *args: Any, **kwargs: Any) -> None:
        super().__init__(runner, *args, **kwargs)
        server = runner.server
        assert server is not None, "runner.setup() first"
        kw = server._kwargs
        self.fast = FastPath(
            runner.app,
            server,
            keepalive_timeout=float(kw.get("keepalive_timeout", 3630.0)),
            max_line_size=int(kw.get("max_line_size", 8190)),
            max_field_size=int(kw.get("max_field_size", 8190)),
            max_headers=int(kw.get("max_headers", 32768)),
        )

    async def start(self) -> None:
        """Listen, with the fast path as the protocol factory."""
        self._runner._reg_site(self)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self.fast.protocol,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )

    async def stop(self) -> None:
        """Stop accepting; close idle fast-path connections, let busy ones finish (bounded)."""
        await super().stop()
        await self.fast.shutdown(float(getattr(self._runner, "_shutdown_timeout", 5.0)))


def site(runner: web.AppRunner, host: str, port: int, **kwargs: Any) -> web.TCPSite:
    """A :class:`FastSite` if the runner's app serves HLS, else a plain ``TCPSite``."""
    assert isinstance(runner.app, web.Application)
    if ROUTES_KEY in runner.app:
        return FastSite(runner, host, port, **kwargs)
    return web.TCPSite(runner, host, port, **kwargs)
