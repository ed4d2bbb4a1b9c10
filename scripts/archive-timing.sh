#!/usr/bin/env bash
# Workspace archive timing (issue 26): save and restore time and stored size of a source
# tree (~6 MB: tokio's sources from the local cargo registry, like an unpacked tarball)
# and a ~100 MB build tree (aws-sdk-s3's sources plus the largest .rlib files of the
# target dir), through `flotilla dev` and the local Docker engine, beside `tar -x` of the
# same tree inside the container (the bar: restore <= 1.5x of it). A measurement, not a
# test: it prints a table (medians of REPEAT runs per tree, default 5) and asserts nothing.
#
# The tree reaches the container as a cache uploaded beforehand (the first task restores
# it), then: task `save` saves it to the workspace (save time, stored size), task
# `restore` restores it (restore time) and times `tar -x` of the same tree in place.
# Usage: [FLOTILLA_BIN=...] scripts/archive-timing.sh [SMALL_DIR BIG_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla-target}"
bash scripts/test-image.sh >/dev/null
# A release build, as deployed (a debug build doubles the small tree's restore); or
# FLOTILLA_BIN.
bin="${FLOTILLA_BIN:-}"
if [ -z "$bin" ]; then
  cargo build --quiet --release --bin flotilla
  bin="$CARGO_TARGET_DIR/release/flotilla"
fi
work="$(mktemp -d)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
url="http://127.0.0.1:$port"
export FLOTILLA_SERVER="$url"
"$bin" dev --data-dir "$work/dev" --listen "127.0.0.1:$port" 2>"$work/dev.log" &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$work"' EXIT INT TERM
for _ in $(seq 1 100); do "$bin" cluster status >/dev/null 2>&1 && break; sleep 0.1; done

registry="$(ls -d "$HOME"/.cargo/registry/src/*/ | head -1)"
small="${1:-}"; big="${2:-}"
if [ -z "$small" ]; then
  small="$work/small"; mkdir -p "$small"
  cp -a "$(ls -d "$registry"/tokio-1.* | head -1)" "$small/tree"
fi
if [ -z "$big" ]; then
  big="$work/big"; mkdir -p "$big/tree/lib"
  cp -a "$(ls -d "$registry"/aws-sdk-s3-* | head -1)" "$big/tree/src"
  for f in $(ls -S "$CARGO_TARGET_DIR"/debug/deps/*.rlib); do
    [ "$(du -sm "$big/tree" | cut -f1)" -ge 100 ] && break
    cp "$f" "$big/tree/lib/"
  done
fi

printf '%-6s %9s %11s %9s %11s %9s %6s\n' tree "tree MB" "stored MB" "save s" "restore s" "tar-x s" ratio
for name in small big; do
  dir="$small"; [ "$name" = big ] && dir="$big"
  key="timing-$name-$RANDOM"
  tar -C "$dir" -cf - tree | zstd -q -3 > "$work/$name.tar.zst"
  curl -sf -X PUT --data-binary @"$work/$name.tar.zst" \
    "$url/api/v1/executor/timing/caches?group=/timing&key=$key" >/dev/null
  cat > "$work/$name.yaml" <<YAML
name: archive-timing-$name
group: /timing
cache_group: /timing
tasks:
  - name: save
    image: flotilla-busybox:latest
    steps:
      - restore_cache: {keys: ["$key"], dest_dir: "."}
      - save_to_workspace: {contents: [{source_dir: "tree", dest_dir: "tree"}]}
  - name: restore
    image: flotilla-busybox:latest
    depends: [{task: save}]
    steps:
      - restore_workspace: {dest_dir: "r"}
      # busybox's date has no %N: /proc/uptime gives centiseconds.
      - run: {name: tar-x, command: "tar -cf /tmp/t.tar -C r tree && sync && mkdir /tmp/x && t0=\$(cut -d' ' -f1 /proc/uptime) && tar -xf /tmp/t.tar -C /tmp/x && t1=\$(cut -d' ' -f1 /proc/uptime) && echo tar-x-ms \$(awk \"BEGIN{print int((\$t1 - \$t0) * 1000)}\")"}
YAML
  # The machine is noisy (a 2-core VM): each tree runs REPEAT times (default 5), and the
  # line gives the medians, the ratio being the median of each run's own ratio.
  : >"$work/$name.runs"
  for _ in $(seq 1 "${REPEAT:-5}"); do
    run="$("$bin" run create -f "$work/$name.yaml")"
    "$bin" run wait "$run" --timeout-s 600 >/dev/null
    "$bin" run get "$run" --json > "$work/$name.json"
    stored="$("$bin" run logs "$run" save --step 1 | sed -n 's/.*workspace archive stored (\([0-9]*\) bytes).*/\1/p')"
    tarx="$("$bin" run logs "$run" restore --step tar-x | sed -n 's/^tar-x-ms \([0-9]*\)/\1/p')"
    python3 - "$work/$name.json" "$stored" "$tarx" >>"$work/$name.runs" <<'PY'
import json, sys
run = json.load(open(sys.argv[1]))
def secs(task, i):
    s = run["tasks"][task]["steps"][i]
    return (s["end_time"] - s["start_time"]) / 1000
print(secs("save", 1), secs("restore", 0), int(sys.argv[3]) / 1000, sys.argv[2])
PY
  done
  python3 - "$work/$name.runs" "$name" "$(du -sb "$dir/tree" | cut -f1)" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
name, tree = sys.argv[2], int(sys.argv[3])
save, restore, tarx = (statistics.median(float(r[i]) for r in rows) for i in range(3))
ratio = statistics.median(float(r[1]) / max(float(r[2]), 0.001) for r in rows)
stored = int(rows[-1][3])
print(f"{name:<6} {tree/1e6:9.1f} {stored/1e6:11.2f} {save:9.2f} {restore:11.2f} {tarx:9.2f} {ratio:6.2f}  (median of {len(rows)})")
PY
done
