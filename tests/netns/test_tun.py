"""`relay tun` end to end: client -- rtr (TUN relay0, `relay rules tun`) -- srv.

One topology for the module (the tests only read it); each test starts its own relay, of
the implementation under test (impl: compiled, then pure) and with offload on or off."""
import socket
import struct
import subprocess
import sys

import pytest

from tests.namespaces import (CLI4, CLI6, SRV4, SRV4_B, SRV6, SRV6_B, Topology, start_echo,
                              wait_until)
from tests.relayproc import RelayProcess, relay_env, udp_roundtrip
from tests.support import ALLOW_SRV_HOST, serve_in, wait_tcp

pytestmark = [pytest.mark.netns, pytest.mark.usefixtures("impl")]

DEV = "relay0"
FAMILIES = {4: (socket.AF_INET, SRV4, SRV4_B), 6: (socket.AF_INET6, SRV6, SRV6_B)}
SIZES = (0, 1, 1472, 1473, 8000, 65507)
CONE = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for a, b in ((sys.argv[1], sys.argv[2]), (sys.argv[3], sys.argv[4])):
    fam = socket.AF_INET6 if ":" in a else socket.AF_INET
    sa = socket.socket(fam, socket.SOCK_DGRAM); sa.bind((a, 6000))
    sb = socket.socket(fam, socket.SOCK_DGRAM); sb.bind((b, 6001))
    sel.register(sa, selectors.EVENT_READ, sb)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        data, peer = key.fileobj.recvfrom(65535)
        key.data.sendto(b"cone:" + data, peer)
"""


def rules_tun(topo, action, *extra):
    return subprocess.run(
        ["ip", "netns", "exec", topo.rtr.name, sys.executable, "-m", "relay", "rules", "tun",
         action, "--dev", DEV, "--iface", "rtr0", *extra],
        capture_output=True, text=True, env=relay_env(), timeout=30)


@pytest.fixture(scope="module")
def tun_topo(netns_available):
    t = Topology()
    try:
        start_echo(t.srv, f"{SRV4}:7", f"[{SRV6}]:7")
        p = t.srv.python(CONE, SRV4, SRV4_B, SRV6, SRV6_B)
        assert p.stdout.readline().strip() == b"ready"
        allow = ",".join(ALLOW_SRV_HOST)
        serve_in(t.srv, "tunnel-server", "--listen", "[::]:8443", "--secret", "s3cret",
                 "--allow", allow)
        serve_in(t.srv, "socks5", "--listen", "[::]:1080", "--username", "u", "--password",
                 "p", "--allow", allow)
        wait_tcp(t.srv, (SRV4, 8443))
        wait_tcp(t.srv, (SRV4, 1080))
        r = rules_tun(t, "apply")
        assert r.returncode == 0, r.stderr
        yield t
    finally:
        t.close()


def start_tun(topo, *extra, offload="off", workers=1):
    return RelayProcess(["tun", "--dev", DEV, "--address", "198.18.0.1/30,fd00::1/126",
                         "--offload", offload, *extra], ns=topo.rtr, workers=workers).wait_ready()


def payload(size, seed=0):
    return bytes((i * 7 + seed) & 0xFF for i in range(size))


@pytest.mark.parametrize("offload", ["off", "on"])
def test_every_size_both_ways_from_the_remotes_address(tun_topo, offload):
    with start_tun(tun_topo, offload=offload) as relay:
        for fam in (4, 6):
            family, srv, _ = FAMILIES[fam]
            c = tun_topo.cli.socket(family)
            for size in SIZES:
                data, src = udp_roundtrip(c, (srv, 7), payload(size, size))
                assert data == payload(size, size), size
                assert src == (srv, 7)
            c.close()
        n = 2 * len(SIZES)
        st = relay.settled_stats(lambda s: s["down_datagrams"] >= n)
        assert st["up_datagrams"] == n and st["assoc_created"] == 2
        # 1473, 8000 and 65507 came in pieces and went back in pieces, and 1472 over IPv6
        assert st["frag_reassembled"] == st["reply_fragmented"] == 7
        assert st["drop_malformed"] == 0


def test_full_cone_second_remote_delivered_as_itself(tun_topo):
    with start_tun(tun_topo) as relay:
        for fam in (4, 6):
            family, srv, srv_b = FAMILIES[fam]
            c = tun_topo.cli.socket(family)
            data, src = udp_roundtrip(c, (srv, 6000), b"who answers?")
            assert (data, src) == (b"cone:who answers?", (srv_b, 6001))
            c.close()
        relay.settled_stats(lambda s: s["down_datagrams"] == 2 and s["assoc_created"] == 2)


UPSTREAMS = {"tunnel": ["--upstream", f"tunnel://{SRV4}:8443", "--secret", "s3cret"],
             "socks5": ["--upstream", f"socks5://u:p@{SRV4}:1080"]}


@pytest.mark.parametrize("kind", sorted(UPSTREAMS))
def test_each_upstream_kind_both_families(tun_topo, kind):
    with start_tun(tun_topo, *UPSTREAMS[kind]) as relay:
        for fam in (4, 6):
            family, srv, _ = FAMILIES[fam]
            c = tun_topo.cli.socket(family)
            for size in (0, 1400, 3000):
                want = payload(size, fam)
                wait_until(lambda: _answered(c, (srv, 7), want), 10, what=f"{kind} reply")
            c.close()
        st = relay.settled_stats(lambda s: s["down_datagrams"] >= 6)
        assert st["conn_open"] >= 1 and st["drop_malformed"] == 0


def _answered(sock, dst, want):
    try:
        data, src = udp_roundtrip(sock, dst, want, timeout=1.0)
    except OSError:
        return False
    return data == want and src == dst


def test_a_thousand_flows(tun_topo):
    with start_tun(tun_topo, offload="auto") as relay:
        socks = []
        try:
            for i in range(1000):
                s = tun_topo.cli.socket(socket.AF_INET if i % 2 else socket.AF_INET6)
                s.settimeout(3)
                socks.append(s)
            for wave in range(0, 1000, 50):             # within the device's queue (500)
                for i in range(wave, wave + 50):
                    socks[i].sendto(b"flow %d" % i, (SRV4 if i % 2 else SRV6, 7))
                for i in range(wave, wave + 50):
                    assert socks[i].recv(100) == b"flow %d" % i
        finally:
            for s in socks:
                s.close()
        st = relay.settled_stats(lambda s: s["down_datagrams"] >= 1000)
        assert st["assoc_created"] == 1000 and st["assoc_open"] == 1000


@pytest.mark.parametrize("offload", ["off", "on"])
def test_a_gso_send_reaches_the_relay_as_one_run_only_with_offload(tun_topo, offload):
    with start_tun(tun_topo, offload=offload) as relay:
        for fam in (4, 6):
            family, srv, _ = FAMILIES[fam]
            c = tun_topo.cli.socket(family)
            c.setsockopt(socket.SOL_UDP, 103, 1000)     # UDP_SEGMENT: ten datagrams, one send
            c.settimeout(3)
            c.sendto(bytes(range(250)) * 40, (srv, 7))
            got = [c.recv(2000) for _ in range(10)]
            assert got == [(bytes(range(250)) * 4)] * 10
            c.close()
        st = relay.settled_stats(lambda s: s["down_datagrams"] == 20)
        assert st["up_datagrams"] == 20
        assert st["tun_runs_in"] == (2 if offload == "on" else 0)


def _raw_udp(fam, src, dst, dport, body, bad):
    """An IPv4/IPv6 UDP packet with a wrong UDP checksum (bad="csum") or UDP length ("len")."""
    from scapy.all import IP, UDP, IPv6, Raw, raw
    ip = IP(src=src, dst=dst) if fam == 4 else IPv6(src=src, dst=dst)
    pkt = bytearray(raw(ip / UDP(sport=4242, dport=dport) / Raw(body)))
    at = 20 if fam == 4 else 40
    if bad == "csum":
        pkt[at + 6] ^= 0x5A
    else:
        pkt[at + 5] += 2
    return bytes(pkt)


def test_bad_packets_dropped_and_port_unreachable_passed_on(tun_topo):
    with start_tun(tun_topo) as relay:
        for fam in (4, 6):
            family, srv, _ = FAMILIES[fam]
            cli = CLI4 if fam == 4 else CLI6
            raw = tun_topo.cli.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            for bad in ("csum", "len"):
                raw.sendto(_raw_udp(fam, cli, srv, 7, b"broken", bad), (srv, 0))
            raw.close()
            relay.settled_stats(lambda s: s["drop_malformed"] == (2 if fam == 4 else 4))
            c = tun_topo.cli.socket(family)
            assert udp_roundtrip(c, (srv, 7), b"fine")[0] == b"fine"
            c.close()
            c = tun_topo.cli.socket(family)
            c.connect((srv, 9))                    # nothing listens there
            c.settimeout(3)
            c.send(b"hello?")
            with pytest.raises(ConnectionRefusedError):
                c.recv(100)
            c.close()
        st = relay.settled_stats(lambda s: s["tun_icmp_sent"] == 2)
        assert st["icmp_errors"] >= 2 and st["up_datagrams"] == 4


def _doctor_tun(topo, relay=None):
    import json
    args = ["--control", relay.control] if relay else ["--control", "", "--dev", DEV]
    r = subprocess.run(["ip", "netns", "exec", topo.rtr.name, sys.executable, "-m", "relay",
                        "doctor", "--json", *args], capture_output=True, text=True,
                       env=relay_env(), timeout=60)
    return next(c for c in json.loads(r.stdout)["checks"] if c["name"] == "tun")


def test_doctor_checks_the_tun_setup(tun_topo):
    with start_tun(tun_topo) as relay:
        c = _doctor_tun(tun_topo, relay)
        assert c["ok"] and "UDP routed in: IPv4 table 110 from rtr0" in c["message"], c
        tun_topo.rtr.run("sysctl", "-qw", f"net.ipv4.conf.{DEV}.rp_filter=1")
        try:
            c = _doctor_tun(tun_topo, relay)
            assert not c["ok"] and "strict rp_filter on relay0" in c["message"]
            assert c["fix"] == f"sysctl -w net.ipv4.conf.{DEV}.rp_filter=2"
        finally:
            tun_topo.rtr.run("sysctl", "-qw", f"net.ipv4.conf.{DEV}.rp_filter=0")
    c = _doctor_tun(tun_topo)
    assert not c["ok"] and "relay0 is up but not served" in c["message"], c


def test_one_queue_per_worker(tun_topo):
    with start_tun(tun_topo, workers=2) as relay:
        def queues():
            out = tun_topo.rtr.run("ls", f"/sys/class/net/{DEV}/queues").stdout.split()
            return sorted(q for q in out if q.startswith("tx-"))
        wait_until(lambda: queues() == ["tx-0", "tx-1"], 10, what="two queues")
        socks = [tun_topo.cli.socket(socket.AF_INET) for _ in range(20)]
        try:
            for i, s in enumerate(socks):
                assert udp_roundtrip(s, (SRV4, 7), b"q%d" % i)[0] == b"q%d" % i
        finally:
            for s in socks:
                s.close()
        st = relay.settled_stats(lambda s: s["down_datagrams"] == 20)
        assert st["assoc_created"] == 20
