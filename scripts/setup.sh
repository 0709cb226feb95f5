#!/usr/bin/env bash
# All set-up on a fresh Debian machine: system packages (as root, through scripts/root), a
# virtualenv in .venv, and relay built and installed into it (editable, with the test and
# bench extras). Runs as root or as a user with sudo.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(gcc python3-dev python3-venv iproute2 nftables util-linux procps libcap2-bin
              socat iperf3 v2ray shadowsocks-libev tcpdump bind9-dnsutils dnsmasq-base)

# Only the system packages need root: scripts/root runs apt-get directly when this is root
# (a fresh Debian's root shell has no sudo) and through sudo otherwise. The virtualenv and
# the build belong to whoever runs this.
if command -v apt-get >/dev/null; then
    missing=()
    for p in "${APT_PACKAGES[@]}"; do
        # (dpkg -s also succeeds for a removed package whose configuration files remain)
        [ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" = "install ok installed" ] \
            || missing+=("$p")
    done
    if [ ${#missing[@]} -gt 0 ]; then
        if [ "$(id -u)" = 0 ] || command -v sudo >/dev/null; then
            echo "setup: installing ${missing[*]}"
            scripts/root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
            scripts/root env DEBIAN_FRONTEND=noninteractive \
                apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
        else
            echo "setup: not root and no sudo: not installing ${missing[*]}" >&2
        fi
    fi
else
    echo "setup: no apt-get: install these yourself: ${APT_PACKAGES[*]}" >&2
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,bench]'
.venv/bin/python -c "import relay; print('setup: relay', relay.__version__, 'extensions', relay.EXTENSIONS)"
