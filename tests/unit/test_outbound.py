"""Outbound binding (--bind-interface, --source) and the tunnel TCP options (Fast Open,
congestion control, keepalive) on loopback: the configuration refuses what this host
cannot do, naming the key; the sockets every mode opens carry the options (getsockopt);
the source a datagram leaves from is the one asked for (127.0.0.2 is an address of lo).
The two-uplink router and Fast Open data in the SYN: tests/netns/test_outbound.py."""
import socket
import time

import pytest

from relay import config, proto
from relay.config import ConfigError, parse_config, parse_listener
from relay.net import sockopt
from relay.net.addr import parse_upstream
from relay.net.sockopt import Outbound
from tests.support import Echo, ask_source as ask, cfg, own_sockets, raw_client, read_frames, sockets_to

pytest.importorskip("relay.datapath.tunnel")


@pytest.fixture
def who():
    e = Echo(who=True)
    yield e
    e.close()


def _lst(**kw):
    return parse_listener({"name": "x", "mode": "forward", "listen": "127.0.0.1:5000",
                           "to": "127.0.0.1:53", **kw})


# ----------------------------------------------------------------------------- configuration

def test_listener_binding_is_parsed_and_merged_with_the_upstreams():
    lst = _lst(bind_interface="lo", source="::1, 127.0.0.1")
    assert lst.bind_interface == "lo" and lst.source == ("127.0.0.1", "::1")
    assert lst.outbound() == Outbound("lo", "127.0.0.1", "::1")
    lst = _lst(bind_interface="lo", source=["127.0.0.1"],
               upstream="tunnel://127.0.0.1:9000?source=127.0.0.2", secret="s")
    assert lst.upstream.source == ("127.0.0.2",)
    assert lst.outbound() == Outbound("lo", "127.0.0.2", None)       # the upstream's wins
    assert lst.summary()["upstream"] == "tunnel://127.0.0.1:9000?source=127.0.0.2"
    assert lst.summary()["source"] == ["127.0.0.1"]
    assert _lst().outbound() == Outbound() and not _lst().outbound()


def test_upstream_url_query():
    up = parse_upstream("socks5://u:p%3F@192.0.2.1:1080?bind=eth1&source=2001:db8::1,192.0.2.9")
    assert (up.password, up.bind_interface, up.source) == ("p?", "eth1", ("192.0.2.9", "2001:db8::1"))
    assert str(up) == "socks5://u:***@192.0.2.1:1080?bind=eth1&source=192.0.2.9,2001:db8::1"


@pytest.mark.parametrize("kw, key, reason", [
    (dict(bind_interface="nosuch0"), "listener[0].bind_interface", "no such interface: nosuch0"),
    (dict(bind_interface="x" * 16), "listener[0].bind_interface", "not an interface name"),
    (dict(source="203.0.113.77"), "listener[0].source", "203.0.113.77: not an address of this host"),
    (dict(source="127.0.0.1,127.0.0.2"), "listener[0].source", "two IPv4 addresses"),
    (dict(source="::"), "listener[0].source", "one unicast address"),
    (dict(source=5), "listener[0].source", "expected an address"),
    (dict(upstream="tunnel://127.0.0.1:9?bind=nosuch0", secret="s"),
     "listener[0].upstream (bind=)", "no such interface: nosuch0"),
    (dict(upstream="gost://127.0.0.1:9?source=2001:db8::77"),
     "listener[0].upstream (source=)", "2001:db8::77: not an address of this host"),
])
def test_binding_this_host_cannot_do_is_refused_naming_the_key(kw, key, reason):
    with pytest.raises(ConfigError) as e:
        _lst(**kw)
    assert e.value.key == key and reason in e.value.reason


@pytest.mark.parametrize("mode", config.MODES)
def test_every_mode_takes_the_binding_keys(mode):
    assert {"bind_interface", "source"} <= config.MODE_KEYS[mode]


def test_global_tcp_options():
    def g(**kw):
        return parse_config({"global": kw, "listener": [
            {"name": "x", "mode": "forward", "listen": "127.0.0.1:5000", "to": "127.0.0.1:53"}]},
            "relay.toml").global_
    assert g().tcp_fastopen is True and g().tcp_congestion is None
    assert g(tcp_fastopen=False).tcp_fastopen is False
    have = sockopt.congestion_available()
    assert g(tcp_congestion=have[0]).tcp_congestion == have[0]
    with pytest.raises(ConfigError) as e:
        g(tcp_congestion="nosuchcc")
    assert str(e.value).startswith("relay.toml: global.tcp_congestion: the kernel has no TCP "
                                   "congestion control 'nosuchcc' (available: ")
    with pytest.raises(ConfigError, match="global.tcp_fastopen: expected true or false"):
        g(tcp_fastopen="yes")


def test_command_line_options():
    from relay import cli
    p = cli.build_parser()
    args = p.parse_args(["forward", "--listen", "127.0.0.1:5000", "--to", "127.0.0.1:53",
                         "--bind-interface", "lo", "--source", "127.0.0.2,::1",
                         "--tcp-fastopen", "off", "--tcp-congestion", "reno"])
    lc = cli._listener_from_args(args, "forward")
    assert (lc["bind_interface"], lc["source"]) == ("lo", "127.0.0.2,::1")
    c = parse_config({"global": cli._global_from_args(args), "listener": [lc]})
    assert c.listeners[0].outbound() == Outbound("lo", "127.0.0.2", "::1")
    assert (c.global_.tcp_fastopen, c.global_.tcp_congestion) == (False, "reno")
    for mode in ("redir", "tunnel-server", "tunnel-client", "socks5"):
        assert "--bind-interface" in p._subparsers._group_actions[0].choices[mode].format_help()


def test_capabilities():
    from relay.privileges import CAP_NET_ADMIN, CAP_NET_RAW, needed_capabilities
    bound = config.listener("tunnel-server", listen=("127.0.0.1", 9000), bind_interface="lo")
    assert CAP_NET_RAW in needed_capabilities([bound], kernel=(5, 6))
    assert CAP_NET_RAW not in needed_capabilities([bound], kernel=(5, 7))
    g = config.GlobalConfig(tcp_congestion="nosuchcc")      # not in the allowed list
    assert CAP_NET_ADMIN in needed_capabilities([bound], g)
    assert needed_capabilities([bound], config.GlobalConfig(), kernel=(6, 1)) == ()


# ----------------------------------------------------------------------------- TCP options

@pytest.fixture
def tuning():
    """set_tcp_tuning with the kernel's Fast Open bits as the test says; restored after."""
    saved = dict(sockopt._tcp_tuning)

    def tune(bits=3, fastopen=True, congestion=None):
        real = sockopt.fastopen_bits
        sockopt.fastopen_bits = lambda path=None: bits
        try:
            sockopt.set_tcp_tuning(fastopen, congestion)
        finally:
            sockopt.fastopen_bits = real
    yield tune
    sockopt._tcp_tuning.clear()
    sockopt._tcp_tuning.update(saved)


def test_fastopen_sides_follow_the_kernel_bits():
    assert sockopt.fastopen_missing(0) == ("client", "server")
    assert sockopt.fastopen_missing(1) == ("server",)
    assert sockopt.fastopen_missing(2) == ("client",)
    assert sockopt.fastopen_missing(3) == ()


@pytest.mark.parametrize("bits, fastopen, want", [
    (3, True, (1, sockopt.FASTOPEN_QLEN)), (1, True, (1, 0)), (2, True, (0, sockopt.FASTOPEN_QLEN)),
    (3, False, (0, 0))], ids=["both", "client-only", "server-only", "off"])
def test_fastopen_and_congestion_on_sockets(tuning, bits, fastopen, want):
    cc = sockopt.congestion_allowed()[0]
    tuning(bits, fastopen, cc)
    lsock = sockopt.tcp_listen(("127.0.0.1", 0), tune=True)
    c = socket.socket()
    try:
        sockopt.tcp_client(c, Outbound("lo", "127.0.0.2"), False)
        assert sockopt.tcp_options_of(c)[0] == want[0]
        assert sockopt.tcp_options_of(c)[2] == cc
        assert sockopt.keepalive_of(c)[0] == 1
        assert sockopt.device_of(c) == "lo" and c.getsockname()[0] == "127.0.0.2"
        assert sockopt.tcp_options_of(lsock)[1:] == (want[1], cc)
        c.connect(lsock.getsockname())
        a, peer = _accept(lsock)
        assert peer[0] == "127.0.0.2"
        assert sockopt.tcp_options_of(a)[2] == cc          # inherited from the listen socket
        a.close()
    finally:
        c.close()
        lsock.close()


def _accept(lsock):
    lsock.settimeout(3)
    try:
        return lsock.accept()
    finally:
        lsock.setblocking(False)


def test_fastopen_note_names_the_missing_side(monkeypatch, caplog):
    from relay.supervisor import Supervisor
    c = parse_config({"listener": [{"name": "t", "mode": "tunnel-server", "listen": "127.0.0.1:9",
                                    "secret": "s"}]})
    sup = Supervisor.__new__(Supervisor)
    sup.config = c
    monkeypatch.setattr(sockopt, "fastopen_bits", lambda path=None: 1)
    with caplog.at_level("INFO", logger="relay"):
        sup._fastopen_note()
    lines = [r.getMessage() for r in caplog.records if "Fast Open" in r.getMessage()]
    assert lines == ["TCP Fast Open off for the server side: net.ipv4.tcp_fastopen is 1 (1: "
                     "client, 2: server; sysctl -w net.ipv4.tcp_fastopen=3 allows both)"]
    caplog.clear()
    monkeypatch.setattr(sockopt, "fastopen_bits", lambda path=None: 3)
    sup._fastopen_note()
    assert not [r for r in caplog.records if "Fast Open" in r.getMessage()]


# ----------------------------------------------------------------------------- the sockets

def _sockets_bound(hosts, kind=socket.SOCK_DGRAM):
    return own_sockets(lambda s: s.getsockname()[0] in hosts, kind)


@pytest.mark.usefixtures("impl")
@pytest.mark.parametrize("kind", ["tunnel", "gost", "socks5"])
def test_upstream_core_connections_carry_binding_and_options(tuning, kind):
    """TunnelUpstream (relay tunnel and gost) and Socks5Upstream, both implementations:
    their TCP connections have the device, the source, Fast Open, the congestion control
    and keepalive; the SOCKS5 UDP socket the device and the source."""
    from relay import _select
    t = _select.module("tunnel")
    cc = sockopt.congestion_allowed()[0]
    tuning(3, True, cc)
    lsock = sockopt.tcp_listen(("127.0.0.1", 0))
    server = lsock.getsockname()
    out = Outbound("lo", "127.0.0.2")
    if kind == "socks5":
        core = t.Socks5Upstream(server, outbound=out)
    else:
        core = t.TunnelUpstream(server, secret="s" if kind == "tunnel" else None,
                                gost=kind == "gost", outbound=out)
    try:
        if kind != "tunnel":          # gost and SOCKS5 connect per flow: start one
            core.send(("127.0.0.1", 40000), ("127.0.0.1", 53), b"x")
        core.tick(time.monotonic())   # the relay tunnel's connections start here
        a, peer = _accept(lsock)
        assert peer[0] == "127.0.0.2"
        conns = sockets_to(server)
        assert conns, "no connection of the core found"
        for s in conns:
            assert sockopt.device_of(s) == "lo"
            assert sockopt.tcp_options_of(s)[0] == 1 and sockopt.tcp_options_of(s)[2] == cc
            assert sockopt.keepalive_of(s)[0] == 1
            s.close()
        if kind == "socks5":
            udp = [s for s in _sockets_bound(("127.0.0.2",), socket.SOCK_DGRAM)]
            assert len(udp) == 1 and sockopt.device_of(udp[0]) == "lo"
            udp[0].close()
        a.close()
    finally:
        core.close()
        lsock.close()


# ----------------------------------------------------------------------------- each mode leaves from its source

SOURCES = [None, "127.0.0.2"]       # None: the route's source (127.0.0.1), so the test can fail


@pytest.mark.parametrize("source", SOURCES, ids=["route", "source"])
def test_forward_direct_sockets_leave_from_the_source(running, who, source):
    pytest.importorskip("relay.datapath.engine")
    extra = dict(source=(source,), bind_interface="lo") if source else {}
    r = running(cfg("forward", listen=("127.0.0.1", 0), to=who.addr, **extra))
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert ask(c, r.svc.listen.getsockname()) == (source or "127.0.0.1")
    finally:
        c.close()


@pytest.mark.usefixtures("impl")
@pytest.mark.parametrize("source", SOURCES, ids=["route", "source"])
def test_tunnel_server_flows_leave_from_the_source(running, who, source):
    extra = dict(source=(source, "::1"), bind_interface="lo") if source else {}
    server = running(cfg("tunnel-server", listen=("127.0.0.1", 0), allow=["127.0.0.0/8"],
                         **extra))
    s, left = raw_client(server)
    try:
        s.sendall(proto.encode_frame(*who.addr, b"?", flow=1))
        frames = read_frames(s, 1, buf=left)
        assert [f.data for f in frames] == [(source or "127.0.0.1").encode()]
    finally:
        s.close()


@pytest.mark.usefixtures("impl")
@pytest.mark.parametrize("source", SOURCES, ids=["route", "source"])
def test_socks5_server_udp_and_connect_leave_from_the_source(running, who, source):
    from tests.support import raw_associate
    extra = dict(source=(source,), bind_interface="lo") if source else {}
    server = running(cfg("socks5", listen=("127.0.0.1", 0), allow=["127.0.0.0/8"], **extra))
    ctl, u, relay = raw_associate(server)
    try:
        u.sendto(proto.udp_header(*who.addr) + b"?", relay)
        got, frm = u.recvfrom(1000)
        _frag, _atyp, _host, _port, hl = proto.parse_udp_header(got)
        assert got[hl:] == (source or "127.0.0.1").encode()
        assert frm[0] == relay[0]           # the client's answers: from the address it used
    finally:
        ctl.close()
        u.close()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(4)
    lsock.settimeout(3)
    ctl = socket.create_connection(server.address[:2], timeout=3)
    try:
        hs = proto.ClientHandshake(cmd=proto.CMD_CONNECT, host="127.0.0.1",
                                   port=lsock.getsockname()[1])
        out = hs.start()
        while not hs.done:
            ctl.sendall(out)
            out = hs.feed(ctl.recv(4096))
        a, peer = lsock.accept()
        a.close()
        assert peer[0] == (source or "127.0.0.1")
    finally:
        ctl.close()
        lsock.close()
