# Sourced by scripts/ci-pythons.sh and scripts/ci-package.sh.
# The oldest and the newest supported Python (requires-python in pyproject.toml; CI tests
# both, tests/unit/test_packaging.py checks that they agree).
OLDEST=3.9
NEWEST=3.13

find_python() {     # the newest interpreter of minor version $1 (3.9, ...) on this machine
    local v=$1 found
    found=$(for c in "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v".*/bin/python3 \
                     /root/.pyenv/versions/"$v".*/bin/python3 \
                     /usr/local/bin/python"$v" /usr/bin/python"$v"; do
                [ -x "$c" ] && [ "$("$c" -c 'import sys; print("%d.%d" % sys.version_info[:2])' \
                                    2>/dev/null)" = "$v" ] && echo "$c"
            done | sort -V | tail -1)
    if [ -z "$found" ] && command -v pyenv >/dev/null; then
        echo "ci: no Python $v here: pyenv install $v" >&2
        pyenv install --skip-existing "$v" >&2 || true
        found=$(ls -d "$(pyenv root)"/versions/"$v".*/bin/python3 2>/dev/null | sort -V | tail -1)
    fi
    if [ -z "$found" ]; then
        echo "ci: FAILED: Python $v (a supported version) is not on this machine" \
             "and could not be installed" >&2
        return 1
    fi
    echo "$found"
}

# Prefix that runs a command in a new network namespace with only loopback up (when root):
# its loopback ports cannot meet those of the other runs going on beside it.
isolate=()
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null; then
    isolate=(unshare --net sh -c 'ip link set lo up && exec "$@"' isolate)
fi
