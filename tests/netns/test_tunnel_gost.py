"""The tunnel client in gost mode (CMD 0xF3, one TCP connection per flow, no flow ids).

Namespaces: `tunnel-client --gost` in cli, `tunnel-server` (which accepts 0xF3) in rtr,
echo in srv, IPv4 and IPv6. Loopback: the core against a small scripted gost-like server
that checks the handshake bytes (RFC 1929, CMD 0xF3) and the frames exactly. Every test
runs against the C core and the pure-Python fallback."""
import socket

import pytest

from tests import namespaces as N
from tests.support import (ALLOW_DOC as ALLOW, cfg, payload, restart_mid_stream, roundtrip,
                           tunnel_pair, wait_stat)

_tunnel = pytest.importorskip("relay.datapath.tunnel")
pytestmark = pytest.mark.usefixtures("impl")     # every test: compiled, then pure


# ----------------------------------------------------------------------------- namespaces

@pytest.mark.netns
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_gost_sizes_and_empty_datagram(echo_topo, running, v6):
    server, client, addr = tunnel_pair(echo_topo, running, v6, gost=True)
    sock = echo_topo.cli.socket(socket.AF_INET6 if v6 else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    try:
        sizes = (1, 1472, 65507)
        for size in sizes:
            assert roundtrip(sock, addr, payload(size, size)) == payload(size, size)
        # gost reads RSV = 0 as "length unknown": an empty datagram is dropped and counted
        sock.sendto(b"", addr)
        wait_stat(client, "drop_malformed")
        assert roundtrip(sock, addr, b"after the empty one") == b"after the empty one"
        s, c = server.stats(), client.stats()
        assert c["drop_malformed"] == 1
        assert s["up_datagrams"] == len(sizes) + 1 == c["up_datagrams"]
        assert s["conn_accepted"] == 1 and s["assoc_created"] == 1 and s["frames_bad"] == 0
        assert c["conn_open"] == 1 and c["down_datagrams"] == len(sizes) + 1
    finally:
        sock.close()


@pytest.mark.netns
def test_server_with_password_serves_gost_and_relay_clients(echo_topo, running):
    """tunnel-server with --secret and --user/--password on a routed address: a gost
    client logs in with the password (RFC 1929), a relay client proves the secret; both
    are served on the same port. A wrong password carries nothing and is counted."""
    srv_listen = (N.RTR4_CLI, 9000)
    server = running(cfg("tunnel-server", listen=srv_listen, allow=ALLOW, secret="s3cret",
                         user="gost-user", password="pass word"), echo_topo.rtr)
    gost = running(cfg("tunnel-client", listen=("127.0.0.1", 5000), server=srv_listen,
                       to=(N.SRV4, 7), gost=True, user="gost-user", password="pass word"),
                   echo_topo.cli)
    mux = running(cfg("tunnel-client", listen=("127.0.0.1", 5001), server=srv_listen,
                      to=(N.SRV4, 7), secret="s3cret"), echo_topo.cli)
    bad = running(cfg("tunnel-client", listen=("127.0.0.1", 5002), server=srv_listen,
                      to=(N.SRV4, 7), gost=True, user="gost-user", password="wrong"),
                  echo_topo.cli)
    sock = echo_topo.cli.socket(socket.AF_INET)
    try:
        assert roundtrip(sock, ("127.0.0.1", 5000), b"via gost") == b"via gost"
        assert roundtrip(sock, ("127.0.0.1", 5001), b"via relay") == b"via relay"
        sock.sendto(b"never", ("127.0.0.1", 5002))
        wait_stat(bad, "conn_rejected")
        sock.settimeout(0.5)
        with pytest.raises(socket.timeout):
            sock.recv(100)
        st = server.stats()
        assert st["up_datagrams"] == 2 and st["conn_rejected"] >= 1
        assert gost.stats()["down_datagrams"] == 1 == mux.stats()["down_datagrams"]
    finally:
        sock.close()


@pytest.mark.netns
def test_gost_flows_each_own_connection_and_idle_out(echo_topo, running):
    server, client, addr = tunnel_pair(echo_topo, running, False, gost=True, timeout=1.0)
    socks = [echo_topo.cli.socket(socket.AF_INET) for _ in range(6)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        # all flows at once, then each must get its own reply and nobody else's
        for i, s in enumerate(socks):
            s.sendto(b"flow %d" % i, addr)
        for i, s in enumerate(socks):
            s.settimeout(3)
            assert s.recv(100) == b"flow %d" % i
        assert server.svc.core.connections == len(socks)
        st = server.stats()
        assert st["conn_accepted"] == len(socks) and st["assoc_created"] == len(socks)
        assert client.stats()["conn_open"] == len(socks)
        # idle out: the client closes each flow's connection, the server sees them go
        wait_stat(client, "assoc_expired", len(socks), timeout=6)
        N.wait_until(lambda: server.svc.core.connections == 0, 5, what="server connections closed")
        c = client.stats()
        assert c["conn_open"] == 0 and c["assoc_open"] == 0
        assert roundtrip(socks[0], addr, b"new flow") == b"new flow"
        assert server.stats()["conn_accepted"] == len(socks) + 1
    finally:
        for s in socks:
            s.close()


@pytest.mark.netns
def test_gost_server_restart_mid_stream(echo_topo, running):
    """The server process dies and comes back: the flow's connection is re-established
    with backoff and traffic continues."""
    st = restart_mid_stream(echo_topo, running, ["--insecure"], gost=True)
    assert st["conn_reconnects"] >= 1 and st["assoc_created"] == 1
