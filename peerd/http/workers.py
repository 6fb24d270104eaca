"""The daemon's side of HTTP worker processes (``http.workers > 1``): start, watch, merge.

:class:`WorkerPool` is a service started right after the HTTP service (which by then listens on
the shared port with SO_REUSEPORT and on the private socket workers relay to). It runs
``http.workers - 1`` children of :mod:`peerd.http.worker` and, like the supervisor does for
services, restarts one that dies, with exponential backoff (reset once it stayed up a minute).
On drain or cancellation the children get SIGTERM, then SIGKILL if they outlive the grace time.
A child also exits on its own when the daemon dies, since its stdin pipe then reaches EOF.

Each child's batches (stdout JSON lines, see :mod:`peerd.http.worker`) are folded into this
process: blob accesses into ``rt.access`` (tiering and the dashboard see every process's
viewers) and counter increments into the daemon's own counters, so ``/metrics`` shows the sum.
The request latency histogram and the active-streams gauge stay per process (only the daemon's
appear in ``/metrics``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge

from peerd.http.hls import ROUTES_KEY
from peerd.http.server import HTTP_METRICS_KEY, HttpService
from peerd.runtime import Runtime

log = logging.getLogger("peerd.http.workers")

STOP_GRACE_S = 5.0
STABLE_S = 60.0
BACKOFF_MAX_S = 30.0
READY_TIMEOUT_S = 30.0


class WorkerPool:
    """Runs the HTTP worker processes and merges what they report."""

    name = "http-workers"

    def __init__(self, rt: Runtime, http: HttpService) -> None:
        self.rt = rt
        self.http = http
        self.count = rt.settings.http.workers - 1
        self.procs: dict[int, asyncio.subprocess.Process] = {}
        self._stopping = False
        self._counters: dict[str, Counter] = {}
        reg = rt.metrics.registry
        self.alive = Gauge(
            "peerd_http_workers_alive", "HTTP worker processes serving", registry=reg
        )
        self.restarts = Counter(
            "peerd_http_worker_restarts", "HTTP worker processes restarted", registry=reg
        )
        self.hits = Counter(
            "peerd_http_worker_blob_hits",
            "Blob accesses reported by HTTP workers (folded into the daemon's access counts)",
            registry=reg,
        )

    def pids(self) -> list[int]:
        """Process ids of the running workers."""
        return [p.pid for p in self.procs.values() if p.returncode is None]

    async def run(self, ready: Callable[[], None]) -> None:
        """Start every worker, report ready once all listen, keep them running."""
        runner = self.http.runner
        assert runner is not None
        assert self.http.port is not None
        app = runner.app
        hm, routes = app[HTTP_METRICS_KEY], app[ROUTES_KEY]
        self._counters = {
            "peerd_http_requests": hm.requests,
            "peerd_http_blob_bytes": routes.m.bytes,
            "peerd_http_denied": routes.m.denied,
            "peerd_http_streams_rejected": routes.m.rejected,
            "peerd_bytes_served": self.rt.metrics.bytes_served,
        }
        # Workers bind the port the daemon actually got (``port = 0`` picks one at random).
        settings = self.rt.settings.model_copy(deep=True)
        settings.http.port = self.http.port
        blob = settings.model_dump_json().encode() + b"\n"
        started = [asyncio.Event() for _ in range(self.count)]
        tasks = [
            asyncio.create_task(self._keep(i + 1, blob, started[i]), name=f"http-worker-{i + 1}")
            for i in range(self.count)
        ]
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await asyncio.gather(*(e.wait() for e in started))
            ready()
            await asyncio.gather(*tasks)
        finally:
            self._stopping = True
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self) -> None:
        """Stop the workers (they finish their in-flight requests first)."""
        self._stopping = True
        await asyncio.gather(*(self._stop(p) for p in list(self.procs.values())))

    async def _keep(self, index: int, settings_line: bytes, started: asyncio.Event) -> None:
        failures = 0
        while not self._stopping:
            began = time.monotonic()
            try:
                code = await self._run_one(index, settings_line, started)
            except OSError as exc:
                code = None
                log.warning("cannot start http worker", extra={"worker": index, "error": repr(exc)})
            if self._stopping:
                return
            failures = 0 if time.monotonic() - began > STABLE_S else failures + 1
            delay = min(BACKOFF_MAX_S, 0.5 * 2 ** max(0, failures - 1))
            log.warning(
                "http worker exited; restarting",
                extra={"worker": index, "exit_code": code, "delay_s": delay},
            )
            self.restarts.inc()
            await asyncio.sleep(delay)

    async def _run_one(self, index: int, settings_line: bytes, started: asyncio.Event) -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "peerd.http.worker",
            "--index",
            str(index),
            "--parent",
            str(os.getpid()),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=_child_env(),
        )
        self.procs[index] = proc
        assert proc.stdin is not None
        assert proc.stdout is not None
        alive = False
        try:
            # The settings go through the pipe, not the command line; they hold no secrets.
            proc.stdin.write(settings_line)
            await proc.stdin.drain()
            # stdin stays open: the worker treats EOF as "the daemon is gone".
            while line := await proc.stdout.readline():
                try:
                    msg = json.loads(line)
                except ValueError:
                    log.warning("bad line from http worker", extra={"worker": index})
                    continue
                if "ready" in msg:
                    alive = True
                    self.alive.inc()
                    started.set()
                    log.info("http worker ready", extra={"worker": index, "pid": msg["ready"]})
                else:
                    self._merge(msg)
            return await proc.wait()
        finally:
            if alive:
                self.alive.dec()
            if proc.returncode is None:
                await asyncio.shield(self._stop(proc))
            self.procs.pop(index, None)

    def _merge(self, msg: dict[str, Any]) -> None:
        for cid, hits, nbytes, first, last in msg.get("access", ()):
            self.rt.access.add(str(cid), int(hits), int(nbytes), float(first), float(last))
            self.hits.inc(int(hits))
        for name, labels, delta in msg.get("counters", ()):
            counter = self._counters.get(name)
            if counter is None or delta <= 0:
                continue
            (counter.labels(**labels) if labels else counter).inc(delta)

    async def _stop(self, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), timeout=STOP_GRACE_S)
        except TimeoutError:
            log.warning("http worker did not stop; killing", extra={"pid": proc.pid})
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def _child_env() -> dict[str, str]:
    # The worker must import this very peerd (a checkout run with ``python -m peerd`` is not
    # on the default path of a child started elsewhere).
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    # Only the daemon talks to systemd.
    for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        env.pop(key, None)
    return env
