"""The ``peerd`` command line.

``init`` creates a node's state; ``run`` runs the daemon; ``status``, ``verify`` and ``doctor``
inspect it. Subsystems add their own subcommands through a ``register(subparsers)`` function,
one line each in :func:`build_parser`. Exit codes: 0 fine, 1 problems found or failure,
2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peerd import __version__, ctl, install
from peerd.api import cli as api_cli
from peerd.config import Settings, load_settings
from peerd.errors import ConfigError, PeerdError
from peerd.logs import setup_logging
from peerd.media import cli as media_cli
from peerd.replication import cli as replication_cli

Command = Callable[[argparse.Namespace, Settings], int]

GENERATED_SECRETS = ("hls_signing_key", "api_token", "admin_token")


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "state_dir", None):
        overrides["node"] = {"state_dir": args.state_dir}
    settings = load_settings(args.config, **overrides)
    if args.state_dir and args.config:
        settings.node.state_dir = args.state_dir
    return settings


# -- init ------------------------------------------------------------------------------------------


def cmd_init(args: argparse.Namespace, settings: Settings) -> int:
    """Create the state directory, node key, secrets and an example config."""
    from peerd.identity import load_or_create

    state = settings.state_dir
    state.mkdir(parents=True, exist_ok=True, mode=0o750)
    ident, created = load_or_create(settings.key_path)
    sdir = settings.secrets_path
    sdir.mkdir(parents=True, exist_ok=True, mode=0o700)
    made = []
    for name in GENERATED_SECRETS:
        path = sdir / name
        if path.exists():
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        made.append(name)
    asyncio.run(_create_catalog(settings))
    cfg = state / "peerd.toml"
    if not cfg.exists():
        from importlib import resources

        example = resources.files("peerd").joinpath("example.toml").read_text("utf-8")
        cfg.write_text(
            example.replace('state_dir = "~/.local/share/peerd"', f'state_dir = "{state}"')
        )
    print(f"state dir:  {state}")
    print(f"peer id:    {ident.peer_id}{'  (new)' if created else ''}")
    print(f"config:     {cfg}")
    print(f"secrets:    {sdir} {'(created ' + ', '.join(made) + ')' if made else '(kept)'}")
    return 0


async def _create_catalog(settings: Settings) -> None:
    from peerd.catalog import Catalog

    cat = await Catalog.open(settings.catalog_path)
    await cat.close()


def node_exists(settings: Settings) -> bool:
    """True if ``settings`` point at an initialised node; otherwise say so on stderr."""
    if settings.catalog_path.exists():
        return True
    print(f"no node at {settings.state_dir} (run `peerd init`)", file=sys.stderr)
    return False


# -- run -------------------------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """Run the daemon in the foreground."""
    from peerd.daemon import run_daemon
    from peerd.lock import StateLock

    setup_logging(settings.log.level, settings.log.format)
    settings.state_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
    try:
        with StateLock(settings.state_dir):
            return asyncio.run(run_daemon(settings))
    except PeerdError as exc:
        logging.getLogger("peerd").error("cannot start", extra={"error": exc.message})
        return getattr(exc, "exit_code", 1)


# -- status ----------------------------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Print what the node holds and whether its daemon answers."""
    return asyncio.run(_status(args, settings))


async def _status(args: argparse.Namespace, settings: Settings) -> int:
    from peerd.catalog import Catalog
    from peerd.catalog.media import media_count
    from peerd.catalog.outbox import job_counts

    if not node_exists(settings):
        return 1
    cat = await Catalog.open(settings.catalog_path)
    try:
        count, size = await cat.present_stats()
        media = await media_count(cat)
        jobs = await job_counts(cat)
    finally:
        await cat.close()
    daemon = await _probe_daemon(settings)
    info = {
        "state_dir": str(settings.state_dir),
        "media": media,
        "blobs": count,
        "bytes": size,
        "quota_bytes": settings.store.quota_bytes,
        "replication_jobs": jobs,
        "daemon": daemon,
    }
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for k, v in info.items():
            print(f"{k:18} {v}")
    return 0


async def _probe_daemon(settings: Settings) -> str:
    addr = settings.state_dir / "http.addr"
    try:
        host, _, port = addr.read_text().strip().rpartition(":")
    except FileNotFoundError:
        return "not running"
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, int(port)), 2)
    except (OSError, TimeoutError, ValueError):
        return "not running"
    try:
        writer.write(f"GET /readyz HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
        line = await asyncio.wait_for(reader.readline(), 2)
    except (OSError, TimeoutError):
        return "not answering"
    finally:
        writer.close()
    code = line.split(b" ")[1:2]
    return {b"200": "ready", b"503": "starting or draining"}.get(code[0] if code else b"", "error")


# -- verify ----------------------------------------------------------------------------------------


def cmd_verify(args: argparse.Namespace, settings: Settings) -> int:
    """Check the catalog against the store; exit 1 if anything is wrong."""
    return asyncio.run(_verify(args, settings))


async def _verify(args: argparse.Namespace, settings: Settings) -> int:
    from tqdm import tqdm

    from peerd.catalog import Catalog
    from peerd.store import BlobStore

    if not node_exists(settings):
        return 1
    cat = await Catalog.open(settings.catalog_path)
    try:
        store = BlobStore(settings.blob_dir, cat)
        await store.open()
        if args.repair:
            from peerd.lock import StateLock

            with StateLock(settings.state_dir):
                rec = await store.recover()
            print(f"repair: {json.dumps(vars(rec))}", file=sys.stderr)
        bar = tqdm(
            total=store.count, unit="blob", desc="verify", file=sys.stderr, disable=args.json
        )
        report = await store.verify(deep=not args.quick, progress=bar.update)
        bar.close()
    finally:
        await cat.close()
    problems = report.problems()
    if args.json:
        print(json.dumps({"ok": report.ok, "checked": report.blobs_checked, **problems}))
    else:
        print(f"checked {report.blobs_checked} blobs: {'OK' if report.ok else 'PROBLEMS'}")
        for name, items in problems.items():
            print(f"  {name}: {len(items)}")
            for item in items[:20]:
                print(f"    {item}")
    return 0 if report.ok else 1


# -- doctor ----------------------------------------------------------------------------------------

Check = tuple[str, bool, str]


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    """Check the configuration and the machine, and say in plain words what is wrong."""
    checks = run_doctor_checks(settings)
    bad = 0
    for name, ok, text in checks:
        mark = "ok  " if ok else "FAIL"
        bad += not ok
        print(f"[{mark}] {name}: {text}")
    print(f"{len(checks) - bad} passed, {bad} failed")
    return 0 if bad == 0 else 1


def run_doctor_checks(settings: Settings) -> list[Check]:
    """Every doctor check, as (name, ok, explanation)."""
    ignored = settings.uplink_keys_ignored()
    note = f"; {', '.join(ignored)} ignored: [uplink] budget_mbps is set" if ignored else ""
    out: list[Check] = [("config", True, "loaded and valid" + note)]
    state = settings.state_dir
    if not state.exists():
        out.append(("state dir", False, f"{state} does not exist: run `peerd init`"))
    elif not os.access(state, os.W_OK):
        out.append(("state dir", False, f"{state} is not writable by uid {os.getuid()}"))
    else:
        out.append(("state dir", True, str(state)))
    key = settings.key_path
    if key.exists():
        mode = key.stat().st_mode & 0o777
        private = mode & 0o077 == 0
        out.append(
            ("node key", private, f"{key} mode {mode:o}" + ("" if private else ": run chmod 600"))
        )
    else:
        out.append(("node key", False, f"{key} missing: run `peerd init`"))
    probe = state if state.exists() else Path("/")
    free = shutil.disk_usage(probe).free
    need = settings.store.min_free_bytes
    out.append(
        ("disk", free > need, f"{free / 2**30:.1f} GiB free (reserve {need / 2**30:.1f} GiB)")
    )
    if settings.store.quota_bytes and settings.store.quota_bytes > free:
        out.append(("quota", True, "quota is larger than free disk: the disk limit applies first"))
    host, port = settings.http.host, settings.http.port
    if port:
        out.append(_check_port(host, port, settings))
    for name in GENERATED_SECRETS:
        present = settings.secret(name) is not None
        why = "present" if present else f"missing in {settings.secrets_path}: run `peerd init`"
        out.append((f"secret {name}", present, why))
    out += _optional_service_checks(settings)
    ffprobe = shutil.which("ffprobe")
    out.append(
        ("ffprobe", True, ffprobe or "not installed (optional: used by tests and diagnostics)")
    )
    return out


def _optional_service_checks(settings: Settings) -> list[Check]:
    """Optional subsystems: configured half-way is an error, not configured is fine."""
    out: list[Check] = []
    r2 = settings.r2
    keys = [settings.secret(n) is not None for n in ("r2_access_key_id", "r2_secret_access_key")]
    wanted = bool(r2.bucket or r2.account_id or r2.endpoint)
    if not wanted:
        out.append(("r2", True, "not configured: the node runs without R2"))
    elif not (r2.bucket and (r2.account_id or r2.endpoint)):
        out.append(("r2", False, "[r2] needs both bucket and account_id (or endpoint)"))
    elif not all(keys):
        out.append(
            (
                "r2",
                False,
                "secrets r2_access_key_id and r2_secret_access_key must both be present in "
                f"{settings.secrets_path}",
            )
        )
    else:
        out.append(("r2", True, f"bucket {r2.bucket}"))
    turn = [settings.secret(n) is not None for n in ("turn_key_id", "turn_api_token")]
    if any(turn) and not all(turn):
        out.append(
            ("turn", False, "Cloudflare TURN needs both secrets turn_key_id and turn_api_token")
        )
    elif all(turn):
        out.append(("turn", True, "Cloudflare TURN credentials present"))
    if settings.api.require_access_jwt and not settings.http.access_team_url:
        out.append(("api access", False, "api.require_access_jwt needs http.access_team_url"))
    if settings.http.auth == "access" and not (
        settings.http.access_team_url and settings.http.access_aud
    ):
        out.append(
            ("viewer access", False, "http.auth = access needs access_team_url and access_aud")
        )
    if settings.mdns.enabled and settings.http.host in ("127.0.0.1", "::1", "localhost"):
        out.append(
            (
                "lan",
                True,
                "http.host is loopback: LAN peers cannot fetch from this node (set http.host or "
                "mdns.advertise_addresses to a LAN address to share with them)",
            )
        )
    return out


def _check_port(host: str, port: int, settings: Settings) -> Check:
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        addr = settings.state_dir / "http.addr"
        if addr.exists() and addr.read_text().strip() == f"{host}:{port}":
            return ("http port", True, f"{host}:{port} in use by this node's daemon")
        return (
            "http port",
            False,
            f"cannot bind {host}:{port}: {exc.strerror}; change [http] port",
        )
    return ("http port", True, f"{host}:{port} is free")


# -- parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="peerd", description="peerd: a self-hosted media peer node."
    )
    parser.add_argument("--version", action="version", version=f"peerd {__version__}")
    ctl.add_global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create state dir, node identity, secrets, example config")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("run", help="run the daemon in the foreground")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("status", help="what the node holds; whether the daemon answers")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("verify", help="check catalog against store; non-zero exit on problems")
    p.add_argument("--quick", action="store_true", help="sizes only, no re-hashing")
    p.add_argument(
        "--repair", action="store_true", help="run crash recovery first (daemon stopped)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser("doctor", help="check config, ports, disk, secrets; explain problems")
    p.set_defaults(func=cmd_doctor)
    media_cli.register(sub)
    install.register(sub)
    replication_cli.register(sub)
    api_cli.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``peerd`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "run":
        setup_logging("warning", "text", sys.stderr)
    try:
        settings = _settings(args)
        func: Command = args.func
        return func(args, settings)
    except ConfigError as exc:
        print(f"peerd: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except PeerdError as exc:
        print(f"peerd: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
