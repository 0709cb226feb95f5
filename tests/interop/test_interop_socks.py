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
from tests.support import Echo

_tunnel = pytest.importorskip("relay.datapath.tunnel")
pytestmark = pytest.mark.interop


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
    from relay.datapath import pure
    up = (_tunnel if impl == "c" else pure).Socks5Upstream(v2ray)
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
