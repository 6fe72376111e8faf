#!/usr/bin/env bash
# Installs the Debian/Ubuntu packages Slipstream needs that pip cannot provide.
#   redis-server: the meeting point of gateway and workers (tests start their own)
#   chromium:     headless browser for the dashboard test
#   iproute2:     network namespaces for the multi-host test (ip netns)
#   faketime:     libfaketime, hosts whose clocks are off by ±30 s (tests/faults/test_clock_skew.py)
# Usage: scripts/install-system-deps.sh [extra packages...]
set -euo pipefail
packages=(redis-server "$@")
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "installing: ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
