"""Destinations given as host names (ATYP 3) on the tunnel server and the SOCKS5 UDP relay.

The cores run in a thread of this process and get datagrams over loopback: the tunnel
server through a socketpair carrying a plain (gost) connection, the SOCKS5 relay through
an association's UDP socket. A test-local resolver function stands in for getaddrinfo
where a positive answer or a slow lookup is needed; `localhost` and `name.invalid` use the
real resolver (neither needs the network). C core and pure fallback alike."""
import errno
import os
import socket
import threading
import time

import pytest

from relay import _select

from relay import proto
from relay import resolver as relay_resolver
from relay.stats import INDEX as _stats_index
from tests import namespaces as N
from tests.support import Echo, Running, cfg, raw_client, read_frames, wait_stat  # noqa: F401

_tunnel = pytest.importorskip("relay.datapath.tunnel")
pytestmark = pytest.mark.usefixtures("impl")     # every test: compiled, then pure

C = _stats_index
LOOPBACK = ["127.0.0.0/8", "::1/128"]


class FakeResolver:
    """resolve(name) for the cores: answers from a table, fails otherwise; a name with a
    gate waits until the gate opens (a slow lookup). Records every call."""

    def __init__(self, table=None):
        self.table = dict(table or {})
        self.calls = []
        self.gates = {}

    def gate(self, name):
        ev = self.gates[name] = threading.Event()
        return ev

    def __call__(self, name):
        self.calls.append(name)
        if name in self.gates:
            self.gates[name].wait(10)
        if name in self.table:
            return self.table[name]
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    def release(self):
        for ev in self.gates.values():
            ev.set()


class Looping:
    """poll() + tick() of a core in a thread until closed."""

    def __init__(self, core):
        self.core = core
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop.is_set():
            self.core.poll(20)
            self.core.tick(time.monotonic())

    def stat(self, name):
        return self.core.stats[C[name]]

    def wait(self, name, at_least=1, timeout=5.0):
        N.wait_until(lambda: self.stat(name) >= at_least, timeout, what=f"{name} >= {at_least}")

    def close(self):
        self.stop.set()
        self.t.join(5)
        if hasattr(self.core, "close_all"):
            self.core.close_all()
        self.core.close()


def core_module(impl):
    return _select.module("tunnel")


@pytest.fixture
def resolver():
    r = FakeResolver()
    yield r
    r.release()


class _Side:
    """A core (class `name` of the implementation) relaying for clients on loopback; the
    access list allows `allow` besides the defaults."""

    def __init__(self, impl, name, resolve, allow):
        acl = proto.AccessList(allow=allow).table()
        self.loop = Looping(getattr(core_module(impl), name)(acl, None, resolve=resolve))


class TunnelSide(_Side):
    """A TunnelServer core with plain (gost, CMD 0xF3) connections over socketpairs."""

    def __init__(self, impl, resolve, allow=LOOPBACK):
        super().__init__(impl, "TunnelServer", resolve, allow)
        self.peers = []
        self.rx = {}

    def connection(self):
        a, b = socket.socketpair()
        self.loop.core.stats[C["conn_open"]] += 1         # as the service does on accept
        self.loop.core.add_conn(a.detach(), False)
        b.settimeout(3)
        self.peers.append(b)
        return b

    @staticmethod
    def send(peer, host, port, data):
        peer.sendall(proto.encode_frame(host, port, data))

    def recv(self, peer):
        """The next frame from the server: ((host, port), data)."""
        buf = self.rx.get(peer, b"")
        while True:
            r = proto.parse_frame(buf)
            if r is not None:
                self.rx[peer] = buf[r[1]:]
                return (r[0].host, r[0].port), r[0].data
            buf += peer.recv(70000)

    def close(self):
        for p in self.peers:
            p.close()
        self.loop.close()


class SocksSide(_Side):
    """A Socks5Relay core with associations for IPv4 clients on loopback."""

    def __init__(self, impl, resolve, allow=LOOPBACK):
        super().__init__(impl, "Socks5Relay", resolve, allow)
        self.socks = []
        self.relays = {}

    def connection(self, family=socket.AF_INET):
        host = "127.0.0.1" if family == socket.AF_INET else "::1"
        relay = socket.socket(family, socket.SOCK_DGRAM)
        relay.bind((host, 0))
        client = socket.socket(family, socket.SOCK_DGRAM)
        client.bind((host, 0))
        client.settimeout(3)
        idx = self.loop.core.add(relay.fileno(), client.getsockname()[:2])
        assert idx >= 0
        self.socks += [relay, client]
        self.relays[client] = (relay.getsockname()[:2], idx)
        return client

    def send(self, client, host, port, data):
        client.sendto(proto.udp_header(host, port) + data, self.relays[client][0])

    @staticmethod
    def recv(client):
        got = client.recv(70000)
        _frag, _atyp, host, port, hl = proto.parse_udp_header(got)
        return (host, port), got[hl:]

    def remove(self, client):
        self.loop.core.remove(self.relays[client][1])

    def close(self):
        self.loop.close()
        for s in self.socks:
            s.close()


@pytest.fixture(params=["tunnel", "socks5"])
def side(request, impl):
    made = []

    def make(resolve, **kw):
        s = (TunnelSide if request.param == "tunnel" else SocksSide)(impl, resolve, **kw)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def test_name_resolved_once_and_reply_keeps_the_address(side, resolver, echo):
    resolver.table["echo.test"] = ["127.0.0.1"]
    s = side(resolver)
    peer = s.connection()
    s.send(peer, "echo.test", echo.addr[1], b"first")
    assert s.recv(peer) == (echo.addr, b"first")          # the resolved source, not the name
    for name in ("echo.test", "ECHO.Test"):                # cache hit, case-insensitive
        s.send(peer, name, echo.addr[1], name.encode())
        assert s.recv(peer) == (echo.addr, name.encode())
    assert resolver.calls == ["echo.test"]
    assert s.loop.stat("up_datagrams") == 3 and s.loop.stat("drop_no_route") == 0


def test_acl_judges_the_resolved_address(side, resolver, echo):
    resolver.table["echo.test"] = ["127.0.0.1"]
    s = side(resolver, allow=[])                           # loopback denied by default
    peer = s.connection()
    s.send(peer, "echo.test", echo.addr[1], b"denied")
    s.loop.wait("drop_denied")
    assert s.loop.stat("up_datagrams") == 0


def test_failure_is_remembered_and_counted(side, resolver, echo):
    s = side(resolver)
    peer = s.connection()
    s.send(peer, "nx.test", 53, b"one")
    s.loop.wait("drop_no_route")
    s.send(peer, "nx.test", 53, b"two")
    s.loop.wait("drop_no_route", 2)
    assert resolver.calls == ["nx.test"]                  # negative answer cached
    assert s.loop.stat("up_datagrams") == 0


def test_slow_lookup_parks_bounded_and_never_blocks(side, resolver, echo):
    resolver.table["slow.test"] = ["127.0.0.1"]
    gate = resolver.gate("slow.test")
    s = side(resolver)
    waiting, other = s.connection(), s.connection()
    n = relay_resolver.DNS_PARK_PER_NAME + 4
    for i in range(n):
        s.send(waiting, "slow.test", echo.addr[1], b"w%d" % i)
    s.loop.wait("queue_drops", 4)
    # another flow is served while the lookup hangs
    s.send(other, *echo.addr, b"meanwhile")
    assert s.recv(other) == (echo.addr, b"meanwhile")
    assert s.loop.core.dns.parked == relay_resolver.DNS_PARK_PER_NAME
    assert s.loop.stat("queue_drops") == 4 and s.loop.stat("up_datagrams") == 1
    gate.set()
    got = sorted(s.recv(waiting)[1] for _ in range(relay_resolver.DNS_PARK_PER_NAME))
    assert got == sorted(b"w%d" % i for i in range(relay_resolver.DNS_PARK_PER_NAME))
    s.loop.wait("up_datagrams", relay_resolver.DNS_PARK_PER_NAME + 1)
    assert resolver.calls == ["slow.test"]


def test_lookup_given_up_after_its_time(side, resolver, echo, monkeypatch):
    monkeypatch.setattr(relay_resolver, "DNS_GIVE_UP", 0.3)
    resolver.table["hang.test"] = ["127.0.0.1"]
    gate = resolver.gate("hang.test")
    s = side(resolver)
    peer = s.connection()
    for i in range(3):
        s.send(peer, "hang.test", echo.addr[1], b"h")
    s.loop.wait("drop_no_route", 3, timeout=5)
    gate.set()                                             # the late answer changes nothing
    time.sleep(0.2)
    assert s.loop.stat("up_datagrams") == 0 and s.loop.stat("drop_no_route") == 3


def test_owner_gone_while_resolving(impl, resolver, echo):
    resolver.table["slow.test"] = ["127.0.0.1"]
    gate = resolver.gate("slow.test")
    s = SocksSide(impl, resolver)
    try:
        client = s.connection()
        s.send(client, "slow.test", echo.addr[1], b"orphan")
        N.wait_until(lambda: resolver.calls, 5, what="lookup started")
        s.remove(client)
        s.connection()                                     # the slot may be taken again
        gate.set()
        s.loop.wait("drop_no_route")
        assert s.loop.stat("up_datagrams") == 0
    finally:
        s.close()


def test_family_follows_the_socket(impl, resolver, echo):
    """A dual-stack tunnel flow socket takes the first address getaddrinfo gave; an
    IPv4-only SOCKS5 relay socket takes the first IPv4 one."""
    resolver.table["both.test"] = ["::1", "127.0.0.1"]
    echo6 = Echo("::1")
    t = TunnelSide(impl, resolver)
    so = SocksSide(impl, resolver)
    try:
        peer = t.connection()
        t.send(peer, "both.test", echo6.addr[1], b"six")
        assert t.recv(peer) == (echo6.addr, b"six")
        client = so.connection()
        so.send(client, "both.test", echo.addr[1], b"four")
        assert so.recv(client) == (echo.addr, b"four")
    finally:
        t.close()
        so.close()
        echo6.close()


def test_default_resolver_fails_reserved_names_without_asking(monkeypatch):
    def no_network(*a, **kw):
        raise AssertionError("getaddrinfo must not be called for .invalid")
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    for name in ("name.invalid", "x.y.INVALID.", "invalid"):
        with pytest.raises(OSError, match="RFC 6761") as e:
            relay_resolver.resolve_name(name)
        assert e.value.errno == errno.EHOSTUNREACH


def test_host_name_text():
    assert relay_resolver.host_name_text(b"echo.test") == "echo.test"
    assert relay_resolver.host_name_text(b"_sip._udp.example.") == "_sip._udp.example."
    for bad in (b"", b"a..b", b".a", b"a b", b"a/b", b"\xffx", b"a" * 64 + b".b",
                b"a." * 127 + b"b"):
        assert relay_resolver.host_name_text(bad) is None, bad


def test_pool_threads_are_bounded(resolver):
    gate = resolver.gate("x0.test")
    for i in range(1, 10):
        resolver.gates[f"x{i}.test"] = gate
    pool = relay_resolver.ResolverPool(resolver)
    try:
        for i in range(10):
            assert pool.submit(i, b"x%d.test" % i) is None
        assert pool.submit(99, b"bad name") == "not a host name"
        N.wait_until(lambda: len(resolver.calls) == relay_resolver.DNS_THREADS, 5, what="threads busy")
        time.sleep(0.1)
        assert len(resolver.calls) == relay_resolver.DNS_THREADS    # the others wait their turn
        gate.set()
        results = []
        N.wait_until(lambda: results.extend(pool.results()) or len(results) == 10, 5,
                     what="all answers")
        assert sorted(tok for tok, _a, _e in results) == list(range(10))
        assert all(err == "Name or service not known" for _t, _a, err in results)
    finally:
        pool.close()


def test_pool_descriptor_wakes_once_per_batch_of_answers(resolver):
    """fileno() turns readable when answers wait and results() clears it, on every
    supported Python (it is a pipe: os.eventfd is 3.10+); both ends close."""
    import select
    resolver.table["a.test"] = ["192.0.2.1"]
    pool = relay_resolver.ResolverPool(resolver)
    fds = (pool.fileno(), pool._wake)
    try:
        assert select.select([pool.fileno()], [], [], 0)[0] == []
        assert pool.results() == []                       # nothing waiting: no error
        for i in range(5):
            assert pool.submit(i, b"a.test") is None
        assert select.select([pool.fileno()], [], [], 5)[0] == [pool.fileno()]
        results = []
        N.wait_until(lambda: results.extend(pool.results()) or len(results) == 5, 5,
                     what="all answers")
        assert sorted(results) == [(i, [(4, socket.inet_aton("192.0.2.1"))], None)
                                   for i in range(5)]
        assert select.select([pool.fileno()], [], [], 0)[0] == []
    finally:
        pool.close()
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)


# ----------------------------------------------------------------------------- services

def test_tunnel_server_localhost_denied_then_allowed(echo):
    """`localhost` through the real resolver: denied by the default ACL, delivered with
    --allow 127.0.0.0/8 (the service as `relay tunnel-server` runs it)."""
    for allow in ([], ["127.0.0.0/8"]):
        r = Running(cfg("tunnel-server", listen=("127.0.0.1", 0), allow=allow))
        try:
            s, _ = raw_client(r, cmd=proto.CMD_UDP_TUN)
            s.sendall(proto.encode_frame("localhost", echo.addr[1], b"by name") +
                      proto.encode_frame("name.invalid", 53, b"nowhere"))
            if allow:
                frames = read_frames(s, 1, mux=False)
                assert [(f.host, f.port, f.data) for f in frames] == [(*echo.addr, b"by name")]
            else:
                wait_stat(r, "drop_denied")
            wait_stat(r, "drop_no_route")
            st = r.stats()
            assert st["up_datagrams"] == (1 if allow else 0)
            assert st["drop_no_route"] == 1 and st["drop_denied"] == (0 if allow else 1)
            s.close()
        finally:
            r.stop()
