#!/usr/bin/env bash
# Make a minimal Debian 12 base image locally, for build hosts that cannot pull from Docker Hub.
#   container/base-image.sh                      -> podman image localhost/debian:bookworm-slim
#   BASE_TAG=localhost/deb:12 MIRROR=http://deb.debian.org/debian container/base-image.sh
# It stands in for docker.io/library/debian:bookworm-slim (no Python, as there); the Containerfile
# and apptainer.def install Python themselves, so the same recipe runs on either base.
# Needs root, debootstrap and podman. Skips the work when the tag already exists (~30 s otherwise).
set -euo pipefail
BASE_TAG="${BASE_TAG:-localhost/debian:bookworm-slim}"
SUITE="${SUITE:-bookworm}"
# Default to the mirror this host's apt already uses, so the build needs no other network.
if [ -z "${MIRROR:-}" ]; then
  MIRROR="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null \
    | grep -oE 'https?://[^ ]+/debian/?( |$)' | head -n1 | tr -d ' ' || true)"
fi
MIRROR="${MIRROR:-http://deb.debian.org/debian}"

if [ -z "${FORCE:-}" ] && podman image exists "$BASE_TAG"; then
  echo "base image $BASE_TAG already exists (FORCE=1 rebuilds it)"
  exit 0
fi

rootfs="$(mktemp -d "${TMPDIR:-/tmp}/sft-rootfs.XXXXXX")"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase "$SUITE" "$rootfs" "$MIRROR" >/dev/null
# Leave out device nodes: runtimes create /dev themselves, and some importers copy /dev/full forever.
tar -C "$rootfs" --exclude='./dev/*' --numeric-owner -c . \
  | podman import --change 'CMD ["/bin/bash"]' - "$BASE_TAG" >/dev/null
echo "built base image $BASE_TAG from $MIRROR ($SUITE, minbase)"
