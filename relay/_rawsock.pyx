# cython: language_level=3, boundscheck=False, wraparound=False
"""RawSender: spoofed IPv4/IPv6 + UDP datagrams through IPPROTO_RAW sockets.

Headers are written by ``write_udp_headers`` into a ring of ``batch`` 48-byte slots;
each message is two iovecs (header, payload — the payload is not copied) and the
ring goes out with one sendmmsg() when full, when the address family changes, or
at the end of the call. The payload buffers are held (Py_buffer) until their batch
has been sent.
"""
from cpython.buffer cimport PyBuffer_Release, PyBUF_SIMPLE, PyObject_CheckBuffer
from cpython.exc cimport PyErr_Clear, PyErr_CheckSignals
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from libc.stdint cimport uint8_t, uint16_t, uint32_t

from relay.includes.system cimport (
    errno, EAGAIN, EINTR, ENOBUFS, EMSGSIZE, EPERM, EACCES,
    memcpy, memset, strerror, close,
    iovec, msghdr, mmsghdr, cmsghdr, CMSG_FIRSTHDR, CMSG_NXTHDR, CMSG_DATA,
    socket, setsockopt, sendmmsg, recvmsg, sockaddr_in, sockaddr_in6,
    AF_INET, AF_INET6, SOCK_RAW, SOCK_NONBLOCK, SOCK_CLOEXEC, SOL_SOCKET, MSG_DONTWAIT,
    IPPROTO_IP, IPPROTO_IPV6, IPPROTO_RAW, IP_HDRINCL, SO_MARK, IP_RECVERR, IPV6_RECVERR,
    MSG_ERRQUEUE, sock_extended_err, pollfd, poll, POLLOUT, ntohs,
)
from relay._pkt cimport (
    write_udp_headers, IPV4_UDP_HDR_LEN, IPV6_UDP_HDR_LEN,
    MAX_IPV4_UDP_PAYLOAD, MAX_IPV6_UDP_PAYLOAD,
)
from relay._addr cimport sockaddr_any, sockaddr_from_tuple

from relay.errors import PacketTooBig

cdef extern from "Python.h":
    # Same function as cpython.buffer's, declared without exception propagation so
    # that a refused payload can be reported with our own message.
    int _get_buffer "PyObject_GetBuffer"(object obj, Py_buffer *view, int flags)


cdef enum:
    SLOT_LEN = 48           # room for the IPv6 + UDP headers
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

    RawSender(*, mark=None, ttl=64, batch=64)

    ``send(src, dst, payload)`` sends one datagram; ``send_many(items)`` sends an
    iterable of ``(src, dst, payload)`` with one sendmmsg() per ``batch`` datagrams
    and returns how many went out. Addresses are ``(host, port)`` tuples with IP
    literals (IPv6 may add flowinfo, scope_id); both of one datagram must be of the
    same family. Packets carry the given TTL, DF set, and the kernel picks the IPv4
    identification. Needs CAP_NET_RAW; ``mark`` (SO_MARK) needs CAP_NET_ADMIN.

    Errors: ``PacketTooBig`` (limit "IPv4 maximum", "IPv6 maximum" or "interface
    MTU"), ValueError/TypeError for bad input, OSError for the rest; in send_many
    each carries ``.sent``, the number of datagrams that went out before the
    failing one (queued datagrams are flushed before raising, none after it goes).
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
        self._nq = 0
        self._sent = 0

    def __init__(self, *, mark=None, ttl=DEFAULT_TTL, batch=DEFAULT_BATCH):
        cdef unsigned int i
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
        if self._busy:
            raise RuntimeError("RawSender is in use by another thread")
        self._teardown()
        self._has_mark = mark is not None
        self._mark = mark if mark is not None else 0
        self._ttl = ttl
        self._batch = batch
        self._hdrs = <uint8_t *>PyMem_Calloc(batch, SLOT_LEN)
        self._iov = <iovec *>PyMem_Calloc(2 * batch, sizeof(iovec))
        self._msgs = <mmsghdr *>PyMem_Calloc(batch, sizeof(mmsghdr))
        self._names = <sockaddr_any *>PyMem_Calloc(batch, sizeof(sockaddr_any))
        self._views = <Py_buffer *>PyMem_Calloc(batch, sizeof(Py_buffer))
        if (self._hdrs == NULL or self._iov == NULL or self._msgs == NULL
                or self._names == NULL or self._views == NULL):
            self._teardown()
            raise MemoryError()
        for i in range(batch):
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
        cdef int fd
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
        fd = self._fd6 if is_v6 else self._fd4
        if fd < 0 or (self._nq and is_v6 != self._q_v6):
            try:
                if self._nq and is_v6 != self._q_v6:
                    self.flush()
                if fd < 0:
                    self._open(is_v6)
            except BaseException:
                PyBuffer_Release(&view)
                raise
        if is_v6:
            self._slot(True, <const uint8_t *>&self._src_sa.v6.sin6_addr,
                       ntohs(self._src_sa.v6.sin6_port),
                       <const uint8_t *>&self._dst_sa.v6.sin6_addr,
                       ntohs(self._dst_sa.v6.sin6_port), &self._dst_sa,
                       <const uint8_t *>view.buf, plen)
        else:
            self._slot(False, <const uint8_t *>&self._src_sa.v4.sin_addr,
                       ntohs(self._src_sa.v4.sin_port),
                       <const uint8_t *>&self._dst_sa.v4.sin_addr,
                       ntohs(self._dst_sa.v4.sin_port), &self._dst_sa,
                       <const uint8_t *>view.buf, plen)
        # The slot owns the buffer from here on; flush() releases it.
        self._views[self._nq] = view
        self._nq += 1
        if self._nq >= self._batch:
            self.flush()
        return 0

    cdef int _slot(self, bint is_v6, const uint8_t *src, uint16_t sport,
                   const uint8_t *dst, uint16_t dport, const sockaddr_any *dst_sa,
                   const uint8_t *payload, size_t plen) except -1:
        """Write the headers and the message of the next free slot (not counted yet)."""
        cdef unsigned int i = self._nq
        cdef uint8_t *hdr = self._hdrs + i * SLOT_LEN
        cdef iovec *iov = &self._iov[2 * i]
        cdef sockaddr_any *name = &self._names[i]
        iov[0].iov_base = hdr
        iov[0].iov_len = write_udp_headers(hdr, is_v6, src, sport, dst, dport, payload,
                                           plen, self._ttl, 0, 0, True, 0)
        iov[1].iov_base = <void *>payload
        iov[1].iov_len = plen
        # Raw sockets take the destination with port 0 (IPv6: the port would name
        # the protocol); the headers carry the real ports.
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
        return 0

    cdef int queue_raw(self, bint is_v6, const uint8_t *src, uint16_t sport,
                       const uint8_t *dst, uint16_t dport,
                       const uint8_t *payload, size_t plen) except -1:
        """Queue one datagram from C (addresses in network order, ports in host order).
        The payload must stay valid until the next queue_raw()/flush() returns."""
        cdef int fd
        if self._closed:
            raise ValueError("send on a closed RawSender")
        if plen > <size_t>(MAX_IPV6_UDP_PAYLOAD if is_v6 else MAX_IPV4_UDP_PAYLOAD):
            raise PacketTooBig(
                f"UDP payload of {plen} bytes is over the {'IPv6' if is_v6 else 'IPv4'} "
                "maximum", size=plen + (IPV6_UDP_HDR_LEN if is_v6 else IPV4_UDP_HDR_LEN),
                limit="IPv6 maximum" if is_v6 else "IPv4 maximum", sent=self._sent)
        if self._nq and is_v6 != self._q_v6:
            self.flush()
        fd = self._fd6 if is_v6 else self._fd4
        if fd < 0:
            self._open(is_v6)
        self._slot(is_v6, src, sport, dst, dport, NULL, payload, plen)
        _set_no_owner(&self._views[self._nq])
        self._nq += 1
        if self._nq >= self._batch:
            self.flush()
        return 0

    cdef void _release(self) noexcept:
        cdef unsigned int i
        for i in range(self._nq):
            if _has_owner(&self._views[i]):
                PyBuffer_Release(&self._views[i])
        self._nq = 0

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
        cdef unsigned int n = self._nq, off = 0
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
                    off += <unsigned int>r
                    self._sent += r
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
        cdef msghdr *m = &self._msgs[off].msg_hdr
        cdef size_t size = m.msg_iov[0].iov_len + m.msg_iov[1].iov_len
        cdef size_t plen = m.msg_iov[1].iov_len
        cdef uint32_t mtu = 0
        cdef msghdr em
        cdef cmsghdr *cm
        cdef sock_extended_err *ee
        cdef char ctrl[512]
        cdef char dummy[8]
        cdef iovec eiov
        # Drain the error queue (IP_RECVERR): the last EMSGSIZE entry has the MTU.
        while True:
            memset(&em, 0, sizeof(em))
            eiov.iov_base = dummy
            eiov.iov_len = sizeof(dummy)
            em.msg_iov = &eiov
            em.msg_iovlen = 1
            em.msg_control = ctrl
            em.msg_controllen = sizeof(ctrl)
            if recvmsg(fd, &em, MSG_ERRQUEUE | MSG_DONTWAIT) < 0:
                break
            cm = CMSG_FIRSTHDR(&em)
            while cm != NULL:
                ee = <sock_extended_err *>CMSG_DATA(cm)
                if ee.ee_errno == EMSGSIZE:
                    mtu = ee.ee_info
                cm = CMSG_NXTHDR(&em, cm)
        mtu_text = f"the interface MTU ({mtu} bytes)" if mtu else "the interface MTU"
        raise PacketTooBig(
            f"packet of {size} bytes (UDP payload {plen}) is larger than {mtu_text}; "
            "raw packets are not fragmented", size=size, limit="interface MTU",
            sent=self._sent)
