"""The access list of tunnel-server and socks5: the special-purpose ranges denied by default
(NAT64 among them), the host's own addresses denied unless allowed, kept current while the
services run (relay.net.ifaddr), for tunnel frames, SOCKS5 UDP and SOCKS5 CONNECT; the
reference AccessList, the C Acl and its pure twin agree."""
import select
import socket
import time

import pytest

from relay import proto
from relay.net import ifaddr
from tests import namespaces as N
from tests.support import ALLOW_DOC, SECRET, cfg, raw_associate, roundtrip, wait_stat

_tunnel = pytest.importorskip("relay.datapath.tunnel")
pytestmark = pytest.mark.usefixtures("impl")      # compiled cores, then the pure twins


@pytest.mark.netns
def test_address_watch_sees_addresses_come_and_go(topo):
    with topo.rtr.enter():
        w = ifaddr.AddressWatch()
    try:
        for h in (N.RTR4_CLI, N.RTR4_SRV, N.RTR6_CLI, N.RTR6_SRV, "127.0.0.1", "::1"):
            assert ifaddr.key(h) in w.addresses, h
        assert ifaddr.key(N.SRV4) not in w.addresses
        assert not w.update()                               # nothing to read yet
        for verb, expect in (("add", True), ("del", False)):
            topo.rtr.run("ip", "addr", verb, "203.0.113.77/32", "dev", "rtr1")
            topo.rtr.run("ip", "-6", "addr", verb, "2001:db8:77::1/128", "dev", "rtr1", "nodad")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                select.select([w], [], [], 0.5)
                w.update()
                if (ifaddr.key("203.0.113.77") in w.addresses) == expect and \
                        (ifaddr.key("2001:db8:77::1") in w.addresses) == expect:
                    break
            assert (ifaddr.key("203.0.113.77") in w.addresses) == expect
            assert (ifaddr.key("2001:db8:77::1") in w.addresses) == expect
    finally:
        w.close()


# ----------------------------------------------------------------------------- services
# rtr's own addresses on its srv side (rtr1: 198.51.100.1, 2001:db8:2::1) are in the
# documentation ranges the servers --allow: only the host-address rule denies them.

ADDED = {False: "198.51.100.77", True: "2001:db8:2::77"}   # on rtr1's subnets, nobody's yet


def own(v6):
    return N.RTR6_SRV if v6 else N.RTR4_SRV


def tunnel_to(topo, running, n, dst, port, **server_kw):
    """tunnel-server n on rtr (allowing the documentation ranges unless server_kw says),
    a tunnel-client in cli whose every datagram goes to dst:port; returns (server, a
    socket in cli, the client's address)."""
    listen = (N.RTR4_CLI, 9000 + n)
    server_kw.setdefault("allow", ALLOW_DOC)
    server = running(cfg("tunnel-server", listen=listen, secret=SECRET, **server_kw), topo.rtr)
    at = ("127.0.0.1", 5000 + n)
    running(cfg("tunnel-client", listen=at, server=listen, to=(dst, port), secret=SECRET),
            topo.cli)
    return server, topo.cli.socket(socket.AF_INET), at


def socks5_in_rtr(topo, running, n, v6=False, **kw):
    kw.setdefault("allow", ALLOW_DOC)
    return running(cfg("socks5", listen=(N.RTR6_CLI if v6 else N.RTR4_CLI, 1080 + n), user="u",
                       password="p", **kw), topo.rtr)


def socks5_connect(server, host, port):
    """CONNECT through server from cli's namespace (the caller's): the control socket once
    the reply says succeeded; HandshakeError (with .rep) on a refusal."""
    ctl = socket.create_connection(server.address[:2], timeout=3)
    hs = proto.ClientHandshake(cmd=proto.CMD_CONNECT, host=host, port=port, user="u",
                               password="p")
    out = hs.start()
    try:
        while not hs.done:
            ctl.sendall(out)
            data = ctl.recv(4096)
            if not data:
                raise AssertionError("closed without a reply")
            out = hs.feed(data)
    except BaseException:
        ctl.close()
        raise
    return ctl


@pytest.mark.netns
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_tunnel_server_denies_its_own_address(topo, running, v6):
    N.start_echo(topo.rtr, f"[{own(v6)}]:7" if v6 else f"{own(v6)}:7")
    server, sock, at = tunnel_to(topo, running, 0, own(v6), 7)
    try:
        for i in range(3):
            sock.sendto(b"to the host %d" % i, at)
        wait_stat(server, "drop_denied", 3)
        assert server.stats()["up_datagrams"] == 0
    finally:
        sock.close()
    # allowed by allow_host, or by an --allow of that very address
    plen = "/128" if v6 else "/32"
    for n, kw in ((1, dict(allow_host=True)), (2, dict(allow=ALLOW_DOC + [own(v6) + plen]))):
        ok, sock, at = tunnel_to(topo, running, n, own(v6), 7, **kw)
        try:
            roundtrip(sock, at, b"to the host, allowed")
        finally:
            sock.close()
        assert ok.stats()["drop_denied"] == 0 and ok.stats()["up_datagrams"] >= 1


@pytest.mark.netns
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_socks5_denies_its_own_address(topo, running, v6):
    """UDP ASSOCIATE and CONNECT to the server host's own address: denied and counted by
    default, through with allow_host."""
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    N.start_echo(topo.rtr, f"[{own(v6)}]:7" if v6 else f"{own(v6)}:7")
    lsock = topo.rtr.socket(fam, socket.SOCK_STREAM)
    lsock.bind((own(v6), 8080))
    lsock.listen(8)
    lsock.settimeout(3)
    try:
        denied = socks5_in_rtr(topo, running, 0, v6)
        with topo.cli.enter():
            ctl, u, relay = raw_associate(denied, "u", "p", fam)
            try:
                for i in range(3):
                    u.sendto(proto.udp_header(own(v6), 7) + b"udp %d" % i, relay)
                wait_stat(denied, "drop_denied", 3)
            finally:
                ctl.close()
                u.close()
            with pytest.raises(proto.HandshakeError) as e:
                socks5_connect(denied, own(v6), 8080)
            assert e.value.rep == proto.REP_NOT_ALLOWED
            st_ = denied.stats()
            assert st_["drop_denied"] == 4 and st_["up_datagrams"] == 0
        allowed = socks5_in_rtr(topo, running, 1, v6, allow_host=True)
        with topo.cli.enter():
            ctl, u, relay = raw_associate(allowed, "u", "p", fam)
            try:
                u.sendto(proto.udp_header(own(v6), 7) + b"udp ok", relay)
                got, _src = u.recvfrom(70000)
                assert got.endswith(b"udp ok")
            finally:
                ctl.close()
                u.close()
            c = socks5_connect(allowed, own(v6), 8080)
        try:
            peer, _ = lsock.accept()
            c.sendall(b"connected")
            peer.settimeout(3)
            assert peer.recv(100) == b"connected"
            peer.close()
        finally:
            c.close()
        assert allowed.stats()["drop_denied"] == 0
    finally:
        lsock.close()


def _added_address(topo, v6, verb):
    cmd = ["ip"] + (["-6"] if v6 else []) + ["addr", verb, ADDED[v6] + ("/128" if v6 else "/32"),
                                              "dev", "rtr1"] + (["nodad"] if v6 and verb == "add"
                                                                else [])
    topo.rtr.run(*cmd)


def _until(send, cond, what, timeout=15.0):
    """send() every 0.2 s until cond() (bounded in time and count)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        send()
        if _poll(cond, 0.2):
            return
    raise AssertionError(f"timed out: {what}")


def _poll(cond, timeout):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.mark.netns
@pytest.mark.parametrize("mode", ["tunnel-server", "socks5"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_address_added_while_running_is_denied(topo, running, mode, v6):
    """An address that appears on the server host after start is denied within the
    refresh bound (netlink: at once; the test waits generously), and allowed again once
    it is gone. Nobody answers at it: what counts is allowed (sent) or denied."""
    dst = (ADDED[v6], 9)
    if mode == "tunnel-server":
        server, sock, at = tunnel_to(topo, running, 0, *dst)
        send = lambda: sock.sendto(b"x", at)          # noqa: E731
        closers = [sock]
    else:
        server = socks5_in_rtr(topo, running, 0, v6)
        with topo.cli.enter():
            ctl, u, relay = raw_associate(server, "u", "p",
                                          socket.AF_INET6 if v6 else socket.AF_INET)
        send = lambda: u.sendto(proto.udp_header(*dst) + b"x", relay)   # noqa: E731
        closers = [ctl, u]
    stat = lambda name: server.stats()[name]          # noqa: E731
    try:
        _until(send, lambda: stat("up_datagrams") >= 1, "sent before the address exists")
        assert stat("drop_denied") == 0
        _added_address(topo, v6, "add")
        _until(send, lambda: stat("drop_denied") >= 1, "denied once the address exists")
        up = stat("up_datagrams")
        denied = stat("drop_denied")
        for _ in range(3):
            send()
        _poll(lambda: stat("drop_denied") >= denied + 3, 5)
        assert stat("drop_denied") == denied + 3 and stat("up_datagrams") == up
        _added_address(topo, v6, "del")
        _until(send, lambda: stat("up_datagrams") > up, "sent again once it is gone")
    finally:
        for c in closers:
            c.close()
