"""Cost of the uplink admission on a blob request, against the stat every blob request makes.

    .venv/bin/python scripts/bench/uplink_bench.py

With ``[uplink] budget_mbps`` set, each blob request of the fast path (and the full path) adds:
the client address (``client_of``, cached), the stream's admission (``Uplink.admit``) and the
send-side count (``Uplink.sent``). The anchor, timed in the same run, is the ``os.stat`` of the
blob file the fast path makes on every blob request anyway. Prints both and their ratio; the
end-to-end figure is ``SERVERS=peerd,peerd-budget scripts/bench/serve_bench.py`` (wrk).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from peerd.core.uplink import Uplink  # noqa: E402
from peerd.http.clientip import client_of, parse_networks  # noqa: E402

N = 200_000


def main() -> int:
    """Time both, best of five, and print the ratio."""
    uplink = Uplink(budget_bps=1e12)  # on, never reached: every request is admitted
    trusted = parse_networks(["127.0.0.0/8", "::1/128"])
    headers = {"cf-connecting-ip": "203.0.113.5"}

    def admission() -> None:
        client = client_of("127.0.0.1", headers.get("cf-connecting-ip"), trusted)
        uplink.admit(("media", client, "token"), time.monotonic())
        uplink.sent(3_000_000, time.monotonic())

    with tempfile.NamedTemporaryFile() as f:
        path = f.name

        def stat() -> None:
            os.stat(path)  # noqa: PTH116 -- what the fast path calls

        a = min(timeit.repeat(admission, number=N, repeat=5)) / N * 1e6
        s = min(timeit.repeat(stat, number=N, repeat=5)) / N * 1e6
    print(f"admission + accounting: {a:.2f} us per blob request")
    print(f"anchor, one os.stat:    {s:.2f} us")
    print(f"ratio admission/stat:   {a / s:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
