"""Shared fixtures.

Every async test runs on an event loop in debug mode (``asyncio_debug = true`` in pyproject), whose
slow-callback threshold is asyncio's default 100 ms: a callback or task step that blocks the loop
longer than that fails the test (blocking work belongs in a thread or process). Threads a test
starts and leaves running fail it too.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from peerd.config import Settings, load_settings
from peerd.runtime import Runtime, open_runtime


class _SlowCallbacks(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("Executing") and "took" in msg:
            self.records.append(msg)


@pytest.fixture(autouse=True)
def _no_loop_blocking() -> Iterator[None]:
    """Fail the test if anything blocked the event loop for more than 100 ms."""
    # A full garbage collection of the objects earlier tests left behind takes 100-200 ms on
    # this class of machine and would be blamed on whatever task step it lands in: collect and
    # freeze them first, so the guard measures the test's own code.
    gc.collect()
    gc.freeze()
    handler = _SlowCallbacks()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    if handler.records:
        pytest.fail("event loop blocked:\n" + "\n".join(handler.records[:5]))


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
