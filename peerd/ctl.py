"""The light ``peerd ingest`` path: the client of the daemon's local control socket.

``peerd ingest PATH...`` hands the work to the node's running daemon when there is one: the
daemon owns the state directory (its caches, metrics, replication outbox and announcements see
the new media at once), already has the packager loaded, and the command's own start-up stays
that of a bare interpreter. Without a daemon (or with ``--local`` or ``--watch``) the CLI
ingests in its own process, exactly as before.

This module imports nothing but the standard library, so that the path above skips pydantic,
PyAV, aiosqlite and the rest (~0.25 s of imports). :func:`light_state_dir` resolves the state
directory the way :func:`peerd.config.load_settings` does for the cases it can read without the
config model (``--state-dir``, ``PEERD_NODE__STATE_DIR``, ``[node] state_dir`` in the TOML file,
systemd's ``STATE_DIRECTORY``, the default); anything else falls through to the full CLI,
which asks the daemon again with the fully loaded settings.

The control socket (``<state>/control.sock``, 0600, peers checked by ``SO_PEERCRED``) speaks
JSON lines: the client sends one request object, the daemon answers with event objects until
the connection closes. See :mod:`peerd.control` for the server and the request format.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from peerd.paths import DEFAULT_STATE_DIR, MAX_LINE, SOCKET_NAME, short_path

ProgressFn = Callable[[float, float], None]

_UNREADABLE = (": no such file", ": cannot read", ": cannot open", "ermission denied")
"""Parts of a packager error that mean the daemon could not get at the file."""


class _ParseError(Exception):
    """Arguments this light path cannot read: a signal to fall through to the full CLI, caught
    in :func:`light_args` and never raised past it (so not a :class:`peerd.errors.PeerdError`)."""


class _Parser(argparse.ArgumentParser):
    """An argparse parser that raises instead of printing and exiting (the full CLI reports)."""

    def error(self, message: str) -> Any:
        raise _ParseError(message)


def add_global_options(parser: argparse.ArgumentParser) -> None:
    """The options every ``peerd`` command takes before its name."""
    parser.add_argument("-c", "--config", type=Path, help="TOML config file ($PEERD_CONFIG)")
    parser.add_argument("--state-dir", type=Path, help="override [node] state_dir")


def add_ingest_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments of ``peerd ingest`` (shared by the full CLI and the light entry)."""
    p.add_argument(
        "paths",
        nargs="+",
        type=Path,
        metavar="PATH",
        help="files or folders (object keys with --from-bucket)",
    )
    p.add_argument(
        "--from-bucket",
        action="store_true",
        help="PATHs are object keys of uploads in the [r2] bucket (e.g. uploads/film.mkv): "
        "download, package, push to R2, archive or delete the upload",
    )
    p.add_argument("--watch", action="store_true", help="keep watching the folders")
    p.add_argument("--force", action="store_true", help="re-package files already ingested")
    p.add_argument("--json", action="store_true", help="one JSON object per file on stdout")
    p.add_argument("--container", choices=["fmp4", "ts"], help="override [media] container")
    p.add_argument("--segment-seconds", type=float, help="override [media] segment_seconds")
    p.add_argument("--transcode", choices=["auto", "always"], help="override [media] transcode")
    p.add_argument("--max-height", type=int, help="override [media] max_height")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--local",
        action="store_true",
        help="ingest in this process even if the daemon is running (default: the daemon does it)",
    )


def media_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The ``[media]`` settings an ingest command line overrides."""
    given = {
        "container": args.container,
        "segment_seconds": args.segment_seconds,
        "transcode": args.transcode,
        "max_height": args.max_height,
    }
    return {k: v for k, v in given.items() if v is not None}


# -- state directory -------------------------------------------------------------------------------


def light_state_dir(
    config: Path | None, state_dir: Path | None, environ: dict[str, str] | os._Environ[str]
) -> Path | None:
    """The state directory :func:`peerd.config.load_settings` would pick, or None if unsure.

    Precedence as there: ``--state-dir``, then ``PEERD_NODE__STATE_DIR`` (any case), then
    ``[node] state_dir`` of the TOML file (``--config`` or ``$PEERD_CONFIG``), then the default,
    which systemd's ``STATE_DIRECTORY`` replaces. None when the settings could come from
    somewhere this function does not read (a ``PEERD_NODE`` JSON variable, an unreadable or
    invalid TOML file, a non-string value): the caller then loads the full config.
    """
    if state_dir is not None:
        return state_dir.expanduser()
    env = {k.upper(): v for k, v in environ.items() if k.upper().startswith("PEERD_")}
    if "PEERD_NODE" in env:
        return None
    if "PEERD_NODE__STATE_DIR" in env:
        return Path(env["PEERD_NODE__STATE_DIR"]).expanduser()
    if config is None and environ.get("PEERD_CONFIG"):
        config = Path(environ["PEERD_CONFIG"])
    if config is not None:
        import tomllib

        try:
            with config.open("rb") as f:
                doc = tomllib.load(f)
        except (OSError, ValueError):
            return None
        node = doc.get("node", {})
        if not isinstance(node, dict):
            return None
        value = node.get("state_dir")
        if value is not None:
            if not isinstance(value, str) or not value:
                return None
            path = Path(value)
            if path != DEFAULT_STATE_DIR:
                return path.expanduser()
    systemd = environ.get("STATE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    return DEFAULT_STATE_DIR.expanduser()


# -- the socket ------------------------------------------------------------------------------------


def connect(state_dir: Path, timeout: float = 5.0) -> socket.socket | None:
    """A connection to the daemon's control socket, or None when no daemon listens there."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        with short_path(state_dir) as d:
            sock.connect(f"{d}/{SOCKET_NAME}")
    except OSError:
        # No state dir, no socket, a stale socket (ECONNREFUSED), not ours to use (EACCES).
        sock.close()
        return None
    sock.settimeout(None)
    return sock


def events(sock: socket.socket, request: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Send ``request`` and yield the daemon's events until it closes the connection."""
    sock.sendall(json.dumps(request).encode() + b"\n")
    f = sock.makefile("rb")
    try:
        while True:
            line = f.readline(MAX_LINE)
            if not line:
                return
            if not line.endswith(b"\n"):
                raise ConnectionError("the daemon sent a truncated or oversized event")
            ev = json.loads(line)
            if not isinstance(ev, dict):
                raise ConnectionError("the daemon sent a malformed event")
            yield ev
    finally:
        f.close()


# -- output ----------------------------------------------------------------------------------------


def format_result(res: dict[str, Any]) -> str:
    """One ingest outcome (an ``IngestResult`` as a dict) as the line ``peerd ingest`` prints."""
    if not res.get("ok"):
        return f"FAIL {res.get('error')}"
    if res.get("skipped"):
        return f"same {res['path']} -> {res['media_id']} (unchanged, already ingested)"
    wall = float(res.get("wall_s") or 0.0)
    duration = float(res.get("duration_s") or 0.0)
    speed = duration / wall if wall > 0 else 0.0
    line = (
        f"ok   {res['path']} -> {res['media_id']} [{','.join(res.get('renditions') or ())}] "
        f"{res.get('new_blobs', 0)} new / {res.get('reused_blobs', 0)} reused blobs, "
        f"{float(res.get('bytes_added') or 0) / 1e6:.1f} MB, {duration:.1f} s of media in "
        f"{wall:.2f} s ({speed:.1f}x real time)"
    )
    return "".join([line] + [f"\nwarn {res['path']}: {w}" for w in res.get("warnings") or ()])


def print_result(res: dict[str, Any], as_json: bool) -> None:
    """Print one outcome as a line of text or of JSON."""
    if as_json:
        wall = float(res.get("wall_s") or 0.0)
        speed = float(res.get("duration_s") or 0.0) / wall if wall > 0 else 0.0
        out = {**res, "speed": round(speed, 3)}
        print(json.dumps(out), flush=True)
    else:
        print(format_result(res), flush=True)


def bar_factory(enabled: bool) -> Callable[[str], ProgressFn | None]:
    """Per file, a tqdm bar on stderr in media seconds with the speed in x real time."""

    def make(name: str) -> ProgressFn | None:
        if not enabled:
            return None
        from tqdm import tqdm

        bar: Any = None
        started = time.monotonic()

        def progress(done: float, total: float) -> None:
            nonlocal bar
            if bar is None:
                bar = tqdm(
                    total=round(total, 1),
                    unit="s",
                    desc=name[:30],
                    file=sys.stderr,
                    leave=False,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s "
                    "[{elapsed}<{remaining}{postfix}]",
                )
            elapsed = max(time.monotonic() - started, 1e-6)
            bar.update(max(0.0, round(done, 1) - bar.n))
            bar.set_postfix_str(f"{done / elapsed:.1f}x real time", refresh=False)
            if total and done >= total:
                bar.close()

        return progress

    return make


# -- ingest through the daemon ---------------------------------------------------------------------


def ingest_via_daemon(state_dir: Path, args: argparse.Namespace) -> int | None:
    """Run ``peerd ingest`` in the node's daemon; None when no daemon listens (ingest locally).

    Exit codes as the local command: 0 all ok, 1 a file failed or none found, 130 interrupted
    (the daemon cancels the job and removes what it had written when the connection drops).
    """
    if args.local or args.watch:
        return None
    sock = connect(state_dir)
    if sock is None:
        return None
    show = not args.no_progress and not args.json and sys.stderr.isatty()
    bars = bar_factory(show)
    request: dict[str, Any] = {
        "op": "ingest",
        # As the local ingest records them (Path.absolute), so "unchanged" is recognised.
        "paths": [str(Path(p).absolute()) for p in args.paths],
        "force": bool(args.force),
        "media": media_overrides(args),
        "progress": show,
    }
    if args.from_bucket:
        keys = [p.as_posix() for p in args.paths]
        request = {"op": "ingest_upload", "keys": keys, "media": request["media"]}
    failed = files = 0
    current: tuple[str, ProgressFn | None] | None = None
    try:
        with sock:
            for ev in events(sock, request):
                kind = ev.get("event")
                if kind == "progress":
                    path = str(ev.get("path"))
                    if current is None or current[0] != path:
                        current = (path, bars(Path(path).name))
                    if current[1] is not None:
                        current[1](float(ev.get("done", 0.0)), float(ev.get("total", 0.0)))
                elif kind == "result":
                    res = ev.get("result")
                    if isinstance(res, dict):
                        files += 1
                        failed += 0 if res.get("ok") else 1
                        print_result(_hint(res), args.json)
                elif kind == "error":
                    print(f"peerd: {ev.get('message')}", file=sys.stderr)
                    return int(ev.get("exit_code", 1))
                elif kind == "end":
                    if not files:
                        print("peerd: no media files found", file=sys.stderr)
                        return 1
                    return 0 if not failed else 1
    except KeyboardInterrupt:
        return 130
    except (OSError, ValueError) as exc:
        print(f"peerd: lost the daemon while ingesting: {exc}", file=sys.stderr)
        return 1
    print("peerd: the daemon closed the connection before the ingest finished", file=sys.stderr)
    return 1


def _hint(res: dict[str, Any]) -> dict[str, Any]:
    """Say what to do when the daemon cannot read a file that this process can."""
    error = str(res.get("error") or "")
    if res.get("ok") or not any(m in error for m in _UNREADABLE):
        return res
    path = str(res.get("path", ""))
    if path and os.access(path, os.R_OK):
        return {
            **res,
            "error": f"{res.get('error')} (the daemon cannot read it: its user or sandbox; "
            "`peerd ingest --local` ingests in this process)",
        }
    return res


# -- command line ----------------------------------------------------------------------------------


def light_args(argv: list[str]) -> tuple[argparse.Namespace, argparse.Namespace] | None:
    """Global options and ``ingest`` arguments of ``argv``; None for any other command line
    (``peerd.__main__`` then runs the full CLI, which reports what is wrong)."""
    top = _Parser(prog="peerd", add_help=False)
    add_global_options(top)
    top.add_argument("command")
    top.add_argument("rest", nargs=argparse.REMAINDER)
    try:
        g = top.parse_args(argv)
        if g.command != "ingest" or any(a in ("-h", "--help") for a in g.rest):
            return None
        sub = _Parser(prog="peerd ingest", add_help=False)
        add_ingest_arguments(sub)
        return g, sub.parse_args(g.rest)
    except _ParseError:
        return None
