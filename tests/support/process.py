"""Start and stop real ``peerd`` daemons for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]


def peerd_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a child ``python -m peerd``: this checkout first on the path."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEERD_")}
    env["PYTHONPATH"] = str(REPO_ROOT) + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    env.pop("NOTIFY_SOCKET", None)
    env.pop("WATCHDOG_USEC", None)
    env.pop("CREDENTIALS_DIRECTORY", None)
    if extra:
        env.update(extra)
    return env


def run_cli(
    *args: str,
    state_dir: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m peerd ARGS`` to completion."""
    cmd = [sys.executable, "-m", "peerd"]
    if state_dir is not None:
        cmd += ["--state-dir", str(state_dir)]
    cmd += list(args)
    return subprocess.run(  # noqa: S603
        cmd, env=peerd_env(env), capture_output=True, text=True, timeout=timeout, check=check
    )


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    """Write a small TOML config (strings, numbers, bools, lists and inline tables of those)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        if isinstance(v, list | tuple):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{k} = {fmt(x)}" for k, x in v.items()) + " }"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {fmt(v)}" for k, v in values.items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@dataclass
class PeerdProcess:
    """A real daemon on loopback with its own state directory."""

    state_dir: Path
    config: dict[str, dict[str, Any]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    log_path: Path | None = None
    # Where the test reaches the daemon, and a command prefix (e.g. ``ip netns exec NS``) for
    # daemons run in a network namespace.
    host: str = "127.0.0.1"
    prefix: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        """``http://HOST:PORT`` (loopback unless the test placed the daemon elsewhere)."""
        return f"http://{self.host}:{self.port}"

    def init(self) -> None:
        """``peerd init`` into the state directory."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        cfg = self._write_config()
        run_cli("-c", str(cfg), "init", env=self.env, check=True)

    def _write_config(self) -> Path:
        sections = {k: dict(v) for k, v in self.config.items()}
        sections.setdefault("node", {})["state_dir"] = str(self.state_dir)
        sections.setdefault("http", {}).setdefault("port", 0)
        sections.setdefault("live", {}).setdefault("rtmp_listen", "127.0.0.1:0")
        sections.setdefault("log", {}).setdefault("level", "debug")
        # Discovery and libp2p are on in production; test daemons turn them on explicitly
        # (they cost an import of libp2p and multicast traffic).
        sections.setdefault("mdns", {}).setdefault("enabled", False)
        sections.setdefault("p2p", {}).setdefault("enabled", False)
        return write_config(self.state_dir / "test.toml", sections)

    def start(self, *, wait: bool = True, timeout: float = 30) -> None:
        """Start ``peerd run`` and (by default) wait until ``/readyz`` answers 200."""
        if not (self.state_dir / "node.key").exists():
            self.init()
        cfg = self._write_config()
        addr = self.state_dir / "http.addr"
        addr.unlink(missing_ok=True)
        self.log_path = self.state_dir / "daemon.log"
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(  # noqa: S603
            [*self.prefix, sys.executable, "-m", "peerd", "-c", str(cfg), "run"],
            env=peerd_env(self.env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        if wait:
            self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 30) -> None:
        """Poll until the daemon is ready; raise with its log if it exits or times out."""
        assert self.proc is not None
        addr = self.state_dir / "http.addr"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"peerd exited with {self.proc.returncode}:\n{self.logs()}")
            if addr.exists():
                self.port = int(addr.read_text().strip().rpartition(":")[2])
                try:
                    with urllib.request.urlopen(self.base_url + "/readyz", timeout=2) as r:  # noqa: S310
                        if r.status == 200:
                            return
                except (urllib.error.URLError, ConnectionError):
                    pass
            time.sleep(0.05)
        raise TimeoutError(f"peerd not ready in {timeout}s:\n{self.logs()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        """Send ``sig`` and wait; returns the exit code (kills after ``timeout``)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        code = self.proc.returncode
        self.proc = None
        return code

    def logs(self) -> str:
        """The daemon's output so far."""
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")
