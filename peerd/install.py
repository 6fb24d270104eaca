"""``peerd install``: put the systemd unit, config and secrets in place on a Debian host.

What it does, each step idempotent (a second run changes nothing and says so):

1. the ``peerd`` system user and group, through a sysusers.d file and ``systemd-sysusers``
   (works offline and with ``--root``, unlike ``useradd`` in a chroot);
2. ``/etc/peerd/peerd.toml`` from the example config, with the system paths filled in (kept if it
   exists: it is the operator's file);
3. ``/etc/credstore/peerd/`` (root only, 0700) with the generated secrets ``hls_signing_key``,
   ``api_token`` and ``admin_token`` (0600; existing ones are kept);
4. ``/etc/systemd/system/peerd.service`` rendered from the shipped unit with ``ExecStart`` pointing
   at the Python running this command, plus drop-ins in ``peerd.service.d/``:
   ``credentials.conf`` loads every other secret file found in the credstore (R2 keys, TURN key,
   added later by the operator) and ``paths.conf`` grants read access to the media library;
5. without ``--root``: ``systemctl daemon-reload`` and, with ``--enable``, ``enable --now``.

``--root DIR`` installs into a directory tree instead of ``/`` (tests, image builds); nothing
outside it is touched and systemctl is not called.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from peerd.config import Settings
from peerd.errors import ConfigError

USER = "peerd"
CONFIG_PATH = Path("etc/peerd/peerd.toml")
CREDSTORE = Path("etc/credstore/peerd")
UNIT_PATH = Path("etc/systemd/system/peerd.service")
DROPIN_DIR = Path("etc/systemd/system/peerd.service.d")
SYSUSERS_PATH = Path("usr/lib/sysusers.d/peerd.conf")
STATE_DIR = "/var/lib/peerd"
CACHE_DIR = "/var/cache/peerd"
# The secrets the unit always loads (LoadCredential= in peerd.service); generated here.
CORE_SECRETS = ("hls_signing_key", "api_token", "admin_token")
SECRET_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
# Directories the unit's sandbox hides or replaces: a Python living there cannot start.
HIDDEN_PREFIXES = ("/home/", "/root/", "/run/user/", "/tmp/", "/var/tmp/")  # noqa: S108
SYSUSERS_LINE = f'u {USER} - "peerd media node" {STATE_DIR} /usr/sbin/nologin\n'


@dataclass
class Report:
    """What one install run did, step by step."""

    steps: list[tuple[str, str]] = field(default_factory=list)

    def add(self, what: str, outcome: str) -> None:
        """Record one step (``outcome``: created, updated, kept, removed, ran, skipped)."""
        self.steps.append((what, outcome))

    @property
    def changed(self) -> bool:
        """Whether anything on disk changed."""
        return any(o in ("created", "updated", "removed") for _, o in self.steps)


def shipped_unit() -> str:
    """The unit file shipped with the package (the same file as ``systemd/peerd.service``)."""
    return resources.files("peerd").joinpath("deploy/peerd.service").read_text("utf-8")


def render_unit(template: str, python: str, config: str = "/" + str(CONFIG_PATH)) -> str:
    """The shipped unit with ``ExecStart=`` running ``python -m peerd`` with ``config``."""
    exec_line = f"ExecStart={python} -m peerd --config {config} run"
    out, n = re.subn(r"(?m)^ExecStart=.*$", exec_line, template)
    if n != 1:
        raise ConfigError("the shipped unit must have exactly one ExecStart= line")
    return out


def render_config(example: str) -> str:
    """The example config with the paths a systemd install uses."""
    text = example.replace(
        'state_dir = "~/.local/share/peerd"', f'state_dir = "{STATE_DIR}"'
    ).replace('# cache_dir = "/var/cache/peerd"', f'cache_dir = "{CACHE_DIR}"')
    text = re.sub(
        r"(?m)^# secrets_dir = .*$",
        "# The service reads secrets from $CREDENTIALS_DIRECTORY; this is for `peerd doctor`.\n"
        f'secrets_dir = "/{CREDSTORE}"',
        text,
    )
    if f'state_dir = "{STATE_DIR}"' not in text:
        raise ConfigError("the example config has no [node] state_dir line to fill in")
    return text


def credentials_dropin(names: list[str]) -> str | None:
    """``LoadCredential=`` lines for the extra secrets, or None when there are none."""
    if not names:
        return None
    lines = [
        "# Written by `peerd install`: every secret file in /etc/credstore/peerd/ besides the",
        "# ones peerd.service loads itself. Re-run `peerd install` after adding or removing one.",
        "[Service]",
    ]
    lines += [f"LoadCredential={n}:/{CREDSTORE}/{n}" for n in names]
    return "\n".join(lines) + "\n"


def paths_dropin(paths: list[Path]) -> str | None:
    """``ReadOnlyPaths=`` for the media library, or None when none was given."""
    if not paths:
        return None
    lines = [
        "# Written by `peerd install --media-dir`: the media library, read-only for the service",
        "# (ProtectSystem=strict and ProtectHome=yes hide or freeze everything else).",
        "[Service]",
    ]
    lines += [f"ReadOnlyPaths={p}" for p in paths]
    if any(str(p).startswith("/home/") or p == Path("/home") for p in paths):
        lines.append("ProtectHome=read-only")
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str, mode: int, report: Report, what: str) -> None:
    """Write ``text`` atomically if it differs; record created/updated/kept."""
    old: str | None
    try:
        old = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        old = None
    if old == text:
        if path.stat().st_mode & 0o777 != mode:
            path.chmod(mode)
            report.add(what, "updated")
        else:
            report.add(what, "kept")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.chmod(mode)
    tmp.replace(path)
    report.add(what, "created" if old is None else "updated")


def _remove(path: Path, report: Report, what: str) -> None:
    if path.exists():
        path.unlink()
        report.add(what, "removed")


def install(
    root: Path,
    *,
    python: str,
    media_dirs: list[Path] | None = None,
    run_systemctl: bool = False,
    enable: bool = False,
) -> Report:
    """Install into ``root`` (``/`` on a real host); returns what was done."""
    report = Report()
    media_dirs = media_dirs or []
    for m in media_dirs:
        if not m.is_absolute():
            raise ConfigError(f"--media-dir must be an absolute path: {m}")
    if root == Path("/"):
        for m in media_dirs:
            if not m.is_dir():
                raise ConfigError(f"--media-dir {m} is not a directory (the unit would not start)")
    if not python.startswith("/"):
        raise ConfigError(f"--python must be an absolute path: {python}")
    if python.startswith(HIDDEN_PREFIXES):
        raise ConfigError(
            f"{python} is under a directory the service cannot see (ProtectHome=, PrivateTmp=): "
            "install peerd into a virtualenv under /opt (see README) and run its `peerd install`"
        )

    # 1. the system user
    _write(root / SYSUSERS_PATH, SYSUSERS_LINE, 0o644, report, str(SYSUSERS_PATH))
    before = _passwd_has(root, USER)
    if shutil.which("systemd-sysusers") is None:
        raise ConfigError("systemd-sysusers not found: install the Debian package `systemd`")
    (root / "etc").mkdir(parents=True, exist_ok=True)  # sysusers locks etc/.pwd.lock there
    cmd = ["systemd-sysusers"]
    if root != Path("/"):
        cmd.append(f"--root={root}")
    cmd.append(str(root / SYSUSERS_PATH))
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
    if res.returncode != 0:
        raise ConfigError(f"systemd-sysusers failed: {res.stderr.strip()}")
    if not _passwd_has(root, USER):
        raise ConfigError(f"systemd-sysusers did not create user {USER!r}")
    report.add(f"user {USER}", "kept" if before else "created")

    # 2. config (the operator's file once it exists)
    cfg = root / CONFIG_PATH
    if cfg.exists():
        report.add(str(CONFIG_PATH), "kept")
    else:
        example = resources.files("peerd").joinpath("example.toml").read_text("utf-8")
        _write(cfg, render_config(example), 0o644, report, str(CONFIG_PATH))

    # 3. secrets
    store = root / CREDSTORE
    store.mkdir(parents=True, exist_ok=True, mode=0o700)
    store.chmod(0o700)
    for name in CORE_SECRETS:
        path = store / name
        if path.exists():
            if path.stat().st_mode & 0o077:
                path.chmod(0o600)
                report.add(f"secret {name}", "updated")
            else:
                report.add(f"secret {name}", "kept")
            continue
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        report.add(f"secret {name}", "created")
    extra = sorted(
        p.name
        for p in store.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name not in CORE_SECRETS
    )
    for name in extra:
        if not SECRET_NAME.match(name):
            raise ConfigError(f"secret file name not usable as a credential id: {store / name}")
        if (store / name).stat().st_mode & 0o077:
            (store / name).chmod(0o600)
            report.add(f"secret {name}", "updated")

    # 4. unit and drop-ins
    _write(root / UNIT_PATH, render_unit(shipped_unit(), python), 0o644, report, str(UNIT_PATH))
    for fname, text in (
        ("credentials.conf", credentials_dropin(extra)),
        ("paths.conf", paths_dropin(media_dirs)),
    ):
        target = root / DROPIN_DIR / fname
        if text is None:
            # No --media-dir this time keeps the library granted earlier.
            if fname == "credentials.conf":
                _remove(target, report, str(DROPIN_DIR / fname))
            continue
        _write(target, text, 0o644, report, str(DROPIN_DIR / fname))

    # 5. systemd
    if run_systemctl:
        _systemctl(["daemon-reload"], report)
        if enable:
            _systemctl(["enable", "--now", "peerd.service"], report)
    return report


def _passwd_has(root: Path, user: str) -> bool:
    try:
        lines = (root / "etc/passwd").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return False
    return any(line.split(":", 1)[0] == user for line in lines)


def _systemctl(args: list[str], report: Report) -> None:
    if not Path("/run/systemd/system").is_dir():
        report.add("systemctl " + " ".join(args), "skipped (systemd is not running)")
        return
    res = subprocess.run(["systemctl", *args], capture_output=True, text=True, check=False)  # noqa: S603,S607
    if res.returncode != 0:
        raise ConfigError(f"systemctl {' '.join(args)} failed: {res.stderr.strip()}")
    report.add("systemctl " + " ".join(args), "ran")


def cmd_install(args: argparse.Namespace, settings: Settings) -> int:
    """Install the unit, config and secrets; print each step."""
    root: Path = args.root or Path("/")
    if args.root is None and os.geteuid() != 0:
        print("peerd install: run as root (or give --root DIR)", file=sys.stderr)
        return 2
    report = install(
        root.resolve(),
        python=args.python or sys.executable,
        media_dirs=args.media_dir,
        run_systemctl=args.root is None,
        enable=args.enable,
    )
    for what, outcome in report.steps:
        print(f"{outcome:>8}  {what}")
    if args.root is None and not args.enable:
        print("next: systemctl enable --now peerd   (then: journalctl -u peerd -f)")
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``peerd install`` to the command line."""
    p = subparsers.add_parser(
        "install", help="install the systemd unit, config and secrets (Debian host)"
    )
    p.add_argument("--root", type=Path, help="install into this directory tree instead of /")
    p.add_argument("--python", help="Python that runs peerd (default: this one)")
    p.add_argument(
        "--media-dir",
        type=Path,
        action="append",
        default=[],
        help="media library the service may read (repeatable)",
    )
    p.add_argument("--enable", action="store_true", help="also systemctl enable --now peerd")
    p.set_defaults(func=cmd_install)
