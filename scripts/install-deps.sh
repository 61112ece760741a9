#!/usr/bin/env bash
# Installs what building and testing packet-headers needs on a Debian host,
# skipping what is already there: gcc (the race detector's cgo), tcpdump (the tests read
# the files back with it and take reference captures), iproute2 and ethtool
# (the network-namespace tests), and prometheus (its promtool checks the
# alert rules).
set -euo pipefail

need=()
command -v tcpdump >/dev/null 2>&1 || need+=(tcpdump)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ethtool >/dev/null 2>&1 || need+=(ethtool)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v gcc >/dev/null 2>&1 || need+=(gcc)
command -v setcap >/dev/null 2>&1 || need+=(libcap2-bin)

if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "missing packages: ${need[*]}; run as root or: sudo apt-get install ${need[*]}" >&2
    exit 1
  fi
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
