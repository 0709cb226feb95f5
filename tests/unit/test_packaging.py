"""The packaging and set-up promises that CI rests on: the sdist carries every file the
extensions compile from, the supported Pythons are the ones CI runs, .ci/run runs the
README's own test command, and that command needs no sudo when already root."""
import fnmatch
import os
import pathlib
import re
import stat
import subprocess
import sys
import tempfile

import pytest
from tests.support import REPO


if sys.version_info >= (3, 11):
    import tomllib
else:
    tomllib = pytest.importorskip("tomli")


def read(path):
    with open(os.path.join(REPO, path)) as f:
        return f.read()


def pyproject():
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def readme_commands():
    """The commands of the README's first code block (comments dropped)."""
    block = re.search(r"```sh\n(.*?)```", read("README.md"), re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def test_package_data_covers_every_file_the_extensions_compile_from():
    patterns = pyproject()["tool"]["setuptools"]["package-data"]["relay"]
    needed = []
    for dirpath, dirnames, files in os.walk(os.path.join(REPO, "relay")):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in files:
            if name.endswith((".pyx", ".pxd", ".pxi", ".h")):
                needed.append(os.path.relpath(os.path.join(dirpath, name),
                                              os.path.join(REPO, "relay")))
    assert os.path.join("packet", "_batch.pxi") in needed
    assert os.path.join("includes", "compat.h") in needed
    missing = [f for f in needed if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert missing == [], f"not in the sdist/wheel (package-data): {missing}"


def test_license_is_an_spdx_expression_with_a_setuptools_that_reads_it():
    doc = pyproject()
    assert doc["project"]["license"] == "MIT"
    assert "setuptools>=77" in doc["build-system"]["requires"]     # PEP 639 support


def test_tomli_is_a_dependency_exactly_where_tomllib_is_missing():
    deps = pyproject()["project"]["dependencies"]
    tomli = [d for d in deps if d.startswith("tomli")]
    assert len(tomli) == 1 and tomli[0].replace('"', "'").endswith("python_version < '3.11'")


def test_ci_runs_the_oldest_and_newest_supported_python():
    assert pyproject()["project"]["requires-python"] == ">=3.9"
    common = read("scripts/ci-common.sh")
    assert re.search(r"^OLDEST=3\.9$", common, re.M)
    assert re.search(r"^NEWEST=3\.13$", common, re.M)
    assert 'names=("python$OLDEST" "python$NEWEST")' in read("scripts/ci-pythons.sh")
    # and each run tests both implementations: the tunnel cores through the impl fixture
    assert '@pytest.fixture(params=["c", "pure"])\ndef impl' in read("tests/conftest.py")
    assert "Supported Python: 3.9 to 3.13" in read("README.md")


def test_ci_runs_exactly_the_readme_test_command():
    commands = readme_commands()
    assert len(commands) == 2, commands
    run_cmd, test_cmd = commands
    assert "relay forward" in run_cmd and test_cmd.endswith("scripts/test")
    script = read("scripts/test")                     # the whole suite, in its two parts
    assert '-m "not netns"' in script and "-m netns" in script and "pytest" in script
    ci = [line.strip() for line in read(".ci/run").splitlines()]
    steps = [line for line in ci if line and not line.startswith(("#", "set ", "cd "))]
    assert steps[0] == test_cmd                      # first, and exactly as written
    assert "scripts/ci-pythons.sh || status=1" in steps
    assert any(line.startswith("scripts/ci-package.sh ") for line in steps)
    assert steps[-1] == 'exit "$status"'


def test_readme_commands_need_no_sudo():
    for cmd in readme_commands():
        assert "sudo" not in cmd.split(), cmd
        assert cmd.startswith("./scripts/setup.sh && ")


def _bin(tmp_path, name, sudo):
    """A PATH directory with `id` and, if ``sudo``, a `sudo` that records its arguments
    in tmp_path/sudo.args."""
    d = tmp_path / name
    d.mkdir()
    os.symlink("/usr/bin/id", d / "id")
    if sudo:
        (d / "sudo").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/sudo.args\n')
        (d / "sudo").chmod(0o755)
    return str(d)


@pytest.mark.skipif(os.geteuid() != 0, reason="runs scripts/root as root and as nobody")
def test_scripts_root_runs_directly_as_root_and_through_sudo_otherwise():
    root = os.path.join(REPO, "scripts", "root")
    assert os.stat(root).st_mode & stat.S_IXOTH
    with tempfile.TemporaryDirectory() as d:     # in /tmp: nobody reaches it
        os.chmod(d, 0o777)
        _check_scripts_root(root, pathlib.Path(d))


def _check_scripts_root(root, tmp_path):
    plain, with_sudo = _bin(tmp_path, "plain", False), _bin(tmp_path, "sudo", True)
    cmd = ["/bin/sh", root, "/usr/bin/id", "-u"]

    def as_nobody():
        os.setgid(65534)
        os.setuid(65534)
    # root, no sudo anywhere: the command itself
    r = subprocess.run(cmd, capture_output=True, text=True, env={"PATH": plain})
    assert (r.returncode, r.stdout.strip()) == (0, "0"), r.stderr
    # root, sudo there: still the command itself
    r = subprocess.run(cmd, capture_output=True, text=True, env={"PATH": with_sudo})
    assert (r.returncode, r.stdout.strip()) == (0, "0"), r.stderr
    assert not (tmp_path / "sudo.args").exists()
    # not root: through sudo
    r = subprocess.run(cmd, capture_output=True, text=True, env={"PATH": with_sudo},
                       preexec_fn=as_nobody)
    assert r.returncode == 0, r.stderr
    # (without bytecode: no root-owned __pycache__ in the user's checkout)
    assert (tmp_path / "sudo.args").read_text().split() == [
        "--", "env", "PYTHONDONTWRITEBYTECODE=1", "/usr/bin/id", "-u"]
    # not root, no sudo: a clear refusal
    r = subprocess.run(cmd, capture_output=True, text=True, env={"PATH": plain},
                       preexec_fn=as_nobody)
    assert r.returncode == 1 and "needs root" in r.stderr and r.stdout == "", r
