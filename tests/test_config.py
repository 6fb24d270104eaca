"""Configuration: defaults, TOML, environment, secrets, and clear errors (exit code 2)."""

import tomllib
from pathlib import Path

import pytest

from peerd.config import Settings, load_settings
from peerd.errors import ConfigError
from tests.support.process import REPO_ROOT, run_cli

EXAMPLE = REPO_ROOT / "config" / "peerd.example.toml"


def test_defaults_run_a_node() -> None:
    s = load_settings(None)
    assert s.http.host == "127.0.0.1"
    assert s.store.quota_bytes == 0


def test_example_config_loads_and_documents_every_key() -> None:
    s = load_settings(EXAMPLE)
    doc = tomllib.loads(EXAMPLE.read_text())
    text = EXAMPLE.read_text()
    for section, _model in Settings.model_fields.items():
        assert section in doc, f"[{section}] missing from the example config"
        sub = getattr(s, section)
        for key in type(sub).model_fields:
            assert f"{key} =" in text, f"{section}.{key} not documented in the example config"


def test_toml_and_env_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text('[http]\nport = 9000\n[node]\nname = "box"\n')
    monkeypatch.setenv("PEERD_HTTP__PORT", "9100")
    s = load_settings(cfg)
    assert s.http.port == 9100
    assert s.node.name == "box"


def test_unknown_key_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text("[http]\nprot = 9000\n")
    with pytest.raises(ConfigError, match=r"http\.prot"):
        load_settings(cfg)


def test_bad_value_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text("[http]\nport = 70000\n")
    with pytest.raises(ConfigError, match=r"http\.port"):
        load_settings(cfg)


def test_cli_exit_code_2_on_bad_config(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text("[store]\nquota_bytes = -1\n")
    res = run_cli("-c", str(cfg), "doctor")
    assert res.returncode == 2
    assert "store.quota_bytes" in res.stderr
    assert res.stderr.count("\n") <= 2  # one clear message, no traceback


def test_a_removed_key_is_named_as_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text("[http]\nworkers = 2\n")
    res = run_cli("-c", str(cfg), "doctor")
    assert res.returncode == 2
    assert "http.workers was removed" in res.stderr
    assert res.stderr.count("\n") <= 2  # one clear message, no traceback
    monkeypatch.setenv("PEERD_HTTP__WORKERS", "1")
    with pytest.raises(ConfigError, match=r"^invalid configuration: http\.workers was removed"):
        load_settings(None)


def test_the_uplink_budget_overrides_the_older_uplink_keys(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    old = "[r2]\nuplink_bytes_per_s = 1000\n[api]\nuplink_bps = 2000\n"
    cfg.write_text(old)
    s = load_settings(cfg)
    assert s.uplink.budget_bps == 0
    assert s.uplink_keys_ignored() == []  # no budget: they are the node's uplink, as before
    cfg.write_text(old + "[uplink]\nbudget_mbps = 8\n")
    s = load_settings(cfg)
    assert s.uplink.budget_bps == 1_000_000
    assert s.uplink_keys_ignored() == ["r2.uplink_bytes_per_s", "api.uplink_bps"]
    res = run_cli("-c", str(cfg), "doctor")
    assert "r2.uplink_bytes_per_s, api.uplink_bps ignored: [uplink] budget_mbps is set" in (
        res.stdout
    )
    # Keys left at their defaults (a copy of the example configuration) say nothing.
    cfg.write_text(
        "[r2]\nuplink_bytes_per_s = 2500000\n[api]\nuplink_bps = 0\n[uplink]\nbudget_mbps = 8\n"
    )
    assert load_settings(cfg).uplink_keys_ignored() == []
    s = load_settings(EXAMPLE, uplink={"budget_mbps": 8})
    assert s.uplink_keys_ignored() == []


def test_cli_exit_code_2_on_toml_syntax(tmp_path: Path) -> None:
    cfg = tmp_path / "p.toml"
    cfg.write_text("[http\n")
    res = run_cli("-c", str(cfg), "doctor")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr


def test_secrets_from_credentials_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "api_token").write_text("from-systemd\n")
    own = tmp_path / "own"
    own.mkdir()
    (own / "api_token").write_text("from-dir")
    (own / "hls_signing_key").write_text("k2")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    s = load_settings(None, node={"secrets_dir": own})
    assert s.secret("api_token") == "from-systemd"
    assert s.secret("hls_signing_key") == "k2"
    assert s.secret("absent") is None
    assert "from-systemd" not in repr(s)
    with pytest.raises(ValueError, match="bad secret name"):
        s.secret("../x")


def test_systemd_state_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "st"))
    assert load_settings(None).state_dir == tmp_path / "st"
