#!/usr/bin/env bash
# Installs the system packages pf2lora builds against, skipping what is already there.
# Needs root (or sudo) only when something is missing.
set -euo pipefail
need=()
for pkg in libopenblas-dev libzstd-dev pkg-config; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "setup: installing ${need[*]}" >&2
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >&2
fi
command -v swift >/dev/null || { echo "setup: swift is not on PATH (install Swift 6.1 or newer)" >&2; exit 1; }
