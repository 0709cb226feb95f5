# cython: language_level=3
# A preallocated ring of datagram slots for recvmmsg/sendmmsg.
#
# Each slot has a data buffer (slot_size bytes, none when slot_size is 0), an iovec, a
# socket address and a control buffer for ancillary data; after ring_recv() it also
# holds the result of the receive: length, flags, original destination (TPROXY) and the
# UDP_GRO segment size. Everything is allocated once by ring_alloc(); the other
# functions neither allocate nor touch Python objects and run without the GIL.
#
# Receive:
#     n = ring_recv(&r, fd, r.n, 0)          # > 0 count, 0 nothing queued, < 0 -errno
#     for i in range(n): ring_data(&r, i), r.slots[i].len, r.names[i], r.slots[i].origdst
# Send (buffers owned by the caller, or a receive ring's slots):
#     ring_set_send(&t, i, buf, len, &dst, dstlen)   # dst NULL: connected socket
#     ring_set_gso(&t, i, segment_size)              # optional UDP_SEGMENT
#     rc = ring_send(&t, fd, count, &sent)           # 0, or -errno of message `sent`
# Any message: msg_put_src(m, ctrl, family, addr) makes it leave from a local address
# (a socket on a wildcard address answering from the address its client sent to, which
# cmsg_local() reads on receive); msg_put_gso(m, ctrl, size) appends a UDP_SEGMENT.
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.stdlib cimport calloc, free
from relay.includes.system cimport (
    errno, EAGAIN, EINTR,
    memcpy, memset,
    iovec, msghdr, mmsghdr, cmsghdr, socklen_t, sockaddr_in, sockaddr_in6,
    CMSG_FIRSTHDR, CMSG_NXTHDR, CMSG_DATA, CMSG_SPACE, CMSG_LEN,
    recvmmsg, sendmmsg, MSG_DONTWAIT, MSG_TRUNC, AF_UNSPEC,
    IPPROTO_IP, IPPROTO_IPV6, IP_ORIGDSTADDR, IPV6_ORIGDSTADDR, SOL_UDP, UDP_GRO, UDP_SEGMENT,
    AF_INET, AF_INET6, IP_PKTINFO, IPV6_PKTINFO, in_pktinfo, in6_pktinfo,
)
from relay.datapath.addr cimport sockaddr_any


cdef enum:
    # Ancillary bytes per slot. Needed: IPV6_ORIGDSTADDR (CMSG_SPACE(28) = 48) + UDP_GRO
    # (CMSG_SPACE(4) = 24) on receive, UDP_SEGMENT (CMSG_SPACE(2) = 24) on send; the rest
    # leaves room for options the caller may enable (packet info, TTL...). A multiple of
    # 8 so every slot's control buffer stays aligned for cmsghdr.
    RING_CTRL_SIZE = 128
    # Control bytes for a source address (msg_put_src): CMSG_SPACE(sizeof(in6_pktinfo)).
    SRC_CTRL = 40


cdef struct ring_slot_t:
    uint32_t len             # bytes in the slot buffer (cut to slot_size when truncated)
    int flags                # msg_flags of the receive: MSG_TRUNC, MSG_CTRUNC
    int gro_size             # UDP_GRO segment size; 0 when the datagram is not coalesced
    int has_origdst          # 1 when origdst holds IP(V6)_ORIGDSTADDR
    sockaddr_any origdst


cdef struct ring_t:
    unsigned n               # slots
    size_t slot_size         # bytes of each slot's data buffer (0: no data buffers)
    unsigned count           # datagrams held since the last ring_recv()
    unsigned char *data      # n * slot_size
    mmsghdr *msgs            # n
    iovec *iov               # n
    sockaddr_any *names      # n: source after a receive, destination for a send
    unsigned char *ctrl      # n * RING_CTRL_SIZE
    ring_slot_t *slots       # n: results of the last receive


cdef inline int ring_alloc(ring_t *r, unsigned n, size_t slot_size) except -1:
    """Allocate n slots of slot_size bytes (slot_size may be 0 for a send-only ring whose
    iovecs point at the caller's buffers). ValueError for n == 0 or a size that overflows,
    MemoryError when allocation fails; r is left empty (ring_free-safe) on error."""
    cdef unsigned i
    memset(r, 0, sizeof(ring_t))
    if n == 0:
        raise ValueError("a ring needs at least one slot")
    if slot_size and n > (<size_t>-1) / slot_size:
        raise ValueError(f"ring of {n} slots x {slot_size} bytes is too large")
    r.msgs = <mmsghdr *>calloc(n, sizeof(mmsghdr))
    r.iov = <iovec *>calloc(n, sizeof(iovec))
    r.names = <sockaddr_any *>calloc(n, sizeof(sockaddr_any))
    r.ctrl = <unsigned char *>calloc(n, RING_CTRL_SIZE)
    r.slots = <ring_slot_t *>calloc(n, sizeof(ring_slot_t))
    if slot_size:
        r.data = <unsigned char *>calloc(n, slot_size)
    if (r.msgs == NULL or r.iov == NULL or r.names == NULL or r.ctrl == NULL
            or r.slots == NULL or (slot_size and r.data == NULL)):
        ring_free(r)
        raise MemoryError(f"cannot allocate a ring of {n} slots x {slot_size} bytes")
    r.n = n
    r.slot_size = slot_size
    for i in range(n):
        r.iov[i].iov_base = r.data + <size_t>i * slot_size if slot_size else NULL
        r.iov[i].iov_len = slot_size
        r.msgs[i].msg_hdr.msg_iov = &r.iov[i]
        r.msgs[i].msg_hdr.msg_iovlen = 1
    return 0


cdef inline void ring_free(ring_t *r) noexcept nogil:
    """Release the ring's memory; safe on a zeroed or already freed ring."""
    free(r.data)
    free(r.msgs)
    free(r.iov)
    free(r.names)
    free(r.ctrl)
    free(r.slots)
    memset(r, 0, sizeof(ring_t))


cdef inline unsigned char *ring_data(ring_t *r, unsigned i) noexcept nogil:
    """Start of slot i's data buffer."""
    return r.data + <size_t>i * r.slot_size


cdef inline void _ring_parse_cmsgs(msghdr *m, ring_slot_t *s) noexcept nogil:
    cdef cmsghdr *c
    cdef int gso
    s.gro_size = 0
    s.has_origdst = 0
    if m.msg_controllen == 0:
        return
    c = CMSG_FIRSTHDR(m)
    while c != NULL:
        if (c.cmsg_level == IPPROTO_IP and c.cmsg_type == IP_ORIGDSTADDR
                and c.cmsg_len >= CMSG_LEN(sizeof(sockaddr_in))):
            memset(&s.origdst, 0, sizeof(sockaddr_any))
            memcpy(&s.origdst, CMSG_DATA(c), sizeof(sockaddr_in))
            s.has_origdst = 1
        elif (c.cmsg_level == IPPROTO_IPV6 and c.cmsg_type == IPV6_ORIGDSTADDR
                and c.cmsg_len >= CMSG_LEN(sizeof(sockaddr_in6))):
            memset(&s.origdst, 0, sizeof(sockaddr_any))
            memcpy(&s.origdst, CMSG_DATA(c), sizeof(sockaddr_in6))
            s.has_origdst = 1
        elif (c.cmsg_level == SOL_UDP and c.cmsg_type == UDP_GRO
                and c.cmsg_len >= CMSG_LEN(sizeof(int))):
            memcpy(&gso, CMSG_DATA(c), sizeof(int))
            s.gro_size = gso
        c = CMSG_NXTHDR(m, c)


cdef inline bint cmsg_local(cmsghdr *c, uint16_t *family, uint8_t *addr) noexcept nogil:
    """If c is a packet-info cmsg, note the local address it reports in *family and addr
    (4 bytes for AF_INET, 16 for AF_INET6; both start zeroed) and return True.

    IP_PKTINFO gives ipi_spec_dst, the address to answer from (a local unicast address
    even for a broadcast), and always wins; IPV6_PKTINFO gives the destination, used
    when nothing is noted yet: IPv4-mapped as AF_INET (an IPv4 datagram on a dual-stack
    socket), multicast never (a reply cannot leave from it; the kernel chooses)."""
    cdef uint8_t *a
    if (c.cmsg_level == IPPROTO_IP and c.cmsg_type == IP_PKTINFO
            and c.cmsg_len >= CMSG_LEN(sizeof(in_pktinfo))):
        family[0] = AF_INET
        memcpy(addr, &(<in_pktinfo *>CMSG_DATA(c)).ipi_spec_dst, 4)
        return True
    if (c.cmsg_level == IPPROTO_IPV6 and c.cmsg_type == IPV6_PKTINFO
            and c.cmsg_len >= CMSG_LEN(sizeof(in6_pktinfo))):
        a = (<in6_pktinfo *>CMSG_DATA(c)).ipi6_addr.s6_addr
        if family[0] == 0 and a[0] != 0xff:
            if (a[0] | a[1] | a[2] | a[3] | a[4] | a[5] | a[6] | a[7] | a[8] | a[9]) == 0 \
                    and a[10] == 0xff and a[11] == 0xff:
                family[0] = AF_INET
                memcpy(addr, a + 12, 4)
            else:
                family[0] = AF_INET6
                memcpy(addr, a, 16)
        return True
    return False


cdef inline int ring_recv(ring_t *r, int fd, unsigned max, int flags) noexcept nogil:
    """Receive up to max datagrams (max 0 or above r.n means r.n) without blocking.

    Resets every slot's iovec, name and control buffer, calls recvmmsg(MSG_DONTWAIT |
    flags), then fills r.slots[i] (len, flags, origdst, gro_size) and sets r.count.
    Returns the count, 0 when nothing is queued (EAGAIN), or -errno; EINTR is retried.
    A datagram longer than slot_size is cut and flagged MSG_TRUNC in slots[i].flags."""
    cdef unsigned i
    cdef int got
    cdef size_t length
    cdef msghdr *m
    cdef ring_slot_t *s
    if r.slot_size == 0:
        return 0
    if max == 0 or max > r.n:
        max = r.n
    for i in range(max):
        m = &r.msgs[i].msg_hdr
        r.iov[i].iov_base = r.data + <size_t>i * r.slot_size
        r.iov[i].iov_len = r.slot_size
        m.msg_iov = &r.iov[i]
        m.msg_iovlen = 1
        m.msg_name = &r.names[i]
        m.msg_namelen = sizeof(sockaddr_any)
        m.msg_control = r.ctrl + <size_t>i * RING_CTRL_SIZE
        m.msg_controllen = RING_CTRL_SIZE
        m.msg_flags = 0
    while True:
        got = recvmmsg(fd, r.msgs, max, flags | MSG_DONTWAIT, NULL)
        if got >= 0:
            break
        if errno == EINTR:
            continue
        r.count = 0
        if errno == EAGAIN:            # == EWOULDBLOCK on Linux
            return 0
        return -errno
    for i in range(<unsigned>got):
        m = &r.msgs[i].msg_hdr
        s = &r.slots[i]
        length = r.msgs[i].msg_len
        if length > r.slot_size:         # recvmmsg with MSG_TRUNC reports the full length
            length = r.slot_size
        s.len = <uint32_t>length
        s.flags = m.msg_flags
        if m.msg_namelen == 0:
            r.names[i].sa.sa_family = AF_UNSPEC
        _ring_parse_cmsgs(m, s)
    r.count = <unsigned>got
    return got


cdef inline int send_all_flags(int fd, mmsghdr *msgs, unsigned n, int flags,
                               unsigned *sent) noexcept nogil:
    """sendmmsg msgs[0:n] with flags until all went or one fails.

    Returns 0 when all n went out, else -errno of msgs[*sent], the first message that
    failed; *sent is how many went out before it, so the caller can retry or skip exactly
    from there. EINTR and short counts are retried (a short count hides the error of the
    next message, which the retry reports or sends)."""
    cdef int rc
    cdef unsigned done = 0
    while done < n:
        rc = sendmmsg(fd, msgs + done, n - done, flags)
        if rc > 0:
            done += <unsigned>rc
            continue
        if rc < 0 and errno == EINTR:
            continue
        sent[0] = done
        return -errno if rc < 0 else -EAGAIN
    sent[0] = done
    return 0


cdef inline int send_all(int fd, mmsghdr *msgs, unsigned n, unsigned *sent) noexcept nogil:
    """send_all_flags() with MSG_DONTWAIT: never blocks, EAGAIN comes back as -EAGAIN."""
    return send_all_flags(fd, msgs, n, MSG_DONTWAIT, sent)


cdef inline void ring_set_send(ring_t *r, unsigned i, const void *buf, size_t length,
                               const sockaddr_any *dst, socklen_t dstlen) noexcept nogil:
    """Make slot i send length bytes at buf to dst (copied into the slot), or on a
    connected socket when dst is NULL or dstlen 0. Clears any control data of the slot."""
    cdef msghdr *m = &r.msgs[i].msg_hdr
    r.iov[i].iov_base = <void *>buf
    r.iov[i].iov_len = length
    m.msg_iov = &r.iov[i]
    m.msg_iovlen = 1
    if dst != NULL and dstlen != 0:
        if dst != &r.names[i]:
            memcpy(&r.names[i], dst, dstlen)
        m.msg_name = &r.names[i]
        m.msg_namelen = dstlen
    else:
        m.msg_name = NULL
        m.msg_namelen = 0
    m.msg_control = NULL
    m.msg_controllen = 0
    m.msg_flags = 0


cdef inline void msg_put_gso(msghdr *m, unsigned char *ctrl, uint16_t segment_size) noexcept nogil:
    """Attach a UDP_SEGMENT cmsg to m, written into ctrl (aligned for cmsghdr): the kernel
    splits m's payload into datagrams of segment_size bytes. When m's control data already
    is in ctrl (a source address, msg_put_src) the cmsg goes after it, so it is always the
    last one; ctrl needs CMSG_SPACE(2) = 24 bytes more than what is there."""
    cdef size_t off = m.msg_controllen if m.msg_control == <void *>ctrl else 0
    cdef cmsghdr *c = <cmsghdr *>(ctrl + off)
    memset(c, 0, CMSG_SPACE(sizeof(uint16_t)))
    c.cmsg_level = SOL_UDP
    c.cmsg_type = UDP_SEGMENT
    c.cmsg_len = CMSG_LEN(sizeof(uint16_t))
    memcpy(CMSG_DATA(c), &segment_size, sizeof(uint16_t))
    m.msg_control = ctrl
    m.msg_controllen = off + CMSG_SPACE(sizeof(uint16_t))


cdef inline void msg_put_src(msghdr *m, unsigned char *ctrl, int family,
                             const uint8_t *addr) noexcept nogil:
    """Make m leave from the local address addr (4 bytes for AF_INET, 16 for AF_INET6): an
    IP_PKTINFO (ipi_spec_dst) or IPV6_PKTINFO (ipi6_addr) cmsg at the start of ctrl, which
    replaces m's control data (call it first; msg_put_gso appends). Interface index 0:
    routing picks the interface. IP_PKTINFO works on AF_INET6 sockets too, for IPv4-mapped
    destinations. ctrl needs SRC_CTRL bytes, SRC_CTRL + 24 with a UDP_SEGMENT after it."""
    msg_put_src_dev(m, ctrl, family, addr, 0)


cdef inline void msg_put_src_dev(msghdr *m, unsigned char *ctrl, int family,
                                 const uint8_t *addr, int ifindex) noexcept nogil:
    """msg_put_src leaving through interface ifindex (nonzero: the route lookup only takes
    routes through it, as SO_BINDTODEVICE would; addr may be all zeros then: the source
    that interface's route picks)."""
    cdef cmsghdr *c = <cmsghdr *>ctrl
    cdef size_t n
    memset(ctrl, 0, SRC_CTRL)
    if family == AF_INET:
        c.cmsg_level = IPPROTO_IP
        c.cmsg_type = IP_PKTINFO
        n = sizeof(in_pktinfo)
        memcpy(&(<in_pktinfo *>CMSG_DATA(c)).ipi_spec_dst, addr, 4)
        (<in_pktinfo *>CMSG_DATA(c)).ipi_ifindex = ifindex
    else:
        c.cmsg_level = IPPROTO_IPV6
        c.cmsg_type = IPV6_PKTINFO
        n = sizeof(in6_pktinfo)
        memcpy(&(<in6_pktinfo *>CMSG_DATA(c)).ipi6_addr, addr, 16)
        (<in6_pktinfo *>CMSG_DATA(c)).ipi6_ifindex = <unsigned int>ifindex
    c.cmsg_len = CMSG_LEN(n)
    m.msg_control = ctrl
    m.msg_controllen = CMSG_SPACE(n)


cdef inline uint16_t msg_gso_size(msghdr *m) noexcept nogil:
    """The UDP_SEGMENT size m carries, 0 when it has none."""
    cdef cmsghdr *c
    cdef uint16_t seg
    if m.msg_controllen == 0:
        return 0
    c = CMSG_FIRSTHDR(m)
    while c != NULL:
        if c.cmsg_level == SOL_UDP and c.cmsg_type == UDP_SEGMENT:
            memcpy(&seg, CMSG_DATA(c), sizeof(uint16_t))
            return seg
        c = CMSG_NXTHDR(m, c)
    return 0


cdef inline void msg_one_of(msghdr *g, msghdr *one) noexcept nogil:
    """Make one a message for one datagram of g at a time (the caller sets its msg_iov):
    g's destination and control data without the UDP_SEGMENT cmsg (msg_put_gso puts it
    last), so a source address stays."""
    one.msg_name = g.msg_name
    one.msg_namelen = g.msg_namelen
    one.msg_iovlen = 1
    one.msg_flags = 0
    one.msg_control = g.msg_control
    one.msg_controllen = g.msg_controllen
    if msg_gso_size(g):
        one.msg_controllen -= CMSG_SPACE(sizeof(uint16_t))
    if one.msg_controllen == 0:
        one.msg_control = NULL


cdef inline void ring_set_gso(ring_t *r, unsigned i, uint16_t segment_size) noexcept nogil:
    """Attach a UDP_SEGMENT cmsg to slot i (after ring_set_send); 0 removes it."""
    cdef msghdr *m = &r.msgs[i].msg_hdr
    m.msg_control = NULL
    m.msg_controllen = 0
    if segment_size == 0:
        return
    msg_put_gso(m, r.ctrl + <size_t>i * RING_CTRL_SIZE, segment_size)


cdef inline int ring_send(ring_t *r, int fd, unsigned n, unsigned *sent) noexcept nogil:
    """send_all() of the ring's first n slots (n is clipped to r.n)."""
    if n > r.n:
        n = r.n
    return send_all(fd, r.msgs, n, sent)
