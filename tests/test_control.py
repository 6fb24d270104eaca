"""`peerd ingest` through the running daemon's control socket (peerd.ctl, peerd.control).

Real daemons and real `python -m peerd` commands: the daemon does the ingest and the command
prints what a local ingest prints; overrides reach the packager; a bad override or request is
refused; a client that goes away mid-ingest cancels it and leaves no blob behind; a dead
daemon's socket makes the command ingest locally; another user is refused by SO_PEERCRED; the
light entry finds the state directory as the full config does, without importing it.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from peerd import ctl
from peerd.control import IngestCommand, parse_request
from peerd.errors import BadRequest
from tests.support.media import make_media
from tests.support.process import REPO_ROOT, PeerdProcess, run_cli


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[PeerdProcess]:
    d = PeerdProcess(tmp_path / "node", config={"webrtc": {"enabled": False}})
    d.start()
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_media(tmp_path_factory.mktemp("media") / "clip.mp4", seconds=5.0)


def _db(state: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{state / 'catalog.sqlite3'}?mode=ro", uri=True)


def _blob_files(state: Path) -> list[Path]:
    return [p for p in (state / "blobs").rglob("*") if p.is_file()]


def _ingest(daemon: PeerdProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("-c", str(daemon.state_dir / "test.toml"), "ingest", "--no-progress", *args)


def test_ingest_runs_in_the_daemon(daemon: PeerdProcess, clip: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypisom" + os.urandom(2000))
    out = _ingest(daemon, str(clip), str(bad))
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith(f"ok   {clip} -> "), out.stdout
    assert lines[1].startswith(f"FAIL {bad}: "), out.stdout
    media_id = lines[0].split(" -> ")[1].split()[0]
    assert "control ingest" in daemon.logs()
    with _db(daemon.state_dir) as db:
        assert db.execute("SELECT media_id FROM media").fetchall() == [(media_id,)]
    # The daemon's own HTTP side sees the new media at once (same process, same catalog).
    again = _ingest(daemon, "--json", str(clip))
    assert again.returncode == 0, again.stderr
    res = json.loads(again.stdout)
    assert res["skipped"] is True
    assert res["media_id"] == media_id
    # A local ingest of the same file on another node gives the same media id.
    local = run_cli(
        "ingest", "--no-progress", "--json", str(clip), state_dir=tmp_path / "other", timeout=120
    )
    assert local.returncode == 0, local.stderr
    assert json.loads(local.stdout)["media_id"] == media_id


def test_overrides_reach_the_daemon_and_bad_ones_are_refused(
    daemon: PeerdProcess, clip: Path
) -> None:
    out = _ingest(daemon, "--container", "ts", "--segment-seconds", "2", "--json", str(clip))
    assert out.returncode == 0, out.stderr
    with _db(daemon.state_dir) as db:
        assert db.execute("SELECT DISTINCT container FROM renditions").fetchall() == [("ts",)]
        durations = [d for (d,) in db.execute("SELECT duration_s FROM segments")]
    assert max(durations) <= 2.05
    bad = _ingest(daemon, "--segment-seconds", "-1", str(clip))
    local = _ingest(daemon, "--local", "--segment-seconds", "-1", str(clip))
    assert local.returncode == 2
    assert "invalid media override" in local.stderr
    assert "segment_seconds" in local.stderr
    assert bad.returncode == 2
    assert "invalid media override" in bad.stderr
    assert "segment_seconds" in bad.stderr


def test_no_media_found_and_local_flag(daemon: PeerdProcess, clip: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty-folder"
    empty.mkdir()
    out = _ingest(daemon, str(empty))
    assert out.returncode == 1
    assert "no media files found" in out.stderr
    # --local packages in the command's own process, beside the running daemon.
    local = _ingest(daemon, "--local", str(clip))
    assert local.returncode == 0, local.stderr
    assert local.stdout.startswith(f"ok   {clip}")
    assert daemon.logs().count("control ingest") == 1


def test_a_client_that_goes_away_cancels_its_ingest(daemon: PeerdProcess, tmp_path: Path) -> None:
    src = make_media(tmp_path / "long.mp4", seconds=30.0, size=(640, 360))
    sock = ctl.connect(daemon.state_dir)
    assert sock is not None
    request = {"op": "ingest", "paths": [str(src)], "media": {"transcode": "always"}}
    request["progress"] = True
    first = next(ctl.events(sock, request))
    assert first["event"] == "progress"
    assert first["done"] < first["total"]
    sock.close()
    deadline = time.monotonic() + 30
    while "client went away" not in daemon.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "client went away" in daemon.logs()
    # Cancelled: no media row, and every blob it had written is gone again.
    while _blob_files(daemon.state_dir) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _blob_files(daemon.state_dir) == []
    with _db(daemon.state_dir) as db:
        assert db.execute("SELECT count(*) FROM media").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM blobs").fetchone() == (0,)
    # The daemon goes on serving commands.
    sock = ctl.connect(daemon.state_dir)
    assert sock is not None
    with sock:
        assert next(ctl.events(sock, {"op": "ping"}))["event"] == "pong"


def test_a_dead_daemons_socket_means_a_local_ingest(daemon: PeerdProcess, clip: Path) -> None:
    import signal

    daemon.stop(signal.SIGKILL)
    assert (daemon.state_dir / ctl.SOCKET_NAME).is_socket()
    out = _ingest(daemon, str(clip))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"ok   {clip}")
    # A new daemon replaces the stale socket and answers on it.
    daemon.start()
    sock = ctl.connect(daemon.state_dir)
    assert sock is not None
    with sock:
        pong = next(ctl.events(sock, {"op": "ping"}))
    assert daemon.proc is not None
    assert pong["pid"] == daemon.proc.pid
    daemon.stop()
    assert not (daemon.state_dir / ctl.SOCKET_NAME).exists()


def test_another_user_is_refused(daemon: PeerdProcess) -> None:
    if os.getuid() != 0:
        pytest.fail("this test switches to another user: run it as root (CI does)")
    path = daemon.state_dir / ctl.SOCKET_NAME
    assert path.stat().st_mode & 0o777 == 0o600
    # Open the file system's door on purpose: SO_PEERCRED is the second check.
    for p in (daemon.state_dir, *daemon.state_dir.parents):
        p.chmod(p.stat().st_mode | 0o001)
    path.chmod(0o666)
    code = (
        "import json, socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "s.connect(sys.argv[1])\n"
        "try:\n"
        '    s.sendall(b\'{"op": "ping"}\\n\')\n'
        "    print(repr(s.recv(100)))\n"
        "except (ConnectionResetError, BrokenPipeError):\n"  # closed before or after the send
        "    print('reset')\n"
    )
    # Debian's python3 (stdlib only here): the venv's interpreter may lie under /root.
    out = subprocess.run(  # noqa: S603 - a stdlib client, as user nobody
        ["/usr/bin/python3", "-c", code, str(path)],
        user=65534,
        group=65534,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd="/",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("b''", "reset")  # closed unanswered (a reset: unread input)
    assert "control connection from another user refused" in daemon.logs()


def test_long_state_paths_work(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "node"
    assert len(str(deep / ctl.SOCKET_NAME)) > 108
    d = PeerdProcess(deep, config={"webrtc": {"enabled": False}})
    d.start()
    try:
        sock = ctl.connect(deep)
        assert sock is not None
        with sock:
            assert next(ctl.events(sock, {"op": "ping"}))["state_dir"] == str(deep)
    finally:
        d.stop()


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b"nope\n", "not JSON"),
        (b"[]\n", "JSON object"),
        (b'{"op": "rm"}\n', "unknown op"),
        (b'{"op": "ingest", "paths": ["relative.mp4"]}\n', "absolute paths"),
        (b'{"op": "ingest", "paths": []}\n', "absolute paths"),
        (b'{"op": "ingest", "paths": ["/a"], "media": {"crf": 1}}\n', "may only override"),
        (b'{"op": "ingest", "paths": ["/a"], "force": "yes"}\n', "true or false"),
        (b'{"op": "ingest", "paths": ["/a"], "rm": true}\n', "unknown request keys"),
    ],
)
def test_bad_requests_are_named(line: bytes, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_request(line)


def test_a_good_request_parses() -> None:
    cmd = parse_request(b'{"op": "ingest", "paths": ["/m/a.mp4"], "media": {"container": "ts"}}')
    assert cmd == IngestCommand((Path("/m/a.mp4"),), False, {"container": "ts"}, False)
    assert parse_request(b'{"op": "ping"}') == "ping"


@pytest.mark.parametrize(
    ("flag", "env", "toml"),
    [
        (None, {}, None),
        ("/x/flag", {}, None),
        ("/x/flag", {"PEERD_NODE__STATE_DIR": "/x/env"}, "/x/toml"),
        (None, {"PEERD_NODE__STATE_DIR": "/x/env"}, "/x/toml"),
        (None, {"peerd_node__state_dir": "/x/lower"}, None),
        (None, {}, "/x/toml"),
        (None, {"STATE_DIRECTORY": "/var/lib/peerd:/other"}, None),
        (None, {"STATE_DIRECTORY": "/var/lib/peerd"}, "/x/toml"),
        (None, {"STATE_DIRECTORY": "/var/lib/peerd"}, "~/.local/share/peerd"),
        (None, {}, "~/nodes/a"),
    ],
)
def test_light_state_dir_agrees_with_the_config(
    flag: str | None,
    env: dict[str, str],
    toml: str | None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from peerd.cli import _settings, build_parser

    for k in list(os.environ):
        if k.upper().startswith("PEERD_") or k == "STATE_DIRECTORY":
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    config = None
    if toml is not None:
        config = tmp_path / "peerd.toml"
        config.write_text(f'[node]\nstate_dir = "{toml}"\n')
    argv = [
        *(["--config", str(config)] if config else []),
        *(["--state-dir", flag] if flag else []),
    ]
    args = build_parser().parse_args([*argv, "status"])
    expected = _settings(args).state_dir
    assert ctl.light_state_dir(config, Path(flag) if flag else None, os.environ) == expected


def test_light_state_dir_gives_up_where_unsure(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\n")
    assert ctl.light_state_dir(bad, None, {}) is None
    assert ctl.light_state_dir(None, None, {"PEERD_NODE": '{"state_dir": "/x"}'}) is None
    assert ctl.light_state_dir(tmp_path / "missing.toml", None, {}) is None


def test_the_entry_point_imports_only_the_standard_library() -> None:
    code = (
        "import json, sys\n"
        "import peerd.__main__, peerd.ctl\n"
        "peerd.ctl.light_args(['ingest', '/x.mp4'])\n"
        "std = sys.stdlib_module_names\n"
        "top = sorted({m.split('.')[0] for m in sys.modules} - set(std))\n"
        "print(json.dumps([top, 'peerd.config' in sys.modules]))\n"
    )
    out = subprocess.run(  # noqa: S603 - our own interpreter and code
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
        check=True,
        timeout=60,
    )
    top, config_loaded = json.loads(out.stdout)
    assert [m for m in top if not m.startswith("_") and m != "peerd"] == []
    assert config_loaded is False


def test_light_parse_falls_back_for_anything_else() -> None:
    assert ctl.light_args(["status"]) is None
    assert ctl.light_args(["ingest"]) is None  # the full CLI reports the missing PATH
    assert ctl.light_args(["ingest", "--bogus", "/x"]) is None
    assert ctl.light_args(["ingest", "--help"]) is None
    parsed = ctl.light_args(["--state-dir", "/s", "ingest", "--force", "/x.mp4"])
    assert parsed is not None
    g, ing = parsed
    assert g.state_dir == Path("/s")
    assert ing.force
    assert ing.paths == [Path("/x.mp4")]
    assert isinstance(ing, argparse.Namespace)
