"""What the halves of test_sendq.py share (tests/unit, tests/netns):
the helpers, fixtures and constants that its tests of more than one kind use.
Written by the script that grouped the tests by kind; change them here."""
import socket
import textwrap

import pytest

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


def drain(sock):
    out = []
    try:
        while True:
            out.append(sock.recv(70000))
    except socket.timeout:
        return out
