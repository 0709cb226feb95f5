"""Interop with real SOCKS5 peers: Socks5Upstream (the core behind `--upstream socks5://`)
through v2ray's socks inbound with UDP on, and PySocks against v2ray as a control that the
peer itself works. v2ray listens on 127.0.0.1 only and is stopped by pid."""
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from tests.relayproc import free_tcp_port as free_port
from tests.test_tunnel import Echo

_tunnel = pytest.importorskip("relay._tunnel")
pytestmark = pytest.mark.interop


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
def echo():
    e = Echo()
    yield e
    e.close()


def pump(up, got, n, timeout=5.0):
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        up.process()
        up.tick()
        time.sleep(0.005)


@pytest.mark.parametrize("impl", ["c", "pure"])
def test_socks5_upstream_through_v2ray(v2ray, echo, impl):
    from relay import tunnelproto
    up = (_tunnel if impl == "c" else tunnelproto).Socks5Upstream(v2ray)
    got = []
    up.collect_replies(got)
    try:
        clients = [("192.0.2.%d" % i, 4000 + i) for i in range(1, 9)]
        for c in clients:
            up.send(c, echo.addr, b"hello from %d" % c[1])
        up.flush()
        pump(up, got, len(clients))
        assert sorted(got) == sorted((c, echo.addr, b"hello from %d" % c[1]) for c in clients)
        # sizes over the established associations, replies keep their flow. v2ray 4.x
        # itself truncates datagrams above about 2 KiB and drops empty ones, so stay below.
        sizes = [1, 100, 1400, 2000]
        got.clear()
        for size in sizes:
            up.send(clients[0], echo.addr, b"s" * size)
        up.flush()
        pump(up, got, len(sizes))
        assert sorted(len(d) for _c, _s, d in got) == sorted(sizes)
        assert all(c == clients[0] for c, _s, _d in got)
        st = dict(zip(__import__("relay.stats").stats.COUNTERS, up.stats.tolist()))
        assert st["assoc_created"] == len(clients) and st["frames_bad"] == 0
    finally:
        up.close()


def test_pysocks_through_v2ray(v2ray, echo):
    socks = pytest.importorskip("socks")
    s = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    s.set_proxy(socks.SOCKS5, *v2ray)
    s.settimeout(3)
    try:
        s.sendto(b"control", echo.addr)
        assert s.recvfrom(100)[0] == b"control"
    finally:
        s.close()
