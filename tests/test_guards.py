"""The test guards themselves fail when they should: loop blocking and leaked threads."""

import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.process import REPO_ROOT, peerd_env

BAD_TESTS = """
import asyncio, threading, time

async def test_blocks_loop():
    time.sleep(1.5)

def test_leaks_thread():
    threading.Thread(target=time.sleep, args=(5,), name="leaky", daemon=True).start()

async def test_burns_cpu():
    end = time.thread_time() + 0.2
    while time.thread_time() < end:
        pass

async def test_fine():
    await asyncio.sleep(0.01)
"""

FAIR_UNDER_LOAD = """
import asyncio, json, os, subprocess, sys, threading, time

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

BIG = list(range(2_000_000))

async def test_short_steps_waiting_for_the_gil():
    # A worker thread serialises a big document: json.dumps holds the GIL ~200 ms at a time
    # (several times that on a loaded machine, where the worker waits for a CPU holding it).
    stop = threading.Event()

    def serialise():
        while not stop.is_set():
            json.dumps(BIG)

    worker = threading.Thread(target=serialise)
    worker.start()
    waits = []
    try:
        for _ in range(5):
            started, cpu = time.perf_counter(), time.thread_time()
            end = cpu + 0.02  # past the 5 ms switch interval: the worker takes the GIL
            while time.thread_time() < end:
                pass
            waits.append(time.perf_counter() - started - (time.thread_time() - cpu))
            await asyncio.sleep(0)
    finally:
        stop.set()
        worker.join()
    # The steps really waited off the CPU for longer than the CPU limit.
    assert max(waits) > 0.12, waits

WRITER = \'\'\'
import os, sys, time
chunk = os.urandom(16 << 20)
with open(sys.argv[1], "wb") as f:
    end = time.monotonic() + 30
    while time.monotonic() < end:
        f.seek(0)
        f.write(chunk)
        os.fsync(f.fileno())
\'\'\'

async def test_short_steps_beside_a_disk_heavy_neighbour(tmp_path):
    cold = tmp_path / "cold"
    with cold.open("wb") as f:
        f.write(os.urandom(8 << 20))
        os.fsync(f.fileno())
    written = [tmp_path / f"w{i}" for i in range(2)]
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(w)]) for w in written]
    try:
        for i in range(10):
            # What tests do on the loop: read a file (evicted from the page cache, so from
            # the disk, queued behind the neighbours' writes) and write a small one.
            with cold.open("rb") as f:
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
                assert len(f.read()) == 8 << 20
            (tmp_path / f"small{i}").write_bytes(b"x" * 4096)
            await asyncio.sleep(0.05)
        assert all(w.stat().st_size > 0 for w in written)
    finally:
        for p in writers:
            p.kill()
            p.wait()
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


def test_waiting_for_a_cpu_the_gil_or_the_disk_is_not_blocking(tmp_path: Path) -> None:
    """Short steps a busy machine stretches past 100 ms of wall time do not fail a test: a
    crowded CPU, a thread holding the GIL, a disk-heavy neighbour."""
    out = _run_pytest(tmp_path, "test_fair.py", FAIR_UNDER_LOAD)
    assert "3 passed in" in out, out  # not "3 passed, 1 error in"
