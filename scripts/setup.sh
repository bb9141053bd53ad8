#!/usr/bin/env bash
# Install everything gridvm needs on Debian 12 (run as root): system packages and .venv/.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  qemu-system-x86 qemu-utils          # the hypervisor and image tools
  busybox-static cpio xz-utils        # the tiny guest's initramfs
  syslinux syslinux-common mtools dosfstools  # the tiny guest's bootable HVM disk
  iproute2 nftables dnsmasq-base      # bridges, taps, NAT, DHCP
  e2fsprogs socat
  etcd-server etcd-client             # cluster state (gridvm cluster, lab --cluster)
  conntrackd                          # directors mirror their connections (lb/ctsync.py)
  haproxy                             # bench/services.py compares virtual services with it
  python3-venv
  chromium                            # tests/test_web*.py and bench/web.py drive it (Playwright)
)
# The web console's front-end packages (package.json) come from the npm registry.
command -v npm >/dev/null || APT_PACKAGES+=(nodejs npm)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Who may use gridvm: root and members of the gridvm group (the API socket is 0660 root:gridvm).
getent group gridvm >/dev/null || groupadd --system gridvm

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
# xterm.js, uPlot, noVNC for the web console: node_modules/ is served by gridvmd (never fetched
# at run time); `npm ci` only when package-lock.json changed since the last install.
if ! cmp -s package-lock.json node_modules/.gridvm-installed.json 2>/dev/null; then
  npm ci --no-audit --no-fund --loglevel=error
  cp package-lock.json node_modules/.gridvm-installed.json
fi
echo "setup: done (.venv/bin/gridvm, .venv/bin/gridvmd)"
