"""`relay socks5`: PySocks UDP and CONNECT through it (namespaces), bad input, fragments,
access list, association lifetime, and Socks5Upstream (the engine's socks5:// core)."""
import socket
import threading

import pytest

from tests import namespaces as N
from tests.support import ALLOW_DOC, wait_stat
from tests.support_socks5 import socks5
from tests.support_socks5 import started  # noqa: F401 (fixtures)

socks = pytest.importorskip("socks")
_tunnel = pytest.importorskip("relay.datapath.tunnel")
pytestmark = pytest.mark.usefixtures("impl")     # every test: compiled, then pure


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
