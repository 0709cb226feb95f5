# Included by relay/datapath/engine.pyx: redir's spoofed replies. Headers written in front of
# each payload in the reply ring (relay/packet/headers.pxd), replies larger than the MTU to
# their client as IP fragments, all sent with sendmmsg on a raw socket: the source is the
# remote, no descriptor per remote (full cone).

cdef inline socklen_t _raw_msg(Engine self, int k, iovec *iov, size_t niov, int slot,
                               uint8_t kind, int family) noexcept nogil:
    """Message k of a raw send: iovecs iov, to the client of reply slot (port 0: raw
    sockets want it so, for IPv6 the port is the protocol; the headers carry it)."""
    cdef mmsghdr *m = &self.out_msgs[k]
    cdef socklen_t nl = akey_to_sockaddr(&self.ry_client[slot], family, &self.out_names[k])
    if family == AF_INET6:
        self.out_names[k].v6.sin6_port = 0
    else:
        self.out_names[k].v4.sin_port = 0
    m.msg_hdr.msg_iov = iov
    m.msg_hdr.msg_iovlen = niov
    m.msg_hdr.msg_name = &self.out_names[k]
    m.msg_hdr.msg_namelen = nl
    m.msg_hdr.msg_control = NULL
    m.msg_hdr.msg_controllen = 0
    m.msg_hdr.msg_flags = 0
    self.out_slot[k] = slot
    self.out_kind[k] = kind
    return nl

cdef void _replies_raw(Engine self, int n, int family, double now) noexcept nogil:
    """Build headers in front of each reply of this family and send them raw, spoofed as
    the remote, with one sendmmsg. A reply larger than the MTU towards its client goes
    as IP fragments in the same batch; one the kernel refuses as too big (an MTU not
    known yet) goes again, fragmented, once the kernel has said the MTU."""
    cdef int i, j, k = 0
    cdef int fd = self.raw4 if family == AF_INET else self.raw6
    cdef akey_t remote
    self.nfr = 0
    self.nretry = 0
    self.fr_abort = -1
    for i in range(n):
        akey_from_sockaddr(&self.ry_names[i], &remote)
        if remote.family != family:
            continue
        if remote.family != self.ry_client[i].family:
            self.st[C_DROP_NO_ROUTE] += 1
            continue
        if fd < 0:
            _replies_transparent(self, i, i + 1, now)
            continue
        k = _raw_queue(self, fd, i, &remote, k, now)
    _raw_send(self, fd, k, now)
    if self.nretry:
        self.retrying = True
        self.fr_abort = -1
        k = 0
        for j in range(self.nretry):
            i = self.retry[j]
            akey_from_sockaddr(&self.ry_names[i], &remote)
            k = _raw_queue(self, fd, i, &remote, k, now)
        _raw_send(self, fd, k, now)
        self.retrying = False

cdef int _raw_queue(Engine self, int fd, int i, akey_t *remote, int k, double now) noexcept nogil:
    """Queue reply slot i as message k (whole), or as its fragments when it is larger than
    the MTU towards its client; returns the next free message. A reply larger than its
    family's largest UDP payload (from an upstream core: a tunnel frame carries up to
    65,527 bytes from an IPv4 source) is dropped and counted: its 16-bit length fields
    would wrap."""
    cdef uint8_t *payload = <uint8_t *>self.ry_iov[i].iov_base
    cdef size_t plen = self.ry_iov[i].iov_len
    cdef bint v6 = remote.family == AF_INET6
    cdef size_t hl = IPV6_UDP_HDR_LEN if v6 else IPV4_UDP_HDR_LEN
    cdef uint32_t mtu
    if plen > <size_t>(MAX_IPV6_UDP_PAYLOAD if v6 else MAX_IPV4_UDP_PAYLOAD):
        self.st[C_DROP_TOO_BIG] += 1
        return k
    if plen + hl > self.frag_over[v6]:
        mtu = _client_mtu(self, &self.ry_client[i], 0, False, now)
        if mtu and plen + hl > mtu:
            if mtu < <uint32_t>(IPV6_MIN_MTU if v6 else IPV4_MIN_MTU):
                _fallback_one(self, i, now)      # no fragment fits such a route
                return k
            return _raw_fragments(self, fd, i, remote, mtu, k, now)
    write_udp_headers(payload - hl, v6, remote.addr, ntohs(remote.port),
                      self.ry_client[i].addr, ntohs(self.ry_client[i].port), payload,
                      plen, 64, 0, 0, False, 0)
    self.out_iov[k].iov_base = payload - hl
    self.out_iov[k].iov_len = plen + hl
    _raw_msg(self, k, &self.out_iov[k], 1, i, K_WHOLE, remote.family)
    return k + 1

cdef int _raw_fragments(Engine self, int fd, int i, akey_t *remote, uint32_t mtu, int k,
                        double now) noexcept nogil:
    """Queue reply slot i as IP fragments of at most mtu bytes from message k on (the
    payload stays where it is: each fragment is its header + an iovec into it); when
    the fragment headers run out, what is queued goes first. Returns the next message."""
    cdef const uint8_t *payload = <const uint8_t *>self.ry_iov[i].iov_base
    cdef size_t plen = self.ry_iov[i].iov_len
    cdef akey_t *client = &self.ry_client[i]
    cdef bint v6 = remote.family == AF_INET6
    cdef size_t chunk = frag_chunk(v6, mtu), udp_len = UDP_HDR_LEN + plen, off = 0
    cdef size_t doff = 0, dlen = 0
    cdef uint8_t udp[UDP_HDR_LEN]
    cdef uint8_t *hdr
    cdef iovec *iov
    write_udp_header(udp, v6, remote.addr, ntohs(remote.port), client.addr,
                     ntohs(client.port), payload, plen)
    self.frag_ident = frag_next_ident(self.frag_ident)
    while off < udp_len:
        if self.nfr == FRAG_CAP:
            k = _raw_send(self, fd, k, now)
            if self.fr_abort == i:          # a fragment of this reply was refused
                return k
        hdr = self.fr_hdr + <size_t>self.nfr * FRAG_HDR_MAX
        iov = &self.fr_iov[2 * self.nfr]
        iov[0].iov_base = hdr
        iov[0].iov_len = write_fragment(hdr, v6, remote.addr, client.addr, udp, udp_len,
                                        off, chunk, self.frag_ident, 64, 0, 0,
                                        &doff, &dlen)
        iov[1].iov_base = <void *>(payload + doff)
        iov[1].iov_len = dlen
        _raw_msg(self, k, iov, 2, i, K_FRAG, remote.family)
        self.nfr += 1
        k += 1
        off += chunk
    self.out_kind[k - 1] = K_LAST
    return k

cdef uint32_t _client_mtu(Engine self, akey_t *client, uint32_t told, bint refresh,
                          double now) noexcept nogil:
    """The MTU of the route to client's host: remembered (for MTU_TTL seconds, unless
    refresh), told by the kernel (told > 0, after it refused a packet), or asked of it
    (route_mtu: a socket connected there, then closed). 0 when there is no route."""
    cdef akey_t host = client[0]
    cdef int32_t idx
    cdef sockaddr_any sa
    cdef socklen_t nl
    cdef uint32_t mtu = told
    cdef bint v6 = client.family == AF_INET6
    host.port = 0
    idx = table_find(&self.mtus, &host)
    if idx >= 0 and told == 0 and not refresh and self.mtus.e[idx].last + MTU_TTL > now:
        return self.mtus.e[idx].mtu
    if mtu == 0:
        nl = akey_to_sockaddr(&host, host.family, &sa)
        mtu = route_mtu(&sa, nl, self.mark) if nl else 0
        if mtu == 0:
            return 0
    if mtu > 0xffff:
        mtu = 0xffff                    # loopback says 65536; no packet is larger anyway
    if idx < 0:
        if self.mtus.count >= self.mtus.cap:
            table_remove(&self.mtus, self.mtus.tail)
        idx = table_insert(&self.mtus, &host, now)
        if idx < 0:
            return mtu
    else:
        table_touch(&self.mtus, idx, now)
    self.mtus.e[idx].mtu = <uint16_t>mtu
    if not self.mtu_known[v6] or mtu < self.frag_over[v6]:
        self.frag_over[v6] = mtu
        self.mtu_known[v6] = True
    return mtu

cdef int _raw_send(Engine self, int fd, int k, double now) noexcept nogil:
    """Send raw messages 0..k-1 and count them; returns 0 (the next free message). A
    reply the kernel refuses loses its remaining fragments; refused as too big, it
    goes again after this batch (see _replies_raw), or the transparent way."""
    cdef int done = 0, r, e, slot
    self.nfr = 0
    while done < k:
        r = self._send_some(fd, self.out_msgs + done, k - done, &e)
        _count_raw(self, done, r)
        done += r
        if done >= k:
            break
        if e == EAGAIN or e == ENOBUFS:
            self.st[C_DROP_BUFFER_FULL] += _raw_datagrams(self, done, k)
            if self.out_kind[k - 1] == K_FRAG:
                self.fr_abort = self.out_slot[k - 1]
            return 0
        slot = self.out_slot[done]
        if e == EMSGSIZE:
            # the kernel says the MTU (IP_RECVERR); send again fragmented to fit it
            if (_client_mtu(self, &self.ry_client[slot], errqueue_mtu(fd), True, now) == 0
                    or self.retrying or self.nretry == self.batch):
                _fallback_one(self, slot, now)
            else:
                self.retry[self.nretry] = slot
                self.nretry += 1
        else:
            self._count_error(e)
        done += 1
        while done < k and self.out_slot[done] == slot:
            done += 1
        if self.out_kind[done - 1] == K_FRAG:   # its last fragments were still to come
            self.fr_abort = slot
    return 0

cdef inline uint64_t _raw_datagrams(Engine self, int start, int stop) noexcept nogil:
    """Replies among raw messages start..stop-1 (a reply cut at stop counts)."""
    cdef uint64_t n = 0
    cdef int i
    for i in range(start, stop):
        if self.out_kind[i] != K_FRAG or i == stop - 1:
            n += 1
    return n

cdef void _count_raw(Engine self, int start, int n) noexcept nogil:
    """Count the replies raw messages start..start+n-1 completed (whole, or last fragment)."""
    cdef int i
    cdef uint64_t nbytes = 0, ndgrams = 0
    for i in range(start, start + n):
        if self.out_kind[i] != K_FRAG:
            ndgrams += 1
            nbytes += self.ry_msgs[self.out_slot[i]].msg_len
            if self.out_kind[i] == K_LAST:
                self.st[C_REPLY_FRAGMENTED] += 1
    self._count_down(ndgrams, nbytes)

cdef void _fallback_one(Engine self, int slot, double now) noexcept nogil:
    self.st[C_REPLY_FALLBACK] += 1
    _replies_transparent(self, slot, slot + 1, now)
