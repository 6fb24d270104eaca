"""HTTP worker processes (``http.workers = 2``) with a real daemon.

The kernel spreads new connections over both processes (SO_REUSEPORT); every request here opens
a new connection, and the ``X-Peerd-Worker`` mark shows which process did the work. Whatever
process answers, the behaviour must be the same: the HLS hot path is served by the worker with
the daemon's code, everything else is relayed to the daemon.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import aiohttp
import pytest

from peerd.config import load_settings
from peerd.core import tokens
from peerd.core.ids import Cid, cid_of, shard_of
from peerd.http.server import INTERNAL_SOCKET
from peerd.runtime import open_runtime
from peerd.testing.hlsmedia import import_hls, make_hls, read_hls
from peerd.testing.process import PeerdProcess

pytestmark = pytest.mark.timeout(180)

ROUNDS = 24


@pytest.fixture(scope="module")
def playlist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny fMP4 rendition (4 s, 160x120)."""
    return make_hls(tmp_path_factory.mktemp("wmedia") / "fmp4", "fmp4", seconds=4, size="160x120")


class Node:
    """A daemon with two HTTP processes and one imported media item."""

    def __init__(self, proc: PeerdProcess, media_id: str, key: bytes, api_token: str) -> None:
        self.proc = proc
        self.media_id = media_id
        self.key = key
        self.api_token = api_token

    def token(self) -> str:
        """A valid viewer token for the media."""
        return tokens.mint(self.key, self.media_id, "hls", int(time.time()) + 600)

    def api_node(
        self, session: aiohttp.ClientSession
    ) -> AbstractAsyncContextManager[aiohttp.ClientResponse]:
        """``GET /api/v1/node`` with the node's API token (a context manager, as ``get``)."""
        return session.get(
            self.proc.base_url + "/api/v1/node",
            headers={"Authorization": f"Bearer {self.api_token}"},
        )

    def url(self, path: str, token: str | None) -> str:
        """A URL under the media's HLS tree."""
        q = f"?token={token}" if token is not None else ""
        return f"{self.proc.base_url}/hls/{self.media_id}/{path}{q}"


async def _import(state: Path, playlist: Path) -> str:
    settings = load_settings(None, node={"state_dir": state})
    rt = await open_runtime(settings)
    try:
        media_id, _ = await import_hls(rt, read_hls(playlist))
    finally:
        await rt.close()
    return media_id


def _start(tmp: Path, playlist: Path) -> Node:
    proc = PeerdProcess(tmp / "state", config={"http": {"workers": 2}})
    proc.init()
    media_id = asyncio.run(_import(proc.state_dir, playlist))
    secrets = proc.state_dir / "secrets"
    key = (secrets / "hls_signing_key").read_text().strip().encode()
    api_token = (secrets / "api_token").read_text().strip()
    proc.start(timeout=60)
    return Node(proc, media_id, key, api_token)


@pytest.fixture
def node(tmp_path: Path, playlist: Path) -> Iterator[Node]:
    n = _start(tmp_path, playlist)
    try:
        yield n
    finally:
        if n.proc.proc is not None:
            n.proc.stop(signal.SIGKILL)


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return {int(x) for x in path.read_text().split()}
    except FileNotFoundError:
        return set()


def _worker_pids(pid: int) -> set[int]:
    out = set()
    for child in _children(pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"peerd.http.worker" in cmdline:
            out.add(child)
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _metric_sync(node: Node, name: str) -> float | None:
    try:
        with urllib.request.urlopen(node.proc.base_url + "/metrics", timeout=10) as r:  # noqa: S310
            text = r.read().decode()
    except OSError:
        # A connection the kernel queued on a dying worker's socket is reset with it
        # (SO_REUSEPORT does not move it to another process); a client retries.
        return None
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(name + " "))


def _poll(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
async def fresh() -> AsyncIterator[aiohttp.ClientSession]:
    """A client that opens a new connection for every request."""
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=30),
    ) as s:
        yield s


async def _metric(s: aiohttp.ClientSession, node: Node, pattern: str) -> float:
    async with s.get(node.proc.base_url + "/metrics") as r:
        text = await r.text()
    total = 0.0
    for line in text.splitlines():
        if re.match(pattern, line):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_every_process_answers_alike(node: Node, fresh: aiohttp.ClientSession) -> None:
    assert node.proc.proc is not None
    # The daemon is ready only once its worker listens.
    assert len(_worker_pids(node.proc.proc.pid)) == 1
    tok = node.token()
    async with fresh.get(node.url("v0.m3u8", tok)) as r:
        assert r.status == 200
        media_pl = await r.text()
    blob_uri = next(ln for ln in media_pl.splitlines() if ln.startswith("b/") and ".m4s" in ln)
    blob_path = blob_uri.split("?")[0]
    async with fresh.get(node.url(blob_path, tok)) as r:
        blob = await r.read()
        first_by_worker = r.headers["X-Peerd-Worker"] == "1"
    blob_cid = blob_path.split("/")[1].split(".")[0]
    assert cid_of(blob) == blob_cid

    seen: dict[str, set[str]] = {"playlist": set(), "blob": set(), "api": set()}
    by_worker = 0  # blob responses (200 and 206) the worker process sent
    for _ in range(ROUNDS):
        async with fresh.get(node.url("master.m3u8", tok)) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "application/vnd.apple.mpegurl"
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert f"?token={tok}" in await r.text()
            seen["playlist"].add(r.headers["X-Peerd-Worker"])
        async with fresh.get(node.url("master.m3u8", tok[:-2] + "xx")) as r:
            assert r.status == 403
            assert await r.json() == {"error": "forbidden", "message": "forbidden"}
            assert r.headers["Access-Control-Allow-Origin"] == "*"
        async with fresh.get(node.url("master.m3u8", None)) as r:
            assert r.status == 403
        async with fresh.get(node.url(blob_path, tok)) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "video/iso.segment"
            assert "immutable" in r.headers["Cache-Control"]
            assert await r.read() == blob
            seen["blob"].add(r.headers["X-Peerd-Worker"])
            by_worker += r.headers["X-Peerd-Worker"] == "1"
        async with fresh.get(node.url(blob_path, tok), headers={"Range": "bytes=0-9"}) as r:
            assert r.status == 206
            assert await r.read() == blob[:10]
            by_worker += r.headers["X-Peerd-Worker"] == "1"
        async with fresh.get(node.url("b/" + "b" + "a" * 58 + ".m4s", tok)) as r:
            assert r.status == 404
        async with node.api_node(fresh) as r:
            assert r.status == 200
            assert "peer_id" in await r.json()
            # The API lives in the daemon: a worker relays it and keeps the daemon's mark.
            assert r.headers["X-Peerd-Worker"] == "0"
            seen["api"].add(r.headers["X-Peerd-Worker"])
        async with fresh.get(node.proc.base_url + "/api/v1/node") as r:
            assert r.status == 401
        async with fresh.get(node.proc.base_url + "/healthz") as r:
            assert r.status == 200
            assert await r.json() == {"status": "ok"}
    # A blob whose file is gone needs the resolver, which only the daemon has: a worker relays
    # the request, so the answer is the daemon's whichever process took the connection.
    other = [ln.split("?")[0] for ln in media_pl.splitlines() if ln.startswith("b/")][-1]
    assert other != blob_path
    gone = Cid(other[2:].split(".")[0])
    (node.proc.state_dir / "blobs" / shard_of(gone) / gone).unlink()
    answers = set()
    for _ in range(ROUNDS // 2):
        async with fresh.get(node.url(other, tok)) as r:
            answers.add((r.status, r.headers["X-Peerd-Worker"], await r.read()))
    assert len(answers) == 1, answers
    assert next(iter(answers))[1] == "0"

    # Both processes served the hot path (the kernel hashes connections over both sockets;
    # 24 fresh connections all landing on one of two is a 2**-23 chance).
    assert seen["playlist"] == {"0", "1"}, seen
    assert seen["blob"] == {"0", "1"}, seen

    # What the worker counted reaches the daemon in its next batches: blob bytes, access
    # records (which feed tiering) and request counts. Poll until all of them add up (the last
    # requests the worker served may be a batch behind the ones the daemon served).
    want = (ROUNDS + 1) * len(blob) + ROUNDS * 10
    want_hits = by_worker + first_by_worker
    want_playlists = 1 + 3 * ROUNDS  # 200 and 403 of both processes
    patterns = (
        r'peerd_http_blob_bytes_total\{source="local",status="20[06]"\}',
        r"peerd_http_worker_blob_hits_total ",
        r'peerd_http_requests_total\{route="/hls/\{media\}/\{name\}',
    )
    deadline = time.monotonic() + 30
    while True:
        got = [await _metric(fresh, node, p) for p in patterns]
        if got == [want, want_hits, want_playlists] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert got == [want, want_hits, want_playlists]


def test_sigterm_stops_workers_and_sigkill_leaves_no_orphan(tmp_path: Path, playlist: Path) -> None:
    nodes: list[Node] = []
    try:
        _sigterm_then_sigkill(tmp_path, playlist, nodes)
    finally:
        # A failed assertion must not leave a daemon running.
        for n in nodes:
            if n.proc.proc is not None:
                n.proc.stop(signal.SIGKILL)


def _sigterm_then_sigkill(tmp_path: Path, playlist: Path, nodes: list[Node]) -> None:
    node = _start(tmp_path / "a", playlist)
    nodes.append(node)
    assert node.proc.proc is not None
    main = node.proc.proc.pid
    _poll(lambda: len(_worker_pids(main)) == 1, 30, "one worker")
    (worker,) = _worker_pids(main)

    # A worker that dies is restarted.
    os.kill(worker, signal.SIGKILL)
    _poll(lambda: not _alive(worker), 30, "the killed worker gone")
    _poll(lambda: _metric_sync(node, "peerd_http_worker_restarts_total") == 1, 30, "a restart")
    _poll(lambda: _metric_sync(node, "peerd_http_workers_alive") == 1, 30, "the new worker")
    (worker,) = _worker_pids(main)

    started = time.monotonic()
    assert node.proc.stop(signal.SIGTERM, timeout=10) == 0
    _poll(lambda: not _alive(worker), 10 - (time.monotonic() - started), "worker gone")

    node = _start(tmp_path / "b", playlist)
    nodes.append(node)
    assert node.proc.proc is not None
    main = node.proc.proc.pid
    _poll(lambda: len(_worker_pids(main)) == 1, 30, "one worker")
    (worker,) = _worker_pids(main)
    node.proc.stop(signal.SIGKILL)
    # The worker's stdin pipe reaches EOF when the daemon dies; it must exit on its own.
    _poll(lambda: not _alive(worker), 20, "orphan worker gone")


async def test_workers_relay_with_a_long_state_path(
    tmp_path: Path, playlist: Path, fresh: aiohttp.ClientSession
) -> None:
    """The daemon's private socket for workers is bound and reached through a short name, so
    a state directory too long for a socket address works with workers too."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    assert len(str(deep / "state" / INTERNAL_SOCKET)) > 108
    node = await asyncio.to_thread(_start, deep, playlist)
    try:
        assert (deep / "state" / INTERNAL_SOCKET).stat().st_mode & 0o777 == 0o600
        tok = node.token()
        marks = set()
        # Fresh connections land on either process (SO_REUSEPORT); the worker relays the API.
        for _ in range(24):
            async with node.api_node(fresh) as r:
                assert r.status == 200
                assert "peer_id" in await r.json()
            async with fresh.get(node.url("master.m3u8", tok)) as r:
                assert r.status == 200
                marks.add(r.headers["X-Peerd-Worker"])
        assert marks == {"0", "1"}
    finally:
        if node.proc.proc is not None:
            await asyncio.to_thread(node.proc.stop, signal.SIGKILL)
