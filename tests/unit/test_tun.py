"""`relay tun`'s data path (relay._select's "tun" part, both implementations) without a
device: the TUN queue is one end of a SOCK_SEQPACKET pair (one message = one packet, as a
TUN read or write), upstream sockets talk to echo servers on loopback. Packets are built
and checked with scapy (checksums recomputed by scapy must equal what the relay wrote)."""
import os
import socket
import struct
import threading
import time

import pytest
from scapy.all import ICMP, IP, TCP, UDP, IPv6, IPv6ExtHdrFragment, Raw, fragment, raw
from scapy.layers.inet6 import ICMPv6DestUnreach, ICMPv6EchoRequest, fragment6

from relay import _select
from relay.net import tundev

pytestmark = pytest.mark.usefixtures("impl")

CLI = {4: "10.9.0.2", 6: "fd00:9::2"}
LO = {4: "127.0.0.1", 6: "::1"}
SIZES = (0, 1, 1472, 3000, 65507)


class Echo:
    """UDP echo servers on 127.0.0.1 and ::1 (one thread); ``peers`` records senders."""

    def __init__(self):
        self.socks = {}
        for fam, host in ((socket.AF_INET, LO[4]), (socket.AF_INET6, LO[6])):
            s = socket.socket(fam, socket.SOCK_DGRAM)
            s.bind((host, 0))
            s.settimeout(0.05)
            self.socks[4 if fam == socket.AF_INET else 6] = s
        self.port = {v: s.getsockname()[1] for v, s in self.socks.items()}
        self.peers = []
        self.stop = threading.Event()
        self.t = threading.Thread(target=self._serve, daemon=True)
        self.t.start()

    def _serve(self):
        while not self.stop.is_set():
            for s in self.socks.values():
                try:
                    d, a = s.recvfrom(65535)
                except (socket.timeout, OSError):
                    continue
                self.peers.append(a)
                s.sendto(d, a)

    def close(self):
        self.stop.set()
        self.t.join()
        for s in self.socks.values():
            s.close()


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.close()


class Harness:
    def __init__(self, **kw):
        self.mod = _select.module("tun")
        self.tun, self.test = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.tun.setblocking(False)
        for s in (self.tun, self.test):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.test.settimeout(0)
        self.vnet = kw.get("vnet", False)
        self.relay = self.mod.TunRelay(self.tun.fileno(), mark=0, **kw)

    def inject(self, *pkts):
        for p in pkts:
            p = p if isinstance(p, bytes) else raw(p)
            self.test.send((bytes(tundev.VNET_HDR_LEN) if self.vnet else b"") + p)

    def written(self):
        out = []
        while True:
            try:
                out.append(self.test.recv(70000))
            except BlockingIOError:
                return out

    def run_until(self, pred, timeout=5.0):
        """Drive the relay until pred() (bounded); returns what it wrote meanwhile."""
        got, end = [], time.monotonic() + timeout
        while time.monotonic() < end:
            self.relay.run(20)
            got += self.written()
            if pred(got):
                return got
        raise AssertionError(f"never happened; written: {len(got)}, counters: "
                             f"{ {k: v for k, v in self.counters().items() if v} }")

    def counters(self):
        return self.relay.counters()

    def close(self):
        self.relay.close()
        self.tun.close()
        self.test.close()


@pytest.fixture
def harness():
    made = []

    def make(**kw):
        h = Harness(**kw)
        made.append(h)
        return h
    yield make
    for h in made:
        h.close()


def data(n, seed=0):
    return bytes((i * 7 + seed) & 0xFF for i in range(n))


def udp(v, src, dst, sport, dport, payload, ident=1):
    ip = IP(src=src, dst=dst, id=ident) if v == 4 else IPv6(src=src, dst=dst)
    return ip / UDP(sport=sport, dport=dport) / Raw(payload)


def split(v, pkt, size=1400):
    """pkt as IP fragments (IPv4: scapy's fragment; IPv6: a fragment header)."""
    if v == 4:
        return fragment(pkt, fragsize=size)
    p = IPv6(raw(pkt))
    return fragment6(p[IPv6].__class__(src=p.src, dst=p.dst) / IPv6ExtHdrFragment(id=7) /
                     p[UDP], size + 48)


def checked(v, pkt, udp_csum=True):
    """scapy's view of a packet the relay wrote, after checking that every checksum is
    what scapy computes (a fragment's UDP checksum covers the datagram: udp_csum=False)."""
    p = IP(pkt) if v == 4 else IPv6(pkt)
    again = p.copy()
    if v == 4:
        del again.chksum
    if again.haslayer(ICMP):
        del again[ICMP].chksum
    elif again.haslayer(UDP) and udp_csum:
        del again[UDP].chksum
    if again.haslayer(ICMPv6DestUnreach):
        del again[ICMPv6DestUnreach].cksum
    assert raw(again.__class__(raw(again))) == pkt[:len(raw(again))], "checksum differs from scapy's"
    return p


def reassemble(v, pkts):
    """The UDP payload carried by one packet or its fragments (checked one by one)."""
    if len(pkts) == 1:
        return checked(v, pkts[0])
    views = [checked(v, p, udp_csum=False) for p in pkts]
    chunks = {}
    for p in views:
        if v == 4:
            chunks[p.frag * 8] = bytes(p[IP].payload)
        else:
            f = p[IPv6ExtHdrFragment]
            chunks[f.offset * 8] = bytes(f.payload)
    whole = b"".join(chunks[o] for o in sorted(chunks))
    first = views[0]
    d = UDP(whole)
    again = (IP(src=first.src, dst=first.dst) if v == 4 else
             IPv6(src=first.src, dst=first.dst)) / UDP(sport=d.sport, dport=d.dport) / \
        Raw(bytes(d.payload))
    again = again.__class__(raw(again))
    assert again[UDP].chksum == d.chksum and again[UDP].len == d.len == len(whole)
    return again


@pytest.mark.parametrize("v", [4, 6])
def test_every_size_relayed_and_answered_from_the_remote(harness, echo, v):
    h = harness(mtu=1500)
    for size in SIZES:
        pkt = udp(v, CLI[v], LO[v], 40000, echo.port[v], data(size, size))
        h.inject(*(split(v, pkt) if size > 1400 else [pkt]))
        got = h.run_until(lambda g: sum(len(p) for p in g) >= size + 28)
        reply = reassemble(v, got)
        assert (reply.src, reply.dst) == (LO[v], CLI[v])
        assert (reply[UDP].sport, reply[UDP].dport) == (echo.port[v], 40000)
        assert bytes(reply[UDP].payload) == data(size, size)
        assert all(len(p) <= 1500 for p in got)
    c = h.counters()
    assert c["up_datagrams"] == c["down_datagrams"] == len(SIZES)
    assert c["assoc_created"] == 1 and c["assoc_open"] == 1
    assert c["frag_reassembled"] == 3                  # 1472, 3000, 65507 came split
    assert c["reply_fragmented"] == (2 if v == 4 else 3)    # IPv6: 1472 + 48 > 1500
    assert c["drop_malformed"] == 0


@pytest.mark.parametrize("v", [4, 6])
def test_full_cone_a_second_remote_is_delivered_as_itself(harness, echo, v):
    h = harness()
    h.inject(udp(v, CLI[v], LO[v], 40001, echo.port[v], b"hello"))
    h.run_until(lambda g: len(g) == 1)
    other = socket.socket(socket.AF_INET if v == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
    with other:
        other.bind((LO[v], 0))
        peer = echo.peers[-1]
        other.sendto(b"from elsewhere", peer[:2])
        got = h.run_until(lambda g: len(g) == 1)
        p = checked(v, got[0])
        assert (p.src, p[UDP].sport, p.dst, p[UDP].dport) == \
            (LO[v], other.getsockname()[1], CLI[v], 40001)
        assert bytes(p[UDP].payload) == b"from elsewhere"


def test_associations_capped_lru_evicted_and_expired(harness, echo):
    h = harness(max_associations=2, timeout=30.0)
    for port in (40010, 40011, 40012):
        h.inject(udp(4, CLI[4], LO[4], port, echo.port[4], b"x"))
    h.run_until(lambda g: len(g) == 2)      # the first one was evicted before its reply
    c = h.counters()
    assert (c["assoc_created"], c["assoc_evicted"], c["assoc_open"]) == (3, 1, 2)
    h.relay.tick(time.monotonic() + 31)
    c = h.counters()
    assert (c["assoc_expired"], c["assoc_open"]) == (2, 0)
    assert h.relay.associations == 0


def _bad_packets():
    good4 = raw(udp(4, CLI[4], LO[4], 1, 2, b"abcd"))
    good6 = raw(udp(6, CLI[6], LO[6], 1, 2, b"abcd"))
    bad_csum4 = bytearray(good4)
    bad_csum4[26] ^= 0xFF
    bad_iphdr = bytearray(good4)
    bad_iphdr[10] ^= 0xFF
    bad_ulen = bytearray(good4)
    bad_ulen[25] += 1
    zero6 = bytearray(good6)
    zero6[46:48] = b"\0\0"
    bad_plen6 = bytearray(good6)
    bad_plen6[5] += 9
    return [b"", b"\x50" + good4[1:], good4[:12], b"\x44" + good4[1:], good4[:-2] + b"",
            bytes(bad_csum4), bytes(bad_iphdr), bytes(bad_ulen), bytes(zero6),
            bytes(bad_plen6), good6[:30], raw(IPv6(src=CLI[6], dst=LO[6], nh=0) / b"\x11\x05")]


def test_bad_packets_counted_and_dropped_and_others_served(harness, echo):
    h = harness()
    bad = _bad_packets()
    h.inject(*bad)
    others = [IP(src=CLI[4], dst=LO[4]) / TCP(dport=80, flags="S"),
              IP(src=CLI[4], dst=LO[4]) / ICMP(),
              IPv6(src=CLI[6], dst=LO[6]) / ICMPv6EchoRequest()]
    h.inject(*others)
    h.inject(udp(4, CLI[4], LO[4], 40020, echo.port[4], b"still served"))
    got = h.run_until(lambda g: len(g) == 1)
    assert bytes(checked(4, got[0])[UDP].payload) == b"still served"
    c = h.counters()
    assert c["drop_malformed"] == len(bad)
    assert c["drop_not_udp"] == len(others)
    assert c["up_datagrams"] == 1


@pytest.mark.parametrize("v", [4, 6])
def test_overlapping_fragments_drop_the_datagram_rfc5722(harness, echo, v):
    h = harness()
    pkt = udp(v, CLI[v], LO[v], 40030, echo.port[v], data(3000))
    frags = split(v, pkt, 1000)
    # the second fragment once more, shifted by 8 bytes into the first one's range
    if v == 4:
        evil = frags[1].copy()
        evil.frag -= 1
        del evil.chksum
    else:
        evil = frags[1].copy()
        evil[IPv6ExtHdrFragment].offset -= 1
    h.inject(frags[0], evil, *frags[1:])
    h.inject(udp(v, CLI[v], LO[v], 40031, echo.port[v], b"after"))
    got = h.run_until(lambda g: len(g) == 1)
    assert bytes(checked(v, got[0])[UDP].payload) == b"after"
    c = h.counters()
    assert c["frag_overlap"] == 1 + (len(frags) - 1)    # the overlap, then the rest of it
    assert c["frag_reassembled"] == 0 and c["up_datagrams"] == 1


@pytest.mark.parametrize("v", [4, 6])
def test_port_unreachable_from_upstream_becomes_an_icmp_error_in_the_tun(harness, v):
    closed = socket.socket(socket.AF_INET if v == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
    closed.bind((LO[v], 0))
    port = closed.getsockname()[1]
    closed.close()
    h = harness()
    h.inject(udp(v, CLI[v], LO[v], 40040, port, b"anyone?"))
    got = h.run_until(lambda g: len(g) == 1)
    p = checked(v, got[0])
    assert (p.src, p.dst) == (LO[v], CLI[v])
    if v == 4:
        assert (p[ICMP].type, p[ICMP].code) == (3, 3)
        quoted = p[ICMP].payload
    else:
        assert (p[ICMPv6DestUnreach].type, p[ICMPv6DestUnreach].code) == (1, 4)
        quoted = p[ICMPv6DestUnreach].payload
    inner = (IP if v == 4 else IPv6)(raw(quoted))
    assert (inner.src, inner.dst, inner[UDP].sport, inner[UDP].dport) == \
        (CLI[v], LO[v], 40040, port)
    assert bytes(inner[UDP].payload) == b"anyone?"
    c = h.counters()
    assert c["icmp_errors"] >= 1 and c["tun_icmp_sent"] == 1


def vnet_run(v, src, dst, sport, dport, seg, payloads):
    """What the kernel hands over with UDP segmentation offload: one virtio-net header
    (GSO_UDP_L4, checksum to do) and one IP+UDP header for all the segments."""
    body = b"".join(payloads)
    ip = IP(src=src, dst=dst) if v == 4 else IPv6(src=src, dst=dst)
    pkt = bytearray(raw(ip / UDP(sport=sport, dport=dport) / Raw(body)))
    at = 20 if v == 4 else 40
    pkt[at + 6:at + 8] = b"\x12\x34"                 # partial: not checked
    hdr = tundev.VNET.pack(tundev.VNET_F_NEEDS_CSUM, tundev.GSO_UDP_L4, at + 8, seg, at, 6)
    return hdr + bytes(pkt)


@pytest.mark.parametrize("v", [4, 6])
def test_offload_run_read_as_segments_and_replies_written_as_one_run(harness, v):
    remote = socket.socket(socket.AF_INET if v == 4 else socket.AF_INET6, socket.SOCK_DGRAM)
    with remote:
        remote.bind((LO[v], 0))
        remote.settimeout(2)
        h = harness(vnet=True)
        seg = [data(100, i) for i in range(3)] + [data(40, 9)]
        h.test.send(vnet_run(v, CLI[v], LO[v], 40050, remote.getsockname()[1], 100, seg))
        h.relay.run(50)
        got = [remote.recvfrom(2000) for _ in seg]
        assert [d for d, _ in got] == seg
        peer = got[0][1]
        for i in range(5):                            # five replies queued before one run
            remote.sendto(data(200, i), peer)
        time.sleep(0.1)
        out = h.run_until(lambda g: len(g) >= 1)
        assert len(out) == 1
        flags, gso, hdr_len, gso_size, cstart, coff = tundev.VNET.unpack_from(out[0])
        at = 20 if v == 4 else 40
        assert (flags, gso, hdr_len, gso_size, cstart, coff) == \
            (tundev.VNET_F_NEEDS_CSUM, tundev.GSO_UDP_L4, at + 8, 200, at, 6)
        pkt = out[0][tundev.VNET_HDR_LEN:]
        p = IP(pkt) if v == 4 else IPv6(pkt)
        assert (p.src, p.dst, p[UDP].sport, p[UDP].dport) == \
            (LO[v], CLI[v], remote.getsockname()[1], 40050)
        assert p[UDP].len == 8 + 1000 and bytes(p[UDP].payload) == b"".join(
            data(200, i) for i in range(5))
        # the checksum field holds the folded pseudo-header sum (the kernel finishes it)
        pseudo = (socket.inet_pton(socket.AF_INET if v == 4 else socket.AF_INET6, LO[v]) +
                  socket.inet_pton(socket.AF_INET if v == 4 else socket.AF_INET6, CLI[v]))
        words = sum(struct.unpack(f"!{len(pseudo) // 2}H", pseudo)) + 17 + 1008
        while words >> 16:
            words = (words & 0xFFFF) + (words >> 16)
        assert p[UDP].chksum == words
        c = h.counters()
        assert (c["tun_runs_in"], c["tun_runs_out"], c["up_datagrams"], c["down_datagrams"]) == \
            (1, 1, 4, 5)


def test_plain_packets_under_the_virtio_header(harness, echo):
    h = harness(vnet=True)
    h.inject(udp(6, CLI[6], LO[6], 40060, echo.port[6], b"plain"))
    got = h.run_until(lambda g: len(g) == 1)
    assert got[0][:tundev.VNET_HDR_LEN] == bytes(tundev.VNET_HDR_LEN)
    assert bytes(checked(6, got[0][tundev.VNET_HDR_LEN:])[UDP].payload) == b"plain"


def test_arguments_are_checked():
    mod = _select.module("tun")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        for kw in ({"batch": 0}, {"max_associations": 0}, {"timeout": 0}, {"mtu": 1000}):
            with pytest.raises(ValueError):
                mod.TunRelay(a.fileno(), mark=0, **kw)


@pytest.mark.parametrize("v", [4, 6])
def test_fragments_out_of_order_and_duplicated_still_make_the_datagram(harness, echo, v):
    h = harness()
    frags = split(v, udp(v, CLI[v], LO[v], 40070, echo.port[v], data(5000)), 1000)
    h.inject(*reversed(frags), frags[2])               # every piece, one of them twice
    got = h.run_until(lambda g: sum(len(p) for p in g) >= 5000)
    assert bytes(reassemble(v, got)[UDP].payload) == data(5000)
    c = h.counters()
    assert (c["frag_reassembled"], c["frag_overlap"], c["up_datagrams"]) == (1, 0, 1)


def test_reassembly_bounded_by_time_and_memory(harness, echo):
    h = harness(frag_memory=5000, frag_timeout=30.0)
    first = [split(4, udp(4, CLI[4], LO[4], 40080 + i, echo.port[4], data(4000, i), i), 1000)[0]
             for i in range(6)]
    h.inject(*first)                  # ~1000 bytes held each: the oldest go to make room
    h.inject(udp(4, CLI[4], LO[4], 40090, echo.port[4], b"ping"))
    h.run_until(lambda g: len(g) == 1)
    c = h.counters()
    assert c["frag_dropped_memory"] == 1 and h.relay.reassembling == 5
    h.relay.tick(time.monotonic() + 31)
    c = h.counters()
    assert c["frag_timeout"] == 5 and h.relay.reassembling == 0
    assert c["frag_reassembled"] == 0


def test_a_reassembled_datagram_larger_than_ip_allows_is_dropped(harness, echo):
    h = harness()
    frags = split(4, udp(4, CLI[4], LO[4], 40100, echo.port[4], data(3000)), 1000)
    last = frags[-1].copy()
    last.frag = (65535 - 20 - 8) // 8 + 1         # ends past 65535 bytes
    del last.chksum
    h.inject(frags[0], last)
    h.inject(udp(4, CLI[4], LO[4], 40101, echo.port[4], b"ok"))
    h.run_until(lambda g: len(g) == 1)
    assert h.counters()["drop_malformed"] == 1


from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from tests.support import examples  # noqa: E402


@settings(max_examples=examples(60), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(v=st.sampled_from([4, 6]), cut=st.integers(0, 80), flips=st.lists(
    st.tuples(st.integers(0, 79), st.integers(1, 255)), max_size=4))
def test_mangled_packets_never_crash_and_the_relay_keeps_serving(harness, echo, v, cut, flips):
    h = harness()
    pkt = bytearray(raw(udp(v, CLI[v], LO[v], 40110, echo.port[v], data(40))))
    for at, x in flips:
        if at < len(pkt):
            pkt[at] ^= x
    h.inject(bytes(pkt[:cut] if cut < len(pkt) else pkt))
    h.relay.run(0)
    h.inject(udp(v, CLI[v], LO[v], 40111, echo.port[v], b"alive"))
    got = h.run_until(lambda g: any(b"alive" in p for p in g))
    assert sum(1 for p in got if b"alive" in p) == 1
    h.close()


@pytest.mark.parametrize("v", [4, 6])
def test_flows_client_groups_and_the_outbound_source(harness, echo, v):
    """relay flows of tun: per association its latest destination and counts both ways;
    client groups counted in the stats slot; --source binds the upstream socket."""
    from relay import flows as F
    from relay import stats as _stats
    from relay.net.sockopt import Outbound
    region = _stats.StatsRegion(1)
    groups = F.compile_groups((("lan", (F.network(CLI[v] + ("/128" if v == 6 else "/32")),)),))
    h = harness(mtu=1500, stats=region.slot(0), client_groups=groups,
                outbound=Outbound.of(None, ("127.0.0.2",)))   # IPv4 destinations: from .2
    for sport, sizes in ((40001, (10, 20)), (40002, (300,))):
        for n in sizes:
            h.inject(udp(v, CLI[v], LO[v], sport, echo.port[v], data(n)))
            h.run_until(lambda g: any(len(p) >= n + 28 for p in g))
    rows = h.relay.snapshot(10, F.SORTS.index("bytes"))
    assert [(r[0][1], r[1], r[2:6]) for r in rows] == [
        (40002, (LO[v], echo.port[v]), (1, 300, 1, 300)),
        (40001, (LO[v], echo.port[v]), (2, 30, 2, 30))]
    assert h.relay.flows_open == 2
    rows = h.relay.snapshot(10, 0, True)
    assert [(r[0], r[8], r[3]) for r in rows] == [(CLI[v], 2, 330)]
    words = list(region.slot(0)[_stats.N_COUNTERS:_stats.N_COUNTERS + 4])
    assert words == [3, 330, 3, 330]
    if v == 4:
        assert {p[0] for p in echo.peers} == {"127.0.0.2"}
