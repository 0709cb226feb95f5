"""Several upstreams (BalancedUpstream: relay/datapath/tunnel_balance.pxi, pure/balance.py):
the rendezvous hash (the same in both implementations, stable, spread, minimal moves) and
failover between two tunnel servers on loopback that stop and come back; the background
health check (relay/services/health.py) against live and dead servers."""
import select
import socket
import time

import pytest

from relay.datapath.pure import balance
from relay.net.addr import parse_upstream
from relay.services import health
from relay.stats import INDEX
from tests.support import Echo, cfg, roundtrip

pytest.importorskip("relay.datapath.tunnel")
pytestmark = pytest.mark.usefixtures("impl")     # every test: compiled, then pure

CLIENTS4 = [f"198.51.100.{i}" for i in range(1, 201)] + [f"10.{i}.{i * 7 % 256}.9" for i in range(200)]
CLIENTS6 = [f"2001:db8:{i:x}::{i * 13:x}" for i in range(1, 401)]
NAMES = [f"tunnel://192.0.2.{i}:8443" for i in range(1, 5)]


def dead_port():
    """A loopback TCP port nothing listens on (connections are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def idle_balancer(core):
    """make(balance, n) -> (a BalancedUpstream over n tunnel cores whose server is not
    there, health set by hand (by_conn false): for choosing, not for carrying; its kids)."""
    made = []

    def make(balance_mode, n=4):
        kids = [core.TunnelUpstream(("127.0.0.1", dead_port())) for _ in range(n)]
        b = core.BalancedUpstream(kids, NAMES[:n], balance=balance_mode, max_flows=4096)
        made.append(b)
        return b, kids
    yield make
    for b in made:
        b.close()


def test_hrw_order_same_in_both_implementations(idle_balancer):
    b, _ = idle_balancer("hash")
    seeds = [balance.upstream_seed(n) for n in NAMES]
    for host in CLIENTS4[:100] + CLIENTS6[:100] + ["::ffff:198.51.100.7"]:
        assert b.order(host) == balance.hrw_order(host, seeds), host
    # an IPv4-mapped client ranks as its IPv4 address
    assert b.order("::ffff:198.51.100.7") == b.order("198.51.100.7")


def test_hrw_is_stable_and_spreads():
    """Fixed seeds (from the names): the same order on every call and in every process;
    400 IPv4 and 400 IPv6 clients spread over 4 upstreams with none above twice its share."""
    seeds = [balance.upstream_seed(n) for n in NAMES]
    assert balance.upstream_seed(NAMES[0]) == balance.upstream_seed(str(NAMES[0]))
    for clients in (CLIENTS4, CLIENTS6):
        first = [balance.hrw_order(h, seeds)[0] for h in clients]
        assert first == [balance.hrw_order(h, seeds)[0] for h in clients]
        counts = [first.count(i) for i in range(4)]
        assert min(counts) > 0 and max(counts) < 2 * len(clients) / 4, counts


@pytest.mark.parametrize("lost", [0, 2])
def test_hash_losing_one_upstream_moves_only_its_clients(idle_balancer, lost):
    b, kids = idle_balancer("hash")
    dst = ("192.0.2.99", 53)
    before = {}
    for n, host in enumerate(CLIENTS4[:150] + CLIENTS6[:150]):
        b.send((host, 1000 + n), dst, b"x")
        before[(host, 1000 + n)] = b.flow_upstream((host, 1000 + n))
    assert sorted(set(before.values())) == [0, 1, 2, 3]
    assert sum(b.upstream_flows()) == len(before) == b.flows_open
    b.set_health(lost, False)
    assert b.health == [i != lost for i in range(4)]
    for client in before:
        b.send(client, dst, b"y")
    after = {c: b.flow_upstream(c) for c in before}
    moved = {c for c in before if after[c] != before[c]}
    assert moved == {c for c in before if before[c] == lost}
    assert lost not in after.values()
    # the upstream a flow left ended it: each flow is on one child only
    assert [k.flows_open for k in kids] == b.upstream_flows() == [
        list(after.values()).count(i) for i in range(4)]
    assert b.stats[INDEX["upstream_failover"]] == len(moved)
    # a second flow of a moved client goes where its first went
    host, port = next(iter(moved))
    b.send((host, port + 5000), dst, b"z")
    assert b.flow_upstream((host, port + 5000)) == after[(host, port)]
    # back: hash moves every client to its own upstream again
    b.set_health(lost, True)
    for client in before:
        b.send(client, dst, b"w")
    assert {c: b.flow_upstream(c) for c in before} == before
    assert [k.flows_open for k in kids] == b.upstream_flows()
    assert b.stats[INDEX["upstream_failover"]] == 2 * len(moved)


def test_failover_first_healthy_and_sticky(idle_balancer):
    b, kids = idle_balancer("failover", 3)
    dst = ("192.0.2.99", 53)
    b.send(("198.51.100.1", 1), dst, b"a")
    assert b.flow_upstream(("198.51.100.1", 1)) == 0
    b.set_health(0, False)
    b.send(("198.51.100.1", 1), dst, b"b")
    b.send(("198.51.100.2", 1), dst, b"c")
    assert [b.flow_upstream((h, 1)) for h in ("198.51.100.1", "198.51.100.2")] == [1, 1]
    b.set_health(1, False)
    b.send(("198.51.100.1", 1), dst, b"d")
    assert b.flow_upstream(("198.51.100.1", 1)) == 2
    b.set_health(0, True)
    b.set_health(1, True)
    b.send(("198.51.100.1", 1), dst, b"e")          # stays where it is
    b.send(("198.51.100.3", 1), dst, b"f")          # a new flow: the first healthy
    assert b.flow_upstream(("198.51.100.1", 1)) == 2
    assert b.flow_upstream(("198.51.100.3", 1)) == 0
    assert b.upstream_flows() == [1, 1, 1]
    assert b.stats[INDEX["upstream_failover"]] == 2
    # none healthy: flows stay, new ones take the first choice
    for i in range(3):
        b.set_health(i, False)
    b.send(("198.51.100.2", 1), dst, b"g")
    b.send(("198.51.100.4", 1), dst, b"h")
    assert [b.flow_upstream((h, 1)) for h in ("198.51.100.2", "198.51.100.4")] == [1, 0]
    assert b.flow_upstream(("198.51.100.250", 1)) is None
    assert [k.flows_open for k in kids] == b.upstream_flows() == [2, 1, 1]


def test_balancer_table_is_bounded_and_expires(core):
    kids = [core.TunnelUpstream(("127.0.0.1", dead_port()), max_flows=4) for _ in range(2)]
    b = core.BalancedUpstream(kids, NAMES[:2], max_flows=4, timeout=5.0)
    try:
        for port in range(10):
            b.send(("198.51.100.1", port), ("192.0.2.1", 9), b"x")
        assert b.flows_open == 4 and sum(b.upstream_flows()) == 4
        assert b.flow_upstream(("198.51.100.1", 0)) is None       # least recently used: gone
        assert b.flow_upstream(("198.51.100.1", 9)) == 0
        b.tick(time.monotonic() + 10)
        assert b.flows_open == 0 and b.upstream_flows() == [0, 0]
    finally:
        b.close()


def test_bad_arguments_refused(core):
    kid = core.TunnelUpstream(("127.0.0.1", dead_port()))
    try:
        with pytest.raises(ValueError, match="balance"):
            core.BalancedUpstream([kid], NAMES[:1], balance="random")
        with pytest.raises(ValueError, match="one name per upstream"):
            core.BalancedUpstream([kid], NAMES[:2])
        with pytest.raises(ValueError, match="upstreams"):
            core.BalancedUpstream([], [])
    finally:
        kid.close()


# ------------------------------------------------------------------ two live tunnel servers

def drive(b, until, what, timeout=5.0):
    """Run the balancer's loop here until ``until()``, bounded in time."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        select.select([b.fileno()], [], [], 0.01)
        b.process()
        b.tick()
        b.flush()


def ask(b, got, client, dst, data):
    """Send data from client and drive until it is echoed; the reply's client is checked."""
    n = len(got)
    b.send(client, dst, data)
    b.flush()
    drive(b, lambda: any(g[2] == data for g in got[n:]), f"echo of {data!r}")
    assert [g[0][:2] for g in got[n:] if g[2] == data] == [client]


@pytest.mark.parametrize("mode", ["failover", "hash"])
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def test_server_dies_flows_move_and_stay(running, core, mode, host):
    """Two tunnel servers; the one a flow uses stops: the flow's next datagram goes through
    the other (upstream_failover), its upstream is known; the server comes back on its port:
    failover leaves the flow where it is, hash moves it back."""
    allow = [host + ("/128" if ":" in host else "/32")]
    servers = [running(cfg("tunnel-server", listen=(host, 0), allow=allow)) for _ in range(2)]
    addrs = [s.address[:2] for s in servers]
    echo = Echo(host)
    stats = memoryview(bytearray(8 * len(INDEX))).cast("Q")      # shared, as in a worker
    kids = [core.TunnelUpstream(a, stats=stats) for a in addrs]
    names = [f"tunnel://[{a[0]}]:{a[1]}" if ":" in a[0] else f"tunnel://{a[0]}:{a[1]}" for a in addrs]
    b = core.BalancedUpstream(kids, names, balance=mode, by_conn=[True, True], stats=stats)
    got = []
    b.collect_replies(got)
    try:
        drive(b, lambda: b.health == [True, True], "both connected")
        b.set_health(1, False)              # a failed check downs a connected upstream too
        assert b.health == [True, False] and b.connected == 2
        b.set_health(1, True)
        assert b.health == [True, True]
        client = (host, 40000)
        ask(b, got, client, echo.addr, b"one")
        first = b.flow_upstream(client)
        assert first == (0 if mode == "failover" else b.order(host)[0])
        assert b.upstream_names == names
        port = addrs[first][1]
        servers[first].stop()
        drive(b, lambda: not b.health[first], "the dead server noticed")
        ask(b, got, client, echo.addr, b"two")
        assert b.flow_upstream(client) == 1 - first
        assert b.stats[INDEX["upstream_failover"]] == 1
        assert b.upstream_flows()[1 - first] == 1 and b.upstream_flows()[first] == 0
        assert [k.flows_open for k in kids] == b.upstream_flows()      # the dead one ended it
        servers[first] = running(cfg("tunnel-server", listen=(host, port), allow=allow))
        drive(b, lambda: b.health == [True, True], "the server back", timeout=8.0)
        ask(b, got, client, echo.addr, b"three")
        assert b.flow_upstream(client) == (1 - first if mode == "failover" else first)
        assert b.stats[INDEX["upstream_failover"]] == (1 if mode == "failover" else 2)
        assert [k.flows_open for k in kids] == b.upstream_flows()
        assert b.stats[INDEX["assoc_open"]] == 1
    finally:
        b.close()
        echo.close()


# ------------------------------------------------------------------ background health checks

def test_probe_live_and_dead_servers(running):
    tun = running(cfg("tunnel-server", listen=("127.0.0.1", 0), allow=["127.0.0.0/8"]))
    socks = running(cfg("socks5", listen=("::1", 0), allow=["::1/128"], user="u", password="p"))
    port = dead_port()
    host, sport = socks.address[:2]
    assert health.probe(parse_upstream(f"gost://127.0.0.1:{tun.address[1]}")) is None
    assert health.probe(parse_upstream(f"tunnel://127.0.0.1:{tun.address[1]}")) is None
    assert health.probe(parse_upstream(f"socks5://u:p@[{host}]:{sport}")) is None
    assert health.probe(parse_upstream(f"socks5://u:bad@[{host}]:{sport}")) is not None
    assert "refused" in health.probe(parse_upstream(f"gost://127.0.0.1:{port}")).lower()
    # a socks5 server is no gost server: the handshake fails
    assert health.probe(parse_upstream(f"gost://[{host}]:{sport}")) is not None
    # a server that accepts and never answers: the check times out
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    try:
        up = parse_upstream(f"tunnel://127.0.0.1:{silent.getsockname()[1]}")
        assert health.probe(up, timeout=0.3) == "timed out"
    finally:
        silent.close()


def test_checker_sets_and_publishes_health(running, core):
    from relay import stats as _stats
    tun = running(cfg("tunnel-server", listen=("127.0.0.1", 0), allow=["127.0.0.0/8"]))
    ups = [parse_upstream(f"gost://127.0.0.1:{dead_port()}"),
           parse_upstream(f"gost://127.0.0.1:{tun.address[1]}")]
    kids = [core.TunnelUpstream(u.address, gost=True) for u in ups]
    b = core.BalancedUpstream(kids, [str(u) for u in ups])
    region = _stats.UpstreamRegion(1)
    checker = health.HealthChecker(b, ups, publish=region.slot(0), interval=0.05)
    try:
        assert b.health == [True, True]                # healthy until a check says otherwise
        checker.check_once()
        assert b.health == [False, True]
        assert checker.last[0] and checker.last[1] is None
        b.send(("198.51.100.1", 5), ("127.0.0.1", 9), b"x")
        checker.publish_now()
        summary = _stats.upstream_summary([str(u) for u in ups], [region.read(0)])
        assert summary == [{"url": str(ups[0]), "healthy": False, "flows": 0},
                           {"url": str(ups[1]), "healthy": True, "flows": 1}]
        checker.start()
        tun.stop()
        for _ in range(100):
            if not b.health[1]:
                break
            time.sleep(0.05)
        assert b.health == [False, False]
    finally:
        checker.stop()
        b.close()



def test_tunnel_client_with_two_servers(running):
    """tunnel-client --server A --server B: its flows go through A; A stops: through B."""
    servers = [running(cfg("tunnel-server", listen=("127.0.0.1", 0), allow=["127.0.0.0/8"]))
               for _ in range(2)]
    addrs = tuple(tuple(s.address[:2]) for s in servers)
    echo = Echo("127.0.0.1")
    client = running(cfg("tunnel-client", listen=("127.0.0.1", 0), server=addrs[0],
                         servers=addrs, to=echo.addr))
    # A server whose connection is not up yet is not healthy: the first flow would go to B
    # if A's connect finished later (a loaded machine). Both up first, then A is first.
    from tests.namespaces import wait_until
    wait_until(lambda: client.svc.upstream.connected == 2, 10, what="both tunnel connections up")
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert roundtrip(c, client.address, b"one") == b"one"
        wait_until(lambda: servers[0].stats()["up_datagrams"] + servers[1].stats()["up_datagrams"],
                   5, what="the datagram counted")
        assert servers[0].stats()["up_datagrams"] == 1 and servers[1].stats()["up_datagrams"] == 0
        servers[0].stop()
        assert roundtrip(c, client.address, b"two", timeout=1.0, tries=5) == b"two"
        assert servers[1].stats()["up_datagrams"] >= 1
        assert client.stats()["upstream_failover"] == 1
    finally:
        c.close()
        echo.close()


def test_stats_answer_and_table_show_upstreams():
    import json
    from relay import cli, stats
    region = stats.UpstreamRegion(2)
    stats.publish_upstreams(region.slot(0), [True, False], [3, 0])
    stats.publish_upstreams(region.slot(1), [True, True], [1, 2])
    names = ["tunnel://192.0.2.1:8443", "socks5://u:***@192.0.2.2:1080"]
    ups = stats.upstream_summary(names, [region.read(0), region.read(1)])
    assert ups == [{"url": names[0], "healthy": True, "flows": 4},
                   {"url": names[1], "healthy": False, "flows": 2}]   # one worker sees it down
    data = json.loads(stats.to_json({"wan": dict.fromkeys(stats.COUNTERS, 0)}, upstreams={"wan": ups}))
    text = cli.upstreams_table(data)
    assert text.splitlines()[0] == "upstreams of wan:"
    assert "tunnel://192.0.2.1:8443" in text and "DOWN" in text.splitlines()[2]
    assert cli.upstreams_table(json.loads(stats.to_json({}))) == ""
    region.clear(0)
    assert stats.upstream_summary(names, [region.read(0)])[0]["healthy"] is False   # unknown
    text = stats.prometheus({"wan": dict.fromkeys(stats.COUNTERS, 0)}, upstreams={"wan": ups})
    assert 'relay_upstream_healthy{listener="wan",upstream="tunnel://192.0.2.1:8443"} 1' in text
    assert 'relay_upstream_flows{listener="wan",upstream="socks5://u:***@192.0.2.2:1080"} 2' in text
    assert "relay_upstream_healthy" not in stats.prometheus({"wan": dict.fromkeys(stats.COUNTERS, 0)})


# ------------------------------------------------------------------ direct as one of several

@pytest.mark.parametrize("host", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def test_direct_upstream_carries_bounded_flows(core, host):
    echo = Echo(host)
    d = core.DirectUpstream(max_flows=2, timeout=5.0)
    got = []
    d.collect_replies(got)
    try:
        for ports in ((1, 2), (3,)):            # the third evicts the first (at the cap)
            for port in ports:
                d.send(("198.51.100.1", port), echo.addr, b"p%d" % port)
            deadline, want = time.monotonic() + 5, len(got) + len(ports)
            while len(got) < want and time.monotonic() < deadline:
                select.select([d.fileno()], [], [], 0.05)
                d.process()
        assert [g[2] for g in got[:2]] in ([b"p1", b"p2"], [b"p2", b"p1"]) and got[2][2] == b"p3"
        assert [g[0][:2] for g in got if g[2] == b"p3"] == [("198.51.100.1", 3)]
        assert {g[1][:2] for g in got} == {tuple(echo.addr[:2])}      # the real source
        st = d.stats
        assert d.flows_open == 2 and st[INDEX["assoc_created"]] == 3
        assert st[INDEX["assoc_evicted"]] == 1 and st[INDEX["assoc_open"]] == 2
        assert st[INDEX["up_datagrams"]] == 3 == st[INDEX["down_datagrams"]]
        d.forget(("198.51.100.1", 3))
        assert d.flows_open == 1 and st[INDEX["assoc_open"]] == 1
        d.tick(time.monotonic() + 10)
        assert d.flows_open == 0 and st[INDEX["assoc_expired"]] == 1
    finally:
        d.close()
        echo.close()


def test_tunnel_down_falls_back_to_direct(running, core):
    """upstream = [tunnel://A, direct]: through the tunnel while it is up, directly once
    its server stops; the route check of direct (forward's --to) passes."""
    server = running(cfg("tunnel-server", listen=("127.0.0.1", 0), allow=["127.0.0.0/8"]))
    echo = Echo("127.0.0.1")
    stats = memoryview(bytearray(8 * len(INDEX))).cast("Q")
    kids = [core.TunnelUpstream(server.address[:2], stats=stats), core.DirectUpstream(stats=stats)]
    b = core.BalancedUpstream(kids, ["tunnel://127.0.0.1", "direct"], by_conn=[True, False],
                              stats=stats)
    got = []
    b.collect_replies(got)
    try:
        assert health.probe(parse_upstream("direct"), direct_to=tuple(echo.addr)) is None
        drive(b, lambda: b.health == [True, True], "connected")
        client = ("198.51.100.1", 7)
        ask(b, got, client, echo.addr, b"tunnel")
        assert b.flow_upstream(client) == 0 and server.stats()["up_datagrams"] == 1
        server.stop()
        drive(b, lambda: not b.health[0], "the dead server noticed")
        ask(b, got, client, echo.addr, b"direct")
        assert b.flow_upstream(client) == 1 and stats[INDEX["upstream_failover"]] == 1
        assert [k.flows_open for k in kids] == [0, 1]
    finally:
        b.close()
        echo.close()


def test_route_probe():
    assert health.route_probe([("127.0.0.1", 9)]) is None
    assert health.route_probe([("::1", 9)]) is None
    # the broadcast address without SO_BROADCAST: refused, the reason given; one target
    # of several with a route is enough
    assert health.route_probe([("255.255.255.255", 9)]).startswith("no route to 255.255.255.255")
    assert health.route_probe([("255.255.255.255", 9), ("127.0.0.1", 9)]) is None
