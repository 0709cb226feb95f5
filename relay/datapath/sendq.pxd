# cython: language_level=3
# Outgoing UDP datagrams of one socket, sent with sendmmsg, with runs coalesced into GSO.
#
# Datagrams whose payloads live anywhere (a TCP receive buffer between frame headers, a
# receive ring) are queued with sq_add(); a run of datagrams to the same address with the
# same size (the last of a run may be shorter) becomes ONE message whose iovecs are those
# datagrams plus a UDP_SEGMENT control message: the stack carries it as one packet and the
# device (or the receiver) cuts it at the segment size, so every datagram arrives as it was
# queued, with its own UDP header. A run needs no copy: each iovec is one datagram.
#
#     sq_init(&q, cap)                        # room for cap datagrams
#     q.fd = fd
#     if sq_full(&q): sq_flush(&q, st, C_UP_DATAGRAMS, C_UP_BYTES)
#     sq_add(&q, &dst, dstlen, data, n)
#     sq_flush(&q, st, C_UP_DATAGRAMS, C_UP_BYTES)   # counts datagrams, every drop by reason
#
# sq_set_src(&q, family, addr) makes the datagrams queued next leave from that local
# address (an IP_PKTINFO / IPV6_PKTINFO control message on each message, next to its
# UDP_SEGMENT one): a socket bound to a wildcard address answers from the address its
# client reached instead of the one the route would pick. Runs never cross a change.
#
# A route that refuses a segment size (larger than its MTU: EINVAL) gets that message's
# datagrams one by one, and the queue stops coalescing datagrams that large (gso_max).
# Every function runs without the GIL and allocates nothing after sq_init.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport memcmp
from relay.includes.system cimport (
    errno, EAGAIN, EINTR, EINVAL, EIO, EMSGSIZE, ENETUNREACH, EHOSTUNREACH, EADDRNOTAVAIL,
    EACCES, EPERM, memcpy, memset, iovec, msghdr, mmsghdr, socklen_t, sendmmsg, sendmsg, MSG_DONTWAIT,
    AF_INET,
)
from relay.datapath.addr cimport sockaddr_any
from relay.datapath.ring cimport msg_put_gso, msg_put_src_dev, msg_one_of, SRC_CTRL
from relay.datapath.stats cimport (
    C_DROP_BUFFER_FULL, C_DROP_TOO_BIG, C_DROP_NO_ROUTE, C_DROP_SEND_ERROR, C_DROP_PERMISSION,
    C_OFFLOAD_FALLBACK,
)


cdef enum:
    SQ_MAX_SEGS = 64             # datagrams per GSO message (the kernel's older limit)
    SQ_GSO_BYTES = 65000         # payload bytes per GSO message (IP total length < 65536)
    SQ_CTRL = SRC_CTRL + 24      # source address (<= 40) + UDP_SEGMENT (24), multiple of 8
    SQ_GSO_MAX = 65000           # segment sizes tried before a route refuses one


cdef struct sendq_t:
    mmsghdr *msgs
    iovec *iovs                  # one per datagram; message i's iovecs are contiguous
    sockaddr_any *names
    uint8_t *ctrl                # cap * SQ_CTRL
    uint32_t *seg                # message i: its segment size (its first datagram's size)
    uint32_t *nbytes             # message i: payload bytes
    bint *closed                 # message i: a shorter datagram ended the run
    int n                        # messages queued
    int cap                      # datagrams the queue holds
    int niov                     # datagrams queued (iovecs used)
    int fd
    uint32_t gso_max             # largest segment size still coalesced (0: never)
    int src_family               # messages queued from now leave from src (0: the route's)
    uint8_t src[16]
    int src_ifindex              # ... and leave through this interface (0: the route's)
    int src_from                 # first message queued with this source


cdef inline int sq_init(sendq_t *q, int cap) except -1:
    q.msgs = <mmsghdr *>calloc(cap, sizeof(mmsghdr))
    q.iovs = <iovec *>calloc(cap, sizeof(iovec))
    q.names = <sockaddr_any *>calloc(cap, sizeof(sockaddr_any))
    q.ctrl = <uint8_t *>calloc(cap, SQ_CTRL)
    q.seg = <uint32_t *>calloc(cap, sizeof(uint32_t))
    q.nbytes = <uint32_t *>calloc(cap, sizeof(uint32_t))
    q.closed = <bint *>calloc(cap, sizeof(bint))
    if not (q.msgs and q.iovs and q.names and q.ctrl and q.seg and q.nbytes and q.closed):
        sq_free(q)
        raise MemoryError()
    q.cap = cap
    q.n = 0
    q.niov = 0
    q.fd = -1
    q.gso_max = SQ_GSO_MAX
    q.src_family = 0
    q.src_ifindex = 0
    q.src_from = 0
    return 0


cdef inline void sq_free(sendq_t *q) noexcept nogil:
    free(q.msgs)
    free(q.iovs)
    free(q.names)
    free(q.ctrl)
    free(q.seg)
    free(q.nbytes)
    free(q.closed)
    q.msgs = NULL
    q.iovs = NULL
    q.names = NULL
    q.ctrl = NULL
    q.seg = NULL
    q.nbytes = NULL
    q.closed = NULL
    q.n = q.cap = q.niov = 0


cdef inline bint sq_full(const sendq_t *q) noexcept nogil:
    return q.niov >= q.cap


cdef inline void sq_clear(sendq_t *q) noexcept nogil:
    q.n = 0
    q.niov = 0
    q.src_from = 0


cdef inline void sq_set_src(sendq_t *q, int family, const uint8_t *addr) noexcept nogil:
    """Datagrams queued from now leave from addr (4 bytes for AF_INET, 16 for AF_INET6;
    family 0: the address the route picks, as without this call)."""
    sq_set_src_dev(q, family, addr, 0)


cdef inline void sq_set_src_dev(sendq_t *q, int family, const uint8_t *addr,
                                int ifindex) noexcept nogil:
    """sq_set_src through interface ifindex (0: the route's; addr NULL: the source that
    interface's route picks)."""
    q.src_family = family
    q.src_ifindex = ifindex
    if family:
        if addr != NULL:
            memcpy(q.src, addr, 4 if family == AF_INET else 16)
        else:
            memset(q.src, 0, 16)
    q.src_from = q.n


cdef inline bint run_join(msghdr *h, uint8_t *ctrl, uint32_t *seg, uint32_t *nbytes,
                          bint *closed, iovec *iov, const void *data, size_t n,
                          uint32_t gso_max) noexcept nogil:
    """Append a datagram of n bytes to the run of message h (segment size *seg, payload
    *nbytes, *closed once a shorter datagram ended it) if it continues the run: same size
    (or shorter, which closes it), within the GSO limits. iov is the next free iovec,
    right after h's. The caller has checked the destination (and socket). On the second
    datagram the message gets its UDP_SEGMENT control message (written into ctrl)."""
    if (n == 0 or closed[0] or n > seg[0] or seg[0] > gso_max
            or h.msg_iovlen >= SQ_MAX_SEGS or nbytes[0] + n > SQ_GSO_BYTES):
        return False
    if h.msg_iovlen == 1:
        msg_put_gso(h, ctrl, <uint16_t>seg[0])
    if n < seg[0]:
        closed[0] = True
    iov.iov_base = <void *>data
    iov.iov_len = n
    h.msg_iovlen += 1
    nbytes[0] += <uint32_t>n
    return True


cdef inline void run_start(msghdr *h, iovec *iov, void *name, socklen_t namelen,
                           const void *data, size_t n, uint32_t *seg, uint32_t *nbytes,
                           bint *closed) noexcept nogil:
    """Make h a one-datagram message (the start of a possible run) to name (none when
    namelen is 0: a connected socket), its payload in iov."""
    iov.iov_base = <void *>data
    iov.iov_len = n
    h.msg_iov = iov
    h.msg_iovlen = 1
    h.msg_name = name if namelen else NULL
    h.msg_namelen = namelen
    h.msg_control = NULL
    h.msg_controllen = 0
    h.msg_flags = 0
    seg[0] = <uint32_t>n
    nbytes[0] = <uint32_t>n
    closed[0] = False


cdef inline void sq_add(sendq_t *q, const sockaddr_any *to, socklen_t tolen,
                        const uint8_t *data, size_t n) noexcept nogil:
    """Queue one datagram (the caller flushes first when sq_full(q)). The payload must
    stay where it is until sq_flush()."""
    cdef int i = q.n - 1
    if not (i >= q.src_from and q.msgs[i].msg_hdr.msg_namelen == tolen
            and memcmp(&q.names[i], to, tolen) == 0
            and run_join(&q.msgs[i].msg_hdr, q.ctrl + <size_t>i * SQ_CTRL, &q.seg[i],
                         &q.nbytes[i], &q.closed[i], &q.iovs[q.niov], data, n, q.gso_max)):
        i = q.n
        q.n += 1
        memcpy(&q.names[i], to, tolen)
        run_start(&q.msgs[i].msg_hdr, &q.iovs[q.niov], &q.names[i], tolen, data, n,
                  &q.seg[i], &q.nbytes[i], &q.closed[i])
        if q.src_family:
            msg_put_src_dev(&q.msgs[i].msg_hdr, q.ctrl + <size_t>i * SQ_CTRL, q.src_family,
                            q.src, q.src_ifindex)
    q.niov += 1


cdef inline void _sq_drop(uint64_t *st, int e, uint64_t count) noexcept nogil:
    if e == EAGAIN:
        st[C_DROP_BUFFER_FULL] += count
    elif e == EMSGSIZE:
        st[C_DROP_TOO_BIG] += count
    elif e == ENETUNREACH or e == EHOSTUNREACH or e == EADDRNOTAVAIL:
        st[C_DROP_NO_ROUTE] += count
    elif e == EACCES or e == EPERM:
        st[C_DROP_PERMISSION] += count
    else:
        st[C_DROP_SEND_ERROR] += count


cdef inline void _sq_one_by_one(sendq_t *q, int i, uint64_t *st, int c_dg,
                                int c_bytes) noexcept nogil:
    """Send the datagrams of message i as plain datagrams (a refused GSO message), from
    its source address if it has one."""
    cdef msghdr h
    cdef msghdr *g = &q.msgs[i].msg_hdr
    cdef size_t j
    cdef ssize_t r
    cdef int e
    msg_one_of(g, &h)
    j = 0
    while j < g.msg_iovlen:
        h.msg_iov = &g.msg_iov[j]
        r = sendmsg(q.fd, &h, MSG_DONTWAIT)
        if r < 0:
            e = errno
            if e == EINTR:
                continue
            if e == EAGAIN:
                st[C_DROP_BUFFER_FULL] += g.msg_iovlen - j
                return
            _sq_drop(st, e, 1)
        elif c_dg >= 0:
            st[c_dg] += 1
            st[c_bytes] += g.msg_iov[j].iov_len
        j += 1


cdef inline int sq_flush(sendq_t *q, uint64_t *st, int c_dg, int c_bytes) noexcept nogil:
    """sendmmsg everything queued on q.fd; counts sent datagrams/bytes (unless c_dg < 0,
    for callers that count payload themselves) and every drop by reason. Empties q."""
    cdef int i = 0, r, j, e
    cdef uint64_t rest
    while i < q.n:
        r = sendmmsg(q.fd, q.msgs + i, q.n - i, MSG_DONTWAIT)
        if r > 0:
            if c_dg >= 0:
                for j in range(i, i + r):
                    st[c_dg] += q.msgs[j].msg_hdr.msg_iovlen
                    st[c_bytes] += q.nbytes[j]
            i += r
            continue
        e = errno
        if r < 0 and e == EINTR:
            continue
        if r < 0 and e == EAGAIN:
            rest = 0
            for j in range(i, q.n):
                rest += q.msgs[j].msg_hdr.msg_iovlen
            st[C_DROP_BUFFER_FULL] += rest
            break
        if q.msgs[i].msg_hdr.msg_iovlen > 1 and (e == EINVAL or e == EIO or e == EMSGSIZE):
            # this route (MTU) refuses segments of this size, or the device refuses GSO
            # (EIO: no checksum offload): do not coalesce such datagrams again
            if e == EIO:
                q.gso_max = 0
            elif q.seg[i] - 1 < q.gso_max:
                q.gso_max = q.seg[i] - 1
            st[C_OFFLOAD_FALLBACK] += 1
            _sq_one_by_one(q, i, st, c_dg, c_bytes)
        else:
            _sq_drop(st, e, q.msgs[i].msg_hdr.msg_iovlen)
        i += 1
    q.n = 0
    q.niov = 0
    q.src_from = 0
    return 0
