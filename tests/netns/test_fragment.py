"""IP fragments written by relay itself: build_udp_fragments, RawSender(mtu=...), and raw
redir replies larger than the MTU to the client.

The packet core runs against the compiled extension and the pure-Python fallback;
fragments are parsed and reassembled by scapy and must give back the exact datagram
build_udp() makes, and both implementations must write the same bytes. In network
namespaces, the receiving kernel reassembles what RawSender and `relay redir` send.
"""
import socket
import subprocess
import sys

import pytest
from scapy.all import IP, IPv6, IPv6ExtHdrFragment

from relay.errors import PacketTooBig
from relay.packet.pure import fast as pure
from tests.namespaces import CLI4, CLI6, SRV4, SRV6
from tests.relayproc import RelayProcess, relay_env
from tests.support_fragment import MAX4, MAX6, data

try:
    from relay.packet import _fast as native
except ImportError:
    native = None


def test_sender_refuses_ipv6_fragments_below_1280(RawSender, topo):
    rcv = topo.cli.socket(socket.AF_INET6)
    rcv.bind((CLI6, 0))
    rcv.settimeout(5)
    with topo.rtr.enter(), RawSender(mtu=576) as s:
        with pytest.raises(ValueError, match="needs fragments, and mtu 576 is below the "
                                             "IPv6 minimum of 1280") as info:
            s.send_many([((SRV6, 1), rcv.getsockname(), b"fits"),
                         ((SRV6, 1), rcv.getsockname(), bytes(600))])
        assert info.value.sent == 1
        assert rcv.recvfrom(100)[0] == b"fits"


class Sink:
    """A UDP socket in a namespace, read until a count of datagrams or a deadline."""

    def __init__(self, ns, family, host):
        self.sock = ns.socket(family)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.bind((host, 0))
        self.sock.settimeout(5)
        self.addr = self.sock.getsockname()[:2]

    def read(self, n):
        got = []
        for _ in range(n):
            payload, peer = self.sock.recvfrom(70000)
            got.append((payload, peer[:2]))
        return got


@pytest.mark.parametrize("fam", [4, 6])
def test_sender_fragments_arrive_reassembled(RawSender, fam, topo):
    """Datagrams of every size through a 1500-byte MTU: the receiving kernel reassembles
    the fragments into exactly the datagrams sent, from the spoofed source."""
    family, host, spoof, top = ((socket.AF_INET, CLI4, SRV4, MAX4) if fam == 4
                                else (socket.AF_INET6, CLI6, SRV6, MAX6))
    sink = Sink(topo.cli, family, host)
    sizes = [0, 1, 1400, 1473, 2020, 8000, 1, 30000, top]
    items = [((spoof, 53), sink.addr, data(n)) for n in sizes]
    with topo.rtr.enter(), RawSender(mtu=1500, batch=4) as s:
        assert s.send_many(items) == len(items)
        s.send((spoof, 53), sink.addr, data(2020, 1))
        got = sink.read(len(items) + 1)
    assert sorted(got) == sorted([(p, (spoof, 53)) for _, _, p in items]
                                 + [(data(2020, 1), (spoof, 53))])


def _capture(topo):
    cap = topo.cli.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
    cap.bind(("cli0", 0))
    cap.settimeout(5)
    return cap


def _captured(cap, v6, count):
    """The next count IP packets (from the IP header on) that are fragments."""
    from scapy.layers.l2 import Ether
    out = []
    while len(out) < count:
        pkt = Ether(cap.recv(70000))
        if v6 and IPv6ExtHdrFragment in pkt or not v6 and IP in pkt and pkt[IP].flags != "DF" \
                and (pkt[IP].frag or pkt[IP].flags == "MF"):
            out.append(bytes(pkt.payload))
    return out


@pytest.mark.parametrize("fam", [4, 6])
def test_sender_fragments_on_the_wire(RawSender, fam, topo):
    """What arrives at cli0 is the fragments build_udp_fragments writes for the sender's
    identification: same bytes (the kernel only adds the IPv4 identification it was
    given), a new identification per datagram, never 0."""
    v6 = fam == 6
    family, host, spoof = (socket.AF_INET6, CLI6, SRV6) if v6 else (socket.AF_INET, CLI4, SRV4)
    sink = Sink(topo.cli, family, host)
    src = (spoof, 4242)
    counts = [len(pure.build_udp_fragments(src, sink.addr, data(n), 1300)) for n in (3000, 2500)]
    cap = _capture(topo)
    try:
        with topo.rtr.enter(), RawSender(mtu=1300, ttl=64) as s:
            s.send_many([(src, sink.addr, data(3000)), (src, sink.addr, data(2500))])
        pkts = _captured(cap, v6, sum(counts))
    finally:
        cap.close()
    assert all(len(p) <= 1300 for p in pkts)
    groups = [pkts[:counts[0]], pkts[counts[0]:]]
    ids = [[IPv6(p)[IPv6ExtHdrFragment].id if v6 else IP(p).id for p in g] for g in groups]
    assert len(set(ids[0])) == len(set(ids[1])) == 1 and ids[0][0] != ids[1][0]
    assert 0 not in ids[0] + ids[1]
    m = native or pure
    for payload, group, ident in ((data(3000), groups[0], ids[0][0]),
                                  (data(2500), groups[1], ids[1][0])):
        assert m.build_udp_fragments(src, sink.addr, payload, 1300, ident=ident) == group
    assert sorted(p for p, _ in sink.read(2)) == sorted([data(3000), data(2500)])


@pytest.mark.parametrize("fam", [4, 6])
def test_sender_mtu_above_the_interface(RawSender, fam, topo):
    """An mtu the route cannot carry: the kernel refuses the fragment, PacketTooBig says
    so (with its MTU) and counts only whole datagrams in .sent."""
    family, host, spoof = ((socket.AF_INET, CLI4, SRV4) if fam == 4
                           else (socket.AF_INET6, CLI6, SRV6))
    sink = Sink(topo.cli, family, host)
    first = len(pure.build_udp_fragments((spoof, 1), sink.addr, data(9000), 4000)[0])
    with topo.rtr.enter(), RawSender(mtu=4000) as s:
        with pytest.raises(PacketTooBig) as info:
            s.send_many([((spoof, 1), sink.addr, b"a"), ((spoof, 1), sink.addr, data(9000))])
        e = info.value
        assert (e.limit, e.size, e.sent) == ("interface MTU", first, 1)
        assert str(e) == (f"fragment of {first} bytes is larger than the interface MTU (1500 "
                          "bytes); the sender's mtu of 4000 is too large for this route")
        with pytest.raises(PacketTooBig, match="raw packets are not fragmented") as info:
            s.send((spoof, 1), sink.addr, data(2000))      # fits the mtu: one packet
        assert info.value.size == 2000 + (48 if fam == 6 else 28)
    assert sink.read(1) == [(b"a", (spoof, 1))]


# -- relay redir: raw replies larger than the MTU -----------------------------------------

# Answers a datagram "SIZE[,SIZE...]" with one datagram of each size (deterministic bytes),
# from port 53: binding it needs CAP_NET_BIND_SERVICE, which the relay's workers (user
# nobody) do not have, so the transparent fallback could not send these.
SIZED_SERVER = r"""
import random, selectors, socket, sys
sel = selectors.DefaultSelector()
for host in sys.argv[1:]:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.bind((host, 53))
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        q, peer = key.fileobj.recvfrom(65535)
        for n in q.decode().split(","):
            n = int(n)
            key.fileobj.sendto(random.Random(n * 7919).randbytes(n), peer)
"""

DROPS = ("drop_malformed", "drop_buffer_full", "drop_send_error", "drop_table_full",
         "drop_too_big", "drop_no_route", "drop_denied", "reply_fallback")


def start_sized(ns, *hosts):
    p = ns.python(SIZED_SERVER, *hosts, text=True)
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    return p


def tproxy(topo, action, *ifaces):
    r = subprocess.run(
        ["ip", "netns", "exec", topo.rtr.name, sys.executable, "-m", "relay", "rules", action,
         "--port", "7000", *[a for i in ifaces for a in ("--iface", i)]],
        capture_output=True, text=True, env=relay_env(), timeout=30)
    assert r.returncode == 0, r.stderr


def ask(sock, server, sizes):
    """Send one query for replies of these sizes; the replies (payload, source) in order
    of arrival."""
    sock.sendto(",".join(map(str, sizes)).encode(), server)
    return [(d, peer[:2]) for d, peer in (sock.recvfrom(70000) for _ in sizes)]


def redir(topo):
    return RelayProcess(["redir", "--listen", "[::]:7000"], ns=topo.rtr).wait_ready()


@pytest.mark.parametrize("fam", [4, 6])
def test_redir_large_replies_arrive_as_fragments(topo, fam):
    """DNS-like answers of 2020 and 65000 bytes from port 53, through the relay's raw
    replies over a 1500-byte MTU: they arrive whole at the client, counted as fragmented
    replies, with nothing dropped and no transparent fallback."""
    family, srv = (socket.AF_INET, SRV4) if fam == 4 else (socket.AF_INET6, SRV6)
    tproxy(topo, "apply", "rtr0")
    start_sized(topo.srv, SRV4, SRV6)
    with redir(topo) as relay:
        c = topo.cli.socket(family)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        c.settimeout(5)
        small = 1400 if fam == 4 else 1300
        got = ask(c, (srv, 53), [2020])
        got += ask(c, (srv, 53), [65000])
        top = MAX6 if fam == 6 else MAX4
        got += ask(c, (srv, 53), [small, 3000, 12, top, 1473, 1])
        sizes = [2020, 65000, small, 3000, 12, top, 1473, 1]
        assert sorted(got) == sorted((data(n), (srv, 53)) for n in sizes)
        big = sum(1 for n in sizes if n + (48 if fam == 6 else 28) > 1500)
        st = relay.settled_stats(lambda st: st["down_datagrams"] == len(sizes))
        assert st["reply_fragmented"] == big
        assert st["down_bytes"] == sum(sizes)
        assert {k: st[k] for k in DROPS} == dict.fromkeys(DROPS, 0)
        assert st["transparent_open"] == 0


def test_redir_replies_within_the_mtu_are_not_fragmented(topo):
    """Replies that fit the MTU (1500 bytes and less, both families) go whole: nothing
    is counted as fragmented."""
    tproxy(topo, "apply", "rtr0")
    start_sized(topo.srv, SRV4, SRV6)
    with redir(topo) as relay:
        c4 = topo.cli.socket(socket.AF_INET)
        c6 = topo.cli.socket(socket.AF_INET6)
        for c in (c4, c6):
            c.settimeout(5)
        got4 = ask(c4, (SRV4, 53), [1472, 1281, 0])
        got6 = ask(c6, (SRV6, 53), [1452, 1300, 5])
        assert sorted(d for d, _ in got4) == sorted(data(n) for n in (1472, 1281, 0))
        assert sorted(d for d, _ in got6) == sorted(data(n) for n in (1452, 1300, 5))
        st = relay.settled_stats(lambda st: st["down_datagrams"] == 6)
        assert st["reply_fragmented"] == 0 and st["reply_fallback"] == 0


def test_redir_learns_a_smaller_mtu_from_the_kernel(topo):
    """Two client links: cli0 (MTU 1500) and a second one with MTU 1400. After a reply to
    a client on cli0 has taught the relay MTU 1500, a 1450-byte reply to a client on the
    1400 link is refused by the kernel (EMSGSIZE); the relay learns 1400 from it and sends
    that reply again as fragments. Both families."""
    c4b, r4b, c6b, r6b = "203.0.113.2", "203.0.113.1", "2001:db8:3::2", "2001:db8:3::1"
    topo.rtr.run("ip", "link", "add", "rtr2", "type", "veth", "peer", "name", "cli1",
                 "netns", topo.cli.name)
    for ns, dev, addrs in ((topo.rtr, "rtr2", (f"{r4b}/24", f"{r6b}/64")),
                           (topo.cli, "cli1", (f"{c4b}/24", f"{c6b}/64"))):
        for a in addrs:
            ns.run("ip", "addr", "add", a, "dev", dev, *(["nodad"] if ":" in a else []))
        ns.run("ip", "link", "set", dev, "mtu", "1400", "up")
    # traffic from the second client addresses leaves through cli1
    topo.cli.run("ip", "rule", "add", "from", c4b, "table", "100")
    topo.cli.run("ip", "route", "add", "default", "via", r4b, "table", "100")
    topo.cli.run("ip", "-6", "rule", "add", "from", c6b, "table", "100")
    topo.cli.run("ip", "-6", "route", "add", "default", "via", r6b, "dev", "cli1", "table", "100")
    tproxy(topo, "apply", "rtr0", "rtr2")
    start_sized(topo.srv, SRV4, SRV6)
    with redir(topo) as relay:
        n = 0
        for family, srv, host_a, host_b in ((socket.AF_INET, SRV4, CLI4, c4b),
                                            (socket.AF_INET6, SRV6, CLI6, c6b)):
            a, b = topo.cli.socket(family), topo.cli.socket(family)
            a.bind((host_a, 0))
            b.bind((host_b, 0))
            for s in (a, b):
                s.settimeout(5)
            assert ask(a, (srv, 53), [2020]) == [(data(2020), (srv, 53))]
            # 1450 may come after 3000: it is sent again after the batch it was refused in
            assert sorted(ask(b, (srv, 53), [1350, 1450, 3000])) == sorted(
                (data(k), (srv, 53)) for k in (1350, 1450, 3000))
            assert ask(b, (srv, 53), [1450]) == [(data(1450), (srv, 53))]
            n += 5
            st = relay.settled_stats(lambda st: st["down_datagrams"] == n)
            # fragmented: 2020 to a; 1450 (sent again), 3000 and the second 1450 to b
            assert st["reply_fragmented"] == 4 * n // 5
            assert {k: st[k] for k in DROPS} == dict.fromkeys(DROPS, 0)
