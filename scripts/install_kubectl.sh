#!/usr/bin/env bash
# Put a real `kubectl` (client 1.27 or newer, so its built-in kustomize is v5) at
# .cache/kubectl/bin/kubectl of the repository, for tests/test_k8s_manifests.py: `kubectl kustomize`
# of every overlay, and `kubectl --server <KMock emulator> apply -k` of each one.
#
# Where it comes from, first that works:
#   1. already there and new enough: nothing to do (idempotent);
#   2. a kubectl on PATH that is new enough (e.g. the Google Cloud SDK's, or one from your package
#      manager): linked, not copied;
#   3. the official release binary from dl.k8s.io at $KUBECTL_VERSION, checked against the
#      SHA-256 published next to it (needs network access to dl.k8s.io).
# Debian's own package (kubernetes-client) is NOT used: bookworm ships kubectl 1.20, whose kustomize
# v2 cannot read a directory listed in `resources`, which every overlay does.
# Exits non-zero with a message naming the failed step otherwise. Needs no root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.cache/kubectl/bin"
KUBECTL_VERSION="${KUBECTL_VERSION:-v1.32.4}"
MIN_MINOR=27

die() {
    echo "install_kubectl: ERROR: $*" >&2
    exit 1
}

# The client's minor version, or nothing when the binary does not run.
minor_of() {
    "$1" version --client -o json 2>/dev/null \
        | sed -n 's/.*"minor": *"\([0-9]*\).*/\1/p' | head -n 1
}

new_enough() {
    local minor
    [[ -x "$1" ]] || return 1
    minor="$(minor_of "$1")"
    [[ -n "$minor" && "$minor" -ge "$MIN_MINOR" ]]
}

report() {
    echo "install_kubectl: kubectl: $DEST/kubectl -> $(readlink -f "$DEST/kubectl")"
    "$DEST/kubectl" version --client 2>&1 | sed 's/^/install_kubectl: /'
}

mkdir -p "$DEST"

# Several test processes may call this at once: serialise them.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$DEST/../.install.lock"
    flock 9
fi

if new_enough "$DEST/kubectl"; then
    report
    exit 0
fi

# 2. A kubectl on PATH (not our own link).
if found="$(command -v kubectl 2>/dev/null)" && [[ "$(readlink -f "$found")" != "$(readlink -f "$DEST/kubectl" 2>/dev/null || true)" ]]; then
    if new_enough "$found"; then
        ln -sfn "$(readlink -f "$found")" "$DEST/.kubectl.tmp"
        mv -Tf "$DEST/.kubectl.tmp" "$DEST/kubectl"
        new_enough "$DEST/kubectl" || die "linked $found into $DEST but it does not run."
        report
        exit 0
    fi
    echo "install_kubectl: $found is older than 1.$MIN_MINOR; not used" >&2
fi

# 3. The official release binary.
case "$(uname -m)" in
    x86_64) ARCH=amd64 ;;
    aarch64 | arm64) ARCH=arm64 ;;
    *) die "unsupported machine $(uname -m)." ;;
esac
command -v curl >/dev/null 2>&1 || die "no kubectl >= 1.$MIN_MINOR on PATH, and curl is missing to download one."
URL="https://dl.k8s.io/release/$KUBECTL_VERSION/bin/linux/$ARCH/kubectl"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/lorafleet-kubectl.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
echo "install_kubectl: downloading $URL"
curl -fsSL --retry 3 -o "$WORK/kubectl" "$URL" \
    || die "no kubectl >= 1.$MIN_MINOR on PATH, and downloading $URL failed. Install kubectl yourself (https://kubernetes.io/docs/tasks/tools/) or put one at $DEST/kubectl."
curl -fsSL --retry 3 -o "$WORK/kubectl.sha256" "$URL.sha256" || die "downloading $URL.sha256 failed."
echo "$(cat "$WORK/kubectl.sha256")  $WORK/kubectl" | sha256sum --check --status \
    || die "the SHA-256 of $URL does not match $URL.sha256."
# Copy under a temporary name and rename: a reader never runs a partly written binary.
install -m 0755 "$WORK/kubectl" "$DEST/.kubectl.tmp"
mv -f "$DEST/.kubectl.tmp" "$DEST/kubectl"
new_enough "$DEST/kubectl" || die "installed $DEST/kubectl but it does not run or is older than 1.$MIN_MINOR."
report
