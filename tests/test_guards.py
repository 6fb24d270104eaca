"""The test guards themselves fail when they should: loop blocking and leaked threads."""

import shutil
import subprocess
import sys
from pathlib import Path

from peerd.testing.process import REPO_ROOT, peerd_env

BAD_TESTS = """
import asyncio, threading, time

async def test_blocks_loop():
    time.sleep(0.3)

def test_leaks_thread():
    threading.Thread(target=time.sleep, args=(5,), name="leaky", daemon=True).start()

async def test_burns_cpu():
    end = time.thread_time() + 0.3
    while time.thread_time() < end:
        pass

async def test_fine():
    await asyncio.sleep(0.01)
"""

FAIR_UNDER_LOAD = """
import asyncio, os, subprocess, sys, time

async def test_short_steps_on_a_crowded_cpu():
    os.sched_setaffinity(0, {0})
    spin = "import os; os.sched_setaffinity(0, {0})\\nwhile True: pass"
    busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(4)]
    try:
        await asyncio.sleep(0.3)  # let them start spinning
        walls = []
        for _ in range(6):
            started = time.perf_counter()
            end = time.thread_time() + 0.03
            while time.thread_time() < end:
                pass
            walls.append(time.perf_counter() - started)
            await asyncio.sleep(0)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    # The CPU really was crowded: asyncio's wall-time rule would have blamed these steps.
    assert max(walls) > 0.1, walls
"""


def _run_pytest(tmp_path: Path, name: str, body: str) -> str:
    shutil.copy(REPO_ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / name).write_text(body)
    res = subprocess.run(  # noqa: S603
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / name)],
        cwd=tmp_path,
        env=peerd_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return res.stdout


def test_guards_catch_blocking_and_leaks(tmp_path: Path) -> None:
    out = _run_pytest(tmp_path, "test_bad.py", BAD_TESTS)
    assert "event loop blocked" in out, out
    assert "threads leaked: ['leaky']" in out, out
    assert "ERROR test_bad.py::test_blocks_loop" in out, out
    assert "ERROR test_bad.py::test_burns_cpu" in out, out
    assert "ERROR test_bad.py::test_leaks_thread" in out, out
    assert "3 errors" in out, out


def test_waiting_for_a_cpu_is_not_blocking(tmp_path: Path) -> None:
    """Steps of 30 ms CPU that take >100 ms of wall time on a crowded CPU do not fail a test."""
    out = _run_pytest(tmp_path, "test_fair.py", FAIR_UNDER_LOAD)
    assert "1 passed" in out, out
