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
@pytest.mark.parametrize("fam", [4, 6])
def test_every_size_both_ways_from_the_remotes_address(tun_topo, fam, offload):
    family, srv, _ = FAMILIES[fam]
    with start_tun(tun_topo, offload=offload) as relay:
        c = tun_topo.cli.socket(family)
        for size in SIZES:
            data, src = udp_roundtrip(c, (srv, 7), payload(size, size))
            assert data == payload(size, size), size
            assert src == (srv, 7)
        st = relay.settled_stats(lambda s: s["down_datagrams"] >= len(SIZES))
        assert st["up_datagrams"] == len(SIZES) and st["assoc_created"] == 1
        assert st["frag_reassembled"] >= 3          # 8000, 65507 and 1473 (IPv4) came in pieces
        assert st["reply_fragmented"] >= 2
        assert st["drop_malformed"] == 0
        c.close()
