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
from tests.support_sendq import drain
from tests.support_sendq import probe  # noqa: F401 (fixtures)


def receiver(family=socket.AF_INET, host="127.0.0.1"):
    r = socket.socket(family, socket.SOCK_DGRAM)
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
    r.bind((host, 0))
    r.settimeout(0.3)
    return r


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
