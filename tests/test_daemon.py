"""The real daemon as a process: start, readiness, sd_notify, watchdog, SIGTERM, lock, CLI."""

import json
import signal
import socket
import time
import urllib.request
from pathlib import Path

from tests.support.process import PeerdProcess, run_cli


def test_start_ready_and_sigterm_exits_zero_fast(tmp_path: Path) -> None:
    node = PeerdProcess(tmp_path / "n1")
    node.start()
    with urllib.request.urlopen(node.base_url + "/healthz") as r:
        assert json.load(r) == {"status": "ok"}
    with urllib.request.urlopen(node.base_url + "/metrics") as r:
        body = r.read().decode()
    assert "peerd_up 1.0" in body
    t0 = time.monotonic()
    assert node.stop(timeout=30) == 0
    # Within the stop timeout (8 s) plus what a busy machine adds to a process exit.
    assert time.monotonic() - t0 < 20
    lines = [json.loads(line) for line in node.logs().splitlines() if line.startswith("{")]
    assert any(e["msg"] == "peerd ready" for e in lines)
    stopped = [e for e in lines if e["msg"] == "stopped"]
    assert stopped
    assert stopped[-1]["exit_code"] == 0
    # After a clean stop the next start skips the recovery scan.
    node.start()
    assert node.stop() == 0
    assert node.logs().count("store recovered after unclean stop") == 1


def test_sd_notify_ready_watchdog_stopping(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    srv.bind(str(sock_path))
    srv.settimeout(10)
    node = PeerdProcess(
        tmp_path / "n", env={"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "400000"}
    )
    try:
        node.start()
        got: list[str] = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and got.count("WATCHDOG=1") < 3:
            got.append(srv.recv(4096).decode())
        assert any(m.startswith("READY=1") for m in got)
        assert got.count("WATCHDOG=1") >= 3
        node.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        while "STOPPING=1" not in got:
            got.append(srv.recv(4096).decode())
        assert node.proc.wait(10) == 0  # type: ignore[union-attr]
    finally:
        srv.close()


def test_second_daemon_on_same_state_is_refused(tmp_path: Path) -> None:
    a = PeerdProcess(tmp_path / "same")
    a.start()
    try:
        b = PeerdProcess(tmp_path / "same")
        b.start(wait=False)
        assert b.proc is not None
        assert b.proc.wait(20) == 2
        assert "another peerd is using" in b.logs()
    finally:
        assert a.stop() == 0


def test_init_status_verify_doctor(tmp_path: Path) -> None:
    state = tmp_path / "s"
    res = run_cli("init", state_dir=state)
    assert res.returncode == 0, res.stderr
    assert "peer id:" in res.stdout
    assert (state / "secrets" / "api_token").stat().st_mode & 0o777 == 0o600
    again = run_cli("init", state_dir=state)
    assert again.stdout.splitlines()[1] == res.stdout.splitlines()[1].replace("  (new)", "")
    status = run_cli("status", "--json", state_dir=state)
    assert json.loads(status.stdout)["daemon"] == "not running"
    assert run_cli("verify", state_dir=state).returncode == 0
    doc = run_cli("doctor", state_dir=state)
    assert doc.returncode == 0, doc.stdout
    (state / "node.key").chmod(0o644)
    doc = run_cli("doctor", state_dir=state)
    assert doc.returncode == 1
    assert "chmod 600" in doc.stdout


def test_doctor_names_half_configured_parts(tmp_path: Path) -> None:
    """Secrets the UI needs and optional services set up half-way are each named plainly."""
    state = tmp_path / "s"
    run_cli("init", state_dir=state, check=True)
    (state / "secrets" / "admin_token").unlink()
    (state / "secrets" / "turn_key_id").write_text("k")
    env = {"PEERD_R2__BUCKET": "media", "PEERD_R2__ACCOUNT_ID": "acc"}
    doc = run_cli("doctor", state_dir=state, env=env)
    assert doc.returncode == 1
    lines = doc.stdout.splitlines()
    assert any(ln.startswith("[FAIL] secret admin_token") for ln in lines), lines
    assert any(ln.startswith("[FAIL] r2:") and "r2_access_key_id" in ln for ln in lines), lines
    assert any(ln.startswith("[FAIL] turn:") for ln in lines), lines
    ok = run_cli("doctor", state_dir=state)
    assert any(ln.startswith("[ok  ] r2: not configured") for ln in ok.stdout.splitlines())


def test_verify_reports_problems(tmp_path: Path) -> None:
    state = tmp_path / "s"
    run_cli("init", state_dir=state, check=True)
    orphan = state / "blobs" / "ab" / "bafkreiorphan"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"x")
    res = run_cli("verify", "--json", state_dir=state)
    assert res.returncode == 1
    assert json.loads(res.stdout)["orphans"] == ["bafkreiorphan"]
    assert run_cli("verify", "--repair", state_dir=state).returncode == 0


def test_daemon_loads_the_packager_after_start(tmp_path: Path) -> None:
    node = PeerdProcess(tmp_path / "warm", config={"log": {"level": "debug"}})
    node.init()
    node.start()
    try:
        deadline = time.monotonic() + 20
        while '"packager loaded"' not in node.logs() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert '"packager loaded"' in node.logs(), node.logs()[-2000:]
    finally:
        assert node.stop() == 0, node.logs()[-2000:]
