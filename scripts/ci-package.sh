#!/usr/bin/env bash
# CI: relay as users get it. Builds the sdist and the wheel from this tree (`python -m
# build`: the wheel is built from the sdist), then, in new virtualenvs in a
# temporary directory outside the checkout:
#   - installs the wheel (newest supported Python) and runs scripts/smoke_installed.py:
#     every extension imports from the installed package, relay.EXTENSIONS is all True,
#     and `relay forward` relays one datagram to a UDP echo and back;
#   - installs the sdist (oldest supported Python: it compiles there) and imports it.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)
# The packaging is what is checked here, not the code's speed: -O0 compiles in a fraction
# of the time of the default -O3 (setup.py RELAY_OPT).
export RELAY_OPT=-O0
. scripts/ci-common.sh      # OLDEST, NEWEST, find_python, isolate
py_new=$(find_python "$NEWEST")
py_old=$(find_python "$OLDEST")

work=$(mktemp -d /tmp/relay-package.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"          # nothing below may import relay from the checkout

# The sdist is made from a copy of the tree (the files git tracks or would track, as they
# are now), so that nothing here writes into the checkout while the unit tests run there.
mkdir src
git -C "$here" ls-files -z --cached --others --exclude-standard \
    | tar -C "$here" --null --files-from=- --ignore-failed-read -cf - | tar -C src -xf -
echo "ci-package: building the sdist and the wheel ($("$py_new" --version))"
"$py_new" -m venv tools
tools/bin/python -m pip install -q --upgrade pip build
# The two compiles run at the lowest priority: CI runs this beside the unit tests, which
# then keep their CPU (on an idle machine nice changes nothing).
nice -n 19 tools/bin/python -m build --outdir dist src >build.log 2>&1 || { cat build.log; exit 1; }
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
nice -n 19 sdist-env/bin/python -m pip install -v "$sdist" >sdist.log 2>&1 || { cat sdist.log; exit 1; }
if grep "DeprecationWarning" sdist.log; then
    echo "ci-package: FAILED: installing the sdist printed deprecation warnings (above)" >&2
    exit 1
fi
sdist-env/bin/python "$here/scripts/smoke_installed.py" --import-only
echo "ci-package: OK"
