"""The supervisor's /metrics server: answers Prometheus scrapes, and stays one bounded
thread whatever a peer does (half-sent requests, floods of connections, peers that vanish)."""
import logging
import socket
import threading

import pytest

from relay import metrics
from tests.namespaces import wait_until


@pytest.fixture
def server():
    s = metrics.MetricsServer(("127.0.0.1", 0), lambda: "relay_up_datagrams_total 7\n")
    yield s
    s.shutdown()


def get(addr, request=b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", source="127.0.0.1"):
    c = socket.socket()
    c.settimeout(5)
    c.bind((source, 0))
    c.connect(addr)
    c.sendall(request)
    data = b""
    while True:
        d = c.recv(65536)
        if not d:
            break
        data += d
    c.close()
    return data


def test_scrape_and_errors(server):
    r = get(server.address)
    assert r.startswith(b"HTTP/1.1 200 OK\r\n") and r.endswith(b"\r\n\r\nrelay_up_datagrams_total 7\n")
    assert b"Content-Type: text/plain; version=0.0.4" in r
    assert get(server.address, b"GET / HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")
    head = get(server.address, b"HEAD /metrics HTTP/1.1\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and head.endswith(b"\r\n\r\n")
    assert get(server.address, b"GET /nope HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404")
    assert get(server.address, b"POST /metrics HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 405")
    assert get(server.address, b"\x16\x03\x01 garbage\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert get(server.address, b"GET /" + b"a" * 9000).startswith(b"HTTP/1.1 431")
    assert server.connections == 0


def test_half_sent_requests_from_one_host_neither_pile_up_nor_keep_others_out(server, caplog):
    threads = threading.active_count()
    held = []
    with caplog.at_level(logging.DEBUG, "relay"):
        for _ in range(500):
            c = socket.socket()
            c.bind(("127.0.0.2", 0))
            c.connect(server.address)
            c.sendall(b"GET /metr")           # and never the rest
            held.append(c)
        # a scrape from elsewhere is answered at once, during the attack
        assert get(server.address).startswith(b"HTTP/1.1 200")
        wait_until(lambda: server.connections <= metrics.PER_SOURCE, 5, what="per-source cap")
        assert threading.active_count() == threads          # one thread, always
        for c in held:                                      # vanishing peers: no traceback
            c.close()
        wait_until(lambda: server.connections == 0, 10, what="connections closed")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


def test_many_sources_are_capped_in_total(server):
    held = []
    for i in range(metrics.MAX_CONNECTIONS + 40):
        c = socket.socket()
        c.bind((f"127.0.{1 + i // 200}.{2 + i % 200}", 0))
        c.connect(server.address)
        c.sendall(b"G")
        held.append(c)
    assert get(server.address).startswith(b"HTTP/1.1 200")
    wait_until(lambda: server.connections <= metrics.MAX_CONNECTIONS, 5, what="total cap")
    for c in held:
        c.close()


def test_a_connection_that_never_finishes_is_closed_at_its_deadline(monkeypatch):
    monkeypatch.setattr(metrics, "DEADLINE", 0.3)
    s = metrics.MetricsServer(("127.0.0.1", 0), lambda: "")
    try:
        c = socket.create_connection(s.address, timeout=5)
        c.sendall(b"GET /metrics HTTP/1.1\r\n")           # no blank line, ever
        assert c.recv(100) == b""                          # closed by the server
        c.close()
        assert s.connections == 0
    finally:
        s.shutdown()
