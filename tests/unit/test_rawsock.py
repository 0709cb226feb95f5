"""RawSender: spoofed IPv4/IPv6 + UDP datagrams from raw sockets, for the compiled
extension and the pure-Python fallback.

The end-to-end tests send from the ``rtr`` namespace, spoofing a server address, to a
plain UDP socket in ``cli`` (directly attached to rtr0), which must see exactly the
spoofed source; a packet capture on cli0 checks the bytes with scapy.
"""
import socket

import pytest
from hypothesis import given, settings, strategies as st

from relay.errors import PacketTooBig
from tests.support import examples


# -- no network needed -----------------------------------------------------------

def test_constructor_validates(RawSender):
    with pytest.raises(ValueError, match="ttl"):
        RawSender(ttl=0)
    with pytest.raises(ValueError, match="ttl"):
        RawSender(ttl=256)
    with pytest.raises(TypeError, match="ttl"):
        RawSender(ttl="64")
    with pytest.raises(ValueError, match="batch"):
        RawSender(batch=0)
    with pytest.raises(ValueError, match="batch"):
        RawSender(batch=1025)
    with pytest.raises(ValueError, match="mark"):
        RawSender(mark=-1)
    with pytest.raises(ValueError, match="mark"):
        RawSender(mark=1 << 32)
    with pytest.raises(TypeError, match="mark"):
        RawSender(mark=1.5)
    with pytest.raises(TypeError):
        RawSender(None)          # keyword-only
    s = RawSender(mark=0x2a, ttl=9, batch=5)
    assert (s.mark, s.ttl, s.batch, s.closed) == (0x2a, 9, 5, False)
    assert RawSender().mark is None
    s.close()


def test_close_and_context_manager(RawSender):
    with RawSender() as s:
        assert not s.closed
        assert s.send_many([]) == 0
    assert s.closed
    s.close()                            # idempotent
    with pytest.raises(ValueError, match="closed"):
        s.send(("192.0.2.1", 1), ("192.0.2.2", 2), b"x")
    with pytest.raises(ValueError, match="closed"):
        s.send_many([])


def test_not_reentrant(RawSender):
    """A sender in use (here: from inside the items iterator) refuses another call."""
    s = RawSender()

    def calls(action):
        action()
        yield (("192.0.2.1", 1), ("192.0.2.2", 2), b"x")
    with pytest.raises(RuntimeError, match="in use") as info:
        s.send_many(calls(lambda: s.send(("192.0.2.1", 1), ("192.0.2.2", 2), b"x")))
    assert info.value.sent == 0
    with pytest.raises(RuntimeError, match="while it is sending"):
        s.send_many(calls(s.close))
    assert not s.closed
    assert s.send_many([]) == 0            # usable again
    s.close()


@pytest.mark.parametrize("src,dst,payload,exc,words", [
    (("192.0.2.1", 1), ("2001:db8::1", 2), b"x", ValueError, "same address family"),
    (("2001:db8::1", 1), ("192.0.2.1", 2), b"x", ValueError, "same address family"),
    (("192.0.2.1", 1), ("192.0.2.2", 2), "text", TypeError, "bytes-like"),
    (("192.0.2.1", 1), ("192.0.2.2", 2), None, TypeError, "bytes-like"),
    (("192.0.2.1", 1), ("192.0.2.2", 2), memoryview(bytes(8))[::2], TypeError, "contiguous"),
    ("192.0.2.1", ("192.0.2.2", 2), b"x", TypeError, "(host, port) tuple"),
    (("192.0.2.1",), ("192.0.2.2", 2), b"x", TypeError, "(host, port) tuple"),
    (("192.0.2.1", 1), ["192.0.2.2", 2], b"x", TypeError, "(host, port) tuple"),
    (("192.0.2.1", 1.0), ("192.0.2.2", 2), b"x", TypeError, "port must be an int"),
    (("192.0.2.1", 1), ("192.0.2.2", "2"), b"x", TypeError, "port must be an int"),
    (("192.0.2.1", True), ("192.0.2.2", 2), b"x", TypeError, "port must be an int"),
    (("192.0.2\0.1", 1), ("192.0.2.2", 2), b"x", ValueError, "address literal"),
    (("192.0.2.1", -1), ("192.0.2.2", 2), b"x", ValueError, "port out of range"),
    (("192.0.2.1", 1), ("192.0.2.2", 65536), b"x", ValueError, "port out of range"),
    (("192.0.2.1", 1), ("192.0.2.2", 1 << 70), b"x", ValueError, "port out of range"),
    (("example.com", 1), ("192.0.2.2", 2), b"x", ValueError, "address literal"),
    (("192.0.2.300", 1), ("192.0.2.2", 2), b"x", ValueError, "address literal"),
    ((1234, 1), ("192.0.2.2", 2), b"x", TypeError, "host must be str"),
    (("2001:db8::1", 1), ("2001:db8::2", 2, 1 << 20, 0), b"x", ValueError, "flowinfo"),
    (("2001:db8::1", 1), ("2001:db8::2", 2, 0, -1), b"x", ValueError, "scope_id"),
])
def test_bad_input_is_rejected_before_sending(RawSender, src, dst, payload, exc, words):
    with RawSender() as s:
        with pytest.raises(exc, match=words.replace("(", r"\(").replace(")", r"\)")) as info:
            s.send(src, dst, payload)
        assert info.value.sent == 0
        with pytest.raises(exc) as info:
            s.send_many([(src, dst, payload)])
        assert info.value.sent == 0


@pytest.mark.parametrize("item", [None, 5, ("a", "b"), (1, 2, 3, 4)])
def test_send_many_needs_triples(RawSender, item):
    with RawSender() as s, pytest.raises(TypeError, match="triples"):
        s.send_many([item])


@pytest.mark.parametrize("is_v6,plen,size,limit", [
    (False, 65508, 65536, "IPv4 maximum"),
    (False, 100000, 100028, "IPv4 maximum"),
    (True, 65528, 65576, "IPv6 maximum"),
])
def test_over_the_protocol_maximum(RawSender, is_v6, plen, size, limit):
    src, dst = (("2001:db8::1", 1), ("2001:db8::2", 2)) if is_v6 else \
        (("192.0.2.1", 1), ("192.0.2.2", 2))
    with RawSender() as s:
        with pytest.raises(PacketTooBig) as info:
            s.send(src, dst, bytes(plen))
        e = info.value
        assert isinstance(e, ValueError)
        assert (e.limit, e.size, e.sent) == (limit, size, 0)
        assert str(plen) in str(e)


def test_pure_headers_match_scapy():
    """The fallback's header writer against scapy, odd and even lengths, both families."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from relay.packet.pure.rawsock import _headers
    for is_v6, src, dst in ((False, "203.0.113.9", "192.0.2.200"),
                            (True, "2001:db8:ffff::9", "2001:db8:1::c8")):
        fam = socket.AF_INET6 if is_v6 else socket.AF_INET
        for plen in (0, 1, 2, 3, 17, 1000, 1471):
            payload = bytes((i * 7 + plen) & 0xff for i in range(plen))
            hdr = _headers(is_v6, socket.inet_pton(fam, src), 40000 + plen,
                           socket.inet_pton(fam, dst), 53, payload, plen, 33)
            ours = hdr + payload
            if is_v6:
                ref = IPv6(src=src, dst=dst, hlim=33) / UDP(sport=40000 + plen, dport=53) / payload
            else:
                ref = IP(src=src, dst=dst, ttl=33, id=0, flags="DF") / UDP(
                    sport=40000 + plen, dport=53) / payload
            assert ours == bytes(ref), (is_v6, plen)


@settings(max_examples=examples(150), deadline=None)
@given(v6=st.booleans(), src=st.binary(min_size=16, max_size=16),
       dst=st.binary(min_size=16, max_size=16), sport=st.integers(0, 65535),
       dport=st.integers(0, 65535), ttl=st.integers(1, 255),
       payload=st.binary(max_size=1500))
def test_pure_headers_match_scapy_property(v6, src, dst, sport, dport, ttl, payload):
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    from relay.packet.pure.rawsock import _headers
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    src, dst = (src, dst) if v6 else (src[:4], dst[:4])
    hdr = _headers(v6, src, sport, dst, dport, payload, len(payload), ttl)
    s, d = socket.inet_ntop(fam, src), socket.inet_ntop(fam, dst)
    ip = IPv6(src=s, dst=d, hlim=ttl) if v6 else IP(src=s, dst=d, ttl=ttl, id=0, flags="DF")
    assert hdr + payload == bytes(ip / UDP(sport=sport, dport=dport) / payload)
