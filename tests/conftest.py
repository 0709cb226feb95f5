import json
import socket
import os
import pathlib
import shutil
import signal
import subprocess
import time

import pytest

from relay.packet.pure.rawsock import RawSender as PureRawSender
from tests import namespaces as _netns
from tests import namespaces as N
from tests.relayproc import free_tcp_port as free_port
from tests.support import Echo, Running, native_rawsender


TESTS = pathlib.Path(__file__).resolve().parent
KINDS = ("unit", "netns", "interop", "bench")
SERIAL = ("run", "skip", "only")


def pytest_addoption(parser):
    parser.addoption(
        "--serial", choices=SERIAL, default="run",
        help="tests marked serial (they need the machine to themselves): run them with the "
             "others (run, the default), leave them out (skip: a run of tests side by side, "
             "pytest -n) or run only them (only). scripts/test runs the others side by side, "
             "then these one at a time")


def pytest_configure(config):
    # The tests take the descriptors relay itself takes at start (the hard limit): a login
    # shell or sudo often leaves the soft limit at 1024, below what the flood tests open.
    from relay.privileges import raise_nofile_limit
    raise_nofile_limit()
    config.addinivalue_line(
        "markers", "serial: needs the machine to itself (a flood, a benchmark, a deadline or "
                   "a reply window under a second): scripts/test runs it alone, after the "
                   "tests that run side by side")


def pytest_collection_modifyitems(config, items):
    """Every test that builds namespaces does it through the netns_available fixture
    (directly or through topo, slow_lo, ...): mark it `netns` from there, so that
    `-m "not netns"` selects exactly the tests that need no root and no namespace; every test
    in tests/interop/ is marked `interop`. The folder is the kind and the markers must say the
    same: a test in tests/unit/ or tests/bench/ that needs namespaces, one in tests/netns/
    that needs none, an interop test outside tests/interop/ or a test module outside the four
    folders stops the run (docs/architecture.md, the tests/ lines)."""
    wrong = []
    for item in items:
        uses_netns = "netns_available" in getattr(item, "fixturenames", ())
        if uses_netns:
            item.add_marker(pytest.mark.netns)
        try:
            kind = pathlib.Path(item.path).resolve().relative_to(TESTS).parts[0]
        except ValueError:
            continue                    # a test collected from outside tests/
        if kind == "interop":
            item.add_marker(pytest.mark.interop)
        if kind not in KINDS:
            wrong.append(f"{item.nodeid}: a test module belongs in tests/unit, tests/netns, "
                         "tests/interop or tests/bench")
        elif kind in ("unit", "bench") and item.get_closest_marker("netns"):
            wrong.append(f"{item.nodeid}: in tests/{kind}/ but needs network namespaces "
                         "(netns_available or the netns marker): it belongs in tests/netns/")
        elif kind == "netns" and not uses_netns:
            wrong.append(f"{item.nodeid}: in tests/netns/ but does not use the netns_available "
                         "fixture (topo, echo_topo, ...): it belongs in tests/unit/")
        elif kind != "interop" and item.get_closest_marker("interop"):
            wrong.append(f"{item.nodeid}: marked interop: it belongs in tests/interop/")
    if wrong:
        raise pytest.UsageError("tests in the wrong folder for their kind:\n  " + "\n  ".join(wrong))
    serial = config.getoption("serial")
    if serial != "run":
        keep = (serial == "only")
        chosen = [item for item in items if bool(item.get_closest_marker("serial")) == keep]
        if len(chosen) < len(items):
            ids = {id(item) for item in chosen}
            config.hook.pytest_deselected(items=[item for item in items if id(item) not in ids])
            items[:] = chosen


@pytest.fixture(scope="session")
def netns_available():
    reason = _netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    return True


@pytest.fixture
def topo(netns_available):
    """A fresh cli -- rtr -- srv topology, removed after the test whatever happens."""
    t = _netns.Topology()
    try:
        yield t
    finally:
        t.close()


@pytest.fixture(params=["c", "pure"])
def impl(request, monkeypatch):
    """Every test runs against the C cores (relay.datapath.tunnel) and the pure-Python fallback
    (relay.datapath.pure), which the services pick by RELAY_PURE_PYTHON."""
    if request.param == "pure":
        monkeypatch.setenv("RELAY_PURE_PYTHON", "1")
    else:
        monkeypatch.delenv("RELAY_PURE_PYTHON", raising=False)
    return request.param


@pytest.fixture
def running():
    started = []

    def start(c, ns=None):
        r = Running(c, ns)
        started.append(r)
        return r
    yield start
    errors = []
    for r in reversed(started):
        try:
            r.stop()
        except BaseException as e:
            errors.append(e)
    if errors:
        raise errors[0]


@pytest.fixture
def echo_topo(topo):
    N.start_echo(topo.srv, f"{N.SRV4}:7", f"[{N.SRV6}]:7", f"{N.SRV4_B}:7")
    return topo


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.close()


@pytest.fixture(params=["native", "pure"])
def RawSender(request):
    if request.param == "pure":
        return PureRawSender
    cls = native_rawsender()
    if cls is None:
        pytest.skip("relay.packet._rawsock is not built (python setup.py build_ext --inplace)")
    return cls


@pytest.fixture
def v2ray(tmp_path):
    exe = shutil.which("v2ray")
    if exe is None:
        pytest.skip("v2ray is not installed (Debian package v2ray)")
    port = free_port()
    conf = {"log": {"loglevel": "warning"},
            "inbounds": [{"listen": "127.0.0.1", "port": port, "protocol": "socks",
                          "settings": {"auth": "noauth", "udp": True, "ip": "127.0.0.1"}}],
            "outbounds": [{"protocol": "freedom", "settings": {}}]}
    path = tmp_path / "v2ray.json"
    path.write_text(json.dumps(conf))
    version = subprocess.run([exe, "version"], capture_output=True, text=True, timeout=10).stdout
    # v4 takes -config FILE; v5 takes `run -c FILE`
    cmd = [exe, "-config", str(path)] if " 4." in version else [exe, "run", "-c", str(path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    out = proc.stdout.read().decode(errors="replace") if proc.stdout else ""
                    pytest.fail(f"v2ray did not start: {out[-2000:]}")
                time.sleep(0.05)
        yield ("127.0.0.1", port)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        proc.stdout.close()


@pytest.fixture
def core(impl):
    """The tunnel cores of the implementation under test (relay._select chooses)."""
    from relay import _select
    return _select.module("tunnel")


@pytest.fixture
def upstream_cores(core):
    """make(class_name, server, **kw) -> (an upstream core (TunnelUpstream, Socks5Upstream)
    of the implementation under test, the list its replies are collected in); each is
    closed after the test."""
    made = []

    def make(name, server, **kw):
        up = getattr(core, name)(server, **kw)
        got = []
        up.collect_replies(got)
        made.append(up)
        return up, got
    yield make
    for up in made:
        up.close()
