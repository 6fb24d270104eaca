"""The aiohttp application, its error middleware, and the service that runs it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, cast

from aiohttp import web
from aiohttp.typedefs import Middleware
from prometheus_client import Counter, Histogram

from peerd.errors import PeerdError
from peerd.paths import lasting_short_path, listen_unix
from peerd.runtime import Runtime

log = logging.getLogger("peerd.http")

RouteInstaller = Callable[[web.Application, Runtime], None]
SiteFactory = Callable[..., web.TCPSite]
"""``(runner, host, port, **kwargs)`` -> the listening site (``peerd.http.fastpath.site``)."""
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

RUNTIME_KEY = web.AppKey("runtime", Runtime)
WORKER_HEADER = "X-Peerd-Worker"
INTERNAL_SOCKET = "http-internal.sock"


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
        return web.json_response(exc.to_json(), status=exc.status)
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


WORKER_MARK_KEY = web.AppKey("worker_mark", str)


def mark_process(app: web.Application, index: int) -> None:
    """Name the answering process in ``X-Peerd-Worker`` (0 = daemon) when there are workers.

    A response relayed from the daemon keeps the daemon's mark, so the header tells which
    process did the work; tests use it to see that every process answered.
    """
    mark = str(index)
    app[WORKER_MARK_KEY] = mark

    async def on_prepare(_request: web.Request, resp: web.StreamResponse) -> None:
        resp.headers.setdefault(WORKER_HEADER, mark)

    app.on_response_prepare.append(on_prepare)


def build_app(rt: Runtime, installers: list[RouteInstaller]) -> web.Application:
    """The application with the base routes and every subsystem's routes."""
    http_metrics = HttpMetrics(rt)
    app = web.Application(
        middlewares=[http_metrics.middleware()],
        client_max_size=16 * 1024 * 1024,
    )
    app[RUNTIME_KEY] = rt
    app[HTTP_METRICS_KEY] = http_metrics
    if rt.settings.http.workers > 1:
        mark_process(app, 0)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    for install in installers:
        install(app, rt)
    return app


class HttpService:
    """Runs the application on ``http.host:http.port``; drains in-flight requests on stop."""

    name = "http"

    def __init__(
        self, rt: Runtime, installers: list[RouteInstaller], site: SiteFactory = web.TCPSite
    ) -> None:
        self.rt = rt
        self.installers = installers
        self.site = site  # the daemon passes peerd.http.fastpath.site
        self.runner: web.AppRunner | None = None
        self.port: int | None = None

    async def run(self, ready: Callable[[], None]) -> None:
        """Bind, announce the bound address, serve until cancelled."""
        cfg = self.rt.settings.http
        app = build_app(self.rt, self.installers)
        self.runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=5.0,
            keepalive_timeout=cfg.keepalive_timeout_s,
            max_line_size=cfg.max_line_size,
            max_field_size=cfg.max_field_size,
            max_headers=cfg.max_headers,
        )
        await self.runner.setup()
        try:
            # With worker processes the port is shared (SO_REUSEPORT): the kernel spreads new
            # connections over every process bound to it.
            workers = cfg.workers > 1
            site = self.site(
                self.runner, cfg.host, cfg.port, reuse_address=True, reuse_port=workers or None
            )
            await site.start()
            server = cast("asyncio.Server | None", site._server)
            if server is None or not server.sockets:
                raise RuntimeError("aiohttp site started without a listening socket")
            self.port = int(server.sockets[0].getsockname()[1])
            if workers:
                await self._start_internal()
            addr_file: Path = self.rt.settings.state_dir / "http.addr"
            await asyncio.to_thread(_write_text, addr_file, f"{cfg.host}:{self.port}\n")
            log.info("http listening", extra={"host": cfg.host, "port": self.port})
            ready()
            await asyncio.Event().wait()
        finally:
            await asyncio.shield(self.runner.cleanup())

    async def _start_internal(self) -> None:
        # Workers relay what they do not serve themselves over this socket. 0600 in the state
        # directory: only the node's own user can reach the daemon this way.
        assert self.runner is not None
        sock = await asyncio.to_thread(
            listen_unix, self.rt.settings.state_dir, INTERNAL_SOCKET, 128
        )
        await web.SockSite(self.runner, sock).start()

    async def drain(self) -> None:
        """Stop accepting connections and let in-flight requests finish."""
        if self.runner is not None:
            for site in list(self.runner.sites):
                await site.stop()


def internal_socket(state_dir: Path) -> str:
    """The daemon's private HTTP socket that worker processes relay requests to, as a path
    this process can connect to (short enough for a socket address however long the state
    directory is: see :func:`peerd.paths.lasting_short_path`)."""
    return f"{lasting_short_path(state_dir)}/{INTERNAL_SOCKET}"


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)
