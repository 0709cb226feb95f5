"""RawSender: spoofed IPv4/IPv6 + UDP datagrams from raw sockets, for the compiled
extension and the pure-Python fallback.

The end-to-end tests send from the ``rtr`` namespace, spoofing a server address, to a
plain UDP socket in ``cli`` (directly attached to rtr0), which must see exactly the
spoofed source; a packet capture on cli0 checks the bytes with scapy.
"""
import errno
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from relay.errors import PacketTooBig
from tests.namespaces import CLI4, CLI6, SRV4, SRV6, wait_until
from relay.packet.pure.rawsock import RawSender as PureRawSender
from tests.support import REPO, native_rawsender

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
ETH_P_ALL = 0x0003

FAMILIES = {
    # name: (family, receiver address, spoofed source, largest payload on a 1500 MTU)
    "v4": (socket.AF_INET, CLI4, SRV4, 1472),
    "v6": (socket.AF_INET6, CLI6, SRV6, 1452),
}


@pytest.fixture(params=sorted(FAMILIES))
def fam(request):
    return request.param


class Receiver:
    """A UDP socket bound in a namespace, drained by a thread into ``got``."""

    def __init__(self, ns, family, host, rcvbuf=None):
        self.sock = ns.socket(family)
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        self.sock.bind((host, 0))
        self.addr = self.sock.getsockname()[:2]
        self.sock.settimeout(0.1)
        self.got = []          # (payload, (host, port))
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(70000)
            except socket.timeout:
                continue
            except OSError:
                return
            self.got.append((data, peer[:2]))

    def wait_for(self, n, timeout=10.0):
        wait_until(lambda: len(self.got) >= n, timeout, what=f"{n} datagrams (got {len(self.got)})")
        return self.got

    def until_sentinel(self, sender, src, timeout=10.0):
        """Send a sentinel after everything else; datagrams on one path stay in order,
        so once it arrives every earlier datagram has arrived too. Returns those."""
        sender.send(src, self.addr, b"SENTINEL")
        wait_until(lambda: any(d == b"SENTINEL" for d, _ in self.got), timeout,
                   what="the sentinel datagram")
        got = list(self.got)
        return got[:[d for d, _ in got].index(b"SENTINEL")]

    def close(self):
        self._stop = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def recv_factory():
    made = []

    def make(*args, **kw):
        r = Receiver(*args, **kw)
        made.append(r)
        return r
    yield make
    for r in made:
        r.close()


def seq_payload(i, size=32):
    return struct.pack("!I", i) + bytes((i + k) & 0xff for k in range(size - 4))


# -- in network namespaces ---------------------------------------------------------

def test_spoofed_source_arrives(RawSender, fam, topo, recv_factory):
    family, host, spoof, biggest = FAMILIES[fam]
    rcv = recv_factory(topo.cli, family, host)
    src = (spoof, 53)
    sizes = [0, 1, biggest]
    with topo.rtr.enter(), RawSender() as s:
        for n in sizes:
            s.send(src, rcv.addr, bytes(range(256)) * (n // 256) + bytes(range(n % 256)))
        got = rcv.wait_for(len(sizes))
    assert [len(d) for d, _ in got] == sizes
    for (data, peer), n in zip(got, sizes):
        assert peer == src
        assert data == bytes(range(256)) * (n // 256) + bytes(range(n % 256))


def _capture(topo, dev):
    cap = topo.cli.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    cap.bind((dev, 0))
    cap.settimeout(5)
    return cap


def _captured_udp(cap, dport, count):
    """The IP packets (bytes, from the IP header on) of the next count UDP datagrams
    to dport seen by the AF_PACKET socket cap."""
    from scapy.layers.l2 import Ether
    from scapy.layers.inet import UDP
    out = []
    deadline = time.monotonic() + 10
    while len(out) < count and time.monotonic() < deadline:
        frame = cap.recv(70000)
        pkt = Ether(frame)
        if UDP in pkt and pkt[UDP].dport == dport:
            out.append(bytes(pkt.payload))
    assert len(out) == count, f"captured {len(out)} of {count} datagrams"
    return out


def test_bytes_on_the_wire(RawSender, fam, topo, recv_factory):
    """Capture on cli0 and check every field with scapy, checksums recomputed."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.inet6 import IPv6
    family, host, spoof, _ = FAMILIES[fam]
    rcv = recv_factory(topo.cli, family, host)
    cap = _capture(topo, "cli0")
    payloads = [b"", b"a", b"odd-length payload", bytes(range(256)) * 3 + b"xyz"]
    try:
        with topo.rtr.enter(), RawSender(ttl=7) as s:
            s.send_many([((spoof, 4000 + i), rcv.addr, p) for i, p in enumerate(payloads)])
        pkts = _captured_udp(cap, rcv.addr[1], len(payloads))
    finally:
        cap.close()
    layer = IPv6 if fam == "v6" else IP
    for i, (raw, payload) in enumerate(zip(pkts, payloads)):
        pkt = layer(raw)
        assert pkt.src == spoof and pkt.dst == host
        assert pkt[UDP].sport == 4000 + i and pkt[UDP].dport == rcv.addr[1]
        assert bytes(pkt[UDP].payload) == payload
        assert pkt[UDP].len == 8 + len(payload)
        if fam == "v6":
            assert pkt.hlim == 7 and pkt.nh == 17 and pkt.plen == 8 + len(payload)
        else:
            assert pkt.ttl == 7 and pkt.proto == 17 and pkt.flags == "DF"
            assert pkt.len == 28 + len(payload)
        # Let scapy recompute both checksums and compare.
        again = pkt.copy()
        del again[UDP].chksum
        if fam == "v4":
            del again.chksum
        rebuilt = layer(bytes(again))
        assert rebuilt[UDP].chksum == pkt[UDP].chksum
        if fam == "v4":
            assert rebuilt.chksum == pkt.chksum
    assert len(rcv.wait_for(len(payloads))) == len(payloads)


def test_both_implementations_send_the_same_bytes(fam, topo, recv_factory):
    native = native_rawsender()
    if native is None:
        pytest.skip("relay.packet._rawsock is not built")
    family, host, spoof, _ = FAMILIES[fam]
    rcv = recv_factory(topo.cli, family, host)
    cap = _capture(topo, "cli0")
    items = [((spoof, 1000 + n), rcv.addr, bytes((n * 13 + k) & 0xff for k in range(n)))
             for n in (0, 1, 2, 3, 100, 1001)]
    try:
        with topo.rtr.enter():
            for cls in (native, PureRawSender):
                with cls(ttl=200) as s:
                    assert s.send_many(items) == len(items)
        pkts = _captured_udp(cap, rcv.addr[1], 2 * len(items))
    finally:
        cap.close()

    def normalized(raw):
        if fam == "v6":
            return raw
        # The kernel picks the IPv4 identification and so the header checksum.
        return raw[:4] + b"\0\0" + raw[6:10] + b"\0\0" + raw[12:]
    ours, theirs = pkts[:len(items)], pkts[len(items):]
    assert [normalized(p) for p in ours] == [normalized(p) for p in theirs]


def test_send_many_10000(RawSender, topo, recv_factory):
    n = 10_000
    rcv = recv_factory(topo.cli, socket.AF_INET, CLI4, rcvbuf=32 << 20)
    src = (SRV4, 53)
    items = [(src, rcv.addr, seq_payload(i)) for i in range(n)]
    with topo.rtr.enter(), RawSender() as s:
        s.send(src, rcv.addr, b"warm-up")         # resolve the neighbour first
        rcv.wait_for(1)
        t0 = time.monotonic()
        assert s.send_many(items) == n
        assert time.monotonic() - t0 < 60
        got = rcv.until_sentinel(s, src, timeout=30)
    got = got[1:]
    assert len(got) == n
    assert [d for d, _ in got] == [p for _, _, p in items]
    assert all(peer == src for _, peer in got)


def test_send_many_mixed_families_and_iterables(RawSender, topo, recv_factory):
    """Interleaved IPv4/IPv6 items (each family change flushes the ring), a generator,
    bytearray/memoryview payloads and a batch that does not divide the count."""
    r4 = recv_factory(topo.cli, socket.AF_INET, CLI4)
    r6 = recv_factory(topo.cli, socket.AF_INET6, CLI6)
    src4, src6 = (SRV4, 5353), (SRV6, 5353)
    kinds = (bytes, bytearray, memoryview)

    def items():
        for i in range(50):
            p = kinds[i % 3](seq_payload(i, 20))
            if i % 5 in (1, 2):
                yield (src6, r6.addr, p)
            else:
                yield [src4, r4.addr, p]      # any 3-item sequence
    with topo.rtr.enter(), RawSender(batch=7) as s:
        assert s.send_many(items()) == 50
        got4 = r4.until_sentinel(s, src4)
        got6 = r6.until_sentinel(s, src6)
    assert [d for d, _ in got4] == [seq_payload(i, 20) for i in range(50) if i % 5 not in (1, 2)]
    assert [d for d, _ in got6] == [seq_payload(i, 20) for i in range(50) if i % 5 in (1, 2)]
    assert {p for _, p in got4} == {src4} and {p for _, p in got6} == {src6}


def test_over_the_interface_mtu(RawSender, fam, topo, recv_factory):
    family, host, spoof, biggest = FAMILIES[fam]
    rcv = recv_factory(topo.cli, family, host)
    src = (spoof, 53)
    with topo.rtr.enter():
        with RawSender() as s:
            with pytest.raises(PacketTooBig) as info:
                s.send(src, rcv.addr, bytes(biggest + 1))
            e = info.value
            assert (e.limit, e.size, e.sent) == ("interface MTU", 1501, 0)
            assert "1500" in str(e)
            s.send(src, rcv.addr, bytes(biggest))        # still usable, and fits
            assert rcv.until_sentinel(s, src) == [(bytes(biggest), src)]
        rcv.got.clear()
        for batch in (1, 4, 64):
            items = [(src, rcv.addr, seq_payload(i)) for i in range(9)]
            items[5] = (src, rcv.addr, bytes(biggest + 1))
            with RawSender(batch=batch) as s:
                with pytest.raises(PacketTooBig) as info:
                    s.send_many(items)
                assert info.value.limit == "interface MTU"
                assert info.value.sent == 5, batch
                got = rcv.until_sentinel(s, src)
            assert [d for d, _ in got] == [seq_payload(i) for i in range(5)], batch
            rcv.got.clear()


def test_over_the_maximum_in_send_many(RawSender, topo, recv_factory):
    """A too-big payload stops send_many: what came before went out, nothing after."""
    rcv = recv_factory(topo.cli, socket.AF_INET, CLI4)
    src = (SRV4, 53)
    items = [(src, rcv.addr, seq_payload(i)) for i in range(3)]
    items.append((src, rcv.addr, bytes(65508)))
    items += [(src, rcv.addr, seq_payload(i)) for i in range(3, 6)]
    with topo.rtr.enter(), RawSender() as s:
        with pytest.raises(PacketTooBig) as info:
            s.send_many(items)
        assert (info.value.limit, info.value.sent) == ("IPv4 maximum", 3)
        with pytest.raises(ValueError, match="same address family") as info:
            s.send_many(items[:2] + [(src, ("2001:db8:1::2", 9), b"x")] + items[4:])
        assert info.value.sent == 2
        got = rcv.until_sentinel(s, src)
    assert [d for d, _ in got] == [seq_payload(i) for i in (0, 1, 2, 0, 1)]


def test_largest_datagrams_over_loopback(RawSender, topo, recv_factory):
    """65507 (IPv4) and 65527 (IPv6) bytes fit through a loopback with a big MTU."""
    topo.cli.run("ip", "link", "set", "lo", "mtu", "65575")
    r4 = recv_factory(topo.cli, socket.AF_INET, "127.0.0.1")
    r6 = recv_factory(topo.cli, socket.AF_INET6, "::1")
    p4 = bytes(range(256)) * 255 + bytes(range(227))        # 65507
    p6 = p4 + bytes(20)                                      # 65527
    with topo.cli.enter(), RawSender() as s:
        s.send(("127.0.0.9", 9), r4.addr, p4)
        s.send(("::9", 9), r6.addr, p6)
        with pytest.raises(PacketTooBig):
            s.send(("::9", 9), r6.addr, p6 + b"x")
        assert r4.wait_for(1)[0] == (p4, ("127.0.0.9", 9))
        assert r6.wait_for(1)[0] == (p6, ("::9", 9))


def test_mark(RawSender, topo, recv_factory):
    """mark sets SO_MARK: an nft rule in rtr counts the marked packets."""
    if shutil.which("nft") is None:
        pytest.skip("nft is not installed")
    topo.rtr.run("nft", "-f", "-", input=(
        "table inet rawsocktest {\n"
        " chain out { type filter hook output priority 0;\n"
        "  meta l4proto udp meta mark 0x2a counter; }\n"
        "}\n"))
    rcv = recv_factory(topo.cli, socket.AF_INET, CLI4)
    src = (SRV4, 53)
    with topo.rtr.enter():
        with RawSender(mark=0x2a) as s:
            s.send_many([(src, rcv.addr, b"marked")] * 3)
        with RawSender() as s:
            s.send(src, rcv.addr, b"unmarked")
    rcv.wait_for(4)
    out = topo.rtr.run("nft", "list", "chain", "inet", "rawsocktest", "out").stdout
    assert "counter packets 3 " in out, out


def test_enobufs_is_retried_not_lost(RawSender, topo, recv_factory):
    """A shaped queue on rtr0 answers ENOBUFS when full: every datagram is retried
    until it fits, none lost or duplicated."""
    topo.rtr.run("tc", "qdisc", "add", "dev", "rtr0", "root", "tbf", "rate", "4mbit",
                 "burst", "4000", "limit", "4000")
    rcv = recv_factory(topo.cli, socket.AF_INET, CLI4)
    src = (SRV4, 53)
    n = 150
    items = [(src, rcv.addr, seq_payload(i, 400)) for i in range(n)]
    with topo.rtr.enter(), RawSender() as s:
        s.send(src, rcv.addr, b"warm-up")
        rcv.wait_for(1)
        assert s.send_many(items) == n
        got = rcv.until_sentinel(s, src)
    assert [d for d, _ in got[1:]] == [p for _, _, p in items]
    stats = topo.rtr.run("tc", "-s", "qdisc", "show", "dev", "rtr0").stdout
    assert "dropped 0," not in stats, "the queue never overflowed: the test proves nothing"


def test_enobufs_gives_up_with_sent(RawSender, topo, recv_factory):
    """When the queue stays full, send_many raises OSError(ENOBUFS) with an exact .sent."""
    # 1 kB/s: two datagrams go out at once (burst), one waits in the queue (limit),
    # the next is refused for longer than the retries last.
    topo.rtr.run("tc", "qdisc", "add", "dev", "rtr0", "root", "tbf", "rate", "8kbit",
                 "burst", "3000", "limit", "1500")
    # A permanent neighbour entry: no resolution traffic spends the burst.
    mac = open_mac(topo.cli, "cli0")
    topo.rtr.run("ip", "neigh", "replace", CLI4, "lladdr", mac, "dev", "rtr0", "nud", "permanent")
    rcv = recv_factory(topo.cli, socket.AF_INET, CLI4)
    src = (SRV4, 53)
    items = [(src, rcv.addr, seq_payload(i, 1300)) for i in range(6)]
    with topo.rtr.enter(), RawSender() as s:
        t0 = time.monotonic()
        with pytest.raises(OSError) as info:
            s.send_many(items)
        assert time.monotonic() - t0 < 5
    e = info.value
    assert e.errno == errno.ENOBUFS and not isinstance(e, PacketTooBig)
    assert e.sent == 3
    rcv.wait_for(3, timeout=10)
    time.sleep(0.2)
    assert [d for d, _ in rcv.got] == [p for _, _, p in items[:3]]


def open_mac(ns, dev):
    return ns.run("cat", f"/sys/class/net/{dev}/address").stdout.strip()


def test_permission_error_without_cap_net_raw(RawSender, netns_available):
    if shutil.which("capsh") is None:
        pytest.skip("capsh (libcap2-bin) is not installed")
    pure = RawSender is PureRawSender
    code = (
        "from relay import _select\n"
        "mod, native = _select.load('rawsock')\n"
        f"assert native == {not pure}, native\n"
        "try:\n"
        "    mod.RawSender().send(('127.0.0.2', 9), ('127.0.0.1', 9), b'x')\n"
        "except PermissionError as e:\n"
        "    print('PermissionError', e.sent, e)\n"
        "else:\n"
        "    print('sent')\n")
    env = dict(os.environ, RELAY_PURE_PYTHON="1" if pure else "0")
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    r = subprocess.run(["capsh", "--drop=cap_net_raw", "--", "-c",
                        f'exec "{sys.executable}" -c "$0"', code],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout.strip()
    assert out.startswith("PermissionError 0 "), out
    assert "CAP_NET_RAW" in out
