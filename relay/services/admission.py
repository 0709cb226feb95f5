"""Admission of TCP clients for the services that face them (tunnel-server, socks5).

``Acceptor`` accepts from a listen socket without ever spinning: when the process is out of
descriptors (EMFILE, ENFILE, and the kernel's ENOBUFS/ENOMEM) it stops watching the listen
socket for ``ACCEPT_PAUSE`` seconds (``tick`` re-arms it), and it keeps ``ACCEPT_RESERVE``
descriptors free for the flows already established: a connection accepted into the reserve is
closed at once and counted (``conn_rejected``).

``HandshakePool`` holds the connections still in their handshake, apart from established
sessions: at most ``per_source`` from one source address (an IPv6 source counts by its /64),
the first bytes due within ``first_bytes`` seconds and the whole handshake within ``timeout``;
when the pool is full the oldest handshake makes room for the newest, so nobody holding slots
can lock everyone else out.

Every refusal is counted by the caller and logged through a ``LogLimiter``.
"""
import errno
import logging
import socket
import time

from relay.loglimit import LogLimiter
from relay.privileges import fd_soft_limit

ACCEPT_BURST = 64
ACCEPT_PAUSE = 0.1           # seconds the listen socket rests when descriptors run out
ACCEPT_RESERVE = 16          # descriptors an accept keeps free for established flows (within
                             # the data path's relay.config.FD_RESERVE, which flow sockets keep)
MAX_HANDSHAKES = 256         # connections in their handshake at once (the oldest makes room)
PER_SOURCE = 16              # handshakes one source address (IPv6: one /64) may hold
FIRST_BYTES_TIMEOUT = 3.0    # a new connection says something within this, or is closed
HANDSHAKE_TIMEOUT = 10.0     # ... and completes its handshake within this
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def source_key(host):
    """The unit a per-source limit counts: an IPv4 address (IPv4-mapped too), an IPv6 /64."""
    if ":" not in host or host.startswith("::ffff:") and "." in host:
        return host.rsplit(":", 1)[-1]
    try:
        return socket.inet_pton(socket.AF_INET6, host.split("%", 1)[0])[:8]
    except OSError:
        return host


class Acceptor:
    """accept() for one listen socket watched by ``watch(fd)`` / ``unwatch(fd)`` (token 0)."""

    def __init__(self, lsock, watch, unwatch, stats, index, log, reserve=ACCEPT_RESERVE):
        self.lsock, self._watch, self._unwatch = lsock, watch, unwatch
        self.st, self.i_accepted, self.i_rejected = stats, index["conn_accepted"], index["conn_rejected"]
        self.say = LogLimiter(log)
        self.reserve = reserve
        self.nfd = fd_soft_limit()
        self.paused_until = None
        self._watch(lsock.fileno())

    def accept(self):
        """Up to ACCEPT_BURST new connections, each (sock, peer), non-blocking."""
        out = []
        for _ in range(ACCEPT_BURST):
            try:
                sock, peer = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno in _OUT_OF_FDS:
                    self._pause(e)
                else:
                    self.say(logging.WARNING, "%s: accept: %s", self.address(), e)
                break
            self.st[self.i_accepted] += 1
            if sock.fileno() >= self.nfd - self.reserve:
                sock.close()
                self.st[self.i_rejected] += 1
                self.say(logging.WARNING, "%s: refused %s: fewer than %d descriptors left "
                         "(raise the open-files limit, ulimit -n)", self.address(), peer[0],
                         self.reserve)
                continue
            sock.setblocking(False)
            out.append((sock, peer))
        return out

    def address(self):
        try:
            return self.lsock.getsockname()[:2]
        except OSError:
            return "listener"

    def _pause(self, e):
        self.say(logging.WARNING, "%s: accept: %s; not accepting for %gs", self.address(), e,
                 ACCEPT_PAUSE)
        self._unwatch(self.lsock.fileno())
        self.paused_until = time.monotonic() + ACCEPT_PAUSE

    def tick(self, now):
        if self.paused_until is not None and now >= self.paused_until:
            self.paused_until = None
            self._watch(self.lsock.fileno())


class HandshakePool:
    """token -> (source key, start, deadline, heard), oldest first."""

    def __init__(self, cap=None, timeout=None, per_source=None, first_bytes=None):
        self.cap = MAX_HANDSHAKES if cap is None else cap
        self.timeout = timeout = HANDSHAKE_TIMEOUT if timeout is None else timeout
        self.per_source = PER_SOURCE if per_source is None else per_source
        self.first_bytes = min(FIRST_BYTES_TIMEOUT if first_bytes is None else first_bytes, timeout)
        self.slots = {}
        self.sources = {}
        self._next_scan = 0.0

    def __len__(self):
        return len(self.slots)

    def __contains__(self, token):
        return token in self.slots

    def source_full(self, host):
        return self.sources.get(source_key(host), 0) >= self.per_source

    def add(self, token, host, now):
        """Admit token; returns the token of the oldest handshake evicted to make room, or
        None. Callers check source_full first."""
        victim = None
        if len(self.slots) >= self.cap:
            victim = next(iter(self.slots))
            self.remove(victim)
        key = source_key(host)
        self.slots[token] = [key, now, now + self.first_bytes, False]
        self.sources[key] = self.sources.get(key, 0) + 1
        return victim

    def heard(self, token):
        """The first bytes arrived: the rest of the handshake is due within timeout."""
        s = self.slots.get(token)
        if s is not None and not s[3]:
            s[2], s[3] = s[1] + self.timeout, True

    def remove(self, token):
        s = self.slots.pop(token, None)
        if s is None:
            return
        n = self.sources[s[0]] - 1
        if n:
            self.sources[s[0]] = n
        else:
            del self.sources[s[0]]

    def expired(self, now):
        """Tokens past their deadline (scanned at most every 50 ms); still in the pool."""
        if now < self._next_scan or not self.slots:
            return []
        self._next_scan = now + 0.05
        return [t for t, s in self.slots.items() if now > s[2]]
