#!/usr/bin/env bash
# Install Debian's buildah (builds and runs OCI images without a Docker engine or a daemon) and
# debootstrap (makes the base image's root filesystem from Debian packages when no registry can be
# reached), for scripts/build_images.sh and the image smoke tests (tests/test_images.py).
#
# Why these (shared/STACK.md, "Container images without a registry"): no Docker engine runs on the
# CI machines and no container registry is reachable from them; buildah with chroot isolation and
# the vfs storage driver builds a Dockerfile as root with nothing else installed, and debootstrap
# gets Debian's packages from the mirror apt already uses.
#
# Idempotent: does nothing when both are installed. Needs root (or sudo) to install. `apt-get
# update` is tried only when the install fails (stale or missing package lists), because it is slow.
set -euo pipefail

PKGS=(buildah debootstrap)

die() {
    echo "install_buildah: ERROR: $*" >&2
    exit 1
}

installed() {
    command -v buildah >/dev/null 2>&1 && command -v debootstrap >/dev/null 2>&1
}

report() {
    echo "install_buildah: $(buildah --version)"
    echo "install_buildah: debootstrap $(dpkg-query -W -f='${Version}' debootstrap 2>/dev/null || echo '?')"
}

if installed; then
    report
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script needs a Debian/Ubuntu system (packages ${PKGS[*]})."
if [[ "$(id -u)" -ne 0 ]]; then
    SUDO="sudo"
    command -v sudo >/dev/null 2>&1 || die "installing ${PKGS[*]} needs root (you are $(id -un)) and sudo is not available."
else
    SUDO=""
fi

LOG="$(mktemp "${TMPDIR:-/tmp}/lorafleet-buildah.XXXXXX")"
trap 'rm -f "$LOG"' EXIT

install_pkgs() {
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q "${PKGS[@]}"
}

echo "install_buildah: installing Debian packages ${PKGS[*]}"
if ! install_pkgs >"$LOG" 2>&1; then
    echo "install_buildah: install failed; running apt-get update and retrying" >&2
    $SUDO apt-get update -q >"$LOG" 2>&1 || { cat "$LOG" >&2; die "apt-get update failed."; }
    install_pkgs >"$LOG" 2>&1 || { cat "$LOG" >&2; die "apt-get install ${PKGS[*]} failed even after apt-get update."; }
fi

installed || die "installed ${PKGS[*]} but buildah or debootstrap is still not on PATH."
report
