"""`relay flows` and client groups: the per-flow counters of every flow table, the bounded
snapshot (top N by a sort key, or summed per client address), the client groups' counters in
the stats slots, and the control request / command end to end on loopback."""
import io
import json
import socket
import threading
import time

import pytest

from relay import config as _config
from relay import flows as F
from relay import stats as _stats
from relay.services import create_service
from relay.services.base import WorkerContext
from relay.supervisor import query
from tests.relayproc import LoopbackEcho, RelayProcess, free_tcp_port, free_udp_port
from tests.support import SECRET, cfg, roundtrip

ALLOW = "127.0.0.0/8"
GROUPS = (("lan", ("127.0.0.2/32", "2001:db8::/64")), ("lab", ("127.0.0.0/8",)))


def compiled_groups():
    return F.compile_groups(tuple((n, tuple(F.network(x) for x in nets)) for n, nets in GROUPS))


def group_words(slot):
    from relay.flows import GROUP_WORDS
    return list(slot[_stats.N_COUNTERS:_stats.N_COUNTERS + GROUP_WORDS])


def groups_of(slot):
    return F.group_counters(GROUPS, group_words(slot))


# ---- the upstream cores (compiled and pure) -----------------------------------------

@pytest.fixture(scope="module")
def servers():
    started = {}
    for kind, args in (("tunnel", ["tunnel-server", "--secret", SECRET]),
                       ("socks5", ["socks5", "--username", "u", "--password", "p"])):
        port = free_tcp_port()
        started[kind] = (RelayProcess([*args, "--listen", f"127.0.0.1:{port}", "--allow", ALLOW],
                                      log_level="warning").wait_ready(), ("127.0.0.1", port))
    yield {k: a for k, (_p, a) in started.items()}
    for p, _a in started.values():
        p.close()


@pytest.fixture(scope="module")
def echo():
    with LoopbackEcho() as e:
        e.addr = e.address
        yield e


def drive(up, until, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "the core did not answer"
        up.process()
        up.tick()
        up.flush()
        time.sleep(0.002)


@pytest.fixture
def new_core(impl, upstream_cores, servers):
    def make(kind, **kw):
        region = _stats.StatsRegion(1)
        slot = region.slot(0)
        auth = dict(secret=SECRET) if kind == "tunnel" else dict(user="u", password="p")
        name = "TunnelUpstream" if kind == "tunnel" else "Socks5Upstream"
        up, got = upstream_cores(name, servers[kind], stats=slot, **auth, **kw)
        return up, got, slot
    return make


def exchange(up, got, client, dst, sizes):
    for i, n in enumerate(sizes):
        data = bytes([i]) * n
        up.send(client, dst, data)
        up.flush()
        drive(up, lambda: (client, dst, data) in got)


@pytest.mark.parametrize("kind", ["tunnel", "socks5"])
def test_core_counts_each_flow_and_lists_the_largest_first(new_core, echo, kind):
    up, got, slot = new_core(kind, client_groups=compiled_groups())
    a, b, c = ("127.0.0.2", 4001), ("127.0.0.3", 4002), ("2001:db8::7", 4003)
    exchange(up, got, a, echo.addr, [10, 20])
    exchange(up, got, b, echo.addr, [300])
    exchange(up, got, c, echo.addr, [1, 2, 3])
    rows = up.snapshot(10, F.SORTS.index("bytes"))
    assert [r[0] for r in rows] == [b, a, c]
    by = {r[0]: r for r in rows}
    assert by[a][1] == echo.addr            # the destination the flow sent to
    assert by[a][2:6] == (2, 30, 2, 30)
    assert by[b][2:6] == (1, 300, 1, 300)
    assert by[c][2:6] == (3, 6, 3, 6)
    assert all(r[6] >= r[7] >= 0 for r in rows)     # age >= idle
    assert [r[0] for r in up.snapshot(2, 0)] == [b, a]     # top 2
    # age: the oldest first
    assert [r[0] for r in up.snapshot(3, F.SORTS.index("age"))] == [a, b, c]
    # client groups: a (127.0.0.2) and c (2001:db8::/64) are "lan", b "lab"
    assert groups_of(slot) == {
        "lan": {"datagrams_out": 5, "bytes_out": 36, "datagrams_in": 5, "bytes_in": 36},
        "lab": {"datagrams_out": 1, "bytes_out": 300, "datagrams_in": 1, "bytes_in": 300},
    }


@pytest.mark.parametrize("kind", ["tunnel", "socks5"])
def test_core_sums_flows_per_client_within_the_cap(new_core, echo, kind):
    up, got, _slot = new_core(kind)
    for port, size in ((5001, 10), (5002, 20), (5003, 40)):
        exchange(up, got, ("127.0.0.2", port), echo.addr, [size])
    exchange(up, got, ("127.0.0.3", 6000), echo.addr, [5])
    rows = up.snapshot(10, 0, True)
    assert [(r[0], r[2:6], r[8]) for r in rows] == [
        ("127.0.0.2", (3, 70, 3, 70), 3), ("127.0.0.3", (1, 5, 1, 5), 1)]
    # at most clients_cap addresses are summed: the flows of the others in one row (None)
    rows = up.snapshot(10, 0, True, 1)
    assert len(rows) == 2 and rows[-1][0] is None
    assert sorted(r[8] for r in rows) == [1, 3]
    assert rows[0][0] in ("127.0.0.2", "127.0.0.3")


def test_core_without_groups_leaves_the_group_words_alone(new_core, echo):
    up, got, slot = new_core("tunnel")
    exchange(up, got, ("127.0.0.2", 7001), echo.addr, [50])
    assert not any(group_words(slot))
    assert up.snapshot(5, 0)[0][2:6] == (1, 50, 1, 50)


def test_groups_need_the_group_words_of_a_stats_slot(impl, upstream_cores, servers):
    with pytest.raises(ValueError, match="client groups need a stats slot"):
        upstream_cores("TunnelUpstream", servers["tunnel"], secret=SECRET,
                       stats=bytearray(8 * _stats.N_COUNTERS), client_groups=compiled_groups())


# ---- the engine (forward, compiled) through its service ---------------------------------

class Service:
    """A forward service in a thread of this process, with client groups."""

    def __init__(self, listener):
        self.region = _stats.StatsRegion(1)
        self.ctx = WorkerContext(0, self.region.slot(0), reuseport=False, groups=compiled_groups())
        self.svc = create_service(listener, self.ctx)
        self.thread = threading.Thread(target=self.svc.run, daemon=True)
        self.thread.start()

    def close(self):
        self.ctx.stop.set()
        self.thread.join(5)
        self.svc.close()


@pytest.fixture
def forward(echo):
    pytest.importorskip("relay.datapath.engine", reason="the engine is compiled only")
    s = Service(cfg("forward", listen=("127.0.0.1", free_udp_port()), to=echo.address))
    yield s
    s.close()


def client(host):
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    c.bind((host, 0))
    return c


def test_engine_flows_through_the_data_path_thread(forward, echo):
    listen = forward.svc.listen.getsockname()
    a, b = client("127.0.0.2"), client("127.0.0.3")
    for data in (b"x" * 10, b"y" * 20):
        roundtrip(a, listen, data)
    roundtrip(b, listen, b"z" * 300)
    rows, count = forward.svc.flows(10, "bytes", False)
    assert count == 2
    assert [r["client"] for r in rows] == [f"127.0.0.3:{b.getsockname()[1]}",
                                           f"127.0.0.2:{a.getsockname()[1]}"]
    assert rows[1]["destination"] == f"127.0.0.1:{echo.address[1]}"
    assert (rows[1]["datagrams_out"], rows[1]["bytes_out"],
            rows[1]["datagrams_in"], rows[1]["bytes_in"]) == (2, 30, 2, 30)
    assert rows[0]["listener"] == "forward" and rows[0]["worker"] == 0
    assert rows[0]["upstream"] == "direct"
    rows, _ = forward.svc.flows(1, "bytes", True)
    assert [(r["client"], r["flows"], r["bytes_out"]) for r in rows] == [("127.0.0.3", 1, 300)]
    # the groups' counters are written by the data path into the slot
    assert groups_of(forward.ctx.stats) == {
        "lan": {"datagrams_out": 2, "bytes_out": 30, "datagrams_in": 2, "bytes_in": 30},
        "lab": {"datagrams_out": 1, "bytes_out": 300, "datagrams_in": 1, "bytes_in": 300},
    }
    a.close()
    b.close()


def test_engine_counts_a_gro_buffer_as_its_datagrams(echo):
    pytest.importorskip("relay.datapath.engine", reason="the engine is compiled only")
    s = Service(cfg("forward", listen=("127.0.0.1", free_udp_port()), to=echo.address, offload="on"))
    try:
        c = client("127.0.0.2")
        listen = s.svc.listen.getsockname()
        for _ in range(20):         # a burst the kernel may coalesce on the listen socket
            c.sendto(b"g" * 100, listen)
        c.settimeout(2)
        for _ in range(20):
            c.recvfrom(2000)
        rows, _ = s.svc.flows(1, "bytes", False)
        assert rows[0]["datagrams_out"] == 20 and rows[0]["bytes_out"] == 2000
        assert rows[0]["datagrams_in"] == 20 and rows[0]["bytes_in"] == 2000
    finally:
        s.close()


# ---- the control request and the command -------------------------------------------

def ask(relay, **args):
    return json.loads(query(relay.control, "flows " + json.dumps(args)))


def test_flows_and_groups_of_a_running_relay_two_workers(echo):
    port = free_udp_port()
    with RelayProcess(["forward", "--listen", f"127.0.0.1:{port}", "--to",
                       f"127.0.0.1:{echo.address[1]}", "--client-group", "lan=127.0.0.2/32",
                       "--client-group", "lab=127.0.0.0/8"], workers=2,
                      log_level="warning").wait_ready() as relay:
        socks = [client("127.0.0.2") for _ in range(6)] + [client("127.0.0.3")]
        for i, s in enumerate(socks):
            roundtrip(s, ("127.0.0.1", port), b"p" * (10 + i))
        relay.settled_stats(lambda c: c["down_datagrams"] == 7)
        data = ask(relay, top=3, sort="bytes", by_client=False)
        assert data["total"] == 7 and data["errors"] == []
        assert [r["bytes_out"] for r in data["flows"]] == [16, 15, 14]
        assert {r["worker"] for r in ask(relay, top=1000, sort="age")["flows"]} <= {0, 1}
        data = ask(relay, top=10, sort="bytes", by_client=True)
        assert [(r["client"], r["flows"], r["datagrams_out"]) for r in data["flows"]] == [
            ("127.0.0.2", 6, 6), ("127.0.0.3", 1, 1)]
        doc = json.loads(query(relay.control, "stats"))
        assert doc["clients"]["total"] == {
            "lan": {"datagrams_out": 6, "bytes_out": 75, "datagrams_in": 6, "bytes_in": 75},
            "lab": {"datagrams_out": 1, "bytes_out": 16, "datagrams_in": 1, "bytes_in": 16}}
        metrics = query(relay.control, "metrics")
        assert 'relay_client_bytes_total{listener="forward",group="lan",direction="out"} 75' in metrics
        assert 'relay_client_datagrams_total{listener="forward",group="lab",direction="in"} 1' in metrics
        assert "error" in ask(relay, top=0)
        assert "error" in ask(relay, sort="size")
        # the command: a table, JSON, and --watch bounded by rounds
        args = F.add_cli(_subparsers()).parse_args(["--control", relay.control, "--top", "2"])
        out = io.StringIO()
        assert F.run_cli(args, out=out) == 0
        lines = out.getvalue().splitlines()
        assert lines[0].split()[:3] == ["LISTENER", "W", "CLIENT"]
        assert len(lines) == 4 and lines[-1] == "2 flows shown of 7 (--top, --sort)"
        args = F.add_cli(_subparsers()).parse_args(["--control", relay.control, "--by-client",
                                                    "--watch", "0.1"])
        out = io.StringIO()
        assert F.run_cli(args, out=out, sleep=lambda s: None, rounds=2) == 0
        assert out.getvalue().count("relay flows every 0.1 s") == 2
        assert "127.0.0.2  6" in out.getvalue()
        for s in socks:
            s.close()


def test_flows_of_a_service_without_flows_is_empty():
    port = free_tcp_port()
    with RelayProcess(["tunnel-server", "--listen", f"127.0.0.1:{port}", "--secret", SECRET],
                      log_level="warning").wait_ready() as relay:
        assert ask(relay, top=5) == {"flows": [], "total": 0, "by_client": False,
                                     "sort": "bytes", "errors": []}


def _subparsers():
    import argparse
    return argparse.ArgumentParser().add_subparsers()


def test_flows_command_without_a_relay_says_so(tmp_path, capsys):
    args = F.add_cli(_subparsers()).parse_args(["--control", str(tmp_path / "none.sock")])
    assert F.run_cli(args) == 1
    assert "no relay is running" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["0", "1001", "x"])
def test_flows_top_is_bounded(bad):
    with pytest.raises(SystemExit):
        F.add_cli(_subparsers()).parse_args(["--top", bad])


# ---- configuration -----------------------------------------------------------------

def test_client_groups_from_toml_and_command_line():
    c = _config.parse_config({"global": {"client_groups": {"lan": ["192.168.1.0/24"],
                                                          "v6": "fd00::/64, 2001:db8::/48"}},
                              "listener": [{"name": "f", "mode": "forward", "listen": "127.0.0.1:1",
                                            "to": "127.0.0.1:2"}]}, "t.toml")
    assert [(n, [str(x) for x in nets]) for n, nets in c.global_.client_groups] == [
        ("lan", ["192.168.1.0/24"]), ("v6", ["fd00::/64", "2001:db8::/48"])]
    assert F.compile_groups(c.global_.client_groups)[0] == (0, socket.AF_INET, bytes([192, 168, 1, 0]), 24)


@pytest.mark.parametrize("groups,why", [
    ({"other": ["10.0.0.0/8"]}, "client_groups.other: group names"),
    ({"a b": ["10.0.0.0/8"]}, "client_groups.a b: group names"),
    ({"lan": ["10.0.0.0/33"]}, "client_groups.lan[0]"),
    ({"lan": []}, "client_groups.lan: a group needs"),
    ({f"g{i}": ["10.0.0.0/8"] for i in range(17)}, "17 groups, at most 16"),
    (["10.0.0.0/8"], "expected a table"),
])
def test_bad_client_groups_are_refused_naming_the_key(groups, why):
    with pytest.raises(_config.ConfigError) as e:
        _config.parse_config({"global": {"client_groups": groups}, "listener": []}, "r.toml")
    assert str(e.value).startswith("r.toml: global.client_groups")
    assert why in str(e.value)


def test_bad_client_group_option_exits_2(capsys):
    from relay.cli import main
    with pytest.raises(SystemExit) as e:
        main(["forward", "--listen", "127.0.0.1:1", "--to", "127.0.0.1:2", "--client-group", "lan"])
    assert e.value.code == 2
    assert "--client-group: expected NAME=CIDR" in capsys.readouterr().err


# ---- the pieces ----------------------------------------------------------------------

def test_rows_tables_and_merges():
    rows = [{"client": "10.0.0.1", "flows": 2, "datagrams_out": 3, "bytes_out": 30,
             "datagrams_in": 1, "bytes_in": 10, "age": 5.0, "idle": 1.0},
            {"client": "10.0.0.1", "flows": 1, "datagrams_out": 1, "bytes_out": 5,
             "datagrams_in": 0, "bytes_in": 0, "age": 9.0, "idle": 3.0},
            {"client": "10.0.0.2", "flows": 1, "datagrams_out": 1, "bytes_out": 1,
             "datagrams_in": 1, "bytes_in": 1, "age": 1.0, "idle": 0.5}]
    merged = sorted(F.merge_clients(rows), key=F.sort_key("bytes"), reverse=True)
    assert merged[0] == {"client": "10.0.0.1", "flows": 3, "datagrams_out": 4, "bytes_out": 35,
                         "datagrams_in": 1, "bytes_in": 10, "age": 9.0, "idle": 1.0}
    text = F.flows_table({"by_client": True, "flows": merged, "total": 2})
    assert text.splitlines()[1].split() == ["10.0.0.1", "3", "4", "35", "1", "10", "9s", "1s"]
    assert F.row_dict((("::1", 5), ("2001:db8::1", 53), 1, 2, 3, 4, 5.0, 6.0), False)["destination"] \
        == "[2001:db8::1]:53"
    assert F.row_dict((None, None, 1, 2, 3, 4, 5.0, 6.0, 7), True)["client"] == "other"
    assert F.human(1500) == "1.5K" and F.duration(3700) == "1h01m"
    assert F.parse_request('{"top": 5, "sort": "idle"}') == {"top": 5, "sort": "idle",
                                                              "by_client": False}
    for bad in ('[1]', '{"top": true}', '{"sort": "x"}', '{"top": 1001}'):
        with pytest.raises(ValueError):
            F.parse_request(bad)


def test_stats_table_and_rates_show_client_groups():
    from relay import cli
    from relay.stats import COUNTERS

    def answer(n):
        c = dict.fromkeys(COUNTERS, 0)
        g = {"lan": {"datagrams_out": n, "bytes_out": 10 * n, "datagrams_in": n, "bytes_in": 0}}
        return {"listeners": {"f": c}, "total": c, "clients": {"listeners": {"f": g}, "total": g}}
    a, b = answer(100), answer(300)
    rates = cli.stats_rates(a, b, 2.0)
    assert rates["clients"]["lan"]["bytes_out"] == 1000
    lines = cli.stats_table(b, rates).splitlines()
    assert lines[-2].split() == ["client", "group", "datagrams>", "bytes>", "datagrams<", "bytes<"]
    assert lines[-1].split() == ["lan", "100/s", "1,000/s", "100/s", "0/s"]
    assert cli.stats_table(b).splitlines()[-1].split() == ["lan", "300", "3000", "300", "0"]


def test_flows_through_several_upstreams_name_each_flows_upstream(impl, core, upstream_cores,
                                                                  servers, echo):
    """A BalancedUpstream's rows come from the child carrying each flow, its name appended
    (relay.flows.row_dict makes it the row's upstream)."""
    kids = [upstream_cores("TunnelUpstream", servers["tunnel"], secret=SECRET)[0] for _ in range(2)]
    names = ["tunnel://first:1", "tunnel://second:2"]
    bal = core.BalancedUpstream(kids, names, balance="hash")
    got = []
    bal.collect_replies(got)
    try:
        clients = [(f"127.0.0.{i}", 9000 + i) for i in range(2, 12)]
        for c in clients:
            exchange(bal, got, c, echo.addr, [40])
        rows = bal.snapshot(100, 0)
        assert sorted(r[0] for r in rows) == sorted(clients)
        assert {r[8] for r in rows} <= set(names) and all(r[2:6] == (1, 40, 1, 40) for r in rows)
        for r in rows:          # the hash's choice for the client's address
            assert r[8] == names[bal.order(r[0][0])[0]]
        assert F.row_dict(rows[0], False)["upstream"] in names
        assert len(bal.snapshot(3, 0)) == 3
        assert sum(r[8] for r in bal.snapshot(100, 0, True)) == len(clients)
    finally:
        bal.close()


def test_stats_slots_are_whole_cache_lines_with_the_group_words_after_the_counters():
    """Each (listener, worker) slot starts on its own 64-byte line (no line shared by two
    workers' slots) and holds the counters, then the client groups' words."""
    from relay.flows import GROUP_WORDS
    assert _stats.SLOT_BYTES % 64 == 0
    assert _stats.SLOT_BYTES >= (_stats.N_COUNTERS + GROUP_WORDS) * 8
    region = _stats.StatsRegion(2)
    a, b = region.slot(0), region.slot(1)
    a[_stats.N_COUNTERS + GROUP_WORDS - 1] = 7            # the last group word of slot 0
    assert region.read_groups(0)[-1] == 7 and region.read(1)["up_datagrams"] == 0
    b[0] = 3
    assert region.read(1)["up_datagrams"] == 3 and not any(region.read_groups(1))
