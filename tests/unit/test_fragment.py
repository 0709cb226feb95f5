"""IP fragments written by relay itself: build_udp_fragments, RawSender(mtu=...), and raw
redir replies larger than the MTU to the client.

The packet core runs against the compiled extension and the pure-Python fallback;
fragments are parsed and reassembled by scapy and must give back the exact datagram
build_udp() makes, and both implementations must write the same bytes. In network
namespaces, the receiving kernel reassembles what RawSender and `relay redir` send.
"""
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st
from scapy.all import IP, UDP, IPv6, IPv6ExtHdrFragment, defragment, defragment6, raw

from relay.errors import PacketTooBig
from relay.packet.pure import fast as pure
from tests.support import examples
from tests.support_fragment import MAX4, MAX6, data

try:
    from relay.packet import _fast as native
except ImportError:
    native = None

V4 = (("198.51.100.2", 5300), ("192.0.2.2", 40000))
V6 = (("2001:db8:2::2", 5300), ("2001:db8:1::2", 40000))
PROPS = settings(max_examples=examples(150), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@pytest.fixture(scope="module", params=["native", "pure"])
def m(request):
    if request.param == "native":
        if native is None:
            pytest.skip("relay.packet._fast is not built")
        return native
    return pure


# -- the packet core ----------------------------------------------------------------------

def check_fragments(m, v6, src, dst, payload, mtu, ident, **opts):
    """build_udp_fragments' packets: each within mtu, well formed (scapy recomputes every
    checksum to the same value), and reassembled by scapy to the exact datagram."""
    pkts = m.build_udp_fragments(src, dst, payload, mtu, ident=ident, **opts)
    whole = pure.build_udp(src, dst, payload, ident=ident & 0xFFFF, df=False, **opts)
    assert all(isinstance(p, bytes) and len(p) <= mtu for p in pkts)
    if len(whole) <= mtu:
        assert pkts == [whole]
        return pkts
    assert len(pkts) >= 2
    offset = 0
    for i, p in enumerate(pkts):
        last = i == len(pkts) - 1
        if v6:
            pkt = IPv6(p)
            frag = pkt[IPv6ExtHdrFragment]
            assert pkt.nh == 44 and frag.nh == 17 and pkt.plen == len(p) - 40
            assert (frag.offset * 8, frag.m, frag.id) == (offset, 0 if last else 1, ident)
            body = bytes(frag.payload)
        else:
            pkt = IP(p)
            assert pkt.flags == ("" if last else "MF")     # DF clear, MF on all but the last
            assert (pkt.frag * 8, pkt.id, pkt.len) == (offset, ident, len(p))
            again = pkt.copy()
            del again.chksum
            assert IP(raw(again)).chksum == pkt.chksum
            body = bytes(pkt.payload)
        assert last or len(body) % 8 == 0
        assert body == whole[(48 if v6 else 28) - 8 + offset:][:len(body)]
        offset += len(body)
    assert offset == len(whole) - (40 if v6 else 20)
    if v6:
        back = defragment6([IPv6(p) for p in pkts])
    else:
        back = defragment([IP(p) for p in pkts])
        assert len(back) == 1
        back = back[0]
    assert raw(back) == whole
    again = back.copy()
    del again[UDP].chksum                        # scapy recomputes the UDP checksum
    assert (IPv6 if v6 else IP)(raw(again))[UDP].chksum == back[UDP].chksum
    return pkts


def sizes_for(v6, mtu):
    hl = 48 if v6 else 28
    top = MAX6 if v6 else MAX4
    return sorted({0, 1, 7, 8, mtu - hl - 1, mtu - hl, mtu - hl + 1, mtu - hl + 8,
                   1473, 2020, 8000, top - 1, top} - {-1})


@pytest.mark.parametrize("mtu", [68, 576, 1280, 1500, 9000])
def test_ipv4_fragments_reassemble_exactly(m, mtu):
    for n in sizes_for(False, mtu):
        check_fragments(m, False, *V4, data(n), mtu, 0x1234)


@pytest.mark.parametrize("mtu", [1280, 1500, 9000, 65535, 65536])
def test_ipv6_fragments_reassemble_exactly(m, mtu):
    for n in sizes_for(True, mtu):
        check_fragments(m, True, *V6, data(n), mtu, 0x89ABCDEF)


def test_fragment_counts_and_sizes(m):
    """2020 bytes over a 1500-byte MTU: two fragments, the first full to a multiple of 8."""
    p4 = m.build_udp_fragments(*V4, data(2020), 1500, ident=7)
    assert [len(p) for p in p4] == [1500, 20 + 2028 - 1480]
    p6 = m.build_udp_fragments(*V6, data(2020), 1500, ident=7)
    assert [len(p) for p in p6] == [48 + 1448, 48 + 2028 - 1448]
    # the largest datagrams at the smallest MTUs
    assert len(m.build_udp_fragments(*V4, data(MAX4), 68, ident=1)) == -(-(MAX4 + 8) // 48)
    assert len(m.build_udp_fragments(*V6, data(MAX6), 1280, ident=1)) == -(-(MAX6 + 8) // 1232)


def test_mtu_above_the_largest_packet_never_fragments(m):
    assert m.build_udp_fragments(*V4, data(MAX4), 1 << 40, ident=3) == [
        pure.build_udp(*V4, data(MAX4), ident=3, df=False)]
    assert len(m.build_udp_fragments(*V6, data(MAX6), 65575)) == 1
    # a loopback MTU (65536) does not carry the largest IPv6 packet (65575 bytes)
    check_fragments(m, True, *V6, data(MAX6), 65536, 1)


def test_options_reach_every_fragment(m):
    for v6, (src, dst) in ((False, V4), (True, V6)):
        opts = {"ttl": 9, "tos": 0xb8}
        if v6:
            opts["flowlabel"] = 0xABCDE
        for p in check_fragments(m, v6, src, dst, data(5000), 1400, 99, **opts):
            pkt = (IPv6 if v6 else IP)(p)
            if v6:
                assert (pkt.hlim, pkt.tc, pkt.fl) == (9, 0xb8, 0xABCDE)
            else:
                assert (pkt.ttl, pkt.tos) == (9, 0xb8)


@pytest.mark.parametrize("args,exc,text", [
    ((*V4, b"x", 67), ValueError, "mtu of 67 bytes is below the IPv4 minimum of 68"),
    ((*V6, b"x", 1279), ValueError, "mtu of 1279 bytes is below the IPv6 minimum of 1280"),
    ((*V6, b"x", 576), ValueError, "below the IPv6 minimum"),
    ((*V4, b"x", 1500.0), TypeError, "mtu must be an int, not float"),
    ((*V4, b"x", None), TypeError, "mtu must be an int, not NoneType"),
    ((*V4, b"x", "1500"), TypeError, "mtu must be an int, not str"),
    ((*V4, b"x", -1), ValueError, "below the IPv4 minimum"),
    ((*V4, bytes(MAX4 + 1), 1500), PacketTooBig, "exceeds the IPv4 maximum"),
    ((*V6, bytes(MAX6 + 1), 1500), PacketTooBig, "exceeds the IPv6 maximum"),
    ((V4[0], V6[1], b"x", 1500), ValueError, "families differ"),
    ((*V4, "text", 1500), TypeError, "payload must be a bytes-like object"),
])
def test_bad_arguments(m, args, exc, text):
    with pytest.raises(exc, match=text) as info:
        m.build_udp_fragments(*args)
    if native is not None:          # both implementations say the same
        other = pure if m is native else native
        with pytest.raises(exc) as again:
            other.build_udp_fragments(*args)
        assert str(again.value) == str(info.value)


def test_ident_range_depends_on_the_family(m):
    with pytest.raises(ValueError, match="ident out of range 0-65535: 65536"):
        m.build_udp_fragments(*V4, b"x", 1500, ident=0x10000)
    with pytest.raises(ValueError, match="ident out of range 0-4294967295: 4294967296"):
        m.build_udp_fragments(*V6, b"x", 1500, ident=1 << 32)
    with pytest.raises(TypeError, match="ident must be an int"):
        m.build_udp_fragments(*V6, b"x", 1500, ident=1.0)
    p = m.build_udp_fragments(*V6, data(3000), 1500, ident=0xFFFFFFFF)
    assert IPv6(p[0])[IPv6ExtHdrFragment].id == 0xFFFFFFFF


def test_payload_types(m):
    ref = m.build_udp_fragments(*V4, data(3000), 1500, ident=5)
    for kind in (bytearray, memoryview):
        assert m.build_udp_fragments(*V4, kind(data(3000)), 1500, ident=5) == ref


@st.composite
def fragment_specs(draw):
    v6 = draw(st.booleans())
    addrs = st.ip_addresses(v=6 if v6 else 4).map(str)
    src = (draw(addrs), draw(st.integers(0, 65535)))
    dst = (draw(addrs), draw(st.integers(0, 65535)))
    top = MAX6 if v6 else MAX4
    n = draw(st.one_of(st.integers(0, 3000), st.integers(0, top), st.sampled_from([top])))
    mtu = draw(st.one_of(st.integers(1280 if v6 else 68, 1600),
                         st.integers(1280 if v6 else 68, 70000)))
    ident = draw(st.integers(0, 0xFFFFFFFF if v6 else 0xFFFF))
    return v6, src, dst, data(n, draw(st.integers(0, 1 << 30))), mtu, ident


@PROPS
@given(fragment_specs())
@example((False, ("0.0.0.0", 0), ("255.255.255.255", 65535), bytes(MAX4), 68, 0))
@example((True, ("::", 0), ("ffff::1", 1), b"\xff" * MAX6, 1280, 0xFFFFFFFF))
def test_random_datagrams_reassemble_and_both_implementations_agree(spec):
    v6, src, dst, payload, mtu, ident = spec
    pkts = check_fragments(pure, v6, src, dst, payload, mtu, ident)
    if native is not None:
        assert native.build_udp_fragments(src, dst, payload, mtu, ident=ident) == pkts


@pytest.mark.skipif(native is None, reason="relay.packet._fast is not built")
def test_both_implementations_write_the_same_bytes():
    for (src, dst), mtus in ((V4, (68, 500, 1500)), (V6, (1280, 1500, 4000))):
        for mtu in mtus:
            for n in (0, 9, 1473, 2020, 8000, 30001):
                args = (src, dst, data(n), mtu)
                assert native.build_udp_fragments(*args, ident=0xBEEF, ttl=3) == \
                    pure.build_udp_fragments(*args, ident=0xBEEF, ttl=3)


def test_parse_udp_refuses_each_fragment(m):
    """A fragment is not a datagram: parse_udp says "fragmented" (reassembly is the
    receiver's business)."""
    for src, dst in (V4, V6):
        for p in m.build_udp_fragments(src, dst, data(4000), 1500, ident=77):
            with pytest.raises(ValueError, match="^fragmented"):
                m.parse_udp(p)


# -- RawSender(mtu=...) -------------------------------------------------------------------

def test_sender_mtu_argument(RawSender):
    with pytest.raises(ValueError, match="mtu of 67 bytes is below the IPv4 minimum of 68"):
        RawSender(mtu=67)
    with pytest.raises(TypeError, match="mtu must be an int, not str"):
        RawSender(mtu="1500")
    assert RawSender().mtu is None
    with RawSender(mtu=1500) as s:
        assert s.mtu == 1500 and "mtu=1500" in repr(s)
    assert RawSender(mtu=70000).mtu == 65575
