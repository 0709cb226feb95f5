"""Two relays carrying UDP in disguise, in namespaces:

    client (cli) -> relay A (cli): forward --header-out KIND
                 -> rtr (capture on rtr1) ->
                 relay B (srv): forward --header-in KIND -> echo (srv)

for every kind, over IPv4 and IPv6 between A and B, --offload on on both. What crosses rtr is
captured (AF_PACKET, parsed with scapy) and checked against the layout of
relay/proto/disguise.py, both ways; a datagram to B without a valid header is counted
drop_bad_header. One topology and one pair of relays (a listener per kind and family)
serve the whole module."""
import os
import socket
import tempfile
import time

import pytest

from relay.proto import disguise as H
from tests.support import check_disguise_steps
from tests import namespaces as N
from tests.namespaces import SRV4, SRV6
from tests.relayproc import RelayProcess

pytestmark = pytest.mark.netns

B4_PORT, B6_PORT, A4_PORT, A6_PORT, ECHO_PORT = 7100, 7150, 7200, 7300, 7000
FAMILIES = ("ipv4", "ipv6")


def _listener(name, listen, to, **kw):
    lines = ["[[listener]]", f'name = "{name}"', 'mode = "forward"', f'listen = "{listen}"',
             f'to = "{to}"', 'offload = "on"', "workers = 1"]
    lines += [f'{k} = "{v}"' for k, v in kw.items()]
    return "\n".join(lines) + "\n"


def _start(ns, listeners):
    d = tempfile.mkdtemp(prefix="relay-disguise-")
    control = os.path.join(d, "control.sock")
    path = os.path.join(d, "relay.toml")
    with open(path, "w") as f:
        f.write(f'[global]\nworkers = 1\ncontrol_socket = "{control}"\nlog_level = "debug"\n\n')
        f.write("\n".join(listeners))
    r = RelayProcess(["run", "-c", path], ns=ns)
    r.control = control
    return r.wait_ready()


class Pair:
    def __init__(self):
        self.topo = N.Topology()
        self.relays = []
        try:
            N.start_echo(self.topo.srv, f"{SRV4}:{ECHO_PORT}", f"[{SRV6}]:{ECHO_PORT}")
            b, a = [], []
            for i, kind in enumerate(H.KINDS):
                b.append(_listener(f"in-{kind}-ipv4", f"0.0.0.0:{B4_PORT + i}",
                                   f"{SRV4}:{ECHO_PORT}", header_in=kind))
                b.append(_listener(f"in-{kind}-ipv6", f"[{SRV6}]:{B6_PORT + i}",
                                   f"[{SRV6}]:{ECHO_PORT}", header_in=kind))
                a.append(_listener(f"out-{kind}-ipv4", f"127.0.0.1:{A4_PORT + i}",
                                   f"{SRV4}:{B4_PORT + i}", header_out=kind))
                a.append(_listener(f"out-{kind}-ipv6", f"[::1]:{A6_PORT + i}",
                                   f"[{SRV6}]:{B6_PORT + i}", header_out=kind))
            self.relays.append(_start(self.topo.srv, b))
            self.relays.append(_start(self.topo.cli, a))
        except BaseException:
            self.close()
            raise
        self.b, self.a = self.relays

    def client(self, kind, fam):
        i = H.KINDS.index(kind)
        if fam == "ipv4":
            s = self.topo.cli.socket(socket.AF_INET)
            s.connect(("127.0.0.1", A4_PORT + i))
        else:
            s = self.topo.cli.socket(socket.AF_INET6)
            s.connect(("::1", A6_PORT + i))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        s.settimeout(3)
        return s

    def close(self):
        for r in self.relays:
            r.close()
        self.topo.close()


@pytest.fixture(scope="module")
def pair(netns_available):
    p = Pair()
    yield p
    p.close()


class Capture:
    """UDP datagrams to or from B's port of one kind, as seen on rtr1 (towards srv)."""

    def __init__(self, topo, port):
        self.port = port
        self.sock = topo.rtr.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        self.sock.bind(("rtr1", 0))
        self.sock.settimeout(0.2)

    def read(self, want_out, want_back, seg=65535, timeout=5.0):
        """(to B, from B): the UDP payloads in the order seen, until each list holds as
        many as asked. A GSO packet may be seen whole (veth carries it so, not yet cut):
        it is cut into its seg-byte datagrams."""
        from scapy.layers.inet import UDP
        from scapy.layers.l2 import Ether
        out, back = [], []
        deadline = time.monotonic() + timeout
        while (len(out) < want_out or len(back) < want_back) and time.monotonic() < deadline:
            try:
                raw = self.sock.recv(70000)
            except socket.timeout:
                continue
            pkt = Ether(raw)
            if UDP not in pkt:
                continue
            u = pkt[UDP]
            data = bytes(u.payload)
            cut = [data[k:k + seg] for k in range(0, len(data), seg)] or [data]
            if u.dport == self.port:
                out += cut
            elif u.sport == self.port:
                back += cut
        return out, back

    def close(self):
        self.sock.close()


def _unwrap(kind, datagrams):
    assert all(H.check(kind, d) for d in datagrams)
    n = H.size(kind)
    check_disguise_steps(kind, [d[:n] for d in datagrams])
    return [d[n:] for d in datagrams]


def _port(kind, fam="ipv6"):
    return (B4_PORT if fam == "ipv4" else B6_PORT) + H.KINDS.index(kind)


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("kind", H.KINDS)
def test_every_kind_carries_every_size_disguised_on_the_wire(pair, kind, fam):
    """Sizes 0, 1, 1000 and 1472 - header over IPv4, 1452 - header over IPv6 (the largest
    that fit the 1500-byte MTU with the header) are checked on the wire, both ways; 30000
    and the family's largest payload less the header (IP fragments between the relays)
    end to end."""
    h = H.size(kind)
    top = (65507 if fam == "ipv4" else 65527) - h
    small = [0, 1, 1000, (1472 if fam == "ipv4" else 1452) - h]
    c = pair.client(kind, fam)
    cap = Capture(pair.topo, _port(kind, fam))
    try:
        payloads = [bytes([i + 1]) * n for i, n in enumerate(small + [30000, top])]
        for p in payloads:
            c.send(p)
            assert c.recv(65535) == p
        out, back = cap.read(len(small), len(small))
    finally:
        cap.close()
        c.close()
    assert _unwrap(kind, out[:len(small)]) == payloads[:len(small)]
    assert _unwrap(kind, back[:len(small)]) == payloads[:len(small)]


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("kind", H.KINDS)
def test_gso_run_through_gro_on_both_relays(pair, kind, fam):
    """A client's GSO send of 24 datagrams: A (--offload on) takes it as one buffer and sends it on
    as one GSO send of 1000 + header byte segments, each with its own header (numbers
    counting up); B (--offload on) strips every segment's header; all 24 come back, in order."""
    from relay import BatchSocket
    h = H.size(kind)
    c = pair.client(kind, fam)
    cap = Capture(pair.topo, _port(kind, fam))
    payloads = [bytes([i]) * 1000 for i in range(23)] + [b"end"]
    try:
        with BatchSocket(c.fileno(), batch=64) as b:
            assert b.send_gso(b"".join(payloads), 1000) == len(payloads)
        got = [c.recv(65535) for _ in payloads]
        out, back = cap.read(len(payloads), len(payloads), seg=1000 + h)
    finally:
        cap.close()
        c.close()
    assert got == payloads
    assert _unwrap(kind, out) == payloads
    assert _unwrap(kind, back) == payloads


@pytest.mark.parametrize("kind", [k for k in H.KINDS if k != "noop"])
def test_datagrams_without_a_valid_header_are_dropped_and_counted(pair, kind):
    name = f"in-{kind}-ipv6"
    before = pair.b.stats(name)["drop_bad_header"]
    bad = bytearray(H.HeaderWriter(kind).next() + b"payload")
    bad[H.size(kind) - 1 if kind != "srtp" else 0] ^= 0xFF
    s = pair.topo.cli.socket(socket.AF_INET6)
    try:
        s.settimeout(0.3)
        for d in (bytes(bad), b"plain", b""):
            s.sendto(d, (SRV6, _port(kind)))
        s.sendto(H.HeaderWriter(kind).next() + b"good", (SRV6, _port(kind)))
        reply = s.recv(65535)
        with pytest.raises(socket.timeout):
            s.recv(65535)
    finally:
        s.close()
    assert H.strip(kind, reply) == b"good"
    st = pair.b.settled_stats(lambda st: st["drop_bad_header"] == before + 3, listener=name)
    assert st["assoc_created"] >= 1
