"""Host names (ATYP 3 destinations) resolved off the data path: a bounded pool of resolver
threads waking the event loop, and the pure-Python cache the fallback uses."""
import collections
import errno as _errno_mod
import ipaddress
import logging as _logging
import os
import socket
import threading

from relay.loglimit import LogLimiter
# ---------------------------------------------------------------------------- name resolution
# Destinations given as a domain name (ATYP 3) on the tunnel server and the SOCKS5 UDP
# relay. The data path never waits for a lookup: a bounded cache answers at once, a miss
# goes to a few resolver threads (getaddrinfo), and the datagrams waiting for the name are
# parked in bounded queues until the answer wakes the loop through a wake-up pipe. The threads
# only see names and return addresses; they never touch the loop's structures.

DNS_TTL_OK = 60.0           # seconds an answer is reused
DNS_TTL_FAIL = 10.0         # seconds a failure is remembered
DNS_GIVE_UP = 15.0          # a lookup not answered by then has failed
DNS_MAX_NAMES = 1024        # cache entries (the C cache: 256 sets of 4)
DNS_INFLIGHT = 32           # names being resolved at once
DNS_THREADS = 4             # resolver threads, i.e. getaddrinfo calls at once
DNS_PARK_PER_NAME = 16      # datagrams waiting for one name
DNS_PARK_MAX = 256          # datagrams waiting for any name
DNS_PARK_BYTES = 1 << 20    # their payload bytes

_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def host_name_text(raw):
    """The host name of an ATYP 3 address as text, or None when it cannot be one (letters,
    digits, '-', '_' and dots, labels of 1-63 bytes, at most 253 bytes)."""
    raw = bytes(raw)
    name = raw[:-1] if raw.endswith(b".") else raw
    if not 1 <= len(name) <= 253 or not set(name) <= _NAME_CHARS:
        return None
    if any(not 1 <= len(label) <= 63 for label in name.split(b".")):
        return None
    return raw.decode("ascii")


def resolve_name(name):
    """IP addresses (text) of host name ``name`` in getaddrinfo's order; OSError if none.
    Names under ``.invalid`` fail at once without asking anyone (RFC 6761)."""
    low = name.lower().rstrip(".")
    if low == "invalid" or low.endswith(".invalid"):
        raise OSError(_errno_mod.EHOSTUNREACH, "reserved name (.invalid, RFC 6761)")
    out = []
    for fam, _type, _proto, _canon, sa in socket.getaddrinfo(name, None, 0, socket.SOCK_DGRAM):
        if fam in (socket.AF_INET, socket.AF_INET6):
            ip = sa[0].split("%", 1)[0]
            if ip not in out:
                out.append(ip)
    if not out:
        raise OSError(_errno_mod.EHOSTUNREACH, "no IPv4 or IPv6 address")
    return out


def _packed_addrs(ips):
    """[(4 | 6, packed)] of IP address texts, IPv4-mapped IPv6 as IPv4, bad ones left out."""
    out = []
    for ip in ips:
        try:
            a = ipaddress.ip_address(ip.split("%", 1)[0] if isinstance(ip, str) else ip)
        except ValueError:
            continue
        if a.version == 6 and a.ipv4_mapped is not None:
            a = a.ipv4_mapped
        out.append((a.version, a.packed))
    return out


class ResolverPool:
    """Resolver threads (started on the first lookup, at most ``threads``) working through
    a bounded queue of names. ``submit(token, raw_name)`` queues a lookup; each answer is
    appended to a list and signalled on ``fileno()``, the read end of a non-blocking pipe
    (os.eventfd is Python 3.10+); the loop takes them with ``results()`` as
    ``[(token, [(4 | 6, packed address)...], error text or None)]``.
    ``resolve(name) -> [ip text...]`` is injectable (tests); the default is getaddrinfo."""

    def __init__(self, resolve=None, threads=DNS_THREADS, max_queue=2 * DNS_INFLIGHT):
        self.resolve = resolve or resolve_name
        self.nthreads, self.max_queue = threads, max_queue
        self.fd, self._wake = os.pipe()         # both close-on-exec (PEP 446)
        os.set_blocking(self.fd, False)
        os.set_blocking(self._wake, False)
        self._cv = threading.Condition()
        self._jobs = collections.deque()
        self._done = collections.deque()
        self._threads = []
        self._idle = 0
        self._closed = False

    def fileno(self):
        return self.fd

    def submit(self, token, raw):
        """Queue a lookup of ``raw`` (the name's bytes): None, or why it is refused now."""
        name = host_name_text(raw)
        if name is None:
            return "not a host name"
        with self._cv:
            if self._closed:
                return "resolver closed"
            if len(self._jobs) >= self.max_queue:
                return "too many lookups waiting"
            self._jobs.append((token, name))
            if len(self._jobs) > self._idle and len(self._threads) < self.nthreads:
                t = threading.Thread(target=self._work, name="relay-resolver", daemon=True)
                self._threads.append(t)
                t.start()
            self._cv.notify()
        return None

    def _work(self):
        while True:
            with self._cv:
                self._idle += 1
                while not self._jobs and not self._closed:
                    self._cv.wait()
                self._idle -= 1
                if self._closed:
                    return
                token, name = self._jobs.popleft()
            try:
                addrs, err = _packed_addrs(self.resolve(name)), None
                if not addrs:
                    err = "no IPv4 or IPv6 address"
            except (OSError, UnicodeError, ValueError) as e:
                addrs, err = [], (e.strerror if isinstance(e, OSError) and e.strerror
                                  else str(e)) or type(e).__name__
            with self._cv:
                if self._closed:
                    return
                self._done.append((token, addrs, err))
                try:
                    os.write(self._wake, b"\0")
                except BlockingIOError:     # pipe full: a wake-up is pending already
                    pass

    def results(self):
        try:
            while len(os.read(self.fd, 4096)) == 4096:   # bounded by the pipe's capacity
                pass
        except OSError:                      # BlockingIOError: drained
            pass
        out = []
        while self._done:
            out.append(self._done.popleft())
        return out

    def close(self):
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
            os.close(self.fd)
            os.close(self._wake)


class _Name:
    __slots__ = ("key", "state", "seq", "expires", "used", "addrs", "parked", "nbytes")


class Resolver:
    """Pure twin of relay.datapath.tunnel.NameCache: the bounded cache, the parked datagrams and a
    ResolverPool. ``lookup`` gives the entry of a name (state "ok", "fail" or "pending");
    ``park`` keeps a datagram for a pending one; ``drain()`` / ``expire(now)`` return
    ``[(entry, [(owner, port, data)...])]`` whose datagrams can now go (or be dropped)."""

    def __init__(self, count, log, resolve=None):
        self.pool = ResolverPool(resolve)
        self.count, self.log = count, log
        self.say = LogLimiter(log)
        self.names = {}
        self.inflight = self.nparked = self.park_bytes = self.seq = 0

    def fileno(self):
        return self.pool.fileno()

    @property
    def parked(self):
        return self.nparked

    def lookup(self, raw, now):
        """The entry of name ``raw`` (bytes), a pending new one on a miss; None when there
        is no room to resolve it now."""
        key = bytes(raw).lower()
        e = self.names.get(key)
        if e is not None and (e.state == "pending" or now < e.expires):
            e.used = now
            return e
        if e is None and len(self.names) >= DNS_MAX_NAMES:
            old = [x for x in self.names.values() if x.state != "pending"]
            if not old:
                return None
            del self.names[min(old, key=lambda x: x.used).key]
        if self.inflight >= DNS_INFLIGHT:
            return None
        if e is None:
            e = self.names[key] = _Name()
            e.key = key
        self.seq += 1
        e.state, e.seq, e.expires, e.used = "pending", self.seq, now + DNS_GIVE_UP, now
        e.addrs, e.parked, e.nbytes = [], [], 0
        self.inflight += 1
        why = self.pool.submit((key, e.seq), key)
        if why is not None:
            self._settle(e, [], why, now)
        return e

    def park(self, e, owner, port, data):
        if (len(e.parked) >= DNS_PARK_PER_NAME or self.nparked >= DNS_PARK_MAX
                or self.park_bytes + len(data) > DNS_PARK_BYTES):
            self.count("queue_drops")
            return
        e.parked.append((owner, port, bytes(data)))
        e.nbytes += len(data)
        self.nparked += 1
        self.park_bytes += len(data)

    def _settle(self, e, addrs, err, now):
        self.inflight -= 1
        e.addrs = addrs
        e.state = "ok" if addrs else "fail"
        e.expires = now + (DNS_TTL_OK if addrs else DNS_TTL_FAIL)
        if not addrs:
            self.say(_logging.INFO, "cannot resolve %r: %s", e.key.decode("latin-1"), err)
        parked, e.parked = e.parked, []
        self.nparked -= len(parked)
        self.park_bytes -= e.nbytes
        e.nbytes = 0
        return e, parked

    def drain(self, now):
        out = []
        for (key, seq), addrs, err in self.pool.results():
            e = self.names.get(key)
            if e is not None and e.state == "pending" and e.seq == seq:
                out.append(self._settle(e, addrs, err, now))
        return out

    def expire(self, now):
        if not self.inflight:
            return []
        return [self._settle(e, [], "no answer in time", now) for e in list(self.names.values())
                if e.state == "pending" and now > e.expires]

    @staticmethod
    def pick(e, family):
        """(host, version) of e for a socket of ``family`` (AF_INET6: dual stack, the first
        address getaddrinfo gave, IPv4 mapped); None when it has no address of that kind."""
        if family == socket.AF_INET:
            for ver, packed in e.addrs:
                if ver == 4:
                    return socket.inet_ntop(socket.AF_INET, packed), 4
            return None
        ver, packed = e.addrs[0]
        if ver == 4:
            return "::ffff:" + socket.inet_ntop(socket.AF_INET, packed), 4
        return socket.inet_ntop(socket.AF_INET6, packed), 6

    def close(self):
        self.pool.close()
