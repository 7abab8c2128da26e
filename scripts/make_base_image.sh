#!/usr/bin/env bash
# Make the images' base (the Dockerfiles' BASE_IMAGE build argument) available to buildah, without
# a container registry when none can be reached.
#
#   scripts/make_base_image.sh [IMAGE]     # default: docker.io/library/python:3.11.13-slim-bookworm
#
# First that works:
#   1. IMAGE is already in the buildah storage (the cache of an earlier run): nothing to do;
#   2. `buildah pull IMAGE` (a machine that reaches the registry gets the real image);
#   3. a stand-in made from Debian packages: `debootstrap --variant=minbase bookworm` with python3
#      and python3-venv (bookworm's Python is 3.11, the project's minor version) and nothing else,
#      `python` linked to python3 as in the official image, committed under the name IMAGE, so the
#      Dockerfiles build unchanged. It is labelled org.opencontainers.image.description so that
#      nobody mistakes it for the registry's image (its Python is Debian's 3.11.x, in /usr/bin).
#
# Storage: buildah's, under $LORAFLEET_IMAGE_CACHE/storage (default /var/cache/lorafleet/images when
# writable, else .cache/images of the repository), as scripts/buildah_storage.sh sets it for every
# lorafleet build. Needs root (debootstrap, chroot).
# The Debian mirror is the one apt uses (first deb.debian.org-like URI of the sources), or $DEBIAN_MIRROR.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
IMAGE="${1:-docker.io/library/python:3.11.13-slim-bookworm}"
SUITE="${DEBIAN_SUITE:-bookworm}"
PULL_TIMEOUT="${LORAFLEET_PULL_TIMEOUT:-30}"

die() {
    echo "make_base_image: ERROR: $*" >&2
    exit 1
}
log() { echo "make_base_image: $*"; }

[[ "$(id -u)" -eq 0 ]] || die "needs root (buildah with vfs storage and chroot isolation, debootstrap); you are $(id -un)."
command -v buildah >/dev/null 2>&1 || die "buildah not found: run scripts/install_buildah.sh"
# shellcheck source=scripts/buildah_storage.sh
source "$ROOT/scripts/buildah_storage.sh"

if buildah_ inspect --type image "$IMAGE" >/dev/null 2>&1; then
    log "$IMAGE: already in $CACHE/storage"
    exit 0
fi

if [[ "${LORAFLEET_BASE_FROM:-pull}" != debootstrap ]]; then
    log "$IMAGE: trying to pull it (at most ${PULL_TIMEOUT}s)"
    if timeout "$PULL_TIMEOUT" "${BUILDAH[@]}" pull --quiet "$IMAGE" >/dev/null 2>&1; then
        log "$IMAGE: pulled"
        exit 0
    fi
    log "$IMAGE: cannot be pulled; making it from Debian packages"
fi

command -v debootstrap >/dev/null 2>&1 || die "debootstrap not found: run scripts/install_buildah.sh"
mirror="${DEBIAN_MIRROR:-}"
if [[ -z "$mirror" ]]; then
    mirror="$(grep -rhoE '(URIs:|^deb)\s+https?://[^ ]+/debian/?(\s|$)' /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null \
        | grep -oE 'https?://[^ ]+' | head -n 1 || true)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

work="$(mktemp -d "$CACHE/rootfs.XXXXXX")"
container=""
cleanup() {
    [[ -n "$container" ]] && buildah_ rm "$container" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT

log "debootstrap --variant=minbase $SUITE from $mirror (python3, python3-venv)"
debootstrap --variant=minbase --include=python3,python3-venv "$SUITE" "$work/rootfs" "$mirror" \
    >"$work/debootstrap.log" 2>&1 || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)."; }
rootfs="$work/rootfs"
version="$(chroot "$rootfs" /usr/bin/python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
[[ "$version" == 3.11.* ]] || die "the $SUITE rootfs has Python $version, not 3.11."
# As in the official python image: `python` is on PATH. Package caches and lists are left out.
ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* "$rootfs"/tmp/*

container="$(buildah_ from scratch)"
mount="$(buildah_ mount "$container")"
cp -a "$rootfs/." "$mount/"
buildah_ umount "$container" >/dev/null
buildah_ config --env LANG=C.UTF-8 --cmd python3 \
    --label "org.opencontainers.image.description=Stand-in for $IMAGE: debootstrap $SUITE minbase + python3 $version (python3-venv), made by lorafleet scripts/make_base_image.sh" \
    "$container"
buildah_ commit --quiet "$container" "$IMAGE" >/dev/null
log "$IMAGE: committed (Debian $SUITE, Python $version, $(du -sh --apparent-size "$rootfs" | cut -f1))"
