#!/usr/bin/env bash
# Installs what the benchmarks need, if missing (idempotent): Debian's etcd-server (the
# baseline of the coordination and failover benchmarks) and protoc with its well-known
# types (the etcd-client crate compiles etcd's protobuf definitions). Usage: scripts/bench-deps.sh
set -euo pipefail
missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
# protoc's well-known types (google/protobuf/*.proto), which etcd's definitions import.
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
[ ${#missing[@]} -eq 0 ] && exit 0
command -v apt-get >/dev/null 2>&1 || {
  echo "error: install ${missing[*]} (etcd 3.4+ and protoc) with your package manager" >&2
  exit 1
}
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "== installing ${missing[*]}"
$sudo apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# Debian's package may start a system etcd on the default ports; the benchmarks start
# their own members on free ports and do not need it.
command -v etcd >/dev/null && command -v protoc >/dev/null && [ -f /usr/include/google/protobuf/descriptor.proto ]
