"""UDP disguise headers: the layouts (relay/proto/disguise.py, v2ray-core's
transport/internet/headers) and the engine adding and stripping them on loopback
(relay/datapath/disguise.pxi), single datagrams and GSO/GRO runs, IPv4 and IPv6.

The namespace test with two relay processes and on-wire captures is
tests/netns/test_disguise.py."""
import socket
import struct

import pytest

from relay.proto import disguise as H
from tests.support import check_disguise_steps

KINDS = [k for k in H.KINDS if k != "noop"]


def counter_rand(start=0x1234):
    """A `rand` for HeaderWriter giving known start values."""
    values = iter([start, start + 1, start + 2])

    def rand(n):
        return (next(values) & 0xFFFF).to_bytes(n, "big")
    return rand


# --- the layouts, as v2ray's header types write them ------------------------------------

def test_sizes_are_v2rays():
    assert H.SIZES == {"noop": 0, "srtp": 4, "utp": 4, "wechat-video": 13, "wireguard": 4,
                       "dtls": 13}


def test_srtp_fixed_bytes_and_number_counting_up_from_a_random_start():
    w = H.HeaderWriter("srtp", rand=counter_rand(0xFFFE))
    got = [w.next() for _ in range(3)]
    assert got == [b"\xb5\xe8\xff\xff", b"\xb5\xe8\x00\x00", b"\xb5\xe8\x00\x01"]


def test_utp_connection_id_then_fixed_bytes_never_changing():
    w = H.HeaderWriter("utp", rand=counter_rand(0x0102))
    # the first random value goes to the srtp/wechat number, the second is the id
    assert [w.next() for _ in range(3)] == [b"\x01\x03\x01\x00"] * 3


def test_wechat_video_sn_counts_up_between_fixed_bytes():
    w = H.HeaderWriter("wechat-video", rand=counter_rand(0xFFFF))
    a, b = w.next(), w.next()
    tail = bytes([0x00, 0x10, 0x11, 0x18, 0x30, 0x22, 0x30])
    assert a == b"\xa1\x08" + struct.pack(">I", 0x10000) + tail
    assert b == b"\xa1\x08" + struct.pack(">I", 0x10001) + tail
    assert len(a) == 13


def test_wireguard_is_four_fixed_bytes():
    assert H.HeaderWriter("wireguard").next() == b"\x04\x00\x00\x00"


def test_dtls_record_header_sequence_from_zero_and_v2rays_length_cycle():
    w = H.HeaderWriter("dtls", rand=counter_rand(0x0A0B))
    hs = [w.next() for _ in range(9)]
    for i, h in enumerate(hs):
        assert h[:3] == b"\x17\xfe\xfd"                 # application data, DTLS 1.2
        assert h[3:5] == b"\x0a\x0c"                    # epoch: the random id, fixed
        assert h[5:7] == b"\x00\x00"
        assert struct.unpack(">I", h[7:11])[0] == i     # sequence from 0
    lengths = [struct.unpack(">H", h[11:13])[0] for h in hs]
    assert lengths == [17, 34, 51, 68, 85, 52, 69, 86, 53]


def test_dtls_length_stays_within_what_the_check_accepts():
    length = H.DTLS_LEN_FIRST
    for _ in range(1000):
        assert 17 <= length <= 100
        length = H.dtls_next_length(length)


@pytest.mark.parametrize("kind", H.KINDS)
def test_check_accepts_every_header_written(kind):
    w = H.HeaderWriter(kind)
    for _ in range(300):
        h = w.next()
        assert len(h) == H.size(kind)
        assert H.check(kind, h + b"payload") and H.strip(kind, h + b"payload") == b"payload"
        assert H.strip(kind, h) == b""


# Bytes whose change (their top bit) a receiver sees; the rest are numbers, ids and
# epochs, not checkable. dtls 11-12: the length field, 17 first, over 100 then.
CHECKED = {"srtp": [0, 1], "utp": [2, 3], "wechat-video": [0, 1, 6, 7, 8, 9, 10, 11, 12],
           "wireguard": [0, 1, 2, 3], "dtls": [0, 1, 2, 5, 6, 11, 12]}


@pytest.mark.parametrize("kind", KINDS)
def test_check_refuses_a_changed_fixed_byte_and_a_short_datagram(kind):
    h = bytearray(H.HeaderWriter(kind).next())
    for i in range(len(h)):
        bad = bytearray(h)
        bad[i] ^= 0x80
        assert H.check(kind, bad) == (i not in CHECKED[kind]), i
    assert not H.check(kind, h[:-1])
    assert H.strip(kind, b"") is None


def test_dtls_length_outside_17_to_100_is_refused():
    h = bytearray(H.HeaderWriter("dtls").next())
    for length, ok in ((16, False), (17, True), (100, True), (101, False), (1000, False)):
        h[11:13] = struct.pack(">H", length)
        assert H.check("dtls", h) == ok


def test_unknown_kind():
    with pytest.raises(ValueError, match="unknown header kind"):
        H.size("tls")


# --- the engine on loopback ------------------------------------------------------------

_engine = pytest.importorskip("relay.datapath.engine", reason="relay.datapath.engine is not built")
FAMILIES = {"ipv4": (socket.AF_INET, "127.0.0.1"), "ipv6": (socket.AF_INET6, "::1")}


def _udp(family, host, timeout=0.5, rcvbuf=1 << 22):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((host, 0))
    s.settimeout(timeout)
    return s


class Loop:
    """client -> engine (forward) -> upstream, all on loopback, driven by hand."""

    def __init__(self, fam, **kw):
        family, host = FAMILIES[fam]
        self.listen = _udp(family, host)
        self.listen.setblocking(False)
        self.up = _udp(family, host)
        self.client = _udp(family, host)
        self.engine = _engine.Engine(self.listen.fileno(), "forward", to=self.up.getsockname()[:2],
                                     listen_family=family, **kw)
        self.client.connect(self.listen.getsockname()[:2])
        self.peer = None

    def run(self, rounds=3):
        for _ in range(rounds):
            self.engine.run(10)

    def to_upstream(self, datagrams):
        for d in datagrams:
            self.client.send(d)
        self.run()
        return self.recv_up(len(datagrams))

    def recv_up(self, n):
        got = []
        for _ in range(n):
            d, self.peer = self.up.recvfrom(65535)
            got.append(d)
        return got

    def to_client(self, datagrams):
        for d in datagrams:
            self.up.sendto(d, self.peer)
        self.run()
        return [self.client.recv(65535) for _ in datagrams]

    def quiet(self, sock):
        sock.settimeout(0.05)
        try:
            return sock.recv(65535)
        except socket.timeout:
            return None
        finally:
            sock.settimeout(0.5)

    def close(self):
        self.engine.close()
        for s in (self.listen, self.up, self.client):
            s.close()


@pytest.fixture
def loops():
    made = []

    def make(fam, **kw):
        lp = Loop(fam, **kw)
        made.append(lp)
        return lp
    yield make
    for lp in made:
        lp.close()


def _sizes(kind, fam):
    h = H.size(kind)
    top = (65507 if fam == "ipv4" else 65527) - h
    return [0, 1, 1000, 1472 - h, top]


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("kind", H.KINDS)
def test_header_out_adds_towards_upstream_and_strips_replies(loops, kind, fam):
    lp = loops(fam, header_out=kind)
    n = H.size(kind)
    payloads = [bytes([i + 1]) * size for i, size in enumerate(_sizes(kind, fam))]
    got = lp.to_upstream(payloads)
    assert [g[n:] for g in got] == payloads
    assert all(H.check(kind, g) for g in got)
    check_disguise_steps(kind, [g[:n] for g in got])
    w = H.HeaderWriter(kind)
    assert lp.to_client([w.next() + p for p in payloads]) == payloads
    st = lp.engine.counters()
    assert st["up_bytes"] == st["down_bytes"] == sum(map(len, payloads))   # payload only
    assert st["up_datagrams"] == st["down_datagrams"] == len(payloads)
    assert st["drop_bad_header"] == 0


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_header_out_drops_replies_without_a_valid_header(loops, kind, fam):
    lp = loops(fam, header_out=kind)
    lp.to_upstream([b"hello"])
    bad = bytearray(H.HeaderWriter(kind).next() + b"reply")
    bad[CHECKED[kind][0]] ^= 0xFF
    lp.up.sendto(bytes(bad), lp.peer)
    lp.up.sendto(b"", lp.peer)
    lp.up.sendto(H.HeaderWriter(kind).next() + b"good", lp.peer)
    lp.run()
    assert lp.client.recv(65535) == b"good"
    assert lp.quiet(lp.client) is None
    assert lp.engine.counters()["drop_bad_header"] == 2


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_header_too_big_to_add_is_dropped_as_too_big(loops, kind, fam):
    lp = loops(fam, header_out=kind)
    top = (65507 if fam == "ipv4" else 65527) - H.size(kind)
    lp.client.send(bytes(top + 1))
    lp.client.send(b"after")
    lp.run()
    assert lp.recv_up(1)[0][H.size(kind):] == b"after"
    st = lp.engine.counters()
    assert (st["drop_too_big"], st["up_datagrams"]) == (1, 1)


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("kind", H.KINDS)
def test_header_in_strips_from_clients_and_adds_to_replies(loops, kind, fam):
    lp = loops(fam, header_in=kind)
    n = H.size(kind)
    w = H.HeaderWriter(kind)
    payloads = [bytes([i + 7]) * size for i, size in enumerate(_sizes(kind, fam))]
    assert lp.to_upstream([w.next() + p for p in payloads]) == payloads
    got = lp.to_client(payloads)
    assert [g[n:] for g in got] == payloads
    assert all(H.check(kind, g) for g in got)
    check_disguise_steps(kind, [g[:n] for g in got])
    st = lp.engine.counters()
    assert st["up_bytes"] == st["down_bytes"] == sum(map(len, payloads))


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_header_in_drops_clients_without_a_valid_header_and_makes_no_flow(loops, kind, fam):
    lp = loops(fam, header_in=kind)
    bad = bytearray(H.HeaderWriter(kind).next() + b"x")
    bad[CHECKED[kind][-1]] ^= 0x01
    for d in (bytes(bad), b"", b"\x00" * (H.size(kind) - 1)):
        lp.client.send(d)
    lp.run()
    assert lp.quiet(lp.up) is None
    st = lp.engine.counters()
    assert (st["drop_bad_header"], st["assoc_created"], st["up_datagrams"]) == (3, 0, 0)


def test_noop_both_ways_changes_nothing(loops):
    lp = loops("ipv4", header_out="noop", header_in="noop")
    assert lp.to_upstream([b"", b"abc"]) == [b"", b"abc"]
    assert lp.to_client([b"x"]) == [b"x"]


def test_in_and_out_together_translate_one_disguise_into_another(loops):
    lp = loops("ipv6", header_in="srtp", header_out="dtls")
    w = H.HeaderWriter("srtp")
    got = lp.to_upstream([w.next() + b"abc", w.next() + b""])
    assert [H.strip("dtls", g) for g in got] == [b"abc", b""]
    back = lp.to_client([H.HeaderWriter("dtls").next() + b"reply"])
    assert H.strip("srtp", back[0]) == b"reply"


def test_each_association_has_its_own_sequence(loops):
    lp = loops("ipv4", header_out="dtls")
    other = _udp(socket.AF_INET, "127.0.0.1")
    try:
        other.connect(lp.listen.getsockname())
        for _ in range(3):
            lp.client.send(b"a")
            other.send(b"b")
        lp.run()
        got = lp.recv_up(6)
    finally:
        other.close()
    by_flow = {}
    for g in got:
        by_flow.setdefault(g[13:], []).append(g[:13])
    for headers in by_flow.values():
        check_disguise_steps("dtls", headers)          # each from sequence 0, its own epoch


def test_engine_refuses_headers_outside_forward():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind(("127.0.0.1", 0))
        with pytest.raises(ValueError, match="unknown header kind"):
            _engine.Engine(s.fileno(), "forward", to=("127.0.0.1", 9), header_in="tls")
        with pytest.raises(ValueError, match="forward only"):
            _engine.Engine(s.fileno(), "redir", reply="transparent", header_out="srtp")
    finally:
        s.close()


# --- GSO runs and GRO buffers ------------------------------------------------------------

def _send_gso(sock, payloads, seg, dest=None):
    from relay import BatchSocket
    with BatchSocket(sock.fileno(), batch=64) as b:
        assert b.send_gso(b"".join(payloads), seg, dest) == len(payloads)


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_gro_buffer_gets_a_header_per_segment_both_ways(loops, kind, fam):
    """--gro: 40 datagrams from the client arrive as one coalesced buffer; upstream gets 40
    datagrams, each with its own header (numbers counting up), and a coalesced run of
    replies reaches the client as 40 datagrams without them."""
    lp = loops(fam, header_out=kind, gro=True)
    n = H.size(kind)
    payloads = [bytes([i]) * 1000 for i in range(39)] + [b"tail"]
    _send_gso(lp.client, payloads, 1000)
    lp.run()
    got = lp.recv_up(40)
    assert [g[n:] for g in got] == payloads
    check_disguise_steps(kind, [g[:n] for g in got])
    w = H.HeaderWriter(kind)
    replies = [w.next() + p for p in payloads]
    lp.up.sendto(b"", lp.peer)                  # not coalesced, and refused (no header)
    _send_gso(lp.up, replies[:39], 1000 + n, lp.peer)
    lp.up.sendto(replies[39], lp.peer)
    lp.run()
    assert [lp.client.recv(65535) for _ in range(40)] == payloads
    st = lp.engine.counters()
    assert st["up_datagrams"] == st["down_datagrams"] == 40
    assert st["up_bytes"] == st["down_bytes"] == sum(map(len, payloads))
    assert st["drop_bad_header"] == 1


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("kind", KINDS)
def test_gro_buffer_loses_each_segments_header_and_replies_get_theirs(loops, kind, fam):
    """--header-in with --gro: a run of equal-size disguised datagrams (each header its
    own) is stripped per segment, a bad segment in the middle dropped and counted; a
    coalesced run of replies leaves with a header in front of each."""
    lp = loops(fam, header_in=kind, gro=True)
    n = H.size(kind)
    w = H.HeaderWriter(kind)
    payloads = [bytes([i + 1]) * 700 for i in range(30)]
    sent = [w.next() + p for p in payloads]
    bad = bytearray(sent[10])
    bad[CHECKED[kind][0]] ^= 0xFF
    sent[10] = bytes(bad)
    _send_gso(lp.client, sent, 700 + n)
    lp.run()
    expect = payloads[:10] + payloads[11:]
    assert lp.recv_up(29) == expect
    _send_gso(lp.up, payloads + [b"end"], 700, lp.peer)
    lp.up.sendto(b"", lp.peer)
    lp.run()
    got = [lp.client.recv(65535) for _ in range(32)]
    assert [g[n:] for g in got] == payloads + [b"end", b""]
    check_disguise_steps(kind, [g[:n] for g in got])
    st = lp.engine.counters()
    assert (st["drop_bad_header"], st["up_datagrams"], st["down_datagrams"]) == (1, 29, 32)


def test_gro_buffer_of_header_only_datagrams_becomes_empty_datagrams(loops):
    """Disguised empty datagrams (13 bytes each) coalesced: each leaves as its own empty
    datagram (a GSO send cannot carry empty segments)."""
    lp = loops("ipv4", header_in="dtls", gro=True)
    w = H.HeaderWriter("dtls")
    _send_gso(lp.client, [w.next() for _ in range(5)], 13)
    lp.run()
    assert lp.recv_up(5) == [b""] * 5
    assert lp.engine.counters()["up_datagrams"] == 5


@pytest.mark.parametrize("kind", ["wireguard", "dtls"])
def test_many_gro_buffers_in_one_small_batch_all_arrive(loops, kind):
    """Six coalesced buffers of 64 datagrams wait for an engine taking 2 at a time: each
    needs a header iovec per segment (more than the batch has), and every datagram still
    arrives once, in order, with its own header; replies the same way back."""
    lp = loops("ipv4", header_out=kind, gro=True, batch=2)
    n = H.size(kind)
    runs = [[bytes([r, i]) * 32 for i in range(64)] for r in range(6)]
    for run in runs:
        _send_gso(lp.client, run, 64)
    lp.run(5)
    got = lp.recv_up(6 * 64)
    sent = [p for run in runs for p in run]
    assert [g[n:] for g in got] == sent
    check_disguise_steps(kind, [g[:n] for g in got])
    w = H.HeaderWriter(kind)
    for run in runs:
        _send_gso(lp.up, [w.next() + p for p in run], 64 + n, lp.peer)
    lp.run(5)
    assert [lp.client.recv(65535) for _ in sent] == sent
    st = lp.engine.counters()
    assert st["up_datagrams"] == st["down_datagrams"] == len(sent)


# --- configuration ---------------------------------------------------------------------

def _forward(**kw):
    from relay.config import parse_listener
    return parse_listener({"name": "d", "mode": "forward", "listen": "127.0.0.1:5000",
                           "to": "127.0.0.1:5001", **kw}, resolve=False)


def test_config_takes_the_kinds_case_insensitively():
    lst = _forward(header_out="DTLS", header_in="wechat-video")
    assert (lst.header_out, lst.header_in) == ("dtls", "wechat-video")
    assert _forward().header_out is None


@pytest.mark.parametrize("table,message", [
    ({"header_out": "dtl"}, 'listener[0].header_out: unknown header kind "dtl", did you mean "dtls"'),
    ({"header_in": 4}, "listener[0].header_in: expected a string"),
    ({"header_in": "srtp", "upstream": "socks5://127.0.0.1:1080"},
     "listener[0].header_in: needs a direct upstream"),
])
def test_config_refuses_bad_header_settings(table, message):
    from relay.config import ConfigError
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _forward(**table)


def test_config_refuses_headers_outside_forward():
    from relay.config import ConfigError, parse_listener
    with pytest.raises(ConfigError, match=r'listener\[0\]\.header_out: not allowed for mode '
                                          r'"redir": the disguise header is for a forward'):
        parse_listener({"name": "r", "mode": "redir", "listen": "[::]:7000",
                        "header_out": "srtp"})


def test_command_line_builds_the_same_listener():
    from relay import cli
    args = cli.build_parser().parse_args(["forward", "--listen", "127.0.0.1:5000", "--to",
                                          "127.0.0.1:5001", "--header-out", "utp",
                                          "--header-in", "srtp"])
    lc = cli._listener_from_args(args, "forward")
    assert (lc["header_out"], lc["header_in"]) == ("utp", "srtp")
    assert _forward(header_out="utp", header_in="srtp") == _forward(
        **{k: lc[k] for k in ("header_out", "header_in")})


def test_coalesced_header_only_replies_in_a_batch_of_one(loops):
    """A coalesced run of replies that are headers only: each becomes an empty datagram of
    its own message (more messages than the batch has slots), all delivered."""
    lp = loops("ipv6", header_out="dtls", gro=True, batch=1)
    lp.to_upstream([b"ask"])
    w = H.HeaderWriter("dtls")
    _send_gso(lp.up, [w.next() for _ in range(6)], 13, lp.peer)
    lp.run()
    assert [lp.client.recv(65535) for _ in range(6)] == [b""] * 6
    assert lp.engine.counters()["down_datagrams"] == 6
