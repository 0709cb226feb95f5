"""The benchmark's peers without a process (bench/peers.py): `kernel` (nftables DNAT/SNAT in
mid) and `direct` (mid routes). Each moves a datagram while it runs, and leaves mid as it
found it: forwarding off, no nftables table, no conntrack entry that would rewrite a later
implementation's flow."""
import socket
import subprocess
import sys

import pytest

from bench import peers, topo

SEND = ("import socket, sys; s = socket.socket(2, 2); "
        "s.bind(('0.0.0.0', int(sys.argv[3]))); "
        "s.sendto(b'probe', (sys.argv[1], int(sys.argv[2])))")
RECV = ("import socket, sys; s = socket.socket(2, 2); s.bind(('0.0.0.0', 9000)); "
        "s.settimeout(float(sys.argv[1])); print('ready', flush=True)\n"
        "try:\n d, a = s.recvfrom(64); print(a[0], d.decode())\n"
        "except socket.timeout:\n print('none')")


@pytest.fixture(scope="module")
def bench_topo(netns_available):
    t = topo.BenchTopo()
    yield t
    t.close()


def _send_and_receive(t, dst, sport, timeout=1.0):
    rx = t.sink.popen([sys.executable, "-c", RECV, timeout], stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout.readline().strip() == "ready"
        t.gen.run(sys.executable, "-c", SEND, dst[0], dst[1], sport)
        out, _ = rx.communicate(timeout=timeout + 10)
    finally:
        if rx.poll() is None:
            rx.kill()
    return out.split()


def _mid_state(t):
    fwd = t.mid.run("sysctl", "-n", "net.ipv4.ip_forward").stdout.strip()
    tables = t.mid.run("nft", "list", "tables").stdout.strip()
    ct = t.mid.run("cat", "/proc/sys/net/netfilter/nf_conntrack_count", check=False)
    return fwd, tables, ct.stdout.strip() or "0"


def test_kernel_forwards_while_it_runs_and_leaves_nothing(bench_topo):
    t = bench_topo
    k = peers.Kernel(t.mid, "/tmp", "forward").start((topo.MID4_GEN, 7000), (topo.SINK4, 9000))
    try:
        assert _mid_state(t)[0] == "1"
        # DNAT to the sink, SNAT to mid: the sink sees mid's address, like behind a relay
        assert _send_and_receive(t, (topo.MID4_GEN, 7000), 40001) == [topo.MID4_SINK, "probe"]
        assert int(_mid_state(t)[2]) >= 1
    finally:
        k.stop()
    assert _mid_state(t) == ("0", "", "0")
    # the same source port again: no rule, no conntrack binding, forwarding off
    assert _send_and_receive(t, (topo.MID4_GEN, 7000), 40001, timeout=0.3) == ["none"]
    assert k.pids() == [] and k.procs == []


def test_direct_routes_while_it_runs(bench_topo):
    t = bench_topo
    d = peers.Direct(t.mid, "/tmp", "forward").start(None, None)
    try:
        assert _send_and_receive(t, (topo.SINK4, 9000), 40002) == [topo.GEN4, "probe"]
    finally:
        d.stop()
    assert _mid_state(t)[:2] == ("0", "")
    assert _send_and_receive(t, (topo.SINK4, 9000), 40003, timeout=0.3) == ["none"]


def test_flush_conntrack_empties_the_table(bench_topo):
    assert topo.flush_conntrack(bench_topo.mid) is True
    assert _mid_state(bench_topo)[2] == "0"
