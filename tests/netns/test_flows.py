"""`relay flows` and client groups end to end: redir (TPROXY) directly and through a tunnel
upstream, and forward, IPv4 and IPv6, client -- router -- server in namespaces."""
import json
import socket

import pytest

from tests.namespaces import CLI4, CLI6, RTR4_CLI, RTR6_CLI, SRV4, SRV6, start_echo
from tests.relayproc import RelayProcess, udp_roundtrip
from tests.support import redir_rules, upstream_in_srv
from relay.supervisor import query

pytestmark = pytest.mark.netns

PORT = 7000
GROUPS = ["--client-group", f"v4={CLI4}/32", "--client-group", f"v6={CLI6}/128"]


def flows(relay, **args):
    return json.loads(query(relay.control, "flows " + json.dumps(args)))


def exchange(topo, sizes, targets):
    """Round trips from one socket per family; returns the client addresses as flows
    prints them."""
    clients = {}
    for family, dsts in targets.items():
        c = topo.cli.socket(family)
        for dst in dsts:
            for n in sizes:
                payload = bytes([n & 0xff]) * n
                data, src = udp_roundtrip(c, dst, payload, timeout=3)
                assert data == payload and src == dst
        clients[family] = name(family, c)
    return clients


def name(family, sock):
    """How flows prints the client address of sock (unbound: the namespace's own address)."""
    port = sock.getsockname()[1]
    return f"[{CLI6}]:{port}" if family == socket.AF_INET6 else f"{CLI4}:{port}"


def check(relay, clients, dests, upstream, sizes, per_family_dsts):
    n, nbytes = len(sizes) * per_family_dsts, sum(sizes) * per_family_dsts
    relay.settled_stats(lambda st: st["down_datagrams"] == 2 * n)
    data = flows(relay, top=10, sort="bytes")
    assert data["total"] == 2 and data["errors"] == []
    by = {r["client"]: r for r in data["flows"]}
    assert set(by) == set(clients.values())
    for family, client in clients.items():
        r = by[client]
        assert r["destination"] == dests[family]       # its latest destination
        assert r["upstream"] == upstream
        assert (r["datagrams_out"], r["bytes_out"], r["datagrams_in"], r["bytes_in"]) == \
            (n, nbytes, n, nbytes)
    data = flows(relay, top=10, sort="age", by_client=True)
    assert sorted(r["client"] for r in data["flows"]) == sorted([CLI4, CLI6])
    doc = json.loads(query(relay.control, "stats"))
    for group in ("v4", "v6"):
        assert doc["clients"]["total"][group] == {"datagrams_out": n, "bytes_out": nbytes,
                                                 "datagrams_in": n, "bytes_in": nbytes}


@pytest.mark.parametrize("upstream", ["direct", "tunnel"])
def test_redir_flows_show_each_client_its_latest_destination(topo, upstream):
    extra = [] if upstream == "direct" else upstream_in_srv(topo, "tunnel")
    if upstream == "direct":
        start_echo(topo.srv, f"{SRV4}:5000", f"[{SRV6}]:5000")
    start_echo(topo.srv, f"{SRV4}:5001", f"[{SRV6}]:5001")
    r = redir_rules(topo, "apply", PORT)
    assert r.returncode == 0, r.stderr
    sizes = (1, 100, 1400)
    with RelayProcess(["redir", "--listen", f"[::]:{PORT}", *extra, *GROUPS],
                      ns=topo.rtr).wait_ready() as relay:
        # one full-cone association per client, two remotes each: the second is the latest
        clients = exchange(topo, sizes, {socket.AF_INET: [(SRV4, 5000), (SRV4, 5001)],
                                         socket.AF_INET6: [(SRV6, 5000), (SRV6, 5001)]})
        label = "direct" if upstream == "direct" else f"tunnel://{SRV4}:8443"
        check(relay, clients, {socket.AF_INET: f"{SRV4}:5001",
                               socket.AF_INET6: f"[{SRV6}]:5001"}, label, sizes, 2)


def test_forward_flows_v4_and_v6(topo):
    start_echo(topo.srv, f"[{SRV6}]:5000")
    sizes = (0, 10, 2000)
    with RelayProcess(["forward", "--listen", "[::]:6000", "--to", f"[{SRV6}]:5000", *GROUPS],
                      ns=topo.rtr).wait_ready() as relay:
        clients = {}
        for family, rtr in ((socket.AF_INET, RTR4_CLI), (socket.AF_INET6, RTR6_CLI)):
            c = topo.cli.socket(family)
            for n in sizes:
                data, src = udp_roundtrip(c, (rtr, 6000), bytes(n), timeout=3)
                assert data == bytes(n)
            clients[family] = name(family, c)
        dest = f"[{SRV6}]:5000"
        check(relay, clients, {socket.AF_INET: dest, socket.AF_INET6: dest}, "direct", sizes, 1)
