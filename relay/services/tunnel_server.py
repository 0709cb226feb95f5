"""`relay tunnel-server`: UDP over TCP, the server end (docs/tunnel.md).

Accepts TCP connections, runs the SOCKS5-style handshake in Python (relay.proto.handshake,
once per connection) and hands each connection to the tunnel core (relay.datapath.tunnel's
TunnelServer, or its pure twin: relay._select chooses), whose loop moves frames and
datagrams.
"""
import logging
import os
import socket
import time

from relay import _select
from relay import proto
from relay import stats as _stats
from relay.net import sockopt
from relay.loglimit import LogLimiter
from relay.services.admission import Acceptor, HandshakePool
from relay.services.base import Service
from relay.services.common import HOSTS_TOKEN, DestinationAcl, check_exposure

log = logging.getLogger("relay.tunnel")

STALL_TIMEOUT = 5.0          # a client that reads none of its waiting replies this long is dropped
_I = _stats.INDEX


class _Pending:
    __slots__ = ("sock", "hs", "peer")

    def __init__(self, sock, hs, peer):
        self.sock, self.hs, self.peer = sock, hs, peer


class TunnelServerService(Service):
    """One tunnel-server listener in one worker."""

    def __init__(self, cfg, ctx):
        check_exposure(cfg, "secret")
        self.cfg, self.ctx = cfg, ctx
        self.secret = cfg.secret
        self.user, self.password = cfg.user, cfg.password
        self.st = ctx.stats
        self.dacl = DestinationAcl(cfg, log)
        self.lsock = sockopt.tcp_listen(cfg.listen, reuseport=ctx.reuseport, tune=True)
        self.core = _select.module("tunnel").TunnelServer(
            self.dacl.acl, ctx.stats, max_flows=min(cfg.max_associations, 1 << 20),
            timeout=cfg.timeout, batch=min(cfg.batch, 256), mark=sockopt.usable_mark(cfg.mark),
            stall_timeout=STALL_TIMEOUT, log=log, port_timeouts=cfg.port_timeouts(),
            outbound=cfg.outbound() or None)
        self.dacl.attach(self.core)
        self.acceptor = Acceptor(self.lsock, lambda fd: self.core.watch(fd, 0), self.core.unwatch,
                                 ctx.stats, _I, log)
        self.say = LogLimiter(log)
        self.pending = {}          # token -> _Pending; their slots and deadlines in self.handshakes
        self.handshakes = HandshakePool()
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
                    elif token == HOSTS_TOKEN:
                        self.dacl.refresh()
                    else:
                        self._handshake(token)
                now = time.monotonic()
                self.core.tick(now)
                self.acceptor.tick(now)
                self.dacl.tick(now)
                for token in self.handshakes.expired(now):
                    self._reject(token, "handshake timed out")
            except Exception:            # never let one bad event stop the listener
                log.exception("tunnel-server %s: unexpected error; continuing", self.address)
                time.sleep(0.01)

    def _accept(self):
        for sock, peer in self.acceptor.accept():
            if self.handshakes.source_full(peer[0]):
                sock.close()
                self._count("conn_rejected")
                self.say(logging.WARNING, "tunnel client %s refused: %d connections of its "
                         "address in their handshake", peer[0], self.handshakes.per_source)
                continue
            self._count("conn_open")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._token = self._token % 0x7FFFFFFF + 1
            hs = proto.ServerHandshake(secret=self.secret, user=self.user,
                                       password=self.password)
            self.pending[self._token] = _Pending(sock, hs, peer)
            self.core.watch(sock.fileno(), self._token)
            victim = self.handshakes.add(self._token, peer[0], time.monotonic())
            if victim is not None:
                self._reject(victim, f"{self.handshakes.cap} connections in their handshake; the "
                                     f"oldest made room")

    def _reject(self, token, why, reply=b""):
        p = self.pending.pop(token)
        self.handshakes.remove(token)
        self.core.unwatch(p.sock.fileno())
        if reply:
            try:
                p.sock.send(reply)
            except OSError:
                pass
        p.sock.close()
        self._count("conn_open", -1)
        self._count("conn_rejected")
        self.say(logging.WARNING, "tunnel client %s refused: %s", p.peer[0], why)

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
        self.handshakes.heard(token)
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
        self.handshakes.remove(token)
        self.core.unwatch(p.sock.fileno())
        sockopt.tcp_keepalive(p.sock)
        fd = p.sock.detach()
        slot = self.core.add_conn(fd, cmd == proto.CMD_UDP_TUN_MUX, p.hs.leftover)
        if slot < 0:
            os.close(fd)
            self._count("conn_open", -1)
            self._count("conn_rejected")
            self.say(logging.WARNING, "tunnel client %s refused: connection table full", p.peer[0])

    def close(self):
        for token in list(self.pending):
            p = self.pending.pop(token)
            self.handshakes.remove(token)
            p.sock.close()
            self._count("conn_open", -1)
        self.dacl.close()
        self.core.close_all()
        self.core.close()
        self.lsock.close()


def create(cfg, ctx):
    return TunnelServerService(cfg, ctx)
