"""The tunnel client in gost mode (CMD 0xF3, one TCP connection per flow, no flow ids).

Namespaces: `tunnel-client --gost` in cli, `tunnel-server` (which accepts 0xF3) in rtr,
echo in srv, IPv4 and IPv6. Loopback: the core against a small scripted gost-like server
that checks the handshake bytes (RFC 1929, CMD 0xF3) and the frames exactly. Every test
runs against the C core and the pure-Python fallback."""
import logging
import socket
import struct
import threading
import time

import pytest

from relay import _select

from relay import proto
from relay.stats import INDEX

_tunnel = pytest.importorskip("relay.datapath.tunnel")
pytestmark = pytest.mark.usefixtures("impl")     # every test: compiled, then pure


def core_module(impl):
    return _select.module("tunnel")


# ----------------------------------------------------------------------------- scripted server

def recv_exact(s, n):
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def gost_frame(host, port, data):
    """A frame exactly as gost writes it: RSV = len(data), FRAG 0, no flow id."""
    return struct.pack("!HBB", len(data), 0, 1) + socket.inet_aton(host) + \
        struct.pack("!H", port) + data


class GostLike:
    """A scripted gost-like server on loopback: method negotiation, RFC 1929 when it has a
    user, the request (answering REP `rep`), then gost frames echoed back with the
    destination as source (each reply followed by ``pad``). It records what every
    connection sent."""

    def __init__(self, user=None, password=None, rep=0, pad=b""):
        self.user, self.password, self.rep, self.pad = user, password, rep, pad
        self.lsock = socket.create_server(("127.0.0.1", 0))
        self.lsock.settimeout(0.2)
        self.address = self.lsock.getsockname()
        self.conns = []               # one dict per connection
        self.socks = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self):
        while not self.stop.is_set():
            try:
                c, _ = self.lsock.accept()
            except OSError:
                continue
            rec = {"frames": []}
            self.conns.append(rec)
            self.socks.append(c)
            t = threading.Thread(target=self._serve, args=(c, rec), daemon=True)
            self.threads.append(t)
            t.start()

    def _serve(self, c, rec):
        try:
            c.settimeout(5)
            head = recv_exact(c, 2)
            rec["greeting"] = head + recv_exact(c, head[1])
            method = 0x02 if self.user is not None else 0x00
            if method not in rec["greeting"][2:]:
                c.sendall(b"\x05\xff")
                return
            c.sendall(bytes((5, method)))
            if method == 0x02:
                head = recv_exact(c, 2)
                user = recv_exact(c, head[1])
                plen = recv_exact(c, 1)
                password = recv_exact(c, plen[0])
                rec["auth"] = head + user + plen + password
                if (user, password) != (self.user, self.password):
                    c.sendall(b"\x01\x01")
                    rec["refused"] = True
                    return
                c.sendall(b"\x01\x00")
            rec["request"] = recv_exact(c, 10)
            host, port = c.getsockname()
            c.sendall(bytes((5, self.rep, 0, 1)) + socket.inet_aton(host) + struct.pack("!H", port))
            if self.rep:
                return
            while not self.stop.is_set():
                head = recv_exact(c, 10)
                data = recv_exact(c, struct.unpack("!H", head[:2])[0])
                rec["frames"].append(head + data)
                reply = data + self.pad
                c.sendall(struct.pack("!H", len(reply)) + head[2:] + reply)
        except (OSError, EOFError):
            pass
        finally:
            c.close()

    def close(self):
        self.stop.set()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self.threads:
            t.join(5)
        self.lsock.close()


@pytest.fixture
def scripted():
    made = []

    def make(**kw):
        g = GostLike(**kw)
        made.append(g)
        return g
    yield make
    for g in made:
        g.close()


@pytest.fixture
def upstream(upstream_cores):
    """make(server, **kw) -> (TunnelUpstream core of this impl, list of its replies)."""
    return lambda server, **kw: upstream_cores("TunnelUpstream", server, **kw)


def drive(up, until, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError("timed out driving the upstream core")
        up.process()
        up.tick()
        up.flush()
        time.sleep(0.005)


@pytest.mark.parametrize("pad", [0, 1, 20])
def test_redir_raw_reply_larger_than_ipv4_udp_dropped(scripted, impl, pad):
    """A frame carries up to 65,527 bytes, also from an IPv4 source, where a UDP datagram
    holds at most 65,507: redir's raw replies (relay.datapath.engine, compiled only) drop
    and count such a reply (drop_too_big) before writing headers whose 16-bit lengths
    would wrap; a reply of 65,507 bytes still arrives whole."""
    if impl == "pure":
        pytest.skip("the engine runs only with the compiled cores")
    from relay.datapath.engine import Engine
    from relay.net import sockopt
    g = scripted(pad=b"r" * pad)
    lsock = sockopt.udp_listen(("127.0.0.1", 0), transparent=True, reuseport=False)
    raw4 = sockopt.raw_socket(socket.AF_INET)
    cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cli.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    cli.bind(("127.0.0.1", 0))
    cli.setblocking(False)
    core = _tunnel.TunnelUpstream(g.address, gost=True)
    engine = Engine(lsock.fileno(), "redir", raw4_fd=raw4.fileno(), core=core,
                    listen_family=socket.AF_INET, upstream_family=socket.AF_INET)
    try:
        cli.sendto(b"q" * 65507, lsock.getsockname())
        got, st = [], {}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not got and not st.get("drop_too_big"):
            engine.run(20)
            st = engine.counters()
            try:
                got.append(cli.recvfrom(70000))
            except BlockingIOError:
                pass
        assert g.conns and len(g.conns[0]["frames"]) == 1
        if pad:
            assert st["drop_too_big"] == 1 and got == []
        else:
            assert st["drop_too_big"] == 0
            assert got == [(b"q" * 65507, lsock.getsockname())]
    finally:
        engine.close()
        core.close()
        for s in (lsock, raw4, cli):
            s.close()


def test_gost_handshake_and_frames_byte_exact(scripted, upstream):
    g = scripted(user=b"gu", password=b"p@ss")
    up, got = upstream(g.address, gost=True, user="gu", password="p@ss")
    clients = [("192.0.2.%d" % i, 4000 + i) for i in (1, 2)]
    dst = ("198.51.100.7", 53)
    for i, c in enumerate(clients):
        up.send(c, dst, b"q%d" % i)
    up.send(clients[0], dst, b"")                      # cannot be framed for gost
    up.flush()
    drive(up, lambda: len(got) == 2)
    assert sorted(got) == sorted((c, dst, b"q%d" % i) for i, c in enumerate(clients))
    assert len(g.conns) == 2                           # one connection per flow
    for rec in g.conns:
        assert rec["greeting"] == b"\x05\x01\x02"      # offers username/password only
        assert rec["auth"] == b"\x01\x02gu\x04p@ss"
        assert rec["request"] == b"\x05\xf3\x00\x01" + bytes(6)   # 0.0.0.0:0 like gost
    frames = sorted(f for rec in g.conns for f in rec["frames"])
    assert frames == sorted(gost_frame(*dst, b"q%d" % i) for i in range(2))
    st = up.stats
    assert st[INDEX["drop_malformed"]] == 1 and st[INDEX["conn_open"]] == 2
    assert up.flows_open == 2 and up.connected == 2


def test_gost_refused_password(scripted, upstream):
    g = scripted(user=b"gu", password=b"right")
    up, got = upstream(g.address, gost=True, user="gu", password="wrong")
    up.send(("192.0.2.1", 4000), ("198.51.100.7", 53), b"never")
    up.flush()
    drive(up, lambda: up.stats[INDEX["conn_rejected"]] >= 2)       # and it retries
    assert all(rec.get("refused") for rec in g.conns)
    assert all(rec["auth"] == b"\x01\x02gu\x05wrong" for rec in g.conns)
    assert got == [] and up.connected == 0
    assert up.stats[INDEX["conn_open"]] == 0
    assert up.stats[INDEX["up_datagrams"]] == 1              # still queued


def test_mux_client_explains_rep7_once(scripted, upstream):
    """A gost server answers relay's multiplexed command with REP 7: say once, clearly,
    that gost:// / --gost is the way, instead of retrying silently."""
    g = scripted(rep=7)
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)
    log = logging.getLogger("test.rep7")
    log.addHandler(Keep())
    log.propagate = False
    try:
        up, _got = upstream(g.address, log=log)
        drive(up, lambda: up.stats[INDEX["conn_rejected"]] >= 3)
        assert all(rec["request"][1] == proto.CMD_UDP_TUN_MUX for rec in g.conns)
        hints = [r for r in records if "REP 7" in r.getMessage()]
        assert len(hints) == 1 and hints[0].levelno == logging.ERROR
        assert "gost://" in hints[0].getMessage() and "--gost" in hints[0].getMessage()
    finally:
        log.handlers.clear()


def test_gost_option_errors(impl):
    mod = core_module(impl)
    with pytest.raises(ValueError, match="secret does not apply to a gost server"):
        mod.TunnelUpstream(("127.0.0.1", 1), gost=True, secret="s")
    with pytest.raises(ValueError, match="connections does not apply in gost mode"):
        mod.TunnelUpstream(("127.0.0.1", 1), gost=True, connections=2)
    with pytest.raises(ValueError, match="gost mode only"):
        mod.TunnelUpstream(("127.0.0.1", 1), user="u", password="p")
    with pytest.raises(ValueError, match="both or neither"):
        mod.TunnelUpstream(("127.0.0.1", 1), gost=True, user="u")
