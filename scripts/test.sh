#!/usr/bin/env bash
# Runs every test of flotilla: unit and property tests, openraft's storage suite, and the
# black-box tests that start real server processes. Installs what the tests need first
# (idempotent). Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# One build cache outside the clone, reused by later runs and by CI on this machine.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "error: '$1' is required to run the tests ($2)" >&2; exit 1; }
}
need cargo "install Rust with rustup"
need cc "install gcc: apt-get install -y gcc"

echo "== disk: $(df -h "$(dirname "$CARGO_TARGET_DIR")" | awk 'NR==2 {print $4 " free"}')"
echo "== build (target dir: $CARGO_TARGET_DIR)"
cargo build --locked --workspace --all-targets

echo "== tests"
# Black-box tests start 1-4 server processes each; two at a time suits a 2-core machine.
cargo test --locked --workspace -- --test-threads=2
