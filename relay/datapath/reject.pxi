# Included by relay/datapath/engine.pyx: redir's fast reject (--reject PORTS). A datagram
# whose original destination port is in the set is not relayed and makes no association:
# the client gets an ICMP (type 3 code 3) or ICMPv6 (type 1 code 4) port unreachable whose
# source is that original destination (relay/packet/icmp.pxd), sent on the raw socket, so
# its socket fails at once (ECONNREFUSED: a QUIC client falls back to TCP). The errors are
# rate-limited like the kernel's own: a token bucket per engine, REJECT_RATE a second,
# REJECT_BURST at once; what it refuses is counted and sent nothing.

cdef enum:
    REJECT_MAP_BYTES = 8192          # one bit per port
    REJECT_RATE = 1000               # ICMP errors a second (the kernel's icmp_msgs_per_sec)
    REJECT_BURST = 50                # ... and at once (icmp_msgs_burst)


cdef inline bint _port_rejected(const uint8_t *bitmap, uint16_t port) noexcept nogil:
    """Is port (network order) in the set? bitmap: REJECT_MAP_BYTES bytes, or NULL."""
    cdef uint16_t p = ntohs(port)
    return bitmap != NULL and (bitmap[p >> 3] >> (p & 7)) & 1


cdef uint8_t *_reject_map(object ports) except NULL:
    """The bitmap of ports (ints 1-65535), allocated once (the caller frees it)."""
    cdef uint8_t *m
    cdef int p
    checked = []
    for port in ports:
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"reject: ports are 1-65535, not {port!r}")
        checked.append(port)
    m = <uint8_t *>calloc(REJECT_MAP_BYTES, 1)
    if m == NULL:
        raise MemoryError("reject port set")
    for p in checked:
        m[p >> 3] |= <uint8_t>(1 << (p & 7))
    return m


cdef void _reject(Engine self, int i, akey_t *client, akey_t *odst, int seg,
                  double now) noexcept nogil:
    """Datagram i of the receive ring (a GRO buffer: its seg-byte segments) went to a
    rejected port: count it and, if the bucket allows, answer it with a port unreachable
    quoting it (a GRO buffer: one error, for its first segment)."""
    cdef size_t plen = self.rx_msgs[i].msg_len
    cdef uint64_t n = 1
    cdef bint v6 = client.family == AF_INET6
    cdef int fd = self.raw6 if v6 else self.raw4
    cdef size_t size
    cdef sockaddr_any sa
    cdef socklen_t nl
    if seg > 0 and plen > <size_t>seg:
        n = (plen + seg - 1) // seg
        plen = <size_t>seg
    self.st[C_REJECTED] += n
    if fd < 0 or odst.family != client.family:
        self.st[C_DROP_NO_ROUTE] += 1
        return
    self.rj_tokens += (now - self.rj_last) * REJECT_RATE
    self.rj_last = now
    if self.rj_tokens > REJECT_BURST:
        self.rj_tokens = REJECT_BURST
    if self.rj_tokens < 1.0:
        self.st[C_REJECT_RATELIMITED] += 1
        return
    self.rj_tokens -= 1.0
    size = write_icmp_unreachable(self.rj_out, v6, client.addr, ntohs(client.port),
                                  odst.addr, ntohs(odst.port),
                                  <const uint8_t *>self.rx_iov[i].iov_base, plen, 64, 0)
    nl = akey_to_sockaddr(client, client.family, &sa)
    if v6:
        sa.v6.sin6_port = 0              # raw sockets: the headers carry the ports
    else:
        sa.v4.sin_port = 0
    if sendto(fd, self.rj_out, size, MSG_DONTWAIT, &sa.sa, nl) < 0:
        self._count_error(errno)
