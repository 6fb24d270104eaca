"""`peerd install --root DIR`: user, config, credentials, unit and drop-ins; idempotent."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

from peerd.config import load_settings
from peerd.install import CORE_SECRETS
from tests.support.process import run_cli


def tree(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under root: mode and content hash."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file():
            out[str(p.relative_to(root))] = (
                p.stat().st_mode & 0o7777,
                hashlib.sha256(p.read_bytes()).hexdigest(),
            )
    return out


# Where the unit will run Python from. Not this test's interpreter: a checkout may live under
# /tmp or /home, which the sandboxed service cannot see and `peerd install` rightly refuses.
PYTHON = "/usr/bin/python3"  # Debian python3 (a dependency of python3-venv in the Makefile)


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("install", "--root", str(root), "--python", PYTHON, *args)


def test_install_into_empty_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    res = install(root, "--media-dir", "/srv/media")
    assert res.returncode == 0, res.stderr
    assert "created  user peerd" in res.stdout

    passwd = (root / "etc/passwd").read_text().splitlines()
    entry = next(line.split(":") for line in passwd if line.startswith("peerd:"))
    assert entry[5:] == ["/var/lib/peerd", "/usr/sbin/nologin"]
    assert int(entry[2]) < 1000  # a system user
    assert any(line.startswith("peerd:") for line in (root / "etc/group").read_text().splitlines())

    store = root / "etc/credstore/peerd"
    assert store.stat().st_mode & 0o777 == 0o700
    values = set()
    for name in CORE_SECRETS:
        p = store / name
        assert p.stat().st_mode & 0o777 == 0o600
        values.add(p.read_text().strip())
    assert len(values) == 3
    assert all(len(v) >= 40 for v in values)

    unit = (root / "etc/systemd/system/peerd.service").read_text()
    assert f"ExecStart={PYTHON} -m peerd --config /etc/peerd/peerd.toml run" in unit
    for v in values:
        assert v not in unit
    res = subprocess.run(
        ["systemd-analyze", "verify", str(root / "etc/systemd/system/peerd.service")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    assert res.stderr == ""
    paths = (root / "etc/systemd/system/peerd.service.d/paths.conf").read_text()
    assert "ReadOnlyPaths=/srv/media" in paths
    assert not (root / "etc/systemd/system/peerd.service.d/credentials.conf").exists()

    cfg = root / "etc/peerd/peerd.toml"
    settings = load_settings(cfg)
    assert settings.state_dir == Path("/var/lib/peerd")
    assert settings.cache_dir == Path("/var/cache/peerd")
    assert settings.secrets_path == Path("/etc/credstore/peerd")
    for v in values:
        assert v not in cfg.read_text()


def test_second_run_changes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert install(root, "--media-dir", "/srv/media").returncode == 0
    before = tree(root)
    res = install(root)
    assert res.returncode == 0, res.stderr
    outcomes = {line.split()[0] for line in res.stdout.splitlines() if line.strip()}
    assert outcomes == {"kept"}, res.stdout
    after = tree(root)
    after.pop("etc/.pwd.lock", None)
    before.pop("etc/.pwd.lock", None)
    assert after == before


def test_operator_config_and_secrets_are_kept(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert install(root).returncode == 0
    cfg = root / "etc/peerd/peerd.toml"
    cfg.write_text('[node]\nname = "mine"\n')
    token = root / "etc/credstore/peerd/api_token"
    token.write_text("operator-chosen\n")
    token.chmod(0o644)
    res = install(root)
    assert res.returncode == 0, res.stderr
    assert cfg.read_text() == '[node]\nname = "mine"\n'
    assert token.read_text() == "operator-chosen\n"
    assert token.stat().st_mode & 0o777 == 0o600
    assert "updated  secret api_token" in res.stdout


def test_extra_secrets_get_a_credentials_dropin(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert install(root).returncode == 0
    extra = root / "etc/credstore/peerd/r2_secret_access_key"
    extra.write_text("x\n")
    extra.chmod(0o644)
    res = install(root)
    assert extra.stat().st_mode & 0o777 == 0o600
    assert res.returncode == 0, res.stderr
    dropin = root / "etc/systemd/system/peerd.service.d/credentials.conf"
    text = dropin.read_text()
    assert "LoadCredential=r2_secret_access_key:/etc/credstore/peerd/r2_secret_access_key" in text
    assert "hls_signing_key" not in text.split("[Service]")[1]
    extra.unlink()
    res = install(root)
    assert "removed  etc/systemd/system/peerd.service.d/credentials.conf" in res.stdout
    assert not dropin.exists()


def test_bad_secret_name_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    assert install(root).returncode == 0
    (root / "etc/credstore/peerd/bad name").write_text("x")
    res = install(root)
    assert res.returncode == 2
    assert "not usable as a credential id" in res.stderr


def test_python_the_sandbox_cannot_see_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    res = run_cli("install", "--root", str(root), "--python", "/home/me/venv/bin/python")
    assert res.returncode == 2
    assert "ProtectHome" in res.stderr
    assert not (root / "etc/systemd/system/peerd.service").exists()


def test_relative_media_dir_is_refused(tmp_path: Path) -> None:
    res = install(tmp_path / "root", "--media-dir", "media")
    assert res.returncode == 2
    assert "absolute path" in res.stderr
