"""relay.net.addr: HOST:PORT, CIDR and upstream URL parsing, with the exact error reasons."""
import ipaddress
import socket

import pytest
from hypothesis import given, settings, strategies as st

from relay.net.addr import (Upstream, family_of, format_hostport, is_v6, parse_cidr,
                            parse_hostport, parse_ip, parse_upstream)
from tests.support import examples


@pytest.mark.parametrize("text, expected", [
    ("1.2.3.4:53", ("1.2.3.4", 53)),
    ("[2001:db8::1]:53", ("2001:db8::1", 53)),
    ("[::]:5353", ("::", 5353)),
    ("0.0.0.0:1", ("0.0.0.0", 1)),
    ("[2001:DB8:0:0::1]:65535", ("2001:db8::1", 65535)),   # canonical form
    (" 192.0.2.1:053 ", ("192.0.2.1", 53)),
    ("[::ffff:192.0.2.1]:9", (str(ipaddress.IPv6Address("::ffff:192.0.2.1")), 9)),
])
def test_parse_hostport_valid(text, expected):
    assert parse_hostport(text) == expected


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    (":53", "empty host"),
    ("2001:db8::1:53", "IPv6 addresses must be in brackets"),
    ("::1", "IPv6 addresses must be in brackets"),
    ("[1.2.3.4]:53", "brackets are only for IPv6"),
    ("[2001:db8::1", "missing ']'"),
    ("[2001:db8::1]53", "unexpected '53' after ']'"),
    ("[]:53", "empty host"),
    ("[2001:db8::g]:53", "not an IPv6 address"),
    ("[fe80::1%eth0]:53", "zone indexes"),
    ("1.2.3.4:", "missing port after ':'"),
    ("1.2.3.4", "missing port"),
    ("1.2.3.4:70000", "port out of range 1-65535: 70000"),
    ("1.2.3.4:0", "port out of range 1-65535: 0"),
    ("1.2.3.4:-1", "port is not a number: '-1'"),
    ("1.2.3.4:5x", "port is not a number: '5x'"),
    ("1.2.3.4:١٢", "port is not a number"),
    ("1.2.3.4:999999", "port is not a number"),
    ("1.2.3:53", "not an IP address or host name: '1.2.3'"),
    ("256.1.1.1:53", "not an IP address or host name"),
    ("01.2.3.4:53", "not an IP address or host name"),
    ("a b:53", "not an IP address or host name"),
    ("-bad.example:53", "not an IP address or host name"),
    ("example.com:53", "host names are not accepted here"),
])
def test_parse_hostport_errors_name_value_and_reason(text, reason):
    with pytest.raises(ValueError) as e:
        parse_hostport(text, what="listen address")
    msg = str(e.value)
    assert reason in msg
    assert msg.startswith(f"listen address {text!r}: ")


def test_parse_hostport_options():
    assert parse_hostport("1.2.3.4:0", allow_zero=True) == ("1.2.3.4", 0)
    assert parse_hostport("1.2.3.4", default_port=53) == ("1.2.3.4", 53)
    assert parse_hostport("[2001:db8::1]", default_port=7) == ("2001:db8::1", 7)
    assert parse_hostport("1.2.3.4:9", default_port=53) == ("1.2.3.4", 9)
    with pytest.raises(TypeError, match="expected a string"):
        parse_hostport(("1.2.3.4", 5))
    with pytest.raises(TypeError):
        parse_hostport(None)


def test_parse_hostport_resolves_names_once_when_asked():
    host, port = parse_hostport("localhost:53", resolve=True)
    assert ipaddress.ip_address(host).is_loopback and port == 53
    # IP literals never go to the resolver.
    assert parse_hostport("192.0.2.1:5", resolve=True) == ("192.0.2.1", 5)
    with pytest.raises(ValueError, match="port out of range"):
        parse_hostport("localhost:0", resolve=True)
    with pytest.raises(ValueError, match="missing port"):
        parse_hostport("localhost", resolve=True)


def test_resolve_failure_names_the_host(monkeypatch):
    calls = []

    def fake_getaddrinfo(host, port, *a, **kw):
        calls.append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(ValueError) as e:
        parse_hostport("upstream.example:53", what="--to", resolve=True)
    assert "cannot resolve host 'upstream.example'" in str(e.value)
    assert "Name or service not known" in str(e.value)
    assert calls == ["upstream.example"]


def test_resolve_takes_first_result(monkeypatch):
    def fake_getaddrinfo(host, port, *a, **kw):
        return [(socket.AF_INET6, socket.SOCK_DGRAM, 17, "", ("2001:db8::5", port, 0, 0)),
                (socket.AF_INET, socket.SOCK_DGRAM, 17, "", ("192.0.2.5", port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    assert parse_hostport("svc.example:53", resolve=True) == ("2001:db8::5", 53)


@pytest.mark.parametrize("addr, text", [
    (("1.2.3.4", 53), "1.2.3.4:53"),
    (("2001:db8::1", 53), "[2001:db8::1]:53"),
    (("::", 0), "[::]:0"),
])
def test_format_hostport(addr, text):
    assert format_hostport(addr) == text


def test_format_hostport_errors():
    with pytest.raises(TypeError):
        format_hostport("1.2.3.4:5")
    with pytest.raises(ValueError, match="port out of range"):
        format_hostport(("1.2.3.4", 70000))
    with pytest.raises(TypeError, match="port must be an integer"):
        format_hostport(("1.2.3.4", True))


def test_family_and_is_v6():
    assert family_of("192.0.2.1") == socket.AF_INET
    assert family_of("2001:db8::1") == socket.AF_INET6
    assert is_v6("::") and not is_v6("0.0.0.0")
    with pytest.raises(ValueError, match="not an IPv4 or IPv6 address"):
        family_of("example.com")
    with pytest.raises(ValueError):
        is_v6("[::1]")
    assert parse_ip("2001:0db8::0001") == "2001:db8::1"


@pytest.mark.parametrize("text, net", [
    ("198.51.100.0/24", "198.51.100.0/24"),
    ("198.51.100.7/24", "198.51.100.0/24"),       # host bits cleared
    ("2001:db8::/32", "2001:db8::/32"),
    ("192.0.2.1", "192.0.2.1/32"),
    ("2001:db8::1", "2001:db8::1/128"),
    ("0.0.0.0/0", "0.0.0.0/0"),
])
def test_parse_cidr(text, net):
    assert parse_cidr(text) == ipaddress.ip_network(net)


@pytest.mark.parametrize("text, reason", [
    ("", "empty"),
    ("198.51.100.0/33", "prefix length out of range 0-32: 33"),
    ("2001:db8::/129", "prefix length out of range 0-128: 129"),
    ("198.51.100.0/x", "prefix length is not a number: 'x'"),
    ("198.51.100.0/-1", "prefix length is not a number"),
    ("example.com/24", "not an IPv4 or IPv6 address: 'example.com'"),
    ("fe80::%eth0/64", "zone indexes"),
])
def test_parse_cidr_errors(text, reason):
    with pytest.raises(ValueError) as e:
        parse_cidr(text)
    assert reason in str(e.value)
    assert repr(text) in str(e.value)


def test_parse_upstream_kinds():
    assert parse_upstream("direct") == Upstream("direct")
    assert parse_upstream("DIRECT").kind == "direct"
    assert parse_upstream("tunnel://203.0.113.10:8443") == Upstream("tunnel", "203.0.113.10", 8443)
    assert parse_upstream("tunnel://[2001:db8::1]:8443") == Upstream("tunnel", "2001:db8::1", 8443)
    assert parse_upstream("socks5://127.0.0.1:1080") == Upstream("socks5", "127.0.0.1", 1080)
    u = parse_upstream("socks5://al%20ice:p%40ss%3Aw0rd@[::1]:1080")
    assert u == Upstream("socks5", "::1", 1080, "al ice", "p@ss:w0rd")
    assert u.address == ("::1", 1080)
    # A raw '@' in the password: the last '@' separates the host.
    assert parse_upstream("socks5://u:p@ss@127.0.0.1:1").password == "p@ss"
    assert parse_upstream("SOCKS5://127.0.0.1:1").kind == "socks5"
    assert parse_upstream("gost://203.0.113.10:8443") == Upstream("gost", "203.0.113.10", 8443)
    g = parse_upstream("GOST://al%20ice:p%40ss@[2001:db8::1]:8443")
    assert g == Upstream("gost", "2001:db8::1", 8443, "al ice", "p@ss")


def test_gost_upstream_never_shows_the_password():
    u = parse_upstream("gost://alice:hunter2@127.0.0.1:8443")
    assert "hunter2" not in repr(u) and "hunter2" not in str(u)
    assert str(u) == "gost://alice:***@127.0.0.1:8443"
    for bad in ("gost://alice:hunter2@127.0.0.1:0", "gost://alice:hunter2@127.0.0.1",
                "gost://alice:hunter2@example.com:1", "gost://alice:hunter2@1.2.3.4:5/x"):
        with pytest.raises(ValueError) as e:
            parse_upstream(bad)
        assert "hunter2" not in str(e.value)


def test_upstream_never_shows_the_password():
    u = parse_upstream("socks5://alice:hunter2@127.0.0.1:1080")
    assert "hunter2" not in repr(u) and "hunter2" not in str(u)
    assert str(u) == "socks5://alice:***@127.0.0.1:1080"
    with pytest.raises(ValueError) as e:
        parse_upstream("socks5://alice:hunter2@127.0.0.1:99999")
    assert "hunter2" not in str(e.value)


@pytest.mark.parametrize("text, reason", [
    ("http://1.2.3.4:80", "unknown scheme 'http' (known: direct, socks5://, tunnel://, gost://)"),
    ("proxy", "unknown scheme 'proxy'"),
    ("socks5:/1.2.3.4:5", "unknown scheme"),
    ("socks5://", "missing HOST:PORT"),
    ("socks5://1.2.3.4", "missing port"),
    ("socks5://1.2.3.4:5/path", "unexpected '/path' after the address"),
    ("socks5://1.2.3.4:5?x=1", "unknown query key 'x' (known: bind, source)"),
    ("tunnel://1.2.3.4:5?bind=", "bind= needs a value"),
    ("tunnel://1.2.3.4:5?source=192.0.2.1,192.0.2.2", "two IPv4 addresses"),
    ("tunnel://1.2.3.4:5?source=0.0.0.0", "one unicast address"),
    ("tunnel://1.2.3.4:5?bind=a&bind=b", "bind= given twice"),
    ("socks5://user@1.2.3.4:5", "user without password"),
    ("socks5://:pw@1.2.3.4:5", "user must be 1-255 bytes"),
    ("socks5://u:@1.2.3.4:5", "password must be 1-255 bytes"),
    ("socks5://" + "u" * 256 + ":p@1.2.3.4:5", "user must be 1-255 bytes (RFC 1929), got 256"),
    ("socks5://u:%ff@1.2.3.4:5", "not valid UTF-8"),
    ("tunnel://u:p@1.2.3.4:5", "credentials are only for socks5:// and gost://"),
    ("gost://user@1.2.3.4:5", "user without password"),
    ("gost://u:@1.2.3.4:5", "password must be 1-255 bytes"),
    ("gost://1.2.3.4:5?x=1", "unknown query key 'x'"),
    ("tunnel://1.2.3.4:0", "port out of range"),
    ("tunnel://2001:db8::1:5", "must be in brackets"),
    ("tunnel://example.com:5", "host names are not accepted here"),
])
def test_parse_upstream_errors(text, reason):
    with pytest.raises(ValueError) as e:
        parse_upstream(text)
    assert reason in str(e.value)


def test_parse_upstream_resolves_when_asked():
    u = parse_upstream("tunnel://localhost:8443", resolve=True)
    assert ipaddress.ip_address(u.host).is_loopback and u.port == 8443


def test_upstream_is_frozen_and_hashable():
    u = parse_upstream("tunnel://127.0.0.1:1")
    with pytest.raises(Exception):
        u.port = 2
    assert len({u, parse_upstream("tunnel://127.0.0.1:1")}) == 1


ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(1, 65535)


@settings(max_examples=examples(300), deadline=None)
@given(host=st.one_of(ipv4, ipv6), port=ports)
def test_format_then_parse_roundtrip(host, port):
    canonical = str(ipaddress.ip_address(host))
    assert parse_hostport(format_hostport((host, port))) == (canonical, port)


@settings(max_examples=examples(500), deadline=None)
@given(st.text(max_size=60))
def test_random_text_raises_only_valueerror(text):
    for fn in (parse_hostport, parse_cidr, parse_upstream):
        try:
            fn(text)
        except ValueError:
            pass
