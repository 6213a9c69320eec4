#!/usr/bin/env bash
# Installs Debian's chromium for tests/test_report.py (the report is checked in a real headless browser).
# Idempotent: does nothing when /usr/bin/chromium already exists. Needs root (CI runs as root).
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
  echo "chromium present: $(/usr/bin/chromium --version 2>/dev/null || echo unknown)"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install_chromium.sh: need root (or sudo) to apt-get install chromium" >&2
    exit 1
  fi
fi

$SUDO apt-get update -qq
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core
/usr/bin/chromium --version
