"""A fake ``cloudflared`` (and ``systemctl``) for testing ``scripts/cloudflared/``.

cloudflared cannot be installed here (no Debian package, no network to Cloudflare), so the
tests put executables named ``cloudflared`` and ``systemctl`` on ``PATH`` that run this module.
It keeps the account's state (tunnels, DNS records, services) in ``$FAKE_CLOUDFLARED_STATE``,
records every call in ``calls.jsonl`` there, and answers like cloudflared 2024.x does, for the
subset the scripts use:

* ``tunnel list --output json [--name N]``: a JSON array of ``{"id", "name", "created_at",
  "deleted_at", "connections"}`` (live tunnels only; ``deleted_at`` is Go's zero time);
* ``tunnel create [--output json] [--credentials-file P] NAME``: writes the credentials file
  ``{"AccountTag", "TunnelSecret", "TunnelID", "Endpoint"}`` (mode 0400, next to the origin
  certificate unless a path is given); fails when the name is taken;
* ``tunnel route dns [--overwrite-dns|-f] TUNNEL HOSTNAME``: adds a CNAME to
  ``<id>.cfargotunnel.com``, says so when it is already there, fails on a record pointing
  elsewhere unless overwriting;
* ``tunnel token [--cred-file P] TUNNEL``: prints the token or writes the credentials file;
* ``tunnel --config F ingress validate``: cloudflared's ingress checks (a catch-all last rule,
  known services, no catch-all before the end, valid hostnames);
* ``--config F service install``: writes ``$SYSTEMD_UNIT_DIR/cloudflared.service``, refuses when
  it exists.

Every command but ``ingress validate`` and ``--version`` needs the origin certificate
(``$TUNNEL_ORIGIN_CERT``), as the real one does.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

VERSION = "cloudflared version 2024.8.2 (built 2024-08-22-1453 UTC)"
ZERO_TIME = "0001-01-01T00:00:00Z"
ACCOUNT = "0123456789abcdef0123456789abcdef"
SERVICE_RE = re.compile(
    r"^(https?://[^\s/]+(/.*)?|unix:/.+|unix\+tls:/.+|tcp://\S+|ssh://\S+|rdp://\S+|smb://\S+"
    r"|http_status:[1-5][0-9][0-9]|hello_world|bastion|socks5)$"
)
HOST_RE = re.compile(r"^(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$")


class Fail(Exception):
    """A cloudflared error: message to stderr, exit code 1."""


def _state_dir() -> Path:
    d = os.environ.get("FAKE_CLOUDFLARED_STATE")
    if not d:
        raise Fail("FAKE_CLOUDFLARED_STATE is not set")
    return Path(d)


def _load() -> dict[str, Any]:
    path = _state_dir() / "account.json"
    if path.exists():
        data: dict[str, Any] = json.loads(path.read_text())
        return data
    return {"tunnels": [], "dns": {}, "services": {}}


def _save(state: dict[str, Any]) -> None:
    path = _state_dir() / "account.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)


def _log(tool: str, argv: list[str]) -> None:
    with (_state_dir() / "calls.jsonl").open("a") as f:
        f.write(json.dumps({"tool": tool, "argv": argv}) + "\n")


def _info(msg: str) -> None:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"{now} INF {msg}", file=sys.stderr)


def _origin_cert() -> Path:
    cert = Path(os.environ.get("TUNNEL_ORIGIN_CERT") or Path.home() / ".cloudflared" / "cert.pem")
    if not cert.is_file():
        raise Fail(
            f"Cannot determine default origin certificate path. No file {cert.name} in "
            f"[{cert.parent}]. You need to specify the origin certificate path by specifying "
            "the origincert option in the configuration file, or set TUNNEL_ORIGIN_CERT "
            "environment variable originCertPath="
        )
    return cert


def _split(args: list[str], with_value: set[str]) -> tuple[dict[str, str | bool], list[str]]:
    """Flags (``--x v``, ``--x=v``, ``-x``) and positional arguments, in urfave/cli style: flag
    parsing stops at the first positional argument, so a flag placed after one is taken as an
    argument (and the call fails), as with the real binary."""
    flags: dict[str, str | bool] = {}
    pos: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("-") and len(a) > 1 and not pos:
            name, eq, val = a.lstrip("-").partition("=")
            if eq:
                flags[name] = val
            elif name in with_value:
                if i + 1 >= len(args):
                    raise Fail(f"flag needs an argument: -{name}")
                flags[name] = args[i + 1]
                i += 1
            else:
                flags[name] = True
        else:
            pos.append(a)
        i += 1
    return flags, pos


def _tunnel_json(t: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": t["id"],
        "name": t["name"],
        "created_at": t["created_at"],
        "deleted_at": ZERO_TIME,
        "connections": [],
    }


def _find(state: dict[str, Any], ref: str) -> dict[str, Any]:
    for t in state["tunnels"]:
        if ref in (t["id"], t["name"]):
            return dict(t)
    raise Fail(f"{ref} is neither the ID nor the name of any of your tunnels")


def _write_creds(path: Path, t: dict[str, Any]) -> None:
    body = {
        "AccountTag": ACCOUNT,
        "TunnelSecret": t["secret"],
        "TunnelID": t["id"],
        "Endpoint": "",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        path.chmod(0o600)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
    with os.fdopen(fd, "w") as f:
        json.dump(body, f)
    path.chmod(0o400)


def tunnel(args: list[str], top: dict[str, str | bool]) -> int:
    """``cloudflared tunnel ...``."""
    tflags, rest = _split_prefix(args)
    top = {**top, **tflags}
    if not rest:
        raise Fail("tunnel: a subcommand is required")
    sub, args = rest[0], rest[1:]
    if sub == "ingress":
        return ingress(args, top)
    _origin_cert()
    state = _load()
    if sub == "list":
        flags, _ = _split(args, {"output", "o", "name", "n", "id", "i", "when", "w"})
        name = flags.get("name") or flags.get("n")
        tunnels = [_tunnel_json(t) for t in state["tunnels"] if not name or t["name"] == name]
        if flags.get("output") or flags.get("o"):
            print(json.dumps(tunnels, indent=2))
        elif tunnels:
            print("ID NAME CREATED CONNECTIONS")
            for t in tunnels:
                print(t["id"], t["name"], t["created_at"], "")
        else:
            print(
                "No tunnels were found for the given filter flags. You can use "
                "'cloudflared tunnel create' to create a tunnel."
            )
        return 0
    if sub == "create":
        flags, pos = _split(args, {"output", "o", "credentials-file", "cred-file", "secret", "s"})
        if len(pos) != 1:
            raise Fail(
                '"cloudflared tunnel create" requires exactly 1 argument, '
                "the name of tunnel to create."
            )
        name = pos[0]
        if any(t["name"] == name for t in state["tunnels"]):
            raise Fail(
                "failed to create tunnel: Create Tunnel API call failed: "
                "tunnel with name already exists"
            )
        t = {
            "id": str(uuid.uuid4()),
            "name": name,
            "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "secret": base64.b64encode(os.urandom(32)).decode(),
        }
        cred = flags.get("credentials-file") or flags.get("cred-file")
        path = Path(str(cred)) if cred else _origin_cert().parent / f"{t['id']}.json"
        state["tunnels"].append(t)
        _save(state)
        _write_creds(path, t)
        if flags.get("output") or flags.get("o"):
            print(json.dumps(_tunnel_json(t), indent=2))
        else:
            print(f"Tunnel credentials written to {path}. Keep this file secret.")
            print(f"\nCreated tunnel {name} with id {t['id']}")
        return 0
    if sub == "route":
        if args[:1] != ["dns"]:
            raise Fail("route: only 'dns' is faked")
        flags, pos = _split(args[1:], set())
        if len(pos) != 2:
            raise Fail(
                'This command expects the format "cloudflared tunnel route dns '
                '<tunnel name/id> <hostname>"'
            )
        t = _find(state, pos[0])
        host = pos[1]
        if not HOST_RE.match(host):
            raise Fail(f"{host} is not a valid hostname")
        target = f"{t['id']}.cfargotunnel.com"
        current = state["dns"].get(host)
        if current == target:
            _info(f"{host} is already configured to route to your tunnel tunnelID={t['id']}")
            return 0
        if current is not None and not (flags.get("overwrite-dns") or flags.get("f")):
            raise Fail(
                f"Failed to add route: code: 1003, reason: Failed to create record {host} with "
                "err An A, AAAA, or CNAME record with that host already exists."
            )
        state["dns"][host] = target
        _save(state)
        _info(f"Added CNAME {host} which will route to this tunnel tunnelID={t['id']}")
        return 0
    if sub == "token":
        flags, pos = _split(args, {"cred-file", "credentials-file"})
        if len(pos) != 1:
            raise Fail(
                '"cloudflared tunnel token" requires exactly 1 argument, the name or UUID of '
                "tunnel to fetch the credentials token for."
            )
        t = _find(state, pos[0])
        cred = flags.get("cred-file") or flags.get("credentials-file")
        if cred:
            _write_creds(Path(str(cred)), t)
            return 0
        token = {"a": ACCOUNT, "t": t["id"], "s": t["secret"]}
        print(base64.b64encode(json.dumps(token).encode()).decode())
        return 0
    raise Fail(f"unknown tunnel subcommand {sub!r}")


def _split_prefix(args: list[str]) -> tuple[dict[str, str | bool], list[str]]:
    """Flags before the subcommand (``--config F``, ``--origincert F``, ``--loglevel L``)."""
    flags: dict[str, str | bool] = {}
    i = 0
    while i < len(args) and args[i].startswith("-"):
        name, eq, val = args[i].lstrip("-").partition("=")
        if eq:
            flags[name] = val
        elif name in ("config", "origincert", "loglevel", "logfile", "metrics", "cred-file"):
            flags[name] = args[i + 1]
            i += 1
        else:
            flags[name] = True
        i += 1
    if isinstance(flags.get("origincert"), str):
        os.environ["TUNNEL_ORIGIN_CERT"] = str(flags["origincert"])
    return flags, args[i:]


def validate_ingress(config: dict[str, Any]) -> None:
    """cloudflared's ingress rule checks; raises :class:`Fail` with its wording."""
    rules = config.get("ingress")
    if not isinstance(rules, list) or not rules:
        raise Fail("Validation failed: The config file doesn't contain any ingress rules")
    for i, rule in enumerate(rules):
        if not isinstance(rule, dict):
            raise Fail(f"Validation failed: rule #{i + 1} is not a mapping")
        service = rule.get("service")
        if not isinstance(service, str) or not SERVICE_RE.match(service):
            raise Fail(f"Validation failed: rule #{i + 1} has an invalid service {service!r}")
        host = rule.get("hostname")
        if host is not None and host != "*" and not HOST_RE.match(str(host)):
            raise Fail(f"Validation failed: rule #{i + 1} has an invalid hostname {host!r}")
        if "path" in rule:
            try:
                re.compile(str(rule["path"]))
            except re.error as exc:
                raise Fail(f"Validation failed: rule #{i + 1} path: {exc}") from None
        last = i == len(rules) - 1
        catch_all = host in (None, "", "*") and not rule.get("path")
        if last and not catch_all:
            raise Fail(
                "Validation failed: The last ingress rule must match all URLs (i.e. it should "
                "not have a hostname or path filter)"
            )
        if not last and catch_all:
            raise Fail(
                f"Validation failed: Rule #{i + 1} is matching all URLs (no hostname or path "
                "filter), so rules after it will never be used"
            )


def ingress(args: list[str], top: dict[str, str | bool]) -> int:
    """``cloudflared tunnel --config F ingress validate``."""
    if args[:1] != ["validate"]:
        raise Fail("ingress: only 'validate' is faked")
    cfg = top.get("config")
    if not isinstance(cfg, str):
        raise Fail("Validation failed: no config file given")
    print(f"Validating rules from {cfg}")
    try:
        data = yaml.safe_load(Path(cfg).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise Fail(f"Validation failed: {exc}") from None
    if not isinstance(data, dict):
        raise Fail("Validation failed: config is not a mapping")
    validate_ingress(data)
    print("OK")
    return 0


def service(args: list[str], top: dict[str, str | bool]) -> int:
    """``cloudflared [--config F] service install``."""
    if args[:1] != ["install"]:
        raise Fail("service: only 'install' is faked")
    unit_dir = Path(os.environ.get("SYSTEMD_UNIT_DIR", "/etc/systemd/system"))
    unit = unit_dir / "cloudflared.service"
    if unit.exists():
        raise Fail(
            f"cloudflared service is already installed at {unit}; if you are running a "
            "cloudflared tunnel, you can point it to multiple origins, avoiding the need to run "
            "more than one cloudflared service in the same machine; otherwise if you are really "
            "sure, you can do `cloudflared service uninstall` to clean up the existing service "
            "and then try again this command"
        )
    cfg = str(top.get("config") or "/etc/cloudflared/config.yml")
    data = yaml.safe_load(Path(cfg).read_text())
    for key in ("tunnel", "credentials-file"):
        if key not in data:
            raise Fail(f"Configuration file {cfg} must contain entry {key}")
    unit_dir.mkdir(parents=True, exist_ok=True)
    unit.write_text(
        "[Unit]\nDescription=cloudflared\nAfter=network-online.target\n"
        "Wants=network-online.target\n\n[Service]\nType=notify\n"
        f"ExecStart=/usr/bin/cloudflared --no-autoupdate --config {cfg} tunnel run\n"
        "Restart=on-failure\nRestartSec=5s\n\n[Install]\nWantedBy=multi-user.target\n"
    )
    state = _load()
    state["services"]["cloudflared.service"] = {"enabled": True, "active": True}
    _save(state)
    _info("Using Systemd")
    _info("Linux service for cloudflared installed successfully")
    return 0


def cloudflared(argv: list[str]) -> int:
    """The ``cloudflared`` entry point."""
    if argv[:1] in (["--version"], ["-v"], ["version"]):
        print(VERSION)
        return 0
    top, rest = _split_prefix(argv)
    if not rest:
        raise Fail("no command given")
    cmd, args = rest[0], rest[1:]
    if cmd == "tunnel":
        return tunnel(args, top)
    if cmd == "service":
        return service(args, top)
    raise Fail(f"unknown command {cmd!r}")


def systemctl(argv: list[str]) -> int:
    """The few ``systemctl`` verbs the scripts use, on the fake's service table."""
    quiet = "--quiet" in argv or "-q" in argv
    args = [a for a in argv if not a.startswith("-")]
    if len(args) != 2:
        raise Fail(f"systemctl: unsupported call {argv}")
    verb, unit = args
    state = _load()
    svc = state["services"].setdefault(unit, {"enabled": False, "active": False})
    if verb == "is-enabled":
        if not quiet:
            print("enabled" if svc["enabled"] else "disabled")
        return 0 if svc["enabled"] else 1
    if verb == "is-active":
        if not quiet:
            print("active" if svc["active"] else "inactive")
        return 0 if svc["active"] else 3
    if verb == "enable":
        svc["enabled"] = True
    elif verb in ("start", "restart"):
        svc["active"] = True
        svc["restarts"] = svc.get("restarts", 0) + (verb == "restart")
    elif verb == "stop":
        svc["active"] = False
    else:
        raise Fail(f"systemctl: unsupported verb {verb}")
    _save(state)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m tests.support.fake_cloudflared [--as systemctl] ARGS...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    tool = "cloudflared"
    if args[:2] == ["--as", "systemctl"]:
        tool, args = "systemctl", args[2:]
    try:
        _log(tool, args)
        return systemctl(args) if tool == "systemctl" else cloudflared(args)
    except Fail as exc:
        print(f"{exc}", file=sys.stderr)
        return 1


def install_shims(bin_dir: Path, state_dir: Path, python: str | None = None) -> dict[str, str]:
    """Write ``cloudflared`` and ``systemctl`` executables into ``bin_dir``; returns the env
    additions (``PATH`` first with ``bin_dir``, ``FAKE_CLOUDFLARED_STATE``)."""
    python = python or sys.executable
    repo = Path(__file__).resolve().parents[2]
    bin_dir.mkdir(parents=True, exist_ok=True)
    state_dir.mkdir(parents=True, exist_ok=True)
    for name, extra in (("cloudflared", ""), ("systemctl", "--as systemctl ")):
        shim = bin_dir / name
        shim.write_text(
            "#!/bin/sh\n"
            f'PYTHONPATH="{repo}" exec "{python}" -m tests.support.fake_cloudflared {extra}"$@"\n'
        )
        shim.chmod(0o755)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_CLOUDFLARED_STATE": str(state_dir),
    }


if __name__ == "__main__":
    sys.exit(main())
