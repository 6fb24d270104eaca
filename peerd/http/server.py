"""The aiohttp application, its error middleware, and the service that runs it."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import resource
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware
from prometheus_client import Counter, Histogram

from peerd.config import HttpSettings
from peerd.core.httphead import Limits
from peerd.errors import PeerdError
from peerd.http import fastpath
from peerd.runtime import Runtime

log = logging.getLogger("peerd.http")

RouteInstaller = Callable[[web.Application, Runtime], None]
"""``(runner, host, port, **kwargs)`` -> the listening site (``peerd.http.fastpath.site``)."""
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

RUNTIME_KEY = web.AppKey("runtime", Runtime)
SHUTDOWN_GRACE_S = 5.0  # in-flight requests may finish within this on stop


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn :class:`PeerdError` into a JSON response with its status; hide everything else."""
    try:
        return await handler(request)
    except PeerdError as exc:
        if exc.status >= 500:
            log.warning(
                "request failed",
                extra={"path": request.path, "status": exc.status, "error": exc.message},
            )
        retry = {} if exc.retry_after_s is None else {"Retry-After": str(exc.retry_after_s)}
        return web.json_response(exc.to_json(), status=exc.status, headers=retry)
    except web.HTTPException:
        raise
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        log.exception("unhandled error", extra={"path": request.path, "method": request.method})
        return web.json_response(
            {"error": "internal", "message": "internal server error"}, status=500
        )


async def healthz(request: web.Request) -> web.Response:
    """Liveness: the process answers."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: every service started and the node is not draining."""
    rt = request.app[RUNTIME_KEY]
    if rt.draining:
        return web.json_response({"status": "draining"}, status=503)
    if not rt.node.ready:
        return web.json_response({"status": "starting"}, status=503)
    return web.json_response({"status": "ready"})


async def metrics(request: web.Request) -> web.Response:
    """Prometheus text exposition."""
    rt = request.app[RUNTIME_KEY]
    body = await asyncio.to_thread(rt.metrics.render)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})


class HttpMetrics:
    """Request counts by route and status, and a latency histogram by route."""

    def __init__(self, rt: Runtime) -> None:
        reg = rt.metrics.registry
        self.requests = Counter(
            "peerd_http_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=reg,
        )
        self.latency = Histogram(
            "peerd_http_request_seconds",
            "Time to answer an HTTP request (to the last byte handed to the kernel)",
            ["route"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
            registry=reg,
        )
        self.malformed = Counter(
            "peerd_http_malformed_requests",
            "Requests aiohttp could not parse (answered 400/431 and closed), by reason",
            ["reason"],
            registry=reg,
        )
        self.closed = Counter(
            "peerd_http_connections_closed",
            "Connections the server closed before a request: header_timeout, idle_timeout, "
            "shed (the oldest waiting one, for a new one past max_connections), refused",
            ["reason"],
            registry=reg,
        )

    def middleware(self) -> Middleware:
        """The aiohttp middleware recording every request."""

        # Label lookups cost more than the increments: keep the children per route/status.
        counters: dict[tuple[str, int], Any] = {}
        timers: dict[str, Any] = {}

        @web.middleware
        async def metrics_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
            started = time.perf_counter()
            status = 500
            try:
                # The error handling runs inside this one middleware (not a second layer): each
                # aiohttp middleware layer costs a few microseconds on every request.
                resp = await error_middleware(request, handler)
                status = resp.status
                return resp
            except web.HTTPException as exc:
                status = exc.status
                raise
            finally:
                resource = request.match_info.route.resource
                name = resource.canonical if resource is not None else "unmatched"
                counter = counters.get((name, status))
                if counter is None:
                    counter = self.requests.labels(route=name, status=str(status))
                    counters[(name, status)] = counter
                counter.inc()
                timer = timers.get(name)
                if timer is None:
                    timer = timers[name] = self.latency.labels(route=name)
                timer.observe(time.perf_counter() - started)

        return metrics_middleware


HTTP_METRICS_KEY = web.AppKey("http_metrics", HttpMetrics)
MALFORMED_LOG_INTERVAL_S = 60.0


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger (``RequestHandler(logger=...)``), on ``peerd.http.server``.

    aiohttp logs every request it cannot parse with a traceback at ERROR, quoting the request
    line: anyone could fill the journal (600 bytes per 19 sent) and put tokens in it. Here such
    a request is counted (``peerd_http_malformed_requests{reason}``) and logged as one INFO
    line per reason per :data:`MALFORMED_LOG_INTERVAL_S`, without traceback or request bytes.
    Anything else aiohttp logs (a handler's unhandled exception) passes through as it is.
    """

    def __init__(self, counter: Counter, interval_s: float = MALFORMED_LOG_INTERVAL_S) -> None:
        super().__init__(logging.getLogger("peerd.http.server"), {})
        self.counter = counter
        self.interval_s = interval_s
        self._logged_at: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        """Log as aiohttp asked, except for malformed requests (counted, rate-limited)."""
        exc = kwargs.get("exc_info")
        if not isinstance(exc, HttpProcessingError):
            self.logger.log(level, msg, *args, **kwargs)
            return
        reason = type(exc).__name__
        self.counter.labels(reason=reason).inc()
        now = time.monotonic()
        if now - self._logged_at.get(reason, -math.inf) < self.interval_s:
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            return
        self._logged_at[reason] = now
        self.logger.info(
            "malformed request",
            extra={
                "reason": reason,
                "status": exc.code,
                "remote": args[0] if args else None,
                "suppressed": self._unlogged.pop(reason, 0),
            },
        )


def build_app(rt: Runtime, installers: list[RouteInstaller]) -> web.Application:
    """The application with the base routes and every subsystem's routes."""
    http_metrics = HttpMetrics(rt)
    app = web.Application(
        middlewares=[http_metrics.middleware()],
        client_max_size=16 * 1024 * 1024,
    )
    app[RUNTIME_KEY] = rt
    app[HTTP_METRICS_KEY] = http_metrics
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    for install in installers:
        install(app, rt)
    return app


@dataclass
class Listener:
    """A listening socket whose connections aiohttp serves, through the fast path if any."""

    server: asyncio.Server
    fast: fastpath.FastPath | None

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self, grace_s: float) -> None:
        """Stop accepting; close idle fast-path connections, let busy ones finish (bounded).

        Connections aiohttp holds are its own to close (``AppRunner.cleanup``).
        """
        self.server.close()
        if self.fast is not None:
            await self.fast.shutdown(grace_s)


async def listen(runner: web.AppRunner, cfg: HttpSettings) -> Listener:
    """Listen on ``cfg.host:cfg.port`` for ``runner``'s application.

    With HLS routes in the application, every connection starts on the fast path's protocol
    (:mod:`peerd.http.fastpath`): it reads request heads under ``[http] header_timeout_s``,
    closes idle connections after ``keepalive_timeout_s``, keeps at most ``max_connections``
    open, and hands aiohttp what it does not answer itself (with ``fast_path = false``, every
    request). An application without HLS routes is served by aiohttp's own protocol
    (``web.Server``), whose only guard is its keep-alive timeout.
    """
    aiohttp_protocol = runner.server
    if aiohttp_protocol is None:
        raise RuntimeError("runner.setup() first")
    hls = runner.app.get(fastpath.HLS_KEY)
    fast: fastpath.FastPath | None = None
    factory: Callable[[], asyncio.Protocol] = aiohttp_protocol
    if hls is not None:
        closed = runner.app[HTTP_METRICS_KEY].closed
        fast = fastpath.FastPath(
            hls,
            aiohttp_protocol,
            keepalive_timeout=cfg.keepalive_timeout_s,
            limits=Limits(cfg.max_line_size, cfg.max_field_size, cfg.max_headers),
            answer=cfg.fast_path,
            header_timeout=cfg.header_timeout_s,
            max_connections=cfg.max_connections,
            count_closed=lambda reason: closed.labels(reason=reason).inc(),
        )
        factory = fast.protocol
    _raise_nofile(cfg.max_connections)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        factory, cfg.host, cfg.port, reuse_address=True, backlog=min(cfg.max_connections, 1024)
    )
    return Listener(server, fast)


def _raise_nofile(connections: int) -> None:
    # Each connection is a descriptor; the store, catalog and libp2p need some more. A soft
    # limit below that makes accept() fail (EMFILE) for everyone, not just the newest client.
    want = connections + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning(
                "open file limit below max_connections",
                extra={"nofile": new, "max_connections": connections},
            )


def runner_for(app: web.Application, cfg: HttpSettings) -> web.AppRunner:
    """An ``AppRunner`` for ``app`` (from :func:`build_app`) with the ``[http]`` limits and
    timeouts, and its malformed requests logged by :class:`ServerLog`."""
    return web.AppRunner(
        app,
        access_log=None,
        logger=ServerLog(app[HTTP_METRICS_KEY].malformed),
        shutdown_timeout=SHUTDOWN_GRACE_S,
        keepalive_timeout=cfg.keepalive_timeout_s,
        max_line_size=cfg.max_line_size,
        max_field_size=cfg.max_field_size,
        max_headers=cfg.max_headers,
    )


class HttpService:
    """Runs the application on ``http.host:http.port``; drains in-flight requests on stop."""

    name = "http"

    def __init__(self, rt: Runtime, installers: list[RouteInstaller]) -> None:
        self.rt = rt
        self.installers = installers
        self.runner: web.AppRunner | None = None
        self.listener: Listener | None = None
        self.port: int | None = None

    async def run(self, ready: Callable[[], None]) -> None:
        """Bind, announce the bound address, serve until cancelled."""
        cfg = self.rt.settings.http
        self.runner = runner_for(build_app(self.rt, self.installers), cfg)
        await self.runner.setup()
        try:
            self.listener = await listen(self.runner, cfg)
            self.port = self.listener.port
            addr_file: Path = self.rt.settings.state_dir / "http.addr"
            await asyncio.to_thread(_write_text, addr_file, f"{cfg.host}:{self.port}\n")
            log.info("http listening", extra={"host": cfg.host, "port": self.port})
            ready()
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self._stop())

    async def _stop(self) -> None:
        await self.drain()
        assert self.runner is not None
        await self.runner.cleanup()

    async def drain(self) -> None:
        """Stop accepting connections and let in-flight requests finish."""
        if self.listener is not None:
            listener, self.listener = self.listener, None
            await listener.stop(SHUTDOWN_GRACE_S)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
