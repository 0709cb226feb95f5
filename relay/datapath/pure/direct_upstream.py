"""Direct UDP as one of several upstreams, in pure Python (twin of
relay.datapath.tunnel.DirectUpstream, relay/datapath/direct_upstream.pxi)."""
import collections
import select as _select
import socket
import time as _time

from relay.datapath.pure.common import SO_MARK, canonical, fd_ceiling, send_error_counter, unmap
from relay.datapath.pure.tunnel_upstream import UpstreamBase
from relay.datapath.timeouts import ExpiryLists
from relay.net import sockopt as _sockopt
from relay.net.sockopt import flow_socket
from relay.proto import MAX_PAYLOAD


class DirectUpstream(UpstreamBase):
    """One UDP socket per client flow (dual stack where the host has IPv6), each datagram
    sent to its destination, every reply handed back to the flow's client with its source.
    At most ``max_flows`` flows, least recently used evicted (assoc_evicted), idle ones
    expired, one within FD_RESERVE of the descriptor limit refused (assoc_refused)."""

    def __init__(self, family=None, mark=None, stats=None, timeout=60.0, max_flows=4096,
                 batch=32, log=None, port_timeouts=(), client_groups=(), outbound=None):
        if not 1 <= max_flows <= 65536:
            raise ValueError(f"max_flows must be 1-65536, got {max_flows}")
        super().__init__(stats, log, client_groups)
        self.outbound = outbound
        self.family = family if family is not None else (
            socket.AF_INET6 if _sockopt.ipv6_available() else socket.AF_INET)
        self.mark, self.timeout, self.max_flows, self.batch = mark, timeout, max_flows, batch
        self.flows = collections.OrderedDict()      # key -> [sock, client, last, FlowStat], LRU first
        self.expiry = ExpiryLists(timeout, port_timeouts)
        self.byfd = {}
        self.fd_ceiling = fd_ceiling()

    @property
    def flows_open(self):
        return len(self.flows)

    def _flow_items(self):
        return ((key, fl[2], fl[3]) for key, fl in self.flows.items())

    connected = 0

    def _close(self, key, counter):
        sock = self.flows.pop(key)[0]
        self.expiry.remove(key)
        self.byfd.pop(sock.fileno(), None)
        sock.close()
        self._count("assoc_open", -1)
        if counter:
            self._count(counter)

    def forget(self, client):
        """End the flow of client (it moved to another upstream), counted nowhere."""
        if canonical(client) in self.flows:
            self._close(canonical(client), None)

    def _open(self, key, client, port, v6_dest):
        if len(self.flows) >= self.max_flows:
            self._close(next(iter(self.flows)), "assoc_evicted")
        sock = flow_socket(self.family, socket.SOCK_DGRAM, self.fd_ceiling)
        if sock is None:
            self._count("assoc_refused")
            return None
        sock.setblocking(False)
        if self.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if self.mark:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
        try:        # its source: of the first destination's family
            _sockopt.bind_outbound(sock, self.outbound, v6_dest)
        except OSError:
            sock.close()
            self._count("drop_no_route")
            return None
        fl = self.flows[key] = [sock, client, self.now, self.groups.new(self.now, key)]
        self.byfd[sock.fileno()] = key
        self.ep.register(sock.fileno(), _select.EPOLLIN)
        self.expiry.add(key, port, self.now)
        self._count("assoc_created")
        self._count("assoc_open")
        return fl

    def send(self, client, dst, data):
        data = bytes(data)
        host = unmap(tuple(dst[:2]))[0]
        if ":" in host and self.family != socket.AF_INET6:
            self._count("drop_no_route")                # an IPv6 destination, no IPv6 here
            return
        if self.family == socket.AF_INET6 and ":" not in host:
            host = "::ffff:" + host
        key = canonical(client)
        fl = self.flows.get(key)
        if fl is None:
            fl = self._open(key, tuple(client[:2]), dst[1], ":" in unmap(tuple(dst[:2]))[0])
            if fl is None:
                return
        self.flows.move_to_end(key)
        self.expiry.touch(key, self.now)
        fl[2] = self.now
        self.groups.count_out(fl[3], unmap(tuple(dst[:2])), len(data))
        try:
            fl[0].sendto(data, (host, dst[1]))
        except OSError as e:
            self._count(send_error_counter(e.errno))
            return
        self._count("up_datagrams")
        self._count("up_bytes", len(data))

    def flush(self):
        pass

    def process(self):
        for fd, _ev in self.ep.poll(0, 64):
            key = self.byfd.get(fd)
            if key is None:
                continue
            fl = self.flows[key]
            sock, client = fl[0], fl[1]
            for _ in range(self.batch):
                try:
                    data, src = sock.recvfrom(65536)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    continue
                self.flows.move_to_end(key)
                self.expiry.touch(key, self.now)
                if len(data) > MAX_PAYLOAD:
                    self._count("drop_too_big")
                    continue
                fl[2] = self.now
                self.groups.count_in(fl[3], len(data))
                self._deliver(client, unmap(tuple(src[:2])), data)

    def tick(self, now=0):
        self.now = now or _time.monotonic()
        for key in self.expiry.expired(self.now):
            self._close(key, "assoc_expired")

    def close(self):
        for key in list(self.flows):
            self._close(key, None)
        super().close()
