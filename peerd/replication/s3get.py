"""Object GETs from the bucket on a plain asyncio protocol: the read-through (cold-miss) path.

A viewer asking for a blob the node lacks waits on one GET to the bucket. Through aiohttp's
client the first body bytes reached the resolver only after a task hop per layer (response
start, stream reader, the reader's waiter); here the connection's own ``data_received`` hands
every chunk straight to a *tap* (the resolver's tee, which writes it into the viewers' sockets
in the same callback) and queues it for the async consumer (the store)::

    socket ─► _GetProtocol.data_received ─► head parsed ─► GetPool.get() returns GetResponse
                                          └► body bytes ─► tap(chunk)      (synchronous)
                                                        └► queue ─► async for chunk in resp

Scope, kept narrow on purpose: GET only, HTTP/1.1, bodies framed by ``Content-Length`` (S3 and
R2 always send one for an object; a success without one is refused, an error without one is
read no further and its connection closed). Connections are kept alive and reused (at most
``limit`` open at once); a reused connection that fails before any byte of the answer (the
server closed it while idle) is retried once on a new one, which is safe for a GET.

Flow control: the queue holds at most ``HIGH_WATER`` bytes the consumer has not taken; past that
the socket stops reading until the consumer catches up (the tap sees bytes as they arrive, so a
slow store slows the upstream read but the tee's viewers keep what they were sent).

Timeouts: ``connect_timeout_s`` for the TCP (and TLS) set-up; ``read_timeout_s`` between any two
arrivals of bytes while an answer is awaited or read. A timeout or a cut connection fails the
waiting call or the body iterator with :class:`GetError`; the connection is never reused.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
from collections.abc import Callable
from dataclasses import dataclass

HIGH_WATER = 4 * 1024 * 1024
LOW_WATER = 1024 * 1024
MAX_HEAD = 64 * 1024
ERROR_BODY_MAX = 4096

Tap = Callable[[bytes], None]


class GetError(Exception):
    """The GET failed below HTTP: connect, timeout, cut connection, malformed answer."""


@dataclass(frozen=True)
class Endpoint:
    """Where the bucket's server is: scheme, host, port, and the Host header to send."""

    tls: bool
    host: str
    port: int
    authority: str

    @classmethod
    def parse(cls, url: str) -> Endpoint:
        """``http(s)://host[:port]`` (a path after the authority is ignored)."""
        scheme, sep, rest = url.partition("://")
        if not sep or scheme not in ("http", "https"):
            raise ValueError(f"not an http(s) URL: {url!r}")
        authority = rest.split("/", 1)[0]
        tls = scheme == "https"
        host, port = authority, 443 if tls else 80
        if authority.startswith("["):  # [v6]:port
            end = authority.index("]")
            host = authority[1:end]
            if authority[end + 1 :].startswith(":"):
                port = int(authority[end + 2 :])
        elif ":" in authority:
            host, p = authority.rsplit(":", 1)
            port = int(p)
        return cls(tls, host, port, authority)


class GetResponse:
    """One answer: status and headers at once; the body as a tap and an async iterator.

    Iterate it (``async for chunk in resp``) or :meth:`read` it, then :meth:`release` it
    (a body read to its end returns the connection to the pool) or :meth:`close` it.
    """

    def __init__(self, conn: _GetProtocol, status: int, headers: dict[str, str]) -> None:
        self._conn = conn
        self.status = status
        self.headers = headers  # lower-case names; repeated headers joined with ", "
        cl = headers.get("content-length", "")
        self.length: int | None = int(cl) if cl.isdigit() else None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._received = 0
        self._tap: Tap | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._eof = self.length == 0
        self._done = False  # released or closed

    # -- fed by the protocol ---------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        self._received += len(data)
        if self._tap is not None:
            self._tap(data)
        self._chunks.append(data)
        self._queued += len(data)
        if self._queued > HIGH_WATER:
            self._conn.pause()
        self._wake()

    def _end(self, error: BaseException | None) -> None:
        if error is not None:
            if self._error is None and not self._eof:
                self._error = error
        else:
            self._eof = True
        self._wake()

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    # -- consumer side ---------------------------------------------------------------------

    @property
    def received(self) -> int:
        """Body bytes that arrived so far."""
        return self._received

    def tap(self, fn: Tap) -> None:
        """Call ``fn`` with every body chunk as it arrives, starting with those already here.

        Called from the connection's callback: ``fn`` must not block or raise. The iterator
        still yields every chunk.
        """
        self._tap = fn
        for chunk in self._chunks:
            fn(chunk)

    def __aiter__(self) -> GetResponse:
        return self

    async def __anext__(self) -> bytes:
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._eof:
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        chunk = self._chunks.popleft()
        self._queued -= len(chunk)
        if self._queued < LOW_WATER:
            self._conn.resume()
        return chunk

    async def read(self, limit: int) -> bytes:
        """Up to ``limit`` bytes of the body (for error answers); the rest is not awaited."""
        out = bytearray()
        async for chunk in self:
            out += chunk
            if len(out) >= limit:
                break
        return bytes(out[:limit])

    def release(self) -> None:
        """Done with the answer: the connection is reused if its body was read to the end."""
        if self._done:
            return
        self._done = True
        self._tap = None
        if self._eof and not self._chunks and self._error is None:
            self._conn.finished(self)
        else:
            self._conn.abort()

    def close(self) -> None:
        """Done with the answer, whatever was read: the connection is closed."""
        if self._done:
            return
        self._done = True
        self._tap = None
        self._conn.abort()


class _GetProtocol(asyncio.Protocol):
    """One connection: sends a request, parses the answer's head, frames its body."""

    def __init__(self, pool: GetPool) -> None:
        self.pool = pool
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.head_waiter: asyncio.Future[GetResponse] | None = None
        self.resp: GetResponse | None = None
        self.left = 0  # body bytes still expected
        self.answered = False  # any byte of the current answer arrived
        self.reusable = True
        self.closed = False
        self.paused = False
        self.last_rx = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.used = 0  # requests sent on this connection
        self.read_timeout_s = 0.0
        self.timed_out = False  # the server stayed silent past the read timeout
        self.pool_slot = False  # holds one of the pool's slots (until its answer is done)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail whatever waits on this connection."""
        self.closed = True
        self.pool._forget(self)
        self._disarm()
        err = GetError(f"connection closed by the server ({exc or 'EOF'})")
        self._fail(err)

    def eof_received(self) -> bool | None:
        """The server finished sending: a body framed by Content-Length cannot be complete."""
        return None  # close the transport; connection_lost reports it

    # -- request ---------------------------------------------------------------------------

    def send(self, request: bytes, read_timeout_s: float) -> asyncio.Future[GetResponse]:
        assert self.transport is not None
        self.used += 1
        self.answered = False
        self.head_waiter = self.loop.create_future()
        self.read_timeout_s = read_timeout_s
        self.last_rx = self.loop.time()
        self._arm()
        self.transport.write(request)
        return self.head_waiter

    # -- answer ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Parse the head, then hand body bytes to the response."""
        self.last_rx = self.loop.time()
        self.answered = True
        if self.resp is not None and self.head_waiter is None:
            self._body(data)
            return
        if self.head_waiter is None:  # bytes nobody asked for
            self.reusable = False
            self.abort()
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self._fail(GetError("answer head too large"))
                self.abort()
            return
        head = bytes(self.buf[:end])
        rest = bytes(self.buf[end + 4 :])
        self.buf.clear()
        try:
            resp = self._parse_head(head)
        except (ValueError, UnicodeDecodeError) as exc:
            self._fail(GetError(f"malformed answer head: {exc}"))
            self.abort()
            return
        waiter = self.head_waiter
        self.head_waiter = None
        self.resp = resp
        if resp.length is None:
            # Unframed (chunked or read-to-close): never reused, body not offered.
            self.reusable = False
            self.left = 0
            resp._end(GetError("answer without a Content-Length"))
        else:
            self.left = resp.length
            if not self.left:
                self._disarm()
        if not waiter.done():
            waiter.set_result(resp)
        if rest and resp.length is not None:
            self._body(rest)

    def _parse_head(self, head: bytes) -> GetResponse:
        lines = head.decode("latin-1").split("\r\n")
        version, _, rest = lines[0].partition(" ")
        if not version.startswith("HTTP/1."):
            raise ValueError(lines[0][:80])
        status = int(rest[:3])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                raise ValueError("header line without a colon")
            key = name.strip().lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        conn = headers.get("connection", "").lower()
        if version == "HTTP/1.0" or "close" in conn:
            self.reusable = False
        if "transfer-encoding" in headers:
            headers.pop("content-length", None)  # RFC 9112: chunked framing wins
        return GetResponse(self, status, headers)

    def _body(self, data: bytes) -> None:
        resp = self.resp
        assert resp is not None
        if len(data) > self.left:
            # Bytes past the announced length: the body is complete, the connection is not
            # trustworthy any more.
            self.reusable = False
            data = data[: self.left]
        if not data:
            return
        self.left -= len(data)
        resp._feed(data)
        if not self.left:
            self._disarm()
            resp._end(None)

    # -- flow control, timeouts, end -------------------------------------------------------

    def pause(self) -> None:
        if not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
            self.last_rx = self.loop.time()

    def _arm(self) -> None:
        if self.timer is None:
            self.timer = self.loop.call_at(self.last_rx + self.read_timeout_s, self._timed)

    def _disarm(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _timed(self) -> None:
        # One timer per connection, moved on lazily (no cancel and re-arm per chunk).
        self.timer = None
        due = self.last_rx + self.read_timeout_s
        if self.paused or due > self.loop.time():
            if self.paused:
                self.last_rx = self.loop.time()
            self._arm()
            return
        self.timed_out = True
        self._fail(GetError(f"no answer bytes for {self.read_timeout_s:g} s"))
        self.abort()

    def _fail(self, err: BaseException) -> None:
        w = self.head_waiter
        self.head_waiter = None
        if w is not None and not w.done():
            w.set_exception(err)
        if self.resp is not None:
            self.resp._end(err)

    def finished(self, resp: GetResponse) -> None:
        """The response was read to its end and released."""
        self.resp = None
        if self.reusable and not self.closed and self.transport is not None:
            self._disarm()
            self.pool._idle_again(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.reusable = False
        self._disarm()
        if self.transport is not None and not self.closed:
            self.transport.abort()
        self.pool._forget(self)


class GetPool:
    """Keep-alive connections to one endpoint and signed-elsewhere GETs on them."""

    def __init__(
        self,
        endpoint: str,
        *,
        limit: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        ssl_context: ssl.SSLContext | None = None,
        spare: bool = False,
    ) -> None:
        """``spare``: keep one connection open and unused for the next GET
        (:meth:`_keep_warm`)."""
        self.endpoint = Endpoint.parse(endpoint)
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._ssl = (ssl_context or ssl.create_default_context()) if self.endpoint.tls else None
        self._idle: list[_GetProtocol] = []
        self._open: set[_GetProtocol] = set()
        self._slots = asyncio.Semaphore(limit)
        self._limit = limit
        self._spare = spare
        self._warming: asyncio.Task[None] | None = None
        self._closed = False
        self.connects = 0  # connections opened (tests check reuse)

    @property
    def authority(self) -> str:
        """The value of the Host header for this endpoint."""
        return self.endpoint.authority

    async def get(self, target: str, headers: dict[str, str]) -> GetResponse:
        """Send ``GET target`` with ``headers`` (already signed); the answer once its head is in.

        Raises :class:`GetError` for anything below HTTP. The caller releases or closes the
        answer, which frees its slot.
        """
        if self._closed:
            raise GetError("the connection pool is closed")
        request = (
            f"GET {target} HTTP/1.1\r\n"
            + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
            + "\r\n"
        ).encode("latin-1")
        await self._slots.acquire()
        try:
            conn = self._take_idle()
            self._keep_warm()
            if conn is not None:
                try:
                    return self._own(await self._ask(conn, request))
                except GetError:
                    if conn.answered or conn.timed_out:
                        raise
                    # Closed by the server while idle (no byte of an answer came): once more
                    # on a new connection. (A connection that stayed silent is not retried:
                    # that would double the read timeout.)
            if self._closed:
                # Its connection was aborted by close(): no new one on a closed pool.
                raise GetError("the connection pool is closed")
            conn = await self._connect()
            return self._own(await self._ask(conn, request))
        except BaseException:
            self._slots.release()
            raise

    async def _ask(self, conn: _GetProtocol, request: bytes) -> GetResponse:
        try:
            return await conn.send(request, self.read_timeout_s)
        except BaseException:
            # Cancelled (the caller's timeout) or failed while the answer was awaited: the
            # connection would get an answer nobody reads; it is never reused.
            conn.abort()
            raise

    def _keep_warm(self) -> None:
        """Open a spare connection in the background when none is idle.

        The next GET then finds one ready and does not wait for TCP (and TLS) set-up: a cold
        miss's first byte pays only the bucket's answer. Against a server that closes every
        connection after one answer (moto), the spare is the only reuse there is. Started only
        by a GET (never in a loop on its own), so a dead endpoint costs one failed connect
        per request at most.
        """
        if (
            not self._spare
            or self._closed
            or self._idle
            or self._warming is not None
            or len(self._open) >= self._limit
        ):
            return
        self._warming = asyncio.get_running_loop().create_task(self._warm())

    async def _warm(self) -> None:
        try:
            conn = await self._connect()
        except GetError:
            return  # the GET that needs it will connect, and report the failure
        finally:
            self._warming = None
        if self._closed:
            conn.abort()
        else:
            self._idle.append(conn)

    def _own(self, resp: GetResponse) -> GetResponse:
        # The slot is freed when the answer is released or closed (or its connection ends).
        resp._conn.pool_slot = True
        return resp

    def _take_idle(self) -> _GetProtocol | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self) -> _GetProtocol:
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                _, proto = await loop.create_connection(
                    lambda: _GetProtocol(self),
                    ep.host,
                    ep.port,
                    ssl=self._ssl,
                    server_hostname=ep.host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise GetError(f"connect to {ep.authority} timed out") from None
        except OSError as exc:
            raise GetError(f"connect to {ep.authority} failed: {exc}") from exc
        self.connects += 1
        self._open.add(proto)
        return proto

    def _idle_again(self, conn: _GetProtocol) -> None:
        self._free_slot(conn)
        if self._closed:
            conn.abort()
            return
        self._idle.append(conn)

    def _forget(self, conn: _GetProtocol) -> None:
        self._free_slot(conn)
        self._open.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    def _free_slot(self, conn: _GetProtocol) -> None:
        if conn.pool_slot:
            conn.pool_slot = False
            self._slots.release()

    async def close(self) -> None:
        """Close every connection."""
        self._closed = True
        if self._warming is not None:
            self._warming.cancel()
            await asyncio.gather(self._warming, return_exceptions=True)
        for conn in list(self._open):
            conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports' connection_lost run
