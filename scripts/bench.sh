#!/usr/bin/env bash
# Runs every benchmark side by side with its baseline and writes bench-results.json,
# bench-throughput.svg and bench-executors.svg (see docs/benchmarks.md). Installs etcd and protoc first if missing.
# Usage: scripts/bench.sh [--quick] [--only kv,scheduler,overhead,failover,growth,tls,executors,growth1m]
#   (growth1m, a million archived runs, runs only when named)
#                         [--clients 1,16,64,256] [--out DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
bash scripts/bench-deps.sh
docker info >/dev/null 2>&1 || { echo "error: the Docker engine is not reachable (is dockerd running?)" >&2; exit 1; }
bash scripts/test-image.sh
cargo bench --locked --bench cluster -- "$@"
