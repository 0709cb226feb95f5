"""End to end: UDP -> tunnel-client -> TCP -> tunnel-server -> UDP echo, and back.

Topology tests (namespaces, tests/namespaces.py): client sockets and tunnel-client in cli,
tunnel-server in rtr, echo server in srv. Bad-input tests talk raw TCP to a server on
loopback. Services run in threads of this process (inside their namespace) so their
counters can be read; the restart test runs the server through its command line."""
import os
import socket
import struct
import subprocess
import sys
import time

import pytest

from relay import proto
from tests.support import (Echo, REPO, cfg, closed_by_peer, raw_client, read_frames, roundtrip,
                           wait_stat)

pytest.importorskip("relay.datapath.tunnel")
pytestmark = pytest.mark.usefixtures("impl")     # every test: compiled, then pure
from relay.services import common, tunnel_client, tunnel_server  # noqa: E402


# ----------------------------------------------------------------------------- loopback, raw TCP


@pytest.fixture
def lo_server(running, monkeypatch):
    monkeypatch.setattr(tunnel_server, "STALL_TIMEOUT", 1.0)
    return running(cfg("tunnel-server", listen=("127.0.0.1", 0), allow=["127.0.0.0/8"]))


def test_mux_raw_client_and_zero_length(lo_server, echo):
    s, _ = raw_client(lo_server)
    s.sendall(proto.encode_frame(*echo.addr, b"", flow=5) +
              proto.encode_frame(*echo.addr, b"one", flow=5) +
              proto.encode_frame(*echo.addr, b"two", flow=6))
    frames = read_frames(s, 3)
    assert sorted((f.flow, f.data) for f in frames) == [(5, b""), (5, b"one"), (6, b"two")]
    assert [(f.host, f.port) for f in frames] == [echo.addr] * 3
    s.close()


def pipelined_client(server, family, data):
    """Greeting, request and ``data`` in one write, as a client that does not wait."""
    s = socket.socket(family, socket.SOCK_STREAM)
    s.settimeout(3)
    s.connect(server.address)
    s.sendall(proto.greeting([proto.METHOD_NOAUTH]) + proto.request(proto.CMD_UDP_TUN_MUX) + data)
    hs = proto.ClientHandshake()
    hs.start()
    while not hs.done:
        chunk = s.recv(4096)
        assert chunk, "the server closed the connection during the handshake"
        hs.feed(chunk)
    return s, hs.leftover


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_pipelined_frames_after_the_request(running, v6):
    """A client that writes greeting + request + frames at once: the frames (a 1200-byte
    one, then a maximal one for the family) are delivered and answered."""
    host = "::1" if v6 else "127.0.0.1"
    server = running(cfg("tunnel-server", listen=(host, 0), allow=[host + ("/128" if v6 else "/32")]))
    echo = Echo(host)
    try:
        biggest = 65527 if v6 else 65507
        data = (proto.encode_frame(*echo.addr, b"a" * 1200, flow=1) +
                proto.encode_frame(*echo.addr, b"b" * biggest, flow=2))
        s, left = pipelined_client(server, socket.AF_INET6 if v6 else socket.AF_INET, data)
        frames = read_frames(s, 2, buf=left)
        assert sorted((f.flow, f.data) for f in frames) == [(1, b"a" * 1200), (2, b"b" * biggest)]
        s.close()
    finally:
        echo.close()


def test_gost_plain_connection(lo_server, echo):
    """CMD 0xF3 as gost sends it: one flow, no FLOW field; zero-length replies cannot be
    framed for a gost peer and are dropped and counted."""
    s, _ = raw_client(lo_server, cmd=proto.CMD_UDP_TUN)
    s.sendall(proto.encode_frame(*echo.addr, b"") + proto.encode_frame(*echo.addr, b"gost"))
    frames = read_frames(s, 1, mux=False)
    assert [(f.flow, f.data) for f in frames] == [(None, b"gost")]
    wait_stat(lo_server, "drop_malformed")
    assert lo_server.stats()["assoc_created"] == 1
    s.close()


BAD_FRAMES = {
    "too-big": struct.pack("!HBB", 65535, 0, 1) + bytes(10),
    "bad-atyp": struct.pack("!HBB", 1, 0, 9) + bytes(10),
    "empty-domain": struct.pack("!HBBB", 1, 0, 3, 0) + bytes(10),
    "fragmented": struct.pack("!HBB", 1, 2, 1) + bytes(10),
}


@pytest.mark.parametrize("kind", sorted(BAD_FRAMES) + ["truncated", "wrong-handshake"])
def test_bad_input_closes_and_counts(lo_server, echo, kind):
    if kind == "wrong-handshake":
        s = socket.create_connection(lo_server.address, timeout=3)
        s.sendall(b"\x04\x01\x00\x50" + bytes(8))          # SOCKS4
        assert closed_by_peer(s)
        wait_stat(lo_server, "conn_rejected")
    else:
        s, _ = raw_client(lo_server)
        if kind == "truncated":
            s.sendall(proto.encode_frame(*echo.addr, b"x" * 100, flow=1)[:-10])
            s.shutdown(socket.SHUT_WR)
        else:
            s.sendall(BAD_FRAMES[kind])
        assert closed_by_peer(s)
        wait_stat(lo_server, "frames_bad")
    s.close()
    # the server still serves
    ok, _ = raw_client(lo_server)
    ok.sendall(proto.encode_frame(*echo.addr, b"still here", flow=1))
    assert [f.data for f in read_frames(ok, 1)] == [b"still here"]
    ok.close()


def test_client_that_never_reads(lo_server, echo):
    s, _ = raw_client(lo_server, rcvbuf=4096)
    big = proto.encode_frame(*echo.addr, b"r" * 60000, flow=1)
    # A long timeout: the loop ends when the drops are seen or the server closes the stalled
    # connection; a send that a busy machine holds up for a moment must not end it earlier
    # (a timed-out sendall may have sent part of a frame, so the loop cannot go on after one).
    s.settimeout(5.0)
    t0 = time.monotonic()
    sent = 0
    try:
        while time.monotonic() - t0 < 20 and sent < 800:
            s.sendall(big)
            sent += 1
            if lo_server.stats()["drop_buffer_full"] and sent % 20 == 0:
                break
    except (socket.timeout, OSError):
        pass
    # bounds for a loaded machine (the stall timeout is 1 s; these only end a hung test)
    wait_stat(lo_server, "drop_buffer_full", timeout=20)
    wait_stat(lo_server, "conn_rejected", timeout=20)
    s.close()
    assert lo_server.svc.core.connections == 0
    ok, _ = raw_client(lo_server)
    ok.sendall(proto.encode_frame(*echo.addr, b"alive", flow=1))
    assert [f.data for f in read_frames(ok, 1)] == [b"alive"]
    ok.close()


def test_flows_idle_out(running, echo):
    server = running(cfg("tunnel-server", listen=("127.0.0.1", 0), allow=["127.0.0.0/8"],
                         timeout=0.3))
    client = running(cfg("tunnel-client", listen=("127.0.0.1", 0), server=server.address,
                         to=echo.addr, timeout=0.3))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    roundtrip(sock, client.address, b"soon idle")
    wait_stat(server, "assoc_expired")
    wait_stat(client, "assoc_expired")
    assert server.stats()["assoc_open"] == 0 and client.stats()["assoc_open"] == 0
    roundtrip(sock, client.address, b"new flow")
    assert server.stats()["assoc_created"] == 2
    sock.close()


def test_queue_while_server_down(running, echo, monkeypatch):
    """Datagrams sent before the server exists wait in the bounded queue; the excess is
    counted as queue_drops."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    monkeypatch.setattr(tunnel_client, "QUEUE_LIMIT", 200000)
    client = running(cfg("tunnel-client", listen=("127.0.0.1", 0), server=("127.0.0.1", port),
                         to=echo.addr))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.sendto(b"queued", client.address)
    for _ in range(10):
        sock.sendto(b"q" * 60000, client.address)
    wait_stat(client, "queue_drops")
    server = running(cfg("tunnel-server", listen=("127.0.0.1", port), allow=["127.0.0.0/8"]))
    sock.settimeout(5)
    assert sock.recv(100) == b"queued"
    assert client.stats()["conn_reconnects"] == 0       # first connection, not a reconnect
    sock.close()


def test_cli_refuses_open_relay_and_shows_defaults():
    env = dict(os.environ, PYTHONPATH=REPO)
    r = subprocess.run([sys.executable, "-m", "relay", "tunnel-server",
                        "--listen", "192.0.2.1:9000"], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode == 2 and "secret" in r.stderr
    r = subprocess.run([sys.executable, "-m", "relay", "tunnel-client", "--help"],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0 and "--connections" in r.stdout and "default: 1" in r.stdout
    with pytest.raises(ValueError, match="secret"):
        common.check_exposure(cfg("tunnel-server", listen=("192.0.2.1", 1)))
    common.check_exposure(cfg("tunnel-server", listen=("192.0.2.1", 1), insecure=True))
    common.check_exposure(cfg("tunnel-server", listen=("::1", 1)))
