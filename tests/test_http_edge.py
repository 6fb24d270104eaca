"""The HTTP edge of a real daemon under hostile clients, on raw sockets: slowloris (heads that
never end), connections past ``[http] max_connections``, idle keep-alive connections, and
malformed requests (a bounded number of log lines, no traceback, no token in the log).

Deadlines are upper bounds for hangs, never timings: a closed connection is waited for, and which
timer closed it is read from ``peerd_http_connections_closed_total``."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from peerd.config import load_settings
from peerd.core import tokens
from peerd.runtime import open_runtime
from tests.support.hlsmedia import import_hls, make_hls, read_hls
from tests.support.poll import until
from tests.support.process import PeerdProcess

CAP = 40


@pytest.fixture(scope="module")
def playlist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MPEG-TS rendition, made once."""
    return make_hls(tmp_path_factory.mktemp("edgemedia") / "ts", "ts", seconds=2)


class Daemon:
    """A started daemon with one media item, and a signed playlist path for it."""

    def __init__(self, proc: PeerdProcess, media_id: str) -> None:
        self.proc = proc
        key = (proc.state_dir / "secrets" / "hls_signing_key").read_text().strip().encode()
        token = tokens.mint(key, media_id, "hls", int(time.time()) + 3600)
        self.playlist = f"/hls/{media_id}/v0.m3u8?token={token}"

    @property
    def addr(self) -> tuple[str, int]:
        """Host and port."""
        return self.proc.host, self.proc.port

    async def closed_count(self, reason: str) -> float:
        """``peerd_http_connections_closed_total{reason}`` now."""
        async with aiohttp.ClientSession() as s, s.get(self.proc.base_url + "/metrics") as r:
            text = await r.text()
        m = re.search(
            rf'^peerd_http_connections_closed_total\{{reason="{reason}"\}} (\S+)$', text, re.M
        )
        return float(m.group(1)) if m else 0.0

    async def served(self, path: str) -> bool:
        """Whether a normal client (new connection) gets a 200 for ``path``."""
        timeout = aiohttp.ClientTimeout(total=30)
        async with (
            aiohttp.ClientSession(timeout=timeout) as s,
            s.get(self.proc.base_url + path) as r,
        ):
            await r.read()
            return r.status == 200


async def _seed(state_dir: Path, playlist: Path) -> str:
    rt = await open_runtime(load_settings(None, node={"state_dir": state_dir}))
    try:
        media_id, _ = await import_hls(rt, read_hls(playlist))
    finally:
        await rt.close()
    return media_id


@pytest.fixture
def daemon_factory() -> Iterator[list[Daemon]]:
    """Daemons a test started, stopped after it."""
    started: list[Daemon] = []
    yield started
    for d in started:
        d.proc.stop()


async def _start(
    tmp: Path, playlist: Path, http: dict[str, object], started: list[Daemon]
) -> Daemon:
    proc = PeerdProcess(tmp / "node", config={"http": http, "log": {"level": "info"}})
    await asyncio.to_thread(proc.init)
    media_id = await _seed(proc.state_dir, playlist)
    d = Daemon(proc, media_id)
    started.append(d)
    await asyncio.to_thread(proc.start)
    return d


class Slow:
    """A slowloris connection: a head begun, then one byte at a time, never finished."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.closed = False
        self.task = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        try:
            while await self.reader.read(4096):
                pass
        except ConnectionError:
            pass
        self.closed = True

    def trickle(self) -> None:
        """Send one more byte of the head (if the connection is still open)."""
        if not self.closed and not self.writer.is_closing():
            self.writer.write(b"X")

    async def close(self) -> None:
        self.task.cancel()
        self.writer.close()


async def _slowloris(addr: tuple[str, int], n: int, first: bytes) -> list[Slow]:
    conns = []
    for _ in range(n):
        r, w = await asyncio.open_connection(*addr)
        if first:
            w.write(first)
        conns.append(Slow(r, w))
    return conns


async def test_slowloris_closed_after_header_timeout_and_normal_client_served(
    tmp_path: Path, playlist: Path, daemon_factory: list[Daemon]
) -> None:
    # keep-alive is long: only the header timeout can close the slow connections in time.
    d = await _start(
        tmp_path,
        playlist,
        {"header_timeout_s": 1.0, "keepalive_timeout_s": 120.0, "max_connections": CAP},
        daemon_factory,
    )
    # Past the cap: some begin a head and trickle it, some send nothing at all.
    attack = await _slowloris(d.addr, CAP, b"GET /healthz HTTP/1.1\r\nHost: node\r\n")
    attack += await _slowloris(d.addr, CAP // 2 - 2, b"")
    # Heads too long for the fast path's parser (handed to aiohttp before their end).
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 4000) for i in range(5))
    attack += await _slowloris(d.addr, 2, b"GET /healthz HTTP/1.1\r\nHost: node\r\n" + pad)
    stop = asyncio.Event()

    async def trickle() -> None:
        while not stop.is_set():
            for c in attack[:CAP]:
                c.trickle()
            await asyncio.sleep(0.2)

    trickler = asyncio.ensure_future(trickle())
    try:
        # During the attack, on new connections: the fast path and aiohttp both answer.
        assert await d.served(d.playlist)
        assert await d.served("/healthz")
        await until(lambda: all(c.closed for c in attack), timeout_s=60, step_s=0.1)
    finally:
        stop.set()
        await trickler
        for c in attack:
            await c.close()
    assert await d.served(d.playlist)
    assert await d.closed_count("header_timeout") >= 1
    assert await d.closed_count("shed") >= CAP // 2  # the attack went CAP // 2 past the cap


async def test_connections_past_the_cap_leave_room_for_a_normal_client(
    tmp_path: Path, playlist: Path, daemon_factory: list[Daemon]
) -> None:
    d = await _start(
        tmp_path,
        playlist,
        {"header_timeout_s": 2.0, "keepalive_timeout_s": 120.0, "max_connections": CAP},
        daemon_factory,
    )
    # Twice the cap of connections that never send a byte: each newcomer sheds the oldest.
    attack = await _slowloris(d.addr, 2 * CAP, b"")
    try:
        await until(lambda: sum(not c.closed for c in attack) <= CAP, timeout_s=60, step_s=0.05)
        await until(lambda: all(c.closed for c in attack), timeout_s=60, step_s=0.1)
    finally:
        for c in attack:
            await c.close()
    assert await d.served(d.playlist)
    assert await d.served("/readyz")


async def test_idle_keepalive_closed_and_a_next_head_has_the_header_timeout(
    tmp_path: Path, playlist: Path, daemon_factory: list[Daemon]
) -> None:
    d = await _start(
        tmp_path,
        playlist,
        {"header_timeout_s": 1.0, "keepalive_timeout_s": 3.0, "max_connections": CAP},
        daemon_factory,
    )
    request = f"GET {d.playlist} HTTP/1.1\r\nHost: node\r\n\r\n".encode()

    async def answered(first: bytes) -> Slow:
        r, w = await asyncio.open_connection(*d.addr)
        w.write(request)
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)
        assert head.startswith(b"HTTP/1.1 200 ")
        length = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
        await asyncio.wait_for(r.readexactly(length), 30)
        if first:
            w.write(first)
        return Slow(r, w)

    # Idle after a response: closed by the keep-alive timer.
    idle_before = await d.closed_count("idle_timeout")
    conn = await answered(b"")
    await until(lambda: conn.closed, timeout_s=60, step_s=0.05)
    await conn.close()
    assert await d.closed_count("idle_timeout") == idle_before + 1
    # A next head begun after a response and never finished: closed by the header timer.
    head_before = await d.closed_count("header_timeout")
    conn = await answered(b"GET / HTTP/1.1\r\nHo")
    await until(lambda: conn.closed, timeout_s=60, step_s=0.05)
    await conn.close()
    assert await d.closed_count("header_timeout") == head_before + 1
    # aiohttp's connections (here after a request the fast path hands over) close when idle too.
    r, w = await asyncio.open_connection(*d.addr)
    w.write(b"GET /healthz HTTP/1.1\r\nHost: node\r\n\r\n")
    assert (await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)).startswith(b"HTTP/1.1 200 ")
    aio = Slow(r, w)
    await until(lambda: aio.closed, timeout_s=60, step_s=0.05)
    await aio.close()


# Heads aiohttp refuses (bare LF, unknown version, TLS on the HTTP port), ~19 bytes each.
GARBAGE = (
    b"GET / HTTP/1.1\nX\n\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
)


async def _exchange(addr: tuple[str, int], data: bytes) -> bytes:
    """Send ``data`` on a new connection; what comes back until the server closes it."""
    r, w = await asyncio.open_connection(*addr)
    try:
        w.write(data)
        return await asyncio.wait_for(r.read(), 30)
    finally:
        w.close()


async def test_malformed_requests_log_a_few_lines_without_traceback_or_token(
    tmp_path: Path, playlist: Path, daemon_factory: list[Daemon]
) -> None:
    d = await _start(tmp_path, playlist, {}, daemon_factory)
    answers: list[bytes] = []

    async def worker(k: int) -> None:
        for i in range(50):
            answers.append(await _exchange(d.addr, GARBAGE[(k + i) % len(GARBAGE)]))

    await asyncio.gather(*(worker(k) for k in range(20)))
    assert len(answers) == 1000
    assert all(a.split(b" ", 2)[1] == b"400" for a in answers)
    # Over-long request lines (and a bad header after credentials), with secrets in them.
    secret_paths = [
        f"/hls/{'b' * 59}/v0.m3u8?token=SECRETTOKEN{'a' * 9000}",
        f"/x?token=SECRETTOKEN&{'a' * 9000}",
    ]
    for path in secret_paths:
        answer = await _exchange(d.addr, f"GET {path} HTTP/1.1\r\nHost: node\r\n\r\n".encode())
        assert b" 400 " in answer.split(b"\r\n", 1)[0]
    answer = await _exchange(
        d.addr,
        b"GET /a?token=SECRETTOKEN HTTP/1.1\r\nAuthorization: Bearer SECRETBEARER\r\n"
        b"Cf-Access-Jwt-Assertion: eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.SECRETSIG\r\n"
        b"Bad Header\r\n\r\n",
    )
    assert b" 400 " in answer.split(b"\r\n", 1)[0]
    async with aiohttp.ClientSession() as s, s.get(d.proc.base_url + "/metrics") as r:
        metrics = await r.text()
    counted = sum(
        float(v)
        for v in re.findall(r"^peerd_http_malformed_requests_total\{[^}]*\} (\S+)$", metrics, re.M)
    )
    assert counted >= 1003
    # Off the loop: a daemon's shutdown takes over a second on a busy machine.
    assert await asyncio.to_thread(d.proc.stop) == 0
    logs = d.proc.logs()
    about = [line for line in logs.splitlines() if "aiohttp" in line or "malformed" in line]
    assert len(about) <= 8, "\n".join(about[:20])
    assert "Traceback" not in logs
    assert '"level":"error"' not in logs
    assert "SECRET" not in logs


async def test_a_long_head_relayed_to_aiohttp_is_served_and_kept_alive(
    tmp_path: Path, playlist: Path, daemon_factory: list[Daemon]
) -> None:
    d = await _start(tmp_path, playlist, {"header_timeout_s": 30.0}, daemon_factory)
    pad = b"".join(b"X-Pad-%d: %s\r\n" % (i, b"a" * 4000) for i in range(5))
    r, w = await asyncio.open_connection(*d.addr)
    try:
        # Past the fast path's 16 KiB before its end, in two writes; then a second request.
        w.write(b"GET /healthz HTTP/1.1\r\nHost: node\r\n" + pad)
        await w.drain()
        await asyncio.sleep(0.1)  # two reads on the server side, most of the time
        w.write(b"X-Last: 1\r\n\r\n")
        for _ in range(2):
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 30)
            assert head.startswith(b"HTTP/1.1 200 ")
            n = int(re.search(rb"Content-Length: (\d+)", head, re.I).group(1))  # type: ignore[union-attr]
            await asyncio.wait_for(r.readexactly(n), 30)
            w.write(b"GET /healthz HTTP/1.1\r\nHost: node\r\n\r\n")
    finally:
        w.close()
