#!/usr/bin/env bash
# Builds flotilla and runs `flotilla dev`: a one-node cluster on 127.0.0.1:7700, a local
# Docker executor and a POSIX object storage, all under ./.flotilla. Prepares the local
# test image if missing, submits examples/build.yaml, waits for it and prints its logs.
# Usage: scripts/dev.sh   (Ctrl-C stops it)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla-target}"
docker info >/dev/null 2>&1 || { echo "error: the Docker engine is not reachable (is dockerd running?)" >&2; exit 1; }
bash scripts/test-image.sh
cargo build --locked --bin flotilla
bin="$CARGO_TARGET_DIR/debug/flotilla"
"$bin" dev "$@" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT INT TERM
for _ in $(seq 1 100); do
  "$bin" cluster status >/dev/null 2>&1 && break
  sleep 0.1
done
run="$("$bin" run create -f examples/build.yaml)"
echo "submitted run $run (examples/build.yaml)"
"$bin" run wait "$run" --timeout-s 300
"$bin" run get "$run"
for task in fetch test lint package; do
  echo "--- $task, step 1 (its run step)"
  "$bin" run logs "$run" "$task" --step 1
done
echo "flotilla dev is running (pid $pid); Ctrl-C to stop"
wait $pid
