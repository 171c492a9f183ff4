#!/usr/bin/env bash
# Debian packages that tests/test_server.py (PostgreSQL) and tests/test_ui.py (headless Chromium driven
# through ChromeDriver) need. `make test` (and so CI) calls it first, so those tests run instead of
# skipping; on a developer machine it installs only what is missing (as root, or through sudo).
# Measured on the dev machine: chromium + chromium-driver 59 s with apt-get update; postgresql ~15 s more.
set -euo pipefail

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
# Debian keeps initdb and pg_ctl under /usr/lib/postgresql/<major>/bin, off PATH
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" >/dev/null || need+=(postgresql)

if [ ${#need[@]} -eq 0 ]; then
    echo "install-services: chromium, chromium-driver and postgresql are already installed"
    exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install-services: not root and no sudo; tests that need ${need[*]} will skip" >&2
        exit 0
    fi
    sudo="sudo"
fi
echo "install-services: apt-get install ${need[*]}"
$sudo apt-get update -qq
# The tests start their own PostgreSQL cluster on a free port; the package's own cluster is not used.
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
