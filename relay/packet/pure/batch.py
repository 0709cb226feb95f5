"""Pure-Python BatchSocket: the same API, behaviour and errors as the one in relay.packet._fast.

recvmmsg/sendmmsg are emulated with one recvmsg_into/sendmsg per datagram, following the
kernel's rules: a receive error after some datagrams is kept for the next recv(); a send
error after some messages of a batch ends that "call" with the count, and the next call
starts at the failed message (so an ECONNREFUSED reported there is consumed and the
datagram goes out on the retry, as with sendmmsg).
"""
import errno
import math
import operator
import os
import socket
import struct

__all__ = ["BatchSocket"]

from relay.net.sockopt import (  # noqa: E402  (option numbers live in one place)
    IP_RECVORIGDSTADDR, IPV6_RECVORIGDSTADDR, SOL_UDP, UDP_GRO, UDP_SEGMENT,
)

IP_ORIGDSTADDR = IP_RECVORIGDSTADDR
IPV6_ORIGDSTADDR = IPV6_RECVORIGDSTADDR
MSG_DONTWAIT = socket.MSG_DONTWAIT
MSG_TRUNC = socket.MSG_TRUNC

MAX_BATCH = 1024           # UIO_MAXIOV
MAX_BUFSIZE = 65536
CTRL_SIZE = 128            # ancillary bytes per datagram, as relay/datapath/ring.pxd RING_CTRL_SIZE

# send() stops and returns its count on these (EAGAIN == EWOULDBLOCK on Linux)
_STOP_ERRNOS = frozenset((errno.EAGAIN, errno.ENOBUFS, errno.ECONNREFUSED))

_SIN = struct.Struct("=HH4s")          # sockaddr_in: family (host order), port, address
_SIN6 = struct.Struct("=HHI16sI")      # sockaddr_in6: family, port, flowinfo, address, scope
_INT = struct.Struct("=i")
_U16 = struct.Struct("=H")


def _int(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < lo or value > hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")
    return value


def _oserror(err, sent):
    exc = OSError(err, os.strerror(err))
    exc.sent = sent
    return exc


def _dest(dest, family):
    """The address tuple sendmsg wants for dest on a socket of family, validated like the
    extension does (same exceptions and messages)."""
    if not isinstance(dest, tuple):
        raise TypeError(f"destination must be a (host, port) tuple, not {type(dest).__name__}")
    k = len(dest)
    if k < 2 or k > 4:
        raise TypeError(f"destination must be a (host, port) tuple, not a tuple of {k} items")
    host, port = dest[0], dest[1]
    flowinfo = dest[2] if k > 2 else 0
    scope_id = dest[3] if k > 3 else 0
    if not isinstance(host, str):
        raise TypeError(f"destination host must be a str, not {type(host).__name__}")
    _int("destination port", port, 0, 65535)
    _int("destination flowinfo", flowinfo, 0, 0xFFFFF)
    _int("destination scope_id", scope_id, 0, 0xFFFFFFFF)
    bad = ValueError(f"not an IPv4 or IPv6 address literal: {host!r}")
    if not host.isascii() or "\0" in host:
        raise bad
    try:
        socket.inet_pton(socket.AF_INET, host)
        is_v6 = False
    except OSError:
        try:
            socket.inet_pton(socket.AF_INET6, host)
        except OSError:
            raise bad from None
        is_v6 = True
    if family == socket.AF_INET:
        if is_v6:
            raise ValueError(f"cannot send to the IPv6 address {host!r} from an AF_INET socket")
        return (host, port)
    if not is_v6:
        return ("::ffff:" + host, port, 0, 0)
    return (host, port, flowinfo, scope_id)


def _view(payload, what):
    try:
        mv = memoryview(payload)
    except TypeError:
        raise TypeError(f"{what} must be a bytes-like object, not {type(payload).__name__}") from None
    if not mv.c_contiguous:
        raise ValueError(f"{what} must be a contiguous buffer")
    return mv


def _sockaddr_tuple(raw):
    """(host, port) from the bytes of a sockaddr_in/sockaddr_in6, or None."""
    if len(raw) >= _SIN6.size:
        fam = _U16.unpack_from(raw)[0]
        if fam == socket.AF_INET6:
            _, port, _, addr, _ = _SIN6.unpack_from(raw)
            return (socket.inet_ntop(socket.AF_INET6, addr), socket.ntohs(port))
    if len(raw) >= _SIN.size:
        fam, port, addr = _SIN.unpack_from(raw)
        if fam == socket.AF_INET:
            return (socket.inet_ntop(socket.AF_INET, addr), socket.ntohs(port))
    return None


class BatchSocket:
    """Batched, non-blocking datagram I/O on a UDP socket (pure-Python fallback).

    BatchSocket(sock_or_fd, *, batch=64, bufsize=65536, recv_origdst=False, gro=False)

    ``sock_or_fd`` is a socket object (kept referenced, closed by close()) or a file
    descriptor (borrowed, never closed) of an AF_INET/AF_INET6 SOCK_DGRAM socket. Every
    call is non-blocking whatever the socket's mode. ``recv_origdst`` sets
    IP_RECVORIGDSTADDR (and IPV6_RECVORIGDSTADDR on AF_INET6 sockets) so origdst() reports
    where a TPROXY'd datagram was going; ``gro`` sets UDP_GRO so one slot may hold several
    datagrams of segment_size() bytes (use bufsize=65536 then, or trains get cut).

    recv() -> int: up to ``batch`` datagrams; 0 when none is queued. Then for i in
    range(n): data(i) (a writable memoryview valid until the next recv), source(i),
    origdst(i), truncated(i), segment_size(i), segments(i).

    send(items) -> int: items are ``(payload, dest)`` tuples or bare payloads (connected
    socket; dest None); payloads are bytes-like, dest is (host, port[, flowinfo,
    scope_id]) with an IP literal host (IPv4 literals are IPv4-mapped on AF_INET6
    sockets). Returns how many datagrams went out; when the kernel answers EAGAIN,
    ENOBUFS or ECONNREFUSED it stops there, returns the count and sets ``last_error``;
    retry items[count:] later. Other errors raise OSError (bad items TypeError/ValueError)
    with ``.sent`` = datagrams sent before the failure.

    send_gso(payloads_or_buffer, segment_size, dest=None) -> int: one UDP_SEGMENT send;
    the kernel splits the data into datagrams of segment_size bytes (the last may be
    shorter). Returns the datagram count, 0 on EAGAIN/ENOBUFS/ECONNREFUSED.

    Not thread-safe: use one BatchSocket per thread.
    """

    def __init__(self, sock_or_fd, *, batch=64, bufsize=65536, recv_origdst=False, gro=False):
        self._closed = True
        self._busy = False
        self._count = 0
        if isinstance(sock_or_fd, int) and not isinstance(sock_or_fd, bool):
            owner = None
            fd = _int("file descriptor", sock_or_fd, 0, 0x7FFFFFFF)
        elif hasattr(sock_or_fd, "fileno"):
            owner = sock_or_fd
            fd = sock_or_fd.fileno()
            if isinstance(fd, int) and fd < 0:
                raise ValueError("the socket is closed")
            fd = _int("fileno()", fd, 0, 0x7FFFFFFF)
        else:
            raise TypeError(f"expected a socket or a file descriptor, not {type(sock_or_fd).__name__}")
        self._batch = _int("batch", batch, 1, MAX_BATCH)
        self._bufsize = _int("bufsize", bufsize, 1, MAX_BUFSIZE)
        # A private socket object on a duplicate descriptor: the caller's object keeps its
        # own timeout and ownership; MSG_DONTWAIT makes every call non-blocking.
        dup = os.dup(fd)
        try:
            s = socket.socket(fileno=dup)
        except BaseException:
            os.close(dup)
            raise
        try:
            if s.gettimeout() is not None:     # a global default timeout: never wait
                s.settimeout(0.0)
            if s.family not in (socket.AF_INET, socket.AF_INET6):
                raise ValueError("BatchSocket needs an AF_INET or AF_INET6 socket")
            if s.type != socket.SOCK_DGRAM:
                raise ValueError("BatchSocket needs a datagram (SOCK_DGRAM) socket")
            if recv_origdst:
                if s.family == socket.AF_INET6:
                    self._setopt(s, socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, "IPV6_RECVORIGDSTADDR")
                    try:     # IPv4 traffic on a dual-stack socket reports its destination this way
                        s.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
                    except OSError:
                        pass
                else:
                    self._setopt(s, socket.IPPROTO_IP, IP_RECVORIGDSTADDR, "IP_RECVORIGDSTADDR")
            if gro:
                self._setopt(s, SOL_UDP, UDP_GRO, "UDP_GRO")
        except BaseException:
            s.close()
            raise
        self._s = s
        self._family = s.family
        self._buf = bytearray(self._batch * self._bufsize)
        self._view = memoryview(self._buf)
        self._slots = [self._view[i * self._bufsize:(i + 1) * self._bufsize]
                       for i in range(self._batch)]
        self._len = [0] * self._batch
        self._flags = [0] * self._batch
        self._addr = [None] * self._batch
        self._origdst = [None] * self._batch
        self._gro = [0] * self._batch
        self._pending = 0
        self._last_error = 0
        self._sock = owner
        self._fd = fd
        self._closed = False

    @staticmethod
    def _setopt(s, level, opt, name):
        try:
            s.setsockopt(level, opt, 1)
        except OSError as e:
            raise OSError(e.errno, f"{name}: {os.strerror(e.errno)}") from None

    # -- state ---------------------------------------------------------------------

    def _check(self):
        if self._closed:
            raise ValueError("I/O operation on a closed BatchSocket")
        if self._busy:
            raise RuntimeError("BatchSocket is in use by another call (one thread at a time)")

    def _slot(self, i):
        if self._closed:
            raise ValueError("I/O operation on a closed BatchSocket")
        i = operator.index(i)
        if i < 0 or i >= self._count:
            raise IndexError(f"slot {i} out of range: the last recv() returned {self._count}")
        return i

    def fileno(self):
        """The socket's file descriptor (-1 once closed)."""
        return -1 if self._closed else self._fd

    @property
    def family(self):
        return self._family

    @property
    def batch(self):
        return self._batch

    @property
    def bufsize(self):
        return self._bufsize

    @property
    def closed(self):
        return bool(self._closed)

    @property
    def count(self):
        """How many datagrams the last recv() returned."""
        return self._count

    @property
    def last_error(self):
        """errno that stopped the last send()/send_gso() early (EAGAIN, ENOBUFS,
        ECONNREFUSED), 0 when everything went."""
        return self._last_error

    def close(self):
        """Close; a socket object given to the constructor is closed too."""
        if self._closed:
            return
        self._closed = True
        self._count = 0
        self._s.close()
        sock, self._sock = self._sock, None
        if sock is not None and hasattr(sock, "close"):
            sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self._closed else f"fd={self._fd}"
        fam = "AF_INET6" if self._family == socket.AF_INET6 else "AF_INET"
        return f"<BatchSocket {state} {fam} batch={self._batch} bufsize={self._bufsize}>"

    # -- receive -------------------------------------------------------------------

    def recv(self):
        """Receive up to `batch` datagrams without blocking; returns how many (0: none)."""
        self._check()
        self._count = 0
        if self._pending:
            err, self._pending = self._pending, 0
            raise OSError(err, os.strerror(err))
        n = 0
        recv_into = self._s.recvmsg_into
        while n < self._batch:
            try:
                nbytes, anc, flags, addr = recv_into([self._slots[n]], CTRL_SIZE, MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError as e:
                if n == 0:
                    raise OSError(e.errno, os.strerror(e.errno)) from None
                self._pending = e.errno       # reported by the next recv(), as recvmmsg does
                break
            self._len[n] = min(nbytes, self._bufsize)
            self._flags[n] = flags
            self._addr[n] = addr
            self._origdst[n] = None
            self._gro[n] = 0
            for level, kind, data in anc:
                if ((level == socket.IPPROTO_IP and kind == IP_ORIGDSTADDR)
                        or (level == socket.IPPROTO_IPV6 and kind == IPV6_ORIGDSTADDR)):
                    self._origdst[n] = _sockaddr_tuple(data)
                elif level == SOL_UDP and kind == UDP_GRO and len(data) >= _INT.size:
                    self._gro[n] = _INT.unpack_from(data)[0]
            n += 1
        self._count = n
        return n

    def data(self, i):
        """Payload of slot i (a memoryview into the ring, valid until the next recv)."""
        i = self._slot(i)
        return self._slots[i][:self._len[i]]

    def source(self, i):
        """(host, port) the datagram in slot i came from."""
        addr = self._addr[self._slot(i)]
        if not isinstance(addr, tuple) or len(addr) < 2:
            return None
        return (addr[0].split("%", 1)[0], addr[1])

    def origdst(self, i):
        """(host, port) slot i's datagram was addressed to (TPROXY), or None when the
        socket does not report it (recv_origdst=False)."""
        return self._origdst[self._slot(i)]

    def truncated(self, i):
        """True when slot i's datagram was longer than bufsize and got cut."""
        return bool(self._flags[self._slot(i)] & MSG_TRUNC)

    def segment_size(self, i):
        """GRO segment size of slot i (0 when not coalesced): split data(i) by it."""
        return self._gro[self._slot(i)]

    def segments(self, i):
        """The datagrams of slot i: data(i) split by the GRO segment size."""
        i = self._slot(i)
        mv = self._slots[i][:self._len[i]]
        step = self._gro[i]
        if step <= 0 or len(mv) <= step:
            return [mv]
        return [mv[o:o + step] for o in range(0, len(mv), step)]

    # -- send ----------------------------------------------------------------------

    def _sendmmsg(self, msgs, start):
        """One emulated sendmmsg of msgs[start:]: the count sent, or -errno when the first
        message fails (a later failure only ends the call, like the kernel's)."""
        sendmsg = self._s.sendmsg
        n = 0
        for payload, addr in msgs[start:]:
            try:
                if addr is None:
                    sendmsg((payload,), (), MSG_DONTWAIT)
                else:
                    sendmsg((payload,), (), MSG_DONTWAIT, addr)
            except OSError as e:
                return n if n else -e.errno
            n += 1
        return n

    def _flush(self, msgs):
        """send_all(): (0, len(msgs)) or (-errno, sent before the failed message)."""
        done = 0
        while done < len(msgs):
            r = self._sendmmsg(msgs, done)
            if r < 0:
                return r, done
            done += r
        return 0, done

    def _stopped(self, rc, total):
        if -rc in _STOP_ERRNOS:
            self._last_error = -rc
            return total
        raise _oserror(-rc, total)

    def send(self, items):
        """Send (payload, dest) items or bare payloads; returns how many went out."""
        self._check()
        self._busy = True
        self._last_error = 0
        try:
            try:
                it = iter(items)
            except TypeError:
                raise TypeError(f"items must be an iterable, not {type(items).__name__}") from None
            total = 0
            msgs = []
            last = last_addr = None
            while True:
                try:
                    item = next(it, _END)
                    if item is _END:
                        break
                    if isinstance(item, tuple):
                        if len(item) != 2:
                            raise TypeError("an item must be a payload or a (payload, destination) "
                                            f"tuple, not a tuple of {len(item)} items")
                        payload, dest = item
                    else:
                        payload, dest = item, None
                    if dest is None:
                        addr = None
                    elif dest is last or (last is not None and dest == last):
                        addr = last_addr
                    else:
                        last = None
                        last_addr = _dest(dest, self._family)
                        last = dest
                        addr = last_addr
                    mv = _view(payload, "payload")
                except BaseException as exc:
                    # Items before the bad one go out first, as if sent one by one.
                    if msgs:
                        rc, sent = self._flush(msgs)
                        total += sent
                        msgs = []
                        if rc:
                            return self._stopped(rc, total)
                    try:
                        exc.sent = total
                    except Exception:
                        pass
                    raise
                msgs.append((mv, addr))
                if len(msgs) == self._batch:
                    rc, sent = self._flush(msgs)
                    total += sent
                    msgs = []
                    if rc:
                        return self._stopped(rc, total)
            if msgs:
                rc, sent = self._flush(msgs)
                total += sent
                if rc:
                    return self._stopped(rc, total)
            return total
        finally:
            self._busy = False

    def send_gso(self, payloads, segment_size, dest=None):
        """One UDP_SEGMENT send: a bytes-like buffer, or an iterable of payloads all
        segment_size bytes long except the last (which may be shorter). The kernel sends
        them as separate datagrams. Returns the datagram count (0 for no payloads, or when
        the kernel answers EAGAIN/ENOBUFS/ECONNREFUSED: see last_error)."""
        self._check()
        seg = _int("segment_size", segment_size, 1, 65535)
        addr = None if dest is None else _dest(dest, self._family)
        self._busy = True
        self._last_error = 0
        try:
            try:
                memoryview(payloads)
                is_buf = True
            except TypeError:
                is_buf = False
            if is_buf:
                bufs = [_view(payloads, "payloads")]
                total = bufs[0].nbytes
                count = math.ceil(total / seg) if total else 1
            else:
                try:
                    seq = tuple(payloads)
                except TypeError:
                    raise TypeError("payloads must be a bytes-like object or an iterable of "
                                    f"them, not {type(payloads).__name__}") from None
                if not seq:
                    return 0
                bufs = []
                last = len(seq) - 1
                for j, p in enumerate(seq):
                    mv = _view(p, f"segment {j}")
                    if j < last and mv.nbytes != seg:
                        raise ValueError(f"segment {j} is {mv.nbytes} bytes; all but the last "
                                         f"must be segment_size ({seg}) bytes")
                    if j == last and mv.nbytes > seg:
                        raise ValueError(f"the last segment is {mv.nbytes} bytes, more than "
                                         f"segment_size ({seg})")
                    bufs.append(mv)
                count = len(bufs)
            anc = [(SOL_UDP, UDP_SEGMENT, _U16.pack(seg))]
            try:
                if addr is None:
                    self._s.sendmsg(bufs, anc, MSG_DONTWAIT)
                else:
                    self._s.sendmsg(bufs, anc, MSG_DONTWAIT, addr)
            except OSError as e:
                if e.errno in _STOP_ERRNOS:
                    self._last_error = e.errno
                    return 0
                raise _oserror(e.errno, 0) from None
            return count
        finally:
            self._busy = False


_END = object()
