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

# Real S3 servers for the object-storage tests (started on free ports by the tests).
# s3s-fs is pinned: later versions need a newer rustc than CI machines have.
if ! command -v s3s-fs >/dev/null 2>&1; then
  echo "== installing s3s-fs 0.14.1 (about 4 minutes, once)"
  cargo install s3s-fs --version 0.14.1 --features binary --locked
fi
if ! command -v moto_server >/dev/null 2>&1; then
  echo "== installing moto[server] (a second S3 implementation)"
  need python3 "apt-get install -y python3 python3-venv"
  venv="$HOME/.cache/flotilla-moto"
  [ -x "$venv/bin/moto_server" ] || { python3 -m venv "$venv" && "$venv/bin/pip" install --quiet 'moto[server]>=5,<6'; }
  export MOTO_SERVER_BIN="$venv/bin/moto_server"
fi

# etcd and protoc: the benchmarks' baseline and the etcd client's build (the benchmark
# target is built with the tests, and its quick mode runs below as a smoke test).
bash scripts/bench-deps.sh

# Docker and the local test image for the executor tests (no registry: built from
# Debian's busybox-static with docker import).
need docker "install Docker Engine and start it"
docker info >/dev/null 2>&1 || { echo "error: the Docker engine is not reachable (is dockerd running?)" >&2; exit 1; }
bash scripts/test-image.sh
# Debian's docker-compose 1.29 for the compose test of deploy/compose.yaml.
if ! command -v docker-compose >/dev/null 2>&1; then
  echo "== installing docker-compose"
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends docker-compose >/dev/null
fi

echo "== formatting (rustfmt.toml)"
cargo fmt --all --check

echo "== clippy (every warning is an error)"
cargo clippy --locked --workspace --all-targets -- -D warnings

echo "== the executor links no server (openraft, warp and sled stay out of its tree)"
executor_tree="$(cargo tree --locked -p flotilla-executor -e normal)"
if grep -E "openraft|warp|sled" <<<"$executor_tree" >&2; then
  echo "error: flotilla-executor depends on server crates (above); it must talk to servers through flotilla-client only" >&2
  exit 1
fi

# The fault harness (tests/faults, run by `cargo test` below in its --quick mode) builds
# network namespaces, partitions with iptables and slows links with tc; it needs root.
if ! command -v ip >/dev/null 2>&1 || ! command -v iptables >/dev/null 2>&1 || ! command -v tc >/dev/null 2>&1; then
  echo "== installing iproute2 and iptables (the fault harness)"
  apt-get install -y iproute2 iptables >/dev/null
fi

# The power-cut test (tests/powercut.rs) mounts flotilla-lazyfs, a FUSE layer, under every
# node: it needs /dev/fuse and fusermount3 (Debian's fuse3) and root.
if ! command -v fusermount3 >/dev/null 2>&1; then
  echo "== installing fuse3 (the power-cut test's FUSE mounts)"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends fuse3 >/dev/null
fi
[ -e /dev/fuse ] || { echo "error: /dev/fuse is missing: the power-cut test needs FUSE (modprobe fuse)" >&2; exit 1; }

# The dashboard's browser test: Debian's chromium and chromedriver (apt, once per machine,
# ~30 s) and selenium in a venv (PyPI, once, ~20 s); selenium is given both paths, so it
# never tries to download a browser or a driver.
if ! [ -x /usr/bin/chromium ] || ! [ -x /usr/bin/chromedriver ]; then
  echo "== installing chromium and chromium-driver (Debian packages, once)"
  need apt-get "the dashboard test needs Debian's chromium and chromium-driver"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
fi
# Schemathesis (PyPI, a venv of its own, once, ~30 s): the API fuzzed against its OpenAPI.
st_venv="$HOME/.cache/flotilla-schemathesis"
if ! [ -x "$st_venv/bin/schemathesis" ]; then
  echo "== installing schemathesis (a venv under ~/.cache, once)"
  python3 -m venv "$st_venv"
  "$st_venv/bin/pip" install --quiet 'schemathesis==4.32.5'
fi
ui_venv="$HOME/.cache/flotilla-ui-venv"
if ! "$ui_venv/bin/python" -c 'import selenium' >/dev/null 2>&1; then
  echo "== installing selenium (a venv under ~/.cache, once)"
  need python3 "apt-get install -y python3 python3-venv"
  python3 -m venv "$ui_venv" && "$ui_venv/bin/pip" install --quiet 'selenium>=4.20,<5'
fi

# A private registry for the pods test of registry credentials: Debian's reference registry
# (docker-registry; the test starts its own on a free loopback port) and htpasswd from
# apache2-utils for its bcrypt password file. Installed once (~20 s), skipped after.
pod_missing=()
command -v docker-registry >/dev/null 2>&1 || pod_missing+=(docker-registry)
command -v htpasswd >/dev/null 2>&1 || pod_missing+=(apache2-utils)
if [ ${#pod_missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "== installing ${pod_missing[*]}"
  $sudo apt-get update -qq >/dev/null
  # The package's own service is not wanted (the test runs its own registry); policy-rc.d
  # usually keeps it from starting in containers, and a started one does not matter.
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${pod_missing[@]}" >/dev/null
fi

echo "== disk: $(df -h "$(dirname "$CARGO_TARGET_DIR")" | awk 'NR==2 {print $4 " free"}')"
echo "== build (target dir: $CARGO_TARGET_DIR)"
cargo build --locked --workspace --all-targets

echo "== tests"
# Black-box tests start 1-4 server processes each; two at a time suits a 2-core machine.
cargo test --locked --workspace -- --test-threads=2

echo "== the dashboard in headless Chromium (screenshots: $CARGO_TARGET_DIR/ui-screenshots/)"
"$ui_venv/bin/python" tests/ui/browser_test.py --bin "$CARGO_TARGET_DIR/debug/flotilla"

need curl "apt-get install -y curl"
echo "== schemathesis against flotilla dev, from its own /api/v1/openapi.json"
bash tests/api/schemathesis.sh "$CARGO_TARGET_DIR/debug/flotilla" "$st_venv/bin/schemathesis" "$CARGO_TARGET_DIR/schemathesis"

echo "== benchmarks, quick mode (a smoke test: it must finish and write valid JSON; no speed is asserted)"
need python3 "apt-get install -y python3"
bench_out="$(mktemp -d)"
cargo bench --locked --bench cluster -- --quick --out "$bench_out"
python3 - "$bench_out/bench-results.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
keys = {"name", "unit", "flotilla", "baseline_name", "baseline", "ratio", "higher_is_better"}
assert doc["cores"] > 0 and doc["date"], doc
assert len(doc["results"]) >= 30, len(doc["results"])
for row in doc["results"]:
    assert set(row) == keys, row
    assert isinstance(row["flotilla"], (int, float)) and isinstance(row["baseline"], (int, float)), row
print("bench-results.json: %d results, valid" % len(doc["results"]))
PY
rm -rf "$bench_out"

echo "== deploy/compose.yaml: images built offline, a 3-node cluster + executor + S3 under compose"
bash scripts/compose-test.sh "$CARGO_TARGET_DIR/debug/flotilla"

echo "== no container left behind"
left="$(docker ps -aq --filter label=flotilla)"
if [ -n "$left" ]; then
  echo "error: flotilla-labelled containers left by the tests:" >&2
  docker ps -a --filter label=flotilla >&2
  exit 1
fi
