"""drop_rcvbuf: what the kernel drops at a full listen socket is counted, once.

The engine reads the listen socket's drop count (SO_MEMINFO) once per sweep and whenever
its counters are read, instead of asking for an SO_RXQ_OVFL control message on every
datagram. Loopback only; the engine is driven directly (relay.datapath.engine.Engine).
"""
import socket
import time

import pytest

_engine = pytest.importorskip("relay.datapath.engine", reason="relay.datapath.engine is not built")

N = 3000


def _pair():
    lsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)   # overflows after a few
    lsock.bind(("127.0.0.1", 0))
    lsock.setblocking(False)
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sink.bind(("127.0.0.1", 0))
    sink.settimeout(0.2)
    return lsock, sink


def _blast(dst, n):
    c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for i in range(n):
        c.sendto(b"%06d" % i, dst)
    c.close()


def _drain(sink):
    got = 0
    try:
        while True:
            sink.recv(2048)
            got += 1
    except socket.timeout:
        return got


def _run(engine, rounds=5):
    for _ in range(rounds):
        engine.run(20)


def test_full_listen_socket_drops_are_counted():
    lsock, sink = _pair()
    engine = _engine.Engine(lsock.fileno(), "forward", to=sink.getsockname(),
                            listen_family=socket.AF_INET)
    try:
        _blast(lsock.getsockname(), N)          # the engine is not reading: most are dropped
        _run(engine)
        st = engine.counters()
        got = _drain(sink)
        assert st["drop_rcvbuf"] > 0
        assert st["up_datagrams"] == got
        assert st["up_datagrams"] + st["drop_rcvbuf"] == N
    finally:
        engine.close()
        lsock.close()
        sink.close()


def test_drops_before_the_engine_started_are_not_its_own():
    lsock, sink = _pair()
    _blast(lsock.getsockname(), N)              # drops that happen with no engine at all
    while True:                                 # empty the socket again
        try:
            lsock.recv(2048)
        except BlockingIOError:
            break
    engine = _engine.Engine(lsock.fileno(), "forward", to=sink.getsockname(),
                            listen_family=socket.AF_INET)
    try:
        _run(engine, 2)
        assert engine.counters()["drop_rcvbuf"] == 0
        _blast(lsock.getsockname(), 3)          # fits in the receive buffer
        _run(engine)
        st = engine.counters()
        assert (st["up_datagrams"], st["drop_rcvbuf"]) == (3, 0)
        assert _drain(sink) == 3
    finally:
        engine.close()
        lsock.close()
        sink.close()


def test_counts_are_read_by_the_sweep_too():
    """Without reading counters() the shared statistics still get the drops (the sweep)."""
    lsock, sink = _pair()
    stats = memoryview(bytearray(8 * 64)).cast("Q")
    engine = _engine.Engine(lsock.fileno(), "forward", to=sink.getsockname(),
                            listen_family=socket.AF_INET, stats=stats, timeout=1.0)
    try:
        from relay.stats import INDEX
        _blast(lsock.getsockname(), N)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            engine.run(50)
            if stats[INDEX["up_datagrams"]] + stats[INDEX["drop_rcvbuf"]] == N:
                break
        assert stats[INDEX["drop_rcvbuf"]] > 0
        assert stats[INDEX["up_datagrams"]] + stats[INDEX["drop_rcvbuf"]] == N
    finally:
        engine.close()
        lsock.close()
        sink.close()
