"""Ingest one file through a running daemon's API and wait for the job (stdlib only).

``api_ingest.py BASE_URL TOKEN_FILE PATH``: POST /api/v1/commands/ingest, then poll the job every
10 ms until it is done (exit 0) or failed (exit 1, error on stderr). This is the client side of
the daemon path in package_bench.sh: start-up is one bare interpreter, the packaging is the
daemon's.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path


def _call(base: str, token: str, method: str, path: str, body: object = None) -> dict[str, object]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(  # noqa: S310 - loopback URL given by the bench script
        base + path, data=data, method=method, headers={"Authorization": f"Bearer {token}"}
    )
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=600) as r:  # noqa: S310
        out: dict[str, object] = json.loads(r.read())
        return out


def main() -> int:
    """Submit, poll, report."""
    base, token_file, path = sys.argv[1:4]
    token = Path(token_file).read_text().strip()
    job = _call(base, token, "POST", "/api/v1/commands/ingest", {"path": path})
    while job["state"] not in ("done", "failed"):
        time.sleep(0.01)
        job = _call(base, token, "GET", f"/api/v1/jobs/{job['job_id']}")
    if job["state"] == "failed":
        print(f"ingest failed: {job['error']}", file=sys.stderr)
        return 1
    result = job["result"]
    files = result.get("files", []) if isinstance(result, dict) else []
    bad = [f for f in files if not f.get("ok")]
    if not files or bad:
        print(f"ingest failed: {bad or result}", file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
