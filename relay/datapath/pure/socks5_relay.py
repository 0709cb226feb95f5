"""The SOCKS5 server's UDP relay in pure Python (twin of relay.datapath.tunnel.Socks5Relay)."""
import os
import socket
import time as _time

from relay.net import sockopt as _sockopt
from relay.proto import ATYP_DOMAIN, ATYP_IPV4, ATYP_IPV6, udp_header, udp_header_counted
from relay.resolver import Resolver
from relay.datapath.pure.common import Acl, Poller, unmap
from relay.datapath.timeouts import port_class_map, timeout_classes


OWN_PORTS = 8       # ports of the client's own host it sent to, remembered (bind_first)


class Socks5Relay(Poller):
    """Pure fallback of relay.datapath.tunnel.Socks5Relay (UDP ASSOCIATE data path)."""

    def __init__(self, acl_table=(), stats=None, *, max_assoc=1024, batch=32, log=None,
                 resolve=None, timeout=0, port_timeouts=(), outbound=None):
        super().__init__(stats, log)
        # datagrams to remotes: --source and --bind-interface in their packet info
        self.out_src = _sockopt.outbound_cmsgs(outbound, via_dev=True)
        self.acl = acl_table if isinstance(acl_table, Acl) else Acl(acl_table)
        self.max_assoc, self.batch, self.timeout = max_assoc, batch, timeout
        self.next_scan = 0.0
        self.ptimeouts, self.pmap = [timeout], None
        if timeout > 0:
            self.ptimeouts, ranges = timeout_classes(timeout, port_timeouts)
            self.pmap = port_class_map(ranges)
        # idx -> [sock, client, port_known, src cmsg, bind_first, last datagram,
        #         ports of its own host the client sent to (bind_first; OWN_PORTS kept),
        #         idle timeout (by its first datagram's destination port), classed]
        self.assocs = {}
        self._idx = 0
        self.init_dns(resolve)

    @property
    def associations(self):
        return len(self.assocs)

    def add(self, fd, client, local=None):
        src = None if local is None else _sockopt.src_cmsg(local[0])
        if len(self.assocs) >= self.max_assoc:
            return -1
        self._idx += 1
        sock = socket.socket(fileno=os.dup(fd))
        sock.setblocking(False)
        self.assocs[self._idx] = [sock, tuple(client[:2]), client[1] != 0, src, client[1] == 0,
                                  _time.monotonic(), [], self.timeout, False]
        self._add(sock.fileno(), "udp", self._idx)
        self._count("assoc_created")
        self._count("assoc_open")
        return self._idx

    def remove(self, idx):
        a = self.assocs.pop(idx, None)
        if a is not None:
            self._del(a[0].fileno())
            a[0].close()
            self._count("assoc_open", -1)

    def tick(self, now=0):
        """Give up lookups that take too long, close idle associations (timeout): returns
        the slots closed, for the caller to end their control connections."""
        self.now = now or _time.monotonic()
        self._dns_ready(self.dns.expire(self.now))
        if self.timeout <= 0 or self.now < self.next_scan:
            return []
        self.next_scan = self.now + min(1.0, min(self.ptimeouts) / 2)
        out = [idx for idx, a in self.assocs.items() if self.now - a[5] > a[7]]
        for idx in out:
            self.remove(idx)
            self._count("assoc_expired")
        return out

    def on_event(self, kind, idx, ev):
        a = self.assocs.get(idx)
        if a is None:
            return
        sock = a[0]
        for _ in range(self.batch):
            try:
                data, src = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            src = tuple(src[:2])
            if src[0] == a[1][0] and (not a[2] or src == a[1]):
                if not a[2]:
                    a[1], a[2] = src, True
                a[5] = self.now
                h = udp_header_counted(data, self._count)
                if h is None:
                    continue
                atyp, host, port, hl = h
                if atyp == ATYP_DOMAIN:
                    dst = self._name_dst(idx, host.encode("latin-1"), port, data[hl:],
                                         sock.family)
                    if dst is None:
                        continue
                    host = dst[0]
                elif atyp == ATYP_IPV6 and sock.family == socket.AF_INET:
                    self._count("drop_no_route")
                    continue
                elif atyp == ATYP_IPV4 and sock.family == socket.AF_INET6:
                    host = "::ffff:" + host
                self._send_up(sock, host, port, data[hl:], a)
            else:
                if not a[2]:
                    self._count("drop_no_route")
                    continue
                if a[4] and src[0] == a[1][0] and src[1] not in a[6]:
                    self._count("drop_foreign_port")     # another port of the client's host
                    continue
                a[5] = self.now
                self._sent("down", udp_header(*unmap(src)) + data, sock, a[1], len(data),
                           a[3])

    def _send_up(self, sock, host, port, data, a=None):
        if not self.acl.allowed(host):
            self._count("drop_denied")
            return
        if a is not None and a[4] and host == a[1][0] and port not in a[6]:
            a[6] = (a[6] + [port])[-OWN_PORTS:]
        if a is not None and not a[8]:
            a[8] = True
            if self.pmap is not None:
                a[7] = self.ptimeouts[self.pmap[port]]
        self._sent("up", data, sock, (host, port), src=_sockopt.cmsg_for(self.out_src, host))

    def _dns_send(self, idx, e, port, data):
        a = self.assocs.get(idx)
        picked = None if a is None else Resolver.pick(e, a[0].family)
        if picked is None:              # association gone, or no address of its family
            self._count("drop_no_route")
            return
        self._send_up(a[0], picked[0], port, data)

    def close(self):
        for idx in list(self.assocs):
            self.remove(idx)
        super().close()
