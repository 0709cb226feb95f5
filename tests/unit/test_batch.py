"""BatchSocket (recvmmsg/sendmmsg, original destination, GSO/GRO): the extension in
relay.packet._fast and the pure-Python fallback in relay.packet.pure.batch, run through the same tests.

Loopback tests use 127.0.0.1/::1; the backpressure and TPROXY tests run in network
namespaces made for them (a token-bucket qdisc on a namespace's lo, the cli/rtr/srv
topology with an nft tproxy rule in rtr).
"""
import errno
import gc
import itertools
import os
import socket
import time

import pytest
from tests.support_batch import (FAMILIES, _native, _pure, addr2, drain, payload, plain_drain,
                                 quiet, udp, wait_readable)
from tests.support_batch import B  # noqa: F401 (fixtures)

SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104


# -- construction and bad input ------------------------------------------------------

def test_constructor_checks(B):
    with pytest.raises(TypeError, match="socket or a file descriptor"):
        B("not a socket")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
        with pytest.raises(ValueError, match="SOCK_DGRAM"):
            B(t)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as u:
        with pytest.raises(ValueError, match="AF_INET or AF_INET6"):
            B(u)
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as ei:
            B(r)
        assert ei.value.errno == errno.ENOTSOCK
    finally:
        os.close(r)
        os.close(w)
    with udp(socket.AF_INET) as s:
        for kw, exc in (({"batch": 0}, ValueError), ({"batch": 1025}, ValueError),
                        ({"batch": "8"}, TypeError), ({"bufsize": 0}, ValueError),
                        ({"bufsize": 65537}, ValueError), ({"bufsize": 1.5}, TypeError)):
            with pytest.raises(exc, match=next(iter(kw))):
                B(s, **kw)
        with pytest.raises(ValueError, match="file descriptor"):
            B(-1)
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        B(closed)


def test_close_semantics(B):
    s = udp(socket.AF_INET)
    b = B(s, batch=4, bufsize=64)
    assert b.fileno() == s.fileno() and not b.closed
    assert b.family == socket.AF_INET and b.batch == 4 and b.bufsize == 64
    with b:
        pass
    assert b.closed and b.fileno() == -1
    assert s.fileno() == -1, "a socket object is closed with its BatchSocket"
    for call in (b.recv, lambda: b.send([b"x"]), lambda: b.send_gso(b"x", 1), lambda: b.data(0)):
        with pytest.raises(ValueError, match="closed"):
            call()
    b.close()                                       # idempotent
    # A bare descriptor is borrowed: close() leaves it open.
    with udp(socket.AF_INET) as s2:
        with B(s2.fileno()) as b2:
            assert b2.fileno() == s2.fileno()
        assert s2.fileno() >= 0
        s2.getsockname()                            # still a working socket


def test_bad_items_and_indexes(B):
    with udp(socket.AF_INET) as rx, udp(socket.AF_INET) as tx, B(tx, batch=4) as b, B(rx) as r:
        dst = addr2(rx)
        cases = [
            ([1], TypeError, "bytes-like"),
            (["text"], TypeError, "bytes-like"),
            ([(b"x",)], TypeError, "tuple of 1 items"),
            ([(b"x", dst, 1)], TypeError, "tuple of 3 items"),
            ([(b"x", "127.0.0.1")], TypeError, "destination must be"),
            ([(b"x", (dst[0],))], TypeError, "tuple of 1 items"),
            ([(b"x", (1, 80))], TypeError, "host must be a str"),
            ([(b"x", (dst[0], "80"))], TypeError, "port must be an int"),
            ([(b"x", (dst[0], 65536))], ValueError, "port must be in 0..65535"),
            ([(b"x", (dst[0], -1))], ValueError, "port must be in"),
            ([(b"x", ("localhost", 80))], ValueError, "address literal"),
            ([(b"x", ("1.2.3.4\0", 80))], ValueError, "address literal"),
            ([(b"x", ("1.2.3", 80))], ValueError, "address literal"),
            ([(b"x", ("::1", 80))], ValueError, "IPv6 address '::1' from an AF_INET socket"),
            ([(memoryview(bytearray(8))[::2], dst)], ValueError, "contiguous"),
            (5, TypeError, "iterable"),
        ]
        for items, exc, msg in cases:
            with pytest.raises(exc, match=msg):
                b.send(items)
        # Items before a bad one go out, and the exception says how many.
        with pytest.raises(TypeError) as ei:
            b.send([(b"a", dst), (b"b", dst), (b"c", dst), (b"d", dst), (b"e", dst), (None, dst)])
        assert ei.value.sent == 5
        assert [p for p, *_ in drain(r, 5)] == [b"a", b"b", b"c", b"d", b"e"]
        assert quiet(rx)
        assert r.recv() == 0 and r.count == 0
        for call in (r.data, r.source, r.origdst, r.truncated, r.segment_size, r.segments):
            with pytest.raises(IndexError, match="out of range"):
                call(0)
        with pytest.raises(ValueError, match="segment_size"):
            b.send_gso(b"x" * 10, 0, dst)
        with pytest.raises(TypeError, match="segment_size"):
            b.send_gso(b"x" * 10, "5", dst)
        with pytest.raises(ValueError, match="segment 0 is 3 bytes"):
            b.send_gso([b"abc", b"defg"], 4, dst)
        with pytest.raises(ValueError, match="last segment is 5 bytes"):
            b.send_gso([b"abcd", b"defgh"], 4, dst)
        with pytest.raises(TypeError, match="segment 1 must be a bytes-like"):
            b.send_gso([b"abcd", 5], 4, dst)
        with pytest.raises(TypeError, match="iterable"):
            b.send_gso(5, 4, dst)
        assert b.send_gso([], 4, dst) == 0
        assert quiet(rx)


def test_errors_match_between_implementations():
    """The extension and the fallback raise the same exception types with the same text."""
    N, P = _native(), _pure()
    with udp(socket.AF_INET6) as s6, udp(socket.AF_INET) as s4:
        bad_sends = [[1], [(b"x",)], [(b"x", ("h", 1))], [(b"x", ("::1", 1 << 20))],
                     [(b"x", ("::1", 1, -1))], [(b"x", ("::1", 1, 0, "x"))], [(b"x", [1])], 7]
        results = []
        for impl in (N, P):
            out = []
            for fam_sock in (s4, s6):
                b = impl(fam_sock.fileno())
                for items in bad_sends:
                    try:
                        b.send(items)
                        out.append(None)
                    except Exception as e:
                        out.append((type(e), str(e)))
                for args in ((b"x", 0), ([b"ab", b"c"], 1), ([b"a", b"bc"], 1), (None, 4)):
                    try:
                        b.send_gso(*args)
                        out.append(None)
                    except Exception as e:
                        out.append((type(e), str(e)))
                for kw in ({"batch": 0}, {"bufsize": -1}, {"batch": None}):
                    try:
                        impl(fam_sock.fileno(), **kw)
                    except Exception as e:
                        out.append((type(e), str(e)))
                b.close()
            results.append(out)
        assert results[0] == results[1]
        assert all(r is not None for r in results[0])


# -- receive ---------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_recv_many_sources(B, family):
    """1000 datagrams from 5 sockets in bursts -> exactly those 1000, right payloads and
    sources, each source's datagrams in order."""
    n_total, n_src, burst = 1000, 5, 100
    with udp(family) as rx, B(rx, batch=64, bufsize=2048) as b:
        senders = [udp(family, big=False) for _ in range(n_src)]
        try:
            dst = addr2(rx)
            expected = []
            got = []
            seq = itertools.count()
            for _ in range(n_total // burst):
                for _ in range(burst):
                    k = next(seq)
                    s = senders[k % n_src]
                    p = payload(k % n_src, k)
                    s.sendto(p, dst)
                    expected.append((p, addr2(s)))
                got += drain(b, burst)
            assert quiet(rx)
            assert b.recv() == 0
        finally:
            for s in senders:
                s.close()
    assert len(got) == n_total
    assert sorted((p, src) for p, src, *_ in got) == sorted(expected)
    for s in range(n_src):
        mine = [p for p, src, *_ in got if p.startswith(f"{s}:".encode())]
        assert mine == [p for p, _ in expected if p.startswith(f"{s}:".encode())]
    assert all(od is None and not tr and gs == 0 for _, _, od, tr, gs in got)


@pytest.mark.parametrize("family", FAMILIES)
def test_truncation(B, family):
    with udp(family) as rx, udp(family) as tx, B(rx, batch=8, bufsize=512) as b:
        big, small, exact = payload("big", 1, 1000), payload("small", 2, 10), payload("ex", 3, 512)
        for p in (big, small, exact):
            tx.sendto(p, addr2(rx))
        got = drain(b, 3)
    assert [(p, tr) for p, _, _, tr, _ in got] == [(big[:512], True), (small, False), (exact, False)]


def test_data_views(B):
    """data(i) is a writable view into the ring; it keeps the memory alive after the
    BatchSocket is gone."""
    with udp(socket.AF_INET) as rx, udp(socket.AF_INET) as tx:
        b = B(rx.fileno(), batch=4, bufsize=256)
        tx.sendto(b"hello world", addr2(rx))
        assert drain(b, 1)[0][0] == b"hello world"
        v = b.data(0)
        assert isinstance(v, memoryview) and not v.readonly and len(v) == 11
        v[0:5] = b"HELLO"
        assert bytes(b.data(0)) == b"HELLO world"
        assert [bytes(s) for s in b.segments(0)] == [b"HELLO world"]
        b.close()
        del b
        gc.collect()
        assert bytes(v) == b"HELLO world"


# -- send ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_send_many_destinations(B, family):
    """1000 items of mixed buffer types to 3 receivers, in calls of 100 items."""
    rxs = [udp(family) for _ in range(3)]
    try:
        with udp(family) as tx, B(tx, batch=16) as b:
            dests = [addr2(r) for r in rxs]
            kinds = [bytes, bytearray, lambda x: memoryview(x)]
            items = [(kinds[k % 3](payload("d", k)), dests[k % 3]) for k in range(1000)]
            got = [[] for _ in rxs]
            for start in range(0, len(items), 100):
                chunk = items[start:start + 100]
                assert b.send(chunk) == len(chunk), b.last_error
                assert b.last_error == 0
                for j, r in enumerate(rxs):
                    got[j] += plain_drain(r, sum(1 for _, d in chunk if d == dests[j]))
            for j, r in enumerate(rxs):
                assert [p for p, _ in got[j]] == [bytes(p) for p, d in items if d == dests[j]]
                assert {src for _, src in got[j]} == {addr2(tx)}
                assert quiet(r)
    finally:
        for r in rxs:
            r.close()


def test_send_v4_literal_on_dual_stack_socket(B):
    with udp(socket.AF_INET) as rx4, socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as tx:
        tx.bind(("::", 0))
        with B(tx) as b:
            assert b.send([(b"mapped", addr2(rx4)), (b"mapped2", ("::ffff:127.0.0.1", addr2(rx4)[1]))]) == 2
            assert [p for p, _ in plain_drain(rx4, 2)] == [b"mapped", b"mapped2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_send_connected(B, family):
    with udp(family) as rx, udp(family) as tx:
        tx.connect(addr2(rx))
        with B(tx, batch=2) as b:
            items = [b"a", bytearray(b"bb"), memoryview(b"xcx")[1:2], (b"d", None), b""]
            assert b.send(items) == 5
            assert b.send(iter([b"gen1", b"gen2"])) == 2
            got = plain_drain(rx, 7)
    assert [p for p, _ in got] == [b"a", b"bb", b"c", b"d", b"", b"gen1", b"gen2"]


def test_send_not_reentrant(B):
    with udp(socket.AF_INET) as rx, udp(socket.AF_INET) as tx, B(tx) as b:
        dst = addr2(rx)

        def items():
            yield (b"first", dst)
            b.send([(b"nested", dst)])

        with pytest.raises(RuntimeError, match="in use") as ei:
            b.send(items())
        assert ei.value.sent == 1
        assert [p for p, _ in plain_drain(rx, 1)] == [b"first"]
        assert quiet(rx)
        assert b.send([(b"after", dst)]) == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_send_econnrefused(B, family):
    """A connected socket whose peer port is closed: the ICMP error makes the next send
    stop with ECONNREFUSED and a count of 0; nothing is lost, the retry sends it all."""
    with udp(family) as probe:
        peer = addr2(probe)                    # a free port, closed again below
    with udp(family) as tx:
        tx.connect(peer)
        with B(tx) as b:
            assert b.send([b"ping"]) == 1 and b.last_error == 0
            # Port unreachable comes back at once over loopback; the pending error makes
            # the socket readable (POLLERR).
            assert wait_readable(tx.fileno(), 5)
            with udp(family, port=peer[1]) as rx:
                items = [b"one", b"two", b"three"]
                assert b.send(items) == 0
                assert b.last_error == errno.ECONNREFUSED
                assert quiet(rx, 0.05)
                assert b.send(items) == 3 and b.last_error == 0
                assert [p for p, _ in plain_drain(rx, 3)] == items


def test_recv_econnrefused(B):
    """recv() on a connected socket reports the pending ICMP error, then works again."""
    with udp(socket.AF_INET) as probe:
        peer = addr2(probe)
    with udp(socket.AF_INET) as s:
        s.connect(peer)
        s.send(b"ping")
        with B(s) as b:
            assert wait_readable(s.fileno(), 5)
            with pytest.raises(ConnectionRefusedError):
                b.recv()
            assert b.recv() == 0


def test_origdst_plain_socket(B):
    """Without TPROXY the original destination is the socket's own address."""
    with udp(socket.AF_INET) as rx, udp(socket.AF_INET) as tx:
        with B(rx, recv_origdst=True) as b:
            tx.sendto(b"x", addr2(rx))
            assert drain(b, 1)[0][2] == addr2(rx)


# -- GSO / GRO --------------------------------------------------------------------------

def _need_gso_gro():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.setsockopt(SOL_UDP, UDP_SEGMENT, 1000)
        except OSError as e:
            pytest.skip(f"the kernel lacks UDP_SEGMENT (GSO): {e}")
        try:
            s.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError as e:
            pytest.skip(f"the kernel lacks UDP_GRO: {e}")


@pytest.mark.parametrize("family", FAMILIES)
def test_gso_gro_round_trip(B, family):
    _need_gso_gro()
    payloads = [payload("g", k, 1000) for k in range(40)]
    with udp(family) as rg, udp(family) as rn, udp(family) as tx:
        with B(rg, gro=True) as bg, B(rn, batch=64, bufsize=2048) as bn, B(tx) as bt:
            assert bt.send_gso(payloads, 1000, addr2(rg)) == 40
            assert bt.send_gso(payloads, 1000, addr2(rn)) == 40
            got = drain(bg, 40, segments=True)
            assert [p for p, *_ in got] == payloads
            assert {src for _, src, *_ in got} == {addr2(tx)}
            # Coalesced slots say so, and split into exactly their segments.
            assert all(gs in (0, 1000) for *_, gs in got)
            plain = drain(bn, 40)
            assert [p for p, *_ in plain] == payloads
            assert all(gs == 0 and not tr for _, _, _, tr, gs in plain)
            # One buffer cut by the kernel, the last datagram shorter.
            blob = b"".join(payloads) + b"tail"
            assert bt.send_gso(memoryview(blob), 1000, addr2(rn)) == 41
            assert [p for p, *_ in drain(bn, 41)] == payloads + [b"tail"]
            assert quiet(rg) and quiet(rn)


def test_gso_connected_and_coalesced(B):
    """A GRO receiver gets a GSO train in one slot: segment_size() and segments()."""
    _need_gso_gro()
    with udp(socket.AF_INET) as rg, udp(socket.AF_INET) as tx:
        tx.connect(addr2(rg))
        with B(rg, gro=True, batch=4) as bg, B(tx) as bt:
            parts = [payload("c", k, 500) for k in range(9)] + [b"end"]
            assert bt.send_gso(parts, 500) == 10
            got = []
            deadline = time.monotonic() + 5
            slots = []
            while len(got) < 10 and time.monotonic() < deadline:
                n = bg.recv()
                if not n:
                    wait_readable(bg.fileno(), 0.2)
                for i in range(n):
                    slots.append((len(bg.data(i)), bg.segment_size(i)))
                    got += [bytes(s) for s in bg.segments(i)]
            assert got == parts
            # Whatever the kernel coalesced, the sizes add up and segments follow the size.
            assert sum(n for n, _ in slots) == sum(len(p) for p in parts)
            for n, gs in slots:
                assert gs in (0, 500)
                if gs == 0:
                    assert n <= 500
