"""tunnel-client's UDP side in pure Python (the compiled build runs the engine's loop)."""
import collections
import os
import socket
import time as _time

from relay.net import sockopt as _sockopt
from relay.datapath.pure.common import Poller, send_error_counter


class LocalAddresses:
    """client -> the local address it last sent to, as sendmsg ancillary data: for a
    UDP socket on a wildcard address whose replies come back without an association
    (through an upstream core). At most ``cap`` clients (the least recently used goes),
    forgotten after ``timeout`` seconds without traffic either way, like the engine's
    table (relay/datapath/engine.pyx ``locals``)."""

    def __init__(self, cap, timeout):
        self.cap, self.timeout = max(1, cap), timeout
        self.map = collections.OrderedDict()     # client -> [host, ancillary, last use]

    def __len__(self):
        return len(self.map)

    def note(self, client, host, now):
        e = self.map.get(client)
        if e is None:
            if len(self.map) >= self.cap:
                self.map.popitem(last=False)
            self.map[client] = [host, _sockopt.src_cmsg(host) if host else None, now]
            return
        self.map.move_to_end(client)
        if e[0] != host:
            e[0], e[1] = host, _sockopt.src_cmsg(host) if host else None
        e[2] = now

    def get(self, client, now):
        e = self.map.get(client)
        if e is None:
            return None
        self.map.move_to_end(client)
        e[2] = now
        return e[1]

    def expire(self, now):
        while self.map:
            client, e = next(iter(self.map.items()))
            if e[2] + self.timeout > now:
                return
            del self.map[client]


class UdpFrontend(Poller):
    """Pure fallback of the engine's forward loop with an upstream core (tunnel-client):
    a UDP socket in front of an upstream. On a socket with packet info (a wildcard
    address) each reply leaves from the address its client sent to."""

    def __init__(self, fd, to, upstream, batch=32, stats=None, log=None, max_flows=65536,
                 timeout=60.0):
        super().__init__(upstream.stats if stats is None else stats, log)
        self.sock = socket.socket(fileno=os.dup(fd))
        self.sock.setblocking(False)
        self.to, self.up, self.batch = tuple(to), upstream, batch
        self.locals = (LocalAddresses(max_flows, timeout) if _sockopt.pktinfo_enabled(self.sock)
                       else None)
        upstream.reply = self._reply
        self._add(self.sock.fileno(), "listen", 0)
        self._add(upstream.fileno(), "upstream", 0)

    @property
    def local_addresses(self):
        """Clients in the client -> local address table (a socket with packet info)."""
        return 0 if self.locals is None else len(self.locals)

    def _reply(self, client, src, data):
        local = None if self.locals is None else self.locals.get(client, _time.monotonic())
        try:
            if local:
                self.sock.sendmsg([data], local, 0, client)
            else:
                self.sock.sendto(data, client)
        except OSError as e:
            self._count(send_error_counter(e.errno))

    def on_event(self, kind, idx, ev):
        if kind == "upstream":
            self.up.process()
            return
        for _ in range(self.batch):
            try:
                if self.locals is None:
                    data, src = self.sock.recvfrom(65536)
                else:
                    data, anc, _flags, src = self.sock.recvmsg(65536, _sockopt.PKTINFO_ANCBUF)
                    self.locals.note(src[:2], _sockopt.local_of(anc), self.now)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            self.up.send(src[:2], self.to, data)
        self.up.flush()

    def tick(self, now=0):
        now = now or _time.monotonic()
        if self.locals is not None:
            self.locals.expire(now)
        self.up.tick(now)

    def close(self):
        self.sock.close()
        super().close()
