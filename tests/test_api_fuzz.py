"""Schema-driven fuzzing of a live daemon's /api/v1 with schemathesis: every check, including
"no 5xx", response schema, status code and content type conformance, positive and negative data
handling, unsupported methods and ignored auth, must pass."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

from peerd.config import load_settings
from peerd.runtime import open_runtime
from tests.support.inventory import seed_media
from tests.support.process import PeerdProcess

# Statuses a schema-valid request may get: 404 for ids this node does not hold, 409 for
# commands needing a subsystem it does not run, 416 for a range past a blob's end.
CONFIG = """\
[checks.positive_data_acceptance]
expected-statuses = ["2xx", "401", "403", "404", "409", "416"]
"""


async def _seed(state_dir: Path) -> None:
    rt = await open_runtime(load_settings(None, node={"state_dir": state_dir}))
    try:
        a = await seed_media(rt, "a")
        await seed_media(rt, "b", shared=[a.segments[0]])
    finally:
        await rt.close()


def test_schemathesis_finds_no_5xx_and_no_schema_violation(tmp_path: Path) -> None:
    node = PeerdProcess(tmp_path / "node", config={"log": {"level": "info"}})
    node.init()
    asyncio.run(_seed(node.state_dir))
    node.start()
    try:
        token = (node.state_dir / "secrets" / "api_token").read_text().strip()
        cfg = tmp_path / "schemathesis.toml"
        cfg.write_text(CONFIG)
        st = Path(sys.executable).with_name("schemathesis")
        proc = subprocess.run(  # noqa: S603
            [
                str(st),
                "--config-file",
                str(cfg),
                "run",
                f"{node.base_url}/api/v1/openapi.json",
                "--header",
                f"Authorization: Bearer {token}",
                "--checks",
                "all",
                "--max-examples",
                "25",
                "--seed",
                "7",
                "--workers",
                "1",
                "--report-dir",
                str(tmp_path / "report"),
                "--no-color",
            ],
            capture_output=True,
            text=True,
            cwd=tmp_path,  # schemathesis writes a .schemathesis cache into its cwd
            timeout=150,
            check=False,
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-6000:]
        assert " passed" in out
        assert "failed" not in out.split("SUMMARY")[-1], out[-3000:]
    finally:
        code = node.stop()
    logs = node.logs()
    assert "unhandled error" not in logs
    assert code == 0
