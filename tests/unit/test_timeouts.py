"""Idle timeouts per destination port: the table's timeout classes (relay/datapath/table.pxd),
relay/datapath/timeouts.py, the `timeout_port` setting and the engine using them."""
import random
import socket
import textwrap
import time

import pytest

from relay.config import ConfigError, listener, parse_listener
from relay.datapath.timeouts import MAX_CLASSES, port_class_map, timeout_classes
from tests.namespaces import wait_until
from tests.support import compiled_probe

PROBE = textwrap.dedent('''
    # cython: language_level=3
    from relay.datapath.table cimport (
        akey_t, table_t, table_init, table_free, table_insert, table_touch, table_remove,
        table_set_timeout, table_set_class, table_expired, table_find, TCLASSES)
    from libc.string cimport memset
    from libc.stdint cimport int32_t

    cdef void key(int n, akey_t *k):
        memset(k, 0, sizeof(akey_t))
        k.family = 2
        k.port = n & 0xffff
        k.addr[0] = (n >> 16) & 0xff

    def replay(list ops, int cap, list timeouts):
        """ops: ("ins", n, now) ("touch", n, now) ("class", n, c) ("del", n) ("exp", now)
        -> for each "exp": the key number table_expired names (-1: none); and at the end
        the class lists walked tail to head must hold every entry exactly once."""
        cdef table_t t
        cdef akey_t k
        cdef int32_t i
        out = []
        table_init(&t, cap, 12345)
        try:
            for c, v in enumerate(timeouts):
                table_set_timeout(&t, c, v)
            for op in ops:
                if op[0] == "ins":
                    key(op[1], &k)
                    table_insert(&t, &k, op[2])
                elif op[0] in ("touch", "class", "del"):
                    key(op[1], &k)
                    i = table_find(&t, &k)
                    if op[0] == "touch":
                        table_touch(&t, i, op[2])
                    elif op[0] == "class":
                        table_set_class(&t, i, op[2])
                    else:
                        table_remove(&t, i)
                else:
                    i = table_expired(&t, op[1])
                    out.append(-1 if i < 0 else (t.e[i].key.port | (t.e[i].key.addr[0] << 16)))
            seen = []
            for c in range(TCLASSES):
                i = t.ctail[c]
                last = None
                while i >= 0:
                    assert t.e[i].tclass == c
                    assert last is None or t.e[i].last >= last     # tail: least recent
                    last = t.e[i].last
                    seen.append(t.e[i].key.port | (t.e[i].key.addr[0] << 16))
                    i = t.e[i].cprev
            return out, sorted(seen), t.count
        finally:
            table_free(&t)
''')


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    with compiled_probe(tmp_path_factory.mktemp("tclass"), "tcprobe", PROBE) as m:
        yield m


def test_table_expiry_by_class_matches_a_model(probe):
    """Random inserts, touches, class moves and removals: table_expired names an entry past
    its own class's timeout whenever the model has one, and none otherwise."""
    rnd = random.Random(7)
    timeouts = [60.0, 10.0, 0.5, 300.0]
    for _round in range(20):
        model, ops, now = {}, [], 0.0           # key -> [last, class]
        for _ in range(300):
            now += rnd.random()
            r = rnd.random()
            if r < 0.3 and len(model) < 64:
                n = rnd.randrange(1 << 20)
                if n not in model:
                    ops.append(("ins", n, now))
                    model[n] = [now, 0]
            elif r < 0.55 and model:
                n = rnd.choice(list(model))
                ops.append(("touch", n, now))
                model[n][0] = now
            elif r < 0.7 and model:
                # the cores set a class right after the insert or a touch (last is newest)
                n, c = rnd.choice(list(model)), rnd.randrange(len(timeouts))
                ops += [("touch", n, now), ("class", n, c)]
                model[n] = [now, c]
            elif r < 0.8 and model:
                n = rnd.choice(list(model))
                ops.append(("del", n))
                del model[n]
            else:
                t = now + rnd.choice([0, 1, 5, 20, 100])
                ops.append(("exp", t))
                expired = {n for n, (last, c) in model.items() if last + timeouts[c] <= t}
                ops[-1] = ("exp", t, frozenset(expired))
        got, seen, count = probe.replay([op[:2] if op[0] == "exp" else op for op in ops],
                                        64, timeouts)
        wanted = [op[2] for op in ops if op[0] == "exp"]
        for g, w in zip(got, wanted):
            assert (g == -1) == (not w) and (g == -1 or g in w)
        assert seen == sorted(model) and count == len(model)


def test_timeout_classes():
    assert timeout_classes(60, ()) == ([60.0], [])
    values, ranges = timeout_classes(60, [(53, 53, 10), (123, 123, 10), (443, 443, 60),
                                          (27000, 27100, 300)])
    assert values == [60.0, 10.0, 300.0]
    assert ranges == [(53, 53, 1), (123, 123, 1), (443, 443, 0), (27000, 27100, 2)]
    pmap = port_class_map(ranges)
    assert (pmap[53], pmap[123], pmap[443], pmap[27000], pmap[27100], pmap[27101]) == (1, 1, 0, 2, 2, 0)
    assert port_class_map([(443, 443, 0)]) is None         # all class 0: no map at all
    with pytest.raises(ValueError, match="at most 7 distinct"):
        timeout_classes(60, [(p, p, p) for p in range(1, MAX_CLASSES + 1)])


def _parse(value, timeout=None):
    table = {"name": "f", "mode": "forward", "listen": "127.0.0.1:5000", "to": "127.0.0.1:53",
             "timeout_port": value}
    if timeout is not None:
        table["timeout"] = timeout
    return parse_listener(table, source="relay.toml")


def test_timeout_port_setting():
    assert _parse("53=10,5000-5010=300").port_timeouts() == ((53, 53, 10.0), (5000, 5010, 300.0))
    assert _parse({"443": 30, "53": 5}).port_timeouts() == ((53, 53, 5.0), (443, 443, 30.0))
    assert _parse("none").port_timeouts() == () and _parse("").port_timeouts() == ()
    # the defaults: DNS and NTP short, never longer than `timeout`
    assert listener("forward", listen=("127.0.0.1", 1)).port_timeouts() == ((53, 53, 10.0), (123, 123, 10.0))
    assert listener("redir", listen=("127.0.0.1", 1), timeout=4.0).port_timeouts() == ((53, 53, 4.0), (123, 123, 4.0))
    # ... but what is given is kept, also above `timeout`
    assert _parse("443=300", timeout=60).port_timeouts() == ((443, 443, 300.0),)
    assert listener("forward", listen=("127.0.0.1", 1)).summary()["timeout_port"] == "53=10,123=10"


@pytest.mark.parametrize("value, reason", [
    ("53", "expected PORT=SECONDS"),
    ("53=x", "seconds must be a number"),
    ("0=10", "ports must be 1-65535"),
    ("70000=10", "ports must be 1-65535"),
    ("20-10=5", "ports must be 1-65535, first <= last"),
    ("a=5", "expected a port or FIRST-LAST"),
    ("53=0", "out of range"),
    ("50-60=10,55=20", "port ranges overlap: 50-60 and 55-55"),
    (",".join(f"{p}={p}" for p in range(1, 9)), "at most 7 different timeouts"),
    (5, "expected a string like"),
])
def test_bad_timeout_port_is_refused_naming_the_key(value, reason):
    with pytest.raises(ConfigError) as e:
        _parse(value)
    assert "timeout_port" in str(e.value) and reason in str(e.value)
    assert "relay.toml" in str(e.value)


_engine = None


def _forward_engine(to, **kw):
    eng = pytest.importorskip("relay.datapath.engine")
    lsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lsock.bind(("127.0.0.1", 0))
    lsock.setblocking(False)
    return lsock, eng.Engine(lsock.fileno(), "forward", to=to, listen_family=socket.AF_INET, **kw)


def test_engine_flows_to_a_short_port_expire_first():
    """Two forward engines, one to a port with a 0.3 s timeout, one to a port with the
    default (60 s): the first association expires, the second stays."""
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    port = sink.getsockname()[1]
    short = _forward_engine(sink.getsockname(), timeout=60.0, port_timeouts=[(port, port, 0.3)])
    other = _forward_engine(sink.getsockname(), timeout=60.0,
                            port_timeouts=[(port + 1, port + 1, 0.3)] if port < 65535 else [])
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    try:
        for lsock, eng in (short, other):
            client.sendto(b"x", lsock.getsockname())
            wait_until(lambda: (eng.run(20), eng.counters()["assoc_open"])[1] == 1, 5,
                       what="an association")
        assert short[1].association_timeout(client.getsockname()) == pytest.approx(0.3)
        assert other[1].association_timeout(client.getsockname()) == 60.0

        def expired():
            for _, eng in (short, other):
                eng.run(20)
            return short[1].counters()["assoc_expired"] == 1
        wait_until(expired, 5, what="the short association expired")
        assert short[1].counters()["assoc_open"] == 0
        assert other[1].counters()["assoc_open"] == 1 and other[1].counters()["assoc_expired"] == 0
    finally:
        for lsock, eng in (short, other):
            eng.close()
            lsock.close()
        client.close()
        sink.close()


def test_engine_refuses_more_classes_than_the_table_has():
    """redir (whose flows go to any port) checks the classes; forward takes its --to port's
    timeout as the table's only one, whatever else is given."""
    eng = pytest.importorskip("relay.datapath.engine")
    lsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lsock.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(ValueError, match="at most 7 distinct"):
            eng.Engine(lsock.fileno(), "redir", reply="transparent", listen_family=socket.AF_INET,
                       port_timeouts=[(p, p, float(p)) for p in range(1, 9)])
        lsock2, fwd = _forward_engine(("127.0.0.1", 9),
                                      port_timeouts=[(p, p, float(p)) for p in range(1, 10)])
        fwd.close()
        lsock2.close()
    finally:
        lsock.close()


# ------------------------------------------------------------- the servers' flows


@pytest.mark.usefixtures("impl")
def test_tunnel_server_flows_expire_by_destination_port(running, echo):
    """tunnel-server --timeout-port: the flow to the short port goes after its 0.3 s, the
    flow to another port stays (60 s)."""
    from relay import proto
    from tests.relayproc import LoopbackEcho
    from tests.support import cfg, raw_client, read_frames
    with LoopbackEcho() as other:
        short = echo.addr[1]
        server = running(cfg("tunnel-server", listen=("127.0.0.1", 0), allow=["127.0.0.0/8"],
                             timeout=60.0, timeout_port=((short, short, 0.3),)))
        s, _ = raw_client(server)
        with s:
            s.sendall(proto.encode_frame(*echo.addr, b"dns-like", flow=1)
                      + proto.encode_frame("127.0.0.1", other.address[1], b"game-like", flow=2))
            assert sorted(f.data for f in read_frames(s, 2)) == [b"dns-like", b"game-like"]
            wait_until(lambda: server.stats()["assoc_expired"] == 1, 5, what="one flow expired")
            time.sleep(0.6)
            st = server.stats()
            assert st["assoc_expired"] == 1 and st["assoc_open"] == 1
            s.sendall(proto.encode_frame("127.0.0.1", other.address[1], b"again", flow=2))
            assert [f.data for f in read_frames(s, 1)] == [b"again"]
            assert server.stats()["assoc_created"] == 2       # flow 2 kept its socket


@pytest.mark.usefixtures("impl")
def test_socks5_associations_expire_by_destination_port(running, echo):
    """socks5 --timeout-port: an association whose first datagram went to the short port is
    closed after 0.3 s with its control connection; one to another port stays."""
    from relay import proto
    from tests.relayproc import LoopbackEcho
    from tests.support import cfg, closed_by_peer, raw_associate
    with LoopbackEcho() as other:
        short = echo.addr[1]
        server = running(cfg("socks5", listen=("127.0.0.1", 0), allow=["127.0.0.0/8"],
                             timeout=60.0, timeout_port=((short, short, 0.3),)))
        ctl1, u1, relay1 = raw_associate(server)
        ctl2, u2, relay2 = raw_associate(server)
        with ctl1, u1, ctl2, u2:
            for u, relay, dst in ((u1, relay1, echo.addr), (u2, relay2, other.address)):
                u.settimeout(3)
                u.sendto(proto.udp_header(*dst[:2]) + b"hello", relay)
                assert u.recvfrom(1000)[0].endswith(b"hello")
            assert closed_by_peer(ctl1, 5)
            st = server.stats()
            assert st["assoc_expired"] == 1 and st["assoc_open"] == 1
            u2.sendto(proto.udp_header(*other.address[:2]) + b"still", relay2)
            assert u2.recvfrom(1000)[0].endswith(b"still")
