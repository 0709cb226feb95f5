# cython: language_level=3
# Outbound binding of the sockets the C data path opens per flow (the engine's direct
# upstream sockets, the tunnel server's flow sockets): one interface (SO_BINDTODEVICE)
# and one source address per family, bound before connect or the first send. The same
# rules as relay/net/sockopt.py bind_outbound, which the Python-made sockets use.
#
#     outbind_init(&ob, cfg_outbound)             # from relay.net.sockopt.Outbound (or None)
#     e = outbind_apply(fd, family, dest_v6, &ob) # 0, or -errno
#
# A socket that sends to both families (the tunnel server's dual-stack flow sockets, the
# SOCKS5 server's relay sockets) cannot be bound to two sources: it takes the device
# alone (outbind_device) and each datagram its source of the destination's family as an
# IP_PKTINFO / IPV6_PKTINFO control message (outbind_src on its send queue). A socket
# that talks to its client too (a SOCKS5 relay socket) cannot take the device either: its
# datagrams to remotes name the interface in that control message (outbind_src with
# via_dev), which routes them as SO_BINDTODEVICE would.
from libc.stdint cimport uint8_t
from libc.string cimport memcmp
from relay.includes.system cimport (
    sockaddr, sockaddr_in, sockaddr_in6, socklen_t, setsockopt, bind, errno, memset, memcpy,
    AF_INET, AF_INET6, SOL_SOCKET, SO_BINDTODEVICE, inet_pton,
)
from relay.datapath.addr cimport sockaddr_any
from relay.datapath.sendq cimport sendq_t, sq_set_src_dev

cdef enum:
    OUTBIND_IFNAMSIZ = 16


cdef struct outbind_t:
    char dev[OUTBIND_IFNAMSIZ]   # NUL-terminated; "" for none
    int devlen
    int ifindex                  # dev's interface index (0: none)
    bint has4
    bint has6
    sockaddr_in src4             # for AF_INET sockets
    sockaddr_in6 src4m           # the same as IPv4-mapped, for AF_INET6 sockets to IPv4
    sockaddr_in6 src6


cdef inline bint outbind_any(const outbind_t *ob) noexcept nogil:
    return ob.devlen > 0 or ob.has4 or ob.has6


cdef inline int outbind_init(outbind_t *ob, object out) except -1:
    """Fill ob from an Outbound (device, source4, source6); None or an empty one: nothing."""
    cdef bytes b
    memset(ob, 0, sizeof(outbind_t))
    if out is None:
        return 0
    if out.device:
        b = out.device.encode()
        if len(b) >= OUTBIND_IFNAMSIZ:
            raise ValueError(f"interface name too long: {out.device!r}")
        memcpy(ob.dev, <char *>b, len(b))
        ob.devlen = len(b)
        from socket import if_nametoindex
        ob.ifindex = if_nametoindex(out.device)
    if out.source4:
        b = out.source4.encode()
        if inet_pton(AF_INET, b, &ob.src4.sin_addr) != 1:
            raise ValueError(f"not an IPv4 address: {out.source4!r}")
        ob.src4.sin_family = AF_INET
        ob.src4m.sin6_family = AF_INET6
        ob.src4m.sin6_addr.s6_addr[10] = 0xff
        ob.src4m.sin6_addr.s6_addr[11] = 0xff
        memcpy(&ob.src4m.sin6_addr.s6_addr[12], &ob.src4.sin_addr, 4)
        ob.has4 = True
    if out.source6:
        b = out.source6.encode()
        if inet_pton(AF_INET6, b, &ob.src6.sin6_addr) != 1:
            raise ValueError(f"not an IPv6 address: {out.source6!r}")
        ob.src6.sin6_family = AF_INET6
        ob.has6 = True
    return 0


cdef inline int outbind_device(int fd, const outbind_t *ob) noexcept nogil:
    """SO_BINDTODEVICE ob's device on fd (nothing without one): 0, or -errno."""
    if ob.devlen and setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, ob.dev, ob.devlen) < 0:
        return -errno
    return 0


cdef inline int outbind_apply(int fd, int family, bint dest_v6, const outbind_t *ob) noexcept nogil:
    """Bind fd (a socket of family, not yet bound or connected) to ob's device and to its
    source of the destination's family (an AF_INET6 socket towards IPv4: the mapped one).
    0, or -errno."""
    if outbind_device(fd, ob) < 0:
        return -errno
    if dest_v6:
        if ob.has6 and bind(fd, <const sockaddr *>&ob.src6, sizeof(sockaddr_in6)) < 0:
            return -errno
    elif ob.has4:
        if family == AF_INET6:
            if bind(fd, <const sockaddr *>&ob.src4m, sizeof(sockaddr_in6)) < 0:
                return -errno
        elif bind(fd, <const sockaddr *>&ob.src4, sizeof(sockaddr_in)) < 0:
            return -errno
    return 0


cdef inline bint _unset(const uint8_t *a) noexcept nogil:
    """a (16 bytes) is not all zeros: the queue's source is not "the route's"."""
    cdef int i
    for i in range(16):
        if a[i]:
            return True
    return False


cdef inline void outbind_src(sendq_t *q, const sockaddr_any *dst, const outbind_t *ob,
                             bint via_dev) noexcept nogil:
    """The datagrams queued on q next (towards dst) leave from ob's source of dst's family
    (an IPv4-mapped dst counts as IPv4) and, with via_dev, through ob's device; nothing
    when ob has neither."""
    cdef int fam = 0, ifindex = ob.ifindex if via_dev else 0
    cdef const uint8_t *addr = NULL
    cdef const uint8_t *a6
    cdef bint changed
    if not (ob.has4 or ob.has6 or ifindex):
        return
    a6 = dst.v6.sin6_addr.s6_addr
    if dst.sa.sa_family == AF_INET6 and not (
            a6[10] == 0xff and a6[11] == 0xff and a6[0] == 0 and a6[1] == 0 and a6[2] == 0 and
            a6[3] == 0 and a6[4] == 0 and a6[5] == 0 and a6[6] == 0 and a6[7] == 0 and
            a6[8] == 0 and a6[9] == 0):
        fam = AF_INET6 if ob.has6 or ifindex else 0
        addr = ob.src6.sin6_addr.s6_addr if ob.has6 else NULL
    else:
        fam = AF_INET if ob.has4 or ifindex else 0
        addr = <const uint8_t *>&ob.src4.sin_addr if ob.has4 else NULL
    if q.src_family != fam or q.src_ifindex != ifindex:
        changed = True
    elif not fam:
        changed = False
    elif addr == NULL:
        changed = _unset(q.src)
    else:
        changed = memcmp(q.src, addr, 4 if fam == AF_INET else 16) != 0
    if changed:
        sq_set_src_dev(q, fam, addr, ifindex)
