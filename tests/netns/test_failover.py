"""Several upstreams in namespaces: forward in rtr with two tunnel servers in srv (one on
each of srv's addresses), a steady load from eight client addresses in cli, and one
server killed (SIGKILL) under that load. Every datagram sent from BOUND seconds after the
kill on is echoed, through the other server; the flows that moved are counted
(upstream_failover) and are exactly those of the dead server; `relay stats` shows each
upstream's health and flows. The server then comes back on its address: failover mode
leaves the flows where they are (the new server carries nothing), hash mode moves its
clients back (the new server carries exactly theirs). And redir over a SOCKS5 and a gost
server, the SOCKS5 one killed: noticed by the background check."""
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time

import pytest

from relay.datapath.pure.balance import hrw_order, upstream_seed
from relay.supervisor import query
from tests.namespaces import RTR4_CLI, RTR6_CLI, SRV4, SRV4_B, SRV6, SRV6_B, Topology, start_echo
from tests.relayproc import RelayProcess, relay_env, udp_roundtrip, wait_until
from tests.support import ALLOW

pytestmark = pytest.mark.netns

BOUND = 0.5              # seconds from the kill after which nothing may be lost (measured:
                         # about 15 ms, bench/README.md "Failover")
CLIENTS4 = [f"192.0.2.{30 + i}" for i in range(8)]
CLIENTS6 = [f"2001:db8:1::{30 + i:x}" for i in range(8)]
INTERVAL = 0.02          # each client sends every INTERVAL seconds
LOAD = 1.6               # seconds of load; the kill KILL_AT seconds into it
KILL_AT = 0.4
SECRET = "s3cret"


@pytest.fixture(scope="module")
def mtopo(netns_available):
    """One topology for the module (tests only add processes to it): echo on srv, the
    client addresses on cli."""
    t = Topology()
    try:
        start_echo(t.srv, f"{SRV4}:5000", f"[{SRV6}]:5000")
        for a in CLIENTS4:
            t.cli.run("ip", "addr", "add", f"{a}/24", "dev", "cli0")
        for a in CLIENTS6:
            t.cli.run("ip", "addr", "add", f"{a}/64", "dev", "cli0", "nodad")
        yield t
    finally:
        t.close()


def url(host, port):
    return f"tunnel://[{host}]:{port}" if ":" in host else f"tunnel://{host}:{port}"


def tunnel_server(topo, host, port):
    """A tunnel-server process (not waited for: see RelayProcess.wait_ready)."""
    return RelayProcess(["tunnel-server", "--listen", f"[{host}]:{port}" if ":" in host
                         else f"{host}:{port}", "--secret", SECRET, "--allow", ALLOW],
                        ns=topo.srv, log_level="warning")


def kill(relay):
    """SIGKILL the relay and its workers (one process group): no goodbye to anyone."""
    os.killpg(relay.proc.pid, signal.SIGKILL)
    relay.proc.wait(5)


def upstreams(relay):
    (ups,) = json.loads(query(relay.control, "stats"))["upstreams"].values()
    return ups


def settled_upstreams(relay, pred, timeout=6.0):
    last = []

    def check():
        last[:] = upstreams(relay)
        return pred(last)
    try:
        wait_until(check, timeout, what="upstreams")
    except TimeoutError:
        raise AssertionError(f"upstreams never matched: {last}\n{relay.log()}")
    return last


def load(topo, socks, dst, kill_at, on_kill):
    """Each client sends a numbered datagram every INTERVAL for LOAD seconds; on_kill() is
    called kill_at seconds in. Returns (sent {(client, n): time}, echoed set, kill time)."""
    sent, echoed, t_kill = {}, set(), None
    start = time.monotonic()
    n = 0
    while True:
        now = time.monotonic()
        if now - start >= LOAD:
            break
        if t_kill is None and now - start >= kill_at:
            on_kill()
            t_kill = time.monotonic()
        for i, s in enumerate(socks):
            s.sendto(b"%d/%d" % (i, n), dst)
            sent[(i, n)] = time.monotonic()
        n += 1
        end = now + INTERVAL
        while (left := end - time.monotonic()) > 0:
            ready, _, _ = select.select(socks, [], [], left)
            for s in ready:
                echoed.add(tuple(int(x) for x in s.recv(100).split(b"/")))
    drain = time.monotonic() + 0.5
    while (left := drain - time.monotonic()) > 0 and len(echoed) < len(sent):
        ready, _, _ = select.select(socks, [], [], left)
        for s in ready:
            echoed.add(tuple(int(x) for x in s.recv(100).split(b"/")))
    return sent, echoed, t_kill


def round_trip_all(socks, dst, tag):
    for i, s in enumerate(socks):
        msg = b"%s%d" % (tag, i)
        s.settimeout(3)
        for _ in range(3):
            s.sendto(msg, dst)
            try:
                if s.recv(100) == msg:
                    break
            except socket.timeout:
                continue
        else:
            raise AssertionError(f"client {i}: no echo of {msg!r}")


@pytest.mark.parametrize("mode", ["failover", "hash"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_kill_one_server_under_load(mtopo, mode, v6):
    """The compiled cores (the pure twins: tests/unit/test_balance.py, with live servers)."""
    topo = mtopo
    port = 8443 + 2 * (2 * v6 + (mode == "hash"))      # a port pair per test
    hosts = (SRV6, SRV6_B) if v6 else (SRV4, SRV4_B)
    clients = CLIENTS6 if v6 else CLIENTS4
    family = socket.AF_INET6 if v6 else socket.AF_INET
    dst = (RTR6_CLI if v6 else RTR4_CLI, 6000 + port)
    urls = [url(h, port) for h in hosts]
    servers = [tunnel_server(topo, h, port) for h in hosts]
    relay = RelayProcess(["forward", "--listen", f"[::]:{dst[1]}", "--to",
                          f"[{SRV6}]:5000" if v6 else f"{SRV4}:5000",
                          "--upstream", urls[0], "--upstream", urls[1], "--balance", mode,
                          "--secret", SECRET], ns=topo.rtr, log_level="warning")
    socks = []
    try:
        for r in (*servers, relay):             # started together, waited for together
            r.wait_ready()
        for c in clients:
            s = topo.cli.socket(family)
            s.bind((c, 0))
            socks.append(s)
        # where each client goes: the first upstream, or by the hash of its address
        seeds = [upstream_seed(u) for u in urls]
        want = [0] * len(clients) if mode == "failover" else \
            [hrw_order(c, seeds)[0] for c in clients]
        if mode == "hash":
            assert set(want) == {0, 1}, "the clients all hash to one upstream"
        settled_upstreams(relay, lambda ups: [u["healthy"] for u in ups] == [True, True])
        round_trip_all(socks, dst, b"warm")
        per = [want.count(0), want.count(1)]
        settled_upstreams(relay, lambda ups: [u["flows"] for u in ups] == per)
        victim = 0
        moved = per[victim]
        sent, echoed, t_kill = load(topo, socks, dst, KILL_AT, lambda: kill(servers[victim]))
        lost_late = sorted(k for k, t in sent.items() if t >= t_kill + BOUND and k not in echoed)
        lost_early = sorted(k for k, t in sent.items() if t < t_kill - 0.2 and k not in echoed)
        assert not lost_late, f"{len(lost_late)} lost after the bound: {lost_late[:10]}"
        assert not lost_early, f"{len(lost_early)} lost before the kill: {lost_early[:10]}"
        st = relay.settled_stats(lambda st: st["upstream_failover"] >= moved)
        assert st["upstream_failover"] == moved        # exactly the dead server's clients
        ups = settled_upstreams(relay, lambda ups: [u["flows"] for u in ups] == [0, len(clients)])
        assert [u["healthy"] for u in ups] == [False, True]
        assert [u["url"] for u in ups] == urls
        # the server comes back on its address
        servers[victim] = tunnel_server(topo, hosts[victim], port).wait_ready()
        settled_upstreams(relay, lambda ups: [u["healthy"] for u in ups] == [True, True], 10.0)
        round_trip_all(socks, dst, b"back")
        if mode == "failover":
            st = relay.settled_stats(lambda st: True)
            assert st["upstream_failover"] == moved
            assert servers[victim].stats()["up_datagrams"] == 0    # nothing to it afterwards
        else:
            st = relay.settled_stats(lambda st: st["upstream_failover"] >= 2 * moved)
            assert st["upstream_failover"] == 2 * moved
            servers[victim].settled_stats(lambda st: st["up_datagrams"] == moved)
        settled_upstreams(relay, lambda ups: [u["flows"] for u in ups] == (
            [0, len(clients)] if mode == "failover" else per))
    finally:
        for s in socks:
            s.close()
        relay.close()
        for s in servers:
            s.close()


def test_redir_socks5_then_gost_failover(topo):
    """redir (raw replies spoofed as the remote) over socks5:// then gost://: the SOCKS5
    server is killed, the background check notices, the IPv4 and IPv6 flows go on through
    gost, their replies still from the real remote."""
    start_echo(topo.srv, f"{SRV4}:5000", f"[{SRV6}]:5000")
    socks = RelayProcess(["socks5", "--listen", "[::]:1080", "--username", "u", "--password", "p",
                          "--allow", ALLOW], ns=topo.srv, log_level="warning").wait_ready()
    gost = RelayProcess(["tunnel-server", "--listen", "[::]:8444", "--insecure", "--allow", ALLOW],
                        ns=topo.srv, log_level="warning").wait_ready()
    r = subprocess.run(["ip", "netns", "exec", topo.rtr.name, sys.executable, "-m", "relay",
                        "rules", "apply", "--port", "7000", "--iface", "rtr0"],
                       capture_output=True, text=True, env=relay_env(), timeout=30)
    assert r.returncode == 0, r.stderr
    urls = [f"socks5://u:p@{SRV4}:1080", f"gost://[{SRV6}]:8444"]
    relay = RelayProcess(["redir", "--listen", "[::]:7000", "--upstream", urls[0],
                          "--upstream", urls[1]], ns=topo.rtr, log_level="warning")
    try:
        relay.wait_ready()
        settled_upstreams(relay, lambda ups: [u["healthy"] for u in ups] == [True, True])
        clients = [(topo.cli.socket(socket.AF_INET), (SRV4, 5000)),
                   (topo.cli.socket(socket.AF_INET6), (SRV6, 5000))]

        def both(tag):
            for c, dst in clients:
                assert udp_roundtrip(c, dst, tag, timeout=3) == (tag, dst)
        both(b"before")
        ups = settled_upstreams(relay, lambda ups: [u["flows"] for u in ups] == [2, 0])
        assert [u["url"] for u in ups] == ["socks5://u:***@198.51.100.2:1080", urls[1]]
        kill(socks)
        settled_upstreams(relay, lambda ups: [u["healthy"] for u in ups] == [False, True])
        both(b"after")
        st = relay.settled_stats(lambda st: st["upstream_failover"] == 2)
        assert st["up_datagrams"] == 4
        settled_upstreams(relay, lambda ups: [u["flows"] for u in ups] == [0, 2])
        gost.settled_stats(lambda st: st["up_datagrams"] == 2)
    finally:
        relay.close()
        socks.close()
        gost.close()


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_tunnel_then_direct(mtopo, v6):
    """upstream = [tunnel://srv, direct]: through the tunnel, then, the tunnel server
    killed, directly (direct's health: the route to --to)."""
    topo = mtopo
    port = 8470 + v6
    host = SRV6_B if v6 else SRV4_B
    target = (SRV6 if v6 else SRV4, 5000)
    server = tunnel_server(topo, host, port)
    relay = RelayProcess(["forward", "--listen", f"[::]:{port}", "--to",
                          f"[{target[0]}]:5000" if v6 else f"{target[0]}:5000",
                          "--upstream", url(host, port), "--upstream", "direct",
                          "--secret", SECRET], ns=topo.rtr, log_level="warning")
    c = topo.cli.socket(socket.AF_INET6 if v6 else socket.AF_INET)
    dst = (RTR6_CLI if v6 else RTR4_CLI, port)
    try:
        server.wait_ready()
        relay.wait_ready()
        settled_upstreams(relay, lambda ups: [u["healthy"] for u in ups] == [True, True])
        assert udp_roundtrip(c, dst, b"tunnel", timeout=3) == (b"tunnel", dst)
        server.settled_stats(lambda st: st["up_datagrams"] == 1)
        kill(server)
        settled_upstreams(relay, lambda ups: [u["healthy"] for u in ups] == [False, True])
        assert udp_roundtrip(c, dst, b"direct", timeout=3) == (b"direct", dst)
        st = relay.settled_stats(lambda st: st["upstream_failover"] == 1)
        assert st["up_datagrams"] == 2 == st["down_datagrams"]
        ups = settled_upstreams(relay, lambda ups: [u["flows"] for u in ups] == [0, 1])
        assert [u["url"] for u in ups] == [url(host, port), "direct"]
    finally:
        c.close()
        relay.close()
        server.close()
