"""The README's first command: the demo sets up a node, prints a URL, and that URL plays."""

from __future__ import annotations

import re
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.support.process import REPO_ROOT, peerd_env
from tests.support.s3server import free_port


def _read_url(proc: subprocess.Popen[str], within_s: float) -> tuple[str, list[str]]:
    """Lines of the demo's stdout up to its playback URL."""
    assert proc.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if not ready:
            if proc.poll() is not None:
                break
            continue
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line.rstrip())
        m = re.search(r"(http://\S+/master\.m3u8\?token=\S+)", line)
        if m:
            return m.group(1), seen
    raise AssertionError("demo printed no playback URL:\n" + "\n".join(seen))


def test_demo_prints_a_url_that_plays(tmp_path: Path) -> None:
    ffmpeg = shutil.which("ffmpeg")
    assert ffmpeg, "ffmpeg (Debian package) is needed as the independent HLS client"
    port = free_port()
    proc = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "peerd.demo"],
        cwd=REPO_ROOT,
        env=peerd_env({"PEERD_DEMO_STATE": str(tmp_path / "demo"), "PEERD_HTTP__PORT": str(port)}),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        url, _ = _read_url(proc, within_s=120)
        assert f"127.0.0.1:{port}" in url
        deadline = time.monotonic() + 30
        while True:  # the daemon starts after the URL is printed: wait for it to serve
            res = subprocess.run(  # noqa: S603
                [ffmpeg, "-v", "error", "-i", url, "-f", "null", "-"],
                capture_output=True,
                text=True,
                timeout=120,
            )
            if res.returncode == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stderr.strip() == "", res.stderr[-2000:]
        # A forged token is refused by the same node.
        forged = url[:-4] + ("aaaa" if not url.endswith("aaaa") else "bbbb")
        bad = subprocess.run(  # noqa: S603
            [ffmpeg, "-v", "error", "-i", forged, "-f", "null", "-"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode != 0
        assert "403" in bad.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
    assert code == 0
