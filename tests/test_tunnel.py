"""End to end: UDP -> tunnel-client -> TCP -> tunnel-server -> UDP echo, and back.

Topology tests (namespaces, tests/netns.py): client sockets and tunnel-client in cli,
tunnel-server in rtr, echo server in srv. Bad-input tests talk raw TCP to a server on
loopback. Services run in threads of this process (inside their namespace) so their
counters can be read; the restart test runs the server through its command line."""
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import types

import pytest

from relay import stats as _stats
from relay import tunnelproto as proto
from relay.engine.base import WorkerContext
from tests import netns as N

pytest.importorskip("relay._tunnel")
from relay.engine import tunnel  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALLOW_DOC = ["198.51.100.0/24", "2001:db8::/32"]
SECRET = "s3cret"
SIZES = [0, 1, 2, 100, 1350, 1472, 4095, 4096, 4097, 8191, 8192, 8193, 16383, 16384,
         16385, 32768, 65000, 65506, 65507]


@pytest.fixture(params=["c", "pure"], autouse=True)
def impl(request, monkeypatch):
    """Every test runs against the C cores (relay._tunnel) and the pure-Python fallback
    (relay.tunnelproto), which the services pick by RELAY_PURE_PYTHON."""
    if request.param == "pure":
        monkeypatch.setenv("RELAY_PURE_PYTHON", "1")
    else:
        monkeypatch.delenv("RELAY_PURE_PYTHON", raising=False)
    return request.param


def cfg(mode, **kw):
    d = dict(name=mode, mode=mode, listen=None, to=None, server=None, mark=0, timeout=60.0,
             max_associations=4096, batch=32, secret=None, user=None, password=None,
             allow=(), deny=(), connections=1, insecure=False)
    d.update(kw)
    return types.SimpleNamespace(**d)


class Running:
    """A service running in a thread of this process, inside namespace ns (or here)."""

    def __init__(self, c, ns=None):
        self.region = _stats.StatsRegion(1)
        self.ctx = WorkerContext(0, self.region.slot(0), reuseport=False)
        self.ns = ns
        if ns is not None:
            with ns.enter():
                self.svc = _create(c, self.ctx)
        else:
            self.svc = _create(c, self.ctx)
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            if self.ns is not None:
                with self.ns.enter():
                    self.svc.run()
            else:
                self.svc.run()
        except BaseException as e:          # surfaced by stop()
            self.error = e

    @property
    def address(self):
        return self.svc.address

    def stats(self):
        return self.region.read(0)

    def stop(self):
        self.ctx.stop.set()
        self.thread.join(5)
        self.svc.close()
        if self.error:
            raise self.error


def _create(c, ctx):
    from relay.engine import create_service
    return create_service(c, ctx)


@pytest.fixture
def running():
    started = []

    def start(c, ns=None):
        r = Running(c, ns)
        started.append(r)
        return r
    yield start
    errors = []
    for r in reversed(started):
        try:
            r.stop()
        except BaseException as e:
            errors.append(e)
    if errors:
        raise errors[0]


def payload(size, seed=0):
    base = bytes((i * 7 + seed) & 0xFF for i in range(256))
    return (base * (size // 256 + 1))[:size]


def roundtrip(sock, addr, data, timeout=2.0, tries=3):
    sock.settimeout(timeout)
    for _ in range(tries):
        sock.sendto(data, addr)
        try:
            while True:
                got, _src = sock.recvfrom(70000)
                if got == data:
                    return got
        except socket.timeout:
            continue
    raise AssertionError(f"no echo of a {len(data)}-byte datagram")


def wait_stat(r, name, at_least=1, timeout=5.0):
    return N.wait_until(lambda: r.stats()[name] >= at_least, timeout, what=f"{name} >= {at_least}")


# ----------------------------------------------------------------------------- namespaces

def tunnel_pair(topo, running, v6, gost=False, **client_kw):
    """tunnel-server in rtr, tunnel-client in cli (gost: the client speaks gost, so the
    server has no secret, hence insecure)."""
    if v6:
        srv_listen, to, cli_listen = (N.RTR6_CLI, 9000), (N.SRV6, 7), ("::1", 5000)
    else:
        srv_listen, to, cli_listen = (N.RTR4_CLI, 9000), (N.SRV4, 7), ("127.0.0.1", 5000)
    auth = dict(insecure=True) if gost else dict(secret=SECRET)
    server = running(cfg("tunnel-server", listen=srv_listen, allow=ALLOW_DOC, **auth), topo.rtr)
    kw = dict(listen=cli_listen, server=srv_listen, to=to,
              **(dict(gost=True) if gost else dict(secret=SECRET)))
    kw.update(client_kw)
    client = running(cfg("tunnel-client", **kw), topo.cli)
    return server, client, cli_listen


@pytest.fixture
def echo_topo(topo):
    N.start_echo(topo.srv, f"{N.SRV4}:7", f"[{N.SRV6}]:7", f"{N.SRV4_B}:7")
    return topo


@pytest.mark.netns
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_every_size(echo_topo, running, v6):
    server, client, addr = tunnel_pair(echo_topo, running, v6)
    sock = echo_topo.cli.socket(socket.AF_INET6 if v6 else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    for size in SIZES:
        assert roundtrip(sock, addr, payload(size, size)) == payload(size, size)
    s, c = server.stats(), client.stats()
    assert s["conn_accepted"] == 1 and s["assoc_created"] == 1
    assert s["up_datagrams"] >= len(SIZES) and c["down_datagrams"] >= len(SIZES)
    assert s["frames_bad"] == 0 and s["drop_denied"] == 0
    sock.close()


@pytest.mark.netns
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_runs_of_datagrams_leave_the_server_intact(echo_topo, running, v6):
    """A burst of equal-size datagrams leaves the server as GSO runs (relay/_sendq.pxd);
    runs of 3000-byte datagrams exceed the 1500-byte MTU towards the echo server, so the
    kernel refuses them as GSO and they go one by one. Every datagram comes back intact
    and in order, and the counters balance."""
    server, client, addr = tunnel_pair(echo_topo, running, v6)
    sock = echo_topo.cli.socket(socket.AF_INET6 if v6 else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.settimeout(3)
    assert roundtrip(sock, addr, b"warm") == b"warm"
    sent, got = [], []
    # bursts of 8: the runs stay whole while every receive buffer on the way (the echo
    # server's, this socket's) holds a burst even of fragmented 3000-byte datagrams
    for size in (1000, 3000, 1200, 17):
        for burst in range(5):
            ps = [payload(size, burst * 8 + i) for i in range(8)]
            for p in ps:
                sock.sendto(p, addr)
            sent += ps
            try:
                for _ in ps:
                    got.append(sock.recv(70000))
            except socket.timeout:
                pass
    idx = {p: i for i, p in enumerate(sent)}
    assert [idx.get(g) for g in got] == list(range(len(sent)))
    N.wait_until(lambda: server.stats()["up_datagrams"] == len(sent) + 1, 5,
                 what="every datagram counted")
    st = server.stats()
    assert st["up_bytes"] == 4 + sum(map(len, sent))
    assert st["drop_send_error"] == st["drop_too_big"] == st["drop_buffer_full"] == 0
    sock.close()


@pytest.mark.netns
def test_coalesced_datagrams_cross_as_datagrams(echo_topo, running):
    """The tunnel client's listen socket has UDP_GRO: a burst sent as one UDP_SEGMENT
    buffer may arrive coalesced, and must still cross (and come back) as its datagrams."""
    from relay import BatchSocket
    server, client, addr = tunnel_pair(echo_topo, running, False)
    sock = echo_topo.cli.socket(socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    sock.connect(addr)
    sock.settimeout(3)
    assert roundtrip(sock, addr, b"warm") == b"warm"
    payloads = [payload(700, i) for i in range(20)] + [b"end"]
    with BatchSocket(sock.fileno(), batch=64) as b:
        assert b.send_gso(b"".join(payloads), 700) == 21
    got = [sock.recv(70000) for _ in payloads]
    assert got == payloads
    N.wait_until(lambda: client.stats()["up_datagrams"] == 22, 5, what="22 datagrams up")
    assert client.stats()["up_bytes"] == 4 + sum(map(len, payloads))
    sock.close()


@pytest.mark.netns
def test_fifty_flows_one_connection(echo_topo, running):
    server, client, addr = tunnel_pair(echo_topo, running, False)
    socks = [echo_topo.cli.socket(socket.AF_INET) for _ in range(50)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        pending = {}
        for rnd in range(3):
            for i, s in enumerate(socks):
                if i in pending and rnd and pending[i] is True:
                    continue
                s.sendto(b"flow %d" % i, addr)
            deadline = time.monotonic() + 3
            for i, s in enumerate(socks):
                if pending.get(i) is True:
                    continue
                s.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    got = s.recv(100)
                except socket.timeout:
                    continue
                assert got == b"flow %d" % i      # each flow gets its own reply, never another's
                pending[i] = True
            if len([v for v in pending.values() if v is True]) == 50:
                break
        assert len([v for v in pending.values() if v is True]) == 50
        st = server.stats()
        assert st["conn_accepted"] == 1
        assert st["assoc_created"] == 50 and client.stats()["assoc_created"] == 50
    finally:
        for s in socks:
            s.close()


@pytest.mark.netns
def test_connection_pool(echo_topo, running):
    server, client, addr = tunnel_pair(echo_topo, running, False, connections=4)
    socks = [echo_topo.cli.socket(socket.AF_INET) for _ in range(8)]
    try:
        for i, s in enumerate(socks):
            roundtrip(s, addr, b"pool %d" % i)
        assert server.stats()["conn_accepted"] == 4
        assert client.stats()["conn_open"] == 4
    finally:
        for s in socks:
            s.close()


@pytest.mark.netns
def test_wrong_secret_refused(echo_topo, running):
    server, client, addr = tunnel_pair(echo_topo, running, False, secret="not-it")
    sock = echo_topo.cli.socket(socket.AF_INET)
    sock.sendto(b"let me in", addr)
    wait_stat(server, "conn_rejected")
    sock.settimeout(0.5)
    with pytest.raises(socket.timeout):
        sock.recv(100)
    assert server.stats()["up_datagrams"] == 0
    assert client.stats()["conn_open"] == 0
    sock.close()


@pytest.mark.netns
def test_acl_default_and_explicit(echo_topo, running):
    # default: documentation ranges are denied
    server = running(cfg("tunnel-server", listen=(N.RTR4_CLI, 9000), secret=SECRET), echo_topo.rtr)
    client = running(cfg("tunnel-client", listen=("127.0.0.1", 5000), server=(N.RTR4_CLI, 9000),
                         to=(N.SRV4, 7), secret=SECRET), echo_topo.cli)
    sock = echo_topo.cli.socket(socket.AF_INET)
    sock.sendto(b"denied", ("127.0.0.1", 5000))
    wait_stat(server, "drop_denied")
    assert server.stats()["up_datagrams"] == 0
    # allow the /24 but deny one host in it
    server2 = running(cfg("tunnel-server", listen=(N.RTR4_CLI, 9001), secret=SECRET,
                          allow=ALLOW_DOC, deny=[f"{N.SRV4_B}/32"]), echo_topo.rtr)
    ok = running(cfg("tunnel-client", listen=("127.0.0.1", 5001), server=(N.RTR4_CLI, 9001),
                     to=(N.SRV4, 7), secret=SECRET), echo_topo.cli)
    no = running(cfg("tunnel-client", listen=("127.0.0.1", 5002), server=(N.RTR4_CLI, 9001),
                     to=(N.SRV4_B, 7), secret=SECRET), echo_topo.cli)
    roundtrip(sock, ("127.0.0.1", 5001), b"allowed")
    sock.sendto(b"denied host", ("127.0.0.1", 5002))
    wait_stat(server2, "drop_denied")
    assert server2.stats()["up_datagrams"] == 1
    sock.close()


def restart_mid_stream(echo_topo, running, server_args, **client_kw):
    """Send a numbered stream through tunnel-client while the tunnel-server process dies and
    comes back: traffic must resume. Returns the client's counters."""
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "relay.engine.tunnel", "tunnel-server",
           "--listen", f"{N.RTR4_CLI}:9000", "--allow", ALLOW_DOC[0], "--log-level", "warning",
           *server_args]
    proc = echo_topo.rtr.popen(cmd, env=env)
    client = running(cfg("tunnel-client", listen=("127.0.0.1", 5000), server=(N.RTR4_CLI, 9000),
                         to=(N.SRV4, 7), **client_kw), echo_topo.cli)
    sock = echo_topo.cli.socket(socket.AF_INET)
    roundtrip(sock, ("127.0.0.1", 5000), b"before", timeout=1, tries=10)
    got = set()
    stop = threading.Event()

    def receiver():
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                got.add(int(sock.recv(100).split()[1]))
            except (socket.timeout, ValueError, IndexError):
                pass

    t = threading.Thread(target=receiver, daemon=True)
    t.start()
    try:
        seq = 0
        t0 = time.monotonic()
        restarted_at = None
        while time.monotonic() - t0 < 8:
            sock.sendto(b"seq %d" % seq, ("127.0.0.1", 5000))
            seq += 1
            el = time.monotonic() - t0
            if proc is not None and el > 0.5 and restarted_at is None:
                proc.kill()
                proc.wait(5)
                proc = None
            if proc is None and el > 1.0 and restarted_at is None:
                proc = echo_topo.rtr.popen(cmd, env=env)
                restarted_at = seq
            if restarted_at is not None and any(s > restarted_at for s in got):
                break
            time.sleep(0.01)
        assert restarted_at is not None
        assert any(s > restarted_at for s in got), "no traffic after the restart"
        assert any(s < restarted_at for s in got)
        return client.stats()
    finally:
        stop.set()
        t.join(2)
        sock.close()


@pytest.mark.netns
def test_server_restart_mid_stream(echo_topo, running):
    """The server process dies and comes back: the client reconnects, traffic resumes."""
    st = restart_mid_stream(echo_topo, running, ["--secret", SECRET], secret=SECRET)
    assert st["conn_reconnects"] >= 1


# ----------------------------------------------------------------------------- loopback, raw TCP

class Echo:
    """UDP echo on loopback (127.0.0.1 or ::1) in a thread (bad-input tests run on loopback)."""

    def __init__(self, host="127.0.0.1"):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                  socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.addr = self.sock.getsockname()[:2]
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop.is_set():
            try:
                d, a = self.sock.recvfrom(70000)
                self.sock.sendto(d, a)
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.t.join(2)
        self.sock.close()


@pytest.fixture
def echo():
    e = Echo()
    yield e
    e.close()


@pytest.fixture
def lo_server(running):
    return running(cfg("tunnel-server", listen=("127.0.0.1", 0), allow=["127.0.0.0/8"],
                       stall_timeout=1.0))


def raw_client(server, cmd=proto.CMD_UDP_TUN_MUX, rcvbuf=None):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(3)
    s.connect(server.address)
    hs = proto.ClientHandshake(cmd=cmd)
    out = hs.start()
    while not hs.done:
        s.sendall(out)
        out = hs.feed(s.recv(4096))
    return s, hs.leftover


def read_frames(s, n, mux=True, timeout=3.0):
    buf = b""
    frames = []
    s.settimeout(timeout)
    while len(frames) < n:
        chunk = s.recv(70000)
        if not chunk:
            break
        buf += chunk
        got, used = proto.parse_frames(buf, mux=mux)
        frames += got
        buf = buf[used:]
    return frames


def closed_by_peer(s, timeout=3.0):
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_mux_raw_client_and_zero_length(lo_server, echo):
    s, _ = raw_client(lo_server)
    s.sendall(proto.encode_frame(*echo.addr, b"", flow=5) +
              proto.encode_frame(*echo.addr, b"one", flow=5) +
              proto.encode_frame(*echo.addr, b"two", flow=6))
    frames = read_frames(s, 3)
    assert sorted((f.flow, f.data) for f in frames) == [(5, b""), (5, b"one"), (6, b"two")]
    assert [(f.host, f.port) for f in frames] == [echo.addr] * 3
    s.close()


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
        while time.monotonic() - t0 < 10 and sent < 800:
            s.sendall(big)
            sent += 1
            if lo_server.stats()["drop_buffer_full"] and sent % 20 == 0:
                break
    except (socket.timeout, OSError):
        pass
    wait_stat(lo_server, "drop_buffer_full")
    wait_stat(lo_server, "conn_rejected", timeout=6)
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


def test_queue_while_server_down(running, echo):
    """Datagrams sent before the server exists wait in the bounded queue; the excess is
    counted as queue_drops."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    client = running(cfg("tunnel-client", listen=("127.0.0.1", 0), server=("127.0.0.1", port),
                         to=echo.addr, queue_limit=200000))
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
    r = subprocess.run([sys.executable, "-m", "relay.engine.tunnel", "tunnel-server",
                        "--listen", "192.0.2.1:9000"], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode == 2 and "secret" in r.stderr
    r = subprocess.run([sys.executable, "-m", "relay.engine.tunnel", "tunnel-client", "--help"],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0 and "--connections" in r.stdout and "default: 1" in r.stdout
    with pytest.raises(ValueError, match="secret"):
        tunnel.check_exposure(cfg("tunnel-server", listen=("192.0.2.1", 1)))
    tunnel.check_exposure(cfg("tunnel-server", listen=("192.0.2.1", 1), insecure=True))
    tunnel.check_exposure(cfg("tunnel-server", listen=("::1", 1)))
