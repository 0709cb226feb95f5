"""`relay socks5`: a SOCKS5 server (RFC 1928, RFC 1929) with UDP ASSOCIATE and CONNECT.

Handshakes, CONNECT relaying (plain TCP, bounded buffers) and association setup run in
Python; the datagrams of every association are relayed by ``relay.datapath.tunnel.Socks5Relay``
in C (recvmmsg, header strip/prepend, access list, sendmmsg); destinations given as host
names are resolved off the data path (relay.resolver), CONNECT names too: by a pool of
resolver threads of their own (RESOLVE_* below), so a name whose DNS server never answers
holds up nobody but its own client. An association ends when its TCP control connection
closes, or after --timeout without a datagram either way (its control connection is closed
then). Fragments (FRAG != 0) are dropped and counted (frames_bad). An association announced
with port 0 belongs to the first address and port its host sends from (--strict-udp refuses
such requests instead).
"""
import errno
import ipaddress
import logging
import select
import socket
import time

from relay import stats as _stats
from relay import _select
from relay import proto
from relay.loglimit import LogLimiter
from relay.resolver import DNS_THREADS, ResolverPool
from relay.services.admission import Acceptor, HandshakePool, source_key
from relay.services.base import Service
from relay.net import sockopt
from relay.services.common import HOSTS_TOKEN, DestinationAcl, check_exposure

log = logging.getLogger("relay.socks5")
_I = _stats.INDEX

CONNECT_TIMEOUT = 10.0
PIPE_LIMIT = 256 * 1024        # bytes buffered towards one side of a CONNECT relay
MAX_CONTROL = 1024             # established control connections (associations, CONNECTs)
# CONNECT names resolved at once (a request beyond either is refused: REP 4, conn_rejected),
# and how long a client waits for one (then REP 4); a lookup counts until getaddrinfo
# returns, even after its client was answered, so names that never resolve cannot pile up
# in the resolver's queue. The resolver threads are DNS_THREADS at most.
RESOLVE_MAX = 32
RESOLVE_PER_CLIENT = 4
RESOLVE_TIMEOUT = 5.0
RESOLVER_TOKEN = 0xFFFFFFFE    # poll token of the resolver's wake-up pipe (HOSTS_TOKEN is 0xFFFFFFFF)

# states of a control connection
HANDSHAKE, RESOLVING, CONNECTING, PIPE, ASSOCIATED = range(5)


class _Side:
    """One socket of a CONNECT relay, with what waits to be written to it."""
    __slots__ = ("sock", "token", "out", "eof", "peer", "reading", "writing", "shut")

    def __init__(self, sock, token):
        self.sock, self.token = sock, token
        self.out = bytearray()
        self.eof = False          # its reader said EOF
        self.shut = False         # we shut down its write side
        self.peer = None
        self.reading = True
        self.writing = False


class _Control:
    __slots__ = ("side", "hs", "state", "deadline", "peer", "udp", "assoc", "remote", "port")

    def __init__(self, side, hs, deadline, peer):
        self.side, self.hs, self.state, self.deadline, self.peer = side, hs, HANDSHAKE, deadline, peer
        self.udp = None
        self.assoc = -1
        self.remote = None
        self.port = 0             # CONNECT: the port, while its name is resolved


class Socks5Service(Service):
    def __init__(self, cfg, ctx, resolve=None):
        check_exposure(cfg, "user")
        self.cfg, self.ctx, self.st = cfg, ctx, ctx.stats
        self.user = cfg.user
        self.password = cfg.password
        self.dacl = DestinationAcl(cfg, log)      # host-aware: the UDP relay's and CONNECT's
        self.acl = self.dacl.acl
        self.lsock = sockopt.tcp_listen(cfg.listen, reuseport=ctx.reuseport, tune=True)
        self.relay = _select.module("tunnel").Socks5Relay(self.acl, ctx.stats,
                                         max_assoc=min(cfg.max_associations, MAX_CONTROL),
                                         batch=min(cfg.batch, 256), log=log, resolve=resolve,
                                         timeout=cfg.timeout,
                                         port_timeouts=cfg.port_timeouts(),
                                         outbound=cfg.outbound() or None)
        self.outbound = cfg.outbound()
        self.dacl.attach(self.relay)
        self.acceptor = Acceptor(self.lsock, lambda fd: self.relay.watch(fd, 0), self.relay.unwatch,
                                 ctx.stats, _I, log)
        self.say = LogLimiter(log)
        self.controls = {}        # token -> _Control (client side)
        self.handshakes = HandshakePool()   # tokens in HANDSHAKE
        self.sides = {}           # token -> (_Side, _Control)
        self.by_assoc = {}        # association slot -> _Control
        self.strict_udp = cfg.strict_udp
        # CONNECT names: resolver threads apart from the UDP path's, woken through a pipe
        self.names = ResolverPool(resolve, threads=DNS_THREADS, max_queue=RESOLVE_MAX)
        self.relay.watch(self.names.fileno(), RESOLVER_TOKEN)
        self.lookups = {}         # pool token -> client (source_key: IPv6 by /64)
        self.resolving = {}       # client -> its names in flight
        self.nresolving = 0
        self._token = 0
        self.address = self.lsock.getsockname()

    # -- helpers
    def _count(self, name, n=1):
        self.st[_I[name]] += n

    def _new_token(self):
        self._token = self._token % 0x7FFFFFFF + 1
        return self._token

    def _update_watch(self, side):
        want_read = side.reading and not side.eof
        want_write = bool(side.out) or side.writing
        try:
            self.relay.watch(side.sock.fileno(), side.token, read=want_read, write=want_write,
                             modify=True)
        except OSError:
            pass

    # -- loop
    def run(self):
        stop = self.ctx.stop
        while not stop.is_set():
            try:
                for token, events in self.relay.poll(100):
                    if token == 0:
                        self._accept()
                        continue
                    if token == HOSTS_TOKEN:
                        self.dacl.refresh()
                        continue
                    if token == RESOLVER_TOKEN:
                        self._resolved()
                        continue
                    entry = self.sides.get(token)
                    if entry is not None:
                        self._side_event(entry[0], entry[1], events)
                now = time.monotonic()
                for idx in self.relay.tick(now):
                    ctl = self.by_assoc.pop(idx, None)
                    if ctl is not None:
                        ctl.assoc = -1            # the relay closed it already
                        self._close(ctl, "association idle for %gs" % self.cfg.timeout)
                self.acceptor.tick(now)
                self.dacl.tick(now)
                for token in self.handshakes.expired(now):
                    self._close(self.controls[token], "handshake timed out", rejected=True)
                for ctl in [c for c in self.controls.values()
                            if c.state in (RESOLVING, CONNECTING) and now > c.deadline]:
                    if ctl.state == RESOLVING:
                        self._close(ctl, "CONNECT name not resolved in time", rejected=True,
                                    reply=ctl.hs.reply(proto.REP_HOST_UNREACHABLE))
                    else:
                        self._close(ctl, "CONNECT timed out", rejected=True)
            except Exception:            # never let one bad event stop the listener
                log.exception("socks5 %s: unexpected error; continuing", self.address)
                time.sleep(0.01)

    def _accept(self):
        for sock, peer in self.acceptor.accept():
            why = None
            if self.handshakes.source_full(peer[0]):
                why = "%d connections of its address in their handshake"
                n = self.handshakes.per_source
            elif self._established() >= MAX_CONTROL:
                why, n = "%d control connections", MAX_CONTROL
            if why:
                sock.close()
                self._count("conn_rejected")
                self.say(logging.WARNING, "SOCKS5 client %s refused: " + why, peer[0], n)
                continue
            self._count("conn_open")
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sockopt.tcp_keepalive(sock)
            side = _Side(sock, self._new_token())
            hs = proto.ServerHandshake(user=self.user, password=self.password,
                                       commands=(proto.CMD_CONNECT, proto.CMD_UDP_ASSOCIATE))
            ctl = _Control(side, hs, 0.0, peer)
            self.controls[side.token] = ctl
            self.sides[side.token] = (side, ctl)
            self.relay.watch(sock.fileno(), side.token)
            victim = self.handshakes.add(side.token, peer[0], time.monotonic())
            if victim is not None:
                self._close(self.controls[victim], f"{self.handshakes.cap} connections in their "
                            f"handshake; the oldest made room", rejected=True)

    def _established(self):
        return len(self.controls) - len(self.handshakes)

    def _close(self, ctl, why=None, rejected=False, reply=b""):
        if self.controls.pop(ctl.side.token, None) is None:
            return
        self.handshakes.remove(ctl.side.token)
        for side in (ctl.side, ctl.remote):
            if side is None:
                continue
            self.sides.pop(side.token, None)
            try:
                self.relay.unwatch(side.sock.fileno())
            except OSError:
                pass
            if side is ctl.side and reply:
                try:
                    side.sock.send(reply)
                except OSError:
                    pass
            side.sock.close()
        if ctl.assoc >= 0:
            self.by_assoc.pop(ctl.assoc, None)
            self.relay.remove(ctl.assoc)
        if ctl.udp is not None:
            ctl.udp.close()
        self._count("conn_open", -1)
        if rejected:
            self._count("conn_rejected")
        if why:
            if rejected:
                self.say(logging.WARNING, "SOCKS5 client %s: %s", ctl.peer[0], why)
            else:
                log.debug("SOCKS5 client %s: %s", ctl.peer[0], why)

    def _side_event(self, side, ctl, events):
        if ctl.state == HANDSHAKE:
            return self._handshake(ctl)
        if ctl.state == CONNECTING:
            return self._connected(ctl)
        if ctl.state == RESOLVING:
            if events & (select.EPOLLERR | select.EPOLLHUP):
                self._close(ctl, "closed while its CONNECT name was resolved")
            return
        if ctl.state == ASSOCIATED:
            # the control connection: anything but EOF is ignored; EOF ends the association
            try:
                data = side.sock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._close(ctl, "association ended")
            return
        self._pipe_event(side, ctl, events)

    # -- handshake and requests
    def _handshake(self, ctl):
        sock = ctl.side.sock
        try:
            data = sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self._close(ctl, str(e), rejected=True)
        if not data:
            return self._close(ctl, "closed during the handshake", rejected=True)
        self.handshakes.heard(ctl.side.token)
        try:
            out = ctl.hs.feed(data)
            if out:
                sock.send(out)
        except proto.HandshakeError as e:
            return self._close(ctl, f"{e.reason}: {e}", rejected=True, reply=e.reply)
        except OSError as e:
            return self._close(ctl, str(e), rejected=True)
        if not ctl.hs.done:
            return
        self.handshakes.remove(ctl.side.token)
        if self._established() > MAX_CONTROL:
            return self._close(ctl, f"{MAX_CONTROL} control connections", rejected=True,
                               reply=ctl.hs.reply(proto.REP_FAILURE))
        cmd, _atyp, host, port = ctl.hs.request
        if cmd == proto.CMD_UDP_ASSOCIATE:
            return self._associate(ctl, host, port)
        return self._connect(ctl, host, port)

    def _associate(self, ctl, host, port):
        sock = ctl.side.sock
        if port == 0 and self.strict_udp:
            return self._close(ctl, "UDP ASSOCIATE with port 0 refused (strict_udp)",
                               rejected=True, reply=ctl.hs.reply(proto.REP_NOT_ALLOWED))
        local = sock.getsockname()
        peer = sock.getpeername()
        # With --source or --bind-interface the relay socket's datagrams to remotes carry
        # their family's source and the interface (IP_PKTINFO / IPV6_PKTINFO): it is bound
        # to the wildcard then, so that the remotes' answers to that source reach it, and
        # answers the client from `local`.
        wildcard = sock.family == socket.AF_INET6 or bool(self.outbound)
        try:
            udp = socket.socket(sock.family, socket.SOCK_DGRAM)
            udp.setblocking(False)
            if sock.family == socket.AF_INET6:
                # Dual stack on the wildcard: the relay socket reaches IPv4 and IPv6
                # destinations whichever family the client's control connection used (its
                # own datagrams are matched by source address, IPv4-mapped like the control
                # connection's).
                udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                udp.bind(("::", 0))
            else:
                udp.bind(("0.0.0.0" if wildcard else local[0], 0))
        except OSError as e:
            return self._close(ctl, f"UDP ASSOCIATE: {e}", rejected=True,
                               reply=ctl.hs.reply(proto.REP_FAILURE))
        # The client's port comes from the request when it gives one, else from the first
        # datagram its host sends (clients behind NAT cannot know it): the association is
        # bound to that first address and port (Socks5Relay); strict: port 0 is refused.
        client_port = port
        # On the wildcard, replies to the client leave from the address its control
        # connection reached (the one it sends its datagrams to), not the route's choice.
        idx = self.relay.add(udp.fileno(), (peer[0], client_port),
                             local[:2] if wildcard else None)
        if idx < 0:
            udp.close()
            return self._close(ctl, "association table full", rejected=True,
                               reply=ctl.hs.reply(proto.REP_FAILURE))
        ctl.udp, ctl.assoc, ctl.state = udp, idx, ASSOCIATED
        self.by_assoc[idx] = ctl
        # Tell the client the address it already reaches us at (IPv4 as IPv4), with the
        # relay socket's port.
        host = local[0]
        if host.startswith("::ffff:") and "." in host:
            host = host[7:]
        try:
            sock.send(ctl.hs.reply(proto.REP_SUCCEEDED, host, udp.getsockname()[1]))
        except OSError as e:
            return self._close(ctl, str(e))

    def _connect(self, ctl, host, port):
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return self._resolve(ctl, host, port)
        self._connect_to(ctl, ip, port)

    # -- CONNECT names, resolved off the loop
    def _resolve(self, ctl, host, port):
        client = source_key(ctl.peer[0])
        n = self.resolving.get(client, 0)
        why = None
        if n >= RESOLVE_PER_CLIENT:
            why = f"{RESOLVE_PER_CLIENT} CONNECT names of its address being resolved"
        elif self.nresolving >= RESOLVE_MAX:
            why = f"{RESOLVE_MAX} CONNECT names being resolved"
        else:
            why = self.names.submit(ctl.side.token, host.encode("latin-1"))
        if why is not None:
            return self._close(ctl, f"CONNECT {host}: {why}", rejected=True,
                               reply=ctl.hs.reply(proto.REP_HOST_UNREACHABLE))
        self.lookups[ctl.side.token] = client
        self.resolving[client] = n + 1
        self.nresolving += 1
        ctl.state, ctl.port = RESOLVING, port
        ctl.deadline = time.monotonic() + RESOLVE_TIMEOUT
        ctl.side.reading = False          # the client side stays quiet until the reply
        self._update_watch(ctl.side)

    def _resolved(self):
        for token, addrs, err in self.names.results():
            client = self.lookups.pop(token, None)
            if client is not None:
                n = self.resolving.pop(client, 0) - 1
                if n > 0:
                    self.resolving[client] = n
                self.nresolving -= 1
            entry = self.sides.get(token)
            if entry is None or entry[1].state != RESOLVING or entry[1].side.token != token:
                continue                   # answered (timed out) or closed meanwhile
            ctl = entry[1]
            ctl.state = HANDSHAKE          # no longer resolving; _connect_to moves it on
            if not addrs:
                self._close(ctl, f"CONNECT {ctl.hs.request[2]}: cannot resolve: {err}",
                            rejected=True, reply=ctl.hs.reply(proto.REP_HOST_UNREACHABLE))
                continue
            self._connect_to(ctl, ipaddress.ip_address(addrs[0][1]), ctl.port)

    def _connect_to(self, ctl, ip, port):
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        addr = (str(ip), port)
        if not self.acl.allowed(addr[0]):
            self._count("drop_denied")
            return self._close(ctl, f"CONNECT {addr[0]} denied by the access list",
                               rejected=True, reply=ctl.hs.reply(proto.REP_NOT_ALLOWED))
        remote = socket.socket(fam, socket.SOCK_STREAM)
        remote.setblocking(False)
        remote.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sockopt.tcp_keepalive(remote)
        try:
            sockopt.bind_outbound(remote, self.outbound, fam == socket.AF_INET6)
        except OSError as e:
            remote.close()
            return self._close(ctl, f"CONNECT {addr[0]}: {e}", rejected=True,
                               reply=ctl.hs.reply(proto.REP_FAILURE))
        err = remote.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            remote.close()
            return self._close(ctl, f"CONNECT {addr[0]}: {err}", rejected=True,
                               reply=ctl.hs.reply(proto.REP_CONN_REFUSED))
        side = _Side(remote, self._new_token())
        side.writing = True
        side.reading = False
        ctl.remote = side
        ctl.state = CONNECTING
        ctl.deadline = time.monotonic() + CONNECT_TIMEOUT
        self.sides[side.token] = (side, ctl)
        self.relay.watch(remote.fileno(), side.token, read=False, write=True)
        # the client side stays quiet until the reply
        ctl.side.reading = False
        self._update_watch(ctl.side)

    def _connected(self, ctl):
        remote = ctl.remote
        err = remote.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            return self._close(ctl, f"CONNECT failed: {err}", rejected=True,
                               reply=ctl.hs.reply(proto.REP_CONN_REFUSED))
        bound = remote.sock.getsockname()
        try:
            ctl.side.sock.send(ctl.hs.reply(proto.REP_SUCCEEDED, bound[0], bound[1]))
        except OSError as e:
            return self._close(ctl, str(e))
        ctl.state = PIPE
        ctl.side.peer, remote.peer = remote, ctl.side
        remote.writing = False
        remote.reading = ctl.side.reading = True
        if ctl.hs.leftover:
            remote.out += ctl.hs.leftover
        self._update_watch(remote)
        self._update_watch(ctl.side)

    # -- CONNECT relay
    def _pipe_event(self, side, ctl, events):
        if events & select.EPOLLOUT or side.out:
            if not self._drain(side, ctl):
                return
        if events & (0x001 | 0x008 | 0x010) and side.reading and not side.eof:   # IN ERR HUP
            peer = side.peer
            try:
                data = side.sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                side.eof = True
                if not peer.out:
                    self._shut(peer)
            else:
                peer.out += data
                self._drain(peer, ctl)
                if len(peer.out) >= PIPE_LIMIT:
                    side.reading = False          # back-pressure until the peer drains
            if side.eof and peer.eof and not side.out and not peer.out:
                return self._close(ctl)
            self._update_watch(side)

    def _shut(self, side):
        if not side.shut:
            side.shut = True
            try:
                side.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _drain(self, side, ctl):
        if side.out:
            try:
                n = side.sock.send(side.out)
                del side.out[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._close(ctl)
                return False
        peer = side.peer
        if not side.out:
            if peer is not None and peer.eof:
                self._shut(side)
                if side.eof:
                    self._close(ctl)
                    return False
            if peer is not None and not peer.reading and not peer.eof:
                peer.reading = True
                self._update_watch(peer)
        self._update_watch(side)
        return True

    def close(self):
        for ctl in list(self.controls.values()):
            self._close(ctl)
        self.dacl.close()
        self.names.close()
        self.relay.close()
        self.lsock.close()


def create(cfg, ctx):
    return Socks5Service(cfg, ctx)
