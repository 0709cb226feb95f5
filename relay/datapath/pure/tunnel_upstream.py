"""The tunnel client's core in pure Python (twin of relay.datapath.tunnel.TunnelUpstream)."""
import collections
import errno as _errno
import logging as _logging
import os
import select as _select
import socket
import time as _time

from relay.proto import (
    ATYP_DOMAIN, CMD_UDP_TUN, CMD_UDP_TUN_MUX, ClientHandshake, FrameError,
    GOST_QUEUE_LIMIT, GOST_RX_CAP, MAX_FRAME_HEADER, MAX_PAYLOAD, MUX_QUEUE_LIMIT,
    REP7_HINT, REP_CMD_UNSUPPORTED, check_client_options, encode_frame, parse_frame,
    parse_frames,
)
from relay.loglimit import LogLimiter
from relay.datapath.timeouts import ExpiryLists
from relay.datapath.pure.flows import Groups, client_rows, flow_rows
from relay.net.sockopt import flow_socket
from relay.net import sockopt as _sockopt
from relay.datapath.pure.common import (
    BACKOFF_MAX, BACKOFF_MIN, C, CONNECT_TIMEOUT, EPOLLIN, EPOLLOUT, RX_CAP, SO_MARK,
    TUNNEL_LOG, canonical, fd_ceiling, stats_view,
)


def resolve_server(server, socktype=socket.SOCK_STREAM):
    infos = socket.getaddrinfo(server[0], server[1], 0, socktype)
    return infos[0][0], infos[0][4]


class UpstreamBase:
    def __init__(self, stats, log, client_groups=()):
        self.ep = _select.epoll()
        self._stats = stats_view(stats)
        self.groups = Groups(client_groups, self._stats)
        self.log = log or TUNNEL_LOG
        self.now = _time.monotonic()
        self.reply = None           # callable(client, src, data)

    @property
    def stats(self):
        return self._stats

    def _count(self, name, n=1):
        self._stats[C[name]] += n

    def fileno(self):
        return self.ep.fileno()

    def snapshot(self, n, sort, by_client=False, clients_cap=4096):
        """relay flows rows (relay/datapath/flows.pxd table_rows / table_clients)."""
        now = _time.monotonic()
        items = list(self._flow_items())
        if by_client:
            return client_rows(items, sort, n, clients_cap, now)
        return flow_rows(items, sort, n, now)

    def collect_replies(self, into):
        self.reply = lambda client, src, data: into.append((client, src, data))

    def _deliver(self, client, src, data):
        self._count("down_datagrams")
        self._count("down_bytes", len(data))
        if self.reply is not None:
            self.reply(client, src, data)

    def close(self):
        self.ep.close()


class _CConn:
    __slots__ = ("sock", "state", "next_try", "backoff", "deadline", "rx", "queue", "out",
                 "hs", "ever_up", "client", "index")


class TunnelUpstream(UpstreamBase):
    """Pure fallback of relay.datapath.tunnel.TunnelUpstream: Python API send/flush/process/tick.

    Multiplexed (CMD 0xFA): flows spread over ``connections`` connections, frames carry
    flow ids. ``gost=True``: one connection per flow opened when the flow starts (CMD
    0xF3, RFC 1929 ``user``/``password`` if given), gost's frames, closed when it idles
    out. ``queue_limit`` bounds what waits per connection (per flow in gost mode).

    At most ``max_flows`` flows, in least recently used order: a new client at the cap
    evicts the oldest (assoc_evicted; a gost flow's connection and queued frames go with
    it, a multiplexed flow's id is retired), idle flows expire from that end, and a gost
    connection within FD_RESERVE of the descriptor limit refuses its flow (assoc_refused)."""

    def __init__(self, server, secret=None, connections=1, mark=None, stats=None,
                 queue_limit=None, timeout=60.0, max_flows=4096, log=None, gost=False,
                 user=None, password=None, port_timeouts=(), client_groups=(), outbound=None):
        if not 1 <= connections <= 64:
            raise ValueError(f"connections must be 1-64, got {connections}")
        if not 1 <= max_flows <= 65536:
            raise ValueError(f"max_flows must be 1-65536, got {max_flows}")
        check_client_options(gost, secret, connections, user, password)
        if queue_limit is None:
            queue_limit = GOST_QUEUE_LIMIT if gost else MUX_QUEUE_LIMIT
        if queue_limit < MAX_PAYLOAD + MAX_FRAME_HEADER:
            raise ValueError(f"queue_limit must be at least {MAX_PAYLOAD + MAX_FRAME_HEADER}")
        super().__init__(stats, log, client_groups)
        self.server = tuple(server)
        self.family, self.addr = resolve_server(self.server)
        self.secret, self.mark, self.timeout = secret, mark, timeout
        self.outbound = outbound
        self.gost, self.mux, self.user, self.password = gost, not gost, user, password
        self.rx_cap = GOST_RX_CAP if gost else RX_CAP
        self.queue_limit, self.max_flows = queue_limit, max_flows
        self.say = LogLimiter(self.log)
        self.rep7_logged = False
        self.flows = collections.OrderedDict()  # key -> [id, conn, last, client, FlowStat], LRU first
        self.expiry = ExpiryLists(timeout, port_timeouts)   # per destination port
        self.by_id = {}             # id -> key (multiplexed)
        self.byfd = {}              # fd -> conn
        self.gens = [0] * max_flows
        self.free = list(range(max_flows - 1, -1, -1))
        self.next_conn = 0
        self.fd_ceiling = fd_ceiling()
        self.conns = [] if gost else [self._new_conn(i) for i in range(connections)]
        self.tick(_time.monotonic())

    @staticmethod
    def _new_conn(index, client=None):
        c = _CConn()
        c.sock, c.state, c.next_try, c.backoff = None, "down", 0.0, BACKOFF_MIN
        c.deadline, c.rx, c.hs, c.ever_up = 0.0, bytearray(), None, False
        c.queue = []                # whole frames not written yet
        c.out = bytearray()         # the frame being written (partly sent)
        c.client, c.index = client, index
        return c

    def _all_conns(self):
        return [fl[1] for fl in self.flows.values()] if self.gost else self.conns

    @property
    def connected(self):
        return sum(1 for c in self._all_conns() if c.state == "up")

    @property
    def flows_open(self):
        return len(self.flows)

    def _flow_items(self):
        return ((key, fl[2], fl[4]) for key, fl in self.flows.items())

    def _queued(self, c):
        return sum(map(len, c.queue)) + len(c.out)

    def send(self, client, dst, data):
        data = bytes(data)
        if len(data) > MAX_PAYLOAD:
            self._count("drop_too_big")
            return
        if self.gost and not data:
            # gost reads RSV = 0 as "length unknown": an empty datagram cannot be framed
            self._count("drop_malformed")
            return
        key = canonical(client)
        fl = self.flows.get(key)
        if fl is None:
            fl = self._new_flow(key, tuple(client[:2]))
            if fl is None:
                return
            self.expiry.add(key, dst[1], self.now)
        fl[2] = self.now
        self.flows.move_to_end(key)
        self.expiry.touch(key, self.now)
        self.groups.count_out(fl[4], canonical(dst), len(data))
        c = fl[1]
        frame = encode_frame(dst[0], dst[1], data, flow=fl[0] if self.mux else None)
        if self.queue_limit - self._queued(c) < len(frame):
            self._count("drop_buffer_full" if c.state == "up" else "queue_drops")
            return
        c.queue.append(frame)
        self._count("up_datagrams")
        self._count("up_bytes", len(data))

    def forget(self, client):
        """End the flow of client (it moved to another upstream), counted nowhere."""
        if canonical(client) in self.flows:
            self._end(canonical(client), None)

    def _new_flow(self, key, client):
        """A flow for client (the least recently used one evicted at the cap), or None
        when it is refused (counted)."""
        if len(self.flows) >= self.max_flows:
            self._end(next(iter(self.flows)), "assoc_evicted")
        slot = self.free.pop()
        self.gens[slot] = (self.gens[slot] + 1) & 0xFFFF
        fid = (self.gens[slot] << 16) | slot
        if self.gost:
            conn = self._new_conn(slot, key)
            if not self._connect(conn):
                self.free.append(slot)
                self._count("assoc_refused")
                return None
        else:
            conn = self.conns[self.next_conn]
            self.next_conn = (self.next_conn + 1) % len(self.conns)
        fl = self.flows[key] = [fid, conn, self.now, client, self.groups.new(self.now, key)]
        self.by_id[fid] = key
        self._count("assoc_created")
        self._count("assoc_open")
        return fl

    def _end(self, key, counter):
        """End a flow (evicted, expired or refused: counter): a gost flow's connection closes
        with its queued frames; a multiplexed flow's id is retired (late replies for it are
        dropped as no-route)."""
        fl = self.flows.pop(key)
        self.expiry.remove(key)
        del self.by_id[fl[0]]
        self.free.append(fl[0] & 0xFFFF)
        if self.gost:
            self._close_sock(fl[1])
            fl[1].state = "down"
        self._count("assoc_open", -1)
        if counter:
            self._count(counter)

    def flush(self):
        for c in self._all_conns():
            if c.state == "up" and c.queue:
                self._write(c)

    def _write(self, c):
        if c.queue:
            c.out += b"".join(c.queue)
            c.queue = []
        if c.out:
            try:
                n = c.sock.send(c.out)
                del c.out[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                return self._down(c, str(e))
        self.ep.modify(c.sock.fileno(), EPOLLIN | (EPOLLOUT if c.out else 0))

    def _what(self, c):
        if self.gost:
            return f"gost connection of flow {c.client[0]}:{c.client[1]}"
        return f"tunnel connection {c.index}"

    def _close_sock(self, c):
        if c.sock is not None:
            self.byfd.pop(c.sock.fileno(), None)
            try:
                self.ep.unregister(c.sock.fileno())
            except (OSError, ValueError):
                pass
            c.sock.close()
            c.sock = None
        if c.state == "up":
            self._count("conn_open", -1)

    def _down(self, c, why):
        was_up = c.state == "up"
        self._close_sock(c)
        if was_up:
            self.say(_logging.WARNING, "%s to %s:%s lost (%s); reconnecting", self._what(c),
                     self.server[0], self.server[1], why)
        elif why:
            self.say(_logging.INFO, "%s to %s:%s failed (%s); retry in %.2fs", self._what(c),
                     self.server[0], self.server[1], why, c.backoff)
        c.state, c.hs, c.rx = "down", None, bytearray()
        c.next_try = self.now + c.backoff
        c.backoff = min(c.backoff * 2, BACKOFF_MAX)
        if c.out:
            # out holds whole frames after the partly sent one: find where that one ends
            self._count("queue_drops")
            rest = bytes(c.out)
            c.out = bytearray()
            # frames in out were joined from whole frames; the first is the cut one
            pos = 0
            frames = []
            while pos < len(rest):
                try:
                    r = parse_frame(rest, pos, mux=self.mux)
                except FrameError:
                    r = None
                if r is None:
                    break
                frames.append(rest[pos:r[1]])
                pos = r[1]
            c.queue = frames[1:] + c.queue if frames else c.queue

    def _connect(self, c):
        """Start connecting c: True (connecting, or failed and retried after the backoff),
        False when the process is out of descriptors for a gost flow's connection (none
        left, or one within FD_RESERVE of the limit): the caller refuses the flow."""
        s = flow_socket(self.family, socket.SOCK_STREAM, self.fd_ceiling if self.gost else 1 << 31)
        if s is None:
            if self.gost:
                return False
            self._down(c, "out of descriptors")
            return True
        try:
            s.setblocking(False)
            if self.mark:
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            _sockopt.tcp_client(s, self.outbound, self.family == socket.AF_INET6)
            err = s.connect_ex(self.addr)
        except OSError as e:
            s.close()
            self._down(c, str(e))
            return True
        if err not in (0, _errno.EINPROGRESS):
            s.close()
            self._down(c, os.strerror(err))
            return True
        c.sock, c.state, c.deadline = s, "connecting", self.now + CONNECT_TIMEOUT
        self.byfd[s.fileno()] = c
        self.ep.register(s.fileno(), EPOLLIN | EPOLLOUT)
        return True

    def process(self):
        self.now = _time.monotonic()
        for fd, ev in self.ep.poll(0, 64):
            c = self.byfd.get(fd)
            if c is None or c.sock is None or c.sock.fileno() != fd:
                continue
            if c.state in ("connecting", "handshake"):
                self._handshake(c, ev)
                continue
            if ev & EPOLLOUT:
                self._write(c)
            if c.state == "up" and ev & ~EPOLLOUT:
                self._read(c)

    def _handshake(self, c, ev):
        if c.state == "connecting":
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err or ev & (_select.EPOLLERR | _select.EPOLLHUP):
                return self._down(c, os.strerror(err) if err else "connection failed")
            c.hs = ClientHandshake(cmd=CMD_UDP_TUN if self.gost else CMD_UDP_TUN_MUX,
                                   secret=self.secret, user=self.user, password=self.password)
            c.state = "handshake"
            self.ep.modify(c.sock.fileno(), EPOLLIN)
            try:
                c.sock.send(c.hs.start())
            except OSError as e:
                self._down(c, str(e))
            return
        try:
            data = c.sock.recv(4096)
            if not data:
                return self._down(c, "server closed the connection during the handshake")
            out = c.hs.feed(data)
            if out:
                c.sock.send(out)
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ValueError) as e:
            self._count("conn_rejected")
            if self.mux and getattr(e, "rep", None) == REP_CMD_UNSUPPORTED:
                if not self.rep7_logged:
                    self.rep7_logged = True
                    self.log.error(REP7_HINT, *self.server[:2])
                return self._down(c, None)
            return self._down(c, f"handshake: {e}")
        if not c.hs.done:
            return
        c.state, c.backoff = "up", BACKOFF_MIN
        self._count("conn_open")
        if c.ever_up:
            self._count("conn_reconnects")
            self.say(_logging.WARNING, "%s to %s:%s re-established", self._what(c),
                     *self.server[:2])
        c.ever_up = True
        c.rx = bytearray(c.hs.leftover)
        c.hs = None
        if c.rx:
            self._frames(c)
        if c.state == "up":
            self._write(c)

    def _read(self, c):
        try:
            data = c.sock.recv(self.rx_cap - len(c.rx))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self._down(c, str(e))
        if not data:
            return self._down(c, "server closed the connection")
        c.rx += data
        self._frames(c)

    def _frames(self, c):
        try:
            frames, used = parse_frames(c.rx, mux=self.mux)
        except FrameError as e:
            self._count("frames_bad")
            return self._down(c, f"bad frame from server: {e}")
        del c.rx[:used]
        for fr in frames:
            key = c.client if self.gost else self.by_id.get(fr.flow)
            fl = self.flows.get(key)
            if fl is None or fr.atyp == ATYP_DOMAIN:
                self._count("drop_no_route")
                continue
            fl[2] = self.now
            self.flows.move_to_end(key)
            self.expiry.touch(key, self.now)
            self.groups.count_in(fl[4], len(fr.data))
            self._deliver(fl[3], (fr.host, fr.port), fr.data)

    def tick(self, now=0):
        now = now or _time.monotonic()
        self.now = now
        for c in self._all_conns():
            if c.state == "down" and now >= c.next_try:
                if not self._connect(c):
                    self._end(c.client, "assoc_refused")    # a gost flow out of descriptors
            elif c.state in ("connecting", "handshake") and now > c.deadline:
                self._down(c, "timed out")
        # idle expiry from the least recently used end of each timeout class: O(expired)
        for key in self.expiry.expired(now):
            self._end(key, "assoc_expired")

    def close(self):
        for c in self._all_conns():
            self._close_sock(c)
            c.state = "down"
        super().close()
