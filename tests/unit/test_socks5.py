"""`relay socks5`: PySocks UDP and CONNECT through it (namespaces), bad input, fragments,
access list, association lifetime, and Socks5Upstream (the engine's socks5:// core)."""
import socket
import struct
import time

import pytest

from relay import _select

from relay import proto
from tests import namespaces as N
from tests.support import Echo, cfg, raw_associate, wait_stat
from tests.support_socks5 import socks5
from tests.support_socks5 import started  # noqa: F401 (fixtures)

_tunnel = pytest.importorskip("relay.datapath.tunnel")
pytestmark = pytest.mark.usefixtures("impl")     # every test: compiled, then pure


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.close()


def test_fragments_refused_and_acl(started, echo):
    server = socks5(started, allow=["127.0.0.0/8"], deny=[f"{echo.addr[0]}/32"])
    ctl, u, relay = raw_associate(server)
    # denied destination
    u.sendto(proto.udp_header(*echo.addr) + b"denied", relay)
    wait_stat(server, "drop_denied")
    server2 = socks5(started, allow=["127.0.0.0/8"])
    ctl2, u2, relay2 = raw_associate(server2)
    u2.sendto(struct.pack("!HB", 0, 1) + proto.encode_addr(*echo.addr) + b"frag", relay2)
    wait_stat(server2, "frames_bad")
    u2.sendto(b"\x00\x00\x00\x09junk", relay2)
    wait_stat(server2, "drop_malformed")
    u2.sendto(proto.udp_header(*echo.addr) + b"fine", relay2)
    got, _ = u2.recvfrom(1000)
    frag, _atyp, host, port, hl = proto.parse_udp_header(got)
    assert (frag, host, port, got[hl:]) == (0, echo.addr[0], echo.addr[1], b"fine")
    assert server2.stats()["up_datagrams"] == 1
    for s in (ctl, u, ctl2, u2):
        s.close()


def test_association_ends_with_control_connection(started, echo):
    server = socks5(started, allow=["127.0.0.0/8"])
    ctl, u, relay = raw_associate(server)
    u.sendto(proto.udp_header(*echo.addr) + b"x", relay)
    u.recvfrom(100)
    assert server.svc.relay.associations == 1
    ctl.close()
    N.wait_until(lambda: server.svc.relay.associations == 0, 5, what="association closed")
    u.sendto(proto.udp_header(*echo.addr) + b"after", relay)
    u.settimeout(0.3)
    with pytest.raises(socket.timeout):
        u.recvfrom(100)
    u.close()


def test_auth_and_bad_handshakes(started):
    server = socks5(started, user="u", password="right")
    with pytest.raises(proto.HandshakeError):
        raw_associate(server, "u", "wrong")
    with pytest.raises(proto.HandshakeError):
        raw_associate(server)                       # no-auth offered, user/pass required
    s = socket.create_connection(server.address, timeout=3)
    s.sendall(b"\x05\x01\x02\x01\x01u\x05right\x05\x09\x00\x01" + bytes(6))   # bad command
    s.settimeout(3)
    data = b""
    while True:
        chunk = s.recv(100)
        if not chunk:
            break
        data += chunk
    assert data[:2] == b"\x05\x02" and data[4:6] == b"\x05\x07"
    s.close()
    wait_stat(server, "conn_rejected", 3)
    ctl, u, relay = raw_associate(server, "u", "right")      # still serving
    ctl.close()
    u.close()


def test_socks5_upstream_against_relay_socks5(started, echo, impl):
    server = socks5(started, user="u", password="p", allow=["127.0.0.0/8"])
    core = _select.module("tunnel")
    up = core.Socks5Upstream(server.address, user="u", password="p")
    got = []
    up.collect_replies(got)
    try:
        clients = [("192.0.2.%d" % i, 1000 + i) for i in range(1, 6)]
        for c in clients:
            up.send(c, echo.addr, b"from %s" % c[0].encode())
        up.flush()
        deadline = time.monotonic() + 5
        while len(got) < len(clients) and time.monotonic() < deadline:
            up.process()
            up.tick()
            time.sleep(0.005)
        assert sorted(got) == sorted((c, echo.addr, b"from %s" % c[0].encode()) for c in clients)
        assert up.flows_open == len(clients)
        # more datagrams on the now established associations
        for c in clients:
            up.send(c, echo.addr, b"again")
        up.flush()
        deadline = time.monotonic() + 5
        while len(got) < 2 * len(clients) and time.monotonic() < deadline:
            up.process()
            time.sleep(0.005)
        assert len(got) == 2 * len(clients)
        assert server.svc.relay.associations == len(clients)
    finally:
        up.close()
    N.wait_until(lambda: server.svc.relay.associations == 0, 5, what="associations closed")


def test_socks5_refuses_open_proxy():
    from relay.services import socks5_server as mod
    with pytest.raises(ValueError, match="user"):
        mod.check_exposure(cfg("socks5", listen=("192.0.2.1", 1080)))


def _connections_to(port):
    import psutil
    return [c for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr[1] == port]


def _core(server, **kw):
    """A Socks5Upstream of this test's implementation, its counters (name -> value)."""
    from relay.stats import COUNTERS, INDEX
    mem = memoryview(bytearray(8 * len(INDEX))).cast("Q")
    up = _select.module("tunnel").Socks5Upstream(server.address, stats=mem, **kw)
    return up, lambda: dict(zip(COUNTERS, mem))


def _pump(up, done, seconds=10):
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        up.process()
        up.tick()
        time.sleep(0.002)


def test_socks5_upstream_sets_up_a_burst_of_flows_a_few_at_a_time(started, echo, impl):
    """30 new flows at once: two handshakes at a time towards the server (relay socks5
    refuses more than 16 of one address), the others wait without sockets; every flow gets
    its association and its datagram through, nothing refused."""
    server = socks5(started, allow=["127.0.0.0/8"])
    up, counters = _core(server, handshakes=2)
    got = []
    up.collect_replies(got)
    clients = [("192.0.2.%d" % i, 2000 + i) for i in range(1, 31)]
    try:
        for c in clients:
            up.send(c, echo.addr, b"burst %s" % c[0].encode())
        assert len(_connections_to(server.address[1])) == 2    # the rest wait their turn
        assert up.flows_open == 30
        _pump(up, lambda: len(got) == len(clients))
        assert sorted(got) == sorted((c, echo.addr, b"burst %s" % c[0].encode())
                                     for c in clients)
        st = counters()
        assert st["assoc_created"] == 30 and st["assoc_refused"] == 0
        assert st["queue_drops"] == 0 and st["conn_open"] == 30
        assert server.svc.relay.associations == 30
    finally:
        up.close()


def test_socks5_upstream_bounds_what_waiting_flows_queue(started, echo, impl):
    """The queues of flows not yet up hold at most queued_max bytes together: a burst of
    new flows' datagrams beyond it is dropped and counted, the rest delivered."""
    server = socks5(started, allow=["127.0.0.0/8"])
    up, counters = _core(server, handshakes=1, queued_max=6000)
    got = []
    up.collect_replies(got)
    clients = [("192.0.2.%d" % i, 3000 + i) for i in range(1, 21)]
    try:
        for c in clients:
            up.send(c, echo.addr, bytes(1000))
        st = counters()
        dropped = st["queue_drops"]
        assert 0 < dropped < len(clients)
        _pump(up, lambda: counters()["conn_open"] == len(clients)      # every flow up in turn
              and len(got) == len(clients) - dropped)
        assert len(got) == len(clients) - dropped and all(g[2] == bytes(1000) for g in got)
        assert counters()["assoc_refused"] == 0
        # once up, a flow's datagrams go straight on: no queue, nothing dropped
        for c in clients:
            up.send(c, echo.addr, b"later")
        up.flush()
        _pump(up, lambda: len(got) == 2 * len(clients) - dropped)
        assert sum(g[2] == b"later" for g in got) == len(clients)
        assert counters()["queue_drops"] == dropped
    finally:
        up.close()


def test_socks5_upstream_waiting_flows_survive_evictions_around_the_ring(started, echo, impl):
    """A cap of 4 flows and one handshake at a time: after three flows came up one after
    the other (the waiting ring's head has moved on), a burst of six new clients evicts the
    oldest each time, waiting ones too, so the ring fills with ended entries and is
    compacted across its end; the four flows left all start in turn and get through."""
    server = socks5(started, allow=["127.0.0.0/8"])
    up, counters = _core(server, handshakes=1, max_flows=4)
    got = []
    up.collect_replies(got)
    first = [("192.0.2.%d" % i, 4000 + i) for i in range(1, 4)]
    burst = [("192.0.2.%d" % i, 4000 + i) for i in range(4, 10)]
    try:
        for c in first:
            up.send(c, echo.addr, b"first")
        _pump(up, lambda: len(got) == 3)
        assert sorted(g[0] for g in got) == sorted(first)
        for c in burst:
            up.send(c, echo.addr, b"burst %s" % c[0].encode())
        assert up.flows_open == 4
        _pump(up, lambda: len(got) == 3 + 4)
        assert sorted(got[3:]) == sorted((c, echo.addr, b"burst %s" % c[0].encode())
                                         for c in burst[2:])
        st = counters()
        assert st["assoc_evicted"] == 5 and st["assoc_refused"] == 0
        assert st["conn_open"] == 4
    finally:
        up.close()
