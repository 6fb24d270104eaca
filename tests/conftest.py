"""Shared fixtures.

Every async test runs on an event loop in debug mode (``asyncio_debug = true`` in pyproject). A
callback or task step that blocks the loop fails the test (blocking work belongs in a thread or
process). The guard splits each step's wall time and judges only what the step itself did:

- CPU time of the loop's thread (``time.thread_time``): more than 100 ms is a step that computes
  on the loop. Load on the machine does not inflate it: time spent waiting for a CPU, for the GIL
  or for the disk is not CPU time.
- Time waiting for a CPU (the scheduler's run delay, ``/proc/thread-self/schedstat``): never the
  step's fault, never counted.
- Time waiting for the GIL: at most what the process's other threads computed meanwhile,
  stretched by the machine's load (a thread holding the GIL waits for a CPU like any other).
  Not counted either.
- The rest, off the CPU: sleeps, locks, sockets, subprocesses, but also a page fault or write
  queued behind a disk-heavy neighbour, and time the hypervisor took the CPU away. From inside the
  process a short blocking call cannot be told from a disk stall, so only waits over 1 s fail
  (``time.sleep(1.5)`` does).

asyncio's own slow-callback warning measures wall time and would blame a 5 ms step that a loaded
2-core machine stretched to 150 ms. Threads a test starts and leaves running fail it too.
"""

from __future__ import annotations

import asyncio
import gc
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from peerd.config import Settings, load_settings
from peerd.runtime import Runtime, open_runtime

# The test harness is ``tests.support`` (outside the package): children the tests start with
# ``python -m tests.support...`` find it, and this checkout's peerd, through PYTHONPATH.
_REPO = str(Path(__file__).resolve().parents[1])
os.environ["PYTHONPATH"] = os.pathsep.join(
    [_REPO, *(p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != _REPO)]
)

CPU_LIMIT_S = 0.1
WAIT_LIMIT_S = 1.0


def blocked(wall_s: float, cpu_s: float, run_delay_s: float, gil_s: float) -> str | None:
    """Why a loop step that took these times blocked the loop, or None if it did not
    (``gil_s``: the longest it can have waited for the GIL)."""
    waited = wall_s - cpu_s - run_delay_s - gil_s
    if cpu_s > CPU_LIMIT_S:
        return f"computed for {cpu_s * 1000:.0f} ms"
    if waited > WAIT_LIMIT_S:
        return f"waited {waited * 1000:.0f} ms off the CPU (a sleep or blocking call)"
    return None


def _load_factor() -> float:
    """How many times longer than its CPU time a busy thread takes now (1-minute load average)."""
    return max(1.0, os.getloadavg()[0] / (os.cpu_count() or 1))


class _LoopBlockGuard:
    """Times every event-loop callback on the loop's thread; keeps those that blocked it."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        self.records: list[str] = []

    def run_delay(self) -> float:
        """Seconds this thread has spent runnable but waiting for a CPU (cumulative)."""
        return int(os.pread(self.fd, 128, 0).split()[1]) / 1e9

    def close(self) -> None:
        os.close(self.fd)


_guard: _LoopBlockGuard | None = None
_original_run = asyncio.events.Handle._run


def _timed_run(handle: asyncio.Handle) -> None:
    guard = _guard
    if guard is None or threading.get_ident() != guard.thread:
        _original_run(handle)
        return
    started = time.perf_counter()
    cpu_before, process_before = time.thread_time(), time.process_time()
    delay_before = guard.run_delay()
    try:
        _original_run(handle)
    finally:
        wall = time.perf_counter() - started
        if wall > CPU_LIMIT_S:  # below this wall time neither limit can be crossed
            cpu = time.thread_time() - cpu_before
            others = time.process_time() - process_before - cpu
            gil = others * _load_factor()
            delay = guard.run_delay() - delay_before
            why = blocked(wall, cpu, delay, gil)
            if why is not None:
                guard.records.append(
                    f"{handle!r} blocked the loop: {why} ({wall * 1000:.0f} ms wall, "
                    f"{cpu * 1000:.0f} ms CPU, {delay * 1000:.0f} ms waiting for a CPU, "
                    f"{gil * 1000:.0f} ms at most for the GIL)"
                )


asyncio.events.Handle._run = _timed_run  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def _no_loop_blocking() -> Iterator[None]:
    """Fail the test if a loop step computed for over 100 ms or blocked for over 1 s."""
    global _guard
    # A full garbage collection of the objects earlier tests left behind takes 100-200 ms on
    # this class of machine and would be blamed on whatever task step it lands in: collect and
    # freeze them first, so the guard measures the test's own code.
    gc.collect()
    gc.freeze()
    guard = _LoopBlockGuard()
    _guard = guard
    try:
        yield
    finally:
        _guard = None
        guard.close()
    if guard.records:
        pytest.fail("event loop blocked:\n" + "\n".join(guard.records[:5]))


_IGNORED_THREADS = ("asyncio_", "ThreadPoolExecutor", "pydevd", "Dummy-", "Trio thread")


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Fail the test if it leaves a non-pool thread running."""
    before = set(threading.enumerate())
    yield
    deadline = 2.0
    leaked: list[threading.Thread] = []
    for _ in range(40):
        leaked = [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith(_IGNORED_THREADS)
        ]
        if not leaked:
            return
        threading.Event().wait(deadline / 40)
    pytest.fail(f"threads leaked: {[t.name for t in leaked]}")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """Settings for a node whose state lives in ``tmp_path``."""
    return load_settings(None, node={"state_dir": tmp_path / "state"}, http={"port": 0})


@pytest.fixture
async def runtime(settings: Settings) -> AsyncIterator[Runtime]:
    """An opened runtime (identity, catalog, store) in a temp dir."""
    rt = await open_runtime(settings)
    try:
        yield rt
    finally:
        await rt.close()
