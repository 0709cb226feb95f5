"""relay.net.sockopt: wildcard listeners report each datagram's local address (IP_PKTINFO,
IPV6_RECVPKTINFO) and replies can leave from it; listeners on one address and TPROXY
listeners do not. Loopback only (127.0.0.0/8 has many addresses); the router tests with
several addresses per family are in test_forward, test_tunnel, test_socks5, test_upstream."""
import ipaddress
import socket
import struct

import pytest

from relay.net import sockopt


def _listen(host, **kw):
    s = sockopt.udp_listen((host, 0), reuseport=False, **kw)
    s.setblocking(True)
    s.settimeout(2)
    return s


@pytest.mark.parametrize("host,on", [("0.0.0.0", True), ("::", True), ("127.0.0.1", False),
                                     ("::1", False)])
def test_packet_info_only_on_wildcard_listeners(host, on):
    with _listen(host) as s:
        assert sockopt.pktinfo_enabled(s) is on
        engine = pytest.importorskip("relay.datapath.engine")
        e = engine.Engine(s.fileno(), "forward", to=("127.0.0.1", 9), listen_family=s.family)
        try:
            assert e.pktinfo is on
        finally:
            e.close()


def test_tproxy_listener_has_no_packet_info():
    try:
        s = _listen("::", transparent=True)
    except PermissionError:
        pytest.skip("IP_TRANSPARENT needs CAP_NET_ADMIN")
    with s:
        assert not sockopt.pktinfo_enabled(s)


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_reply_leaves_from_the_address_asked(host):
    """A client asks 127.0.0.5 (the route back to it would answer from 127.0.0.1): the
    wildcard socket learns 127.0.0.5 from the packet info, on a dual-stack socket too, and
    a reply with src_cmsg of it reaches a client connected to 127.0.0.5."""
    with _listen(host) as s:
        port = s.getsockname()[1]
        for asked in ("127.0.0.5", "127.0.0.1"):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as c:
                c.settimeout(2)
                c.connect((asked, port))
                c.send(b"q")
                data, anc, _flags, peer = s.recvmsg(100, sockopt.PKTINFO_ANCBUF)
                assert sockopt.local_of(anc) == asked
                s.sendmsg([b"r"], sockopt.src_cmsg(sockopt.local_of(anc)), 0, peer)
                assert c.recv(100) == b"r"
        if host == "::":
            with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as c:
                c.connect(("::1", port))
                c.send(b"q6")
                _data, anc, _flags, peer = s.recvmsg(100, sockopt.PKTINFO_ANCBUF)
                assert sockopt.local_of(anc) == "::1"


def _in6(addr):
    return (socket.IPPROTO_IPV6, sockopt.IPV6_PKTINFO,
            ipaddress.IPv6Address(addr).packed + struct.pack("=I", 2))


def _in4(spec_dst, dst):
    return (socket.IPPROTO_IP, sockopt.IP_PKTINFO,
            struct.pack("=i4s4s", 2, socket.inet_aton(spec_dst), socket.inet_aton(dst)))


def test_local_of_rules():
    # IP_PKTINFO's ipi_spec_dst (a unicast address even for a broadcast) wins, in any order
    assert sockopt.local_of([_in6("::ffff:192.0.2.255"), _in4("192.0.2.1", "192.0.2.255")]) \
        == "192.0.2.1"
    assert sockopt.local_of([_in4("192.0.2.1", "192.0.2.255"), _in6("::ffff:192.0.2.255")]) \
        == "192.0.2.1"
    assert sockopt.local_of([_in6("::ffff:192.0.2.10")]) == "192.0.2.10"
    assert sockopt.local_of([_in6("2001:db8::10")]) == "2001:db8::10"
    assert sockopt.local_of([_in6("ff02::fb")]) is None         # multicast: kernel's choice
    assert sockopt.local_of([]) is None
    assert sockopt.local_of([(socket.SOL_SOCKET, 29, b"\0" * 16)]) is None


def test_src_cmsg():
    v4 = [(socket.IPPROTO_IP, sockopt.IP_PKTINFO, bytes(4) + bytes([192, 0, 2, 10]) + bytes(4))]
    assert sockopt.src_cmsg("192.0.2.10") == v4
    assert sockopt.src_cmsg("::ffff:192.0.2.10") == v4
    assert sockopt.src_cmsg("2001:db8::10") == [
        (socket.IPPROTO_IPV6, sockopt.IPV6_PKTINFO,
         ipaddress.IPv6Address("2001:db8::10").packed + bytes(4))]
    assert [sockopt.is_wildcard(h) for h in ("0.0.0.0", "::", "::0", "127.0.0.1", "x")] == \
        [True, True, True, False, False]
