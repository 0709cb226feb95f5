# Included by relay/datapath/tun.pyx: replies and ICMP errors written into the TUN (the C
# twin of relay/datapath/pure/tun.py's writing part). Each reply payload lies in a slot
# with HEADROOM in front, where its IP+UDP header is written; with the virtio-net header a
# run of equal replies goes as one write: one virtio-net header (GSO_UDP_L4, checksum left
# to the kernel), one IP+UDP header for the whole run, the payloads (writev).

cdef inline void put16le(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = <uint8_t>(v & 0xff)
    p[1] = <uint8_t>(v >> 8)


cdef inline bint same_bytes(const uint8_t *a, const uint8_t *b, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        if a[i] != b[i]:
            return False
    return True


cdef inline bint same_src(const sockaddr_any *a, const sockaddr_any *b) noexcept nogil:
    if a.sa.sa_family != b.sa.sa_family:
        return False
    if a.sa.sa_family == AF_INET:
        return a.v4.sin_port == b.v4.sin_port and same_bytes(
            <const uint8_t *>&a.v4.sin_addr, <const uint8_t *>&b.v4.sin_addr, 4)
    return a.v6.sin6_port == b.v6.sin6_port and same_bytes(
        a.v6.sin6_addr.s6_addr, b.v6.sin6_addr.s6_addr, 16)


cdef inline void to_mapped(uint8_t *ip) noexcept nogil:
    """ip's first 4 bytes (IPv4) as the IPv4-mapped IPv6 address, in place."""
    cdef uint8_t v4[4]
    memcpy(v4, ip, 4)
    memset(ip, 0, 16)
    ip[10] = 0xff
    ip[11] = 0xff
    memcpy(ip + 12, v4, 4)


cdef inline bint reply_src(bint client_v6, const sockaddr_any *sa, uint8_t *ip,
                           uint16_t *port) noexcept nogil:
    """The remote's address as the source of a reply to a client of that family: IPv4 for
    IPv4 clients (False when the remote is IPv6), IPv6 for IPv6 ones (an IPv4 remote as
    IPv4-mapped, as the pure twin does)."""
    cdef int fam = ip_of_sa(sa, ip, port)
    if not client_v6:
        return fam == 4
    if fam == 4:
        to_mapped(ip)
    return fam != 0


cdef int tun_write(TunRelay t, iovec *iov, int n) noexcept nogil:
    """One packet written; 0, or -1 with its error counted."""
    if writev(t.fd, iov, n) < 0:
        t.st[send_error_counter(errno)] += 1
        return -1
    return 0


cdef int write_one(TunRelay t, bint v6, const uint8_t *src, uint16_t sport,
                   const uint8_t *dst, uint16_t dport, uint8_t *payload,
                   size_t plen) noexcept nogil:
    """A reply (payload with HEADROOM writable bytes in front) as one packet, or as IP
    fragments above the MTU; 0, or -1 when it could not be written (counted)."""
    cdef size_t hl = IPV6_HDR_LEN + UDP_HDR_LEN if v6 else IPV4_HDR_LEN + UDP_HDR_LEN
    cdef iovec iov[3]
    cdef uint8_t zero[VNET_LEN]
    cdef int k = 0
    cdef size_t chunk, off, udp_len, doff, dlen, fh
    cdef uint8_t udp[UDP_HDR_LEN]
    cdef uint32_t ident
    if plen > (65527 if v6 else 65507):
        t.st[C_DROP_TOO_BIG] += 1
        return -1
    if t.vnet:
        memset(zero, 0, VNET_LEN)
        iov[0].iov_base = zero
        iov[0].iov_len = VNET_LEN
        k = 1
    t.ident = frag_next_ident(t.ident)
    ident = t.ident
    if hl + plen <= t.mtu:
        write_udp_headers(payload - hl, v6, src, sport, dst, dport, payload, plen, 64, 0,
                          <uint16_t>ident, False, 0)
        iov[k].iov_base = payload - hl
        iov[k].iov_len = hl + plen
        return tun_write(t, iov, k + 1)
    # fragments: the UDP header (checksum over the whole datagram), then piece by piece
    write_udp_headers(payload - hl, v6, src, sport, dst, dport, payload, plen, 64, 0, 0,
                      False, 0)
    memcpy(udp, payload - UDP_HDR_LEN, UDP_HDR_LEN)
    chunk = frag_chunk(v6, t.mtu)
    udp_len = UDP_HDR_LEN + plen
    off = 0
    while off < udp_len:
        fh = write_fragment(t.whdr, v6, src, dst, udp, udp_len, off, chunk, ident, 64, 0, 0,
                            &doff, &dlen)
        iov[k].iov_base = t.whdr
        iov[k].iov_len = fh
        iov[k + 1].iov_base = payload + doff
        iov[k + 1].iov_len = dlen
        if tun_write(t, iov, k + 2) < 0:
            return -1
        off += chunk
    t.st[C_REPLY_FRAGMENTED] += 1
    return 0


cdef int write_run(TunRelay t, bint v6, const uint8_t *src, uint16_t sport,
                   const uint8_t *dst, uint16_t dport, int first, int count, size_t seg,
                   size_t total) noexcept nogil:
    """Replies first..first+count-1 of the reply slots (equal size seg, the last may be
    shorter; total payload bytes) as one offload write."""
    cdef size_t iph = IPV6_HDR_LEN if v6 else IPV4_HDR_LEN
    cdef uint8_t *h = t.whdr
    cdef uint8_t *udp = h + VNET_LEN + iph
    cdef int j
    h[0] = VNET_F_NEEDS_CSUM
    h[1] = GSO_UDP_L4
    put16le(h + 2, <uint16_t>(iph + UDP_HDR_LEN))
    put16le(h + 4, <uint16_t>seg)
    put16le(h + 6, <uint16_t>iph)
    put16le(h + 8, 6)
    t.ident = frag_next_ident(t.ident)
    write_ip_header(h + VNET_LEN, v6, src, dst, UDP_HDR_LEN + total, 17, 64, 0,
                    <uint16_t>t.ident, 0, 0)
    put16(udp, sport)
    put16(udp + 2, dport)
    put16(udp + 4, <uint16_t>(UDP_HDR_LEN + total))
    put16(udp + 6, csum_fold(udp_pseudo_sum(v6, src, dst, <uint32_t>(UDP_HDR_LEN + total))))
    t.wiov[0].iov_base = h
    t.wiov[0].iov_len = VNET_LEN + iph + UDP_HDR_LEN
    for j in range(count):
        t.wiov[1 + j] = t.ry_iov[first + j]
    if tun_write(t, t.wiov, 1 + count) < 0:
        return -1
    t.st[C_TUN_RUNS_OUT] += 1
    return 0


cdef void write_replies(TunRelay t, const akey_t *client, int n) noexcept nogil:
    """The n replies in the reply slots, all for client: each from its remote; runs of
    equal replies of one remote as one write when the virtio-net header is on."""
    cdef bint v6 = client.family == AF_INET6
    cdef uint8_t src[16]
    cdef uint16_t sport, cport = ntohs(client.port)
    cdef size_t size, total, room = t.mtu - (IPV6_HDR_LEN if v6 else IPV4_HDR_LEN) - UDP_HDR_LEN
    cdef int i = 0, j, failed
    while i < n:
        size = t.ry_msgs[i].msg_len
        if not reply_src(v6, &t.ry_names[i], src, &sport):
            t.st[C_DROP_NO_ROUTE] += 1
            t.st[C_DOWN_DATAGRAMS] -= 1
            t.st[C_DOWN_BYTES] -= size
            i += 1
            continue
        j = i + 1
        total = size
        if t.vnet and 0 < size <= room:
            while (j < n and j - i < RUN_SEGMENTS and same_src(&t.ry_names[j], &t.ry_names[i])
                   and 0 < t.ry_msgs[j].msg_len <= size
                   and total + t.ry_msgs[j].msg_len <= RUN_BYTES):
                total += t.ry_msgs[j].msg_len
                j += 1
                if t.ry_msgs[j - 1].msg_len < size:
                    break
        if j - i > 1:
            for failed in range(i, j):
                t.ry_iov[failed].iov_len = t.ry_msgs[failed].msg_len
            if write_run(t, v6, src, sport, client.addr, cport, i, j - i, size, total) < 0:
                t.st[C_DOWN_DATAGRAMS] -= j - i
                t.st[C_DOWN_BYTES] -= total
        elif write_one(t, v6, src, sport, client.addr, cport,
                       <uint8_t *>t.ry_iov[i].iov_base, size) < 0:
            t.st[C_DOWN_DATAGRAMS] -= 1
            t.st[C_DOWN_BYTES] -= size
        i = j


cdef bint icmp_passed(bint v6, uint8_t itype, uint8_t code) noexcept nogil:
    """The ICMP errors passed on to the client (tun.py ICMP_PASSED)."""
    if v6:
        return (itype == 1 and code <= 6) or (itype == 3 and code <= 1)
    return (itype == 3 and code <= 15) or (itype == 11 and code <= 1)


cdef void write_icmp(TunRelay t, bint v6, const uint8_t *client, uint16_t cport,
                     const uint8_t *dst, uint16_t dport, const uint8_t *data, size_t n,
                     uint8_t itype, uint8_t code) noexcept nogil:
    """The ICMP/ICMPv6 error (itype, code) answering client -> dst (payload data) into the
    TUN: the port unreachable error of the packet core with its type and code replaced."""
    cdef uint8_t *out = t.ibuf + VNET_LEN
    cdef size_t at = IPV6_HDR_LEN if v6 else IPV4_HDR_LEN
    cdef size_t len_
    cdef uint16_t old, new
    cdef iovec iov[1]
    if n > (65527 if v6 else 65507):
        return
    len_ = write_icmp_unreachable(out, v6, client, cport, dst, dport, data, n, 64, 0)
    old = get16(out + at)
    new = <uint16_t>((itype << 8) | code)
    if old != new:
        put16(out + at + 2, csum_update16(get16(out + at + 2), old, new))
        out[at] = itype
        out[at + 1] = code
    memset(t.ibuf, 0, VNET_LEN)
    if t.vnet:
        iov[0].iov_base = <uint8_t *>t.ibuf
        iov[0].iov_len = len_ + VNET_LEN
    else:
        iov[0].iov_base = out
        iov[0].iov_len = len_
    if tun_write(t, iov, 1) == 0:
        t.st[C_TUN_ICMP_SENT] += 1


cdef void drain_errqueue(TunRelay t, int fd, const akey_t *client) noexcept nogil:
    """ICMP errors queued on an upstream socket (IP_RECVERR), each written into the TUN
    for the client, from the datagram's destination, when the family matches."""
    cdef msghdr m
    cdef iovec iov
    cdef sockaddr_any name
    cdef char ctrl[ERR_CTRL]
    cdef cmsghdr *cm
    cdef sock_extended_err *ee
    cdef ssize_t got
    cdef uint8_t dst[16]
    cdef uint16_t dport
    cdef bint v6 = client.family == AF_INET6
    cdef int r, fam
    for r in range(t.batch):
        memset(&m, 0, sizeof(m))
        iov.iov_base = t.ry + HEADROOM
        iov.iov_len = MAXDGRAM
        m.msg_iov = &iov
        m.msg_iovlen = 1
        m.msg_name = &name
        m.msg_namelen = sizeof(sockaddr_any)
        m.msg_control = ctrl
        m.msg_controllen = ERR_CTRL
        got = recvmsg(fd, &m, MSG_ERRQUEUE | MSG_DONTWAIT)
        if got < 0:
            return
        cm = CMSG_FIRSTHDR(&m)
        while cm != NULL:
            ee = <sock_extended_err *>CMSG_DATA(cm)
            if ee.ee_origin == SO_EE_ORIGIN_ICMP or ee.ee_origin == SO_EE_ORIGIN_ICMP6:
                t.st[C_ICMP_ERRORS] += 1
                fam = ip_of_sa(&name, dst, &dport)
                if (ee.ee_origin == SO_EE_ORIGIN_ICMP6) == v6 and fam == (6 if v6 else 4) \
                        and icmp_passed(v6, ee.ee_type, ee.ee_code):
                    write_icmp(t, v6, client.addr, ntohs(client.port), dst, dport,
                               t.ry + HEADROOM, <size_t>got, ee.ee_type, ee.ee_code)
            cm = CMSG_NXTHDR(&m, cm)
