"""The access list of tunnel-server and socks5: the special-purpose ranges denied by default
(NAT64 among them), the host's own addresses denied unless allowed, kept current while the
services run (relay.net.ifaddr), for tunnel frames, SOCKS5 UDP and SOCKS5 CONNECT; the
reference AccessList, the C Acl and its pure twin agree."""
import ipaddress
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from relay import proto
from relay.datapath import pure
from relay.net import ifaddr
from tests.support import cfg, examples

_tunnel = pytest.importorskip("relay.datapath.tunnel")
pytestmark = pytest.mark.usefixtures("impl")      # compiled cores, then the pure twins


def matchers(acl, hosts=None):
    """The reference, the C matcher and the pure one, all with the same rules (and hosts)."""
    if hosts is None:
        return [acl, _tunnel.Acl(acl.table()), pure.Acl(acl.table())]
    acl.set_hosts(hosts)
    keys = acl.host_keys(hosts)
    return [acl, _tunnel.Acl(acl.table(), keys), pure.Acl(acl.table(), keys)]


# ----------------------------------------------------------------------------- special ranges

SPECIAL = ["64:ff9b::808:808", "64:ff9b::c633:6402", "64:ff9b:1::1", "5f00::1", "3fff::1",
           "100::1", "2001::1", "2001:20::1", "2001:db8::1", "2002:808:808::1", "fec0::1",
           "ff0e::1", "fe80::1", "fc00::1", "::", "::1", "::ffff:100.64.0.1", "::ffff:0.1.2.3",
           "0.1.2.3", "100.127.255.255", "192.0.0.8", "192.0.2.200", "198.18.0.1",
           "198.19.255.255", "198.51.100.200", "203.0.113.200", "240.0.0.1", "255.255.255.255",
           "192.88.99.1"]
GLOBAL = ["8.8.8.8", "93.184.216.34", "2606:4700::1111", "2a00:1450::1", "64:ff9c::1",
          "64:ff9b:2::1", "5eff::1", "3fff:1000::1", "::ffff:8.8.4.4", "100.128.0.1"]


def test_special_ranges_denied_by_default():
    for m in matchers(proto.AccessList()):
        for ip in SPECIAL:
            assert not m.allowed(ip), (type(m).__name__, ip)
        for ip in GLOBAL:
            assert m.allowed(ip), (type(m).__name__, ip)


def test_nat64_allowed_explicitly():
    for m in matchers(proto.AccessList(allow="64:ff9b::/96")):
        assert m.allowed("64:ff9b::808:808")
        assert not m.allowed("64:ff9b:1::1")


# ----------------------------------------------------------------------------- host addresses

HOSTS = ["93.184.216.34", "2606:4700::1111", "127.0.0.1", "::1", "10.0.0.1"]


@pytest.mark.parametrize("form", ["text", "keys"])
def test_host_addresses_denied_by_default(form):
    hosts = HOSTS if form == "text" else [ifaddr.key(h) for h in HOSTS]
    for m in matchers(proto.AccessList(), hosts):
        assert not m.allowed("93.184.216.34")
        assert not m.allowed("::ffff:93.184.216.34")          # the IPv4-mapped form too
        assert not m.allowed("2606:4700::1111")
        assert m.allowed("93.184.216.35") and m.allowed("2606:4700::1112")
        assert m.allowed("8.8.8.8")


def test_host_addresses_allowed_only_by_name_or_allow_host():
    # a /24 or /0 allow does not cover a host address; the address itself does
    for m in matchers(proto.AccessList(allow="93.184.216.0/24,0.0.0.0/0,::/0"), HOSTS):
        assert not m.allowed("93.184.216.34") and not m.allowed("2606:4700::1111")
        assert m.allowed("93.184.216.33")
    for m in matchers(proto.AccessList(allow="93.184.216.34/32"), HOSTS):
        assert m.allowed("93.184.216.34") and m.allowed("::ffff:93.184.216.34")
        assert not m.allowed("2606:4700::1111")
    for m in matchers(proto.AccessList(allow="::ffff:93.184.216.34/128"), HOSTS):
        assert m.allowed("93.184.216.34")
    for m in matchers(proto.AccessList(allow_host=True), HOSTS):
        assert m.allowed("93.184.216.34") and m.allowed("2606:4700::1111")
        assert not m.allowed("10.0.0.1")                     # still private
    # an explicit deny of a host address stays a deny
    for m in matchers(proto.AccessList(allow_host=True, deny="93.184.216.34/32"), HOSTS):
        assert not m.allowed("93.184.216.34")


def test_loopback_host_addresses_follow_the_loopback_allow():
    """The host's loopback addresses are denied by the defaults already; an --allow of them
    is an explicit allow of the host (the loopback tests rely on it)."""
    for m in matchers(proto.AccessList(allow="127.0.0.0/8,::1/128"), HOSTS):
        assert m.allowed("127.0.0.1") and m.allowed("::1")
        assert not m.allowed("93.184.216.34")
    for m in matchers(proto.AccessList(), HOSTS):
        assert not m.allowed("127.0.0.1") and not m.allowed("::1")


def test_set_hosts_replaces_them():
    acl = proto.AccessList()
    c = _tunnel.Acl(acl.table(), acl.host_keys(HOSTS))
    p = pure.Acl(acl.table(), acl.host_keys(HOSTS))
    assert c.host_count == p.host_count == 3                 # the loopback ones left out
    new = ["1.1.1.1", "2606:4700::1111"]
    for m in (c, p):
        m.set_hosts(acl.host_keys(new))
        assert m.allowed("93.184.216.34") and not m.allowed("1.1.1.1")
        assert not m.allowed("2606:4700::1111")
        m.set_hosts([])
        assert m.allowed("1.1.1.1") and m.host_count == 0
        with pytest.raises(ValueError, match="16"):
            m.set_hosts([b"\1\2\3\4"])


ips = st.one_of(st.ip_addresses(v=4), st.ip_addresses(v=6)).map(str)
nets = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)),
).map(lambda t: ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False))


@settings(max_examples=examples(80), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(nets, max_size=3), st.lists(nets, max_size=3), st.lists(ips, max_size=6),
       st.lists(ips, min_size=1, max_size=8), st.booleans())
def test_fuzz_host_aware_acl_agree(allow, deny, hosts, probe, allow_host):
    # full-length allows/denies of some host addresses, so that those paths are taken too
    allow = allow + [ipaddress.ip_network(h) for h in hosts[:1]]
    deny = deny + [ipaddress.ip_network(h) for h in hosts[1:2]]
    acl = proto.AccessList(allow=allow, deny=deny, allow_host=allow_host)
    ref, c, p = matchers(acl, hosts)
    # (an IPv4-mapped IPv6 host is text with dots too on Python 3.13: map IPv4 ones only)
    mapped = ["::ffff:" + h for h in hosts if ipaddress.ip_address(h).version == 4]
    for ip in probe + hosts + mapped:
        assert ref.allowed(ip) == c.allowed(ip) == p.allowed(ip), ip


# ----------------------------------------------------------------------------- configuration

@pytest.mark.parametrize("mode", ["tunnel-server", "socks5"])
def test_allow_host_from_the_command_line_and_toml(mode):
    from relay import cli
    from relay.config import ConfigError, parse_config
    base = ["--listen", "127.0.0.1:1080"]
    for argv, want in ((base, False), (base + ["--allow-host"], True)):
        args = cli.build_parser().parse_args([mode] + argv)
        lst = parse_config({"listener": [cli._listener_from_args(args, mode)]}).listeners[0]
        assert lst.allow_host is want
    table = {"name": "x", "mode": mode, "listen": "127.0.0.1:1080"}
    assert parse_config({"listener": [dict(table, allow_host=True)]}).listeners[0].allow_host
    with pytest.raises(ConfigError, match="allow_host"):
        parse_config({"listener": [dict(table, allow_host="yes")]})
    with pytest.raises(ConfigError, match='allow_host: not allowed for mode "forward"'):
        parse_config({"listener": [{"name": "f", "mode": "forward", "listen": "127.0.0.1:1",
                                    "to": "127.0.0.1:2", "allow_host": True}]})


# ----------------------------------------------------------------------------- netlink

def test_parse_addresses_refuses_truncated_messages():
    good = struct.pack("=IHHII", 16, ifaddr.NLMSG_DONE, 0, 1, 0)
    assert ifaddr.parse_addresses(good, set())
    with pytest.raises(OSError):
        ifaddr.parse_addresses(struct.pack("=IHHII", 400, ifaddr.RTM_NEWADDR, 0, 1, 0), set())
    # an attribute longer than its message is ignored, not read past the end
    msg = struct.pack("=BBBBI", socket.AF_INET, 24, 0, 0, 1) + struct.pack("=HH", 40, 2) + b"\1" * 4
    out = set()
    ifaddr.parse_addresses(struct.pack("=IHHII", 16 + len(msg), ifaddr.RTM_NEWADDR, 0, 1, 0)
                           + msg, out)
    assert out == set()


class _Core:
    """What DestinationAcl needs of a core: watch and unwatch."""

    def __init__(self):
        self.watched = {}

    def watch(self, fd, token, **_kw):
        self.watched[fd] = token

    def unwatch(self, fd):
        self.watched.pop(fd, None)


def test_failed_address_dump_is_tried_again_from_tick(monkeypatch):
    """The host-address part of a service's Acl: watched under HOSTS_TOKEN; a dump that
    fails (the notices already drained) is tried again from tick() after RETRY."""
    import logging
    from relay.services import common
    d = common.DestinationAcl(cfg("socks5", listen=("127.0.0.1", 0)), logging.getLogger("t"))
    core = _Core()
    d.attach(core)
    try:
        assert core.watched == {d.watch.fileno(): common.HOSTS_TOKEN}
        public = "93.184.216.34"
        assert d.acl.allowed(public)

        def broken(sock, seq=1):
            raise OSError(5, "dump failed")
        monkeypatch.setattr(ifaddr, "dump", broken)
        with pytest.raises(OSError):
            d.refresh(force=True)
        assert d.retry_at is not None
        monkeypatch.setattr(ifaddr, "dump", lambda sock, seq=1: frozenset([ifaddr.key(public)]))
        d.tick(d.retry_at - 0.5)                    # not yet
        assert d.acl.allowed(public)
        d.tick(d.retry_at + 0.01)
        assert not d.acl.allowed(public) and not d.acl.allowed("::ffff:" + public)
        assert d.retry_at is None and d.acl.host_count == 1
    finally:
        d.close()
    assert core.watched == {}
    # allow_host: no watch at all, the host addresses judged like any other
    d = common.DestinationAcl(cfg("socks5", listen=("127.0.0.1", 0), allow_host=True),
                              logging.getLogger("t"))
    d.attach(core)
    assert d.watch is None and core.watched == {} and d.acl.host_count == 0
    d.tick(time.monotonic() + 10)
    d.close()
