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

async def test_fine():
    await asyncio.sleep(0.01)
"""


def test_guards_catch_blocking_and_leaks(tmp_path: Path) -> None:
    shutil.copy(REPO_ROOT / "tests" / "conftest.py", tmp_path / "conftest.py")
    shutil.copy(REPO_ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "test_bad.py").write_text(BAD_TESTS)
    res = subprocess.run(  # noqa: S603
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(tmp_path / "test_bad.py"),
        ],
        cwd=tmp_path,
        env=peerd_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = res.stdout
    assert "event loop blocked" in out, out
    assert "threads leaked: ['leaky']" in out, out
    assert "ERROR test_bad.py::test_blocks_loop" in out, out
    assert "ERROR test_bad.py::test_leaks_thread" in out, out
    assert "2 errors" in out, out
