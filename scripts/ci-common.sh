# Sourced by scripts/ci-pythons.sh and scripts/ci-package.sh.
# The oldest and the newest supported Python (requires-python in pyproject.toml; CI tests
# both, tests/test_packaging.py checks that they agree).
OLDEST=3.9
NEWEST=3.13

# Prefix that runs a command in a new network namespace with only loopback up (when root):
# its loopback ports cannot meet those of the other runs going on beside it.
isolate=()
if [ "$(id -u)" = 0 ] && command -v unshare >/dev/null; then
    isolate=(unshare --net sh -c 'ip link set lo up && exec "$@"' isolate)
fi
