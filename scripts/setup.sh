#!/usr/bin/env bash
# All set-up on a fresh Debian machine: system packages (as root), a virtualenv in .venv,
# and relay built and installed into it (editable, with the test and bench extras).
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(gcc python3-dev python3-venv iproute2 nftables util-linux procps libcap2-bin
              socat iperf3 v2ray shadowsocks-libev tcpdump bind9-dnsutils dnsmasq-base)

if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
else
    echo "setup: not root, skipping system packages (${APT_PACKAGES[*]})" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,bench]'
.venv/bin/python -c "import relay; print('setup: relay', relay.__version__, 'extensions', relay.EXTENSIONS)"
