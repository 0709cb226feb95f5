#!/usr/bin/env bash
# CI, after the README's test command: the tests that need no root (every test not marked
# `netns`: tests/unit, tests/bench and the interop tests with a peer on loopback) on
# the oldest and the newest supported Python, each with the extensions compiled for it in
# place (.venv-3.9, .venv-3.13: `pip install -e '.[test]'`); inside each run the tests
# parametrize over the compiled and the pure-Python implementation.
#
# The two runs go side by side (the tests wait on sockets and timers more than they
# compute), each in a network namespace of its own when this is root, so that their
# loopback ports can never meet, each with its own pytest temporary directory.
# An interpreter that cannot be found or installed fails the run: nothing is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ci-common.sh      # OLDEST, NEWEST, find_python, isolate

build() {           # .venv-$1: the test dependencies and relay built in place for Python $1
    local v=$1 py venv=.venv-$1
    if [ ! -x "$venv/bin/python" ]; then
        py=$(find_python "$v")
        echo "ci-pythons: Python $v is $py"
        "$py" -m venv "$venv"
    fi
    # -O1: these builds only run the tests (they compile in well under half the time)
    RELAY_OPT=-O1 "$venv/bin/python" -m pip install -q -e '.[test]'
    # every extension must import: the tests of a missing one would only be skipped
    "$venv/bin/python" -c 'import sys, relay.packet._fast, relay.packet._rawsock, relay.datapath.engine, relay.datapath.tunnel
print("ci-pythons: Python %d.%d.%d, extensions built" % sys.version_info[:3])'
}

start=$SECONDS
build "$OLDEST"
build "$NEWEST"
echo "ci-pythons: built for Python $OLDEST and $NEWEST in $((SECONDS - start)) s"

logs=$(mktemp -d /tmp/relay-ci-pythons.XXXXXX)
trap 'rm -rf "$logs"' EXIT

run() {             # run NAME PYTHON [ENV=VALUE...]: the unit tests, output to $logs/NAME
    local name=$1 py=$2
    shift 2
    env "$@" "${isolate[@]}" "$py" -m pytest -q -n 2 -m "not netns" -p no:cacheprovider \
        --basetemp="$logs/tmp-$name" >"$logs/$name" 2>&1
}

# Compiled on both; the pure twins are exercised inside every run (the tests parametrize
# over both implementations), so a third, pure-only run would only repeat them. Property
# tests run a fifth of their examples here (RELAY_TEST_EXAMPLES): the full run searched.
names=("python$OLDEST" "python$NEWEST")
run "${names[0]}" ".venv-$OLDEST/bin/python" RELAY_PURE_PYTHON=0 RELAY_TEST_EXAMPLES=0.2 & p0=$!
run "${names[1]}" ".venv-$NEWEST/bin/python" RELAY_PURE_PYTHON=0 RELAY_TEST_EXAMPLES=0.2 & p1=$!
status=0
for i in 0 1; do
    pid_var=p$i
    rc=0
    wait "${!pid_var}" || rc=$?
    echo "=== unit tests, ${names[$i]} (exit $rc) ==="
    cat "$logs/${names[$i]}"
    [ "$rc" = 0 ] || status=1
done
[ "$status" = 0 ] || echo "ci-pythons: FAILED" >&2
exit "$status"
