#!/usr/bin/env bash
# Install Debian's chromium for the dashboard's real-browser test (tests/test_dashboard_browser.py),
# which drives it with the Playwright Python package, and a small CJK font (fonts-wqy-microhei, 1.6 MB)
# so the Chinese text of the bundled task renders in its screenshots instead of empty boxes.
#
# Why this way (shared/STACK.md, "Streamlit, for real"): `playwright install` downloads its own
# browser build from a CDN that these machines cannot reach; Debian's chromium package works with
# Playwright's `chromium.launch(executable_path=...)`. `--no-install-recommends` keeps it small.
#
# Idempotent: does nothing when a working chromium is already installed (it prints its version).
# The browser path can be overridden with LORAFLEET_CHROMIUM (the test reads the same variable).
# Exits non-zero with a message naming the failed step otherwise. `apt-get update` is tried only
# when the install fails (stale or missing package lists), because it is slow.
set -euo pipefail

PKG="chromium"
FONT_PKG="fonts-wqy-microhei"
BIN="${LORAFLEET_CHROMIUM:-/usr/bin/chromium}"

die() {
    echo "install_chromium: ERROR: $*" >&2
    exit 1
}

installed() {
    [[ -x "$BIN" ]] && "$BIN" --headless=new --no-sandbox --version >/dev/null 2>&1 && font_installed
}

font_installed() {
    dpkg-query -W -f='${Status}' "$FONT_PKG" 2>/dev/null | grep -q "install ok installed" \
        || { command -v fc-list >/dev/null 2>&1 && [[ -n "$(fc-list :lang=zh 2>/dev/null)" ]]; }
}

report() {
    echo "install_chromium: chromium: $BIN"
    # Debian's /usr/bin/chromium wrapper may print a shell warning first: keep the version line.
    "$BIN" --headless=new --no-sandbox --version 2>/dev/null | grep -m 1 -i chromium | sed 's/^/install_chromium: /' || true
    echo "install_chromium: CJK font: $(fc-list :lang=zh family 2>/dev/null | head -n 1)"
}

if installed; then
    report
    exit 0
fi

command -v apt-get >/dev/null 2>&1 || die "apt-get not found: this script needs a Debian/Ubuntu system (package '$PKG'), or set LORAFLEET_CHROMIUM to a chromium binary."
if [[ "$(id -u)" -ne 0 ]]; then
    SUDO="sudo"
    command -v sudo >/dev/null 2>&1 || die "installing '$PKG' needs root (you are $(id -un)) and sudo is not available. Run as root, or set LORAFLEET_CHROMIUM to a chromium binary."
else
    SUDO=""
fi

LOG="$(mktemp "${TMPDIR:-/tmp}/lorafleet-chromium.XXXXXX")"
trap 'rm -f "$LOG"' EXIT

install_pkg() {
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "$PKG" "$FONT_PKG"
}

echo "install_chromium: installing Debian packages '$PKG' '$FONT_PKG' (no recommends)"
if ! install_pkg >"$LOG" 2>&1; then
    echo "install_chromium: install failed; running apt-get update and retrying" >&2
    $SUDO apt-get update -q >"$LOG" 2>&1 || { cat "$LOG" >&2; die "apt-get update failed."; }
    install_pkg >"$LOG" 2>&1 || { cat "$LOG" >&2; die "apt-get install $PKG $FONT_PKG failed even after apt-get update."; }
fi

installed || die "installed '$PKG' and '$FONT_PKG' but \`$BIN --version\` does not run or no CJK font is found."
report
