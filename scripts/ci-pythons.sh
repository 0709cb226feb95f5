#!/usr/bin/env bash
# CI, after the README's test command: the tests that need no root (every test not marked
# `netns`: tests/unit, tests/bench and the interop tests with a peer on loopback) on
# the oldest and the newest supported Python, each with the extensions compiled for it in
# place (.venv-3.9, .venv-3.13: pyproject.toml's requirements, then `pip install -e .`
# without an isolated build environment); inside each run the tests
# parametrize over the compiled and the pure-Python implementation.
#
# The two runs go side by side (the tests wait on sockets and timers more than they
# compute), each in a network namespace of its own when this is root, so that their
# loopback ports can never meet, each with its own pytest temporary directory; then the
# tests marked serial, one run after the other. The builds compile at -O1 and reuse the C
# that Cython made for .venv (scripts/setup.sh) when it is newer than every source.
# An interpreter that cannot be found or installed fails the run: nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ci-common.sh      # OLDEST, NEWEST, find_python, isolate

prepare() {         # .venv-$1 for Python $1: relay's requirements, build and test, installed
    local v=$1 py venv=.venv-$1
    if [ ! -x "$venv/bin/python" ]; then
        py=$(find_python "$v")
        echo "ci-pythons: Python $v is $py"
        "$py" -m venv "$venv"
    fi
    # --no-compile: the tests import a small part of what is installed (scapy, hypothesis)
    "$venv/bin/python" -m pip install -q --no-compile "${requires[@]}"
}

build() {           # relay built in place into .venv-$1 (prepared)
    local venv=.venv-$1
    # -O1: these builds only run the tests (they compile in well under half the -O3 time;
    # with -O0 and three processes per run, test_client_that_never_reads[c] missed its
    # one-second stall window on a loaded machine). No isolated build environment: its new Cython's .pxd files (libc, cpython) would be
    # newer than any C, and every build would cythonize again (half its time).
    RELAY_OPT=-O1 "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e .
    # every extension must import: the tests of a missing one would only be skipped
    "$venv/bin/python" -c 'import sys, relay.packet._fast, relay.packet._rawsock, relay.datapath.engine, relay.datapath.tunnel
print("ci-pythons: Python %d.%d.%d, extensions built" % sys.version_info[:3])'
}

fresh_c() {         # mark current the C files cythonize wrote after the last source change
    # Cython's C is the same whichever Python runs Cython (the version checks are in the C),
    # so C made from the present sources (by scripts/setup.sh's build) serves every
    # interpreter; older C is left alone, and cythonized again.
    local newest c
    newest=$(find relay \( -name '*.pyx' -o -name '*.pxd' -o -name '*.pxi' -o -name '*.h' \) \
                  -printf '%T@\n' | sort -n | tail -1)
    for c in relay/packet/_fast.c relay/packet/_rawsock.c relay/datapath/engine.c \
             relay/datapath/tunnel.c; do
        if [ -f "$c" ] && [ "$(stat -c %.9Y "$c")" \> "$newest" ]; then
            touch "$c"
        fi
    done
}

# pyproject.toml's build requirements, dependencies and test extra, read by .venv's Python
# (3.9 has no tomllib)
mapfile -t requires < <(.venv/bin/python -c 'import tomllib
doc = tomllib.load(open("pyproject.toml", "rb"))
print("\n".join(doc["build-system"]["requires"] + doc["project"]["dependencies"]
                + doc["project"]["optional-dependencies"]["test"]))')

# The two venvs are filled side by side (pip, one core each); the two builds then one after
# the other (both write relay.egg-info in the checkout).
start=$SECONDS
prepare "$OLDEST" & prep0=$!
prepare "$NEWEST" & prep1=$!
wait "$prep0"
wait "$prep1"
fresh_c
build "$OLDEST"
build "$NEWEST"
echo "ci-pythons: built for Python $OLDEST and $NEWEST in $((SECONDS - start)) s"

logs=$(mktemp -d /tmp/relay-ci-pythons.XXXXXX)
trap 'rm -rf "$logs"' EXIT

run() {             # run NAME PYTHON PYTEST-ARGS...: the unit tests, output added to $logs/NAME
    local name=$1 py=$2
    shift 2
    # (no test is "no tests", exit 5: no failure)
    env RELAY_PURE_PYTHON=0 RELAY_TEST_EXAMPLES=0.2 "${isolate[@]}" "$py" -m pytest -q \
        -m "not netns" -p no:cacheprovider --basetemp="$logs/tmp-$name" "$@" \
        >>"$logs/$name" 2>&1 || [ "$?" = 5 ]
}

# Compiled on both; the pure twins are exercised inside every run (the tests parametrize
# over both implementations), so a third, pure-only run would only repeat them. Property
# tests run a fifth of their examples here (RELAY_TEST_EXAMPLES): the full run searched.
# Two processes each (three, with -O0, made a test miss its window on a loaded machine);
# then the tests marked serial, each run's alone.
names=("python$OLDEST" "python$NEWEST")
run "${names[0]}" ".venv-$OLDEST/bin/python" -n 2 --serial=skip & p0=$!
run "${names[1]}" ".venv-$NEWEST/bin/python" -n 2 --serial=skip & p1=$!
rcs=(0 0)
wait "$p0" || rcs[0]=$?
wait "$p1" || rcs[1]=$?
run "${names[0]}" ".venv-$OLDEST/bin/python" --serial=only || rcs[0]=$?
run "${names[1]}" ".venv-$NEWEST/bin/python" --serial=only || rcs[1]=$?
status=0
for i in 0 1; do
    echo "=== unit tests, ${names[$i]} (exit ${rcs[$i]}) ==="
    cat "$logs/${names[$i]}"
    [ "${rcs[$i]}" = 0 ] || status=1
done
[ "$status" = 0 ] || echo "ci-pythons: FAILED" >&2
exit "$status"
