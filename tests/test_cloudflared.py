"""scripts/cloudflared/: shellcheck, argument handling, idempotency, and the generated config.yml
checked against a JSON schema written from Cloudflare's documented config file format.

cloudflared itself is not installable here; a fake built to its CLI (tests.support.fake_cloudflared)
stands in, recording every call.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support.fake_cloudflared import install_shims, validate_ingress
from tests.support.process import REPO_ROOT

SCRIPTS = REPO_ROOT / "scripts" / "cloudflared"
SCHEMA = json.loads((SCRIPTS / "config.schema.json").read_text())
HOST = "media.example.net"
AUD = "a" * 64


class Env:
    """A sandbox: fake cloudflared and systemctl on PATH, state under tmp_path."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.state = tmp / "account"
        self.etc = tmp / "etc-cloudflared"
        self.units = tmp / "units"
        home = tmp / "home"
        (home / ".cloudflared").mkdir(parents=True)
        self.cert = home / ".cloudflared" / "cert.pem"
        self.cert.write_text("-----BEGIN ARGO TUNNEL TOKEN-----\n")
        self.env = {
            "HOME": str(home),
            "CLOUDFLARED_ETC": str(self.etc),
            "SYSTEMD_UNIT_DIR": str(self.units),
            "LANG": "C.UTF-8",
            **install_shims(tmp / "bin", self.state),
        }
        self.env["PATH"] += os.pathsep + "/usr/bin:/bin"

    def run(self, script: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(SCRIPTS / script), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def calls(self, tool: str = "cloudflared") -> list[list[str]]:
        path = self.state / "calls.jsonl"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [r["argv"] for r in rows if r["tool"] == tool]

    def account(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.state / "account.json").read_text())
        return data

    def config(self) -> dict[str, Any]:
        data: dict[str, Any] = yaml.safe_load((self.etc / "config.yml").read_text())
        return data

    def snapshot(self) -> dict[str, bytes]:
        out = {}
        for root in (self.etc, self.units):
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    out[str(p)] = p.read_bytes()
        return out


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def check_config(cfg: dict[str, Any]) -> None:
    """The documented schema, plus the rule JSON Schema cannot state: catch-all last."""
    jsonschema.validate(cfg, SCHEMA, cls=jsonschema.Draft202012Validator)
    last = cfg["ingress"][-1]
    assert "hostname" not in last
    assert "path" not in last
    validate_ingress(cfg)


def test_shellcheck_clean() -> None:
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    assert len(scripts) >= 5
    res = subprocess.run(
        ["shellcheck", "-x", "--severity=style", *scripts],
        cwd=SCRIPTS,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_scripts_are_strict_and_executable() -> None:
    for p in SCRIPTS.glob("*.sh"):
        text = p.read_text()
        if p.name == "lib.sh":
            continue
        assert text.startswith("#!/usr/bin/env bash\n"), p
        assert "set -euo pipefail" in text, p
        assert os.access(p, os.X_OK), p


def test_schema_is_valid_and_strict() -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    base: dict[str, Any] = {
        "tunnel": "6ff42ae2-765d-4adf-8112-31c55c1551ef",
        "credentials-file": "/etc/cloudflared/peerd.json",
        "ingress": [
            {"hostname": HOST, "path": "^/hls/", "service": "http://127.0.0.1:8737"},
            {"service": "http_status:404"},
        ],
    }
    check_config(base)
    bad_cases = [
        {**base, "ingress": [{"hostname": HOST, "service": "http://127.0.0.1:1"}]},
        {**base, "ingress": [{"service": "http_status:404"}, {"service": "http_status:404"}]},
        {**base, "ingres": base["ingress"]},
        {**base, "originRequest": {"connectTimeOut": "10s"}},
        {**base, "originRequest": {"connectTimeout": "ten"}},
        {**base, "ingress": [{"service": "ftp://x"}]},
    ]
    for bad in bad_cases:
        with pytest.raises((jsonschema.ValidationError, AssertionError)):
            check_config(bad)


def test_setup_end_to_end_and_idempotent(env: Env) -> None:
    res = env.run("setup.sh", HOST, "--port", "9000")
    assert res.returncode == 0, res.stderr
    cfg = env.config()
    check_config(cfg)
    acct = env.account()
    assert len(acct["tunnels"]) == 1
    tid = acct["tunnels"][0]["id"]
    assert cfg["tunnel"] == tid
    assert cfg["credentials-file"] == str(env.etc / "peerd.json")
    creds = json.loads((env.etc / "peerd.json").read_text())
    assert creds["TunnelID"] == tid
    assert (env.etc / "peerd.json").stat().st_mode & 0o777 == 0o600
    assert acct["dns"] == {HOST: f"{tid}.cfargotunnel.com"}
    rules = cfg["ingress"]
    assert [r.get("path") for r in rules] == ["^/hls/", "^/api/v1/", "^/whep/", "^/swarm/", None]
    assert all(r["service"] == "http://127.0.0.1:9000" for r in rules[:-1])
    assert all(r["hostname"] == HOST for r in rules[:-1])
    assert rules[-1] == {"service": "http_status:404"}
    assert cfg["originRequest"]["noHappyEyeballs"] is True
    assert (env.units / "cloudflared.service").exists()
    created = [c for c in env.calls() if c[:2] == ["tunnel", "create"]]
    assert created == [
        [
            "tunnel",
            "create",
            "--output",
            "json",
            "--credentials-file",
            str(env.etc / "peerd.json"),
            "peerd",
        ]
    ]
    assert ["--config", str(env.etc / "config.yml"), "service", "install"] in env.calls()

    # Second run: nothing changes, nothing is created, the service is not restarted.
    before = env.snapshot()
    res = env.run("setup.sh", HOST, "--port", "9000")
    assert res.returncode == 0, res.stderr
    assert env.snapshot() == before
    assert "config: kept" in res.stderr
    assert len([c for c in env.calls() if c[:2] == ["tunnel", "create"]]) == 1
    assert [c for c in env.calls() if c[:2] == ["service", "install"]] == []
    assert env.calls("systemctl")[-1] == ["is-active", "--quiet", "cloudflared.service"]
    assert env.account()["services"]["cloudflared.service"].get("restarts", 0) == 0


def test_access_mode_and_restart_on_change(env: Env) -> None:
    assert env.run("setup.sh", HOST).returncode == 0
    res = env.run("setup.sh", HOST, "--access-team", "myteam", "--access-aud", AUD)
    assert res.returncode == 0, res.stderr
    assert "config: updated" in res.stderr
    cfg = env.config()
    check_config(cfg)
    for rule in cfg["ingress"][:-1]:
        assert rule["originRequest"]["access"] == {
            "required": True,
            "teamName": "myteam",
            "audTag": [AUD],
        }
    assert "originRequest" not in cfg["ingress"][-1]
    assert ["restart", "cloudflared.service"] in env.calls("systemctl")
    assert env.account()["services"]["cloudflared.service"]["restarts"] == 1


def test_custom_paths(env: Env) -> None:
    assert env.run("tunnel-create.sh").returncode == 0
    res = env.run(
        "gen-config.sh", "--hostname", HOST, "--path", "^/media/", "--path", r"^/(a|b)/.*\.m3u8$"
    )
    assert res.returncode == 0, res.stderr
    cfg = env.config()
    check_config(cfg)
    assert [r.get("path") for r in cfg["ingress"]] == ["^/media/", r"^/(a|b)/.*\.m3u8$", None]


def test_existing_tunnel_without_credentials_refetches_them(env: Env) -> None:
    out = env.run("tunnel-create.sh", "--name", "node1")
    assert out.returncode == 0, out.stderr
    tid = out.stdout.strip()
    assert re.fullmatch(r"[0-9a-f-]{36}", tid)
    (env.etc / "node1.json").unlink()
    again = env.run("tunnel-create.sh", "--name", "node1")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == tid
    assert json.loads((env.etc / "node1.json").read_text())["TunnelID"] == tid
    assert ["tunnel", "token", "--cred-file", str(env.etc / "node1.json"), tid] in env.calls()
    assert len(env.account()["tunnels"]) == 1


def test_dns_conflict_needs_overwrite(env: Env) -> None:
    assert env.run("tunnel-create.sh").returncode == 0
    acct = env.account()
    acct["dns"][HOST] = "somewhere-else.example.org"
    (env.state / "account.json").write_text(json.dumps(acct))
    res = env.run("route-dns.sh", HOST)
    assert res.returncode == 1
    assert "--overwrite-dns" in res.stderr
    res = env.run("route-dns.sh", "--overwrite-dns", HOST)
    assert res.returncode == 0, res.stderr
    assert env.account()["dns"][HOST].endswith(".cfargotunnel.com")


def test_needs_login(env: Env) -> None:
    env.cert.unlink()
    res = env.run("setup.sh", HOST)
    assert res.returncode == 1
    assert "cloudflared tunnel login" in res.stderr
    assert not (env.state / "account.json").exists()


def test_missing_cloudflared_is_a_clear_error(env: Env, tmp_path: Path) -> None:
    env.env["CLOUDFLARED"] = str(tmp_path / "no-such-cloudflared")
    res = env.run("tunnel-create.sh")
    assert res.returncode == 1
    assert "cloudflared not found" in res.stderr


@pytest.mark.parametrize(
    ("script", "args", "message"),
    [
        ("setup.sh", [], "HOSTNAME is required"),
        ("setup.sh", ["not a host"], "invalid hostname"),
        ("setup.sh", [HOST, "--bogus"], "unknown option"),
        ("setup.sh", [HOST, "--name"], "--name needs a value"),
        ("gen-config.sh", ["--hostname", HOST, "--port", "70000"], "invalid port"),
        ("gen-config.sh", ["--hostname", HOST, "--port", "80a"], "invalid port"),
        ("gen-config.sh", ["--hostname", HOST, "--path", "/hls/"], "invalid --path"),
        ("gen-config.sh", ["--hostname", HOST, "--path", "^/a'b"], "invalid --path"),
        ("gen-config.sh", ["--hostname", HOST, "--access-team", "t"], "needs both"),
        (
            "gen-config.sh",
            ["--hostname", HOST, "--access-team", "t", "--access-aud", "xyz"],
            "invalid --access-aud",
        ),
        ("gen-config.sh", ["--hostname", "-x.example.net"], "invalid hostname"),
        ("tunnel-create.sh", ["--name", "bad name"], "invalid tunnel name"),
        ("route-dns.sh", [HOST, "other.example.net"], "one hostname only"),
        ("install-service.sh", ["--now"], "unknown argument"),
    ],
)
def test_bad_arguments(env: Env, script: str, args: list[str], message: str) -> None:
    res = env.run(script, *args)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert env.calls() == []


def test_gen_config_without_tunnel_fails_cleanly(env: Env) -> None:
    res = env.run("gen-config.sh", "--hostname", HOST)
    assert res.returncode == 1
    assert "run tunnel-create.sh" in res.stderr
    assert not (env.etc / "config.yml").exists()


def test_help(env: Env) -> None:
    for script in ("setup.sh", "tunnel-create.sh", "route-dns.sh", "gen-config.sh"):
        res = env.run(script, "--help")
        assert res.returncode == 0
        assert res.stdout.startswith("usage:")


def test_no_temp_files_left(env: Env) -> None:
    assert env.run("setup.sh", HOST).returncode == 0
    assert env.run("setup.sh", HOST, "--path", "^/hls/").returncode == 0
    leftovers = [p.name for p in env.etc.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_fake_rejects_flags_after_arguments(env: Env) -> None:
    """Like urfave/cli, the fake stops reading flags at the first argument, so the scripts'
    flag order is checked too."""
    res = subprocess.run(
        ["cloudflared", "tunnel", "create", "peerd", "--output", "json"],
        env=env.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 1
    assert "requires exactly 1 argument" in res.stderr
