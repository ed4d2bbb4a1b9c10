#!/usr/bin/env bash
# A flamegraph of the three server processes under one benchmark load (issue 24), so that
# performance work starts from facts: `writes` = the 64-client durable write load of the
# kv benchmark (writes only), `scheduler` = the scheduler benchmark's three-node phase.
# perf samples the servers' threads at 199 Hz with DWARF unwinding (release builds have no
# frame pointers); inferno folds the stacks per process (the leader is the widest root).
# Usage: scripts/flamegraph.sh writes|scheduler [OUT.svg]   (root: perf needs it)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla-target}"
what="${1:-}"; out="${2:-docs/flamegraph-$what.svg}"
case "$what" in
  writes) args=(--only kv --clients 64); export FLOTILLA_BENCH_KV_WRITES_ONLY=1; wait=1.5; secs=10
          title="flotilla: 3 server processes under 64 clients of durable kv writes";;
  scheduler) args=(--only scheduler); wait=0.8; secs=2
          title="flotilla: 3 server processes under the scheduler benchmark (simulated executors)";;
  *) echo "usage: scripts/flamegraph.sh writes|scheduler [OUT.svg]" >&2; exit 2;;
esac
command -v perf >/dev/null || { apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq linux-perf >/dev/null; }
command -v inferno-flamegraph >/dev/null || cargo install inferno --version 0.12.8 --locked
bash scripts/bench-deps.sh
cargo bench --locked --bench cluster --no-run
work="$(mktemp -d)"
bench=""
cleanup() { [ -n "$bench" ] && kill "$bench" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT INT TERM
server="$CARGO_TARGET_DIR/release/flotilla server"
pgrep -f -- "$server" >/dev/null && { echo "error: a benchmark server is already running" >&2; exit 1; }
cargo bench --locked --bench cluster -- "${args[@]}" --out "$work" >"$work/bench.log" 2>&1 &
bench=$!
pids=""
for _ in $(seq 1 600); do
  pids="$(pgrep -d, -f -- "$server" || true)"
  [ "$(tr ',' '\n' <<<"$pids" | grep -c .)" -ge 3 ] && break
  sleep 0.05
done
[ -n "$pids" ] || { cat "$work/bench.log" >&2; echo "error: no benchmark servers appeared" >&2; exit 1; }
sleep "$wait" # bootstrap and the first writes (the scheduler's three-node phase lasts ~1-2 s)
echo "== perf on server processes $pids for $secs s"
# perf stops early (non-zero) if the load ends first: what it recorded is kept.
perf record -q -F 199 --call-graph dwarf,16384 -p "$pids" -o "$work/perf.data" -- sleep "$secs" 2>/dev/null || true
wait "$bench"; bench=""
perf script -i "$work/perf.data" 2>/dev/null | inferno-collapse-perf --pid >"$work/folded"
inferno-flamegraph --title "$title" --width 1600 <"$work/folded" >"$out"
echo "wrote $out ($(wc -l <"$work/folded") distinct stacks)"
grep -E "^(kv_write_throughput_64|scheduler_task_transitions)" "$work/bench.log" || grep -E "writes/s|transitions/s" "$work/bench.log" | tail -3
