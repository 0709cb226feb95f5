"""The SOCKS5 upstream core in pure Python (twin of relay.datapath.tunnel.Socks5Upstream)."""
import collections
import errno as _errno
import logging
import os
import select as _select
import socket
import time as _time

from relay.proto import (
    ATYP_DOMAIN, CMD_UDP_ASSOCIATE, ClientHandshake, MAX_PAYLOAD, udp_header,
    udp_header_counted,
)
from relay.net.sockopt import flow_socket
from relay.datapath.timeouts import ExpiryLists
from relay.datapath.pure.common import (
    CONNECT_TIMEOUT, EPOLLIN, EPOLLOUT, SO_MARK, SOCKS5_HANDSHAKES, SOCKS5_QUEUED, canonical,
    fd_ceiling, send_error_counter,
)
from relay.loglimit import LogLimiter
from relay.datapath.pure.tunnel_upstream import UpstreamBase, resolve_server
from relay.net import sockopt as _sockopt


class _Assoc:
    __slots__ = ("key", "client", "tcp", "udp", "state", "relay", "queue", "qbytes", "last",
                 "deadline", "hs", "stat")


class Socks5Upstream(UpstreamBase):
    """Pure fallback of relay.datapath.tunnel.Socks5Upstream (one association per client flow).

    At most ``max_flows`` associations in least recently used order: a new client at the
    cap evicts the oldest (assoc_evicted: its sockets closed, its queue dropped), idle ones
    expire from that end, and one whose socket lies within FD_RESERVE of the descriptor
    limit is refused (assoc_refused). At most ``handshakes`` associations are set up at
    once; later new flows wait in arrival order, without sockets; the queues of the flows
    not up yet hold at most ``queued_max`` bytes together (the rest: queue_drops)."""

    def __init__(self, server, user=None, password=None, mark=None, stats=None, timeout=60.0,
                 max_flows=1024, queue_limit=65536 + 1024, batch=32, log=None, port_timeouts=(),
                 client_groups=(), outbound=None, handshakes=None, queued_max=None):
        super().__init__(stats, log, client_groups)
        self.handshakes = SOCKS5_HANDSHAKES if handshakes is None else handshakes
        self.queued_max = SOCKS5_QUEUED if queued_max is None else queued_max
        if self.handshakes < 1:
            raise ValueError("handshakes must be at least 1")
        self.loglim = LogLimiter(self.log)
        self.nstarting = 0          # associations connecting or in their handshake
        self.queued = 0             # queue bytes of the flows not up yet
        self.waiting = collections.deque()      # flows waiting for their handshake
        self.server = tuple(server)
        self.family, self.addr = resolve_server(self.server)
        self.user, self.password, self.mark, self.timeout = user, password, mark, timeout
        self.outbound = outbound
        self.max_flows, self.queue_limit, self.batch = max_flows, max(queue_limit, 65600), batch
        self.assocs = collections.OrderedDict()     # key -> _Assoc, least recently used first
        self.expiry = ExpiryLists(timeout, port_timeouts)   # per destination port
        self.byfd = {}              # fd -> _Assoc
        self.next_expiry = 0.0
        self.nup = 0                # associations whose handshake is done
        self.fd_ceiling = fd_ceiling()
        self.pending = []           # (sock, datagram, relay) to send on flush

    @property
    def flows_open(self):
        return len(self.assocs)

    def _flow_items(self):
        return ((key, a.last, a.stat) for key, a in self.assocs.items())

    def _open(self, key, client):
        """A new association for client (the least recently used one evicted at the cap),
        or None when it is refused (counted): connecting at once while fewer than
        ``handshakes`` are being set up, else waiting its turn."""
        if len(self.assocs) >= self.max_flows:
            self._close(next(iter(self.assocs.values())), "assoc_evicted")
        at_once = self.nstarting < self.handshakes and not self.waiting
        socks = self._connect() if at_once else None
        if at_once and socks is None:
            self._count("assoc_refused")
            return None
        a = _Assoc()
        a.key, a.client, a.state, a.relay, a.queue, a.qbytes = key, client, "waiting", None, [], 0
        a.last, a.deadline, a.hs, a.tcp, a.udp = self.now, 0.0, None, None, None
        a.stat = self.groups.new(self.now, key)
        self.assocs[key] = a
        self._count("assoc_created")
        self._count("assoc_open")
        if at_once:
            self._attach(a, socks)
            return a if self.assocs.get(key) is a else None
        if len(self.waiting) >= self.max_flows:     # drop the entries of flows that ended
            self.waiting = collections.deque(w for w in self.waiting
                                             if self.assocs.get(w.key) is w
                                             and w.state == "waiting")
        self.waiting.append(a)
        return a

    def _start_waiting(self):
        while self.waiting and self.nstarting < self.handshakes:
            a = self.waiting.popleft()
            if self.assocs.get(a.key) is a and a.state == "waiting":
                self._start(a)

    def _start(self, a):
        """Waiting association a's sockets and its connect (refused: it ends, counted)."""
        socks = self._connect()
        if socks is None:
            return self._close(a, "assoc_refused")
        self._attach(a, socks)

    def _connect(self):
        """(UDP socket, TCP socket connecting to the server) of a new association, or None
        (out of descriptors, or the connect refused at once: logged)."""
        udp = tcp = None
        try:
            udp = flow_socket(self.family, socket.SOCK_DGRAM, self.fd_ceiling)
            if udp is not None:
                tcp = flow_socket(self.family, socket.SOCK_STREAM, self.fd_ceiling)
            if tcp is None:                   # out of descriptors
                if udp is not None:
                    udp.close()
                return None
            udp.setblocking(False)
            v6 = self.family == socket.AF_INET6
            if self.mark:
                udp.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            _sockopt.bind_outbound(udp, self.outbound, v6, wildcard=True)
            tcp.setblocking(False)
            if self.mark:
                tcp.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            _sockopt.tcp_client(tcp, self.outbound, v6)
            err = tcp.connect_ex(self.addr)
            if err not in (0, _errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
        except OSError as e:
            self.loglim(logging.WARNING, "SOCKS5 association via %s:%s failed: %s",
                        *self.server[:2], e)
            for sock in (udp, tcp):
                if sock is not None:
                    sock.close()
            return None
        return udp, tcp

    def _attach(self, a, socks):
        udp, tcp = socks
        a.state, a.deadline, a.tcp, a.udp = "connecting", self.now + CONNECT_TIMEOUT, tcp, udp
        self.nstarting += 1
        self.byfd[tcp.fileno()] = a
        self.byfd[udp.fileno()] = a
        try:
            self.ep.register(tcp.fileno(), EPOLLIN | EPOLLOUT)
            self.ep.register(udp.fileno(), EPOLLIN)
        except OSError as e:
            self.loglim(logging.WARNING, "SOCKS5 association via %s:%s failed: %s",
                        *self.server[:2], e)
            self._close(a, "assoc_refused")

    def _close(self, a, counter):
        if self.assocs.get(a.key) is not a:
            return
        del self.assocs[a.key]
        self.expiry.remove(a.key)
        if any(p[0] is a.udp for p in self.pending):
            self.flush()                      # datagrams batched for this socket go first
        for s in (a.tcp, a.udp):
            if s is not None:
                self.byfd.pop(s.fileno(), None)
                try:
                    self.ep.unregister(s.fileno())
                except (OSError, ValueError):
                    pass
                s.close()
        if a.state == "up":
            self.nup -= 1
            self._count("conn_open", -1)
        elif a.state in ("connecting", "handshake"):
            self.nstarting -= 1
        self.queued -= a.qbytes
        a.queue, a.qbytes, a.state = [], 0, "closed"
        self._count("assoc_open", -1)
        if counter:
            self._count(counter)

    def forget(self, client):
        """End the association of client (it moved to another upstream), counted nowhere."""
        a = self.assocs.get(canonical(client))
        if a is not None:
            self._close(a, None)

    def send(self, client, dst, data):
        data = bytes(data)
        if len(data) > MAX_PAYLOAD:
            self._count("drop_too_big")
            return
        key = canonical(client)
        a = self.assocs.get(key)
        if a is None:
            a = self._open(key, tuple(client[:2]))
            if a is None:
                return
            self.expiry.add(key, dst[1], self.now)
        a.last = self.now
        self.assocs.move_to_end(key)
        self.expiry.touch(key, self.now)
        self.groups.count_out(a.stat, canonical(dst), len(data))
        dgram = udp_header(dst[0], dst[1]) + data
        if a.state != "up":
            need = len(dgram) + 4
            if self.queue_limit - a.qbytes < need or self.queued + need > self.queued_max:
                self._count("queue_drops")
                return
            a.queue.append((dgram, len(data)))
            a.qbytes += need
            self.queued += need
            return
        self.pending.append((a.udp, dgram, a.relay))
        self._count("up_datagrams")
        self._count("up_bytes", len(data))

    def flush(self):
        for sock, dgram, relay in self.pending:
            try:
                sock.sendto(dgram, relay)
            except OSError as e:
                self._count(send_error_counter(e.errno))
        self.pending = []

    def process(self):
        self.now = _time.monotonic()
        for fd, ev in self.ep.poll(0, 64):
            a = self.byfd.get(fd)
            if a is None or self.assocs.get(a.key) is not a:
                continue
            if a.udp is not None and fd == a.udp.fileno():
                self._recv(a)
            elif a.state != "up":
                self._handshake(a, ev)
            else:
                try:
                    data = a.tcp.recv(512)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._close(a, None)

    def _handshake(self, a, ev):
        if a.state == "connecting":
            err = a.tcp.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err or ev & (_select.EPOLLERR | _select.EPOLLHUP):
                self.loglim(logging.WARNING, "SOCKS5 server %s:%s: %s", *self.server[:2],
                            os.strerror(err) if err else "connection failed")
                return self._close(a, "assoc_refused")
            a.hs = ClientHandshake(cmd=CMD_UDP_ASSOCIATE,
                                   host="::" if self.family == socket.AF_INET6 else "0.0.0.0",
                                   user=self.user, password=self.password)
            a.state = "handshake"
            self.ep.modify(a.tcp.fileno(), EPOLLIN)
            try:
                a.tcp.send(a.hs.start())
            except OSError:
                self._close(a, "assoc_refused")
            return
        try:
            data = a.tcp.recv(4096)
            if not data:
                raise OSError("SOCKS5 server closed the connection during the handshake")
            out = a.hs.feed(data)
            if out:
                a.tcp.send(out)
            if not a.hs.done:
                return
            host, port = a.hs.bound
            if host in ("0.0.0.0", "::"):
                host = self.addr[0]
            fam, relay = resolve_server((host, port), socket.SOCK_DGRAM)
            if fam != self.family:
                raise OSError(f"relay address {host} is not of the server's family")
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ValueError) as e:
            self.loglim(logging.WARNING, "SOCKS5 UDP ASSOCIATE via %s:%s failed: %s",
                        *self.server[:2], e)
            self._count("conn_rejected")
            return self._close(a, "assoc_refused")
        a.relay, a.state, a.hs = relay[:2], "up", None
        self.nstarting -= 1
        self.nup += 1
        self._count("conn_open")
        for dgram, n in a.queue:
            try:
                a.udp.sendto(dgram, a.relay)
                self._count("up_datagrams")
                self._count("up_bytes", n)
            except OSError:
                self._count("drop_send_error")
        self.queued -= a.qbytes
        a.queue, a.qbytes = [], 0
        self._start_waiting()

    def _recv(self, a):
        for _ in range(self.batch):
            try:
                data, src = a.udp.recvfrom(65536 + 262)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            a.last = self.now
            self.assocs.move_to_end(a.key)
            self.expiry.touch(a.key, self.now)
            if a.state != "up" or tuple(src[:2]) != tuple(a.relay[:2]):
                self._count("drop_malformed")
                continue
            h = udp_header_counted(data, self._count)
            if h is None:
                continue
            atyp, host, port, hl = h
            if atyp == ATYP_DOMAIN:
                self._count("drop_no_route")
                continue
            self.groups.count_in(a.stat, len(data) - hl)
            self._deliver(a.client, (host, port), data[hl:])

    def tick(self, now=0):
        now = now or _time.monotonic()
        self.now = now
        # associations still in their handshake time out (looked at while there are some)
        if len(self.assocs) > self.nup and now >= self.next_expiry:
            self.next_expiry = now + 0.5
            for a in [a for a in self.assocs.values()
                      if a.state in ("connecting", "handshake") and now > a.deadline]:
                self.loglim(logging.WARNING, "SOCKS5 association via %s:%s timed out",
                            *self.server[:2])
                self._close(a, "assoc_refused")
        # idle expiry from the least recently used end of each timeout class: O(expired)
        for key in self.expiry.expired(now):
            self._close(self.assocs[key], "assoc_expired")
        # the turns of handshakes that failed or timed out
        self._start_waiting()

    def close(self):
        for a in list(self.assocs.values()):
            self._close(a, None)
        super().close()
