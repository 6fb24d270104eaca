"""An HTTP/1.1 proxy that injects faults between peerd and an S3 server, scripted per request.

Each request from the client is parsed (head and body), matched against the rules in order, and
either forwarded to the upstream on a fresh connection or answered with a fault:

``status``    answer with an HTTP error (e.g. 500), the request never reaches the server
``slowdown``  answer 503 with S3's ``SlowDown`` error body
``stall``     say nothing for ``seconds``, then close (the client's read timeout fires)
``cut_request``  close the connection after reading half of the request body
``cut``       forward, then send the response head and ``fraction`` of its body, and close
``truncate``  forward, then send a *shorter but self-consistent* response (Content-Length
              rewritten), keeping the connection: only a hash check can notice
``drop``      forward (the server acts on it), then close without answering

``latency_s`` puts a long link between the client and the server: every request reaches the
server half of it later and every answer reaches the client half of it later, and the first
request on a new connection waits one more ``latency_s`` for the TCP handshake (so a kept-alive
connection saves a round trip, as it does across a WAN). The kernel here has no netem.

Every request is recorded in :attr:`FaultProxy.log` as ``(method, path, fault name or "ok")``.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


@dataclass
class ProxyRequest:
    """A request as the rules see it."""

    method: str
    path: str
    headers: dict[str, str]
    index: int


@dataclass(frozen=True)
class Fault:
    """What to do to a matching request (see the module doc)."""

    kind: str
    status: int = 500
    seconds: float = 0.0
    fraction: float = 0.5


@dataclass
class Rule:
    """Apply ``fault`` to the next ``times`` requests that ``match``."""

    match: Callable[[ProxyRequest], bool]
    fault: Fault
    times: int = 1


def method_is(method: str, path_part: str = "") -> Callable[[ProxyRequest], bool]:
    """A matcher on method and a substring of the path."""
    return lambda r: r.method == method and path_part in r.path


@dataclass
class FaultProxy:
    """The proxy. ``start()``, point the client at :attr:`url`, add rules, ``stop()``."""

    upstream_host: str
    upstream_port: int
    rules: list[Rule] = field(default_factory=list)
    latency_s: float = 0.0
    log: list[tuple[str, str, str]] = field(default_factory=list)
    clients: list[str] = field(default_factory=list)  # the client's address of each log entry
    host: str = "127.0.0.1"
    port: int = 0
    _server: asyncio.Server | None = None
    _count: int = 0
    _conns: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)
    _closing: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        """Where clients connect."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> FaultProxy:
        """Listen on a free port of :attr:`host` (loopback unless set)."""
        self._server = await asyncio.start_server(self._handle, self.host, 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        """Stop listening and close client connections."""
        if self._server is not None:
            self._server.close()
            self._closing.set()
            for w in list(self._writers):
                w.close()
            # Handlers end on their own once their sockets close (cancelling them would make
            # asyncio's stream callback log the cancellation as an error).
            await asyncio.gather(*list(self._conns), return_exceptions=True)
            await self._server.wait_closed()
            self._server = None

    def add(self, match: Callable[[ProxyRequest], bool], fault: Fault, times: int = 1) -> None:
        """Add a rule."""
        self.rules.append(Rule(match, fault, times))

    def count(self, method: str, path_part: str = "") -> int:
        """Requests seen with ``method`` whose path contains ``path_part``."""
        return sum(1 for m, p, _ in self.log if m == method and path_part in p)

    def _pick(self, req: ProxyRequest) -> Fault | None:
        for rule in self.rules:
            if rule.times > 0 and rule.match(req):
                rule.times -= 1
                return rule.fault
        return None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self._writers.add(writer)
        accepted = asyncio.get_running_loop().time()
        try:
            while await self._one(reader, writer, accepted):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._conns.discard(task)
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _lag(self, until: float) -> None:
        delay = until - asyncio.get_running_loop().time()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)

    async def _one(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, accepted: float
    ) -> bool:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return False
        lines = head.decode("latin-1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        self._count += 1
        req = ProxyRequest(method, path, headers, self._count)
        fault = self._pick(req)
        self.log.append((method, path, fault.kind if fault else "ok"))
        self.clients.append(str((writer.get_extra_info("peername") or ("",))[0]))
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
        length = int(headers.get("content-length", "0") or 0)
        if fault is not None and fault.kind == "cut_request":
            await reader.readexactly(length // 2)
            return False
        body = await reader.readexactly(length) if length else b""
        if fault is not None and fault.kind in ("status", "slowdown"):
            status = 503 if fault.kind == "slowdown" else fault.status
            payload = SLOWDOWN_BODY if fault.kind == "slowdown" else b""
            writer.write(
                f"HTTP/1.1 {status} Fault\r\nContent-Type: application/xml\r\n"
                f"Content-Length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            return True
        if fault is not None and fault.kind == "stall":
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), fault.seconds)
            return False
        if self.latency_s:
            now = asyncio.get_running_loop().time()
            await self._lag(max(now, accepted + self.latency_s) + self.latency_s / 2)
        status_line, resp_headers, resp_body = await self._forward(lines, body)
        if fault is not None and fault.kind == "drop":
            return False
        if method == "HEAD":
            resp_body = b""
        if fault is not None and fault.kind == "truncate":
            keep = int(len(resp_body) * fault.fraction)
            resp_body = resp_body[:keep]
            resp_headers = [
                (k, str(keep) if k.lower() == "content-length" else v) for k, v in resp_headers
            ]
        out = status_line + "\r\n"
        for k, v in resp_headers:
            if k.lower() in ("connection", "transfer-encoding"):
                continue
            out += f"{k}: {v}\r\n"
        out += "\r\n"
        if self.latency_s:
            await self._lag(asyncio.get_running_loop().time() + self.latency_s / 2)
        writer.write(out.encode("latin-1"))
        if fault is not None and fault.kind == "cut":
            await _write_chunked(writer, resp_body[: int(len(resp_body) * fault.fraction)])
            return False
        await _write_chunked(writer, resp_body)
        return True

    async def _forward(
        self, lines: list[str], body: bytes
    ) -> tuple[str, list[tuple[str, str]], bytes]:
        up_r, up_w = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        try:
            out = lines[0] + "\r\n"
            for line in lines[1:]:
                if not line:
                    continue
                k = line.split(":", 1)[0].strip().lower()
                if k in ("connection", "expect"):
                    continue
                out += line + "\r\n"
            out += "Connection: close\r\n\r\n"
            up_w.write(out.encode("latin-1"))
            await _write_chunked(up_w, body)
            raw = await up_r.readuntil(b"\r\n\r\n")
            framed = re.search(rb"\r\ncontent-length: *(\d+)\r\n", raw.lower())
            if lines[0].startswith("HEAD ") or raw[9:12] in (b"204", b"304"):
                pass
            elif framed is not None and b"\r\ntransfer-encoding:" not in raw.lower():
                # Not read to EOF: moto closes its side ~10 ms after the last byte.
                raw += await up_r.readexactly(int(framed.group(1)))
            else:
                raw += await up_r.read()
        finally:
            up_w.close()
            with contextlib.suppress(Exception):
                await up_w.wait_closed()
        head, _, rest = raw.partition(b"\r\n\r\n")
        hl = head.decode("latin-1").split("\r\n")
        headers = []
        chunked = False
        for line in hl[1:]:
            k, _, v = line.partition(":")
            headers.append((k.strip(), v.strip()))
            if k.strip().lower() == "transfer-encoding" and "chunked" in v.lower():
                chunked = True
        if chunked:
            rest = _dechunk(rest)
            headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
            headers.append(("Content-Length", str(len(rest))))
        elif not any(k.lower() == "content-length" for k, _ in headers):
            headers.append(("Content-Length", str(len(rest))))
        return hl[0], headers, rest


async def _write_chunked(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Write in slices, draining between them, so no loop step copies megabytes at once."""
    view = memoryview(data)
    for i in range(0, len(view), 1 << 18):
        writer.write(view[i : i + (1 << 18)])
        await writer.drain()


def _dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        n = int(size_line.split(b";")[0] or b"0", 16)
        if n == 0:
            break
        out += data[:n]
        data = data[n + 2 :]
    return bytes(out)
