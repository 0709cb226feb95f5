"""`relay tunnel-server` and `relay tunnel-client`: UDP over TCP (docs/tunnel.md).

The server accepts TCP connections, runs the SOCKS5-style handshake in Python (once per
connection) and hands the connection to ``relay._tunnel.TunnelServer``, whose C loop
moves frames and datagrams (``relay.tunnelproto`` holds a pure-Python fallback of every
core, used when the extension is missing or RELAY_PURE_PYTHON=1). The client is ``relay._tunnel.TunnelUpstream`` (the same core
the engine uses for ``--upstream tunnel://`` and ``gost://``) driven by the engine's forward
loop (``relay._engine.Engine`` with the core as its upstream; the pure fallback puts
``relay.tunnelproto.UdpFrontend`` in front instead); with ``--gost`` it speaks to a gost
server (CMD 0xF3, one TCP connection per flow).
"""
import ipaddress
import logging
import os
import socket
import time

from relay import sockopt
from relay import stats as _stats
from relay import tunnelproto as proto
from relay.engine.base import Service

log = logging.getLogger("relay.tunnel")

HANDSHAKE_TIMEOUT = 10.0
STALL_TIMEOUT = 5.0          # a client that reads none of its waiting replies this long is dropped
QUEUE_LIMIT = None           # bytes a tunnel-client queues while (re)connecting; None: the core's
MAX_PENDING = 256            # connections still in their handshake
ACCEPT_BURST = 64
_I = _stats.INDEX


def _core():
    """relay._tunnel, or the pure-Python fallback in relay.tunnelproto when the extension
    is missing or RELAY_PURE_PYTHON=1 (same classes, same counters, much slower)."""
    from relay import _select
    if not _select.pure_forced():
        try:
            from relay import _tunnel
            return _tunnel
        except ImportError:
            log.warning("relay._tunnel is not built: the tunnel runs in pure Python (slow)")
    return proto


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_exposure(cfg, what=None):
    """Refuse an open relay: a non-loopback listen address needs credentials (a secret
    for tunnel-server, user/password for socks5) unless insecure is set (the
    configuration parser checks this too)."""
    if what is None:
        what = "user" if cfg.mode == "socks5" else "secret"
    host = cfg.listen[0]
    if is_loopback(host) or cfg.insecure:
        return
    if what == "secret" and not (cfg.secret or cfg.user):
        raise ValueError(f"refusing to listen on {host} without --secret or --username/--password "
                         f"(an open relay); pass --insecure to do it anyway")
    if what == "user" and not cfg.user:
        raise ValueError(f"refusing to listen on {host} without --username/--password (an open "
                         f"relay); pass --insecure to do it anyway")


def usable_mark(mark):
    """The SO_MARK to use, or None when it is 0 or cannot be set here (not root)."""
    if not mark:
        return None
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, sockopt.SO_MARK, mark)
        return mark
    except OSError as e:
        log.warning("SO_MARK %d unavailable (%s); sockets stay unmarked", mark, e)
        return None
    finally:
        probe.close()


def tcp_listen(addr, reuseport=False, backlog=512):
    host, port = addr[0], addr[1]
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if fam == socket.AF_INET6 and host not in ("::",):
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def udp_listen(addr, reuseport=False):
    host, port = addr[0], addr[1]
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if fam == socket.AF_INET6 and host not in ("::",):
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
            except OSError:
                pass
        if sockopt.is_wildcard(host):
            sockopt.set_pktinfo(s)      # replies leave from the address each client asked
        s.bind((host, port))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


class _Pending:
    __slots__ = ("sock", "hs", "deadline", "peer")

    def __init__(self, sock, hs, deadline, peer):
        self.sock, self.hs, self.deadline, self.peer = sock, hs, deadline, peer


class TunnelServerService(Service):
    """One tunnel-server listener in one worker."""

    def __init__(self, cfg, ctx):
        check_exposure(cfg, "secret")
        self.cfg, self.ctx = cfg, ctx
        self.secret = cfg.secret
        self.user, self.password = cfg.user, cfg.password
        self.st = ctx.stats
        acl = proto.AccessList(allow=cfg.allow, deny=cfg.deny)
        self.lsock = tcp_listen(cfg.listen, reuseport=ctx.reuseport)
        self.core = _core().TunnelServer(
            acl.table(), ctx.stats, max_flows=min(cfg.max_associations, 1 << 20),
            timeout=cfg.timeout, batch=min(cfg.batch, 256), mark=usable_mark(cfg.mark),
            stall_timeout=STALL_TIMEOUT, log=log)
        self.core.watch(self.lsock.fileno(), 0)
        self.pending = {}
        self._token = 0
        self.address = self.lsock.getsockname()

    def _count(self, name, n=1):
        self.st[_I[name]] += n

    def run(self):
        stop = self.ctx.stop
        while not stop.is_set():
            try:
                for token, _events in self.core.poll(100):
                    if token == 0:
                        self._accept()
                    else:
                        self._handshake(token)
                now = time.monotonic()
                self.core.tick(now)
                for token in [t for t, p in self.pending.items() if now > p.deadline]:
                    self._reject(token, "handshake timed out")
            except Exception:            # never let one bad event stop the listener
                log.exception("tunnel-server %s: unexpected error; continuing", self.address)
                time.sleep(0.01)

    def _accept(self):
        for _ in range(ACCEPT_BURST):
            try:
                sock, peer = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:        # EMFILE and friends: try again on the next round
                log.warning("accept: %s", e)
                return
            self._count("conn_accepted")
            self._count("conn_open")
            if len(self.pending) >= MAX_PENDING:
                sock.close()
                self._count("conn_open", -1)
                self._count("conn_rejected")
                log.warning("too many connections in their handshake; refused %s", peer[0])
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._token = self._token % 0x7FFFFFFF + 1
            hs = proto.ServerHandshake(secret=self.secret, user=self.user,
                                       password=self.password)
            self.pending[self._token] = _Pending(sock, hs, time.monotonic() + HANDSHAKE_TIMEOUT,
                                                 peer)
            self.core.watch(sock.fileno(), self._token)

    def _reject(self, token, why, reply=b""):
        p = self.pending.pop(token)
        self.core.unwatch(p.sock.fileno())
        if reply:
            try:
                p.sock.send(reply)
            except OSError:
                pass
        p.sock.close()
        self._count("conn_open", -1)
        self._count("conn_rejected")
        log.warning("tunnel client %s refused: %s", p.peer[0], why)

    def _handshake(self, token):
        p = self.pending.get(token)
        if p is None:
            return
        try:
            data = p.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self._reject(token, str(e))
        if not data:
            return self._reject(token, "closed during the handshake")
        try:
            out = p.hs.feed(data)
        except proto.HandshakeError as e:
            return self._reject(token, f"{e.reason}: {e}", e.reply)
        try:
            if out:
                p.sock.send(out)
            if not p.hs.done:
                return
            cmd = p.hs.request[0]
            host, port = p.sock.getsockname()[:2]
            p.sock.send(p.hs.reply(proto.REP_SUCCEEDED, host, port))
        except OSError as e:
            return self._reject(token, str(e))
        del self.pending[token]
        self.core.unwatch(p.sock.fileno())
        fd = p.sock.detach()
        slot = self.core.add_conn(fd, cmd == proto.CMD_UDP_TUN_MUX, p.hs.leftover)
        if slot < 0:
            os.close(fd)
            self._count("conn_open", -1)
            self._count("conn_rejected")
            log.warning("tunnel client %s refused: connection table full", p.peer[0])

    def close(self):
        for token in list(self.pending):
            p = self.pending.pop(token)
            p.sock.close()
            self._count("conn_open", -1)
        self.core.close_all()
        self.core.close()
        self.lsock.close()


class TunnelClientService(Service):
    """One tunnel-client listener: UDP in, frames over TCP to the tunnel server (a relay
    tunnel-server, multiplexed; or a gost server with gost set, one connection per flow)."""

    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        t = _core()
        timeout = cfg.timeout
        max_flows = min(cfg.max_associations, 65536)
        self.upstream = t.TunnelUpstream(
            cfg.server, secret=cfg.secret, connections=cfg.connections,
            mark=usable_mark(cfg.mark), stats=ctx.stats, timeout=timeout, max_flows=max_flows,
            queue_limit=QUEUE_LIMIT, log=log, gost=cfg.gost, user=cfg.user,
            password=cfg.password)
        self.usock = udp_listen(cfg.listen, reuseport=ctx.reuseport)
        self.address = self.usock.getsockname()
        self.engine = self.frontend = None
        batch = min(cfg.batch, 256)
        if t is not proto:
            # The engine's forward loop with the tunnel as its upstream core: recvmmsg
            # batches, UDP_GRO on the listen socket (coalesced receives are handed to the
            # core as the datagrams they were), replies sendmmsg'd from the listen socket
            # (on a wildcard address, each from the address its client sent to).
            from relay._engine import Engine
            self.engine = Engine(self.usock.fileno(), "forward", to=tuple(cfg.to),
                                 batch=batch, stats=ctx.stats, core=self.upstream, gro=True,
                                 listen_family=self.usock.family, timeout=timeout,
                                 max_associations=max_flows)
        else:
            self.frontend = t.UdpFrontend(self.usock.fileno(), cfg.to, self.upstream,
                                          batch=batch, log=log, max_flows=max_flows,
                                          timeout=timeout)

    def run(self):
        stop = self.ctx.stop
        while not stop.is_set():
            try:
                if self.engine is not None:
                    self.engine.run(50)
                else:
                    self.frontend.poll(50)
                    self.frontend.tick(time.monotonic())
            except Exception:            # never let one bad event stop the listener
                log.exception("tunnel-client %s: unexpected error; continuing", self.address)
                time.sleep(0.01)

    def close(self):
        if self.engine is not None:
            self.engine.close()
        if self.frontend is not None:
            self.frontend.close()
        self.upstream.close()
        self.usock.close()


def create(cfg, ctx):
    if cfg.mode == "tunnel-server":
        return TunnelServerService(cfg, ctx)
    if cfg.mode == "tunnel-client":
        return TunnelClientService(cfg, ctx)
    raise ValueError(f"relay.engine.tunnel does not run mode {cfg.mode!r}")
