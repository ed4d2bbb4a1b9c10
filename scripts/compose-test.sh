#!/usr/bin/env bash
# Black-box test of deploy/compose.yaml: builds the images from the already built binary
# (no registry), starts the compose project, creates a run from the host, checks that it
# succeeds and that its logs landed in the S3 bucket, then `down -v` and checks that
# nothing of the project is left. Usage: scripts/compose-test.sh [FLOTILLA_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla-target}"
bin="${1:-$CARGO_TARGET_DIR/debug/flotilla}"
[ -x "$bin" ] || { echo "error: no flotilla binary at $bin (build first)" >&2; exit 1; }
command -v docker-compose >/dev/null || { echo "error: docker-compose is required" >&2; exit 1; }
s3="$(command -v s3s-fs || true)"
[ -n "$s3" ] || { echo "error: s3s-fs is required (scripts/test.sh installs it)" >&2; exit 1; }

project="flotilla-compose-test"
dir="$(mktemp -d)"
compose() { docker-compose -p "$project" -f "$dir/compose.yaml" "$@"; }
cleanup() {
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
fail() {
  echo "compose test FAILED: $*" >&2
  compose ps >&2 || true
  compose logs --tail 40 >&2 || true
  exit 1
}

bash scripts/image.sh --binary "$bin" --s3-binary "$s3" --tag compose-test
docker run --rm flotilla:latest --help >/dev/null || fail "docker run flotilla --help"

cp deploy/compose.yaml "$dir/compose.yaml"
head -c 24 /dev/urandom | base64 >"$dir/token"
chmod 0644 "$dir/token"
compose up -d
export FLOTILLA_TOKEN_FILE="$dir/token" FLOTILLA_SERVER="http://127.0.0.1:7701"

# The init service exits 0 once the cluster is initialised; then every node is ready.
for _ in $(seq 1 120); do
  state="$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$(compose ps -q init)" 2>/dev/null || true)"
  [ "$state" = "exited 0" ] && break
  sleep 1
done
[ "$state" = "exited 0" ] || fail "init did not finish (state: $state)"
for port in 7701 7702 7703; do
  ok=""
  for _ in $(seq 1 60); do
    if "$bin" health --ready --server "http://127.0.0.1:$port" >/dev/null 2>&1; then ok=1; break; fi
    sleep 1
  done
  [ -n "$ok" ] || fail "node on port $port never became ready"
done

# A second `up` must not re-initialise: init runs again and exits 0 with nothing changed.
compose up -d init
sleep 3
for _ in $(seq 1 30); do
  state="$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$(compose ps -q init)")"
  [ "$state" = "exited 0" ] && break
  sleep 1
done
[ "$state" = "exited 0" ] || fail "a second init did not exit 0 (state: $state)"
# Captured first: `grep -q` stops reading at the first match, and under pipefail the
# writer's SIGPIPE would fail the pipeline although the line is there.
init_logs="$(compose logs --no-color init)"
grep -q "already initialised" <<<"$init_logs" || fail "the second init did not say it found the cluster initialised"

id="$("$bin" run create -f examples/build.yaml)"
echo "run $id created from the host"
timeout 180 "$bin" run wait "$id" || fail "run $id did not succeed"
"$bin" run get "$id" >/dev/null

# Logs live in the bucket (the s3 volume): at least one stored log object.
logs="$(docker run --rm -v "${project}_s3data:/d:ro" flotilla-busybox:latest find /d/flotilla -path '*logs*' -type f | wc -l)"
[ "$logs" -gt 0 ] || fail "no log object in the S3 bucket"
echo "the bucket holds $logs log objects"

compose down -v --remove-orphans
left="$(docker ps -aq --filter "label=com.docker.compose.project=$project")"
[ -z "$left" ] || fail "containers left after down -v: $left"
vols="$(docker volume ls -q --filter "label=com.docker.compose.project=$project")"
[ -z "$vols" ] || fail "volumes left after down -v: $vols"
nets="$(docker network ls -q --filter "label=com.docker.compose.project=$project")"
[ -z "$nets" ] || fail "networks left after down -v: $nets"
echo "compose test passed"
