"""Attacks on the TCP front of tunnel-server and socks5 (issue "hold under attack"): idle
connections that exhaust descriptors, and one address holding handshake slots. After each, a
legitimate client from another address is still served. Loopback only."""
import socket
import time
import types

import psutil
import pytest

from relay import proto
from tests.netns import wait_until
from tests.relayproc import RelayProcess
from tests.support import raw_associate, raw_client, read_frames

pytest.importorskip("relay.datapath.tunnel")
pytestmark = pytest.mark.usefixtures("impl")     # every test: compiled, then pure


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def idle_connections(addr, n, first_source=10):
    """n idle TCP connections to addr, each from its own 127.0.0.x source."""
    out = []
    for i in range(n):
        s = socket.socket()
        s.bind((f"127.0.0.{first_source + i % 200}", 0))
        s.settimeout(3)
        s.connect(addr)
        out.append(s)
    return out


def tunnel_served(addr, echo, tag=b"legit"):
    s, _ = raw_client(types.SimpleNamespace(address=addr))
    with s:
        s.sendall(proto.encode_frame(*echo.addr, tag, flow=1))
        return [f.data for f in read_frames(s, 1)] == [tag]


def socks5_served(addr, echo, tag=b"legit"):
    ctl, u, relay = raw_associate(None, at=addr)
    with ctl, u:
        u.sendto(proto.udp_header(*echo.addr) + tag, relay)
        got, _ = u.recvfrom(1000)
        return got.endswith(tag)


SERVED = {"tunnel-server": tunnel_served, "socks5": socks5_served}


def cpu_seconds(procs):
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


@pytest.mark.parametrize("mode", sorted(SERVED))
def test_descriptor_exhaustion_does_not_spin(mode, echo):
    """64 descriptors, 80 idle connections: the worker neither spins on EMFILE nor floods
    its log; refused connections are counted; once the idle ones close, a client is served."""
    addr = ("127.0.0.1", free_port())
    with RelayProcess([mode, "--listen", f"127.0.0.1:{addr[1]}", "--allow", "127.0.0.0/8"],
                      prefix=("prlimit", "--nofile=64:64", "--"), log_level="info") as r:
        r.wait_ready()
        assert SERVED[mode](addr, echo)
        procs = [psutil.Process(pid) for pid in r.worker_pids()]
        idle = idle_connections(addr, 80)
        try:
            time.sleep(0.5)                         # the worker meets them
            cpu0, t0 = cpu_seconds(procs), time.monotonic()
            time.sleep(2.0)
            cpu = (cpu_seconds(procs) - cpu0) / (time.monotonic() - t0)
            assert cpu < 0.5, f"worker busy {cpu:.0%} of a core with idle connections"
            st = r.stats()
            assert st["conn_rejected"] >= 1
        finally:
            for s in idle:
                s.close()
        wait_until(lambda: SERVED[mode](addr, echo), 10, what="a client served again")
        lines = r.log().splitlines()
        assert len(lines) < 100, "\n".join(lines[:20])
