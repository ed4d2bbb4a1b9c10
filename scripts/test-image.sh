#!/usr/bin/env bash
# Builds the local test image `flotilla-busybox:latest` when missing: Debian's
# busybox-static with one symlink per applet, imported with `docker import` (no registry
# needed). Idempotent. Usage: scripts/test-image.sh [IMAGE]
set -euo pipefail
image="${1:-flotilla-busybox:latest}"
if docker image inspect "$image" >/dev/null 2>&1; then
  exit 0
fi
command -v docker >/dev/null || { echo "error: docker is required" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
if ! apt-get download busybox-static >/dev/null 2>&1; then
  (apt-get update -qq || sudo apt-get update -qq) >/dev/null
  apt-get download busybox-static >/dev/null
fi
dpkg-deb -x busybox-static_*.deb pkg
mkdir -p rootfs/bin rootfs/tmp rootfs/etc rootfs/root rootfs/work
cp pkg/bin/busybox rootfs/bin/busybox
for applet in $(rootfs/bin/busybox --list); do
  [ "$applet" = busybox ] && continue
  ln -sf busybox "rootfs/bin/$applet"
done
chmod 1777 rootfs/tmp
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > rootfs/etc/passwd
printf 'root:x:0:\nnogroup:x:65534:\n' > rootfs/etc/group
tar -C rootfs -c . | docker import -c 'ENV PATH=/bin' -c 'CMD ["/bin/sh"]' - "$image" >/dev/null
echo "built $image"
