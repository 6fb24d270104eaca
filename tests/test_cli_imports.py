"""`peerd ingest` start-up: building the command line loads none of the daemon-side modules.

Every `peerd` command imports peerd.cli; the packaging bench (scripts/bench/package_bench.sh)
counts that start-up against `peerd ingest`, so the API's OpenAPI generator, the runtime
(identity/cryptography, prometheus) and the network stacks must stay out of it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HEAVY = (
    "peerd.api.openapi",
    "peerd.runtime",
    "cryptography",
    "prometheus_client",
    "aiohttp",
    "aiortc",
    "libp2p",
    "boto3",
)


def test_cli_parser_imports_no_daemon_modules() -> None:
    code = (
        "import json, sys\n"
        "import peerd.cli\n"
        "peerd.cli.build_parser()\n"
        f"print(json.dumps([m for m in {list(HEAVY)!r} if m in sys.modules]))\n"
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run(  # noqa: S603 - our own interpreter and code
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    assert json.loads(out.stdout) == []
