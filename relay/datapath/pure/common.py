"""What the pure-Python data path shares: counters, address helpers, the access list
and the epoll poller."""
import errno as _errno
import ipaddress
import logging as _logging
import select as _select
import time as _time

from relay import stats as _stats
from relay.config import FD_RESERVE
from relay.privileges import fd_soft_limit
from relay.net import sockopt as _sockopt
from relay.net.ifaddr import key as host_key
from relay.proto import ALLOW
from relay.resolver import Resolver



C = _stats.INDEX
TUNNEL_LOG = _logging.getLogger("relay.tunnel")
RX_CAP = 135168
SO_MARK = _sockopt.SO_MARK
EPOLLIN, EPOLLOUT = _select.EPOLLIN, _select.EPOLLOUT
BACKOFF_MIN, BACKOFF_MAX, CONNECT_TIMEOUT = 0.05, 2.0, 5.0
# SOCKS5 upstream (both twins): handshakes at once towards one server (a server limits the
# handshakes of one address: relay socks5 to 16), the other new flows wait their turn; and
# the bytes all not-yet-associated flows may queue together (each at most 64 KiB).
SOCKS5_HANDSHAKES = 8
SOCKS5_QUEUED = 4 << 20


def fd_ceiling():
    """Descriptors at or above this lie within FD_RESERVE of the soft limit: a flow socket
    there is refused (the C side: relay/datapath/limits.pxd fd_ceiling)."""
    return fd_soft_limit() - FD_RESERVE


def canonical(addr):
    """A flow table's key for client address addr: (host, port), an IPv4-mapped IPv6 host
    as IPv4 (the C tables' akey_t)."""
    return unmap(tuple(addr[:2]))


def stats_view(stats):
    if stats is None:
        stats = memoryview(bytearray(8 * _stats.N_COUNTERS)).cast("Q")
    if not isinstance(stats, memoryview):
        stats = memoryview(stats)
    if stats.format != "Q":
        stats = stats.cast("B").cast("Q")
    if len(stats) < _stats.N_COUNTERS:
        raise ValueError(f"stats needs {_stats.N_COUNTERS} uint64 counters, got {len(stats)}")
    return stats


def unmap(addr):
    """(host, port) with an IPv4-mapped IPv6 host turned into IPv4."""
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return (host, addr[1])


def send_error_counter(e):
    if e in (_errno.EAGAIN, _errno.ENOBUFS):
        return "drop_buffer_full"
    if e == _errno.EMSGSIZE:
        return "drop_too_big"
    if e in (_errno.ENETUNREACH, _errno.EHOSTUNREACH, _errno.EADDRNOTAVAIL):
        return "drop_no_route"
    if e in (_errno.EACCES, _errno.EPERM):
        return "drop_permission"
    return "drop_send_error"


class Acl:
    """Matcher over AccessList.table() and AccessList.host_keys(), like
    relay.datapath.tunnel.Acl (set_hosts replaces the host addresses)."""

    def __init__(self, table=(), hosts=()):
        self.rules = [(fam, plen, action, int.from_bytes(net[:4 if fam == 4 else 16], "big"))
                      for fam, plen, action, net in table]
        self.set_hosts(hosts)

    def set_hosts(self, keys):
        keys = frozenset(bytes(k) for k in keys)
        for k in keys:
            if len(k) != 16:
                raise ValueError(f"host address key of {len(k)} bytes, not 16")
        self.hosts = keys
        self.version = getattr(self, "version", 0) + 1   # remembered verdicts are stale

    @property
    def host_count(self):
        return len(self.hosts)

    def allowed(self, host):
        ip = ipaddress.ip_address(host)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self.hosts and host_key(ip) in self.hosts:
            return False
        fam, bits = (4, 32) if ip.version == 4 else (6, 128)
        value = int(ip)
        for rfam, plen, action, net in self.rules:
            if rfam != fam:
                continue
            if plen == 0 or (value ^ net) >> (bits - plen) == 0:
                return action == ALLOW
        return True


class Poller:
    def __init__(self, stats, log):
        self.ep = _select.epoll()
        self._stats = stats_view(stats)
        self.log = log or TUNNEL_LOG
        self.now = _time.monotonic()
        self._reg = {}              # fd -> (kind, idx); kind None: handed to Python
        self.dns = None             # Resolver, for services that relay to host names

    @property
    def stats(self):
        return self._stats

    def _count(self, name, n=1):
        self._stats[C[name]] += n

    def _sent(self, way, data, sock, to, counted=None, src=None):
        """sendto (sendmsg from the local address of ancillary data src, when given),
        counted before the call (which lets other threads run) and undone on failure, so
        a reader never sees a delivered datagram that is not counted yet."""
        n = len(data) if counted is None else counted
        self._count(way + "_datagrams")
        self._count(way + "_bytes", n)
        try:
            if src:
                sock.sendmsg([data], src, 0, to)
            else:
                sock.sendto(data, to)
        except OSError as e:
            self._count(way + "_datagrams", -1)
            self._count(way + "_bytes", -n)
            self._count(send_error_counter(e.errno))

    def fileno(self):
        return self.ep.fileno()

    def watch(self, fd, token, read=True, write=False, modify=False):
        ev = (EPOLLIN if read else 0) | (EPOLLOUT if write else 0)
        (self.ep.modify if modify else self.ep.register)(fd, ev)
        self._reg[fd] = (None, token)

    def unwatch(self, fd):
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass
        self._reg.pop(fd, None)

    def _add(self, fd, kind, idx, ev=EPOLLIN):
        self.ep.register(fd, ev)
        self._reg[fd] = (kind, idx)

    def _del(self, fd):
        self.unwatch(fd)

    def poll(self, timeout_ms=100):
        try:
            events = self.ep.poll(timeout_ms / 1000.0 if timeout_ms >= 0 else -1, 64)
        except InterruptedError:
            return []
        self.now = _time.monotonic()
        py = []
        for fd, ev in events:
            reg = self._reg.get(fd)
            if reg is None:
                continue
            if reg[0] is None:
                py.append((reg[1], ev))
            elif reg[0] == "dns":
                self._dns_ready(self.dns.drain(self.now))
            else:
                self.on_event(reg[0], reg[1], ev)
        return py

    def on_event(self, kind, idx, ev):
        pass

    # -- destinations given as host names (tunnel server, SOCKS5 relay)
    def init_dns(self, resolve=None):
        self.dns = Resolver(self._count, self.log, resolve)
        self._add(self.dns.fileno(), "dns", 0)

    def _name_dst(self, owner, name, port, data, family):
        """(host, port) for a datagram to host name ``name`` (bytes), or None when it was
        parked until the name is resolved, or dropped (counted)."""
        e = self.dns.lookup(name, self.now)
        if e is None:
            self._count("queue_drops")
            return None
        if e.state == "pending":
            self.dns.park(e, owner, port, data)
            return None
        picked = Resolver.pick(e, family) if e.state == "ok" else None
        if picked is None:
            self._count("drop_no_route")
            return None
        return picked[0], port

    def _dns_ready(self, settled):
        for e, parked in settled:
            for owner, port, data in parked:
                if e.state == "ok":
                    self._dns_send(owner, e, port, data)
                else:
                    self._count("drop_no_route")

    def _dns_send(self, owner, e, port, data):
        pass

    def close(self):
        if self.dns is not None:
            self.dns.close()
        self.ep.close()
