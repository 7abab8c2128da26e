#!/usr/bin/env bash
# Put real `prometheus` and `promtool` binaries (Debian's Prometheus 2.42) into
# .cache/prometheus/bin/ of the repository, for the tests that lint our metrics with
# `promtool check metrics` and scrape the trainer service with a real Prometheus.
#
# Why this way (shared/STACK.md, "Prometheus, for real"): `apt-get install prometheus` would
# register and start a system service; `apt-get download` + `dpkg -x` only unpacks the .deb,
# so nothing runs and nothing outside the repository's .cache changes.
#
# Idempotent: does nothing when both binaries are already there and run. Exits non-zero with a
# message naming the failed step otherwise. `apt-get update` is tried only when the download
# fails (stale or missing package lists), because it is slow and needs root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/.cache/prometheus/bin"
PKG="prometheus"

die() {
    echo "install_prometheus: ERROR: $*" >&2
    exit 1
}

installed() {
    [[ -x "$DEST/prometheus" && -x "$DEST/promtool" ]] \
        && "$DEST/prometheus" --version >/dev/null 2>&1 \
        && "$DEST/promtool" --version >/dev/null 2>&1
}

report() {
    echo "install_prometheus: prometheus: $DEST/prometheus"
    echo "install_prometheus: promtool:   $DEST/promtool"
    "$DEST/prometheus" --version 2>&1 | head -n 1 | sed 's/^/install_prometheus: /'
}

mkdir -p "$DEST"

# Several test processes may call this at once (tests/prom_utils.py runs it on demand):
# serialise them so that nobody sees a half-copied binary or races on the download.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$DEST/../.install.lock"
    flock 9
fi

if installed; then
    report
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script needs a Debian/Ubuntu system (Debian ships Prometheus 2.42 as package '$PKG')."
command -v dpkg >/dev/null 2>&1 || die "dpkg not found: needed to unpack the '$PKG' .deb."

WORK="$(mktemp -d "${TMPDIR:-/tmp}/lorafleet-prometheus.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
# apt drops privileges to user _apt for downloads; a 0700 mktemp dir would make it fall back
# to an unsandboxed download with a noisy warning when run as root.
chmod 0755 "$WORK"

download() {
    (cd "$WORK" && apt-get download -q "$PKG")
}

echo "install_prometheus: downloading Debian package '$PKG' into $WORK"
if ! download >"$WORK/download.log" 2>&1; then
    echo "install_prometheus: download failed; running apt-get update and retrying" >&2
    if [[ "$(id -u)" -ne 0 ]]; then
        cat "$WORK/download.log" >&2
        die "apt-get download $PKG failed and apt-get update needs root (you are $(id -un)). Run as root, or put prometheus/promtool into $DEST yourself."
    fi
    apt-get update -q >"$WORK/update.log" 2>&1 || { cat "$WORK/update.log" >&2; die "apt-get update failed."; }
    download >"$WORK/download.log" 2>&1 || { cat "$WORK/download.log" >&2; die "apt-get download $PKG failed even after apt-get update."; }
fi

shopt -s nullglob
debs=("$WORK"/"${PKG}"_*.deb)
shopt -u nullglob
[[ ${#debs[@]} -eq 1 ]] || die "expected exactly one ${PKG}_*.deb in $WORK after download, found ${#debs[@]}."

dpkg -x "${debs[0]}" "$WORK/root" || die "dpkg -x ${debs[0]} failed."

for bin in prometheus promtool; do
    src="$WORK/root/usr/bin/$bin"
    [[ -f "$src" ]] || die "$bin not found in ${debs[0]} (looked for usr/bin/$bin)."
    # Copy under a temporary name and rename: the rename is atomic, so a reader never
    # executes a partially written binary.
    install -m 0755 "$src" "$DEST/.$bin.tmp" || die "could not copy $bin into $DEST."
    mv -f "$DEST/.$bin.tmp" "$DEST/$bin"
done

installed || die "copied the binaries into $DEST but they do not run (\`$DEST/prometheus --version\` fails)."
report
