"""relay/datapath/sendq.pxd: queued datagrams go out with sendmmsg, runs coalesced into GSO.

The .pxd has inline C only, so the test compiles a small probe module against it (Cython
and a C compiler are what `pip install -e .` needs anyway). Checks: runs of equal-size
datagrams to one address become one message (a shorter one may end it), anything else
starts a new message; every datagram arrives intact, in order, counted; a route whose MTU
refuses the segment size gets the datagrams one by one and the queue stops coalescing
that size; a full socket buffer is counted, never silent.
"""
import os
import socket
import textwrap

import pytest

from tests.netns import SRV4, SRV6
from tests.support import compiled_probe

PROBE = textwrap.dedent('''
    # cython: language_level=3
    from libc.stdint cimport uint8_t, uint64_t
    from relay.datapath.addr cimport sockaddr_any, sockaddr_from_tuple
    from relay.includes.system cimport socklen_t
    from relay.datapath.sendq cimport sendq_t, sq_init, sq_free, sq_add, sq_flush, sq_full
    from relay.datapath.stats cimport N_COUNTERS, C_UP_DATAGRAMS, C_UP_BYTES
    from relay.stats import COUNTERS

    def send(int fd, list items, int cap=8, unsigned gso_max=65000):
        """items [(payload, (host, port))] -> (messages at each flush, counters, gso_max)"""
        cdef sendq_t q
        cdef sockaddr_any a
        cdef socklen_t al
        cdef uint64_t st[N_COUNTERS]
        for k in range(N_COUNTERS):
            st[k] = 0
        keep = [bytes(p) for p, _ in items]
        sq_init(&q, cap)
        q.fd = fd
        q.gso_max = gso_max
        flushes = []
        try:
            for j, (p, addr) in enumerate(items):
                if sq_full(&q):
                    flushes.append(q.n)
                    sq_flush(&q, st, C_UP_DATAGRAMS, C_UP_BYTES)
                al = sockaddr_from_tuple(addr, &a)
                b = keep[j]
                sq_add(&q, &a, al, <const uint8_t *><const char *>b, len(b))
            flushes.append(q.n)
            sq_flush(&q, st, C_UP_DATAGRAMS, C_UP_BYTES)
            return flushes, {n: st[k] for k, n in enumerate(COUNTERS) if st[k]}, q.gso_max
        finally:
            sq_free(&q)
''')


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    with compiled_probe(tmp_path_factory.mktemp('sendq'), 'sqprobe', PROBE) as m:
        yield m


def receiver(family=socket.AF_INET, host="127.0.0.1"):
    r = socket.socket(family, socket.SOCK_DGRAM)
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
    r.bind((host, 0))
    r.settimeout(0.3)
    return r


def drain(sock):
    out = []
    try:
        while True:
            out.append(sock.recv(70000))
    except socket.timeout:
        return out


def test_runs_become_one_message_each(probe):
    a, b = receiver(), receiver()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    A, B = a.getsockname(), b.getsockname()
    run = [bytes([i]) * 1000 for i in range(100)]
    items = ([(p, A) for p in run]                     # 64 + 36 (the per-message limit)
             + [(b"short", A)]                         # ends the second run
             + [(b"", A)]                              # empty: never coalesced
             + [(b"y" * 1000, B), (b"z" * 1000, B)]    # another address
             + [(b"w" * 2000, A), (b"v" * 2000, A), (b"u" * 2500, A)])  # larger: new run
    flushes, st, gso_max = probe.send(s.fileno(), items, cap=128)
    assert flushes == [6]
    assert st == {"up_datagrams": len(items), "up_bytes": sum(len(p) for p, _ in items)}
    assert gso_max == 65000
    assert drain(a) == run + [b"short", b"", b"w" * 2000, b"v" * 2000, b"u" * 2500]
    assert drain(b) == [b"y" * 1000, b"z" * 1000]


def test_a_full_queue_flushes_and_nothing_is_lost(probe):
    a = receiver(socket.AF_INET6, "::1")
    s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    items = [(os.urandom(1 + i % 50), a.getsockname()[:2]) for i in range(500)]
    flushes, st, _ = probe.send(s.fileno(), items, cap=4)
    assert all(f <= 4 for f in flushes) and len(flushes) == 125   # 4 datagrams a flush
    assert st["up_datagrams"] == 500
    assert drain(a) == [p for p, _ in items]


def test_sizes_over_the_gso_limit_are_sent_plain(probe):
    a = receiver()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    items = [(bytes([i]) * 3000, a.getsockname()) for i in range(10)]
    flushes, st, _ = probe.send(s.fileno(), items, gso_max=1400)
    assert flushes == [8, 2]
    assert st["up_datagrams"] == 10
    assert drain(a) == [p for p, _ in items]


@pytest.mark.netns
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_route_that_refuses_the_segment_size_gets_them_one_by_one(topo, probe, family):
    """Across a 1500-byte MTU veth, 3000-byte segments cannot be GSO (EINVAL): those
    datagrams go out one by one (fragmented by IP as usual), and the queue learns not to
    coalesce that size again; 1000-byte runs still go as GSO."""
    dst = SRV4 if family == socket.AF_INET else SRV6
    with topo.srv.enter():
        r = socket.socket(family, socket.SOCK_DGRAM)
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
    r.bind((dst, 5000))
    r.settimeout(0.5)
    s = topo.rtr.socket(family)
    big = [(bytes([i]) * 3000, (dst, 5000)) for i in range(20)]
    small = [(bytes([i]) * 1000, (dst, 5000)) for i in range(20)]
    flushes, st, gso_max = probe.send(s.fileno(), big + small, cap=64)
    assert gso_max == 2999
    assert flushes == [2]
    assert st == {"up_datagrams": 40, "up_bytes": 80000}
    assert drain(r) == [p for p, _ in big + small]
