"""`relay socks5`: PySocks UDP and CONNECT through it (namespaces), bad input, fragments,
access list, association lifetime, and Socks5Upstream (the engine's socks5:// core)."""
import socket
import struct
import threading
import time

import pytest

from relay import _select

from relay import proto, resolver
from relay.datapath import pure
from tests import netns as N
from tests.support import ALLOW_DOC, Echo, Running, cfg, raw_associate, wait_stat

socks = pytest.importorskip("socks")
_tunnel = pytest.importorskip("relay.datapath.tunnel")
pytestmark = pytest.mark.usefixtures("impl")     # every test: compiled, then pure

# impl: every test runs against the C cores and the pure-Python fallback (autouse)


@pytest.fixture
def started():
    items = []
    yield items
    for r in reversed(items):
        r.stop()


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.close()


def socks5(started, ns=None, **kw):
    kw.setdefault("listen", ("127.0.0.1", 0))
    r = Running(cfg("socks5", **kw), ns)
    started.append(r)
    return r


@pytest.mark.netns
def test_pysocks_udp_through_namespaces(topo, started):
    # PySocks' UDP support is IPv4 only (its bind() unpacks a 2-tuple); IPv6 is covered
    # by test_udp_associate_ipv6 below with our own client.
    N.start_echo(topo.srv, f"{N.SRV4}:7")
    listen = (N.RTR4_CLI, 1080)
    server = socks5(started, topo.rtr, listen=listen, user="alice", password="pw",
                    allow=ALLOW_DOC)
    fam = socket.AF_INET
    dst = (N.SRV4, 7)
    with topo.cli.enter():
        s = socks.socksocket(fam, socket.SOCK_DGRAM)
        s.set_proxy(socks.SOCKS5, listen[0], listen[1], username="alice", password="pw")
        s.settimeout(3)
        try:
            for size in (0, 1, 1400, 9000, 65000):
                data = bytes([size & 0xFF]) * size
                s.sendto(data, dst)
                got, src = s.recvfrom(70000)
                assert got == data and src[:2] == dst
        finally:
            s.close()
    st = server.stats()
    assert st["up_datagrams"] == 5 and st["down_datagrams"] == 5
    wait_stat(server, "conn_open", 0)
    N.wait_until(lambda: server.svc.relay.associations == 0, 5, what="association closed")


@pytest.mark.netns
def test_pysocks_connect(topo, started):
    listen = (N.RTR4_CLI, 1080)
    server = socks5(started, topo.rtr, listen=listen, user="u", password="p", allow=ALLOW_DOC)
    srv = topo.srv.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind((N.SRV4, 8080))
    srv.listen()

    def serve():
        c, _ = srv.accept()
        data = b""
        while len(data) < 300000:
            chunk = c.recv(65536)
            if not chunk:
                break
            data += chunk
        c.sendall(data[::-1])
        c.close()
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    with topo.cli.enter():
        c = socks.socksocket()
        c.set_proxy(socks.SOCKS5, *listen, username="u", password="p")
        c.settimeout(5)
        c.connect((N.SRV4, 8080))
    big = bytes(range(256)) * 1200          # more than the relay's buffer limit per side
    c.sendall(big[:300000])
    back = b""
    while len(back) < 300000:
        chunk = c.recv(65536)
        if not chunk:
            break
        back += chunk
    assert back == big[:300000][::-1]
    c.close()
    t.join(5)
    srv.close()
    assert server.stats()["conn_accepted"] == 1


@pytest.mark.netns
def test_udp_associate_ipv6(topo, started):
    N.start_echo(topo.srv, f"[{N.SRV6}]:7")
    server = socks5(started, topo.rtr, listen=(N.RTR6_CLI, 1080), user="u", password="p",
                    allow=ALLOW_DOC)
    with topo.cli.enter():
        ctl, u, relay = raw_associate(server, "u", "p", socket.AF_INET6)
    try:
        for size in (0, 1, 1400, 65000):
            data = b"6" * size
            u.sendto(proto.udp_header(N.SRV6, 7) + data, relay)
            got, src = u.recvfrom(70000)
            frag, _atyp, host, port, hl = proto.parse_udp_header(got)
            assert (frag, host, port, got[hl:]) == (0, N.SRV6, 7, data)
            assert src[:2] == relay
    finally:
        ctl.close()
        u.close()
    assert server.stats()["up_datagrams"] == 4


@pytest.mark.netns
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_udp_relay_replies_from_the_address_the_client_reached(topo, started, family):
    """A dual-stack `[::]` listener on a router with several addresses: the relay socket of
    an association is bound to the wildcard, and replies to the client (single datagrams,
    and a burst whose echoes leave the relay as runs) come from the address the client's
    control connection reached, which the server also gives as the relay address."""
    from relay import BatchSocket
    topo.add_router_addresses()
    N.start_echo(topo.srv, f"{N.SRV4}:7", f"[{N.SRV6}]:7")
    server = socks5(started, topo.rtr, listen=("::", 1080), user="u", password="p",
                    allow=ALLOW_DOC)
    v4 = family == socket.AF_INET
    dst = (N.SRV4, 7) if v4 else (N.SRV6, 7)
    hdr = proto.udp_header(*dst)
    sent = 0
    for at in N.RTR4_ALL if v4 else N.RTR6_ALL:
        with topo.cli.enter():
            ctl, u, relay = raw_associate(server, "u", "p", family, at=(at, 1080))
        try:
            assert relay[0] == at
            u.connect(relay)            # drops datagrams from any other source
            u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            u.settimeout(3)
            for data in [b"", b"x" * 100, b"y" * 1400]:
                u.send(hdr + data)
                got = u.recv(70000)
                assert (got[:len(hdr)], got[len(hdr):]) == (hdr, data), at
            sent += 3
            # runs; 3000-byte ones exceed the 1500-byte MTU as GSO sends and go one by one
            for size in (900, 3000):
                burst = [bytes([k]) * size for k in range(12)]
                with BatchSocket(u.fileno(), batch=64) as b:
                    assert b.send([hdr + p for p in burst]) == len(burst)
                assert [u.recv(70000)[len(hdr):] for _ in burst] == burst, (at, size)
                sent += len(burst)
        finally:
            ctl.close()
            u.close()
    N.wait_until(lambda: server.stats()["down_datagrams"] == sent, 5, what="replies counted")
    st = server.stats()
    assert st["up_datagrams"] == sent
    assert st["drop_no_route"] == st["drop_send_error"] == st["drop_buffer_full"] == 0


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
