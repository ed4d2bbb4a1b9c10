#!/usr/bin/env bash
# Builds the container images `flotilla:<version>` and `flotilla-s3:<version>` without any
# registry: each is a root filesystem assembled here (the binary, the shared libraries
# `ldd` names, CA certificates, a non-root user) and loaded with `docker import`, so no
# base image is ever pulled. Idempotent (rebuilds and retags).
#
# Usage: scripts/image.sh [--binary PATH] [--s3-binary PATH] [--tag VERSION]
#   --binary     the flotilla binary to package (default: a release build, made here)
#   --s3-binary  the S3 server for deploy/compose.yaml (default: `s3s-fs` on PATH; skipped
#                with a note when absent and not asked for)
#   --tag        image tag (default: the workspace version)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/flotilla-target}"

binary="" s3_binary="" tag=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary="$2"; shift 2 ;;
    --s3-binary) s3_binary="$2"; shift 2 ;;
    --tag) tag="$2"; shift 2 ;;
    *) echo "usage: scripts/image.sh [--binary PATH] [--s3-binary PATH] [--tag VERSION]" >&2; exit 2 ;;
  esac
done
[ -n "$tag" ] || tag="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
if [ -z "$binary" ]; then
  echo "== cargo build --release (the image holds the release binary)"
  cargo build --locked --release --bin flotilla
  binary="$CARGO_TARGET_DIR/release/flotilla"
fi
if [ -z "$s3_binary" ] && command -v s3s-fs >/dev/null 2>&1; then
  s3_binary="$(command -v s3s-fs)"
fi

# The uid the services run as (no name clash with a host user matters: it only owns /data).
uid=10001

# rootfs DIR BINARY NAME: the binary at /usr/local/bin/NAME, every library ldd names at
# its own path (the dynamic loader included), CA roots, passwd/group, /tmp and /data.
rootfs() {
  local dir="$1" bin="$2" name="$3"
  mkdir -p "$dir/usr/local/bin" "$dir/etc/ssl/certs" "$dir/tmp" "$dir/data"
  install -m 0755 "$bin" "$dir/usr/local/bin/$name"
  ldd "$bin" | awk '{ for (i = 1; i <= NF; i++) if ($i ~ /^\//) print $i }' | sort -u |
    while read -r lib; do
      mkdir -p "$dir$(dirname "$lib")"
      cp -L "$lib" "$dir$lib"
    done
  if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$dir/etc/ssl/certs/ca-certificates.crt"
  else
    echo "warning: /etc/ssl/certs/ca-certificates.crt missing; the image trusts no CA" >&2
  fi
  printf 'root:x:0:0:root:/root:/sbin/nologin\nflotilla:x:%d:%d:flotilla:/data:/sbin/nologin\n' $uid $uid >"$dir/etc/passwd"
  printf 'root:x:0:\nflotilla:x:%d:\n' $uid >"$dir/etc/group"
  chmod 1777 "$dir/tmp"
}

# import_image DIR IMAGE [docker import -c CHANGES...]: DIR as a single-layer image, owned
# by root except /data and what is under it, which belong to the service user.
import_image() {
  local dir="$1" image="$2"
  shift 2
  tar --numeric-owner --owner=0 --group=0 -C "$dir" -c . |
    python3 -c '
import sys, tarfile
uid = int(sys.argv[1])
src = tarfile.open(fileobj=sys.stdin.buffer, mode="r|")
dst = tarfile.open(fileobj=sys.stdout.buffer, mode="w|")
for m in src:
    if m.name.lstrip("./").split("/")[0] == "data":
        m.uid = m.gid = uid
    dst.addfile(m, src.extractfile(m) if m.isreg() else None)
dst.close()
' "$uid" | docker import "$@" - "$image" >/dev/null
}

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

rootfs "$tmp/flotilla" "$binary" flotilla
import_image "$tmp/flotilla" "flotilla:$tag" \
  -c "USER $uid" -c 'WORKDIR /data' -c 'ENV PATH=/usr/local/bin' \
  -c 'ENTRYPOINT ["/usr/local/bin/flotilla"]' -c 'CMD ["--help"]'
docker tag "flotilla:$tag" flotilla:latest
echo "built flotilla:$tag ($(docker image inspect -f '{{.Size}}' "flotilla:$tag" | awk '{printf "%.1f MB", $1/1e6}'))"

if [ -n "$s3_binary" ]; then
  rootfs "$tmp/s3" "$s3_binary" s3s-fs
  # One bucket, `flotilla`, exists from the start: s3s-fs serves each directory under its
  # root as a bucket, and a named volume starts as a copy of the image's /data.
  mkdir -p "$tmp/s3/data/flotilla"
  import_image "$tmp/s3" "flotilla-s3:$tag" \
    -c "USER $uid" -c 'WORKDIR /data' -c 'EXPOSE 9000' \
    -c 'ENTRYPOINT ["/usr/local/bin/s3s-fs", "--host", "0.0.0.0", "--port", "9000"]' -c 'CMD ["/data"]'
  docker tag "flotilla-s3:$tag" flotilla-s3:latest
  echo "built flotilla-s3:$tag"
else
  echo "note: no s3s-fs binary (cargo install s3s-fs --version 0.14.1 --features binary); flotilla-s3 not built"
fi
