#!/usr/bin/env bash
# Installs what tests/test_browser.py needs from Debian's packages: the chromium browser (the test drives it with
# PyPI's playwright through `executable_path`; no playwright browser is ever downloaded) and fonts for its
# screenshots. Idempotent and quiet (nothing is fetched when all are present); run as root: .ci/run calls it
# before `make test`. Prints the browser's version.
set -euo pipefail

PACKAGES=(chromium fonts-liberation fonts-dejavu-core)
missing=()
for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "browser-setup: missing ${missing[*]}; installing needs root (apt-get install ${missing[*]})" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's /usr/bin/chromium is a wrapper script whose /etc/chromium.d/dev-shm snippet prints a harmless
# "[: ...: unexpected operator" on stderr when findmnt reports /dev/shm twice; keep only the version line.
version=$(chromium --version 2>/dev/null) || { echo "browser-setup: chromium does not start" >&2; exit 1; }
echo "$version"
