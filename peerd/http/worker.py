"""An HTTP worker process: the HLS hot path in a second process on the daemon's port.

Started only by the daemon (:class:`peerd.http.workers.WorkerPool`, ``http.workers > 1``) as
``python -m peerd.http.worker --index N --parent PID``. The protocol with the parent:

* stdin: one JSON line with the settings (no secrets in it: the worker reads the HLS signing key
  from the same credentials/secrets directory as the daemon), then nothing. EOF on stdin means
  the daemon is gone (even SIGKILLed: the kernel closes the pipe), and the worker exits.
* stdout: JSON lines for the daemon: ``{"ready": pid}`` once listening, then about once a second
  a batch ``{"access": [[cid, hits, bytes, first, last], ...], "counters": [[name, labels,
  delta], ...]}`` of blob accesses (for tiering) and HLS counter increments (for ``/metrics``).
  Logs go to stderr.
* SIGTERM: stop accepting, finish in-flight requests (a few seconds at most), send the last
  batch, exit 0.

What it serves itself, with the daemon's own code (:mod:`peerd.http.hls`): playlists (manifests
read through a read-only SQLite connection) and blobs whose file is on local disk (sendfile),
with the same token checks, headers and errors. Everything else (API, WHEP, UI, ``/metrics``,
blobs the node must fetch first, anything that writes) is relayed unchanged to the daemon's
private unix socket, bodies streamed both ways, so a client cannot tell which process the kernel
gave its connection to (except for the ``X-Peerd-Worker`` mark).
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import logging
import os
import signal
import sys
import time
from typing import Any

import aiohttp
from aiohttp import web

from peerd.catalog import Catalog
from peerd.config import Settings
from peerd.errors import Unavailable
from peerd.http import fastpath, hls
from peerd.http.server import HTTP_METRICS_KEY, RUNTIME_KEY, HttpMetrics, internal_socket
from peerd.http.server import mark_process as _mark_process
from peerd.identity import load_pem
from peerd.logs import setup_logging
from peerd.metrics import Metrics
from peerd.runtime import Runtime
from peerd.store import BlobStore

log = logging.getLogger("peerd.http.worker")

REPORT_INTERVAL_S = 1.0
PROXY_ROUTE = "/{tail}"
# Counters a worker adds to the daemon's (same names and labels on both sides).
MERGED_COUNTERS = (
    "peerd_http_requests",
    "peerd_http_blob_bytes",
    "peerd_http_denied",
    "peerd_http_streams_rejected",
    "peerd_bytes_served",
)
# Headers that belong to one hop (RFC 9110 7.6.1), never relayed.
HOP_HEADERS = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)


class CounterDeltas:
    """Increments of the merged counters since the last call (what a batch carries)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._last: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def take(self) -> list[list[Any]]:
        """``[name, labels, delta]`` for every counter child that moved."""
        out: list[list[Any]] = []
        for family in self.metrics.registry.collect():
            if family.name not in MERGED_COUNTERS:
                continue
            for sample in family.samples:
                if not sample.name.endswith("_total"):
                    continue
                # Relayed requests are counted by the daemon, which answers them.
                if sample.labels.get("route") == PROXY_ROUTE:
                    continue
                key = (family.name, tuple(sorted(sample.labels.items())))
                delta = sample.value - self._last.get(key, 0.0)
                if delta:
                    self._last[key] = sample.value
                    out.append([family.name, sample.labels, delta])
        return out


class Relay:
    """Relays a request to the daemon's private socket and streams the answer back."""

    def __init__(self, socket_path: str) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=socket_path, limit=0),
            auto_decompress=False,
            # Bodies stream for as long as the daemon sends them (long downloads, uploads);
            # only connecting to the local socket is bounded.
            timeout=aiohttp.ClientTimeout(total=None, connect=10.0),
            skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
        )

    async def close(self) -> None:
        """Close the connection pool."""
        await self.session.close()

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        """The daemon's response to ``request``, streamed."""
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_HEADERS]
        body = request.content if request.body_exists else None
        try:
            upstream = await self.session.request(
                request.method,
                "http://peerd" + request.rel_url.raw_path_qs,
                headers=headers,
                data=body,
                allow_redirects=False,
            )
        except aiohttp.ClientConnectionError as exc:
            # The daemon is restarting its HTTP service or stopping: the client may retry.
            log.warning("daemon unreachable", extra={"path": request.path, "error": repr(exc)})
            raise Unavailable("daemon unavailable") from None
        try:
            resp = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for k, v in upstream.headers.items():
                if k.lower() not in HOP_HEADERS:
                    resp.headers.add(k, v)
            await resp.prepare(request)
            if request.method != "HEAD":
                try:
                    async for chunk in upstream.content.iter_any():
                        await resp.write(chunk)
                except aiohttp.ClientError as exc:
                    # Headers are gone already: end the connection short, as the daemon did.
                    log.warning("relay cut", extra={"path": request.path, "error": repr(exc)})
                    if request.transport is not None:
                        request.transport.close()
                    return resp
            await resp.write_eof()
            return resp
        finally:
            upstream.release()


async def open_worker_runtime(settings: Settings) -> Runtime:
    """A runtime whose catalog is read-only and whose store is only used for paths."""
    catalog = await Catalog.open_readonly(settings.catalog_path)
    try:
        pem = await asyncio.to_thread(settings.key_path.read_bytes)
        identity = load_pem(pem, settings.key_path)
    except BaseException:
        await catalog.close()
        raise
    store = BlobStore(settings.blob_dir, catalog)
    return Runtime(
        settings=settings, identity=identity, catalog=catalog, store=store, metrics=Metrics()
    )


def build_worker_app(rt: Runtime, relay: Relay, index: int) -> web.Application:
    """The HLS routes served here, everything else relayed to the daemon."""
    http_metrics = HttpMetrics(rt)
    app = web.Application(middlewares=[http_metrics.middleware()], client_max_size=0)
    app[RUNTIME_KEY] = rt
    app[HTTP_METRICS_KEY] = http_metrics
    _mark_process(app, index)
    hls.install(app, rt)
    app[hls.ROUTES_KEY].miss = relay
    # Registered last: the router tries the longer, HLS prefixes first.
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


class _Reporter:
    def __init__(self, rt: Runtime, out: asyncio.StreamWriter) -> None:
        self.rt = rt
        self.out = out
        self.deltas = CounterDeltas(rt.metrics)

    async def send(self, message: dict[str, Any]) -> None:
        self.out.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        await self.out.drain()

    async def flush(self) -> None:
        access = [
            [cid, s.hits, s.bytes, s.first, s.last] for cid, s in self.rt.access.drain().items()
        ]
        counters = self.deltas.take()
        if access or counters:
            await self.send({"access": access, "counters": counters})

    async def loop(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL_S)
            await self.flush()


async def _pipes() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    transport, protocol = await loop.connect_write_pipe(
        asyncio.streams.FlowControlMixin, sys.stdout
    )
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return reader, writer


async def serve(settings: Settings, index: int) -> int:
    """Serve until SIGTERM or until the daemon goes away; returns the exit code."""
    cfg = settings.http
    rt = await open_worker_runtime(settings)
    relay = Relay(internal_socket(settings.state_dir))
    runner = web.AppRunner(
        build_worker_app(rt, relay, index),
        access_log=None,
        shutdown_timeout=3.0,
        keepalive_timeout=cfg.keepalive_timeout_s,
        max_line_size=cfg.max_line_size,
        max_field_size=cfg.max_field_size,
        max_headers=cfg.max_headers,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    stdin, stdout = await _pipes()
    reporter = _Reporter(rt, stdout)

    async def parent_gone() -> None:
        # Nothing more is ever written to stdin: read() returns at EOF, i.e. when the daemon
        # closed the pipe or died.
        await stdin.read()
        log.warning("daemon gone; worker exiting", extra={"worker": index})
        stop.set()

    watcher = asyncio.create_task(parent_gone())
    reports: asyncio.Task[None] | None = None
    try:
        await runner.setup()
        site = fastpath.site(runner, cfg.host, cfg.port, reuse_address=True, reuse_port=True)
        await site.start()
        await reporter.send({"ready": os.getpid()})
        log.info("http worker listening", extra={"worker": index, "port": cfg.port})
        reports = asyncio.create_task(reporter.loop())
        await stop.wait()
        await site.stop()
    finally:
        watcher.cancel()
        if reports is not None:
            reports.cancel()
        await runner.cleanup()
        await relay.close()
        try:
            await reporter.flush()
        except (ConnectionError, OSError):
            pass  # the daemon is gone; its counts go with it
        await rt.close()
    return 0


_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    # Besides watching stdin: the kernel sends SIGTERM when the daemon dies, even if this
    # process's loop is busy and would notice the EOF late. Linux only; elsewhere stdin suffices.
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_PDEATHSIG) failed", extra={"errno": ctypes.get_errno()})
    if os.getppid() != parent:  # the daemon died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m peerd.http.worker``."""
    parser = argparse.ArgumentParser(prog="peerd.http.worker", description=__doc__)
    parser.add_argument("--index", type=int, required=True, help="worker number (1..N-1)")
    parser.add_argument("--parent", type=int, required=True, help="the daemon's pid")
    args = parser.parse_args(argv)
    line = sys.stdin.buffer.readline()
    if not line:
        return 2
    settings = Settings.model_validate_json(line)
    setup_logging(settings.log.level, settings.log.format, stream=sys.stderr)
    _die_with_parent(args.parent)
    started = time.monotonic()
    code = asyncio.run(serve(settings, args.index))
    log.info(
        "http worker stopped",
        extra={"worker": args.index, "uptime_s": round(time.monotonic() - started, 1)},
    )
    return code


if __name__ == "__main__":
    sys.exit(main())
