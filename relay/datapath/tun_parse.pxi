# Included by relay/datapath/tun.pyx: what a packet read from the TUN is (the C twin of
# relay/datapath/pure/tun_stack.py classify and udp_check), and the addresses it names.

cdef enum:
    PK_BAD = -1
    PK_UDP = 0
    PK_FRAG = 1
    PK_OTHER = 2
    NH_UDP = 17
    NH_FRAG = 44


cdef inline bint _v6_skipped(uint8_t nh) noexcept nogil:
    return nh == 0 or nh == 43 or nh == 60      # hop-by-hop, routing, destination options


cdef inline void _ports(pkt_t *k) noexcept nogil:
    if k.l4_len >= 4:
        k.sport = get16(k.l4)
        k.dport = get16(k.l4 + 2)


cdef int classify(const uint8_t *p, size_t n, bint csum_valid, pkt_t *k) noexcept nogil:
    """PK_UDP (a whole datagram: k.l4), PK_FRAG (a fragment of a UDP datagram), PK_OTHER
    (not UDP) or PK_BAD (malformed), as tun_stack.classify decides."""
    cdef size_t ihl, total, pos, end, plen, hlen
    cdef uint16_t frag
    cdef uint8_t nh
    cdef bint is_frag = False
    if n < 1:
        return PK_BAD
    k.sport = k.dport = 0
    if p[0] >> 4 == 4:
        if n < 20:
            return PK_BAD
        ihl = (p[0] & 15) * 4
        if ihl < 20 or ihl > n:
            return PK_BAD
        total = get16(p + 2)
        if total < ihl or total > n:
            return PK_BAD
        if csum_fold(csum_partial(p, ihl, 0)) != 0xffff:
            return PK_BAD
        if p[9] != NH_UDP:
            return PK_OTHER
        k.v6 = False
        memset(k.src, 0, 16)
        memset(k.dst, 0, 16)
        memcpy(k.src, p + 12, 4)
        memcpy(k.dst, p + 16, 4)
        frag = get16(p + 6)
        k.l4 = p + ihl
        k.l4_len = total - ihl
        k.frag_off = (frag & 0x1fff) * 8
        k.more = (frag & 0x2000) != 0
        if k.frag_off or k.more:
            if k.more and k.l4_len % 8:
                return PK_BAD
            k.ident = get16(p + 4)
            return PK_FRAG
        _ports(k)
        return PK_UDP
    if p[0] >> 4 != 6 or n < 40:
        return PK_BAD
    plen = get16(p + 4)
    if plen == 0 or 40 + plen > n:
        return PK_BAD
    k.v6 = True
    memcpy(k.src, p + 8, 16)
    memcpy(k.dst, p + 24, 16)
    nh = p[6]
    pos = 40
    end = 40 + plen
    k.frag_off = 0
    k.more = False
    while nh != NH_UDP:
        if nh == NH_FRAG:
            if is_frag or end - pos < 8:
                return PK_BAD
            is_frag = True
            frag = get16(p + pos + 2)
            k.frag_off = (frag >> 3) * 8
            k.more = (frag & 1) != 0
            k.ident = ((<uint32_t>p[pos + 4] << 24) | (<uint32_t>p[pos + 5] << 16) |
                       (<uint32_t>p[pos + 6] << 8) | p[pos + 7])
            nh = p[pos]
            pos += 8
            if k.frag_off:
                break
            continue
        if not _v6_skipped(nh):
            return PK_OTHER
        if end - pos < 8:
            return PK_BAD
        hlen = (<size_t>p[pos + 1] + 1) * 8
        if hlen > end - pos:
            return PK_BAD
        nh = p[pos]
        pos += hlen
    k.l4 = p + pos
    k.l4_len = end - pos
    if not is_frag:
        _ports(k)
        return PK_UDP
    if nh != NH_UDP:
        return PK_OTHER
    if k.more and k.l4_len % 8:
        return PK_BAD
    return PK_FRAG


cdef int udp_check(pkt_t *k, bint csum_valid) noexcept nogil:
    """0 when k.l4 is a whole UDP datagram (lengths, checksum; tun_stack.udp_check), else -1.
    Sets the ports."""
    cdef uint16_t field
    if k.l4_len < UDP_HDR_LEN or get16(k.l4 + 4) != k.l4_len:
        return -1
    k.sport = get16(k.l4)
    k.dport = get16(k.l4 + 2)
    if csum_valid:
        return 0
    field = get16(k.l4 + 6)
    if field == 0:
        return -1 if k.v6 else 0
    if csum_fold(csum_partial(k.l4, k.l4_len,
                              udp_pseudo_sum(k.v6, k.src, k.dst, <uint32_t>k.l4_len))) != 0xffff:
        return -1
    return 0


cdef inline void key_of(bint v6, const uint8_t *ip, uint16_t port, akey_t *out) noexcept nogil:
    memset(out, 0, sizeof(akey_t))
    out.family = AF_INET6 if v6 else AF_INET
    out.port = htons(port)
    memcpy(out.addr, ip, 16 if v6 else 4)


cdef inline socklen_t sa_of(bint v6, const uint8_t *ip, uint16_t port, sockaddr_any *out,
                            int sock_family) noexcept nogil:
    """ip:port for a socket of sock_family (IPv4 as IPv4-mapped on AF_INET6); 0 when an
    IPv6 address cannot go on an AF_INET socket."""
    memset(out, 0, sizeof(sockaddr_any))
    if sock_family == AF_INET6:
        out.v6.sin6_family = AF_INET6
        out.v6.sin6_port = htons(port)
        if v6:
            memcpy(out.v6.sin6_addr.s6_addr, ip, 16)
        else:
            out.v6.sin6_addr.s6_addr[10] = 0xff
            out.v6.sin6_addr.s6_addr[11] = 0xff
            memcpy(&out.v6.sin6_addr.s6_addr[12], ip, 4)
        return sizeof(sockaddr_in6)
    if v6:
        return 0
    out.v4.sin_family = AF_INET
    out.v4.sin_port = htons(port)
    memcpy(&out.v4.sin_addr, ip, 4)
    return sizeof(sockaddr_in)


cdef inline int ip_of_sa(const sockaddr_any *sa, uint8_t *ip, uint16_t *port) noexcept nogil:
    """The address of sa (IPv4-mapped as IPv4): 4 (IPv4) or 6 (IPv6), 0 for anything else."""
    cdef int i
    if sa.sa.sa_family == AF_INET:
        memset(ip, 0, 16)
        memcpy(ip, &sa.v4.sin_addr, 4)
        port[0] = ntohs(sa.v4.sin_port)
        return 4
    if sa.sa.sa_family != AF_INET6:
        return 0
    port[0] = ntohs(sa.v6.sin6_port)
    for i in range(10):
        if sa.v6.sin6_addr.s6_addr[i]:
            memcpy(ip, sa.v6.sin6_addr.s6_addr, 16)
            return 6
    if sa.v6.sin6_addr.s6_addr[10] == 0xff and sa.v6.sin6_addr.s6_addr[11] == 0xff:
        memset(ip, 0, 16)
        memcpy(ip, &sa.v6.sin6_addr.s6_addr[12], 4)
        return 4
    memcpy(ip, sa.v6.sin6_addr.s6_addr, 16)
    return 6
