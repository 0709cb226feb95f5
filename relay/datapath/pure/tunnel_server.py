"""The tunnel server's data path in pure Python (twin of relay.datapath.tunnel.TunnelServer).

The flows, like the C table's, are in least-recently-used order twice: all of them
(``lru``) and each connection's (``_SConn.flows``). A full table evicts: a connection
holding its share (max_flows / connections) or more gives up its own oldest flow, any other
the table's oldest. Idle flows expire from the old end; a flow socket numbered within
FD_RESERVE of the descriptor limit is closed and its flow refused."""
import socket
import time as _time
from collections import OrderedDict

from relay.proto import (
    ATYP_DOMAIN, ATYP_IPV4, FrameError, encode_frame, parse_frame, parse_frames,
)
from relay.net import sockopt as _sockopt
from relay.resolver import Resolver
from relay.datapath.pure.common import Acl, EPOLLIN, EPOLLOUT, Poller, RX_CAP, SO_MARK, unmap
from relay.config import FD_RESERVE
from relay.datapath.timeouts import ExpiryLists
from relay.privileges import fd_soft_limit


class _SConn:
    __slots__ = ("sock", "mux", "rx", "tx", "want_out", "stall_since", "flows", "slot")


class _SFlow:
    __slots__ = ("sock", "conn", "id", "last", "last_dst", "acl_version")


class TunnelServer(Poller):
    """Pure fallback of relay.datapath.tunnel.TunnelServer."""

    def __init__(self, acl_table=(), stats=None, *, max_conns=1024, max_flows=4096,
                 timeout=60.0, tx_limit=1 << 20, batch=32, mark=None, stall_timeout=5.0,
                 log=None, resolve=None, port_timeouts=(), outbound=None):
        if not 1 <= batch <= 256:
            raise ValueError(f"batch must be 1-256, got {batch}")
        super().__init__(stats, log)
        self.acl = acl_table if isinstance(acl_table, Acl) else Acl(acl_table)
        self.max_conns, self.max_flows, self.batch = max_conns, max_flows, batch
        self.timeout, self.tx_limit, self.stall_timeout = timeout, tx_limit, stall_timeout
        self.mark = mark
        # flow sockets send to both families: the device on each, a source per datagram
        self.out_dev = _sockopt.Outbound(outbound.device) if outbound else None
        self.out_src = _sockopt.outbound_cmsgs(outbound)
        self.conns = {}
        self.flows = {}             # flow fd -> _SFlow
        self.lru = OrderedDict()    # every _SFlow, least recently used first
        self.expiry = ExpiryLists(timeout, port_timeouts)   # per destination port
        self.nfd = fd_soft_limit()
        self.next_tick = 0.0
        self._slot = 0
        self.init_dns(resolve)

    @property
    def connections(self):
        return len(self.conns)

    @property
    def flows_open(self):
        return len(self.flows)

    def add_conn(self, fd, mux, leftover=b""):
        if len(self.conns) >= self.max_conns:
            return -1
        c = _SConn()
        c.sock = socket.socket(fileno=fd)
        c.sock.setblocking(False)
        c.mux, c.rx, c.tx = mux, bytearray(leftover), bytearray()
        c.want_out, c.stall_since = False, 0.0
        c.flows = OrderedDict()     # flow id -> _SFlow, least recently used first
        self._slot += 1
        c.slot = self._slot
        self.conns[c.slot] = c
        self._add(fd, "conn", c.slot)
        if c.rx:
            self._frames(c)
        return c.slot

    def close_all(self):
        for c in list(self.conns.values()):
            self._close(c, None, None)

    def _close(self, c, why, counter):
        if self.conns.pop(c.slot, None) is None:
            return
        for f in list(c.flows.values()):
            self._release(f, None)
        self._del(c.sock.fileno())
        c.sock.close()
        self._count("conn_open", -1)
        if counter:
            self._count(counter)
        if why:
            self.log.warning("tunnel connection closed: %s", why)

    def _release(self, f, counter):
        c = f.conn
        c.flows.pop(f.id, None)
        self.lru.pop(f, None)
        self.expiry.remove(f)
        self.flows.pop(f.sock.fileno(), None)
        self._del(f.sock.fileno())
        f.sock.close()
        f.sock = None
        self._count("assoc_open", -1)
        if counter:
            self._count(counter)

    def _flow(self, c, fid, dport):
        f = c.flows.get(fid)
        if f is not None:
            return f
        if len(self.flows) >= self.max_flows:
            own = len(c.flows) >= self.max_flows // len(self.conns) and c.flows
            self._release(next(iter(c.flows.values() if own else self.lru)), "assoc_evicted")
        try:
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if self.mark:
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            _sockopt.bind_outbound(s, self.out_dev, True)
            s.setblocking(False)
        except OSError:
            self._count("assoc_refused")
            return None
        if s.fileno() >= self.nfd - FD_RESERVE:
            s.close()
            self._count("assoc_refused")
            return None
        f = _SFlow()
        f.sock, f.conn, f.id, f.last, f.last_dst, f.acl_version = s, c, fid, self.now, None, 0
        c.flows[fid] = f
        self.lru[f] = None
        self.expiry.add(f, dport, self.now)
        self.flows[s.fileno()] = f
        self._add(s.fileno(), "flow", s.fileno())
        self._count("assoc_created")
        self._count("assoc_open")
        return f

    def on_event(self, kind, idx, ev):
        if kind == "conn":
            c = self.conns.get(idx)
            if c is None:
                return
            if ev & EPOLLOUT:
                self._write(c)
                if c.slot not in self.conns:
                    return
            if ev & ~EPOLLOUT:
                self._read(c)
        else:
            f = self.flows.get(idx)
            if f is not None:
                self._flow_read(f)

    def _read(self, c):
        try:
            data = c.sock.recv(RX_CAP - len(c.rx))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if c.rx:
                self._close(c, f"truncated frame: stream ended with {len(c.rx)} bytes of an "
                               f"incomplete frame", "frames_bad")
            else:
                self._close(c, None, None)
            return
        c.rx += data
        self._frames(c)

    def _frames(self, c):
        try:
            frames, used = parse_frames(c.rx, mux=c.mux)
        except FrameError as e:
            frames, used, err = None, 0, e
        else:
            err = None
        if frames is None:
            # deliver what precedes the bad frame, like the C loop, then close
            good = []
            pos = 0
            while True:
                try:
                    r = parse_frame(c.rx, pos, mux=c.mux)
                except FrameError:
                    break
                if r is None:
                    break
                good.append(r[0])
                pos = r[1]
            self._send_frames(c, good)
            self._close(c, f"bad frame: {err}", "frames_bad")
            return
        del c.rx[:used]
        self._send_frames(c, frames)

    def _send_frames(self, c, frames):
        for fr in frames:
            f = self._flow(c, fr.flow if c.mux else 0, fr.port)
            if f is None:
                continue
            self._touch(f)
            if fr.atyp == ATYP_DOMAIN:
                dst = self._name_dst(f, fr.host.encode("latin-1"), fr.port, fr.data,
                                     socket.AF_INET6)
                if dst is None:
                    continue
            else:
                dst = ("::ffff:" + fr.host if fr.atyp == ATYP_IPV4 else fr.host, fr.port)
            self._send_up(f, dst, fr.data)

    def _touch(self, f):
        """Flow f was used now: last in both LRU orders."""
        f.last = self.now
        self.lru.move_to_end(f)
        self.expiry.touch(f, self.now)
        f.conn.flows.move_to_end(f.id)

    def _send_up(self, f, dst, data):
        if dst != f.last_dst or f.acl_version != self.acl.version:
            if not self.acl.allowed(dst[0]):
                self._count("drop_denied")
                return
            f.last_dst, f.acl_version = dst, self.acl.version
        self._sent("up", data, f.sock, dst, src=_sockopt.cmsg_for(self.out_src, dst[0]))

    def _dns_send(self, f, e, port, data):
        if f.sock is None:              # the flow ended while its name was resolved
            self._count("drop_no_route")
            return
        self._send_up(f, (Resolver.pick(e, socket.AF_INET6)[0], port), data)

    def _flow_read(self, f):
        c = f.conn
        got = False
        for _ in range(self.batch):
            try:
                data, src = f.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            got = True
            if not data and not c.mux:
                self._count("drop_malformed")
                continue
            frame = encode_frame(*unmap(src), data, flow=f.id if c.mux else None)
            if self.tx_limit - len(c.tx) < len(frame):
                self._count("drop_buffer_full")
                if not c.stall_since:
                    c.stall_since = self.now
                continue
            c.tx += frame
            self._count("down_datagrams")
            self._count("down_bytes", len(data))
        if got:
            self._touch(f)
            if not c.want_out:
                self._write(c)

    def _write(self, c):
        if c.tx:
            try:
                n = c.sock.send(c.tx)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                return self._close(c, None, None)
            if n:
                del c.tx[:n]
                c.stall_since = 0.0
        want = bool(c.tx)
        if want != c.want_out:
            c.want_out = want
            self.ep.modify(c.sock.fileno(), EPOLLIN | (EPOLLOUT if want else 0))

    def tick(self, now=0):
        now = now or _time.monotonic()
        self.now = now
        if now < self.next_tick:
            return
        self.next_tick = now + 0.5
        for f in self.expiry.expired(now):
            self._release(f, "assoc_expired")
        self._dns_ready(self.dns.expire(now))
        for c in [c for c in self.conns.values()
                  if c.stall_since and now - c.stall_since > self.stall_timeout]:
            self._close(c, f"peer has not read for {self.stall_timeout:g}s with its send "
                           f"buffer full", "conn_rejected")
