# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Data path of the UDP-over-TCP tunnel and of SOCKS5 UDP (see docs/tunnel.md).

Control (accept, handshakes, logging) stays in Python and happens once per connection;
datagrams and frames are handled here in batches: recvmmsg -> frames -> one TCP write,
TCP read -> frames -> sendmmsg. relay.tunnelproto is the pure reference of the codec.
"""
import errno as _errno
import os
import socket
import logging

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int16_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memmove
from relay.includes.system cimport (
    errno, EAGAIN, EINTR, EMSGSIZE, ENETUNREACH, EHOSTUNREACH, EADDRNOTAVAIL, EPERM, EACCES,
    ECONNREFUSED, memcpy, memset, memcmp, close, read,
    timespec, clock_gettime, CLOCK_MONOTONIC,
    iovec, sockaddr, sockaddr_in, sockaddr_in6, socklen_t, msghdr, mmsghdr,
    AF_INET, AF_INET6, SOCK_DGRAM, SOCK_NONBLOCK, SOCK_CLOEXEC, SOL_SOCKET, SO_ERROR,
    SO_RCVBUF, SO_SNDBUF, MSG_DONTWAIT, MSG_NOSIGNAL, MSG_TRUNC,
    socket as c_socket, setsockopt, getsockopt, sendto, sendmmsg, recvmmsg,
    IPPROTO_IPV6, IPV6_V6ONLY, SO_MARK,
    htons, ntohs,
    epoll_event, EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLLRDHUP, EPOLL_CTL_ADD,
    EPOLL_CTL_MOD, EPOLL_CTL_DEL, EPOLL_CLOEXEC, epoll_create1, epoll_ctl, epoll_wait,
)
from relay._addr cimport sockaddr_any, sockaddr_from_tuple, sockaddr_to_tuple, raise_oserror
from relay._sendq cimport (
    sendq_t, sq_init, sq_free, sq_add, sq_flush, sq_full, sq_clear, sq_set_src,
)
from relay._stats cimport (
    N_COUNTERS, C_UP_DATAGRAMS, C_UP_BYTES, C_DOWN_DATAGRAMS, C_DOWN_BYTES,
    C_ASSOC_OPEN, C_ASSOC_CREATED, C_ASSOC_EXPIRED, C_ASSOC_REFUSED, C_DROP_MALFORMED,
    C_DROP_BUFFER_FULL, C_DROP_SEND_ERROR, C_DROP_TABLE_FULL, C_DROP_TOO_BIG,
    C_DROP_NO_ROUTE, C_DROP_DENIED, C_CONN_OPEN, C_CONN_REJECTED, C_CONN_RECONNECTS,
    C_FRAMES_BAD, C_QUEUE_DROPS,
)

from relay import tunnelproto as _proto

cdef extern from "<sys/socket.h>" nogil:
    ssize_t c_send "send"(int fd, const void *buf, size_t n, int flags)

cdef enum:
    KIND_PY = 1          # fd watched for Python (listen sockets, handshakes)
    KIND_CONN = 2
    KIND_FLOW = 3
    KIND_TCP = 6
    KIND_UDP = 7
    KIND_DNS = 8         # the resolver's eventfd
    EV_MAX = 64
    UDP_HDR_ROOM = 262   # RSV FRAG ATYP LEN DOMAIN PORT: headroom before a datagram

DEF_LOG = logging.getLogger("relay.tunnel")
FRAME_ERROR_TEXT = {FE_TRUNCATED: "truncated frame", FE_TOO_BIG: "RSV (length) too big",
                    FE_BAD_ATYP: "unknown ATYP", FE_EMPTY_DOMAIN: "domain of length 0",
                    FE_FRAGMENTED: "FRAG is not 0"}


# ------------------------------------------------------------------------- small helpers

cdef inline double mono_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline uint16_t rd16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline void wr16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xff


cdef inline bint is_mapped(const sockaddr_any *a) noexcept nogil:
    cdef const uint8_t *b = <const uint8_t *>&a.v6.sin6_addr
    cdef int i
    for i in range(10):
        if b[i]:
            return False
    return b[10] == 0xff and b[11] == 0xff


cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    x ^= x >> 33
    x *= 0xff51afd7ed558ccdULL
    x ^= x >> 33
    x *= 0xc4ceb9fe1a85ec53ULL
    x ^= x >> 33
    return x


cdef inline void sa_key(const sockaddr_any *a, uint64_t *k) noexcept nogil:
    k[1] = 0
    k[2] = 0
    if a.sa.sa_family == AF_INET:
        k[0] = AF_INET | (<uint64_t>a.v4.sin_port << 16)
        memcpy(&k[1], &a.v4.sin_addr, 4)
    else:
        k[0] = <uint64_t>a.sa.sa_family | (<uint64_t>a.v6.sin6_port << 16)
        memcpy(&k[1], &a.v6.sin6_addr, 16)


cdef inline socklen_t sa_len(const sockaddr_any *a) noexcept nogil:
    return sizeof(sockaddr_in) if a.sa.sa_family == AF_INET else sizeof(sockaddr_in6)


cdef inline bint sa_same(const sockaddr_any *a, const sockaddr_any *b) noexcept nogil:
    if a.sa.sa_family != b.sa.sa_family:
        return False
    if a.sa.sa_family == AF_INET:
        return a.v4.sin_port == b.v4.sin_port and a.v4.sin_addr.s_addr == b.v4.sin_addr.s_addr
    return a.v6.sin6_port == b.v6.sin6_port and \
        memcmp(&a.v6.sin6_addr, &b.v6.sin6_addr, 16) == 0


cdef inline bint sa_same_ip(const sockaddr_any *a, const sockaddr_any *b) noexcept nogil:
    if a.sa.sa_family != b.sa.sa_family:
        return False
    if a.sa.sa_family == AF_INET:
        return a.v4.sin_addr.s_addr == b.v4.sin_addr.s_addr
    return memcmp(&a.v6.sin6_addr, &b.v6.sin6_addr, 16) == 0


cdef inline void sa_unmap(const sockaddr_any *a, sockaddr_any *out) noexcept nogil:
    """Copy a, turning an IPv4-mapped IPv6 address into a plain IPv4 one."""
    if a.sa.sa_family == AF_INET6 and is_mapped(a):
        memset(out, 0, sizeof(sockaddr_in))
        out.v4.sin_family = AF_INET
        out.v4.sin_port = a.v6.sin6_port
        memcpy(&out.v4.sin_addr, &a.v6.sin6_addr.s6_addr[12], 4)
    else:
        memcpy(out, a, sizeof(sockaddr_any))


cdef object _stats_view(object stats):
    if stats is None:
        stats = memoryview(bytearray(8 * N_COUNTERS)).cast("Q")
    if not isinstance(stats, memoryview):
        stats = memoryview(stats)
    if stats.format != "Q":
        stats = stats.cast("B").cast("Q")
    if len(stats) < N_COUNTERS:
        raise ValueError(f"stats needs {N_COUNTERS} uint64 counters, got {len(stats)}")
    if stats.readonly:
        raise ValueError("stats must be writable")
    return stats


cdef uint64_t *_stats_ptr(object view):
    cdef uint64_t[::1] mv = view
    return &mv[0]


cdef int epoll_set(int epfd, int op, int fd, uint32_t events, uint32_t kind,
                   uint32_t idx) except -1:
    cdef epoll_event ev
    ev.events = events
    ev.data.u64 = (<uint64_t>kind << 32) | idx
    if epoll_ctl(epfd, op, fd, &ev) < 0:
        raise_oserror(errno, "epoll_ctl")
    return 0


# ------------------------------------------------------------------------- frame codec

cdef Py_ssize_t parse_frame(const uint8_t *p, size_t n, bint mux, size_t maxp,
                            frame_t *f) noexcept nogil:
    """Parse one frame at p[0:n]: bytes consumed, 0 when incomplete, -FE_* on error.
    Checks run in wire order (RSV, FRAG, ATYP, domain length), like tunnelproto."""
    cdef size_t pos, alen, end
    if n < 4:
        return 0
    f.dlen = rd16(p)
    if f.dlen > maxp:
        return -FE_TOO_BIG
    if p[2] != 0:
        return -FE_FRAGMENTED
    f.atyp = p[3]
    if f.atyp == 1:
        alen = 4
        pos = 4
    elif f.atyp == 4:
        alen = 16
        pos = 4
    elif f.atyp == 3:
        if n < 5:
            return 0
        alen = p[4]
        if alen == 0:
            return -FE_EMPTY_DOMAIN
        pos = 5
    else:
        return -FE_BAD_ATYP
    end = pos + alen + 2 + (4 if mux else 0)
    if n < end + f.dlen:
        return 0
    f.addr = p + pos
    f.alen = <uint8_t>alen
    f.port = rd16(p + pos + alen)
    if mux:
        f.flow = (<uint32_t>p[end - 4] << 24) | (<uint32_t>p[end - 3] << 16) | \
                 (<uint32_t>p[end - 2] << 8) | p[end - 1]
    else:
        f.flow = 0
    f.data = p + end
    return end + f.dlen


cdef inline size_t own_frame_len(const uint8_t *p, bint mux) noexcept nogil:
    """Length of a frame we wrote ourselves (known valid)."""
    cdef size_t alen = 4 if p[3] == 1 else (16 if p[3] == 4 else 1 + p[4])
    return 4 + alen + 2 + (4 if mux else 0) + rd16(p)


cdef size_t frame_hdr_len(const sockaddr_any *a, bint mux) noexcept nogil:
    cdef size_t n = 10 if (a.sa.sa_family == AF_INET or is_mapped(a)) else 22
    return n + 4 if mux else n


cdef size_t write_frame_hdr(uint8_t *o, const sockaddr_any *a, uint32_t flow, bint mux,
                            size_t dlen) noexcept nogil:
    cdef size_t pos
    wr16(o, <uint16_t>dlen)
    o[2] = 0
    if a.sa.sa_family == AF_INET:
        o[3] = 1
        memcpy(o + 4, &a.v4.sin_addr, 4)
        memcpy(o + 8, &a.v4.sin_port, 2)
        pos = 10
    elif is_mapped(a):
        o[3] = 1
        memcpy(o + 4, &a.v6.sin6_addr.s6_addr[12], 4)
        memcpy(o + 8, &a.v6.sin6_port, 2)
        pos = 10
    else:
        o[3] = 4
        memcpy(o + 4, &a.v6.sin6_addr, 16)
        memcpy(o + 20, &a.v6.sin6_port, 2)
        pos = 22
    if mux:
        o[pos] = flow >> 24
        o[pos + 1] = (flow >> 16) & 0xff
        o[pos + 2] = (flow >> 8) & 0xff
        o[pos + 3] = flow & 0xff
        pos += 4
    return pos


cdef int frame_to_sockaddr(const frame_t *f, sockaddr_any *out, int family) noexcept nogil:
    """Destination of f as a sockaddr for a socket of `family` (AF_INET6 sockets get
    IPv4-mapped addresses; 0 keeps the natural family). Returns its length, or 0 when
    it cannot be expressed (domain name, IPv6 on an IPv4 socket)."""
    memset(out, 0, sizeof(sockaddr_in6))
    if f.atyp == 1:
        if family == AF_INET6:
            out.v6.sin6_family = AF_INET6
            out.v6.sin6_addr.s6_addr[10] = 0xff
            out.v6.sin6_addr.s6_addr[11] = 0xff
            memcpy(&out.v6.sin6_addr.s6_addr[12], f.addr, 4)
            out.v6.sin6_port = htons(f.port)
            return sizeof(sockaddr_in6)
        out.v4.sin_family = AF_INET
        memcpy(&out.v4.sin_addr, f.addr, 4)
        out.v4.sin_port = htons(f.port)
        return sizeof(sockaddr_in)
    if f.atyp == 4 and family != AF_INET:
        out.v6.sin6_family = AF_INET6
        memcpy(&out.v6.sin6_addr, f.addr, 16)
        out.v6.sin6_port = htons(f.port)
        return sizeof(sockaddr_in6)
    return 0


cdef inline Py_ssize_t parse_udp_req(const uint8_t *p, size_t n, frame_t *f) noexcept nogil:
    """SOCKS5 UDP request header (RSV ignored): header length, -FE_* on error."""
    cdef size_t alen, pos
    if n < 4:
        return -FE_TRUNCATED
    f.atyp = p[3]
    if f.atyp == 1:
        alen = 4
        pos = 4
    elif f.atyp == 4:
        alen = 16
        pos = 4
    elif f.atyp == 3:
        if n < 5:
            return -FE_TRUNCATED
        alen = p[4]
        if alen == 0:
            return -FE_EMPTY_DOMAIN
        pos = 5
    else:
        return -FE_BAD_ATYP
    if n < pos + alen + 2:
        return -FE_TRUNCATED
    f.addr = p + pos
    f.alen = <uint8_t>alen
    f.port = rd16(p + pos + alen)
    f.data = p + pos + alen + 2
    f.dlen = n - (pos + alen + 2)
    f.flow = p[2]            # FRAG
    return pos + alen + 2


cdef inline size_t write_udp_req_hdr(uint8_t *o, const sockaddr_any *a) noexcept nogil:
    """RSV(0) FRAG(0) ATYP ADDR PORT; returns its length (10 or 22)."""
    cdef size_t n = write_frame_hdr(o, a, 0, False, 0)
    o[0] = 0
    o[1] = 0
    return n


def _frame_error(int code, msg):
    return _proto.FrameError(code, msg)


cdef object _frame_host(frame_t *f):
    if f.atyp == 1:
        return socket.inet_ntop(socket.AF_INET, (<const char *>f.addr)[:4])
    if f.atyp == 4:
        return socket.inet_ntop(socket.AF_INET6, (<const char *>f.addr)[:16])
    return (<const char *>f.addr)[:f.alen].decode("latin-1")


def parse_frames(buf, *, bint mux=False, bint final=False, size_t max_payload=MAX_PAYLOAD):
    """C codec, same contract as relay.tunnelproto.parse_frames: ([Frame], consumed)."""
    cdef const uint8_t[::1] mv
    cdef frame_t f
    cdef Py_ssize_t r
    cdef size_t pos = 0, n
    if isinstance(buf, (bytes, bytearray)) and len(buf) == 0:
        return [], 0
    mv = memoryview(buf).cast("B")
    n = mv.shape[0]
    out = []
    while pos < n:
        r = parse_frame(&mv[pos], n - pos, mux, max_payload, &f)
        if r == 0:
            if final:
                raise _frame_error(FE_TRUNCATED,
                                   f"truncated frame: {n - pos} bytes left at end of stream")
            break
        if r < 0:
            if r == -FE_TOO_BIG:
                raise _frame_error(FE_TOO_BIG, f"frame length {f.dlen} exceeds {max_payload}")
            if r == -FE_FRAGMENTED:
                raise _frame_error(FE_FRAGMENTED, f"FRAG must be 0, got {mv[pos + 2]}")
            if r == -FE_BAD_ATYP:
                raise _frame_error(FE_BAD_ATYP, f"unknown address type 0x{f.atyp:02x}")
            raise _frame_error(-r, "domain of length 0")
        out.append(_proto.Frame(f.flow if mux else None, f.atyp, _frame_host(&f), f.port,
                                (<const char *>f.data)[:f.dlen]))
        pos += r
    return out, pos


def encode_frames(items, bint mux=False):
    """Frames for [(host, port, data[, flow])...] written by the C encoder; hosts must be
    IP literals (domain frames come from relay.tunnelproto)."""
    cdef sockaddr_any sa
    cdef uint8_t hdr[MAX_FRAME_HEADER]
    cdef size_t hl
    cdef uint32_t flow
    parts = []
    for item in items:
        host, port, data = item[0], item[1], bytes(item[2])
        flow = item[3] if len(item) > 3 else 0
        if len(data) > MAX_PAYLOAD:
            raise ValueError(f"payload length {len(data)} outside 0-{MAX_PAYLOAD}")
        sockaddr_from_tuple((host, port), &sa)
        hl = write_frame_hdr(hdr, &sa, flow, mux, len(data))
        parts.append(hdr[:hl])
        parts.append(data)
    return b"".join(parts)


def udp_request_header(host, int port):
    """SOCKS5 UDP request header written by the C encoder (IP literal hosts)."""
    cdef sockaddr_any sa
    cdef uint8_t hdr[32]
    sockaddr_from_tuple((host, port), &sa)
    return hdr[:write_udp_req_hdr(hdr, &sa)]


# ------------------------------------------------------------------------- access list

cdef class Acl:
    """Destination access list compiled from tunnelproto.AccessList.table()."""

    def __cinit__(self, table=()):
        table = list(table)
        self.n = len(table)
        self.rules = <acl_rule_t *>calloc(max(self.n, 1), sizeof(acl_rule_t))
        if self.rules == NULL:
            raise MemoryError()
        for i, (fam, plen, action, net) in enumerate(table):
            self.rules[i].family = fam
            self.rules[i].plen = plen
            self.rules[i].action = action
            memcpy(self.rules[i].net, <const char *>net, 16)

    def __dealloc__(self):
        free(self.rules)

    cdef bint denied(self, const sockaddr_any *a) noexcept nogil:
        cdef const uint8_t *ip
        cdef int fam, i, full, bits
        cdef acl_rule_t *r
        if a.sa.sa_family == AF_INET:
            fam = 4
            ip = <const uint8_t *>&a.v4.sin_addr
        elif is_mapped(a):
            fam = 4
            ip = &a.v6.sin6_addr.s6_addr[12]
        else:
            fam = 6
            ip = <const uint8_t *>&a.v6.sin6_addr
        for i in range(self.n):
            r = &self.rules[i]
            if r.family != fam:
                continue
            full = r.plen >> 3
            bits = r.plen & 7
            if full and memcmp(ip, r.net, full) != 0:
                continue
            if bits and ((ip[full] ^ r.net[full]) & (0xff00 >> bits) & 0xff):
                continue
            return r.action != 0
        return False

    def allowed(self, host):
        """Python probe of the C matcher (tests cross-check it with AccessList)."""
        cdef sockaddr_any sa
        sockaddr_from_tuple((host, 0), &sa)
        return not self.denied(&sa)


# ------------------------------------------------------------------------- hash table

cdef int htab_init(htab_t *h, uint32_t entries) except -1:
    cdef uint32_t cap = 16
    while cap < entries * 2:
        cap <<= 1
    h.slots = <hslot_t *>malloc(cap * sizeof(hslot_t))
    if h.slots == NULL:
        raise MemoryError()
    for i in range(cap):
        h.slots[i].val = -1
    h.mask = cap - 1
    h.count = 0
    return 0


cdef inline uint32_t htab_hash(const uint64_t *k) noexcept nogil:
    return <uint32_t>mix64(k[0] ^ mix64(k[1] ^ mix64(k[2])))


cdef int32_t htab_find(htab_t *h, const uint64_t *k) noexcept nogil:
    cdef uint32_t i = htab_hash(k) & h.mask
    cdef hslot_t *s
    while True:
        s = &h.slots[i]
        if s.val < 0:
            return -1
        if s.k0 == k[0] and s.k1 == k[1] and s.k2 == k[2]:
            return s.val
        i = (i + 1) & h.mask


cdef void htab_put(htab_t *h, const uint64_t *k, int32_t val) noexcept nogil:
    """Insert (the key must be absent; the table is sized for twice the entries)."""
    cdef uint32_t i = htab_hash(k) & h.mask
    while h.slots[i].val >= 0:
        i = (i + 1) & h.mask
    h.slots[i].k0 = k[0]
    h.slots[i].k1 = k[1]
    h.slots[i].k2 = k[2]
    h.slots[i].val = val
    h.count += 1


cdef void htab_del(htab_t *h, const uint64_t *k) noexcept nogil:
    """Remove with backward-shift deletion (linear probing, no tombstones)."""
    cdef uint32_t i = htab_hash(k) & h.mask, j, home
    cdef hslot_t *s
    while True:
        s = &h.slots[i]
        if s.val < 0:
            return
        if s.k0 == k[0] and s.k1 == k[1] and s.k2 == k[2]:
            break
        i = (i + 1) & h.mask
    h.count -= 1
    j = i
    while True:
        j = (j + 1) & h.mask
        if h.slots[j].val < 0:
            break
        home = htab_hash(&h.slots[j].k0) & h.mask
        # keep slot j where it is if its home lies cyclically in (i, j]
        if (j > i and (home <= i or home > j)) or (j < i and (home <= i and home > j)):
            h.slots[i] = h.slots[j]
            i = j
    h.slots[i].val = -1


cdef int new_udp_socket(int family, object mark) except -2:
    """Non-blocking UDP socket (dual stack for AF_INET6), SO_MARK applied; -1 with
    errno set on failure (EMFILE and friends are counted by the caller)."""
    cdef int fd, zero = 0, m
    fd = c_socket(family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        return -1
    if family == AF_INET6:
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(int))
    if mark:
        m = mark
        if setsockopt(fd, SOL_SOCKET, SO_MARK, &m, sizeof(int)) < 0:
            e = errno
            close(fd)
            raise_oserror(e, "SO_MARK")
    return fd


# ------------------------------------------------------------------------- host names

cdef enum:
    DNS_WAYS = 4                 # the cache is set associative: sets of 4 entries
    N_EMPTY = 0
    N_PENDING = 1                # being resolved; datagrams wait (parked)
    N_OK = 2
    N_FAIL = 3

cdef struct dname_t:             # one cached host name
    double expires               # N_OK / N_FAIL: valid until then; N_PENDING: give up then
    double used
    uint32_t seq                 # tells a stale answer from the current one
    int32_t park_head
    int32_t park_tail
    uint32_t park_bytes
    uint16_t nparked
    uint8_t state
    uint8_t nlen
    uint8_t first                # 4 or 6: the family getaddrinfo gave first
    uint8_t has4
    uint8_t has6
    uint8_t a4[4]
    uint8_t a6[16]
    uint8_t name[255]            # lower case

cdef struct parked_t:            # a datagram waiting for its name
    uint8_t *data
    size_t n
    uint32_t owner               # flow / association slot of the owner ...
    uint32_t gen                 # ... and its generation, so a reused slot is told apart
    int32_t next
    uint16_t port


cdef inline uint8_t ascii_lower(uint8_t c) noexcept nogil:
    return c + 32 if 65 <= c <= 90 else c


cdef socklen_t dname_to_sockaddr(const dname_t *e, uint16_t port, int family,
                                 sockaddr_any *out) noexcept nogil:
    """Address of a resolved name for a socket of `family`: IPv4 sockets take its first
    IPv4 address; dual-stack IPv6 sockets the first address getaddrinfo gave (IPv4
    mapped). 0 when it has none of that kind."""
    cdef frame_t f
    if e.state != N_OK:
        return 0
    f.port = port
    if family == AF_INET or e.first == 4:
        if not e.has4:
            return 0
        f.atyp = 1
        f.addr = e.a4
    else:
        f.atyp = 4
        f.addr = e.a6
    return <socklen_t>frame_to_sockaddr(&f, out, family)


cdef int send_resolved(sendq_t *sb, uint64_t *st, Acl acl, int fd, int family,
                       const dname_t *e, uint16_t port, const uint8_t *data,
                       size_t n) except -1:
    """Send a datagram that waited for its host name from socket fd (of `family`), after
    the access list has judged the address it resolved to."""
    cdef sockaddr_any dst
    cdef socklen_t dl = dname_to_sockaddr(e, port, family, &dst)
    if dl == 0:
        st[C_DROP_NO_ROUTE] += 1
        return 0
    if acl.denied(&dst):
        st[C_DROP_DENIED] += 1
        return 0
    sq_clear(sb)
    sb.fd = fd
    sq_add(sb, &dst, dl, data, n)
    sq_flush(sb, st, C_UP_DATAGRAMS, C_UP_BYTES)
    return 0


# ------------------------------------------------------------------------- poller base

cdef class Poller:
    """An epoll set whose data events are handled in C; fds registered with watch()
    (listen sockets, handshakes) are handed back to Python by poll()."""
    cdef int epfd
    cdef epoll_event evs[EV_MAX]
    cdef uint64_t *st
    cdef object _stats_ref
    cdef public object log
    cdef double now
    cdef readonly NameCache dns      # host name destinations (services that relay to them)

    def __cinit__(self, *args, **kw):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise_oserror(errno, "epoll_create1")

    def _init_stats(self, stats, log):
        self._stats_ref = _stats_view(stats)
        self.st = _stats_ptr(self._stats_ref)
        self.log = log or DEF_LOG
        self.now = mono_now()

    def init_dns(self, resolve=None):
        """Accept destinations given as host names: a NameCache whose resolver threads
        wake this epoll set (resolve: the function they call, default getaddrinfo)."""
        self.dns = NameCache(self, resolve)
        epoll_set(self.epfd, EPOLL_CTL_ADD, self.dns.fileno(), EPOLLIN, KIND_DNS, 0)

    @property
    def stats(self):
        return self._stats_ref

    def fileno(self):
        return self.epfd

    def watch(self, int fd, uint32_t token, bint read=True, bint write=False, bint modify=False):
        """Hand readiness of fd back to Python as (token, events) from poll()."""
        cdef uint32_t ev = (EPOLLIN if read else 0) | (EPOLLOUT if write else 0)
        epoll_set(self.epfd, EPOLL_CTL_MOD if modify else EPOLL_CTL_ADD, fd, ev, KIND_PY, token)

    def unwatch(self, int fd):
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)

    def poll(self, int timeout_ms=100):
        """Wait up to timeout_ms, handle data events; return [(token, events)] for Python."""
        cdef int n, i
        cdef uint64_t d
        with nogil:
            n = epoll_wait(self.epfd, self.evs, EV_MAX, timeout_ms)
        self.now = mono_now()
        if n < 0:
            if errno == EINTR:
                return []
            raise_oserror(errno, "epoll_wait")
        py = []
        for i in range(n):
            d = self.evs[i].data.u64
            if (d >> 32) == KIND_PY:
                py.append((<uint32_t>(d & 0xffffffff), self.evs[i].events))
            elif (d >> 32) == KIND_DNS:
                self.dns.drain(self)
            else:
                self.on_event(<uint32_t>(d >> 32), <uint32_t>(d & 0xffffffff),
                              self.evs[i].events)
        self.after_poll()
        return py

    cdef int on_event(self, uint32_t kind, uint32_t idx, uint32_t events) except -1:
        return 0

    cdef int after_poll(self) except -1:
        return 0

    cdef int dns_send(self, uint32_t owner, uint32_t gen, const dname_t *e, uint16_t port,
                      const uint8_t *data, size_t n) except -1:
        """Send a datagram that waited for its host name (owner: slot and generation given
        to NameCache.dst_for)."""
        return 0

    def close(self):
        if self.dns is not None:
            self.dns.close()
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)


cdef class NameCache:
    """Destinations given as host names (ATYP 3) for a Poller that relays datagrams: a
    bounded set-associative cache name -> addresses with positive and negative lifetimes,
    and the datagrams waiting for a name parked in bounded queues. Lookups run in the
    threads of a tunnelproto.ResolverPool, which only see names, hand back addresses and
    wake the owner's epoll through an eventfd; they never touch this memory."""
    cdef dname_t *names
    cdef parked_t *park
    cdef uint32_t mask               # sets - 1
    cdef int nnames
    cdef int32_t park_free
    cdef int park_max
    cdef int per_name
    cdef int nparked
    cdef size_t park_bytes
    cdef size_t park_bytes_max
    cdef int inflight
    cdef int max_inflight
    cdef uint32_t seq
    cdef double ttl_ok
    cdef double ttl_fail
    cdef double give_up
    cdef uint64_t *st
    cdef object _stats_ref
    cdef object pool
    cdef object say

    def __cinit__(self, *args, **kw):
        self.names = NULL
        self.park = NULL

    def __init__(self, Poller owner, resolve=None):
        cdef int i
        sets = _proto.DNS_MAX_NAMES // DNS_WAYS
        if sets < 1 or sets & (sets - 1):
            raise ValueError("DNS_MAX_NAMES must be 4 times a power of two")
        self.mask = sets - 1
        self.nnames = sets * DNS_WAYS
        self.park_max = _proto.DNS_PARK_MAX
        self.per_name = _proto.DNS_PARK_PER_NAME
        self.park_bytes_max = _proto.DNS_PARK_BYTES
        self.max_inflight = _proto.DNS_INFLIGHT
        self.ttl_ok, self.ttl_fail = _proto.DNS_TTL_OK, _proto.DNS_TTL_FAIL
        self.give_up = _proto.DNS_GIVE_UP
        self.names = <dname_t *>calloc(self.nnames, sizeof(dname_t))
        self.park = <parked_t *>calloc(self.park_max, sizeof(parked_t))
        if self.names == NULL or self.park == NULL:
            raise MemoryError()
        for i in range(self.park_max):
            self.park[i].next = i + 1 if i + 1 < self.park_max else -1
        self.park_free = 0
        self._stats_ref = owner._stats_ref
        self.st = owner.st
        self.say = _proto.LogLimiter(owner.log)
        self.pool = _proto.ResolverPool(resolve)

    def __dealloc__(self):
        cdef int i
        if self.park != NULL:
            for i in range(self.park_max):
                free(self.park[i].data)
        free(self.park)
        free(self.names)

    def fileno(self):
        return self.pool.fileno()

    def close(self):
        self.pool.close()

    cdef int32_t find(self, const uint8_t *name, size_t n, double now) except -2:
        """The entry of a name, made pending (and its lookup queued) on a miss or when it
        has expired; -1 when there is no room to resolve it now."""
        cdef uint64_t h = 14695981039346656037ULL
        cdef size_t i
        cdef int w, base, victim = -1
        cdef dname_t *e
        for i in range(n):
            h = (h ^ ascii_lower(name[i])) * 1099511628211ULL
        base = <int>(mix64(h) & self.mask) * DNS_WAYS
        for w in range(base, base + DNS_WAYS):
            e = &self.names[w]
            if e.state == N_EMPTY:
                if victim < 0 or self.names[victim].state != N_EMPTY:
                    victim = w
                continue
            if e.nlen == n:
                i = 0
                while i < n and e.name[i] == ascii_lower(name[i]):
                    i += 1
                if i == n:
                    if e.state == N_PENDING or now < e.expires:
                        e.used = now
                        return w
                    victim = w               # expired: resolve it again in place
                    break
            if e.state != N_PENDING and (victim < 0 or (
                    self.names[victim].state != N_EMPTY and e.used < self.names[victim].used)):
                victim = w
        if victim < 0 or self.inflight >= self.max_inflight:
            return -1
        e = &self.names[victim]
        for i in range(n):
            e.name[i] = ascii_lower(name[i])
        e.nlen = <uint8_t>n
        e.state = N_PENDING
        self.seq += 1
        e.seq = self.seq
        e.expires = now + self.give_up
        e.used = now
        e.park_head = e.park_tail = -1
        e.nparked = 0
        e.park_bytes = 0
        e.has4 = e.has6 = e.first = 0
        self.inflight += 1
        why = self.pool.submit((victim, e.seq), (<const char *>e.name)[:n])
        if why is not None:
            self.settle(victim, (), why, None, now)
        return victim

    cdef int park_dgram(self, int32_t idx, uint32_t owner, uint32_t gen, uint16_t port,
                        const uint8_t *data, size_t n) except -1:
        cdef dname_t *e = &self.names[idx]
        cdef int32_t p = self.park_free
        cdef uint8_t *copy = NULL
        if e.nparked < self.per_name and p >= 0 and self.park_bytes + n <= self.park_bytes_max:
            copy = <uint8_t *>malloc(n if n else 1)
        if copy == NULL:
            self.st[C_QUEUE_DROPS] += 1
            return 0
        memcpy(copy, data, n)
        self.park_free = self.park[p].next
        self.park[p].data = copy
        self.park[p].n = n
        self.park[p].owner = owner
        self.park[p].gen = gen
        self.park[p].port = port
        self.park[p].next = -1
        if e.park_tail >= 0:
            self.park[e.park_tail].next = p
        else:
            e.park_head = p
        e.park_tail = p
        e.nparked += 1
        e.park_bytes += n
        self.nparked += 1
        self.park_bytes += n
        return 0

    cdef int dst_for(self, const frame_t *f, uint32_t owner, uint32_t gen, int family,
                     double now, sockaddr_any *dst) except -1:
        """Destination of a datagram addressed to a host name, for a socket of `family`:
        its length, or 0 when the datagram waits for the name or was dropped (counted)."""
        cdef int32_t idx = self.find(f.addr, f.alen, now)
        cdef socklen_t dl
        if idx < 0:
            self.st[C_QUEUE_DROPS] += 1
            return 0
        if self.names[idx].state == N_PENDING:
            self.park_dgram(idx, owner, gen, f.port, f.data, f.dlen)
            return 0
        dl = dname_to_sockaddr(&self.names[idx], f.port, family, dst)
        if dl == 0:
            self.st[C_DROP_NO_ROUTE] += 1
        return dl

    cdef int settle(self, int32_t idx, object addrs, object err, Poller owner,
                    double now) except -1:
        """Store the answer for entry idx and pass its parked datagrams to the owner (or
        drop and count them when the name has no address)."""
        cdef dname_t *e = &self.names[idx]
        cdef const uint8_t *b
        cdef int32_t p, nxt
        self.inflight -= 1
        e.has4 = e.has6 = e.first = 0
        for ver, packed in addrs:
            b = <const uint8_t *><const char *>packed
            if ver == 4 and not e.has4:
                memcpy(e.a4, b, 4)
                e.has4 = 1
            elif ver == 6 and not e.has6:
                memcpy(e.a6, b, 16)
                e.has6 = 1
            else:
                continue
            if not e.first:
                e.first = ver
        if e.first:
            e.state = N_OK
            e.expires = now + self.ttl_ok
        else:
            e.state = N_FAIL
            e.expires = now + self.ttl_fail
            self.say(logging.INFO, "cannot resolve %r: %s",
                     (<const char *>e.name)[:e.nlen].decode("latin-1"), err)
        p = e.park_head
        self.nparked -= e.nparked
        self.park_bytes -= e.park_bytes
        e.park_head = e.park_tail = -1
        e.nparked = 0
        e.park_bytes = 0
        while p >= 0:
            nxt = self.park[p].next
            if e.state == N_OK and owner is not None:
                owner.dns_send(self.park[p].owner, self.park[p].gen, e, self.park[p].port,
                               self.park[p].data, self.park[p].n)
            else:
                self.st[C_DROP_NO_ROUTE] += 1
            free(self.park[p].data)
            self.park[p].data = NULL
            self.park[p].next = self.park_free
            self.park_free = p
            p = nxt
        return 0

    cdef int drain(self, Poller owner) except -1:
        """Answers from the resolver threads (the eventfd said so)."""
        cdef double now = mono_now()
        for (idx, seq), addrs, err in self.pool.results():
            if self.names[<int>idx].state == N_PENDING and self.names[<int>idx].seq == seq:
                self.settle(idx, addrs, err, owner, now)
        return 0

    cdef int expire(self, Poller owner, double now) except -1:
        """Give up lookups that took longer than DNS_GIVE_UP."""
        cdef int i
        if self.inflight == 0:
            return 0
        for i in range(self.nnames):
            if self.names[i].state == N_PENDING and now > self.names[i].expires:
                self.settle(i, (), "no answer in time", owner, now)
        return 0

    @property
    def parked(self):
        """Datagrams waiting for their names (a probe for tests and tools)."""
        return self.nparked


# ------------------------------------------------------------------------- tunnel server

cdef struct sconn_t:
    int fd
    int used
    uint32_t gen
    bint mux
    bint want_out
    uint8_t *rx
    size_t rx_len
    uint8_t *tx
    size_t tx_start
    size_t tx_end
    double stall_since
    int flow_head
    int plain_flow

cdef struct sflow_t:
    sockaddr_any last_dst
    double last
    int fd
    int conn
    uint32_t id
    uint32_t gen                 # bumped each time the slot is taken
    int prev
    int next
    int family
    bint last_ok
    bint used


cdef class TunnelServer(Poller):
    """Data path of `relay tunnel-server`: connections whose handshake Python finished
    (add_conn), per-flow UDP sockets, frames both ways."""
    cdef sconn_t *conns
    cdef int max_conns
    cdef int *conn_free
    cdef int nconn_free
    cdef sflow_t *flows
    cdef int max_flows
    cdef int *flow_free
    cdef int nflow_free
    cdef htab_t tab
    cdef Acl acl
    cdef size_t tx_limit
    cdef double timeout
    cdef double stall_timeout
    cdef double next_tick
    cdef int family
    cdef int batch
    cdef object mark
    cdef uint8_t *scratch
    cdef mmsghdr *rmsgs
    cdef iovec *riovs
    cdef sockaddr_any *rnames
    cdef sendq_t sb

    def __init__(self, acl_table=(), stats=None, *, int max_conns=1024, int max_flows=4096,
                 double timeout=60.0, size_t tx_limit=1 << 20, int batch=32, mark=None,
                 double stall_timeout=5.0, log=None, resolve=None):
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1-{MAX_BATCH}, got {batch}")
        if max_conns < 1 or max_flows < 1:
            raise ValueError("max_conns and max_flows must be at least 1")
        if tx_limit < 2 * (MAX_PAYLOAD + MAX_FRAME_HEADER):
            raise ValueError(f"tx_limit must be at least {2 * (MAX_PAYLOAD + MAX_FRAME_HEADER)}")
        self._init_stats(stats, log)
        self.acl = acl_table if isinstance(acl_table, Acl) else Acl(acl_table)
        self.max_conns, self.max_flows, self.batch = max_conns, max_flows, batch
        self.timeout, self.tx_limit, self.stall_timeout = timeout, tx_limit, stall_timeout
        self.mark = mark
        self.family = AF_INET6
        self.conns = <sconn_t *>calloc(max_conns, sizeof(sconn_t))
        self.conn_free = <int *>malloc(max_conns * sizeof(int))
        self.flows = <sflow_t *>calloc(max_flows, sizeof(sflow_t))
        self.flow_free = <int *>malloc(max_flows * sizeof(int))
        self.scratch = <uint8_t *>malloc(<size_t>batch * DGRAM_SLOT)
        self.rmsgs = <mmsghdr *>calloc(batch, sizeof(mmsghdr))
        self.riovs = <iovec *>calloc(batch, sizeof(iovec))
        self.rnames = <sockaddr_any *>calloc(batch, sizeof(sockaddr_any))
        if not (self.conns and self.conn_free and self.flows and self.flow_free and
                self.scratch and self.rmsgs and self.riovs and self.rnames):
            raise MemoryError()
        htab_init(&self.tab, max_flows)
        sq_init(&self.sb, batch)
        for i in range(max_conns):
            self.conn_free[i] = max_conns - 1 - i
            self.conns[i].fd = -1
        self.nconn_free = max_conns
        for i in range(max_flows):
            self.flow_free[i] = max_flows - 1 - i
            self.flows[i].fd = -1
        self.nflow_free = max_flows
        for i in range(batch):
            self.riovs[i].iov_base = self.scratch + <size_t>i * DGRAM_SLOT
            self.riovs[i].iov_len = DGRAM_SLOT
            self.rmsgs[i].msg_hdr.msg_iov = &self.riovs[i]
            self.rmsgs[i].msg_hdr.msg_iovlen = 1
            self.rmsgs[i].msg_hdr.msg_name = &self.rnames[i]
        self.init_dns(resolve)

    def __dealloc__(self):
        if self.conns != NULL:
            for i in range(self.max_conns):
                if self.conns[i].used:
                    self.conn_close(i, None, -1)
        if self.flows != NULL:
            for i in range(self.max_flows):
                if self.flows[i].used:
                    close(self.flows[i].fd)
        free(self.conns)
        free(self.conn_free)
        free(self.flows)
        free(self.flow_free)
        free(self.scratch)
        free(self.rmsgs)
        free(self.riovs)
        free(self.rnames)
        free(self.tab.slots)
        sq_free(&self.sb)

    @property
    def connections(self):
        return self.max_conns - self.nconn_free

    @property
    def flows_open(self):
        return self.max_flows - self.nflow_free

    def add_conn(self, int fd, bint mux, leftover=b""):
        """Take over fd (handshake done): returns its slot, or -1 when the table is full
        (the caller closes fd and counts). Bytes already read after the request go in."""
        cdef int i
        cdef sconn_t *c
        if self.nconn_free == 0:
            return -1
        i = self.conn_free[self.nconn_free - 1]
        c = &self.conns[i]
        c.rx = <uint8_t *>malloc(RX_CAP)
        c.tx = <uint8_t *>malloc(self.tx_limit)
        if c.rx == NULL or c.tx == NULL:
            free(c.rx)
            free(c.tx)
            c.rx = c.tx = NULL
            return -1
        self.nconn_free -= 1
        c.fd = fd
        c.used = 1
        c.gen += 1
        c.mux = mux
        c.want_out = False
        c.rx_len = 0
        c.tx_start = c.tx_end = 0
        c.stall_since = 0
        c.flow_head = -1
        c.plain_flow = -1
        epoll_set(self.epfd, EPOLL_CTL_ADD, fd, EPOLLIN | EPOLLRDHUP, KIND_CONN, i)
        if leftover:
            if len(leftover) > RX_CAP:
                self.conn_close(i, "handshake leftover too long", C_FRAMES_BAD)
                return i
            memcpy(c.rx, <const char *>leftover, len(leftover))
            c.rx_len = len(leftover)
            self.conn_frames(i)
        return i

    def close_all(self):
        for i in range(self.max_conns):
            if self.conns[i].used:
                self.conn_close(i, None, -1)

    cdef int conn_close(self, int i, str why, int counter) except -1:
        cdef sconn_t *c = &self.conns[i]
        cdef int f, nxt
        if not c.used:
            return 0
        f = c.flow_head
        while f >= 0:
            nxt = self.flows[f].next
            self.flow_release(f, -1)
            f = nxt
        close(c.fd)
        free(c.rx)
        free(c.tx)
        c.rx = c.tx = NULL
        c.fd = -1
        c.used = 0
        self.conn_free[self.nconn_free] = i
        self.nconn_free += 1
        self.st[C_CONN_OPEN] -= 1
        if counter >= 0:
            self.st[counter] += 1
        if why:
            self.log.warning("tunnel connection closed: %s", why)
        return 0

    cdef int flow_release(self, int f, int counter) except -1:
        cdef sflow_t *fl = &self.flows[f]
        cdef sconn_t *c = &self.conns[fl.conn]
        cdef uint64_t k[3]
        if not fl.used:
            return 0
        close(fl.fd)
        if c.mux:
            k[0] = fl.conn
            k[1] = c.gen
            k[2] = fl.id
            htab_del(&self.tab, k)
        else:
            c.plain_flow = -1
        if fl.prev >= 0:
            self.flows[fl.prev].next = fl.next
        else:
            c.flow_head = fl.next
        if fl.next >= 0:
            self.flows[fl.next].prev = fl.prev
        fl.used = False
        fl.fd = -1
        self.flow_free[self.nflow_free] = f
        self.nflow_free += 1
        self.st[C_ASSOC_OPEN] -= 1
        if counter >= 0:
            self.st[counter] += 1
        return 0

    cdef int flow_get(self, int ci, uint32_t id) except -2:
        cdef sconn_t *c = &self.conns[ci]
        cdef uint64_t k[3]
        cdef int f, fd
        cdef sflow_t *fl
        if c.mux:
            k[0] = ci
            k[1] = c.gen
            k[2] = id
            f = htab_find(&self.tab, k)
            if f >= 0:
                return f
        elif c.plain_flow >= 0:
            return c.plain_flow
        if self.nflow_free == 0:
            self.st[C_DROP_TABLE_FULL] += 1
            return -1
        fd = new_udp_socket(self.family, self.mark)
        if fd < 0 and self.family == AF_INET6 and errno == _errno.EAFNOSUPPORT:
            self.family = AF_INET
            fd = new_udp_socket(self.family, self.mark)
        if fd < 0:
            self.st[C_ASSOC_REFUSED] += 1
            return -1
        self.nflow_free -= 1
        f = self.flow_free[self.nflow_free]
        fl = &self.flows[f]
        fl.fd = fd
        fl.conn = ci
        fl.id = id
        fl.gen += 1
        fl.family = self.family
        fl.last = self.now
        fl.last_ok = False
        fl.used = True
        fl.prev = -1
        fl.next = c.flow_head
        if c.flow_head >= 0:
            self.flows[c.flow_head].prev = f
        c.flow_head = f
        if c.mux:
            htab_put(&self.tab, k, f)
        else:
            c.plain_flow = f
        epoll_set(self.epfd, EPOLL_CTL_ADD, fd, EPOLLIN, KIND_FLOW, f)
        self.st[C_ASSOC_CREATED] += 1
        self.st[C_ASSOC_OPEN] += 1
        return f

    cdef int on_event(self, uint32_t kind, uint32_t idx, uint32_t events) except -1:
        cdef sconn_t *c
        if kind == KIND_CONN:
            c = &self.conns[idx]
            if not c.used:
                return 0
            if events & EPOLLOUT:
                self.conn_write(idx)
                if not c.used:
                    return 0
            if events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP):
                self.conn_read(idx)
        elif kind == KIND_FLOW:
            if self.flows[idx].used:
                self.flow_read(idx)
        return 0

    cdef int conn_read(self, int i) except -1:
        cdef sconn_t *c = &self.conns[i]
        cdef ssize_t n
        with nogil:
            n = read(c.fd, c.rx + c.rx_len, RX_CAP - c.rx_len)
        if n == 0:
            if c.rx_len:
                self.conn_close(i, f"truncated frame: stream ended with {c.rx_len} bytes "
                                   f"of an incomplete frame", C_FRAMES_BAD)
            else:
                self.conn_close(i, None, -1)
            return 0
        if n < 0:
            if errno == EAGAIN or errno == EINTR:
                return 0
            self.conn_close(i, None, -1)
            return 0
        c.rx_len += n
        return self.conn_frames(i)

    cdef int conn_frames(self, int i) except -1:
        """Send every complete frame of the receive buffer to its destination."""
        cdef sconn_t *c = &self.conns[i]
        cdef size_t pos = 0
        cdef Py_ssize_t r
        cdef frame_t f
        cdef int fi
        cdef sflow_t *fl
        cdef sockaddr_any dst
        cdef socklen_t dlen
        cdef uint32_t gen = c.gen
        sq_clear(&self.sb)
        while pos < c.rx_len:
            r = parse_frame(c.rx + pos, c.rx_len - pos, c.mux, MAX_PAYLOAD, &f)
            if r == 0:
                break
            if r < 0:
                sq_flush(&self.sb, self.st, C_UP_DATAGRAMS, C_UP_BYTES)
                self.conn_close(i, f"bad frame: {FRAME_ERROR_TEXT[-r]}", C_FRAMES_BAD)
                return 0
            pos += r
            fi = self.flow_get(i, f.flow)
            if fi < 0:
                continue
            fl = &self.flows[fi]
            fl.last = self.now
            if f.atyp == 3:
                dlen = self.dns.dst_for(&f, fi, fl.gen, fl.family, self.now, &dst)
                if dlen == 0:
                    continue
            else:
                dlen = frame_to_sockaddr(&f, &dst, fl.family)
                if dlen == 0:
                    self.st[C_DROP_NO_ROUTE] += 1
                    continue
            if not self.flow_dst_ok(fl, &dst):
                continue
            if self.sb.n and (self.sb.fd != fl.fd or sq_full(&self.sb)):
                sq_flush(&self.sb, self.st, C_UP_DATAGRAMS, C_UP_BYTES)
            self.sb.fd = fl.fd
            sq_add(&self.sb, &dst, dlen, f.data, f.dlen)
        sq_flush(&self.sb, self.st, C_UP_DATAGRAMS, C_UP_BYTES)
        if c.used and c.gen == gen:
            if pos < c.rx_len:
                memmove(c.rx, c.rx + pos, c.rx_len - pos)
            c.rx_len -= pos
        return 0

    cdef bint flow_dst_ok(self, sflow_t *fl, const sockaddr_any *dst) noexcept nogil:
        """The access list on a flow's destination (remembered while it does not change)."""
        if fl.last_ok and sa_same(dst, &fl.last_dst):
            return True
        if self.acl.denied(dst):
            self.st[C_DROP_DENIED] += 1
            return False
        fl.last_ok = True
        memcpy(&fl.last_dst, dst, sizeof(sockaddr_any))
        return True

    cdef int dns_send(self, uint32_t owner, uint32_t gen, const dname_t *e, uint16_t port,
                      const uint8_t *data, size_t n) except -1:
        cdef sflow_t *fl = &self.flows[owner]
        if not fl.used or fl.gen != gen:         # the flow ended while its name was resolved
            self.st[C_DROP_NO_ROUTE] += 1
            return 0
        return send_resolved(&self.sb, self.st, self.acl, fl.fd, fl.family, e, port, data, n)

    cdef int flow_read(self, int fi) except -1:
        """Replies of one flow socket: recvmmsg, frame them into the connection, write."""
        cdef sflow_t *fl = &self.flows[fi]
        cdef sconn_t *c = &self.conns[fl.conn]
        cdef int n, j
        cdef size_t dl, need
        cdef const uint8_t *data
        for j in range(self.batch):
            self.rmsgs[j].msg_hdr.msg_namelen = sizeof(sockaddr_any)
            self.rmsgs[j].msg_hdr.msg_flags = 0
        with nogil:
            n = recvmmsg(fl.fd, self.rmsgs, self.batch, MSG_DONTWAIT, NULL)
        if n <= 0:
            return 0
        fl.last = self.now
        for j in range(n):
            dl = self.rmsgs[j].msg_len
            if self.rmsgs[j].msg_hdr.msg_flags & MSG_TRUNC or dl > MAX_PAYLOAD:
                self.st[C_DROP_TOO_BIG] += 1
                continue
            if dl == 0 and not c.mux:
                # gost reads RSV=0 as "no length given": a plain peer cannot take it.
                self.st[C_DROP_MALFORMED] += 1
                continue
            data = self.scratch + <size_t>j * DGRAM_SLOT
            need = frame_hdr_len(&self.rnames[j], c.mux) + dl
            if self.tx_limit - c.tx_end < need and c.tx_start:
                memmove(c.tx, c.tx + c.tx_start, c.tx_end - c.tx_start)
                c.tx_end -= c.tx_start
                c.tx_start = 0
            if self.tx_limit - c.tx_end < need:
                self.st[C_DROP_BUFFER_FULL] += 1
                if c.stall_since == 0:
                    c.stall_since = self.now
                continue
            c.tx_end += write_frame_hdr(c.tx + c.tx_end, &self.rnames[j], fl.id, c.mux, dl)
            memcpy(c.tx + c.tx_end, data, dl)
            c.tx_end += dl
            self.st[C_DOWN_DATAGRAMS] += 1
            self.st[C_DOWN_BYTES] += dl
        if not c.want_out:
            self.conn_write(fl.conn)
        return 0

    cdef int conn_write(self, int i) except -1:
        cdef sconn_t *c = &self.conns[i]
        cdef ssize_t n
        cdef int e
        if c.tx_end > c.tx_start:
            with nogil:
                n = c_send(c.fd, c.tx + c.tx_start, c.tx_end - c.tx_start,
                           MSG_NOSIGNAL | MSG_DONTWAIT)
            if n < 0:
                e = errno
                if e != EAGAIN and e != EINTR:
                    self.conn_close(i, None, -1)
                    return 0
                n = 0
            if n > 0:
                c.tx_start += n
                c.stall_since = 0
        if c.tx_start == c.tx_end:
            c.tx_start = c.tx_end = 0
            if c.want_out:
                c.want_out = False
                epoll_set(self.epfd, EPOLL_CTL_MOD, c.fd, EPOLLIN | EPOLLRDHUP, KIND_CONN, i)
        elif not c.want_out:
            c.want_out = True
            epoll_set(self.epfd, EPOLL_CTL_MOD, c.fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP,
                      KIND_CONN, i)
        return 0

    def tick(self, double now=0):
        """Idle flows out, disconnect peers that stopped reading. Call about once a second."""
        cdef int i
        if now == 0:
            now = mono_now()
        self.now = now
        if now < self.next_tick:
            return
        self.next_tick = now + 0.5
        for i in range(self.max_flows):
            if self.flows[i].used and now - self.flows[i].last > self.timeout:
                self.flow_release(i, C_ASSOC_EXPIRED)
        self.dns.expire(self, now)
        for i in range(self.max_conns):
            if self.conns[i].used and self.conns[i].stall_since and \
                    now - self.conns[i].stall_since > self.stall_timeout:
                self.conn_close(i, f"peer has not read for {self.stall_timeout:g}s with its "
                                   f"send buffer full", C_CONN_REJECTED)


# ------------------------------------------------------------------------- upstream cores

cdef class UpstreamCore:
    def __cinit__(self, *args, **kw):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise_oserror(errno, "epoll_create1")
        self.reply_fn = NULL
        self.reply_ctx = NULL

    def _init_stats(self, stats, log):
        self._stats_ref = _stats_view(stats)
        self.st = _stats_ptr(self._stats_ref)
        self.log = log or DEF_LOG
        self.now = mono_now()

    @property
    def stats(self):
        return self._stats_ref

    def fileno(self):
        return self.epfd

    cdef int c_send(self, const sockaddr_any *client, const sockaddr_any *dst,
                    const uint8_t *data, size_t n) except -1:
        return 0

    cdef int c_flush(self) except -1:
        return 0

    cdef int c_process(self) except -1:
        return 0

    cdef int c_tick(self, double now) except -1:
        return 0

    # Python probes of the C interface (tests, tools); replies are collected in a list.
    def send(self, client, dst, data):
        """Queue one datagram of flow `client` for `dst` (flush() writes it)."""
        cdef sockaddr_any c, d
        cdef bytes b = bytes(data)
        sockaddr_from_tuple(tuple(client), &c)
        sockaddr_from_tuple(tuple(dst), &d)
        self.c_send(&c, &d, <const uint8_t *><const char *>b, len(b))

    def flush(self):
        self.c_flush()

    def process(self):
        self.c_process()

    def tick(self, double now=0):
        self.c_tick(now if now else mono_now())

    def collect_replies(self, list into):
        """Deliver replies as (client, src, bytes) tuples appended to `into`."""
        self._collector = into
        self.reply_ctx = <void *>into
        self.reply_fn = _collect_reply

    def close(self):
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)


cdef int _collect_reply(void *ctx, const sockaddr_any *client, const sockaddr_any *src,
                        const uint8_t *data, size_t n) except -1:
    (<list>ctx).append((sockaddr_to_tuple(&client.sa), sockaddr_to_tuple(&src.sa),
                        (<const char *>data)[:n]))
    return 0


cdef enum:
    S_DOWN = 0
    S_CONNECTING = 1
    S_HANDSHAKE = 2
    S_UP = 3

cdef double BACKOFF_MIN = 0.05
cdef double BACKOFF_MAX = 2.0
cdef double CONNECT_TIMEOUT = 5.0
cdef double CHECK_INTERVAL = 0.02       # connection upkeep at most this often


def _resolve(server, int socktype=socket.SOCK_STREAM):
    host, port = server
    infos = socket.getaddrinfo(host, port, 0, socktype)
    if not infos:
        raise ValueError(f"cannot resolve {host!r}")
    fam, _, _, _, addr = infos[0]
    return fam, addr


cdef class TunnelUpstream(UpstreamCore):
    """Tunnel client core, flows keyed by client address. Multiplexed (CMD 0xFA): flows
    spread over `connections` TCP connections, frames carry flow ids. gost=True: one
    connection per flow (CMD 0xF3, RFC 1929 user/password), opened when the flow starts,
    closed when it idles out, its buffers allocated and freed with it. Connections
    reconnect with backoff; frames queue while down (queue_limit bytes per connection)."""

    def __init__(self, server, secret=None, int connections=1, mark=None, stats=None,
                 queue_limit=None, double timeout=60.0, int max_flows=4096, log=None,
                 bint gost=False, user=None, password=None):
        if not 1 <= connections <= 64:
            raise ValueError(f"connections must be 1-64, got {connections}")
        if not 1 <= max_flows <= 65536:
            raise ValueError(f"max_flows must be 1-65536, got {max_flows}")
        _proto.check_client_options(gost, secret, connections, user, password)
        if queue_limit is None:
            queue_limit = _proto.GOST_QUEUE_LIMIT if gost else _proto.MUX_QUEUE_LIMIT
        if queue_limit < MAX_PAYLOAD + MAX_FRAME_HEADER:
            raise ValueError(f"queue_limit must be at least {MAX_PAYLOAD + MAX_FRAME_HEADER}")
        self._init_stats(stats, log)
        self.server = tuple(server)
        self.family, self.addr = _resolve(self.server)
        self.secret, self.user, self.password, self.mark = secret, user, password, mark
        self.gost = gost
        self.mux = not gost
        self.say = _proto.LogLimiter(self.log)
        self.timeout = timeout
        self.queue_limit = queue_limit
        self.rx_cap = _proto.GOST_RX_CAP if gost else RX_CAP
        self.nconns = max_flows if gost else connections
        self.max_flows = max_flows
        self.hs = {}
        self.conns = <cconn_t *>calloc(self.nconns, sizeof(cconn_t))
        self.dirty = <int *>calloc(self.nconns, sizeof(int))
        self.flows = <cflow_t *>calloc(max_flows, sizeof(cflow_t))
        if self.conns == NULL or self.dirty == NULL or self.flows == NULL:
            raise MemoryError()
        htab_init(&self.tab, max_flows)
        for i in range(self.nconns):
            self.conns[i].fd = -1
            self.conns[i].backoff = BACKOFF_MIN
        if not gost:
            for i in range(connections):
                self.conn_open_buffers(i)
        self.c_tick(mono_now())

    def __dealloc__(self):
        if self.conns != NULL:
            for i in range(self.nconns):
                if self.conns[i].fd >= 0:
                    close(self.conns[i].fd)
                free(self.conns[i].rx)
                free(self.conns[i].tx)
            free(self.conns)
        free(self.dirty)
        free(self.flows)
        free(self.tab.slots)

    def close(self):
        for i in range(self.nconns):
            if self.conns[i].fd >= 0:
                self.conn_close(i)
        UpstreamCore.close(self)

    @property
    def connected(self):
        """Number of connections whose handshake is done."""
        return self.nup

    @property
    def flows_open(self):
        return self.nflows

    cdef int conn_open_buffers(self, int i) except -1:
        """Give connection i its receive buffer and send queue (for a gost flow: when the
        flow starts); -1 raised as MemoryError."""
        cdef cconn_t *c = &self.conns[i]
        c.rx = <uint8_t *>malloc(self.rx_cap)
        c.tx = <uint8_t *>malloc(self.queue_limit)
        if c.rx == NULL or c.tx == NULL:
            free(c.rx)
            free(c.tx)
            c.rx = c.tx = NULL
            raise MemoryError()
        c.fd = -1
        c.state = S_DOWN
        c.next_try = 0
        c.backoff = BACKOFF_MIN
        c.rx_len = c.tx_frame = c.tx_start = c.tx_end = 0
        c.want_out = c.ever_up = False
        return 0

    cdef int conn_shut(self, int i) except -1:
        """Close connection i's socket: 1 when its handshake had been done, else 0."""
        cdef cconn_t *c = &self.conns[i]
        cdef int was_up = c.state == S_UP
        if c.fd >= 0:
            close(c.fd)
            c.fd = -1
        if was_up:
            self.st[C_CONN_OPEN] -= 1
            self.nup -= 1
        c.state = S_DOWN
        self.hs.pop(i, None)
        return was_up

    cdef int conn_close(self, int i) except -1:
        """Close connection i for good (its flow ended, or the core closes)."""
        cdef cconn_t *c = &self.conns[i]
        self.conn_shut(i)
        if self.gost:
            free(c.rx)
            free(c.tx)
            c.rx = c.tx = NULL
        return 0

    cdef object conn_name(self, int i):
        if self.gost:
            return "gost connection of flow %s:%s" % sockaddr_to_tuple(&self.flows[i].client.sa)
        return f"tunnel connection {i}"

    cdef int flow_for(self, const sockaddr_any *client) except -2:
        cdef uint64_t k[3]
        cdef int32_t f
        cdef int i = 0
        cdef cflow_t *fl
        sa_key(client, k)
        f = htab_find(&self.tab, k)
        if f >= 0:
            return f
        if self.nflows >= self.max_flows:
            self.st[C_DROP_TABLE_FULL] += 1
            return -1
        # A free slot: flows are few compared to the scan cost only at the cap.
        for i in range(self.max_flows):
            if not self.flows[i].used:
                break
        if self.gost:
            try:
                self.conn_open_buffers(i)
            except MemoryError:
                self.st[C_ASSOC_REFUSED] += 1
                return -1
        fl = &self.flows[i]
        memcpy(&fl.client, client, sizeof(sockaddr_any))
        fl.gen += 1
        fl.id = (<uint32_t>fl.gen << 16) | <uint32_t>i
        fl.used = True
        fl.last = self.now
        if self.gost:
            fl.conn = i
        else:
            fl.conn = self.next_conn
            self.next_conn = (self.next_conn + 1) % self.nconns
        htab_put(&self.tab, k, i)
        self.nflows += 1
        if i >= self.flow_hi:
            self.flow_hi = i + 1
        self.st[C_ASSOC_CREATED] += 1
        self.st[C_ASSOC_OPEN] += 1
        if self.gost:
            self.conn_connect(i)
        return i

    cdef int c_send(self, const sockaddr_any *client, const sockaddr_any *dst,
                    const uint8_t *data, size_t n) except -1:
        cdef int f, ci
        cdef cconn_t *c
        cdef size_t need
        if n > MAX_PAYLOAD:
            self.st[C_DROP_TOO_BIG] += 1
            return 0
        if n == 0 and self.gost:
            # gost reads RSV = 0 as "length unknown": an empty datagram cannot be framed
            self.st[C_DROP_MALFORMED] += 1
            return 0
        f = self.flow_for(client)
        if f < 0:
            return 0
        self.flows[f].last = self.now
        ci = self.flows[f].conn
        c = &self.conns[ci]
        need = frame_hdr_len(dst, self.mux) + n
        if self.queue_limit - c.tx_end < need and c.tx_frame:
            memmove(c.tx, c.tx + c.tx_frame, c.tx_end - c.tx_frame)
            c.tx_start -= c.tx_frame
            c.tx_end -= c.tx_frame
            c.tx_frame = 0
        if self.queue_limit - c.tx_end < need:
            self.st[C_DROP_BUFFER_FULL if c.state == S_UP else C_QUEUE_DROPS] += 1
            return 0
        c.tx_end += write_frame_hdr(c.tx + c.tx_end, dst, self.flows[f].id, self.mux, n)
        memcpy(c.tx + c.tx_end, data, n)
        c.tx_end += n
        if not c.dirty:
            c.dirty = True
            self.dirty[self.ndirty] = ci
            self.ndirty += 1
        self.st[C_UP_DATAGRAMS] += 1
        self.st[C_UP_BYTES] += n
        return 0

    cdef int c_flush(self) except -1:
        cdef int j, i
        for j in range(self.ndirty):
            i = self.dirty[j]
            self.conns[i].dirty = False
            if self.conns[i].state == S_UP and not self.conns[i].want_out:
                self.conn_write(i)
        self.ndirty = 0
        return 0

    cdef int conn_write(self, int i) except -1:
        cdef cconn_t *c = &self.conns[i]
        cdef ssize_t n
        cdef size_t fl
        cdef int e
        if c.state != S_UP:
            return 0
        if c.tx_end > c.tx_start:
            with nogil:
                n = c_send(c.fd, c.tx + c.tx_start, c.tx_end - c.tx_start,
                           MSG_NOSIGNAL | MSG_DONTWAIT)
            if n < 0:
                e = errno
                if e != EAGAIN and e != EINTR:
                    self.conn_down(i, os.strerror(e))
                    return 0
                n = 0
            c.tx_start += n
            # keep tx_frame on a frame boundary at or before tx_start
            while c.tx_frame < c.tx_start:
                fl = own_frame_len(c.tx + c.tx_frame, self.mux)
                if c.tx_frame + fl > c.tx_start:
                    break
                c.tx_frame += fl
        if c.tx_start == c.tx_end:
            c.tx_start = c.tx_end = c.tx_frame = 0
            if c.want_out:
                c.want_out = False
                epoll_set(self.epfd, EPOLL_CTL_MOD, c.fd, EPOLLIN | EPOLLRDHUP, KIND_CONN, i)
        elif not c.want_out:
            c.want_out = True
            epoll_set(self.epfd, EPOLL_CTL_MOD, c.fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP,
                      KIND_CONN, i)
        return 0

    cdef int conn_down(self, int i, str why) except -1:
        """Connection i failed or was lost: retry after the backoff."""
        cdef cconn_t *c = &self.conns[i]
        cdef size_t fl
        if self.conn_shut(i):
            self.say(logging.WARNING, "%s to %s:%s lost (%s); reconnecting",
                     self.conn_name(i), self.server[0], self.server[1], why)
        elif why:
            self.say(logging.INFO, "%s to %s:%s failed (%s); retry in %.2fs",
                     self.conn_name(i), self.server[0], self.server[1], why, c.backoff)
        c.want_out = False
        c.next_try = self.now + c.backoff
        c.backoff = min(c.backoff * 2, BACKOFF_MAX)
        c.rx_len = 0
        # A frame cut by the disconnect is lost; whole frames after it wait for the next
        # connection.
        if c.tx_frame < c.tx_start:
            fl = own_frame_len(c.tx + c.tx_frame, self.mux)
            c.tx_frame += fl
            self.st[C_QUEUE_DROPS] += 1
        c.tx_start = c.tx_frame
        return 0

    cdef int conn_connect(self, int i) except -1:
        cdef cconn_t *c = &self.conns[i]
        s = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.mark:
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            err = s.connect_ex(self.addr)
        except OSError as e:
            s.close()
            self.conn_down(i, str(e))
            return 0
        if err not in (0, _errno.EINPROGRESS):
            s.close()
            self.conn_down(i, os.strerror(err))
            return 0
        c.fd = s.detach()
        c.state = S_CONNECTING
        c.deadline = self.now + CONNECT_TIMEOUT
        epoll_set(self.epfd, EPOLL_CTL_ADD, c.fd, EPOLLOUT | EPOLLIN, KIND_CONN, i)
        return 0

    cdef int conn_handshake(self, int i, uint32_t events) except -1:
        cdef cconn_t *c = &self.conns[i]
        cdef int err = 0
        cdef socklen_t elen = sizeof(int)
        if c.state == S_CONNECTING:
            getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &elen)
            if err or events & (EPOLLERR | EPOLLHUP):
                self.conn_down(i, os.strerror(err) if err else "connection failed")
                return 0
            hs = _proto.ClientHandshake(
                cmd=_proto.CMD_UDP_TUN if self.gost else _proto.CMD_UDP_TUN_MUX,
                secret=self.secret, user=self.user, password=self.password)
            self.hs[i] = hs
            c.state = S_HANDSHAKE
            epoll_set(self.epfd, EPOLL_CTL_MOD, c.fd, EPOLLIN | EPOLLRDHUP, KIND_CONN, i)
            try:
                os.write(c.fd, hs.start())
            except OSError as e:
                self.conn_down(i, str(e))
            return 0
        hs = self.hs[i]
        try:
            data = os.read(c.fd, 4096)
            if not data:
                self.conn_down(i, "server closed the connection during the handshake")
                return 0
            out = hs.feed(data)
            if out:
                os.write(c.fd, out)
        except BlockingIOError:
            return 0
        except (OSError, ValueError) as e:
            self.st[C_CONN_REJECTED] += 1
            if self.mux and getattr(e, "rep", None) == _proto.REP_CMD_UNSUPPORTED:
                if not self.rep7_logged:
                    self.rep7_logged = True
                    self.log.error(_proto.REP7_HINT, self.server[0], self.server[1])
                self.conn_down(i, None)
            else:
                self.conn_down(i, f"handshake: {e}")
            return 0
        if not hs.done:
            return 0
        del self.hs[i]
        c.state = S_UP
        c.backoff = BACKOFF_MIN
        self.nup += 1
        self.st[C_CONN_OPEN] += 1
        if c.ever_up:
            self.st[C_CONN_RECONNECTS] += 1
            self.say(logging.WARNING, "%s to %s:%s re-established", self.conn_name(i),
                     self.server[0], self.server[1])
        c.ever_up = True
        left = hs.leftover
        if left:
            memcpy(c.rx, <const char *>left, len(left))
            c.rx_len = len(left)
            self.conn_frames(i)
        self.conn_write(i)
        return 0

    cdef int conn_read(self, int i) except -1:
        cdef cconn_t *c = &self.conns[i]
        cdef ssize_t n
        with nogil:
            n = read(c.fd, c.rx + c.rx_len, self.rx_cap - c.rx_len)
        if n == 0:
            self.conn_down(i, "server closed the connection")
            return 0
        if n < 0:
            if errno == EAGAIN or errno == EINTR:
                return 0
            self.conn_down(i, os.strerror(errno))
            return 0
        c.rx_len += n
        return self.conn_frames(i)

    cdef int conn_frames(self, int i) except -1:
        cdef cconn_t *c = &self.conns[i]
        cdef size_t pos = 0
        cdef Py_ssize_t r
        cdef frame_t f
        cdef sockaddr_any src
        cdef uint32_t slot
        cdef cflow_t *fl
        while pos < c.rx_len:
            r = parse_frame(c.rx + pos, c.rx_len - pos, self.mux, MAX_PAYLOAD, &f)
            if r == 0:
                break
            if r < 0:
                self.st[C_FRAMES_BAD] += 1
                self.conn_down(i, f"bad frame from server: {FRAME_ERROR_TEXT[-r]}")
                return 0
            pos += r
            slot = i if self.gost else f.flow & 0xffff
            if slot >= <uint32_t>self.max_flows or not self.flows[slot].used or \
                    (self.mux and self.flows[slot].id != f.flow):
                self.st[C_DROP_NO_ROUTE] += 1
                continue
            if frame_to_sockaddr(&f, &src, 0) == 0:
                self.st[C_DROP_NO_ROUTE] += 1
                continue
            fl = &self.flows[slot]
            fl.last = self.now
            self.st[C_DOWN_DATAGRAMS] += 1
            self.st[C_DOWN_BYTES] += f.dlen
            if self.reply_fn != NULL:
                self.reply_fn(self.reply_ctx, &fl.client, &src, f.data, f.dlen)
        if pos < c.rx_len:
            memmove(c.rx, c.rx + pos, c.rx_len - pos)
        c.rx_len -= pos
        return 0

    cdef int c_process(self) except -1:
        cdef epoll_event evs[EV_MAX]
        cdef int n, j
        cdef uint32_t i, ev
        cdef cconn_t *c
        with nogil:
            n = epoll_wait(self.epfd, evs, EV_MAX, 0)
        self.now = mono_now()
        for j in range(n):
            i = evs[j].data.u64 & 0xffffffff
            ev = evs[j].events
            c = &self.conns[i]
            if c.fd < 0:
                continue
            if c.state == S_CONNECTING or c.state == S_HANDSHAKE:
                self.conn_handshake(i, ev)
                continue
            if ev & EPOLLOUT:
                self.conn_write(i)
            if c.state == S_UP and ev & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP):
                self.conn_read(i)
        return 0

    cdef int c_tick(self, double now) except -1:
        cdef int i, hi
        cdef uint64_t k[3]
        cdef cconn_t *c
        self.now = now
        hi = self.flow_hi if self.gost else self.nconns
        # connect, reconnect, time out handshakes: only while some connection is not up
        if (self.nflows if self.gost else self.nconns) > self.nup and now >= self.next_check:
            self.next_check = now + CHECK_INTERVAL
            for i in range(hi):
                c = &self.conns[i]
                if self.gost and not self.flows[i].used:
                    continue
                if c.state == S_DOWN and now >= c.next_try:
                    self.conn_connect(i)
                elif (c.state == S_CONNECTING or c.state == S_HANDSHAKE) and now > c.deadline:
                    self.conn_down(i, "timed out")
        if now >= self.next_expiry:
            self.next_expiry = now + 1.0
            for i in range(self.flow_hi):
                if self.flows[i].used and now - self.flows[i].last > self.timeout:
                    sa_key(&self.flows[i].client, k)
                    htab_del(&self.tab, k)
                    if self.gost:
                        self.conn_close(i)
                    self.flows[i].used = False
                    self.nflows -= 1
                    self.st[C_ASSOC_OPEN] -= 1
                    self.st[C_ASSOC_EXPIRED] += 1
            while self.flow_hi and not self.flows[self.flow_hi - 1].used:
                self.flow_hi -= 1
        return 0


# ------------------------------------------------------------------------- SOCKS5 upstream

cdef enum:
    A_CONNECTING = 1
    A_HANDSHAKE = 2
    A_UP = 3
    SOCKS_QUEUE = 65536 + 1024


cdef class Socks5Upstream(UpstreamCore):
    """SOCKS5 UDP ASSOCIATE client core: one association (TCP control connection + UDP
    socket) per client flow, so replies map back to their flow; datagrams wait in a small
    per-flow queue while the association is being set up."""

    def __init__(self, server, user=None, password=None, mark=None, stats=None,
                 double timeout=60.0, int max_flows=1024, size_t queue_limit=SOCKS_QUEUE,
                 int batch=32, log=None):
        if not 1 <= max_flows <= 65536:
            raise ValueError(f"max_flows must be 1-65536, got {max_flows}")
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1-{MAX_BATCH}, got {batch}")
        self._init_stats(stats, log)
        self.server = tuple(server)
        self.family, self.addr = _resolve(self.server)
        self.user, self.password, self.mark = user, password, mark
        self.timeout = timeout
        self.queue_limit = max(queue_limit, MAX_PAYLOAD + 64)
        self.max_flows = max_flows
        self.batch = batch
        self.hs = {}
        self.flows = <aflow_t *>calloc(max_flows, sizeof(aflow_t))
        self.scratch = <uint8_t *>malloc(<size_t>batch * (DGRAM_SLOT + UDP_HDR_ROOM))
        if self.flows == NULL or self.scratch == NULL:
            raise MemoryError()
        htab_init(&self.tab, max_flows)
        sq_init(&self.sb, batch)

    def __dealloc__(self):
        if self.flows != NULL:
            for i in range(self.max_flows):
                if self.flows[i].used:
                    if self.flows[i].tcp_fd >= 0:
                        close(self.flows[i].tcp_fd)
                    if self.flows[i].udp_fd >= 0:
                        close(self.flows[i].udp_fd)
                    free(self.flows[i].queue)
            free(self.flows)
        free(self.scratch)
        free(self.tab.slots)
        sq_free(&self.sb)

    def close(self):
        for i in range(self.max_flows):
            if self.flows[i].used:
                self.flow_close(i, -1)
        UpstreamCore.close(self)

    @property
    def flows_open(self):
        return self.nflows

    cdef int flow_open(self, const sockaddr_any *client) except -2:
        cdef uint64_t k[3]
        cdef int i = 0
        cdef aflow_t *a
        if self.nflows >= self.max_flows:
            self.st[C_DROP_TABLE_FULL] += 1
            return -1
        for i in range(self.max_flows):
            if not self.flows[i].used:
                break
        a = &self.flows[i]
        memset(a, 0, sizeof(aflow_t))
        a.tcp_fd = a.udp_fd = -1
        a.queue = <uint8_t *>malloc(self.queue_limit)
        if a.queue == NULL:
            self.st[C_ASSOC_REFUSED] += 1
            return -1
        memcpy(&a.client, client, sizeof(sockaddr_any))
        a.used = True
        a.last = self.now
        a.deadline = self.now + CONNECT_TIMEOUT
        a.state = A_CONNECTING
        sa_key(client, k)
        htab_put(&self.tab, k, i)
        self.nflows += 1
        self.st[C_ASSOC_CREATED] += 1
        self.st[C_ASSOC_OPEN] += 1
        try:
            u = socket.socket(self.family, socket.SOCK_DGRAM)
            u.setblocking(False)
            if self.mark:
                u.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            u.bind(("::" if self.family == socket.AF_INET6 else "0.0.0.0", 0))
            a.udp_fd = u.detach()
            t = socket.socket(self.family, socket.SOCK_STREAM)
            t.setblocking(False)
            t.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.mark:
                t.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            err = t.connect_ex(self.addr)
            if err not in (0, _errno.EINPROGRESS):
                t.close()
                raise OSError(err, os.strerror(err))
            a.tcp_fd = t.detach()
            epoll_set(self.epfd, EPOLL_CTL_ADD, a.tcp_fd, EPOLLIN | EPOLLOUT, KIND_TCP, i)
            epoll_set(self.epfd, EPOLL_CTL_ADD, a.udp_fd, EPOLLIN, KIND_UDP, i)
        except OSError as e:
            self.log.warning("SOCKS5 association via %s:%s failed: %s", self.server[0],
                             self.server[1], e)
            self.flow_close(i, C_ASSOC_REFUSED)
            return -1
        return i

    cdef int flow_close(self, int i, int counter) except -1:
        cdef aflow_t *a = &self.flows[i]
        cdef uint64_t k[3]
        if not a.used:
            return 0
        if a.tcp_fd >= 0:
            close(a.tcp_fd)
        if a.udp_fd >= 0:
            close(a.udp_fd)
        if a.state == A_UP:
            self.st[C_CONN_OPEN] -= 1
        free(a.queue)
        a.queue = NULL
        a.tcp_fd = a.udp_fd = -1
        sa_key(&a.client, k)
        htab_del(&self.tab, k)
        a.used = False
        self.hs.pop(i, None)
        self.nflows -= 1
        self.st[C_ASSOC_OPEN] -= 1
        if counter >= 0:
            self.st[counter] += 1
        return 0

    cdef int c_send(self, const sockaddr_any *client, const sockaddr_any *dst,
                    const uint8_t *data, size_t n) except -1:
        cdef uint64_t k[3]
        cdef int32_t i
        cdef aflow_t *a
        cdef size_t hl, need
        cdef uint32_t ln
        cdef uint8_t *slot
        if n > MAX_PAYLOAD:
            self.st[C_DROP_TOO_BIG] += 1
            return 0
        sa_key(client, k)
        i = htab_find(&self.tab, k)
        if i < 0:
            i = self.flow_open(client)
            if i < 0:
                return 0
        a = &self.flows[i]
        a.last = self.now
        if a.state != A_UP:
            # [len(4)] [SOCKS UDP header] [data]
            need = 4 + 22 + n
            if self.queue_limit - a.qlen < need:
                self.st[C_QUEUE_DROPS] += 1
                return 0
            slot = a.queue + a.qlen
            hl = write_udp_req_hdr(slot + 4, dst)
            memcpy(slot + 4 + hl, data, n)
            ln = <uint32_t>(hl + n)
            memcpy(slot, &ln, 4)
            a.qlen += 4 + hl + n
            return 0
        if self.sb.n and (self.sb.fd != a.udp_fd or sq_full(&self.sb)):
            self.c_flush()
        slot = self.scratch + <size_t>self.sb.niov * (DGRAM_SLOT + UDP_HDR_ROOM)
        hl = write_udp_req_hdr(slot, dst)
        memcpy(slot + hl, data, n)
        self.sb.fd = a.udp_fd
        sq_add(&self.sb, &a.relay, sa_len(&a.relay), slot, hl + n)
        self.st[C_UP_DATAGRAMS] += 1
        self.st[C_UP_BYTES] += n
        return 0

    cdef int c_flush(self) except -1:
        if self.sb.n:
            sq_flush(&self.sb, self.st, -1, -1)
        return 0

    cdef int flow_send_queue(self, int i) except -1:
        cdef aflow_t *a = &self.flows[i]
        cdef size_t pos = 0
        cdef uint32_t ln
        cdef ssize_t r
        while pos < a.qlen:
            memcpy(&ln, a.queue + pos, 4)
            r = sendto(a.udp_fd, a.queue + pos + 4, ln, MSG_DONTWAIT, &a.relay.sa,
                       sa_len(&a.relay))
            if r < 0:
                self.st[C_DROP_SEND_ERROR] += 1
            else:
                self.st[C_UP_DATAGRAMS] += 1
                self.st[C_UP_BYTES] += ln - (10 if a.queue[pos + 4 + 3] == 1 else 22)
            pos += 4 + ln
        a.qlen = 0
        free(a.queue)
        a.queue = NULL
        return 0

    cdef int flow_handshake(self, int i, uint32_t events) except -1:
        cdef aflow_t *a = &self.flows[i]
        cdef int err = 0
        cdef socklen_t elen = sizeof(int)
        cdef sockaddr_any relay
        if a.state == A_CONNECTING:
            getsockopt(a.tcp_fd, SOL_SOCKET, SO_ERROR, &err, &elen)
            if err or events & (EPOLLERR | EPOLLHUP):
                self.log.warning("SOCKS5 server %s:%s: %s", self.server[0], self.server[1],
                                 os.strerror(err) if err else "connection failed")
                self.flow_close(i, C_ASSOC_REFUSED)
                return 0
            hs = _proto.ClientHandshake(cmd=_proto.CMD_UDP_ASSOCIATE,
                                        host="::" if self.family == socket.AF_INET6 else "0.0.0.0",
                                        user=self.user, password=self.password)
            self.hs[i] = hs
            a.state = A_HANDSHAKE
            epoll_set(self.epfd, EPOLL_CTL_MOD, a.tcp_fd, EPOLLIN | EPOLLRDHUP, KIND_TCP, i)
            try:
                os.write(a.tcp_fd, hs.start())
            except OSError as e:
                self.flow_close(i, C_ASSOC_REFUSED)
            return 0
        hs = self.hs[i]
        try:
            data = os.read(a.tcp_fd, 4096)
            if not data:
                raise OSError("SOCKS5 server closed the connection during the handshake")
            out = hs.feed(data)
            if out:
                os.write(a.tcp_fd, out)
            if not hs.done:
                return 0
            host, port = hs.bound
            if host in ("0.0.0.0", "::"):
                host = self.addr[0]
            fam, raddr = _resolve((host, port), socket.SOCK_DGRAM)
            if fam != self.family:
                raise OSError(f"relay address {host} is not of the server's family")
            sockaddr_from_tuple(raddr[:2], &relay)
        except BlockingIOError:
            return 0
        except (OSError, ValueError) as e:
            self.log.warning("SOCKS5 UDP ASSOCIATE via %s:%s failed: %s", self.server[0],
                             self.server[1], e)
            self.st[C_CONN_REJECTED] += 1
            self.flow_close(i, C_ASSOC_REFUSED)
            return 0
        del self.hs[i]
        memcpy(&a.relay, &relay, sizeof(sockaddr_any))
        a.state = A_UP
        self.st[C_CONN_OPEN] += 1
        self.flow_send_queue(i)
        return 0

    cdef int flow_recv(self, int i) except -1:
        cdef aflow_t *a = &self.flows[i]
        cdef mmsghdr msgs[MAX_BATCH]
        cdef iovec iovs[MAX_BATCH]
        cdef sockaddr_any names[MAX_BATCH]
        cdef sockaddr_any src
        cdef frame_t f
        cdef Py_ssize_t hl
        cdef int n, j
        for j in range(self.batch):
            iovs[j].iov_base = self.scratch + <size_t>j * (DGRAM_SLOT + UDP_HDR_ROOM)
            iovs[j].iov_len = DGRAM_SLOT + UDP_HDR_ROOM
            msgs[j].msg_hdr.msg_iov = &iovs[j]
            msgs[j].msg_hdr.msg_iovlen = 1
            msgs[j].msg_hdr.msg_name = &names[j]
            msgs[j].msg_hdr.msg_namelen = sizeof(sockaddr_any)
            msgs[j].msg_hdr.msg_control = NULL
            msgs[j].msg_hdr.msg_controllen = 0
            msgs[j].msg_hdr.msg_flags = 0
        with nogil:
            n = recvmmsg(a.udp_fd, msgs, self.batch, MSG_DONTWAIT, NULL)
        if n <= 0:
            return 0
        a.last = self.now
        for j in range(n):
            if a.state != A_UP or not sa_same(&names[j], &a.relay):
                self.st[C_DROP_MALFORMED] += 1
                continue
            hl = parse_udp_req(<const uint8_t *>iovs[j].iov_base, msgs[j].msg_len, &f)
            if hl < 0:
                self.st[C_DROP_MALFORMED] += 1
                continue
            if f.flow != 0:
                self.st[C_FRAMES_BAD] += 1
                continue
            if frame_to_sockaddr(&f, &src, 0) == 0:
                self.st[C_DROP_NO_ROUTE] += 1
                continue
            self.st[C_DOWN_DATAGRAMS] += 1
            self.st[C_DOWN_BYTES] += f.dlen
            if self.reply_fn != NULL:
                self.reply_fn(self.reply_ctx, &a.client, &src, f.data, f.dlen)
        return 0

    cdef int c_process(self) except -1:
        cdef epoll_event evs[EV_MAX]
        cdef int n, j
        cdef uint32_t i, kind, ev
        cdef aflow_t *a
        cdef char junk[512]
        cdef ssize_t r
        with nogil:
            n = epoll_wait(self.epfd, evs, EV_MAX, 0)
        self.now = mono_now()
        for j in range(n):
            i = evs[j].data.u64 & 0xffffffff
            kind = evs[j].data.u64 >> 32
            ev = evs[j].events
            a = &self.flows[i]
            if not a.used:
                continue
            if kind == KIND_UDP:
                self.flow_recv(i)
            elif a.state != A_UP:
                self.flow_handshake(i, ev)
            else:
                # the control connection: its end ends the association
                r = read(a.tcp_fd, junk, sizeof(junk))
                if r == 0 or (r < 0 and errno != EAGAIN and errno != EINTR):
                    self.flow_close(i, -1)
        return 0

    cdef int c_tick(self, double now) except -1:
        cdef int i
        self.now = now
        if now < self.next_expiry:
            return 0
        self.next_expiry = now + 0.5
        for i in range(self.max_flows):
            if not self.flows[i].used:
                continue
            if self.flows[i].state != A_UP and now > self.flows[i].deadline:
                self.log.warning("SOCKS5 association via %s:%s timed out", self.server[0],
                                 self.server[1])
                self.flow_close(i, C_ASSOC_REFUSED)
            elif now - self.flows[i].last > self.timeout:
                self.flow_close(i, C_ASSOC_EXPIRED)
        return 0


# ------------------------------------------------------------------------- SOCKS5 server UDP relay

cdef struct assoc_t:
    sockaddr_any client
    int fd
    uint32_t gen                 # bumped each time the slot is taken
    bint used
    bint port_known
    int local_family             # replies to the client leave from local (0: the route's)
    uint8_t local[16]


cdef class Socks5Relay(Poller):
    """UDP ASSOCIATE data path of `relay socks5`: one relay socket per association; from
    the client: strip the header, check FRAG and the access list, send; from anyone else:
    prepend the header (in the receive slot's headroom, no copy) and send to the client."""
    cdef assoc_t *assocs
    cdef int max_assoc
    cdef int nassoc
    cdef Acl acl
    cdef int batch
    cdef uint8_t *scratch
    cdef mmsghdr *rmsgs
    cdef iovec *riovs
    cdef sockaddr_any *rnames
    cdef sendq_t sb
    cdef sendq_t sb_down

    def __init__(self, acl_table=(), stats=None, *, int max_assoc=1024, int batch=32, log=None,
                 resolve=None):
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1-{MAX_BATCH}, got {batch}")
        self._init_stats(stats, log)
        self.acl = acl_table if isinstance(acl_table, Acl) else Acl(acl_table)
        self.max_assoc = max_assoc
        self.batch = batch
        self.assocs = <assoc_t *>calloc(max_assoc, sizeof(assoc_t))
        self.scratch = <uint8_t *>malloc(<size_t>batch * (DGRAM_SLOT + UDP_HDR_ROOM))
        self.rmsgs = <mmsghdr *>calloc(batch, sizeof(mmsghdr))
        self.riovs = <iovec *>calloc(batch, sizeof(iovec))
        self.rnames = <sockaddr_any *>calloc(batch, sizeof(sockaddr_any))
        if not (self.assocs and self.scratch and self.rmsgs and self.riovs and self.rnames):
            raise MemoryError()
        sq_init(&self.sb, batch)
        sq_init(&self.sb_down, batch)
        for i in range(batch):
            self.riovs[i].iov_base = self.scratch + <size_t>i * (DGRAM_SLOT + UDP_HDR_ROOM) \
                + UDP_HDR_ROOM
            self.riovs[i].iov_len = DGRAM_SLOT
            self.rmsgs[i].msg_hdr.msg_iov = &self.riovs[i]
            self.rmsgs[i].msg_hdr.msg_iovlen = 1
            self.rmsgs[i].msg_hdr.msg_name = &self.rnames[i]
        self.init_dns(resolve)

    def tick(self, double now=0):
        """Give up lookups that take too long. Call about once a second."""
        self.now = now if now else mono_now()
        self.dns.expire(self, self.now)

    def __dealloc__(self):
        free(self.assocs)
        free(self.scratch)
        free(self.rmsgs)
        free(self.riovs)
        free(self.rnames)
        sq_free(&self.sb)
        sq_free(&self.sb_down)

    @property
    def associations(self):
        return self.nassoc

    def add(self, int fd, client, local=None):
        """Relay for the client at (host, port) through UDP socket fd (owned by the
        caller); port 0: learn it from the first datagram from that host. local: the
        address the client reaches the relay at (its control connection's local address)
        when fd is bound to a wildcard: replies to the client leave from it. Returns a
        slot, -1 when the table is full."""
        cdef int i
        cdef sockaddr_any given, la
        if local is not None:
            sockaddr_from_tuple((local[0], 0), &given)
        for i in range(self.max_assoc):
            if not self.assocs[i].used:
                break
        else:
            return -1
        sockaddr_from_tuple(tuple(client), &self.assocs[i].client)
        self.assocs[i].local_family = 0
        if local is not None:
            sa_unmap(&given, &la)
            self.assocs[i].local_family = la.sa.sa_family
            if la.sa.sa_family == AF_INET:
                memcpy(self.assocs[i].local, &la.v4.sin_addr, 4)
            else:
                memcpy(self.assocs[i].local, la.v6.sin6_addr.s6_addr, 16)
        self.assocs[i].port_known = client[1] != 0
        self.assocs[i].fd = fd
        self.assocs[i].gen += 1
        self.assocs[i].used = True
        self.nassoc += 1
        epoll_set(self.epfd, EPOLL_CTL_ADD, fd, EPOLLIN, KIND_UDP, i)
        self.st[C_ASSOC_CREATED] += 1
        self.st[C_ASSOC_OPEN] += 1
        return i

    def remove(self, int i):
        if 0 <= i < self.max_assoc and self.assocs[i].used:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.assocs[i].fd, NULL)
            self.assocs[i].used = False
            self.nassoc -= 1
            self.st[C_ASSOC_OPEN] -= 1

    cdef int on_event(self, uint32_t kind, uint32_t idx, uint32_t events) except -1:
        cdef assoc_t *a = &self.assocs[idx]
        cdef int n, j
        cdef frame_t f
        cdef Py_ssize_t hl
        cdef sockaddr_any dst
        cdef socklen_t dl
        cdef uint8_t *data
        cdef size_t ln, h2
        cdef int fam
        if kind != KIND_UDP or not a.used:
            return 0
        for j in range(self.batch):
            self.rmsgs[j].msg_hdr.msg_namelen = sizeof(sockaddr_any)
            self.rmsgs[j].msg_hdr.msg_flags = 0
        with nogil:
            n = recvmmsg(a.fd, self.rmsgs, self.batch, MSG_DONTWAIT, NULL)
        if n <= 0:
            return 0
        fam = a.client.sa.sa_family
        self.sb.fd = a.fd
        sq_clear(&self.sb)
        self.sb_down.fd = a.fd
        sq_clear(&self.sb_down)
        sq_set_src(&self.sb_down, a.local_family, a.local)
        for j in range(n):
            data = <uint8_t *>self.riovs[j].iov_base
            ln = self.rmsgs[j].msg_len
            if sa_same_ip(&self.rnames[j], &a.client) and (
                    not a.port_known or sa_same(&self.rnames[j], &a.client)):
                if not a.port_known:
                    memcpy(&a.client, &self.rnames[j], sizeof(sockaddr_any))
                    a.port_known = True
                hl = parse_udp_req(data, ln, &f)
                if hl < 0:
                    self.st[C_DROP_MALFORMED] += 1
                    continue
                if f.flow != 0:
                    self.st[C_FRAMES_BAD] += 1       # FRAG != 0: fragments are refused
                    continue
                if f.atyp == 3:
                    dl = self.dns.dst_for(&f, idx, a.gen, fam, self.now, &dst)
                    if dl == 0:
                        continue
                else:
                    dl = frame_to_sockaddr(&f, &dst, fam)
                    if dl == 0:
                        self.st[C_DROP_NO_ROUTE] += 1
                        continue
                if self.acl.denied(&dst):
                    self.st[C_DROP_DENIED] += 1
                    continue
                sq_add(&self.sb, &dst, dl, f.data, f.dlen)
            else:
                if not a.port_known:
                    self.st[C_DROP_NO_ROUTE] += 1
                    continue
                # the header goes into the slot's headroom, right before the payload
                h2 = frame_hdr_len(&self.rnames[j], False)
                write_udp_req_hdr(data - h2, &self.rnames[j])
                sq_add(&self.sb_down, &a.client, sa_len(&a.client), data - h2, h2 + ln)
                self.st[C_DOWN_DATAGRAMS] += 1
                self.st[C_DOWN_BYTES] += ln
        if self.sb.n:
            sq_flush(&self.sb, self.st, C_UP_DATAGRAMS, C_UP_BYTES)
        if self.sb_down.n:
            sq_flush(&self.sb_down, self.st, -1, -1)
        return 0

    cdef int dns_send(self, uint32_t owner, uint32_t gen, const dname_t *e, uint16_t port,
                      const uint8_t *data, size_t n) except -1:
        cdef assoc_t *a = &self.assocs[owner]
        if not a.used or a.gen != gen:           # the association ended meanwhile
            self.st[C_DROP_NO_ROUTE] += 1
            return 0
        return send_resolved(&self.sb, self.st, self.acl, a.fd, a.client.sa.sa_family, e, port,
                             data, n)
