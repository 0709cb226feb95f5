"""`relay tun`'s data path in pure Python: UDP datagrams read from a TUN queue, relayed to
their IP destination, replies written back into the TUN as packets from each remote.

TUN queue ──read──► classify (tun_stack) ──► fragments: Reassembler ──┐
                                          └─► whole UDP ───────────────┴─► association
     (client address+port -> one upstream socket, full cone; or an upstream core)
upstream sockets ──recvfrom──► replies ──► IPv4/IPv6+UDP packets (relay.packet), fragments
                                           above the MTU; with the virtio-net header, runs
                                           of equal replies as one segmentation-offload write
errors queued on upstream sockets (IP_RECVERR) ──► ICMP/ICMPv6 errors into the TUN

TunRelay(tun_fd, *, vnet=False, mtu=1500, mark=0, timeout=60.0, port_timeouts=(),
         max_associations=65536, batch=64, stats=None, log=None, core=None,
         upstream_family=AF_INET6, frag_memory=FRAG_MEMORY, frag_timeout=FRAG_TIMEOUT)
"""
import collections
import errno as _errno
import os
import select as _select
import socket
import struct
import time as _time

from relay import packet as _packet
from relay.datapath.pure import tun_stack as _stack
from relay.datapath.pure.common import Poller, fd_ceiling, send_error_counter
from relay.datapath.pure.flows import Groups, client_rows, flow_rows
from relay.datapath.timeouts import ExpiryLists
from relay.net import sockopt as _sockopt
from relay.net import tundev as _dev

EPOLLIN, EPOLLERR = _select.EPOLLIN, _select.EPOLLERR
READ_MAX = _dev.VNET_HDR_LEN + 65575        # a GSO run or the largest IPv6 packet
RUN_SEGMENTS = 64                           # replies in one offload write at most
RUN_BYTES = 65535 - 48                      # payload bytes of one offload write at most
ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6 = 2, 3
EE = struct.Struct("=IBBBBII")              # struct sock_extended_err
# ICMP errors passed on to the client: (family v6, type) -> codes kept
ICMP_PASSED = {(False, 3): range(0, 16), (False, 11): range(0, 2),
               (True, 1): range(0, 7), (True, 3): range(0, 2)}
PLAIN_HDR = bytes(_dev.VNET_HDR_LEN)        # a virtio-net header: whole packet, checksum done


def _ntop(v6, b):
    return socket.inet_ntop(socket.AF_INET6 if v6 else socket.AF_INET, b)


def run_header(v6, src, dst, sport, dport, payload_len, ident, ttl=64):
    """IP + UDP header of an offload write carrying payload_len bytes of segments: the UDP
    checksum field holds the pseudo-header sum (VNET_F_NEEDS_CSUM), lengths the whole run's."""
    ulen = 8 + payload_len
    if v6:
        ip = struct.pack("!IHBB16s16s", 6 << 28, ulen, 17, ttl, src, dst)
        pseudo = src + dst + struct.pack("!II", ulen, 17)
    else:
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + ulen, ident, 0, ttl, 17, 0,
                                   src, dst))
        ip[10:12] = _packet.inet_checksum(ip).to_bytes(2, "big")
        ip = bytes(ip)
        pseudo = src + dst + struct.pack("!HH", 17, ulen)
    folded = ~_packet.inet_checksum(pseudo) & 0xFFFF     # the sum, not its complement
    return ip + struct.pack("!HHHH", sport, dport, ulen, folded)


class _Assoc:
    __slots__ = ("sock", "client", "v6", "last", "stat")


class TunRelay(Poller):
    """The TUN data path of one worker (pure twin of relay.datapath.tun.TunRelay, which
    shares tun_stack's Reassembler)."""

    def __init__(self, tun_fd, *, vnet=False, mtu=1500, mark=0, timeout=60.0, port_timeouts=(),
                 max_associations=65536, batch=64, stats=None, log=None, core=None,
                 upstream_family=socket.AF_INET6, frag_memory=_stack.FRAG_MEMORY,
                 frag_timeout=_stack.FRAG_TIMEOUT, client_groups=(), outbound=None):
        _stack.check_relay_args(batch, max_associations, timeout, mtu)
        super().__init__(core.stats if (stats is None and core is not None) else stats, log)
        self.fd, self.vnet, self.mtu, self.mark = tun_fd, bool(vnet), mtu, mark
        self.groups = Groups(client_groups, self._stats)
        self.outbound = outbound
        self.batch, self.cap, self.core = batch, max_associations, core
        self.up_family = upstream_family
        self.assoc = collections.OrderedDict()      # client (host, port) -> _Assoc, LRU first
        self.expiry = ExpiryLists(timeout, port_timeouts)
        self.frags = _stack.Reassembler(self._count, memory=frag_memory, timeout=frag_timeout)
        self.ceiling = fd_ceiling()
        self.ident = int.from_bytes(os.urandom(2), "big")
        self.out = []               # replies to write: (v6, src host, sport, client, data)
        self.replies = []           # a core's replies: (client, src, data)
        self.next_sweep = _time.monotonic() + 1.0
        self.closed = False
        self._add(tun_fd, "tun", 0)
        if core is not None:
            core.collect_replies(self.replies)
            self._add(core.fileno(), "core", 0)
        else:
            self._upstream_socket().close()     # a missing privilege shows at start

    # -- Python API --------------------------------------------------------------------
    @property
    def associations(self):
        return len(self.assoc)

    @property
    def reassembling(self):
        return len(self.frags)

    @property
    def flows_open(self):
        return self.core.flows_open if self.core is not None else len(self.assoc)

    def snapshot(self, n, sort, by_client=False, clients_cap=4096):
        """relay flows rows (relay/datapath/flows.pxd table_rows / table_clients)."""
        if self.core is not None:
            return self.core.snapshot(n, sort, by_client, clients_cap)
        now = _time.monotonic()
        items = [(key, a.last, a.stat) for key, a in self.assoc.items()]
        if by_client:
            return client_rows(items, sort, n, clients_cap, now)
        return flow_rows(items, sort, n, now)

    def counters(self):
        from relay.stats import COUNTERS
        return {name: self._stats[i] for i, name in enumerate(COUNTERS)}

    def run(self, max_ms=200):
        if self.closed:
            raise ValueError("tun relay is closed")
        self.poll(max_ms)
        self._flush()
        if self.now >= self.next_sweep:
            self.tick(self.now)

    def tick(self, now=0):
        now = now or _time.monotonic()
        self.next_sweep = now + 1.0
        self.frags.expire(now)
        if self.core is not None:
            self.core.tick(now)
            self._core_replies()
            self._flush()
            return
        for key in self.expiry.expired(now):
            self._close(key, "assoc_expired")

    def close(self):
        if self.closed:
            return
        self.closed = True
        self._flush()
        for key in list(self.assoc):
            self._close(key, None)
        if self.core is not None:
            self.core.reply = None
        super().close()

    # -- events ------------------------------------------------------------------------
    def on_event(self, kind, idx, ev):
        if kind == "tun":
            self._on_tun()
        elif kind == "assoc":
            a = self.assoc.get(idx)
            if a is not None:
                if ev & EPOLLERR:
                    self._errqueue(a)
                self._on_upstream(a)
        elif kind == "core":
            self.core.process()
            self._core_replies()

    def _on_tun(self):
        for _ in range(self.batch):
            try:
                pkt = os.read(self.fd, READ_MAX)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self._count("drop_malformed")
                continue
            if self.vnet:
                self._on_vnet(pkt)
            else:
                self._on_packet(memoryview(pkt), False)
        if self.core is not None:
            self.core.flush()

    def _on_vnet(self, pkt):
        if len(pkt) < _dev.VNET_HDR_LEN:
            self._count("drop_malformed")
            return
        flags, gso, hdr_len, gso_size, cstart, _ = _dev.VNET.unpack_from(pkt)
        body = memoryview(pkt)[_dev.VNET_HDR_LEN:]
        valid = bool(flags & (_dev.VNET_F_NEEDS_CSUM | _dev.VNET_F_DATA_VALID))
        gso &= ~_dev.GSO_ECN
        if gso == _dev.GSO_NONE:
            self._on_packet(body, valid)
            return
        if gso != _dev.GSO_UDP_L4:
            self._count("drop_not_udp")             # TCP segmentation runs
            return
        self._on_run(body, gso_size)

    def _on_run(self, body, seg):
        """A run of datagrams the kernel handed over as one packet (UDP_L4 offload): one
        IP header and one UDP header, then segments of seg payload bytes (the last shorter)."""
        try:
            c = _stack.classify(body, True)
        except _stack.BadPacket:
            self._count("drop_malformed")
            return
        if c[0] != _stack.UDP or seg == 0 or len(c[4]) < 8:
            self._count("drop_malformed")
            return
        _, v6, src, dst, l4 = c
        self._count("tun_runs_in")
        sport, dport = (l4[0] << 8) | l4[1], (l4[2] << 8) | l4[3]
        data = l4[8:]
        for off in range(0, max(len(data), 1), seg):
            self._up(v6, src, dst, sport, dport, data[off:off + seg])

    def _on_packet(self, p, valid):
        try:
            c = _stack.classify(p, valid)
            if c[0] == _stack.OTHER:
                self._count("drop_not_udp")
                return
            if c[0] == _stack.FRAG:
                _, v6, src, dst, key, off, more, data = c
                l4 = self.frags.add(key, off, more, data, self.now)
                if l4 is None:
                    return
                valid = False
            else:
                _, v6, src, dst, l4 = c
            _stack.udp_check(v6, src, dst, l4, valid)
        except _stack.BadPacket:
            self._count("drop_malformed")
            return
        self._up(v6, src, dst, (l4[0] << 8) | l4[1], (l4[2] << 8) | l4[3], l4[8:])

    # -- client -> upstream ------------------------------------------------------------
    def _up(self, v6, src, dst, sport, dport, payload):
        client = (_ntop(v6, src), sport)
        dhost = _ntop(v6, dst)
        if self.core is not None:
            self.core.send(client, (dhost, dport), payload)
            return
        a = self.assoc.get(client)
        if a is None:
            a = self._open(client, v6, dport)
            if a is None:
                return
        else:
            self.assoc.move_to_end(client)
            self.expiry.touch(client, self.now)
        a.last = self.now
        self.groups.count_out(a.stat, (dhost, dport), len(payload))
        if not v6 and a.sock.family == socket.AF_INET6:
            dhost = "::ffff:" + dhost
        self._sent("up", payload, a.sock, (dhost, dport))

    def _upstream_socket(self, v6=True):
        fam = self.up_family if v6 or self.up_family == socket.AF_INET else socket.AF_INET6
        s = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                s.setsockopt(socket.IPPROTO_IPV6, _sockopt.IPV6_RECVERR, 1)
            s.setsockopt(socket.IPPROTO_IP, _sockopt.IP_RECVERR, 1)
            _sockopt.set_mark(s, self.mark)
            _sockopt.bind_outbound(s, self.outbound, v6)
            s.setblocking(False)
            return s
        except BaseException:
            s.close()
            raise

    def _open(self, client, v6, dport):
        if v6 and self.up_family != socket.AF_INET6:
            self._count("drop_no_route")
            return None
        if len(self.assoc) >= self.cap:
            self._close(next(iter(self.assoc)), "assoc_evicted")
        try:
            s = self._upstream_socket(v6)
        except OSError as e:
            self._count("assoc_refused" if e.errno in _sockopt.OUT_OF_FDS else
                        send_error_counter(e.errno))
            self._count("drop_table_full")
            return None
        if s.fileno() >= self.ceiling:
            s.close()
            self._count("assoc_refused")
            self._count("drop_table_full")
            return None
        a = _Assoc()
        a.sock, a.client, a.v6, a.last = s, client, v6, self.now
        a.stat = self.groups.new(self.now, client)
        self.assoc[client] = a
        self.expiry.add(client, dport, self.now)
        self._add(s.fileno(), "assoc", client)
        self._count("assoc_created")
        self._count("assoc_open")
        return a

    def _close(self, key, counter):
        a = self.assoc.pop(key)
        self.expiry.remove(key)
        self._del(a.sock.fileno())
        a.sock.close()
        self._count("assoc_open", -1)
        if counter:
            self._count(counter)

    # -- upstream -> client ------------------------------------------------------------
    def _on_upstream(self, a):
        for _ in range(self.batch):
            try:
                data, addr = a.sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue            # an ICMP error reported once more (IP_RECVERR queue)
            host = addr[0]
            if not a.v6:
                if not host.startswith("::ffff:") and ":" in host:
                    self._count("drop_no_route")
                    continue
                host = host[7:] if host.startswith("::ffff:") else host
            self.out.append((a.v6, host, addr[1], a.client, data))
            self.assoc.move_to_end(a.client)
            self.expiry.touch(a.client, self.now)
            a.last = self.now
            self.groups.count_in(a.stat, len(data))
            self._count("down_datagrams")
            self._count("down_bytes", len(data))

    def _core_replies(self):
        out = self.replies
        if not out:
            return
        for client, src, data in out:
            v6 = ":" in client[0]
            host = src[0]
            if host.startswith("::ffff:") and not v6:
                host = host[7:]
            elif v6 and ":" not in host:
                host = "::ffff:" + host
            elif not v6 and ":" in host:
                self._count("drop_no_route")
                continue
            self.out.append((v6, host, src[1], tuple(client[:2]), data))
        del out[:]

    def _errqueue(self, a):
        for _ in range(self.batch):
            try:
                data, anc, _flags, dst = a.sock.recvmsg(65535, 512, ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            for level, typ, cdata in anc:
                if len(cdata) < EE.size:
                    continue
                _e, origin, itype, code, _p, _info, _d = EE.unpack_from(cdata)
                if origin not in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6):
                    continue
                self._count("icmp_errors")
                v6 = origin == SO_EE_ORIGIN_ICMP6
                if v6 != a.v6 or code not in ICMP_PASSED.get((v6, itype), ()):
                    continue
                host = dst[0][7:] if dst[0].startswith("::ffff:") else dst[0]
                self._icmp(a.client, (host, dst[1]), data, v6, itype, code)

    def _icmp(self, client, dst, data, v6, itype, code):
        """Write into the TUN the ICMP error (type, code) answering client -> dst."""
        try:
            err = bytearray(_packet.build_icmp_unreachable(client, dst, data))
        except (ValueError, OSError):
            return
        at = 40 if v6 else 20
        old = (err[at] << 8) | err[at + 1]
        new = (itype << 8) | code
        if old != new:
            csum = _packet.checksum_update((err[at + 2] << 8) | err[at + 3], old, new)
            err[at], err[at + 1] = itype, code
            err[at + 2:at + 4] = csum.to_bytes(2, "big")
        if self._write(bytes(err)):
            self._count("tun_icmp_sent")

    # -- writing into the TUN ----------------------------------------------------------
    def _write(self, pkt):
        try:
            if self.vnet:
                os.writev(self.fd, (PLAIN_HDR, pkt))
            else:
                os.write(self.fd, pkt)
            return True
        except OSError as e:
            self._count(send_error_counter(e.errno))
            return False

    def _next_ident(self):
        self.ident = (self.ident + 1) & 0xFFFF
        return self.ident

    def _flush(self):
        out = self.out
        if not out:
            return
        self.out = []
        i, n = 0, len(out)
        while i < n:
            v6, host, sport, client, data = out[i]
            size = len(data)
            j = i + 1
            if self.vnet and 0 < size <= self.mtu - (48 if v6 else 28):
                total = size
                while (j < n and j - i < RUN_SEGMENTS and out[j][1] == host and out[j][2] == sport
                       and out[j][3] == client and 0 < len(out[j][4]) <= size
                       and total + len(out[j][4]) <= RUN_BYTES):
                    total += len(out[j][4])
                    j += 1
                    if len(out[j - 1][4]) < size:
                        break
            if j - i > 1:
                self._write_run(out[i:j], size, total)
            else:
                self._write_one(v6, host, sport, client, data)
            i = j

    def _write_one(self, v6, host, sport, client, data):
        src = (host, sport)
        try:
            if (48 if v6 else 28) + len(data) <= self.mtu:
                pkts = (_packet.build_udp(src, client, data, df=False, ident=self._next_ident()),)
            else:
                pkts = _packet.build_udp_fragments(src, client, data, self.mtu,
                                                   ident=self._next_ident())
        except ValueError:
            self._count("drop_too_big")
            self._undo(1, len(data))
            return
        for p in pkts:
            if not self._write(p):
                self._undo(1, len(data))
                return
        if len(pkts) > 1:
            self._count("reply_fragmented")

    def _write_run(self, run, seg, total):
        v6, host, sport, client, _ = run[0]
        fam = socket.AF_INET6 if v6 else socket.AF_INET
        hdr = run_header(v6, socket.inet_pton(fam, host), socket.inet_pton(fam, client[0]),
                         sport, client[1], total, self._next_ident())
        iph = 40 if v6 else 20
        vh = _dev.VNET.pack(_dev.VNET_F_NEEDS_CSUM, _dev.GSO_UDP_L4, iph + 8, seg, iph, 6)
        try:
            os.writev(self.fd, [vh, hdr] + [r[4] for r in run])
        except OSError as e:
            self._count(send_error_counter(e.errno))
            self._undo(len(run), total)
            return
        self._count("tun_runs_out")

    def _undo(self, n, nbytes):
        if self.core is None:
            self._count("down_datagrams", -n)
            self._count("down_bytes", -nbytes)
