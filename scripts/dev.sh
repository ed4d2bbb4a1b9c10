#!/usr/bin/env bash
# Builds flotilla and runs `flotilla dev`: a one-node cluster on 127.0.0.1:7700 with its
# data under ./.flotilla, then writes and reads a sample key through the API.
# Usage: scripts/dev.sh   (Ctrl-C stops it)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla-target}"
cargo build --locked --bin flotilla
bin="$CARGO_TARGET_DIR/debug/flotilla"
"$bin" dev "$@" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null' EXIT INT TERM
for _ in $(seq 1 100); do
  "$bin" cluster status >/dev/null 2>&1 && break
  sleep 0.1
done
"$bin" kv put sample/hello "world"
echo "sample/hello = $("$bin" kv get sample/hello)"
"$bin" cluster status
echo "flotilla dev is running (pid $pid); Ctrl-C to stop"
wait $pid
