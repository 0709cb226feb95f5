"""`relay socks5`: PySocks UDP and CONNECT through it (namespaces), bad input, fragments,
access list, association lifetime, and Socks5Upstream (the engine's socks5:// core)."""
import socket

import pytest

from relay import proto
from tests import namespaces as N
from tests.support import ALLOW_DOC, raw_associate
from tests.support_socks5 import socks5
from tests.support_socks5 import started  # noqa: F401 (fixtures)

_tunnel = pytest.importorskip("relay.datapath.tunnel")
pytestmark = pytest.mark.usefixtures("impl")     # every test: compiled, then pure


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
