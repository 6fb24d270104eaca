#!/usr/bin/env bash
# The multi-node testbed, one command (README "Testbed"; needs root for namespaces and tc):
#   scripts/testbed/run.sh [--quick] --out DIR [--policies peerd,lru,no_r2,all_r2] [--faults]
#     [--route any|holders] [--manifests placed|all] [--node-set SECTION.KEY=VALUE ...]
# Defaults run the network as deployed: uplink admission on (budget = each node's uplink), any
# node serving any media, each catalog with its own items only.
# Writes DIR/summary.json, DIR/<policy>.json and PNG plots; see scripts/testbed/driver.py.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY="$ROOT/.venv/bin/python"
if [[ ! -x $PY ]]; then
  echo "no project venv at $ROOT/.venv" >&2
  exit 2
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
exec "$PY" -m scripts.testbed.driver "$@"
