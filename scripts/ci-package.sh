#!/usr/bin/env bash
# CI: relay as users get it. Builds the sdist and the wheel from this checkout
# (`python -m build`: the wheel is built from the sdist), then, in new virtualenvs in a
# temporary directory outside the checkout:
#   - installs the wheel (newest supported Python) and runs scripts/smoke_installed.py:
#     every extension imports from the installed package, relay.EXTENSIONS is all True,
#     and `relay forward` relays one datagram to a UDP echo and back;
#   - installs the sdist (oldest supported Python: it compiles there) and imports it.
# Needs .venv-3.9 and .venv-3.13 from scripts/ci-pythons.sh (their interpreters).
set -euo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)
. scripts/ci-common.sh      # OLDEST, NEWEST, isolate
base_python() {     # the interpreter a venv made by scripts/ci-pythons.sh was made from
    "$here/.venv-$1/bin/python" -c 'import sys; print(sys._base_executable)'
}
py_new=$(base_python "$NEWEST")
py_old=$(base_python "$OLDEST")

work=$(mktemp -d /tmp/relay-package.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"          # nothing below may import relay from the checkout

echo "ci-package: building the sdist and the wheel ($("$py_new" --version))"
"$py_new" -m venv tools
tools/bin/python -m pip install -q --upgrade pip build
tools/bin/python -m build --outdir dist "$here" >build.log 2>&1 || { cat build.log; exit 1; }
if grep "DeprecationWarning" build.log; then
    echo "ci-package: FAILED: the build printed deprecation warnings (above)" >&2
    exit 1
fi
sdist=$(ls dist/relay-*.tar.gz)
wheel=$(ls dist/relay-*.whl)
echo "ci-package: built $(basename "$sdist") and $(basename "$wheel")"

"$py_new" -m venv wheel-env
wheel-env/bin/python -m pip install -q "$wheel"
"${isolate[@]}" wheel-env/bin/python "$here/scripts/smoke_installed.py" \
    --relay wheel-env/bin/relay --control "$work/relay.sock"

echo "ci-package: installing the sdist ($("$py_old" --version), compiles)"
"$py_old" -m venv sdist-env
sdist-env/bin/python -m pip install -q "$sdist" >sdist.log 2>&1 || { cat sdist.log; exit 1; }
sdist-env/bin/python "$here/scripts/smoke_installed.py" --import-only
echo "ci-package: OK"
