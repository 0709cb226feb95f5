"""SOCKS5 and tunnel TCP hold against dead peers and slow names: CONNECT names resolved off
the loop (bounded, with a deadline), keepalive and TCP_USER_TIMEOUT on every long-lived TCP
connection, idle expiry of UDP associations, port-0 associations bound to their first
sender, strict_udp."""
import ipaddress
import re
import socket
import threading
import time

import pytest

from relay import _select, proto
from relay.config import ConfigError, parse_config
from relay.net import sockopt
from relay.stats import INDEX
from relay.services import socks5_server
from tests import namespaces as N
from tests.support import SECRET, Echo, cfg, raw_associate, sockets_to, wait_stat

pytestmark = pytest.mark.usefixtures("impl")     # every test: compiled, then pure


def socks5(running, **kw):
    kw.setdefault("listen", ("127.0.0.1", 0))
    kw.setdefault("allow", ["127.0.0.0/8"])
    return running(cfg("socks5", **kw))


def connect_request(server, host, port, source=None):
    """A control connection (from source, an address of this host) that has sent greeting
    and CONNECT request (no auth) and read the method reply; the CONNECT reply is still to
    come."""
    s = socket.create_connection(server.address[:2], timeout=5,
                                 source_address=(source, 0) if source else None)
    s.sendall(b"\x05\x01\x00")
    assert s.recv(2) == b"\x05\x00"
    s.sendall(b"\x05\x01\x00" + proto.encode_addr(host, port))
    return s


def reply_code(s, timeout):
    """REP of the reply waiting on s, None when none came within timeout."""
    s.settimeout(timeout)
    try:
        data = s.recv(4096)
    except socket.timeout:
        return None
    assert data[:1] == b"\x05", data
    return data[1]


# -------------------------------------------------------------- CONNECT names off the loop

STALL = "stall.example"          # the name whose DNS server never answers
STALL_BOUND = 20                 # seconds: far beyond socks5_server.RESOLVE_TIMEOUT (5)


class _Stall:
    def __init__(self):
        self.calls = []
        self.release = threading.Event()      # set: the DNS server finally gives up


@pytest.fixture
def stalled_dns(monkeypatch):
    """getaddrinfo of STALL never answers (until released or the test ends; 30 s at most):
    a DNS server that reads and never replies, seen from relay's side. Other names resolve
    as usual."""
    stall = _Stall()
    release, calls = stall.release, stall.calls
    real = socket.getaddrinfo

    def getaddrinfo(host, *args, **kw):
        name = host.decode("ascii", "replace") if isinstance(host, bytes) else host
        if name in (STALL, STALL + "."):
            calls.append(host)
            release.wait(30)
            raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")
        return real(host, *args, **kw)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield stall
    release.set()


def test_connect_name_that_never_resolves_does_not_stop_udp(running, echo, stalled_dns):
    server = socks5(running)
    ctl, u, relay = raw_associate(server)
    msg = proto.udp_header(*echo.addr) + b"before"
    u.sendto(msg, relay)
    assert u.recvfrom(100)[0][-6:] == b"before"
    stalled = connect_request(server, STALL, 80)
    stalled.setblocking(False)
    # UDP round trips while the name is being resolved (never answered): each must succeed
    rounds, reply = 0, b""
    deadline = time.monotonic() + STALL_BOUND
    u.settimeout(2)
    while time.monotonic() < deadline:
        try:
            reply = stalled.recv(100)
            break                     # the CONNECT's reply (or EOF) arrived: the stall is over
        except BlockingIOError:
            pass
        u.sendto(proto.udp_header(*echo.addr) + b"%d" % rounds, relay)
        got = u.recvfrom(100)[0]
        assert got.endswith(b"%d" % rounds)
        rounds += 1
        time.sleep(0.005)
    assert stalled_dns.calls, "the name was never looked up"
    assert rounds > 0
    assert reply[:2] == bytes([5, proto.REP_HOST_UNREACHABLE])
    assert server.svc.nresolving == 1          # counted until getaddrinfo gives up
    stalled_dns.release.set()
    N.wait_until(lambda: server.svc.nresolving == 0, 5, what="lookup returned")
    assert server.svc.resolving == {}
    for s in (stalled, ctl, u):
        s.close()


def test_connect_names_in_flight_are_bounded(running, stalled_dns):
    server = socks5(running)
    n = socks5_server.RESOLVE_PER_CLIENT
    waiting = [connect_request(server, STALL, 80 + i) for i in range(n)]
    N.wait_until(lambda: sum(server.svc.resolving.values()) == n, 5, what="names in flight")
    rejected = server.stats()["conn_rejected"]
    extra = connect_request(server, STALL, 90)
    # refused at once (the others are still waiting for their names), REP 4, counted
    assert reply_code(extra, 5) == proto.REP_HOST_UNREACHABLE
    assert all(reply_code(s, 0.01) is None for s in waiting)
    assert server.stats()["conn_rejected"] == rejected + 1
    # the deadline answers every waiting one with REP 4; their lookups still count until
    # getaddrinfo returns, so the client cannot pile up more of them meanwhile
    for s in waiting:
        assert reply_code(s, STALL_BOUND) == proto.REP_HOST_UNREACHABLE
    again = connect_request(server, STALL, 91)
    assert reply_code(again, 5) == proto.REP_HOST_UNREACHABLE
    assert len(stalled_dns.calls) == n
    stalled_dns.release.set()
    N.wait_until(lambda: server.svc.resolving == {}, 5, what="no names in flight")
    assert server.svc.nresolving == 0
    for s in waiting + [extra, again]:
        s.close()


def test_connect_names_in_flight_are_bounded_in_all(running, stalled_dns):
    server = socks5(running)
    per, total = socks5_server.RESOLVE_PER_CLIENT, socks5_server.RESOLVE_MAX
    waiting = [connect_request(server, STALL, 80, source=f"127.0.0.{2 + i // per}")
               for i in range(total)]
    N.wait_until(lambda: server.svc.nresolving == total, 5, what="names in flight")
    extra = connect_request(server, STALL, 80, source=f"127.0.0.{3 + total // per}")
    assert reply_code(extra, 5) == proto.REP_HOST_UNREACHABLE      # a fresh address: refused
    for s in waiting:
        assert reply_code(s, STALL_BOUND) == proto.REP_HOST_UNREACHABLE
    stalled_dns.release.set()
    N.wait_until(lambda: server.svc.nresolving == 0, 5, what="no names in flight")
    assert server.svc.resolving == {}
    for s in waiting + [extra]:
        s.close()


def test_connect_by_name_still_connects(running, monkeypatch):
    real = socket.getaddrinfo
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    monkeypatch.setattr(socket, "getaddrinfo", lambda host, *a, **kw: real(
        "127.0.0.1" if host == "here.example" else host, *a, **kw))
    server = socks5(running)
    s = connect_request(server, "here.example", port)
    assert reply_code(s, 5) == proto.REP_SUCCEEDED
    peer, _ = lsock.accept()
    s.sendall(b"ping")
    peer.settimeout(5)
    assert peer.recv(10) == b"ping"
    for x in (s, peer, lsock):
        x.close()


# ----------------------------------------------------------------- keepalive, user timeout

IDLE = 7                         # keepalive_params(7): probes every 7 s, 3 of them, 28 s
WANT = (1, 7, 7, 3, 28000)


@pytest.fixture
def keepalive():
    sockopt.set_tcp_keepalive(IDLE)
    yield
    sockopt.set_tcp_keepalive(parse_config({"listener": [{"name": "x", "mode": "socks5",
                                                          "listen": "127.0.0.1:1"}]})
                              .global_.tcp_keepalive)


def options_of(socks):
    got = [sockopt.keepalive_of(s) for s in socks]
    for s in socks:
        s.close()
    return got


def test_keepalive_params():
    assert sockopt.keepalive_params(60) == (60, 10, 3, 90000)
    assert sockopt.keepalive_params(1) == (1, 1, 3, 4000)
    assert sockopt.keepalive_params(0.2) == (1, 1, 3, 4000)


def test_socks5_control_and_connect_sockets(running, keepalive):
    lsock = socket.create_server(("127.0.0.1", 0))
    server = socks5(running)
    s = connect_request(server, "127.0.0.1", lsock.getsockname()[1])
    assert reply_code(s, 5) == proto.REP_SUCCEEDED
    peer, _ = lsock.accept()
    ctl, u, _relay = raw_associate(server)
    client_side = options_of(sockets_to(s.getsockname()) + sockets_to(ctl.getsockname()))
    remote_side = options_of(sockets_to(lsock.getsockname()))
    assert client_side == [WANT, WANT]      # the server's ends of both control connections
    assert remote_side == [WANT]            # its CONNECT socket to the destination
    for x in (s, peer, lsock, ctl, u):
        x.close()


def test_keepalive_off(running):
    sockopt.set_tcp_keepalive(0)
    try:
        server = socks5(running)
        ctl, u, _relay = raw_associate(server)
        assert [o[0] for o in options_of(sockets_to(ctl.getsockname()))] == [0]
        ctl.close()
        u.close()
    finally:
        sockopt.set_tcp_keepalive(60)


def test_socks5_upstream_control_connection(running, echo, keepalive):
    server = socks5(running)
    up = _select.module("tunnel").Socks5Upstream(server.address)
    got = []
    up.collect_replies(got)
    try:
        up.send(("192.0.2.1", 1000), echo.addr, b"x")
        up.flush()
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            up.process()
            up.tick()
            time.sleep(0.005)
        assert got
        assert options_of(sockets_to(server.address)) == [WANT]
    finally:
        up.close()


def test_tunnel_connections_both_ends(running, keepalive):
    server = running(cfg("tunnel-server", listen=("127.0.0.1", 0), secret=SECRET))
    up = _select.module("tunnel").TunnelUpstream(server.address, secret=SECRET)
    try:
        deadline = time.monotonic() + 5
        while up.connected < 1 and time.monotonic() < deadline:
            up.process()
            up.tick()
            time.sleep(0.005)
        assert up.connected == 1
        client = sockets_to(server.address)
        assert len(client) == 1
        here = client[0].getsockname()
        assert options_of(client) == [WANT]                    # tunnel client connection
        assert options_of(sockets_to(here)) == [WANT]          # accepted by tunnel-server
    finally:
        up.close()


# ------------------------------------------------------------- UDP associations idle out

# (listen host, client family, echo host): IPv4, IPv6, IPv4 on a dual-stack listener
LOOPS = {"ipv4": ("127.0.0.1", socket.AF_INET, "127.0.0.1"),
         "ipv6": ("::1", socket.AF_INET6, "::1"),
         "dual": ("::", socket.AF_INET, "127.0.0.1")}


@pytest.fixture(params=sorted(LOOPS))
def loop(request):
    """(socks5 keyword arguments, client family, echo server, the loopback address the
    client uses: it connects to the server there and is the echo server's host too)."""
    host, fam, at = LOOPS[request.param]
    e = Echo(at)
    kw = dict(listen=(host, 0), allow=["127.0.0.0/8", "::1/128"], insecure=host == "::")
    yield kw, fam, e, at
    e.close()


def associate(server, fam, at):
    return raw_associate(server, family=fam, at=(at, server.address[1]))


def test_idle_association_expires_with_its_control_connection(running, loop):
    kw, fam, echo, at = loop
    server = socks5(running, timeout=0.5, **kw)
    ctl, u, relay = associate(server, fam, at)
    u.sendto(proto.udp_header(*echo.addr) + b"x", relay)
    u.recvfrom(100)
    assert server.svc.relay.associations == 1
    ctl.settimeout(10)
    assert ctl.recv(100) == b""                 # EOF: closed by the server
    N.wait_until(lambda: server.stats()["conn_open"] == 0, 5, what="control connection closed")
    st = server.stats()
    assert (st["assoc_expired"], st["assoc_open"], server.svc.relay.associations) == (1, 0, 0)
    u.sendto(proto.udp_header(*echo.addr) + b"after", relay)
    u.settimeout(0.3)
    with pytest.raises(socket.timeout):
        u.recvfrom(100)
    u.close()


def test_traffic_keeps_an_association_open(echo):
    """Socks5Relay alone, its clock given to tick(): a datagram refreshes the association;
    only timeout seconds after the last one is it closed and counted."""
    acl = proto.AccessList(allow=[ipaddress.ip_network("127.0.0.0/8")]).table()
    r = _select.module("tunnel").Socks5Relay(acl, None, timeout=10)
    relay_sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    relay_sock.bind(("127.0.0.1", 0))
    relay_sock.setblocking(False)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.setblocking(False)
    try:
        added = time.monotonic()
        idx = r.add(relay_sock.fileno(), client.getsockname())
        time.sleep(0.3)
        client.sendto(proto.udp_header(*echo.addr) + b"x", relay_sock.getsockname())
        got, deadline = None, time.monotonic() + 5
        while got is None and time.monotonic() < deadline:
            r.poll(20)
            try:
                got = client.recv(100)
            except BlockingIOError:
                pass
        assert got and got.endswith(b"x")
        assert r.tick(added + 10.1) == []              # refreshed at least 0.3 s after it
        assert r.associations == 1
        assert r.tick(time.monotonic() + 11) == [idx]  # idle for longer than timeout
        assert r.associations == 0
        assert r.stats[INDEX["assoc_expired"]] == 1
    finally:
        r.close()
        relay_sock.close()
        client.close()


# ------------------------------------------------------------------------------- port 0

def test_port0_association_belongs_to_its_first_sender(running, loop):
    kw, fam, echo, at = loop
    server = socks5(running, **kw)
    ctl, u, relay = associate(server, fam, at)          # announces 0.0.0.0:0 / [::]:0
    u.sendto(proto.udp_header(*echo.addr) + b"mine", relay)
    assert u.recvfrom(100)[0].endswith(b"mine")        # u's port now owns the association
    other = socket.socket(fam, socket.SOCK_DGRAM)      # same IP, another port
    other.bind((at, 0))
    other.settimeout(0.5)
    other.sendto(proto.udp_header(*echo.addr) + b"steal", relay)
    wait_stat(server, "drop_foreign_port")
    with pytest.raises(socket.timeout):
        other.recvfrom(100)                            # gets nothing
    u.settimeout(0.5)
    with pytest.raises(socket.timeout):
        u.recvfrom(100)                                # nor is it passed to the client
    u.sendto(proto.udp_header(*echo.addr) + b"still", relay)
    u.settimeout(2)
    assert u.recvfrom(100)[0].endswith(b"still")
    st = server.stats()
    assert (st["drop_foreign_port"], st["up_datagrams"], st["down_datagrams"]) == (1, 2, 2)
    for s in (ctl, u, other):
        s.close()


def test_strict_udp_refuses_port0(running, loop):
    kw, fam, echo, at = loop
    server = socks5(running, strict_udp=True, **kw)
    with pytest.raises(proto.HandshakeError) as e:
        associate(server, fam, at)
    assert e.value.rep == proto.REP_NOT_ALLOWED
    wait_stat(server, "conn_rejected")
    assert server.svc.relay.associations == 0
    # the real port is accepted
    u = socket.socket(fam, socket.SOCK_DGRAM)
    u.bind((at, 0))
    u.settimeout(2)
    ctl = socket.create_connection((at, server.address[1]), timeout=3)
    hs = proto.ClientHandshake(cmd=proto.CMD_UDP_ASSOCIATE, host=at,
                               port=u.getsockname()[1])
    out = hs.start()
    while not hs.done:
        ctl.sendall(out)
        out = hs.feed(ctl.recv(4096))
    u.sendto(proto.udp_header(*echo.addr) + b"ok", hs.bound)
    assert u.recvfrom(100)[0].endswith(b"ok")
    ctl.close()
    u.close()


# ------------------------------------------------------------------------------ config

def _parse(global_=None, **listener):
    doc = {"listener": [{"name": "s", "mode": "socks5", "listen": "127.0.0.1:1080",
                         **listener}]}
    if global_ is not None:
        doc["global"] = global_
    return parse_config(doc)


def test_config_keys():
    assert _parse().global_.tcp_keepalive == 60.0
    assert _parse({"tcp_keepalive": 0}).global_.tcp_keepalive == 0.0
    assert _parse({"tcp_keepalive": 15}).global_.tcp_keepalive == 15.0
    for bad in (-1, 40000, "x", True):
        with pytest.raises(ConfigError, match="tcp_keepalive"):
            _parse({"tcp_keepalive": bad})
    assert _parse().listeners[0].strict_udp is False
    assert _parse(strict_udp=True).listeners[0].strict_udp is True
    with pytest.raises(ConfigError, match="strict_udp"):
        parse_config({"listener": [{"name": "f", "mode": "forward", "listen": "127.0.0.1:1",
                                    "to": "127.0.0.1:2", "strict_udp": True}]})


def test_cli_options():
    from relay import cli
    args = cli.build_parser().parse_args(["socks5", "--listen", "127.0.0.1:1080",
                                          "--strict-udp", "--tcp-keepalive", "20"])
    assert cli._global_from_args(args)["tcp_keepalive"] == 20
    assert cli._listener_from_args(args, "socks5")["strict_udp"] is True


def test_cli_option_reaches_the_workers():
    """`relay socks5 --tcp-keepalive 9`: the worker's end of a control connection has the
    keepalive timer running (ss shows it), set from the [global] value."""
    from tests.relayproc import RelayProcess, free_tcp_port
    port = free_tcp_port()
    with RelayProcess(["socks5", "--listen", f"127.0.0.1:{port}", "--tcp-keepalive", "9"]) as r:
        r.wait_ready()
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.sendall(b"\x05\x01\x00")
        assert c.recv(2) == b"\x05\x00"
        out = N.sh("ss", "-tnoH", "state", "established", "sport", "=", f":{port}").stdout
        m = re.search(r"timer:\(keepalive,(?:(\d+)min)?([\d.]+)?(ms|sec)?", out)
        assert m, out
        left = int(m.group(1) or 0) * 60 + float(m.group(2) or 0) / (
            1000 if m.group(3) == "ms" else 1)
        assert 0 < left <= 9, out              # 9 s, not the default 60
        c.close()
