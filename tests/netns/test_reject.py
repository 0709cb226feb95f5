"""`relay redir --reject PORTS`: a datagram to a rejected original destination port is not
relayed; the client gets an ICMP / ICMPv6 port unreachable from that destination, so its
connected socket fails at once (ECONNREFUSED). End to end through the TPROXY'd router
(cli -- rtr -- srv), both families, both reply modes, with and without an upstream; the
rate limit checked with counters. The configuration and command line parts need no root."""
import socket
import struct
import time

import pytest

from tests.namespaces import SRV4, SRV6, start_echo
from tests.relayproc import RelayProcess, udp_roundtrip
from tests.support import redir_rules, upstream_in_srv
from tests.support_reject import PORT

FAMILIES = {4: (socket.AF_INET, SRV4), 6: (socket.AF_INET6, SRV6)}
BURST, RATE = 50, 1000          # relay/datapath/reject.pxi


@pytest.fixture
def router(topo):
    r = redir_rules(topo, "apply", PORT)
    assert r.returncode == 0, r.stderr
    # something answers on the rejected ports: relayed, a datagram there would be echoed
    start_echo(topo.srv, f"{SRV4}:443", f"[{SRV6}]:443", f"{SRV4}:5007", f"[{SRV6}]:5007")
    return topo


def start_redir(topo, reply, *extra):
    return RelayProcess(["redir", "--listen", f"[::]:{PORT}", "--reply", reply,
                         "--reject", "443,8443", "--reject", "5001-5010", *extra],
                        ns=topo.rtr).wait_ready()


def refused(topo, family, dst, data=b"quic initial"):
    """Send from a connected socket in cli; True when its next recv() fails ECONNREFUSED
    (a reply would make it False; nothing at all raises socket.timeout)."""
    c = topo.cli.socket(family)
    with c:
        c.settimeout(3)
        c.connect(dst)
        c.send(data)
        try:
            c.recv(100)
        except ConnectionRefusedError:
            return True
        return False


@pytest.mark.parametrize("reply", ["raw", "transparent"])
@pytest.mark.parametrize("fam", [4, 6])
def test_rejected_port_refuses_a_connected_socket_and_others_are_relayed(router, fam, reply):
    """fam 4 goes through the dual-stack [::] listener (IPv4-mapped clients)."""
    topo = router
    family, srv = FAMILIES[fam]
    start_echo(topo.srv, f"{SRV4}:5000", f"[{SRV6}]:5000")
    with start_redir(topo, reply) as relay:
        assert refused(topo, family, (srv, 443))
        assert refused(topo, family, (srv, 5007), bytes(3000))     # a range; quoted in part
        c = topo.cli.socket(family)
        assert udp_roundtrip(c, (srv, 5000), b"not rejected") == (b"not rejected", (srv, 5000))
        st = relay.settled_stats(lambda s: s["rejected"] == 2 and s["down_datagrams"] == 1)
        assert st["up_datagrams"] == 1 and st["assoc_created"] == 1    # no flow for a reject
        assert st["reject_ratelimited"] == 0
        assert {k: v for k, v in st.items() if k.startswith("drop_") and v} == {}


@pytest.mark.parametrize("upstream", ["socks5", "tunnel"])
def test_rejected_before_any_upstream(router, upstream):
    topo = router
    extra = upstream_in_srv(topo, upstream)
    with start_redir(topo, "raw", *extra) as relay:
        for family, srv in FAMILIES.values():
            assert refused(topo, family, (srv, 443))
            c = topo.cli.socket(family)
            assert udp_roundtrip(c, (srv, 5000), b"up", timeout=3) == (b"up", (srv, 5000))
        st = relay.settled_stats(lambda s: s["rejected"] == 2 and s["down_datagrams"] == 2)
        assert st["reject_ratelimited"] == 0


def _errors_seen(sock, family, srv, sport):
    """Port unreachable errors from srv quoting a datagram from sport to 443, read from a
    raw ICMP / ICMPv6 socket of the client namespace until none comes for a second."""
    n = 0
    sock.settimeout(1.0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            data, src = sock.recvfrom(2048)
        except socket.timeout:
            break
        if src[0] != srv:
            continue
        if family == socket.AF_INET:
            data = data[(data[0] & 15) * 4:]          # raw IPv4 sockets include the header
            code, inner = (3, 3), data[8:]
            ihl = (inner[0] & 15) * 4
        else:
            code, inner, ihl = (1, 4), data[8:], 40
        if tuple(data[:2]) == code and struct.unpack("!HH", inner[ihl:ihl + 4]) == (sport, 443):
            n += 1
    return n


@pytest.mark.parametrize("fam", [4, 6])
def test_errors_are_rate_limited_and_the_rest_counted(router, fam):
    topo = router
    family, srv = FAMILIES[fam]
    proto = socket.IPPROTO_ICMP if fam == 4 else socket.IPPROTO_ICMPV6
    with start_redir(topo, "raw") as relay:
        watch = topo.cli.socket(family, socket.SOCK_RAW, proto)
        c = topo.cli.socket(family)
        c.bind(("0.0.0.0" if fam == 4 else "::", 0))
        sport = c.getsockname()[1]
        start = time.monotonic()
        for i in range(200):
            c.sendto(b"%d" % i, (srv, 443))
        st = relay.settled_stats(lambda s: s["rejected"] == 200)
        elapsed = time.monotonic() - start
        sent = 200 - st["reject_ratelimited"]
        assert 1 <= sent <= BURST + RATE * elapsed + 1
        assert _errors_seen(watch, family, srv, sport) == sent
        assert st["assoc_created"] == 0 and st["up_datagrams"] == 0
        watch.close()
        c.close()
