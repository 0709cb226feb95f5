"""End to end: UDP -> tunnel-client -> TCP -> tunnel-server -> UDP echo, and back.

Topology tests (namespaces, tests/namespaces.py): client sockets and tunnel-client in cli,
tunnel-server in rtr, echo server in srv. Bad-input tests talk raw TCP to a server on
loopback. Services run in threads of this process (inside their namespace) so their
counters can be read; the restart test runs the server through its command line."""
import socket
import time

import pytest

from tests import namespaces as N
from tests.support import (ALLOW_DOC, ALLOW_SRV_HOST, SECRET, cfg, payload, restart_mid_stream,
                           roundtrip, tunnel_pair, wait_stat)

pytest.importorskip("relay.datapath.tunnel")
pytestmark = pytest.mark.usefixtures("impl")     # every test: compiled, then pure

SIZES = [0, 1, 2, 100, 1350, 1472, 4095, 4096, 4097, 8191, 8192, 8193, 16383, 16384,
         16385, 32768, 65000, 65506, 65507]


# ----------------------------------------------------------------------------- namespaces


@pytest.mark.netns
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_every_size(echo_topo, running, v6):
    server, client, addr = tunnel_pair(echo_topo, running, v6)
    sock = echo_topo.cli.socket(socket.AF_INET6 if v6 else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    for size in SIZES:
        assert roundtrip(sock, addr, payload(size, size)) == payload(size, size)
    s, c = server.stats(), client.stats()
    assert s["conn_accepted"] == 1 and s["assoc_created"] == 1
    assert s["up_datagrams"] >= len(SIZES) and c["down_datagrams"] >= len(SIZES)
    assert s["frames_bad"] == 0 and s["drop_denied"] == 0
    sock.close()


@pytest.mark.netns
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_runs_of_datagrams_leave_the_server_intact(echo_topo, running, v6):
    """A burst of equal-size datagrams leaves the server as GSO runs (relay/datapath/sendq.pxd);
    runs of 3000-byte datagrams exceed the 1500-byte MTU towards the echo server, so the
    kernel refuses them as GSO and they go one by one. Every datagram comes back intact
    and in order, and the counters balance."""
    server, client, addr = tunnel_pair(echo_topo, running, v6)
    sock = echo_topo.cli.socket(socket.AF_INET6 if v6 else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.settimeout(3)
    assert roundtrip(sock, addr, b"warm") == b"warm"
    sent, got = [], []
    # bursts of 8: the runs stay whole while every receive buffer on the way (the echo
    # server's, this socket's) holds a burst even of fragmented 3000-byte datagrams
    for size in (1000, 3000, 1200, 17):
        for burst in range(5):
            ps = [payload(size, burst * 8 + i) for i in range(8)]
            for p in ps:
                sock.sendto(p, addr)
            sent += ps
            try:
                for _ in ps:
                    got.append(sock.recv(70000))
            except socket.timeout:
                pass
    idx = {p: i for i, p in enumerate(sent)}
    assert [idx.get(g) for g in got] == list(range(len(sent)))
    N.wait_until(lambda: server.stats()["up_datagrams"] == len(sent) + 1, 5,
                 what="every datagram counted")
    st = server.stats()
    assert st["up_bytes"] == 4 + sum(map(len, sent))
    assert st["drop_send_error"] == st["drop_too_big"] == st["drop_buffer_full"] == 0
    sock.close()


@pytest.mark.netns
def test_coalesced_datagrams_cross_as_datagrams(echo_topo, running):
    """The tunnel client's listen socket has UDP_GRO: a burst sent as one UDP_SEGMENT
    buffer may arrive coalesced, and must still cross (and come back) as its datagrams."""
    from relay import BatchSocket
    server, client, addr = tunnel_pair(echo_topo, running, False)
    sock = echo_topo.cli.socket(socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.connect(addr)
    sock.settimeout(3)
    assert roundtrip(sock, addr, b"warm") == b"warm"
    payloads = [payload(700, i) for i in range(20)] + [b"end"]
    with BatchSocket(sock.fileno(), batch=64) as b:
        assert b.send_gso(b"".join(payloads), 700) == 21
    got = [sock.recv(70000) for _ in payloads]
    assert got == payloads
    N.wait_until(lambda: client.stats()["up_datagrams"] == 22, 5, what="22 datagrams up")
    assert client.stats()["up_bytes"] == 4 + sum(map(len, payloads))
    sock.close()


@pytest.mark.netns
def test_fifty_flows_one_connection(echo_topo, running):
    server, client, addr = tunnel_pair(echo_topo, running, False)
    socks = [echo_topo.cli.socket(socket.AF_INET) for _ in range(50)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        pending = {}
        for rnd in range(3):
            for i, s in enumerate(socks):
                if i in pending and rnd and pending[i] is True:
                    continue
                s.sendto(b"flow %d" % i, addr)
            deadline = time.monotonic() + 3
            for i, s in enumerate(socks):
                if pending.get(i) is True:
                    continue
                s.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    got = s.recv(100)
                except socket.timeout:
                    continue
                assert got == b"flow %d" % i      # each flow gets its own reply, never another's
                pending[i] = True
            if len([v for v in pending.values() if v is True]) == 50:
                break
        assert len([v for v in pending.values() if v is True]) == 50
        st = server.stats()
        assert st["conn_accepted"] == 1
        assert st["assoc_created"] == 50 and client.stats()["assoc_created"] == 50
    finally:
        for s in socks:
            s.close()


@pytest.mark.netns
def test_connection_pool(echo_topo, running):
    server, client, addr = tunnel_pair(echo_topo, running, False, connections=4)
    socks = [echo_topo.cli.socket(socket.AF_INET) for _ in range(8)]
    try:
        for i, s in enumerate(socks):
            roundtrip(s, addr, b"pool %d" % i)
        assert server.stats()["conn_accepted"] == 4
        assert client.stats()["conn_open"] == 4
    finally:
        for s in socks:
            s.close()


@pytest.mark.netns
@pytest.mark.parametrize("host", ["::", "0.0.0.0"], ids=["dual-stack", "ipv4"])
def test_wildcard_client_replies_from_the_address_asked(echo_topo, running, host):
    """tunnel-client on the wildcard of a router with several addresses (the engine's loop
    with the tunnel as its core, or the pure UdpFrontend), tunnel-server and echo in srv:
    every reply leaves from the address its client asked, also for a client that moves
    between addresses and for runs of replies."""
    topo = echo_topo.add_router_addresses()
    running(cfg("tunnel-server", listen=(N.SRV4, 9000), allow=ALLOW_DOC + ALLOW_SRV_HOST,
                secret=SECRET), topo.srv)
    client = running(cfg("tunnel-client", listen=(host, 5000), server=(N.SRV4, 9000),
                         to=(N.SRV4, 7), secret=SECRET), topo.rtr)
    v6 = host == "::"
    N.check_reply_sources(topo.cli, 5000, N.RTR4_ALL + (N.RTR6_ALL if v6 else ()), timeout=3)
    N.check_moving_client(topo.cli, 5000, N.RTR4_ALL)
    sent = len(N.RTR4_ALL) * 3 + N.check_runs_alternate(topo.cli, 5000, N.RTR4_MORE)
    # 3000-byte runs exceed the 1500-byte MTU as GSO sends: they leave one by one
    sent += N.check_runs_alternate(topo.cli, 5000, N.RTR4_MORE, size=3000, bursts=2)
    if v6:
        N.check_moving_client(topo.cli, 5000, N.RTR6_ALL)
        sent += len(N.RTR6_ALL) * 3 + N.check_runs_alternate(topo.cli, 5000, N.RTR6_MORE)
    N.wait_until(lambda: client.stats()["down_datagrams"] == sent, 5, what="every reply counted")
    st = client.stats()
    assert st["up_datagrams"] == sent
    assert st["drop_no_route"] == st["drop_send_error"] == st["drop_buffer_full"] == 0


@pytest.mark.netns
def test_wildcard_client_local_address_table_is_bounded(echo_topo, running):
    """The client -> local address table of a wildcard tunnel-client holds at most
    max_associations clients (the least recently used goes first) and forgets idle ones;
    a client beyond the cap evicts the core's least recently used flow and is served;
    afterwards a new client is served from the address it asked."""
    topo = echo_topo.add_router_addresses()
    running(cfg("tunnel-server", listen=(N.SRV4, 9000), allow=ALLOW_DOC + ALLOW_SRV_HOST,
                secret=SECRET), topo.srv)
    client = running(cfg("tunnel-client", listen=("::", 5000), server=(N.SRV4, 9000),
                         to=(N.SRV4, 7), secret=SECRET, max_associations=4, timeout=1.0),
                     topo.rtr)
    front = client.svc.engine or client.svc.frontend
    hosts = [N.RTR4_MORE[i % 2] for i in range(4)]
    N.check_reply_sources(topo.cli, 5000, hosts, timeout=3)
    assert front.local_addresses == 4
    extra = topo.cli.socket(socket.AF_INET)        # one more client: the core evicts too
    extra.settimeout(3)
    extra.sendto(b"fifth", (N.RTR4_CLI, 5000))
    assert extra.recv(100) == b"fifth"
    wait_stat(client, "assoc_evicted")
    assert front.local_addresses == 4 and client.svc.upstream.flows_open == 4
    assert client.stats()["drop_table_full"] == 0
    extra.close()
    N.wait_until(lambda: front.local_addresses == 0 and client.svc.upstream.flows_open == 0, 10,
                 what="idle clients forgotten")
    N.check_reply_sources(topo.cli, 5000, N.RTR6_MORE + N.RTR4_MORE[1:], timeout=3)
    assert front.local_addresses == 3


@pytest.mark.netns
def test_wrong_secret_refused(echo_topo, running):
    server, client, addr = tunnel_pair(echo_topo, running, False, secret="not-it")
    sock = echo_topo.cli.socket(socket.AF_INET)
    sock.sendto(b"let me in", addr)
    wait_stat(server, "conn_rejected")
    sock.settimeout(0.5)
    with pytest.raises(socket.timeout):
        sock.recv(100)
    assert server.stats()["up_datagrams"] == 0
    assert client.stats()["conn_open"] == 0
    sock.close()


@pytest.mark.netns
def test_acl_default_and_explicit(echo_topo, running):
    # default: documentation ranges are denied
    server = running(cfg("tunnel-server", listen=(N.RTR4_CLI, 9000), secret=SECRET), echo_topo.rtr)
    client = running(cfg("tunnel-client", listen=("127.0.0.1", 5000), server=(N.RTR4_CLI, 9000),
                         to=(N.SRV4, 7), secret=SECRET), echo_topo.cli)
    sock = echo_topo.cli.socket(socket.AF_INET)
    sock.sendto(b"denied", ("127.0.0.1", 5000))
    wait_stat(server, "drop_denied")
    assert server.stats()["up_datagrams"] == 0
    # allow the /24 but deny one host in it
    server2 = running(cfg("tunnel-server", listen=(N.RTR4_CLI, 9001), secret=SECRET,
                          allow=ALLOW_DOC, deny=[f"{N.SRV4_B}/32"]), echo_topo.rtr)
    ok = running(cfg("tunnel-client", listen=("127.0.0.1", 5001), server=(N.RTR4_CLI, 9001),
                     to=(N.SRV4, 7), secret=SECRET), echo_topo.cli)
    no = running(cfg("tunnel-client", listen=("127.0.0.1", 5002), server=(N.RTR4_CLI, 9001),
                     to=(N.SRV4_B, 7), secret=SECRET), echo_topo.cli)
    roundtrip(sock, ("127.0.0.1", 5001), b"allowed")
    sock.sendto(b"denied host", ("127.0.0.1", 5002))
    wait_stat(server2, "drop_denied")
    assert server2.stats()["up_datagrams"] == 1
    sock.close()


@pytest.mark.netns
def test_server_restart_mid_stream(echo_topo, running):
    """The server process dies and comes back: the client reconnects, traffic resumes."""
    st = restart_mid_stream(echo_topo, running, ["--secret", SECRET], secret=SECRET)
    assert st["conn_reconnects"] >= 1
