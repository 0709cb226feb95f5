# BatchSocket: batched datagram I/O with recvmmsg/sendmmsg, original destinations
# (TPROXY), UDP GSO (UDP_SEGMENT) and GRO (UDP_GRO). Included at the end of
# relay/packet/_fast.pyx; relay/packet/pure/batch.py is the pure-Python twin with the same behaviour.
#
# The C side works on two rings from relay/datapath/ring.pxd: a receive ring whose slot buffers
# are exposed to Python as memoryviews (no copy), and a send ring whose iovecs point
# straight into the payload objects (held through the buffer protocol while sending).
from cpython.buffer cimport (
    PyObject_GetBuffer, PyBuffer_Release, PyBuffer_FillInfo, PyObject_CheckBuffer, PyBUF_SIMPLE,
)
from libc.stdint cimport uint16_t
from libc.stdlib cimport calloc, free
from relay.includes.system cimport (
    errno, EAGAIN, EINTR, ENOBUFS, ECONNREFUSED,
    memset, memcpy, strerror, iovec, msghdr, socklen_t, sockaddr_in6,
    AF_INET, AF_INET6, SOCK_DGRAM, SOL_SOCKET, SO_DOMAIN, SO_TYPE, MSG_DONTWAIT, MSG_TRUNC,
    IPPROTO_IP, IPPROTO_IPV6, IP_RECVORIGDSTADDR, IPV6_RECVORIGDSTADDR, SOL_UDP, UDP_GRO,
    getsockopt, setsockopt, sendmsg,
)
from relay.datapath.addr cimport sockaddr_any, sockaddr_from_tuple, sockaddr_to_tuple, raise_oserror
from relay.datapath.ring cimport (
    ring_t, ring_alloc, ring_free, ring_recv, ring_set_send, msg_put_gso, send_all,
)

cdef enum:
    _BS_MAX_BATCH = 1024        # UIO_MAXIOV: the kernel caps an mmsghdr vector there
    _BS_MAX_BUFSIZE = 65536     # one slot holds any UDP datagram or GRO train


cdef inline bint _bs_stop_errno(int err) noexcept nogil:
    """Errors after which send() returns the count so far instead of raising."""
    return err == EAGAIN or err == ENOBUFS or err == ECONNREFUSED    # EAGAIN == EWOULDBLOCK


cdef object _bs_oserror(int err, Py_ssize_t sent):
    exc = OSError(err, strerror(err).decode("utf-8", "replace"))
    exc.sent = sent
    return exc


cdef long _bs_int(str name, object value, long lo, long hi) except? -1:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < lo or value > hi:
        raise ValueError(f"{name} must be in {lo}..{hi}, got {value}")
    return value


cdef socklen_t _bs_dest(object dest, int family, sockaddr_any *out) except 0:
    """Fill out from a (host, port[, flowinfo[, scope_id]]) destination for a socket of
    family; an IPv4 literal on an AF_INET6 socket becomes IPv4-mapped."""
    cdef socklen_t n
    cdef sockaddr_any v4
    if not isinstance(dest, tuple):
        raise TypeError(f"destination must be a (host, port) tuple, not {type(dest).__name__}")
    k = len(<tuple>dest)
    if k < 2 or k > 4:
        raise TypeError(f"destination must be a (host, port) tuple, not a tuple of {k} items")
    host = (<tuple>dest)[0]
    port = (<tuple>dest)[1]
    flowinfo = (<tuple>dest)[2] if k > 2 else 0
    scope_id = (<tuple>dest)[3] if k > 3 else 0
    if not isinstance(host, str):
        raise TypeError(f"destination host must be a str, not {type(host).__name__}")
    _bs_int("destination port", port, 0, 65535)
    _bs_int("destination flowinfo", flowinfo, 0, 0xFFFFF)
    _bs_int("destination scope_id", scope_id, 0, 0xFFFFFFFF)
    if not (<str>host).isascii() or "\0" in <str>host:
        raise ValueError(f"not an IPv4 or IPv6 address literal: {host!r}")
    n = <socklen_t>sockaddr_from_tuple((host, port, flowinfo, scope_id), out)
    if out.sa.sa_family == AF_INET6 and family == AF_INET:
        raise ValueError(f"cannot send to the IPv6 address {host!r} from an AF_INET socket")
    if out.sa.sa_family == AF_INET and family == AF_INET6:
        memcpy(&v4, out, sizeof(sockaddr_any))
        memset(out, 0, sizeof(sockaddr_any))
        out.v6.sin6_family = AF_INET6
        out.v6.sin6_port = v4.v4.sin_port
        out.v6.sin6_addr.s6_addr[10] = 0xff
        out.v6.sin6_addr.s6_addr[11] = 0xff
        memcpy(&out.v6.sin6_addr.s6_addr[12], &v4.v4.sin_addr, 4)
        n = sizeof(sockaddr_in6)
    return n


cdef int _bs_get_payload(object payload, Py_buffer *view, object what) except -1:
    if not PyObject_CheckBuffer(payload):
        raise TypeError(f"{what} must be a bytes-like object, not {type(payload).__name__}")
    try:
        PyObject_GetBuffer(payload, view, PyBUF_SIMPLE)
    except (BufferError, TypeError, ValueError):
        raise ValueError(f"{what} must be a contiguous buffer") from None
    return 0


cdef class _BatchRing:
    """Owner of a receive ring; its buffer protocol exposes the slots' data, so the
    memoryviews BatchSocket.data() returns keep the memory alive."""
    cdef ring_t ring

    def __cinit__(self, unsigned n, size_t slot_size):
        ring_alloc(&self.ring, n, slot_size)

    def __dealloc__(self):
        ring_free(&self.ring)

    def __getbuffer__(self, Py_buffer *view, int flags):
        PyBuffer_FillInfo(view, self, self.ring.data,
                          <Py_ssize_t>(self.ring.n * self.ring.slot_size), 0, flags)

    def __releasebuffer__(self, Py_buffer *view):
        pass


cdef class BatchSocket:
    """Batched, non-blocking datagram I/O on a UDP socket.

    BatchSocket(sock_or_fd, *, batch=64, bufsize=65536, recv_origdst=False, gro=False)

    ``sock_or_fd`` is a socket object (kept referenced, closed by close()) or a file
    descriptor (borrowed, never closed) of an AF_INET/AF_INET6 SOCK_DGRAM socket. Every
    call is non-blocking whatever the socket's mode. ``recv_origdst`` sets
    IP_RECVORIGDSTADDR (and IPV6_RECVORIGDSTADDR on AF_INET6 sockets) so origdst() reports
    where a TPROXY'd datagram was going; ``gro`` sets UDP_GRO so one slot may hold several
    datagrams of segment_size() bytes (use bufsize=65536 then, or trains get cut).

    recv() -> int: up to ``batch`` datagrams with one recvmmsg; 0 when none is queued.
    Then for i in range(n): data(i) (a writable memoryview valid until the next recv),
    source(i), origdst(i), truncated(i), segment_size(i), segments(i).

    send(items) -> int: items are ``(payload, dest)`` tuples or bare payloads (connected
    socket; dest None); payloads are bytes-like, dest is (host, port[, flowinfo,
    scope_id]) with an IP literal host (IPv4 literals are IPv4-mapped on AF_INET6
    sockets). One sendmmsg per ``batch`` items. Returns how many datagrams went out; when
    the kernel answers EAGAIN, ENOBUFS or ECONNREFUSED it stops there, returns the count
    and sets ``last_error``; retry items[count:] later. Other errors raise OSError (bad
    items TypeError/ValueError) with ``.sent`` = datagrams sent before the failure.

    send_gso(payloads_or_buffer, segment_size, dest=None) -> int: one UDP_SEGMENT send;
    the kernel splits the data into datagrams of segment_size bytes (the last may be
    shorter). Returns the datagram count, 0 on EAGAIN/ENOBUFS/ECONNREFUSED.

    Not thread-safe: use one BatchSocket per thread.
    """
    cdef _BatchRing _rxmem
    cdef ring_t *_rx
    cdef ring_t _tx
    cdef Py_buffer *_bufs
    cdef object _sock
    cdef object _view
    cdef int _fd
    cdef int _family
    cdef unsigned _batch
    cdef size_t _bufsize
    cdef int _last_error
    cdef bint _closed
    cdef bint _busy

    def __cinit__(self):
        memset(&self._tx, 0, sizeof(ring_t))
        self._bufs = NULL
        self._rx = NULL
        self._fd = -1
        self._closed = True
        self._busy = False

    def __init__(self, sock_or_fd, *, batch=64, bufsize=65536, recv_origdst=False, gro=False):
        cdef int fd, val = 0, one = 1
        cdef socklen_t vlen = sizeof(int)
        if self._bufs != NULL:
            raise RuntimeError("BatchSocket is already initialised")
        if isinstance(sock_or_fd, int) and not isinstance(sock_or_fd, bool):
            owner = None
            fd = _bs_int("file descriptor", sock_or_fd, 0, 0x7FFFFFFF)
        elif hasattr(sock_or_fd, "fileno"):
            owner = sock_or_fd
            fd_obj = sock_or_fd.fileno()
            if isinstance(fd_obj, int) and fd_obj < 0:
                raise ValueError("the socket is closed")
            fd = _bs_int("fileno()", fd_obj, 0, 0x7FFFFFFF)
        else:
            raise TypeError(f"expected a socket or a file descriptor, not {type(sock_or_fd).__name__}")
        self._batch = <unsigned>_bs_int("batch", batch, 1, _BS_MAX_BATCH)
        self._bufsize = <size_t>_bs_int("bufsize", bufsize, 1, _BS_MAX_BUFSIZE)
        if getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &val, &vlen) != 0:
            raise_oserror(errno)
        self._family = val
        vlen = sizeof(int)
        if getsockopt(fd, SOL_SOCKET, SO_TYPE, &val, &vlen) != 0:
            raise_oserror(errno)
        if self._family != AF_INET and self._family != AF_INET6:
            raise ValueError("BatchSocket needs an AF_INET or AF_INET6 socket")
        if val != SOCK_DGRAM:
            raise ValueError("BatchSocket needs a datagram (SOCK_DGRAM) socket")
        if recv_origdst:
            if self._family == AF_INET6:
                if setsockopt(fd, IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, &one, sizeof(int)) != 0:
                    raise_oserror(errno, "IPV6_RECVORIGDSTADDR")
                # IPv4 traffic on a dual-stack socket reports its destination this way.
                setsockopt(fd, IPPROTO_IP, IP_RECVORIGDSTADDR, &one, sizeof(int))
            elif setsockopt(fd, IPPROTO_IP, IP_RECVORIGDSTADDR, &one, sizeof(int)) != 0:
                raise_oserror(errno, "IP_RECVORIGDSTADDR")
        if gro:
            if setsockopt(fd, SOL_UDP, UDP_GRO, &one, sizeof(int)) != 0:
                raise_oserror(errno, "UDP_GRO")
        self._rxmem = _BatchRing(self._batch, self._bufsize)
        self._rx = &self._rxmem.ring
        ring_alloc(&self._tx, self._batch, 0)
        self._bufs = <Py_buffer *>calloc(self._batch, sizeof(Py_buffer))
        if self._bufs == NULL:
            raise MemoryError()
        self._view = memoryview(self._rxmem)
        self._sock = owner
        self._fd = fd
        self._closed = False

    def __dealloc__(self):
        ring_free(&self._tx)
        free(self._bufs)
        self._bufs = NULL

    # -- state ---------------------------------------------------------------------

    cdef inline int _check(self) except -1:
        if self._closed:
            raise ValueError("I/O operation on a closed BatchSocket")
        if self._busy:
            raise RuntimeError("BatchSocket is in use by another call (one thread at a time)")
        return 0

    cdef inline unsigned _slot(self, Py_ssize_t i) except? 0xFFFFFFFF:
        if self._closed:
            raise ValueError("I/O operation on a closed BatchSocket")
        if i < 0 or i >= <Py_ssize_t>self._rx.count:
            raise IndexError(f"slot {i} out of range: the last recv() returned {self._rx.count}")
        return <unsigned>i

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
        return 0 if self._rx == NULL else self._rx.count

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
        if self._rx != NULL:
            self._rx.count = 0
        sock, self._sock = self._sock, None
        if sock is not None and hasattr(sock, "close"):
            sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self._closed else f"fd={self._fd}"
        fam = "AF_INET6" if self._family == AF_INET6 else "AF_INET"
        return f"<BatchSocket {state} {fam} batch={self._batch} bufsize={self._bufsize}>"

    # -- receive -------------------------------------------------------------------

    def recv(self):
        """Receive up to `batch` datagrams without blocking; returns how many (0: none)."""
        cdef int n
        self._check()
        self._busy = True
        try:
            with nogil:
                n = ring_recv(self._rx, self._fd, self._batch, 0)
        finally:
            self._busy = False
        if n < 0:
            raise_oserror(-n)
        return n

    def data(self, Py_ssize_t i):
        """Payload of slot i (a memoryview into the ring, valid until the next recv)."""
        cdef unsigned s = self._slot(i)
        cdef size_t off = <size_t>s * self._bufsize
        return self._view[off:off + self._rx.slots[s].len]

    def source(self, Py_ssize_t i):
        """(host, port) the datagram in slot i came from."""
        cdef unsigned s = self._slot(i)
        return sockaddr_to_tuple(&self._rx.names[s].sa)

    def origdst(self, Py_ssize_t i):
        """(host, port) slot i's datagram was addressed to (TPROXY), or None when the
        socket does not report it (recv_origdst=False)."""
        cdef unsigned s = self._slot(i)
        if not self._rx.slots[s].has_origdst:
            return None
        return sockaddr_to_tuple(&self._rx.slots[s].origdst.sa)

    def truncated(self, Py_ssize_t i):
        """True when slot i's datagram was longer than bufsize and got cut."""
        cdef unsigned s = self._slot(i)
        return bool(self._rx.slots[s].flags & MSG_TRUNC)

    def segment_size(self, Py_ssize_t i):
        """GRO segment size of slot i (0 when not coalesced): split data(i) by it."""
        cdef unsigned s = self._slot(i)
        return self._rx.slots[s].gro_size

    def segments(self, Py_ssize_t i):
        """The datagrams of slot i: data(i) split by the GRO segment size."""
        cdef unsigned s = self._slot(i)
        cdef size_t off = <size_t>s * self._bufsize
        cdef size_t end = off + self._rx.slots[s].len
        cdef size_t step = <size_t>self._rx.slots[s].gro_size
        if step == 0 or end - off <= step:
            return [self._view[off:end]]
        out = []
        while off < end:
            out.append(self._view[off:min(off + step, end)])
            off += step
        return out

    # -- send ----------------------------------------------------------------------

    cdef int _flush(self, unsigned k, unsigned *sent):
        cdef int rc
        cdef unsigned j
        with nogil:
            rc = send_all(self._fd, self._tx.msgs, k, sent)
        for j in range(k):
            PyBuffer_Release(&self._bufs[j])
        return rc

    def send(self, items):
        """Send (payload, dest) items or bare payloads; returns how many went out."""
        cdef unsigned k = 0, sent = 0
        cdef Py_ssize_t total = 0
        cdef int rc = 0
        cdef sockaddr_any sa
        cdef socklen_t salen = 0
        cdef bint has_dest
        cdef unsigned j
        cdef object last = None
        self._check()
        self._busy = True
        self._last_error = 0
        try:
            try:
                it = iter(items)
            except TypeError:
                raise TypeError(f"items must be an iterable, not {type(items).__name__}") from None
            while True:
                try:
                    item = next(it, _BS_END)
                    if item is _BS_END:
                        break
                    if isinstance(item, tuple):
                        if len(<tuple>item) != 2:
                            raise TypeError("an item must be a payload or a (payload, destination) "
                                            f"tuple, not a tuple of {len(<tuple>item)} items")
                        payload = (<tuple>item)[0]
                        dest = (<tuple>item)[1]
                    else:
                        payload = item
                        dest = None
                    has_dest = dest is not None
                    if has_dest and not (dest is last or (last is not None and dest == last)):
                        last = None
                        salen = _bs_dest(dest, self._family, &sa)
                        last = dest
                    _bs_get_payload(payload, &self._bufs[k], "payload")
                except BaseException as exc:
                    # Items before the bad one go out first, as if sent one by one.
                    if k:
                        rc = self._flush(k, &sent)
                        total += sent
                        k = 0
                        if rc:
                            return self._stopped(rc, total)
                    try:
                        exc.sent = total
                    except Exception:
                        pass
                    raise
                ring_set_send(&self._tx, k, self._bufs[k].buf, <size_t>self._bufs[k].len,
                              &sa if has_dest else NULL, salen if has_dest else 0)
                k += 1
                if k == self._batch:
                    rc = self._flush(k, &sent)
                    total += sent
                    k = 0
                    if rc:
                        return self._stopped(rc, total)
            if k:
                rc = self._flush(k, &sent)
                total += sent
                k = 0
                if rc:
                    return self._stopped(rc, total)
            return total
        finally:
            for j in range(k):
                PyBuffer_Release(&self._bufs[j])
            self._busy = False

    cdef object _stopped(self, int rc, Py_ssize_t total):
        cdef int err = -rc
        if _bs_stop_errno(err):
            self._last_error = err
            return total
        raise _bs_oserror(err, total)

    def send_gso(self, payloads, segment_size, dest=None):
        """One UDP_SEGMENT send: a bytes-like buffer, or an iterable of payloads all
        segment_size bytes long except the last (which may be shorter). The kernel sends
        them as separate datagrams. Returns the datagram count (0 for no payloads, or when
        the kernel answers EAGAIN/ENOBUFS/ECONNREFUSED: see last_error)."""
        cdef long seg
        cdef sockaddr_any sa
        cdef socklen_t salen = 0
        cdef msghdr m
        cdef size_t ctrl[8]          # >= CMSG_SPACE(2), aligned for cmsghdr
        cdef Py_buffer *bufs = NULL
        cdef iovec *iov = NULL
        cdef Py_ssize_t nbuf = 0, held = 0, j, count, total = 0
        cdef ssize_t rc
        cdef int err = 0
        cdef bint is_buf
        self._check()
        seg = _bs_int("segment_size", segment_size, 1, 65535)
        if dest is not None:
            salen = _bs_dest(dest, self._family, &sa)
        self._busy = True
        self._last_error = 0
        try:
            is_buf = PyObject_CheckBuffer(payloads)
            if is_buf:
                seq = (payloads,)
            else:
                try:
                    seq = tuple(payloads)
                except TypeError:
                    raise TypeError("payloads must be a bytes-like object or an iterable of "
                                    f"them, not {type(payloads).__name__}") from None
                if len(seq) == 0:
                    return 0
            nbuf = len(seq)
            bufs = <Py_buffer *>calloc(nbuf, sizeof(Py_buffer))
            iov = <iovec *>calloc(nbuf, sizeof(iovec))
            if bufs == NULL or iov == NULL:
                raise MemoryError()
            for j in range(nbuf):
                _bs_get_payload(seq[j], &bufs[j], "payloads" if is_buf else f"segment {j}")
                held += 1
                if not is_buf:
                    if j < nbuf - 1 and bufs[j].len != seg:
                        raise ValueError(f"segment {j} is {bufs[j].len} bytes; all but the last "
                                         f"must be segment_size ({seg}) bytes")
                    if j == nbuf - 1 and bufs[j].len > seg:
                        raise ValueError(f"the last segment is {bufs[j].len} bytes, more than "
                                         f"segment_size ({seg})")
                iov[j].iov_base = bufs[j].buf
                iov[j].iov_len = <size_t>bufs[j].len
                total += bufs[j].len
            if is_buf:
                count = (total + seg - 1) // seg if total else 1
            else:
                count = nbuf
            memset(&m, 0, sizeof(msghdr))
            m.msg_iov = iov
            m.msg_iovlen = <size_t>nbuf
            if salen:
                m.msg_name = &sa
                m.msg_namelen = salen
            msg_put_gso(&m, <unsigned char *>ctrl, <uint16_t>seg)
            with nogil:
                while True:
                    rc = sendmsg(self._fd, &m, MSG_DONTWAIT)
                    if rc >= 0:
                        break
                    err = errno
                    if err != EINTR:
                        break
            if rc < 0:
                if _bs_stop_errno(err):
                    self._last_error = err
                    return 0
                raise _bs_oserror(err, 0)
            return count
        finally:
            for j in range(held):
                PyBuffer_Release(&bufs[j])
            free(bufs)
            free(iov)
            self._busy = False


_BS_END = object()
