#!/usr/bin/env bash
# Every peerd benchmark, each against its anchor in the same run (nginx, ffmpeg CLI, rclone).
# Results print to stdout; raw files go under /tmp/peerd-bench/. Needs `make install` first and
# ../shared/bench (the anchor scripts) beside the repository.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
SHARED=${SHARED_BENCH:-../shared/bench}
export SHARED_BENCH=$SHARED
mkdir -p /tmp/peerd-bench
[ -f /tmp/peerd-bench/src_1080p.mp4 ] || bash "$SHARED/make_media.sh" /tmp/peerd-bench
echo "== catalog (issue 2)";       "$PY" scripts/bench/catalog_bench.py
echo "== packaging (issue 3)";     PY="$PY" bash scripts/bench/package_bench.sh
echo "== HLS serving (issue 4)";   "$PY" scripts/bench/serve_bench.py
echo "== R2 replication (issue 5)"; "$PY" scripts/bench/r2_bench.py --rounds 3 --ttfb-blobs 10
echo "== P2P transfer (issue 6)";  "$PY" scripts/bench/p2p_bench.py
echo "== coordinator API (issue 7)"; "$PY" scripts/bench/api_bench.py --blobs 100000 --n 200
echo "== WHEP (issue 8)";          "$PY" scripts/bench/whep_bench.py --sessions 10 --seconds 10
echo "== on-demand rungs (issue 19)"; "$PY" scripts/bench/ondemand_bench.py --rounds 3
echo "== viewer swarm tracker (issue 21)"; "$PY" scripts/bench/swarm_bench.py --peers 1000
echo "== live glass-to-glass latency (issue 22)"; "$PY" scripts/bench/live_latency.py --seconds 20 --viewers 8
