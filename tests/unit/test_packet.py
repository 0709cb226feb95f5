"""Packet API: inet_checksum, checksum_update, build_udp(_into), parse_udp,
build_icmp_unreachable (the port unreachable errors of `redir --reject`).

Every test runs against the compiled extension (relay.packet._fast) and the pure-Python
fallback (relay.packet.pure.fast); packets are cross-checked with scapy and with a naive
reference checksum written here, and the two implementations are compared with each
other byte for byte (results and error messages) on random input.
"""
import array
import ipaddress
import random
import socket
import struct

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from scapy.all import (
    ICMP, IP, UDP, TCP, IPv6, ICMPv6DestUnreach, IPerror, IPerror6, UDPerror, ICMPv6EchoRequest, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop, IPv6ExtHdrRouting, IPv6ExtHdrSegmentRouting, IPOption_NOP,
    IPOption_RR, IPOption_Router_Alert, IPOption_Timestamp, PadN, Raw, RouterAlert, raw,
)

from scapy.layers.inet6 import in6_chksum
from scapy.utils import checksum

import relay
import relay.packet
from relay.errors import PacketTooBig
from relay.packet.pure import fast as pure
from tests.support import examples

try:
    from relay.packet import _fast as native
    NATIVE_MISSING = None
except ImportError as exc:  # extension not built
    native = None
    NATIVE_MISSING = f"relay.packet._fast extension is not built ({exc})"

SETTINGS = settings(max_examples=examples(250), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ = settings(max_examples=examples(500), deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", params=["native", "pure"])
def m(request):
    """The implementation under test."""
    if request.param == "native":
        if native is None:
            pytest.skip(NATIVE_MISSING)
        return native
    return pure


needs_native = pytest.mark.skipif(native is None, reason=NATIVE_MISSING or "")


# -- helpers ------------------------------------------------------------------------------

def ref_checksum(data):
    """RFC 1071 the slow, obvious way: 16-bit big-endian words, end-around carry."""
    data = bytes(data)
    if len(data) % 2:
        data += b"\0"
    s = 0
    for i in range(0, len(data), 2):
        s += (data[i] << 8) | data[i + 1]
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def rand_bytes(n, seed):
    return random.Random(seed).randbytes(n)


def reason_of(exc):
    return str(exc).split(":", 1)[0]


v4_addrs = st.ip_addresses(v=4).map(str)
v6_addrs = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@st.composite
def payloads(draw, limit):
    """Mostly small payloads, sometimes large, sometimes exactly the maximum."""
    n = draw(st.one_of(st.integers(0, 64), st.integers(0, 2000), st.integers(0, limit),
                       st.sampled_from([limit, limit - 1])))
    return rand_bytes(n, draw(st.integers(0, 2**32)))


@st.composite
def udp_specs(draw):
    """(src, dst, payload, options) for build_udp, IPv4 or IPv6."""
    v6 = draw(st.booleans())
    addrs = v6_addrs if v6 else v4_addrs
    src = (draw(addrs), draw(ports))
    dst = (draw(addrs), draw(ports))
    payload = draw(payloads(pure.MAX_IPV6_PAYLOAD if v6 else pure.MAX_IPV4_PAYLOAD))
    opts = {"ttl": draw(st.integers(0, 255)), "tos": draw(st.integers(0, 255))}
    if v6:
        opts["flowlabel"] = draw(st.integers(0, 0xFFFFF))
    else:
        opts["ident"] = draw(st.integers(0, 0xFFFF))
        opts["df"] = draw(st.booleans())
    return src, dst, payload, opts


# -- constants and the shared reason table ------------------------------------------------

def test_constants(m):
    assert m.MAX_IPV4_PAYLOAD == 65507
    assert m.MAX_IPV6_PAYLOAD == 65527


@needs_native
def test_reason_table_is_shared():
    assert native.PARSE_REASONS is pure.PARSE_REASONS
    for name in ("TRUNCATED", "FRAGMENTED", "NOT_UDP", "BAD_IPV4_CHECKSUM", "BAD_UDP_CHECKSUM",
                 "BAD_UDP_LENGTH", "BAD_VERSION", "BAD_IHL", "BAD_TOTAL_LENGTH",
                 "BAD_IPV6_PAYLOAD_LENGTH", "BAD_ROUTING_HEADER"):
        assert getattr(native, name) == getattr(pure, name)
        assert getattr(pure, name) in pure.PARSE_REASONS
    codes = [v for k, v in vars(pure).items() if k.startswith("E_")]
    assert sorted(codes) == sorted(pure._ERRORS)


# -- inet_checksum ------------------------------------------------------------------------

def test_checksum_rfc1071_example(m):
    # RFC 1071 section 3: the words 0001 f203 f4f5 f6f7 sum to 0xddf2
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert m.inet_checksum(data) == ~0xDDF2 & 0xFFFF == 0x220D
    assert m.inet_checksum(data + (0x220D).to_bytes(2, "big")) == 0


def test_checksum_captured_ipv4_header(m):
    # a captured IPv4 header (192.168.0.1 -> 192.168.0.199, UDP) with checksum 0xb861
    hdr = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert m.inet_checksum(hdr) == 0xB861
    hdr = hdr[:10] + b"\xb8\x61" + hdr[12:]
    assert m.inet_checksum(hdr) == 0


def test_checksum_edges(m):
    assert m.inet_checksum(b"") == 0xFFFF
    assert m.inet_checksum(b"\x01") == 0xFEFF          # odd byte is the high byte
    assert m.inet_checksum(b"\xff\xff") == 0
    assert m.inet_checksum(b"\0" * 7) == 0xFFFF
    assert m.inet_checksum(b"\xff" * 65536) == 0
    big = rand_bytes(65535, 7)
    assert m.inet_checksum(big) == ref_checksum(big)


def test_checksum_buffer_types(m):
    data = rand_bytes(101, 1)
    want = ref_checksum(data)
    assert m.inet_checksum(bytearray(data)) == want
    assert m.inet_checksum(memoryview(data)) == want
    assert m.inet_checksum(memoryview(bytearray(data)).toreadonly()) == want
    words = array.array("H", [0x0100, 0x02F3])            # native-order words: just bytes
    assert m.inet_checksum(words) == ref_checksum(words.tobytes())
    grid = memoryview(bytearray(data[:100])).cast("B", (10, 10))
    assert m.inet_checksum(grid) == ref_checksum(data[:100])


@pytest.mark.parametrize("bad, exc", [("abc", TypeError), (12, TypeError), (None, TypeError),
                                      (memoryview(b"abcdef")[::2], ValueError)])
def test_checksum_bad_input(m, bad, exc):
    with pytest.raises(exc, match="buf"):
        m.inet_checksum(bad)


@SETTINGS
@given(data=st.binary(max_size=300), big=st.integers(0, 9000), seed=st.integers(0, 2**32))
def test_checksum_random_buffers_every_alignment(m, data, big, seed):
    buf = bytearray(data + rand_bytes(big if seed % 4 == 0 else 0, seed) + b"\0" * 8)
    mv = memoryview(buf)
    for off in range(8):
        piece = mv[off:len(buf) - 8 + (seed + off) % 8]
        assert m.inet_checksum(piece) == ref_checksum(piece)
        if native is not None:
            assert native.inet_checksum(piece) == pure.inet_checksum(piece)


# -- checksum_update ----------------------------------------------------------------------

def test_update_known(m):
    data = bytearray(bytes.fromhex("0001f203f4f5f6f7"))
    c = m.inet_checksum(data)
    data[2:4] = b"\x12\x34"
    assert m.checksum_update(c, 0xF203, 0x1234) == m.inet_checksum(data)
    data[4:8] = b"\xde\xad\xbe\xef"
    c2 = m.checksum_update(m.inet_checksum(bytes.fromhex("00011234f4f5f6f7")), 0xF4F5F6F7, 0xDEADBEEF)
    assert c2 == m.inet_checksum(data)
    old, new = bytes(data[0:4]), b"\x00\x00\x00\x00"
    c3 = m.checksum_update(m.inet_checksum(data), old, new)
    data[0:4] = new
    assert c3 == m.inet_checksum(data)


@pytest.mark.parametrize("args, exc, text", [
    ((0x10000, 1, 2), ValueError, "csum"),
    ((-1, 1, 2), ValueError, "csum"),
    ((1, -1, 2), ValueError, "old"),
    ((1, 1, 1 << 32), ValueError, "new"),
    ((1, 1.0, 2.0), TypeError, "csum|old"),
    (("1", 1, 2), TypeError, "csum"),
    ((1, 1, b"ab"), TypeError, "both"),
    ((1, b"abc", b"abd"), ValueError, "even"),
    ((1, b"ab", b"abcd"), ValueError, "length"),
    ((1, "ab", "cd"), TypeError, "old"),
])
def test_update_bad_input(m, args, exc, text):
    with pytest.raises(exc, match=text):
        m.checksum_update(*args)


def _udp_csum(pkt, v6):
    off = 46 if v6 else 26
    return struct.unpack_from("!H", pkt, off)[0]


@SETTINGS
@given(spec=udp_specs(), new_port=ports, new_addr=st.data())
def test_update_equals_recomputation(m, spec, new_port, new_addr):
    src, dst, payload, opts = spec
    v6 = ":" in src[0]
    pkt = m.build_udp(src, dst, payload, **opts)
    # a new source port: update the UDP checksum incrementally
    c = m.checksum_update(_udp_csum(pkt, v6), src[1], new_port) or 0xFFFF
    want = m.build_udp((src[0], new_port), dst, payload, **opts)
    assert c == _udp_csum(want, v6)
    # a new destination address: UDP checksum (pseudo-header) and IPv4 header checksum
    addr = new_addr.draw(v6_addrs if v6 else v4_addrs)
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    old_ip, new_ip = socket.inet_pton(fam, dst[0]), socket.inet_pton(fam, addr)
    want = m.build_udp(src, (addr, dst[1]), payload, **opts)
    if v6:
        c = m.checksum_update(_udp_csum(pkt, v6), old_ip, new_ip) or 0xFFFF
    else:
        o, n = int.from_bytes(old_ip, "big"), int.from_bytes(new_ip, "big")
        c = m.checksum_update(_udp_csum(pkt, v6), o, n) or 0xFFFF
        ipc = m.checksum_update(struct.unpack_from("!H", pkt, 10)[0], o, n)
        assert ipc == struct.unpack_from("!H", want, 10)[0]
    assert c == _udp_csum(want, v6)
    if native is not None:
        args = (_udp_csum(pkt, v6), old_ip, new_ip)
        assert native.checksum_update(*args) == pure.checksum_update(*args)


# -- build_udp ----------------------------------------------------------------------------

def check_with_scapy(pkt, src, dst, payload, opts):
    """scapy parses pkt with the same fields, and its recomputed checksums equal ours."""
    v6 = ":" in src[0]
    if v6:
        s = IPv6(pkt)
        assert (s.version, s.tc, s.fl, s.plen, s.nh, s.hlim) == (
            6, opts.get("tos", 0), opts.get("flowlabel", 0), 8 + len(payload), 17, opts.get("ttl", 64))
        assert ipaddress.ip_address(s.src) == ipaddress.ip_address(src[0])
        assert ipaddress.ip_address(s.dst) == ipaddress.ip_address(dst[0])
    else:
        s = IP(pkt)
        assert (s.version, s.ihl, s.tos, s.len, s.id, s.frag, s.ttl, s.proto) == (
            4, 5, opts.get("tos", 0), 28 + len(payload), opts.get("ident", 0), 0, opts.get("ttl", 64), 17)
        assert s.flags == ("DF" if opts.get("df", True) else 0)
        assert (s.src, s.dst) == (src[0], dst[0])
    u = s[UDP]
    assert (u.sport, u.dport, u.len) == (src[1], dst[1], 8 + len(payload))
    assert bytes(u.payload) == payload
    assert u.chksum != 0
    # scapy recomputes both checksums
    del u.chksum
    if not v6:
        del s.chksum
    assert raw(s) == pkt


def test_build_known_ipv4(m):
    pkt = m.build_udp(("192.0.2.1", 1234), ("198.51.100.7", 53), b"hello", ttl=17, ident=0x1234)
    hdr = bytes.fromhex("45000021" "12344000" "1111" "0000" "c0000201" "c6336407")
    assert pkt[:10] == hdr[:10] and pkt[12:20] == hdr[12:]
    assert pkt[10:12] == ref_checksum(hdr).to_bytes(2, "big")
    pseudo = hdr[12:20] + bytes.fromhex("0011" "000d")
    udp = bytes.fromhex("04d2" "0035" "000d" "0000") + b"hello"
    assert pkt[20:] == udp[:6] + ref_checksum(pseudo + udp).to_bytes(2, "big") + b"hello"


@pytest.mark.parametrize("src, dst, payload, opts", [
    (("192.0.2.1", 1), ("192.0.2.2", 2), b"", {}),
    (("10.1.2.3", 65535), ("255.255.255.255", 0), b"odd", {"df": False, "tos": 0xB8, "ttl": 0}),
    (("0.0.0.0", 68), ("255.255.255.255", 67), rand_bytes(1473, 3), {"ident": 0xFFFF, "ttl": 255}),
    (("2001:db8::1", 5353), ("ff02::fb", 5353), b"mdns", {"flowlabel": 0xFFFFF, "tos": 255}),
    (("::ffff:192.0.2.1", 1), ("::ffff:192.0.2.2", 2), b"mapped", {}),
    (("::", 0), ("::1", 65535), b"", {"ttl": 1}),
    (("fe80::1", 9), ("2001:db8::2", 9), rand_bytes(65527, 4), {}),
    (("192.0.2.1", 9), ("192.0.2.2", 9), rand_bytes(65507, 5), {}),
])
def test_build_matches_scapy(m, src, dst, payload, opts):
    pkt = m.build_udp(src, dst, payload, **opts)
    check_with_scapy(pkt, src, dst, payload, opts)
    assert m.parse_udp(pkt) == ((_canonical(src[0]), src[1]), (_canonical(dst[0]), dst[1]), payload)


def _canonical(host):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.inet_ntop(fam, socket.inet_pton(fam, host))


def test_build_zero_checksum_goes_out_as_ffff(m):
    # choose the last two payload bytes so that the computed UDP checksum is 0
    for src, dst in ((("192.0.2.1", 1000), ("192.0.2.2", 2000)),
                     (("2001:db8::1", 1000), ("2001:db8::2", 2000))):
        v6 = ":" in src[0]
        base = m.build_udp(src, dst, b"abcd\0\0")
        c = _udp_csum(base, v6)          # the sum with a zero word, complemented
        pkt = m.build_udp(src, dst, b"abcd" + c.to_bytes(2, "big"))
        assert _udp_csum(pkt, v6) == 0xFFFF
        assert m.parse_udp(pkt)[2] == b"abcd" + c.to_bytes(2, "big")
        s = (IPv6 if v6 else IP)(pkt)
        del s[UDP].chksum
        assert raw(s) == pkt                     # scapy maps 0 to 0xffff too


def test_build_payload_types(m):
    src, dst = ("192.0.2.1", 1), ("192.0.2.2", 2)
    want = m.build_udp(src, dst, b"abcdef")
    assert m.build_udp(src, dst, bytearray(b"abcdef")) == want
    assert m.build_udp(src, dst, memoryview(b"xxabcdefxx")[2:8]) == want
    assert m.build_udp(src, dst, array.array("B", b"abcdef")) == want
    assert m.build_udp((b"192.0.2.1", 1), dst, b"abcdef") == want
    assert m.build_udp(("2001:db8::1", 1, 0, 0), ("2001:db8::2", 2, 7, 0), b"") == \
        m.build_udp(("2001:db8::1", 1), ("2001:db8::2", 2), b"")


@pytest.mark.parametrize("src, dst, payload, opts, exc, text", [
    (("192.0.2.1", 1), ("2001:db8::1", 2), b"", {}, ValueError, "families"),
    (("::ffff:192.0.2.1", 1), ("192.0.2.1", 2), b"", {}, ValueError, "families"),
    (("192.0.2.1", 1), ("192.0.2.1", 65536), b"", {}, ValueError, "dst port"),
    (("192.0.2.1", -1), ("192.0.2.1", 2), b"", {}, ValueError, "src port"),
    (("192.0.2.1", 1 << 70), ("192.0.2.1", 2), b"", {}, ValueError, "src port"),
    (("192.0.2.1", "1"), ("192.0.2.1", 2), b"", {}, TypeError, "src port"),
    (("192.0.2.1", 1.5), ("192.0.2.1", 2), b"", {}, TypeError, "src port"),
    (("example.com", 1), ("192.0.2.1", 2), b"", {}, ValueError, "src host"),
    (("192.0.2.1\0", 1), ("192.0.2.1", 2), b"", {}, ValueError, "src host"),
    (("192.0.2.256", 1), ("192.0.2.1", 2), b"", {}, ValueError, "src host"),
    (("fe80::1%lo", 1), ("fe80::2", 2), b"", {}, ValueError, "src host"),
    (("\u0661.2.3.4", 1), ("192.0.2.1", 2), b"", {}, ValueError, "src host"),
    (("\ud800", 1), ("192.0.2.1", 2), b"", {}, ValueError, "src host"),
    ((None, 1), ("192.0.2.1", 2), b"", {}, TypeError, "src host"),
    ("192.0.2.1:1", ("192.0.2.1", 2), b"", {}, TypeError, "src"),
    (["192.0.2.1", 1], ("192.0.2.1", 2), b"", {}, TypeError, "src"),
    (("192.0.2.1",), ("192.0.2.1", 2), b"", {}, TypeError, "src"),
    (("192.0.2.1", 1), ("192.0.2.1", 2), "text", {}, TypeError, "payload"),
    (("192.0.2.1", 1), ("192.0.2.1", 2), None, {}, TypeError, "payload"),
    (("192.0.2.1", 1), ("192.0.2.1", 2), memoryview(b"abcd")[::2], {}, ValueError, "payload"),
    (("192.0.2.1", 1), ("192.0.2.1", 2), b"", {"ttl": 256}, ValueError, "ttl"),
    (("192.0.2.1", 1), ("192.0.2.1", 2), b"", {"ttl": -1}, ValueError, "ttl"),
    (("192.0.2.1", 1), ("192.0.2.1", 2), b"", {"ttl": "64"}, TypeError, "ttl"),
    (("192.0.2.1", 1), ("192.0.2.1", 2), b"", {"tos": 1 << 64}, ValueError, "tos"),
    (("192.0.2.1", 1), ("192.0.2.1", 2), b"", {"ident": 0x10000}, ValueError, "ident"),
    (("::1", 1), ("::1", 2), b"", {"flowlabel": 0x100000}, ValueError, "flowlabel"),
    (("::1", 1), ("::1", 2), b"", {"flowlabel": None}, TypeError, "flowlabel"),
])
def test_build_bad_input(m, src, dst, payload, opts, exc, text):
    with pytest.raises(exc, match=text) as info:
        m.build_udp(src, dst, payload, **opts)
    if native is not None:      # both implementations say the same
        other = native if m is pure else pure
        with pytest.raises(exc) as info2:
            other.build_udp(src, dst, payload, **opts)
        assert str(info.value) == str(info2.value)


def test_build_unknown_keyword(m):
    with pytest.raises(TypeError):
        m.build_udp(("::1", 1), ("::1", 2), b"", hops=3)


@pytest.mark.parametrize("v6, limit", [(False, 65507), (True, 65527)])
def test_build_too_big(m, v6, limit):
    src, dst = (("::1", 1), ("::1", 2)) if v6 else (("127.0.0.1", 1), ("127.0.0.1", 2))
    assert len(m.build_udp(src, dst, bytes(limit))) == limit + (48 if v6 else 28)
    with pytest.raises(PacketTooBig, match=str(limit)) as info:
        m.build_udp(src, dst, bytes(limit + 1))
    assert isinstance(info.value, ValueError)
    assert info.value.size == limit + 1 + (48 if v6 else 28)
    assert info.value.limit == ("IPv6 maximum" if v6 else "IPv4 maximum")


# -- build_udp_into -----------------------------------------------------------------------

@pytest.mark.parametrize("offset", [0, 1, 7, 100])
def test_build_into_matches_build(m, offset):
    for src, dst in ((("192.0.2.1", 1), ("192.0.2.2", 2)), (("2001:db8::1", 1), ("2001:db8::2", 2))):
        payload = rand_bytes(333, offset)
        want = m.build_udp(src, dst, payload, ttl=9)
        buf = bytearray(b"\xaa" * (offset + len(want) + 5))
        assert m.build_udp_into(buf, offset, src, dst, payload, ttl=9) == len(want)
        assert buf[offset:offset + len(want)] == want
        assert buf[:offset] == b"\xaa" * offset and buf[offset + len(want):] == b"\xaa" * 5


def test_build_into_payload_in_place(m):
    # the payload already sits after room for the headers (and overlapping variants)
    for hdr, src, dst in ((28, ("192.0.2.1", 1), ("192.0.2.2", 2)),
                          (48, ("2001:db8::1", 1), ("2001:db8::2", 2))):
        payload = rand_bytes(1000, hdr)
        want = m.build_udp(src, dst, payload)
        for where in (hdr, 0, 5, hdr + 3):
            buf = bytearray(2000)
            buf[where:where + 1000] = payload
            n = m.build_udp_into(buf, 0, src, dst, memoryview(buf)[where:where + 1000])
            assert bytes(buf[:n]) == want


def test_build_into_array_and_memoryview(m):
    src, dst = ("192.0.2.1", 1), ("192.0.2.2", 2)
    want = m.build_udp(src, dst, b"xyz")
    arr = array.array("I", bytes(64))
    assert m.build_udp_into(arr, 4, src, dst, b"xyz") == len(want)
    assert arr.tobytes()[4:4 + len(want)] == want
    buf = bytearray(64)
    assert m.build_udp_into(memoryview(buf)[10:], 2, src, dst, b"xyz") == len(want)
    assert buf[12:12 + len(want)] == want


def test_build_into_errors(m):
    src, dst = ("192.0.2.1", 1), ("192.0.2.2", 2)
    with pytest.raises(ValueError, match="needs 38 bytes") as info:
        m.build_udp_into(bytearray(40), 5, src, dst, b"0123456789")
    assert "35" in str(info.value)
    m.build_udp_into(bytearray(43), 5, src, dst, b"0123456789")   # exactly fits
    with pytest.raises(ValueError, match="needs 58 bytes at offset 3"):
        m.build_udp_into(bytearray(60), 3, ("::1", 1), ("::2", 2), b"0123456789")
    with pytest.raises(ValueError, match="needs 28 bytes"):
        m.build_udp_into(bytearray(10), 1 << 70, src, dst, b"")
    with pytest.raises(ValueError, match="offset"):
        m.build_udp_into(bytearray(100), -1, src, dst, b"")
    with pytest.raises(TypeError, match="offset"):
        m.build_udp_into(bytearray(100), 1.0, src, dst, b"")
    with pytest.raises(TypeError, match="writable"):
        m.build_udp_into(bytes(100), 0, src, dst, b"")
    with pytest.raises(TypeError, match="writable"):
        m.build_udp_into(memoryview(bytearray(100)).toreadonly(), 0, src, dst, b"")
    with pytest.raises(TypeError, match="buffer"):
        m.build_udp_into([0] * 100, 0, src, dst, b"")
    with pytest.raises(ValueError, match="ttl"):
        m.build_udp_into(bytearray(100), 0, src, dst, b"", ttl=300)
    with pytest.raises(PacketTooBig):
        m.build_udp_into(bytearray(70000), 0, src, dst, bytes(65508))


# -- round trips and C == pure ------------------------------------------------------------

@SETTINGS
@given(spec=udp_specs())
@example(spec=(("1.2.3.4", 1), ("5.6.7.8", 2), bytes(65507), {}))
@example(spec=(("::1", 1), ("::2", 2), bytes(65527), {"flowlabel": 1}))
def test_roundtrip(m, spec):
    src, dst, payload, opts = spec
    pkt = m.build_udp(src, dst, payload, **opts)
    (shost, sport), (dhost, dport), data = m.parse_udp(pkt)
    assert ipaddress.ip_address(shost) == ipaddress.ip_address(src[0])
    assert ipaddress.ip_address(dhost) == ipaddress.ip_address(dst[0])
    assert (sport, dport, data) == (src[1], dst[1], payload)
    assert ref_checksum(pkt[:20]) == 0 or ":" in src[0]
    # trailing bytes after the packet (e.g. link-layer padding) are ignored
    assert m.parse_udp(pkt + b"\0" * 6)[2] == payload
    if native is not None:
        assert native.build_udp(src, dst, payload, **opts) == pure.build_udp(src, dst, payload, **opts)


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=udp_specs())
def test_build_scapy_crosscheck(m, spec):
    src, dst, payload, opts = spec
    assume(len(payload) <= 4000)          # scapy is slow; sizes up to the max are covered above
    check_with_scapy(m.build_udp(src, dst, payload, **opts), src, dst, payload, opts)


# -- parse_udp against what scapy builds --------------------------------------------------

SCAPY_GOOD = [
    IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=1, dport=2) / b"plain",
    IP(src="192.0.2.1", dst="192.0.2.2", options=[IPOption_Router_Alert(), IPOption_NOP(),
                                                    IPOption_RR()]) / UDP(sport=3, dport=4) / b"options",
    IP(src="192.0.2.1", dst="192.0.2.2", options=[IPOption_Timestamp()]) / UDP(sport=3, dport=4) / b"ts",
    IP(src="192.0.2.1", dst="192.0.2.2", flags=0, id=77) / UDP(sport=5, dport=6) / b"no df",
    IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=5, dport=6, chksum=0) / b"no checksum",
    IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=5, dport=6),
    IPv6(src="2001:db8::1", dst="2001:db8::2") / UDP(sport=7, dport=8) / b"plain6",
    IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrHopByHop(options=[RouterAlert()]) /
    UDP(sport=7, dport=8) / b"hop-by-hop",
    IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt(
        options=[PadN(optdata=b"\0" * 10)]) / UDP(sport=9, dport=10) / b"hbh+dst",
    IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrDestOpt() / UDP(sport=9, dport=10) / b"d",
    IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrRouting(
        addresses=["2001:db8::3", "2001:db8::4"], segleft=2) / UDP(sport=11, dport=12) / b"rt0",
    IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrRouting(
        addresses=["2001:db8::3"], segleft=0) / UDP(sport=11, dport=12) / b"rt done",
    IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrSegmentRouting(
        addresses=["2001:db8::5", "2001:db8::6"], segleft=1) / UDP(sport=13, dport=14) / b"srh",
]


def _final_dst(pkt):
    if IPv6ExtHdrRouting in pkt and pkt[IPv6ExtHdrRouting].segleft:
        return pkt[IPv6ExtHdrRouting].addresses[-1]
    if IPv6ExtHdrSegmentRouting in pkt and pkt[IPv6ExtHdrSegmentRouting].segleft:
        return pkt[IPv6ExtHdrSegmentRouting].addresses[0]
    return pkt.dst


@pytest.mark.parametrize("pkt", SCAPY_GOOD, ids=lambda p: p.summary())
def test_parse_accepts_scapy(m, pkt):
    data = raw(pkt)
    s = pkt.__class__(data)
    assert m.parse_udp(data) == ((s.src, s[UDP].sport), (_final_dst(s), s[UDP].dport),
                                 bytes(s[UDP].payload))
    assert m.parse_udp(bytearray(data) + b"\xff\xff")[2] == bytes(s[UDP].payload)


def _v6(*layers, **kw):
    p = IPv6(src="2001:db8::1", dst="2001:db8::2", **kw)
    for layer in layers:
        p = p / layer
    return p


def _corrupt_udp_checksum(pkt):
    b = bytearray(raw(pkt))
    off = len(b) - len(pkt[UDP])
    b[off + 6] ^= 0x01
    return bytes(b)


V4 = dict(src="192.0.2.1", dst="192.0.2.2")
SCAPY_BAD = [
    ("bad v4 header checksum", raw(IP(chksum=0x1234, **V4) / UDP() / b"x"), pure.BAD_IPV4_CHECKSUM),
    ("bad v4 udp checksum", raw(IP(**V4) / UDP(chksum=0x1234) / b"x"), pure.BAD_UDP_CHECKSUM),
    ("flipped v4 udp checksum", _corrupt_udp_checksum(IP(**V4) / UDP() / b"xy"), pure.BAD_UDP_CHECKSUM),
    ("flipped payload", raw(IP(**V4) / UDP() / b"xy")[:-1] + b"z", pure.BAD_UDP_CHECKSUM),
    ("bad v6 udp checksum", _corrupt_udp_checksum(_v6(UDP(), b"x")), pure.BAD_UDP_CHECKSUM),
    ("zero v6 udp checksum", raw(_v6(UDP(chksum=0), b"x")), pure.BAD_UDP_CHECKSUM),
    ("udp len short", raw(IP(**V4) / UDP(len=9) / b"xyz"), pure.BAD_UDP_LENGTH),
    ("udp len long", raw(IP(**V4) / UDP(len=30) / b"xyz"), pure.BAD_UDP_LENGTH),
    ("v6 udp len", raw(_v6(UDP(len=7), b"xyz")), pure.BAD_UDP_LENGTH),
    ("ip len long", raw(IP(len=60, **V4) / UDP() / b"xyz"), pure.TRUNCATED),
    ("ip len below header", raw(IP(len=19, **V4) / UDP() / b"xyz"), pure.BAD_TOTAL_LENGTH),
    ("ip len leaves no udp header", raw(IP(len=24, **V4) / UDP() / b"xyz"), pure.TRUNCATED),
    ("ihl 4", raw(IP(ihl=4, **V4) / UDP() / b"xyz"), pure.BAD_IHL),
    ("ihl past the packet", raw(IP(ihl=15, **V4) / UDP()), pure.TRUNCATED),
    ("v6 plen long", raw(_v6(UDP(), b"xyz", plen=100)), pure.TRUNCATED),
    ("v6 plen zero", raw(_v6(UDP(), b"xyz", plen=0)), pure.BAD_IPV6_PAYLOAD_LENGTH),
    ("v4 MF", raw(IP(flags="MF", **V4) / UDP() / b"xyz"), pure.FRAGMENTED),
    ("v4 offset", raw(IP(frag=100, **V4) / UDP() / b"xyz"), pure.FRAGMENTED),
    ("v6 fragment", raw(_v6(IPv6ExtHdrFragment(m=1), UDP(), b"xyz")), pure.FRAGMENTED),
    ("v6 hbh then fragment", raw(_v6(IPv6ExtHdrHopByHop(), IPv6ExtHdrFragment(), UDP())), pure.FRAGMENTED),
    ("tcp", raw(IP(**V4) / TCP()), pure.NOT_UDP),
    ("v6 tcp", raw(_v6(TCP())), pure.NOT_UDP),
    ("icmpv6 after dest opts", raw(_v6(IPv6ExtHdrDestOpt(), ICMPv6EchoRequest())), pure.NOT_UDP),
    ("v6 no next header", raw(_v6(IPv6ExtHdrDestOpt(nh=59), Raw(b"\0" * 8))), pure.NOT_UDP),
    ("routing type 5 with segments left",
     raw(_v6(IPv6ExtHdrRouting(type=5, addresses=["::1"], segleft=1), UDP())), pure.BAD_ROUTING_HEADER),
    ("routing header checksum vs header dst",
     bytes.fromhex("6000000000202b40") + bytes(15) + b"\1" + bytes(15) + b"\2" +
     raw(IPv6ExtHdrRouting(nh=17, addresses=["::9"], segleft=1))[:24] +
     raw(IPv6(src="::1", dst="::2") / UDP())[40:], pure.BAD_UDP_CHECKSUM),
    ("extension header past payload", raw(_v6(IPv6ExtHdrDestOpt(len=5), UDP())), pure.TRUNCATED),
    ("version 5", bytes([0x55]) + raw(IP(**V4) / UDP())[1:], pure.BAD_VERSION),
    ("empty", b"", pure.TRUNCATED),
    ("19 bytes", raw(IP(**V4) / UDP())[:19], pure.TRUNCATED),
    ("v6 39 bytes", raw(_v6(UDP()))[:39], pure.TRUNCATED),
    ("v6 cut", raw(_v6(UDP(), b"abc"))[:-1], pure.TRUNCATED),
]


@pytest.mark.parametrize("name, data, reason", SCAPY_BAD, ids=[c[0] for c in SCAPY_BAD])
def test_parse_rejects(m, name, data, reason):
    with pytest.raises(ValueError) as info:
        m.parse_udp(data)
    assert reason_of(info.value) == reason, str(info.value)
    if native is not None:
        with pytest.raises(ValueError) as info2:
            (native if m is pure else pure).parse_udp(data)
        assert str(info2.value) == str(info.value)


def test_parse_checksum_message_names_expected_value(m):
    good = raw(IP(**V4) / UDP() / b"x")
    want = struct.unpack_from("!H", good, 26)[0]
    with pytest.raises(ValueError, match=f"0x1234, expected 0x{want:04x}"):
        m.parse_udp(raw(IP(**V4) / UDP(chksum=0x1234) / b"x"))


@pytest.mark.parametrize("bad, exc", [("abc", TypeError), (None, TypeError), (5, TypeError),
                                      (memoryview(b"\x45" * 40)[::2], ValueError)])
def test_parse_bad_type(m, bad, exc):
    with pytest.raises(exc, match="packet"):
        m.parse_udp(bad)


# -- fuzz: only ValueError, and both implementations agree -------------------------------

def outcome(mod, data):
    try:
        return "ok", mod.parse_udp(data)
    except ValueError as e:
        assert reason_of(e) in pure.PARSE_REASONS, str(e)
        return "error", str(e)


def fix_v4_header_checksum(b):
    if len(b) >= 20 and b[0] >> 4 == 4:
        ihl = (b[0] & 15) * 4
        if 20 <= ihl <= len(b):
            b[10:12] = b"\0\0"
            b[10:12] = ref_checksum(b[:ihl]).to_bytes(2, "big")
    return b


@FUZZ
@given(data=st.one_of(
    st.binary(max_size=120),
    st.tuples(st.sampled_from([0x45, 0x46, 0x4F, 0x60, 0x40]), st.binary(min_size=19, max_size=120))
    .map(lambda t: bytes([t[0]]) + t[1])))
def test_fuzz_random_bytes(m, data):
    result = outcome(m, data)
    if native is not None:
        assert outcome(native, data) == outcome(pure, data)
    if result[0] == "ok":
        assert data[0] >> 4 in (4, 6)


GOOD_PACKETS = [raw(p) for p in SCAPY_GOOD] + [
    pure.build_udp(("192.0.2.1", 1), ("192.0.2.2", 2), b"payload!"),
    pure.build_udp(("2001:db8::1", 1), ("2001:db8::2", 2), b"payload6"),
]


@FUZZ
@given(base=st.sampled_from(GOOD_PACKETS),
       edits=st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4),
       cut=st.one_of(st.none(), st.integers(0, 200)),
       extra=st.binary(max_size=16), fix=st.booleans())
def test_fuzz_mutated_packets(m, base, edits, cut, extra, fix):
    b = bytearray(base)
    for pos, val in edits:
        if pos < len(b):
            b[pos] = val
    if cut is not None:
        del b[cut:]
    b += extra
    if fix:                              # let mutations get past the IPv4 header checksum
        fix_v4_header_checksum(b)
    data = bytes(b)
    result = outcome(m, data)
    if native is not None:
        assert outcome(native, data) == outcome(pure, data)
    if result[0] == "ok":                # whatever parses rebuilds to the same datagram
        (src, dst, payload) = result[1]
        assert isinstance(payload, bytes) and len(payload) <= len(data)


# -- build_icmp_unreachable ---------------------------------------------------------------
#
# scapy parses each error and recomputes every checksum, the quoted datagram is compared
# with what build_udp makes, the sizes stay within 576 (IPv4) and 1280 (IPv6) bytes, and
# both implementations give the same bytes.

CLIENT4, SERVER4 = ("192.0.2.2", 40000), ("198.51.100.2", 443)
CLIENT6, SERVER6 = ("2001:db8:1::2", 40000), ("2001:db8:2::2", 443)


def icmp_payload(n, seed=0):
    return bytes((i * 31 + seed) & 0xFF for i in range(n))


def recomputed(pkt):
    """pkt with every length and checksum computed by scapy. IPv4: rebuilt from its layers;
    IPv6: the ICMPv6 checksum by scapy's in6_chksum (a rebuild would take a quoted datagram
    for RFC 4884 extensions)."""
    if pkt[0] >> 4 == 4:
        p = IP(pkt)
        del p[IP].chksum, p[IP].len, p[ICMP].chksum
        return raw(p)
    p = IPv6(pkt)
    body = pkt[40:42] + bytes(2) + pkt[44:]
    csum = in6_chksum(58, p, body)
    return pkt[:4] + (len(pkt) - 40).to_bytes(2, "big") + pkt[6:42] + csum.to_bytes(2, "big") + \
        pkt[44:]


def test_icmp_scapy_checks_catch_a_bad_checksum():
    good = pure.build_icmp_unreachable(CLIENT6, SERVER6, b"abc")
    bad = good[:42] + bytes([good[42] ^ 1]) + good[43:]
    assert recomputed(good) == good and recomputed(bad) != bad
    good = pure.build_icmp_unreachable(CLIENT4, SERVER4, b"abc")
    bad = good[:22] + bytes([good[22] ^ 1]) + good[23:]
    assert recomputed(good) == good and recomputed(bad) != bad
    assert checksum(good[:20]) == 0 and checksum(good[28:48]) == 0


@pytest.mark.parametrize("size", [0, 1, 100, 519, 520, 521, 1472, 3000, 65507])
def test_icmp_ipv4_error_parses_with_valid_checksums_and_quotes_the_datagram(m, size):
    data = icmp_payload(size, size)
    pkt = m.build_icmp_unreachable(CLIENT4, SERVER4, data, ttl=61, ident=0x1234)
    assert len(pkt) == min(576, 20 + 8 + 28 + size)
    assert recomputed(pkt) == pkt                       # scapy computes the same checksums
    assert checksum(pkt[:20]) == 0 and checksum(pkt[28:48]) == 0    # both IP headers
    p = IP(pkt)
    assert (p.src, p.dst, p.proto, p.ttl, p.id, p.flags.value) == (SERVER4[0], CLIENT4[0], 1,
                                                                   61, 0x1234, 0)
    assert (p[ICMP].type, p[ICMP].code) == (3, 3)
    inner = p[IPerror]
    assert (inner.src, inner.dst, inner.proto, inner.len) == (CLIENT4[0], SERVER4[0], 17,
                                                              28 + size)
    assert (inner[UDPerror].sport, inner[UDPerror].dport, inner[UDPerror].len) == (
        CLIENT4[1], SERVER4[1], 8 + size)
    # the quoted datagram is the one build_udp makes (its UDP checksum over all the payload)
    original = m.build_udp(CLIENT4, SERVER4, data)
    assert pkt[28:] == original[:len(pkt) - 28]


@pytest.mark.parametrize("size", [0, 1, 100, 1183, 1184, 1185, 1452, 65527])
def test_icmp_ipv6_error_parses_with_valid_checksums_and_quotes_the_datagram(m, size):
    data = icmp_payload(size, size)
    pkt = m.build_icmp_unreachable(CLIENT6, SERVER6, data, ttl=63)
    assert len(pkt) == min(1280, 40 + 8 + 48 + size)
    assert recomputed(pkt) == pkt                       # ICMPv6 checksum with pseudo-header
    p = IPv6(pkt)
    assert (p.src, p.dst, p.nh, p.hlim, p.plen) == (SERVER6[0], CLIENT6[0], 58, 63, len(pkt) - 40)
    assert (p[ICMPv6DestUnreach].type, p[ICMPv6DestUnreach].code) == (1, 4)
    inner = p[IPerror6]
    assert (inner.src, inner.dst, inner.nh, inner.plen) == (CLIENT6[0], SERVER6[0], 17, 8 + size)
    assert (inner[UDPerror].sport, inner[UDPerror].dport, inner[UDPerror].len) == (
        CLIENT6[1], SERVER6[1], 8 + size)
    original = m.build_udp(CLIENT6, SERVER6, data)
    assert pkt[48:] == original[:len(pkt) - 48]


def test_icmp_ipv4_mapped_addresses_make_an_ipv6_error(m):
    pkt = m.build_icmp_unreachable(("::ffff:192.0.2.2", 1), ("::ffff:198.51.100.2", 2), b"x")
    assert pkt[0] >> 4 == 6 and IPv6(pkt)[ICMPv6DestUnreach].code == 4


@pytest.mark.parametrize("src, dst, data, opts, exc, text", [
    (CLIENT4, SERVER6, b"", {}, ValueError, "families differ"),
    (("nope", 1), SERVER4, b"", {}, ValueError, "src host is not an IPv4 or IPv6"),
    (CLIENT4, ("198.51.100.2", 70000), b"", {}, ValueError, "dst port out of range"),
    (CLIENT4, SERVER4, "text", {}, TypeError, "payload must be a bytes-like object"),
    (CLIENT4, SERVER4, b"", {"ttl": 256}, ValueError, "ttl out of range 0-255"),
    (CLIENT4, SERVER4, b"", {"ident": -1}, ValueError, "ident out of range 0-65535"),
    (CLIENT4, SERVER4, bytes(65508), {}, PacketTooBig, "exceeds the IPv4 maximum of 65507"),
    (CLIENT6, SERVER6, bytes(65528), {}, PacketTooBig, "exceeds the IPv6 maximum of 65527"),
])
def test_icmp_bad_input_errors_are_build_udps(m, src, dst, data, opts, exc, text):
    with pytest.raises(exc) as info:
        m.build_icmp_unreachable(src, dst, data, **opts)
    assert text in str(info.value)
    with pytest.raises(exc) as again:               # the same message build_udp gives
        m.build_udp(src, dst, data, **opts)
    assert str(again.value) == str(info.value)


def test_icmp_exported_by_the_packet_library():
    assert relay.build_icmp_unreachable is relay.packet.build_icmp_unreachable
    assert "build_icmp_unreachable" in relay.__all__ and "build_icmp_unreachable" in pure.__all__


@st.composite
def icmp_specs(draw):
    hosts = draw(st.sampled_from([v4_addrs, v6_addrs]))
    size = draw(st.sampled_from([0, 1, 7, 519, 520, 521, 1183, 1184, 1185, 2000]))
    return ((draw(hosts), draw(ports)), (draw(hosts), draw(ports)),
            draw(st.binary(min_size=size, max_size=size)), draw(st.integers(0, 255)),
            draw(st.integers(0, 0xFFFF)))


@needs_native
@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=icmp_specs())
@example(spec=(CLIENT4, SERVER4, bytes(65507), 64, 0))
@example(spec=(CLIENT6, SERVER6, bytes(65527), 1, 0))
def test_icmp_compiled_and_pure_give_the_same_bytes(spec):
    src, dst, data, ttl, ident = spec
    got = native.build_icmp_unreachable(src, dst, data, ttl=ttl, ident=ident)
    assert got == pure.build_icmp_unreachable(src, dst, data, ttl=ttl, ident=ident)
    assert recomputed(got) == got
