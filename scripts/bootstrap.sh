#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu host for matchlock: system packages, the project venv, and the
# guest kernel/agent/default image (`matchlock setup`). Idempotent; run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then
    exec sudo "$0" "$@"
  fi
  echo "bootstrap: run as root (no sudo here: open a root shell and run $0)" >&2
  exit 1
fi

export DEBIAN_FRONTEND=noninteractive
need=()
for pkg in python3-venv python3-pip qemu-system-x86 qemu-utils busybox-static e2fsprogs \
           musl-tools linux-source-6.1 flex bison libelf-dev libssl-dev bc make gcc xz-utils \
           skopeo docker-registry apache2-utils umoci unzip nftables iproute2 nginx-light; do
  dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null | grep -qx installed || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  echo "bootstrap: installing ${need[*]}" >&2
  apt-get update -qq
  # Packages such as nginx (a test upstream, never a host service here) must not start
  # daemons on install: deny service starts for the duration, unless the host already does.
  deny_starts=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    deny_starts=1
  fi
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  if [ "$deny_starts" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/pip install -q --disable-pip-version-check -e '.[dev]'
# Byte-compile now: where PYTHONDONTWRITEBYTECODE is set, every `matchlock` start would
# otherwise recompile the package (~25 ms).
.venv/bin/python -m compileall -q src/matchlock >/dev/null
# The official Python SDK (same package name as this project) for the rpc compatibility tests
# (tests/integration/test_rpc_sdk.py): a venv of its own, never importable from .venv.
if [ ! -x .sdk-venv/bin/python ]; then
  python3 -m venv .sdk-venv
fi
.sdk-venv/bin/pip install -q --disable-pip-version-check 'matchlock==0.2.17'
.venv/bin/matchlock setup --skip-packages
