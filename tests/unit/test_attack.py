"""Attacks on the TCP front of tunnel-server and socks5 (issue "hold under attack"): idle
connections that exhaust descriptors, and one address holding handshake slots. After each, a
legitimate client from another address is still served. Loopback only."""
import select
import socket
import time
import types

import psutil
import pytest

from relay import proto
from relay.services import admission
from tests.namespaces import wait_until
from tests.relayproc import RelayProcess
from tests.support import cfg, closed_by_peer, raw_associate, raw_client, read_frames

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


# ------------------------------------------------------------------ handshake slots


class Holder:
    """count idle connections to addr from one source address, refilled on refill():
    what the server closed is opened again (poll, not select: more than 1024 descriptors)."""

    def __init__(self, addr, count, source="127.0.0.2"):
        self.addr, self.count, self.source = addr, count, source
        self.socks = {}
        self.poll = select.poll()
        self.refill()

    def _open(self):
        s = socket.socket()
        s.bind((self.source, 0))
        s.setblocking(False)
        s.connect_ex(self.addr)
        self.socks[s.fileno()] = s
        self.poll.register(s, select.POLLIN | select.POLLHUP | select.POLLERR)

    def refill(self):
        for fd, _ev in self.poll.poll(0):
            s = self.socks.pop(fd)
            self.poll.unregister(fd)
            s.close()
        while len(self.socks) < self.count:
            self._open()

    def close(self):
        for s in self.socks.values():
            s.close()
        self.socks.clear()


def lo_service(running, mode):
    return running(cfg(mode, listen=("127.0.0.1", 0), allow=["127.0.0.0/8"]))


@pytest.mark.parametrize("mode,count", [("tunnel-server", 300), ("socks5", 300),
                                        ("socks5", 1100)])
def test_one_address_cannot_hold_the_handshake_slots(running, echo, mode, count):
    server = lo_service(running, mode)
    addr = server.address[:2]
    holder = Holder(addr, count)
    try:
        served = 0
        for _ in range(10):
            time.sleep(0.5)
            holder.refill()
            served += SERVED[mode](addr, echo)
        assert served == 10
        assert server.stats()["conn_rejected"] >= count - admission.PER_SOURCE
    finally:
        holder.close()


@pytest.mark.parametrize("mode", ["tunnel-server", "socks5"])
def test_full_handshake_pool_evicts_the_oldest(running, echo, monkeypatch, mode):
    """8 handshake slots held from 8 addresses: a ninth client gets in, the oldest goes."""
    monkeypatch.setattr(admission, "MAX_HANDSHAKES", 8)
    server = lo_service(running, mode)
    addr = server.address[:2]
    idle = idle_connections(addr, 8)
    try:
        wait_until(lambda: len(server.svc.handshakes) == 8, 5, what="8 handshakes pending")
        assert SERVED[mode](addr, echo)
        assert closed_by_peer(idle[0])
        assert server.stats()["conn_rejected"] >= 1
    finally:
        for s in idle:
            s.close()


def test_first_bytes_deadline(running, monkeypatch):
    """Silence is closed after FIRST_BYTES_TIMEOUT; a client that has begun its handshake
    has HANDSHAKE_TIMEOUT (10 s) for the rest."""
    monkeypatch.setattr(admission, "FIRST_BYTES_TIMEOUT", 0.5)
    for mode in ("tunnel-server", "socks5"):
        server = lo_service(running, mode)
        addr = server.address[:2]
        silent = socket.create_connection(addr, timeout=3)
        begun = socket.create_connection(addr, timeout=3)
        begun.sendall(b"\x05")                 # the first byte of a greeting
        with silent, begun:
            assert closed_by_peer(silent, 5)
            assert not closed_by_peer(begun, 1.5)
        assert server.stats()["conn_rejected"] >= 1


def test_pool_counts_sources_ipv4_and_ipv6():
    """Per-source counting: an IPv4 address (IPv4-mapped the same), an IPv6 /64; the oldest
    handshake is evicted when the pool is full; deadlines move once the first bytes arrive."""
    pool = admission.HandshakePool(cap=4, timeout=10.0, per_source=2, first_bytes=3.0)
    pool.add(1, "192.0.2.1", 0.0)
    pool.add(2, "::ffff:192.0.2.1", 0.0)
    assert pool.source_full("192.0.2.1") and pool.source_full("::ffff:192.0.2.1")
    assert not pool.source_full("192.0.2.2")
    pool.add(3, "2001:db8::1", 1.0)
    pool.add(4, "2001:db8::ffff:2", 1.0)
    assert pool.source_full("2001:db8::3") and not pool.source_full("2001:db8:0:1::1")
    assert pool.add(5, "2001:db8:0:1::1", 2.0) == 1         # full: the oldest goes
    assert 1 not in pool and len(pool) == 4 and not pool.source_full("192.0.2.1")
    pool.heard(2)
    assert sorted(pool.expired(4.5)) == [3, 4]              # silent for more than 3 s
    assert sorted(pool.expired(9.9)) == [3, 4, 5]            # 2 spoke: it has 10 s
    assert sorted(pool.expired(10.1)) == [2, 3, 4, 5]
    for t in (2, 3, 4, 5):
        pool.remove(t)
    assert len(pool) == 0 and pool.sources == {}
