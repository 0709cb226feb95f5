# cython: language_level=3, boundscheck=False, wraparound=False
"""RawSender: spoofed IPv4/IPv6 + UDP datagrams through IPPROTO_RAW sockets.

Headers are written by ``write_udp_headers`` into a ring of 56-byte slots; each message
is two iovecs (header, payload — the payload is not copied) and the ring goes out with
one sendmmsg() when ``batch`` datagrams are queued, when the address family changes, or
at the end of the call. With ``mtu``, a datagram larger than it takes one message per
fragment (``write_fragment``: the fragment's headers in its slot, the second iovec
pointing at its piece of the payload), all in the same ring and the same sendmmsg; the
ring has room for ``batch`` datagrams plus the fragments of the largest one. The payload
buffers are held (Py_buffer) until their batch has been sent.
"""
from cpython.buffer cimport PyBuffer_Release, PyBUF_SIMPLE, PyObject_CheckBuffer
from cpython.exc cimport PyErr_Clear, PyErr_CheckSignals
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from libc.stdint cimport uint8_t, uint16_t, uint32_t
import os

from relay.includes.system cimport (
    errno, EAGAIN, EINTR, ENOBUFS, EMSGSIZE, EPERM, EACCES,
    memcpy, memset, strerror, close,
    iovec, mmsghdr,
    socket, setsockopt, sendmmsg, sockaddr_in, sockaddr_in6,
    AF_INET, AF_INET6, SOCK_RAW, SOCK_NONBLOCK, SOCK_CLOEXEC, SOL_SOCKET,
    IPPROTO_IP, IPPROTO_IPV6, IPPROTO_RAW, IP_HDRINCL, SO_MARK, IP_RECVERR, IPV6_RECVERR,
    pollfd, poll, POLLOUT, ntohs,
)
from relay.packet.headers cimport (
    write_udp_headers, write_udp_header, write_fragment, frag_chunk, frag_count, frag_next_ident,
    IPV4_UDP_HDR_LEN, IPV6_UDP_HDR_LEN, UDP_HDR_LEN, IPV6_MIN_MTU, FRAG_HDR_MAX,
    MAX_IPV4_UDP_PAYLOAD, MAX_IPV6_UDP_PAYLOAD,
)
from relay.datapath.addr cimport sockaddr_any, sockaddr_from_tuple
from relay.datapath.mtu cimport errqueue_mtu

from relay.errors import PacketTooBig
from relay.packet.pure.fast import check_mtu
from relay.packet.pure.rawsock import fragments_need_ipv6_mtu, too_big_error

cdef extern from "Python.h":
    # Same function as cpython.buffer's, declared without exception propagation so
    # that a refused payload can be reported with our own message.
    int _get_buffer "PyObject_GetBuffer"(object obj, Py_buffer *view, int flags)


cdef enum:
    SLOT_LEN = FRAG_HDR_MAX  # room for the IPv6 + Fragment + UDP headers
    MAX_BATCH = 1024        # UIO_MAXIOV, the kernel's limit for one sendmmsg()
    MAX_RETRIES = 50        # transient errors (ENOBUFS/EAGAIN) in a row before giving up

DEFAULT_TTL = 64
DEFAULT_BATCH = 64


cdef inline int _wait_retry(int fd, int err, int retries) noexcept nogil:
    """Short pause before retrying a send that failed with EAGAIN or ENOBUFS."""
    cdef pollfd pfd
    cdef int ms = 0
    if retries > 0:
        ms = 1 << (retries - 1) if retries < 5 else 10
    if err == ENOBUFS:
        # A queue on the way dropped the packet: the socket is writable, just wait.
        return poll(NULL, 0, ms)
    pfd.fd = fd
    pfd.events = POLLOUT
    pfd.revents = 0
    return poll(&pfd, 1, ms if ms else 1)


cdef extern from *:
    """
    /* Whether a ring slot's Py_buffer holds an exported payload (not queued from C). */
    static inline int relay_view_has_owner(const Py_buffer *v) { return v->obj != NULL; }
    static inline void relay_view_clear_owner(Py_buffer *v) { v->obj = NULL; }
    """
    bint _has_owner "relay_view_has_owner"(const Py_buffer *view) noexcept nogil
    void _set_no_owner "relay_view_clear_owner"(Py_buffer *view) noexcept nogil


cdef _check_port(object value, str what):
    if not isinstance(value, int) or (what == "port" and isinstance(value, bool)):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")


def _validate_addr(addr):
    """Checks made before the conversion so that both implementations agree: ports
    and IPv6 flowinfo/scope_id are ints in range (not floats; a port is not a bool),
    and a host with a NUL byte is not an address literal."""
    if isinstance(addr, tuple) and len(<tuple>addr) >= 2:
        port = (<tuple>addr)[1]
        _check_port(port, "port")
        if port < 0 or port > 65535:
            raise ValueError(f"port out of range 0-65535: {port}")
        if len(<tuple>addr) >= 4:
            for what, v, hi in (("flowinfo", (<tuple>addr)[2], 0xfffff),
                                ("scope_id", (<tuple>addr)[3], 0xffffffff)):
                _check_port(v, what)
                if v < 0 or v > hi:
                    raise ValueError(f"{what} out of range 0-{hi}: {v}")
        host = (<tuple>addr)[0]
        if isinstance(host, (str, bytes)) and ("\0" if isinstance(host, str) else b"\0") in host:
            raise ValueError(f"not an IPv4 or IPv6 address literal: {host!r}")


cdef class RawSender:
    """Send spoofed UDP datagrams (any source address and port) from raw sockets.

    RawSender(*, mark=None, ttl=64, batch=64, mtu=None)

    ``send(src, dst, payload)`` sends one datagram; ``send_many(items)`` sends an
    iterable of ``(src, dst, payload)`` with one sendmmsg() per ``batch`` datagrams
    and returns how many went out. Addresses are ``(host, port)`` tuples with IP
    literals (IPv6 may add flowinfo, scope_id); both of one datagram must be of the
    same family. Packets carry the given TTL, DF set, and the kernel picks the IPv4
    identification. Needs CAP_NET_RAW; ``mark`` (SO_MARK) needs CAP_NET_ADMIN.

    ``mtu`` (an int >= 68, or None: never fragment): a datagram whose packet would be
    larger goes out as fragments of at most mtu bytes (see ``build_udp_fragments``),
    in the same sendmmsg as the datagrams around it, with an identification from a
    per-sender counter (random start, never 0). IPv6 fragments need mtu >= 1280: an
    IPv6 datagram that would need them at a smaller mtu raises ValueError.

    Errors: ``PacketTooBig`` (limit "IPv4 maximum", "IPv6 maximum" or "interface
    MTU"), ValueError/TypeError for bad input, OSError for the rest; in send_many
    each carries ``.sent``, the number of datagrams that went out before the
    failing one (queued datagrams are flushed before raising, none after it goes;
    a datagram counts once all its fragments went).
    """

    def __cinit__(self, *args, **kwargs):
        self._fd4 = -1
        self._fd6 = -1
        self._closed = True
        self._busy = False
        self._hdrs = NULL
        self._iov = NULL
        self._msgs = NULL
        self._names = NULL
        self._views = NULL
        self._kind = NULL
        self._nq = 0
        self._nd = 0
        self._sent = 0

    def __init__(self, *, mark=None, ttl=DEFAULT_TTL, batch=DEFAULT_BATCH, mtu=None):
        cdef unsigned int i, cap
        if mark is not None:
            if not isinstance(mark, int):
                raise TypeError(f"mark must be an int or None, not {type(mark).__name__}")
            if mark < 0 or mark > 0xffffffff:
                raise ValueError(f"mark out of range 0-0xffffffff: {mark}")
        if not isinstance(ttl, int):
            raise TypeError(f"ttl must be an int, not {type(ttl).__name__}")
        if ttl < 1 or ttl > 255:
            raise ValueError(f"ttl out of range 1-255: {ttl}")
        if not isinstance(batch, int):
            raise TypeError(f"batch must be an int, not {type(batch).__name__}")
        if batch < 1 or batch > MAX_BATCH:
            raise ValueError(f"batch out of range 1-{MAX_BATCH}: {batch}")
        if mtu is not None:
            mtu = check_mtu(mtu, False)
        if self._busy:
            raise RuntimeError("RawSender is in use by another thread")
        self._teardown()
        self._has_mark = mark is not None
        self._mark = mark if mark is not None else 0
        self._ttl = ttl
        self._batch = batch
        self._mtu = mtu if mtu is not None else 0
        # Room for batch datagrams plus the fragments of the largest one (IPv4 at any mtu,
        # IPv6 at 1280 and more), so a datagram always fits into an emptied ring.
        cap = batch
        if self._mtu:
            cap += max(frag_count(UDP_HDR_LEN + MAX_IPV4_UDP_PAYLOAD, frag_chunk(0, self._mtu)),
                       frag_count(UDP_HDR_LEN + MAX_IPV6_UDP_PAYLOAD, frag_chunk(1, self._mtu))
                       if self._mtu >= IPV6_MIN_MTU else 0)
        self._cap = cap
        self._ident = int.from_bytes(os.urandom(4), "little")
        self._hdrs = <uint8_t *>PyMem_Calloc(cap, SLOT_LEN)
        self._iov = <iovec *>PyMem_Calloc(2 * cap, sizeof(iovec))
        self._msgs = <mmsghdr *>PyMem_Calloc(cap, sizeof(mmsghdr))
        self._names = <sockaddr_any *>PyMem_Calloc(cap, sizeof(sockaddr_any))
        self._views = <Py_buffer *>PyMem_Calloc(cap, sizeof(Py_buffer))
        self._kind = <uint8_t *>PyMem_Calloc(cap, 1)
        if (self._hdrs == NULL or self._iov == NULL or self._msgs == NULL
                or self._names == NULL or self._views == NULL or self._kind == NULL):
            self._teardown()
            raise MemoryError()
        for i in range(cap):
            self._msgs[i].msg_hdr.msg_name = &self._names[i]
            self._msgs[i].msg_hdr.msg_iov = &self._iov[2 * i]
            self._msgs[i].msg_hdr.msg_iovlen = 2
        self._src_obj = self._src_host = self._src_port = None
        self._dst_obj = self._dst_host = self._dst_port = None
        self._closed = False

    def __dealloc__(self):
        self._teardown()

    cdef _teardown(self):
        self._release()
        if self._fd4 >= 0:
            close(self._fd4)
            self._fd4 = -1
        if self._fd6 >= 0:
            close(self._fd6)
            self._fd6 = -1
        PyMem_Free(self._hdrs)
        PyMem_Free(self._iov)
        PyMem_Free(self._msgs)
        PyMem_Free(self._names)
        PyMem_Free(self._views)
        PyMem_Free(self._kind)
        self._kind = NULL
        self._hdrs = NULL
        self._iov = NULL
        self._msgs = NULL
        self._names = NULL
        self._views = NULL
        self._closed = True

    # -- public API -------------------------------------------------------------

    @property
    def closed(self):
        return self._closed

    @property
    def ttl(self):
        return self._ttl

    @property
    def mark(self):
        return self._mark if self._has_mark else None

    @property
    def batch(self):
        return self._batch

    @property
    def mtu(self):
        return self._mtu if self._mtu else None

    def close(self):
        """Close the raw sockets; further sends raise ValueError. Idempotent."""
        if self._busy:
            raise RuntimeError("cannot close a RawSender while it is sending")
        self._teardown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self._closed else f"ttl={self._ttl} batch={self._batch}"
        if self._has_mark:
            state += f" mark={self._mark:#x}"
        if self._mtu and not self._closed:
            state += f" mtu={self._mtu}"
        return f"<RawSender {state}>"

    def send(self, src, dst, payload):
        """Send one spoofed UDP datagram from src to dst ((host, port) tuples)."""
        self._enter()
        try:
            self._sent = 0
            try:
                self._queue(src, dst, payload)
                self.flush()
            except BaseException as e:
                self._recover(e)
                raise
        finally:
            self._busy = False

    def send_many(self, items):
        """Send every (src, dst, payload) of items, batched; returns the count sent."""
        self._enter()
        try:
            self._sent = 0
            try:
                if type(items) is list:
                    for item in <list>items:
                        self._queue_item(item)
                elif type(items) is tuple:
                    for item in <tuple>items:
                        self._queue_item(item)
                else:
                    for item in items:
                        self._queue_item(item)
                self.flush()
            except BaseException as e:
                self._recover(e)
                raise
            return self._sent
        finally:
            self._busy = False

    # -- internals --------------------------------------------------------------

    cdef int _enter(self) except -1:
        if self._closed:
            raise ValueError("send on a closed RawSender")
        if self._busy:
            raise RuntimeError("RawSender is in use by another thread")
        self._busy = True
        return 0

    cdef int _recover(self, object exc) except -1:
        """After a failure: send what was queued before the bad datagram (a failure
        there replaces exc), then record on exc how many went out."""
        self.flush()
        try:
            exc.sent = self._sent
        except (AttributeError, TypeError):
            pass
        return 0

    cdef int _queue_item(self, object item) except -1:
        if type(item) is tuple and len(<tuple>item) == 3:
            return self._queue((<tuple>item)[0], (<tuple>item)[1], (<tuple>item)[2])
        try:
            src, dst, payload = item
        except (TypeError, ValueError):
            raise TypeError("send_many items must be (src, dst, payload) triples, "
                            f"not {type(item).__name__}") from None
        return self._queue(src, dst, payload)

    cdef int _resolve(self, object addr, bint is_src) except -1:
        """Convert addr into self._src_sa / self._dst_sa, reusing the last conversion
        when addr is the same tuple or has the same host object and port."""
        cdef sockaddr_any *out
        if is_src:
            if addr is self._src_obj:
                return 0
            if (type(addr) is tuple and len(<tuple>addr) == 2
                    and (<tuple>addr)[0] is self._src_host
                    and type((<tuple>addr)[1]) is int
                    and (<tuple>addr)[1] == self._src_port):
                self._src_obj = addr
                return 0
            self._src_obj = self._src_host = self._src_port = None
            out = &self._src_sa
        else:
            if addr is self._dst_obj:
                return 0
            if (type(addr) is tuple and len(<tuple>addr) == 2
                    and (<tuple>addr)[0] is self._dst_host
                    and type((<tuple>addr)[1]) is int
                    and (<tuple>addr)[1] == self._dst_port):
                self._dst_obj = addr
                return 0
            self._dst_obj = self._dst_host = self._dst_port = None
            out = &self._dst_sa
        _validate_addr(addr)
        sockaddr_from_tuple(addr, out)
        if type(addr) is tuple and len(<tuple>addr) == 2 and type((<tuple>addr)[1]) is int:
            host, port = (<tuple>addr)[0], (<tuple>addr)[1]
        else:
            host = port = None
        if is_src:
            self._src_obj, self._src_host, self._src_port = addr, host, port
        else:
            self._dst_obj, self._dst_host, self._dst_port = addr, host, port
        return 0

    cdef int _queue(self, object src, object dst, object payload) except -1:
        cdef Py_buffer view
        cdef bint is_v6
        cdef size_t plen
        self._resolve(src, True)
        self._resolve(dst, False)
        if self._src_sa.sa.sa_family != self._dst_sa.sa.sa_family:
            raise ValueError(f"source {src!r} and destination {dst!r} are not of the "
                             "same address family")
        is_v6 = self._dst_sa.sa.sa_family == AF_INET6
        if _get_buffer(payload, &view, PyBUF_SIMPLE) < 0:
            PyErr_Clear()
            if PyObject_CheckBuffer(payload):
                raise TypeError(f"payload {type(payload).__name__} is not a C-contiguous buffer")
            raise TypeError(f"payload must be a bytes-like object, not {type(payload).__name__}")
        plen = <size_t>view.len
        if plen > <size_t>(MAX_IPV6_UDP_PAYLOAD if is_v6 else MAX_IPV4_UDP_PAYLOAD):
            PyBuffer_Release(&view)
            if is_v6:
                raise PacketTooBig(
                    f"UDP payload of {plen} bytes is over the IPv6 maximum of "
                    f"{MAX_IPV6_UDP_PAYLOAD} bytes", size=plen + IPV6_UDP_HDR_LEN,
                    limit="IPv6 maximum", sent=self._sent)
            raise PacketTooBig(
                f"UDP payload of {plen} bytes is over the IPv4 maximum of "
                f"{MAX_IPV4_UDP_PAYLOAD} bytes", size=plen + IPV4_UDP_HDR_LEN,
                limit="IPv4 maximum", sent=self._sent)
        if is_v6:
            self._put(True, <const uint8_t *>&self._src_sa.v6.sin6_addr,
                      ntohs(self._src_sa.v6.sin6_port),
                      <const uint8_t *>&self._dst_sa.v6.sin6_addr,
                      ntohs(self._dst_sa.v6.sin6_port), &self._dst_sa,
                      <const uint8_t *>view.buf, plen, &view)
        else:
            self._put(False, <const uint8_t *>&self._src_sa.v4.sin_addr,
                      ntohs(self._src_sa.v4.sin_port),
                      <const uint8_t *>&self._dst_sa.v4.sin_addr,
                      ntohs(self._dst_sa.v4.sin_port), &self._dst_sa,
                      <const uint8_t *>view.buf, plen, &view)
        return 0

    cdef int _put(self, bint is_v6, const uint8_t *src, uint16_t sport,
                  const uint8_t *dst, uint16_t dport, const sockaddr_any *dst_sa,
                  const uint8_t *payload, size_t plen, Py_buffer *view) except -1:
        """Queue one datagram: one message, or one per fragment when it is larger than
        the mtu. The ring owns view (NULL: queued from C) from here on; on failure
        before that, it is released."""
        cdef unsigned int need = 1, first, i
        cdef size_t chunk = 0, udp_len = UDP_HDR_LEN + plen, off, doff = 0, dlen = 0
        cdef size_t size = (IPV6_UDP_HDR_LEN if is_v6 else IPV4_UDP_HDR_LEN) + plen
        cdef uint8_t udp[UDP_HDR_LEN]
        cdef uint8_t *hdr
        cdef uint32_t ident
        try:
            if self._mtu and size > self._mtu:
                if is_v6 and self._mtu < IPV6_MIN_MTU:
                    raise fragments_need_ipv6_mtu(size, self._mtu)
                chunk = frag_chunk(is_v6, self._mtu)
                need = <unsigned int>frag_count(udp_len, chunk)
            if self._nq and (is_v6 != self._q_v6 or self._cap - self._nq < need):
                self.flush()
            if (self._fd6 if is_v6 else self._fd4) < 0:
                self._open(is_v6)
        except BaseException:
            if view != NULL:
                PyBuffer_Release(view)
            raise
        first = self._nq
        if need == 1:
            self._slot(is_v6, src, sport, dst, dport, dst_sa, payload, plen)
            self._kind[first] = 0
            self._nq += 1
        else:
            write_udp_header(udp, is_v6, src, sport, dst, dport, payload, plen)
            ident = self._ident = frag_next_ident(self._ident)
            off = 0
            while off < udp_len:
                i = self._nq
                hdr = self._hdrs + i * SLOT_LEN
                self._iov[2 * i].iov_base = hdr
                self._iov[2 * i].iov_len = write_fragment(
                    hdr, is_v6, src, dst, udp, udp_len, off, chunk, ident, self._ttl, 0, 0,
                    &doff, &dlen)
                self._iov[2 * i + 1].iov_base = <void *>(payload + doff)
                self._iov[2 * i + 1].iov_len = dlen
                self._name(i, is_v6, dst, dst_sa)
                self._kind[i] = 1
                _set_no_owner(&self._views[i])
                self._nq += 1
                off += chunk
            self._kind[self._nq - 1] = 2
        if view != NULL:
            self._views[first] = view[0]
        else:
            _set_no_owner(&self._views[first])
        self._nd += 1
        if self._nd >= self._batch:
            self.flush()
        return 0

    cdef int _slot(self, bint is_v6, const uint8_t *src, uint16_t sport,
                   const uint8_t *dst, uint16_t dport, const sockaddr_any *dst_sa,
                   const uint8_t *payload, size_t plen) except -1:
        """Write the headers and the message of the next free slot (not counted yet)."""
        cdef unsigned int i = self._nq
        cdef uint8_t *hdr = self._hdrs + i * SLOT_LEN
        cdef iovec *iov = &self._iov[2 * i]
        iov[0].iov_base = hdr
        iov[0].iov_len = write_udp_headers(hdr, is_v6, src, sport, dst, dport, payload,
                                           plen, self._ttl, 0, 0, True, 0)
        iov[1].iov_base = <void *>payload
        iov[1].iov_len = plen
        self._name(i, is_v6, dst, dst_sa)
        return 0

    cdef void _name(self, unsigned int i, bint is_v6, const uint8_t *dst,
                    const sockaddr_any *dst_sa) noexcept:
        """The destination of message i. Raw sockets take it with port 0 (IPv6: the port
        would name the protocol); the headers carry the real ports."""
        cdef sockaddr_any *name = &self._names[i]
        if is_v6:
            name.v6.sin6_family = AF_INET6
            name.v6.sin6_port = 0
            name.v6.sin6_flowinfo = 0
            memcpy(&name.v6.sin6_addr, dst, 16)
            name.v6.sin6_scope_id = dst_sa.v6.sin6_scope_id if dst_sa != NULL else 0
            self._msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in6)
        else:
            name.v4.sin_family = AF_INET
            name.v4.sin_port = 0
            memcpy(&name.v4.sin_addr, dst, 4)
            self._msgs[i].msg_hdr.msg_namelen = sizeof(sockaddr_in)
        self._q_v6 = is_v6

    cdef int queue_raw(self, bint is_v6, const uint8_t *src, uint16_t sport,
                       const uint8_t *dst, uint16_t dport,
                       const uint8_t *payload, size_t plen) except -1:
        """Queue one datagram from C (addresses in network order, ports in host order).
        The payload must stay valid until the next queue_raw()/flush() returns."""
        if self._closed:
            raise ValueError("send on a closed RawSender")
        if plen > <size_t>(MAX_IPV6_UDP_PAYLOAD if is_v6 else MAX_IPV4_UDP_PAYLOAD):
            raise PacketTooBig(
                f"UDP payload of {plen} bytes is over the {'IPv6' if is_v6 else 'IPv4'} "
                "maximum", size=plen + (IPV6_UDP_HDR_LEN if is_v6 else IPV4_UDP_HDR_LEN),
                limit="IPv6 maximum" if is_v6 else "IPv4 maximum", sent=self._sent)
        return self._put(is_v6, src, sport, dst, dport, NULL, payload, plen, NULL)

    cdef void _release(self) noexcept:
        cdef unsigned int i
        for i in range(self._nq):
            if _has_owner(&self._views[i]):
                PyBuffer_Release(&self._views[i])
        self._nq = 0
        self._nd = 0

    cdef int _open(self, bint is_v6) except -1:
        cdef int fd, err, one = 1
        cdef uint32_t mark = self._mark
        fd = socket(AF_INET6 if is_v6 else AF_INET,
                    SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, IPPROTO_RAW)
        if fd < 0:
            err = errno
            if err == EPERM or err == EACCES:
                raise PermissionError(
                    err, "raw sockets need CAP_NET_RAW (run as root or grant the "
                    f"capability): {strerror(err).decode()}")
            raise OSError(err, f"socket(SOCK_RAW): {strerror(err).decode()}")
        # IPv4 gets IP_HDRINCL explicitly (IPPROTO_RAW implies it on Linux, as it does
        # for IPv6). IP_RECVERR makes the kernel report ENOBUFS from a full queue
        # instead of dropping the packet silently, and queues the MTU of EMSGSIZE.
        if is_v6:
            err = setsockopt(fd, IPPROTO_IPV6, IPV6_RECVERR, &one, sizeof(one))
        else:
            err = setsockopt(fd, IPPROTO_IP, IP_HDRINCL, &one, sizeof(one))
            if err == 0:
                err = setsockopt(fd, IPPROTO_IP, IP_RECVERR, &one, sizeof(one))
        if err != 0:
            err = errno
            close(fd)
            raise OSError(err, f"setsockopt on the raw socket: {strerror(err).decode()}")
        if self._has_mark and setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark)) != 0:
            err = errno
            close(fd)
            if err == EPERM or err == EACCES:
                raise PermissionError(err, "SO_MARK needs CAP_NET_ADMIN: "
                                      f"{strerror(err).decode()}")
            raise OSError(err, f"setsockopt(SO_MARK): {strerror(err).decode()}")
        if is_v6:
            self._fd6 = fd
        else:
            self._fd4 = fd
        return 0

    cdef int flush(self) except -1:
        """Send every queued datagram (one sendmmsg per try), then empty the ring."""
        cdef unsigned int n = self._nq, off = 0, j
        cdef int r, err = 0, fd, retries = 0
        if n == 0:
            return 0
        fd = self._fd6 if self._q_v6 else self._fd4
        try:
            while off < n:
                with nogil:
                    r = sendmmsg(fd, self._msgs + off, n - off, 0)
                    if r < 0:
                        err = errno
                    elif r == 0:
                        err = EAGAIN
                if r > 0:
                    for j in range(off, off + <unsigned int>r):
                        if self._kind[j] != 1:      # a whole datagram or its last fragment
                            self._sent += 1
                    off += <unsigned int>r
                    retries = 0
                    continue
                if err == EINTR:
                    PyErr_CheckSignals()
                    continue
                if err == EAGAIN or err == ENOBUFS:     # EWOULDBLOCK == EAGAIN on Linux
                    if retries < MAX_RETRIES:
                        with nogil:
                            _wait_retry(fd, err, retries)
                        retries += 1
                        continue
                if err == EMSGSIZE:
                    self._too_big_mtu(fd, off)
                exc = OSError(err, f"sending on the raw socket: {strerror(err).decode()}"
                              + (f" (after {retries} retries)" if retries else ""))
                exc.sent = self._sent
                raise exc
        finally:
            self._release()
        PyErr_CheckSignals()
        return 0

    cdef int _too_big_mtu(self, int fd, unsigned int off) except -1:
        """Raise PacketTooBig for message off, with the MTU the kernel queued."""
        cdef mmsghdr *m = &self._msgs[off]
        cdef size_t size = m.msg_hdr.msg_iov[0].iov_len + m.msg_hdr.msg_iov[1].iov_len
        raise too_big_error(size, m.msg_hdr.msg_iov[1].iov_len, errqueue_mtu(fd),
                       self._mtu if self._kind[off] else 0, self._sent)
