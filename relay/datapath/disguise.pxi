# The UDP disguise of a forward listener (included by engine.pyx): --header-out KIND adds a
# header (relay/datapath/disguise.pxd, layouts in relay/proto/disguise.py) to every
# datagram sent upstream and strips it from replies; --header-in KIND strips it from what
# clients send and adds it to the replies. A datagram without a valid header is dropped and
# counted (drop_bad_header); one too big once its header is added, drop_too_big.
#
# Nothing is copied: a header that is added goes into the headroom in front of the payload
# (HDR_ROOM in each client slot, HEADROOM in each reply slot), one that is stripped is
# skipped. A GRO buffer (many datagrams in one receive) becomes a message of one iovec per
# segment (stripped: past its header) or two (added: the header, written in `scratch`, and
# the payload), with the segment size changed by the header: still one GSO send, each
# datagram with its own header. Each association keeps a state per direction (sequence
# numbers, ids), started at random as v2ray starts its headers.


def _hdr_setup(Engine self, header_out, header_in, int cap, int tx_iovs, int out_iovs):
    """Called by Engine.__init__ once the buffers are there; ValueError for what cannot be."""
    from relay.proto.disguise import KIND_IDS, SIZES
    cdef hdr_t *h = &self.hdr
    cdef size_t n
    if header_out is None and header_in is None:
        return
    for name, kind in (("header_out", header_out), ("header_in", header_in)):
        if kind is not None and kind not in KIND_IDS:
            raise ValueError(f"{name}: unknown header kind {kind!r} "
                             f"(known: {', '.join(KIND_IDS)})")
    if self.mode != MODE_FORWARD:
        raise ValueError("header_out and header_in apply to forward only")
    if self.core is not None:
        raise ValueError("header_out and header_in need a direct upstream (through a "
                         "tunnel or SOCKS5 upstream datagrams travel inside frames)")
    if header_out is not None:
        h.out.kind = KIND_IDS[header_out]
        h.out.size = SIZES[header_out]
    if header_in is not None:
        h.inn.kind = KIND_IDS[header_in]
        h.inn.size = SIZES[header_in]
    h.up = h.down = h.out.size > 0 or h.inn.size > 0
    if not h.up:                        # noop both ways: nothing to do per datagram
        return
    h.rng = int.from_bytes(os.urandom(8), "little") | 1
    h.max_up = ((MAX_IPV4_UDP_PAYLOAD if self.up_family == AF_INET else MAX_IPV6_UDP_PAYLOAD)
                - h.out.size)
    h.max_down[0] = MAX_IPV4_UDP_PAYLOAD - h.inn.size
    h.max_down[1] = MAX_IPV6_UDP_PAYLOAD - h.inn.size
    n = <size_t>cap + 1
    if h.out.size:
        h.out.st = <hdr_st_t *>calloc(n, sizeof(hdr_st_t))
    if h.inn.size:
        h.inn.st = <hdr_st_t *>calloc(n, sizeof(hdr_st_t))
    h.scratch = <uint8_t *>calloc(tx_iovs + out_iovs, HDR_STRIDE)
    h.ry_st = <hdr_st_t *>calloc(self.batch, sizeof(hdr_st_t))
    self.hdr.tx_iovs = tx_iovs
    self.hdr.out_iovs = out_iovs
    if ((h.out.size and h.out.st == NULL) or (h.inn.size and h.inn.st == NULL)
            or h.scratch == NULL or h.ry_st == NULL):
        raise MemoryError("header state")


cdef void _hdr_free(Engine self) noexcept nogil:
    free(self.hdr.out.st); self.hdr.out.st = NULL
    free(self.hdr.inn.st); self.hdr.inn.st = NULL
    free(self.hdr.scratch); self.hdr.scratch = NULL
    free(self.hdr.ry_st); self.hdr.ry_st = NULL
    self.hdr.up = self.hdr.down = False


cdef inline void _hdr_new_flow(Engine self, int32_t idx) noexcept nogil:
    """A new association: its own random start in each direction that has a header."""
    if self.hdr.out.st != NULL:
        hdr_st_init(&self.hdr, self.hdr.out.kind, &self.hdr.out.st[idx])
    if self.hdr.inn.st != NULL:
        hdr_st_init(&self.hdr, self.hdr.inn.kind, &self.hdr.inn.st[idx])


cdef inline uint32_t _hdr_nseg(uint32_t n, int seg) noexcept nogil:
    return (n + <uint32_t>seg - 1) // <uint32_t>seg if n else 1


cdef bint _hdr_client_in(Engine self, uint8_t **data, uint32_t *n, int seg) noexcept nogil:
    """A datagram from a client of a --header-in listener: strip its header (seg <= 0), or
    see that a GRO buffer holds at least one valid segment (stripped per segment later).
    False (counted) when nothing of it is to be relayed: no association is made for it."""
    cdef int kind = self.hdr.inn.kind
    cdef uint32_t size = self.hdr.inn.size, left, k, bad = 0
    cdef uint8_t *p = data[0]
    if size == 0:
        return True
    if seg <= 0:
        if not hdr_check(kind, p, n[0]):
            self.st[C_DROP_BAD_HEADER] += 1
            return False
        data[0] = p + size
        n[0] -= size
        return True
    left = n[0]
    while left:
        k = <uint32_t>seg if left > <uint32_t>seg else left
        if hdr_check(kind, p, k):
            return True
        bad += 1
        p += k
        left -= k
    self.st[C_DROP_BAD_HEADER] += bad
    return False


cdef void _hdr_tx(Engine self, int32_t idx, int fd, uint8_t *data, uint32_t n, int seg,
                  socklen_t nl) noexcept nogil:
    """Queue a client datagram (its --header-in header already stripped) or GRO buffer
    towards upstream with the --header-out header of association idx."""
    cdef uint32_t size = self.hdr.out.size
    if seg > 0:
        _hdr_tx_gro(self, idx, fd, data, n, seg, nl)
        return
    if size:
        if n > self.hdr.max_up:
            self.st[C_DROP_TOO_BIG] += 1
            return
        data -= size                    # into the slot's headroom (HDR_ROOM)
        hdr_write(self.hdr.out.kind, &self.hdr.out.st[idx], data)
        n += size
    self._tx_add(fd, data, n, seg, nl)


cdef inline void _hdr_msg_end(msghdr *h, iovec *first, int niov, uint8_t *ctrl,
                              uint32_t oseg, uint32_t count) noexcept nogil:
    """Make h the message of iovecs first[0:niov] holding count datagrams of oseg bytes
    (the last may be shorter): a GSO send when there are several."""
    h.msg_iov = first
    h.msg_iovlen = niov
    h.msg_control = NULL
    h.msg_controllen = 0
    h.msg_flags = 0
    if count > 1:
        msg_put_gso(h, ctrl, <uint16_t>oseg)


cdef void _hdr_tx_gro(Engine self, int32_t idx, int fd, uint8_t *data, uint32_t n, int seg,
                      socklen_t nl) noexcept nogil:
    """A GRO buffer towards upstream: each segment loses its --header-in header (invalid
    ones dropped) and gets a --header-out one; messages of at most HDR_SEGS segments."""
    cdef uint32_t hin = self.hdr.inn.size, hout = self.hdr.out.size
    cdef int kin = self.hdr.inn.kind, kout = self.hdr.out.kind
    cdef uint32_t oseg = <uint32_t>seg - hin + hout
    cdef uint32_t left = n, k, count = 0, bad = 0, total = 0
    cdef uint8_t *p = data
    cdef uint8_t *q
    cdef uint8_t *hb
    cdef int j = -1, first = 0
    cdef uint32_t per_msg = HDR_SEGS if oseg <= self.gso_max else 1
    cdef msghdr *h
    while left:
        k = <uint32_t>seg if left > <uint32_t>seg else left
        q = p
        p += k
        left -= k
        if hin:
            if not hdr_check(kin, q, k):
                bad += 1
                continue
            q += hin
            k -= hin
        # room for this segment: a message slot, two iovecs (and the message's end)
        if j >= 0 and (count == per_msg or k + hout == 0 or total + k + hout > SQ_GSO_BYTES
                       or self.niov + 2 > self.hdr.tx_iovs):
            _hdr_tx_close(self, j, first, oseg, count, total, fd)
            j = -1
        if j < 0:
            if self.ntx >= self.batch or self.niov + 2 > self.hdr.tx_iovs:
                self._flush_tx()
            j = self.ntx
            first = self.niov
            count = total = 0
            h = &self.tx_msgs[j].msg_hdr
            h.msg_name = NULL
            h.msg_namelen = 0
        if hout:
            hb = self.hdr.scratch + <size_t>self.niov * HDR_STRIDE
            hdr_write(kout, &self.hdr.out.st[idx], hb)
            self.tx_iov[self.niov].iov_base = hb
            self.tx_iov[self.niov].iov_len = hout
            self.niov += 1
        if k or not hout:
            self.tx_iov[self.niov].iov_base = q
            self.tx_iov[self.niov].iov_len = k
            self.niov += 1
        count += 1
        total += k + hout
        if k + hout == 0:               # an empty datagram: never part of a GSO send
            _hdr_tx_close(self, j, first, oseg, count, total, fd)
            j = -1
    if j >= 0:
        _hdr_tx_close(self, j, first, oseg, count, total, fd)
    if bad:
        self.st[C_DROP_BAD_HEADER] += bad
    self._flush_tx()                    # the next datagrams find a message slot each


cdef inline void _hdr_tx_close(Engine self, int j, int first, uint32_t oseg, uint32_t count,
                               uint32_t total, int fd) noexcept nogil:
    _hdr_msg_end(&self.tx_msgs[j].msg_hdr, &self.tx_iov[first], self.niov - first,
                 self.tx_ctrl + j * GSO_CTRL, oseg, count)
    self.tx_fd[j] = fd
    self.tx_seg[j] = oseg
    self.tx_bytes[j] = total
    self.tx_closed[j] = True            # nothing joins a message made here
    self.ntx = j + 1


cdef void _hdr_reply(Engine self, int i, int32_t idx) noexcept nogil:
    """Reply slot i, just received on association idx: strip its --header-out header and
    write the --header-in one into the headroom in front (a GRO buffer: its segments'
    headers are written when the slot is sent, from the state noted here). A reply that
    cannot go is marked ry_gro = -1 (counted)."""
    cdef hdr_t *h = &self.hdr
    cdef uint8_t *p = <uint8_t *>self.ry_iov[i].iov_base
    cdef uint32_t n = <uint32_t>self.ry_iov[i].iov_len
    cdef int seg = self.ry_gro[i]
    if seg > 0:
        if h.inn.size:
            h.ry_st[i] = h.inn.st[idx]
            hdr_skip(h.inn.kind, &h.inn.st[idx], _hdr_nseg(n, seg))
        return
    if h.out.size:
        if not hdr_check(h.out.kind, p, n):
            self.st[C_DROP_BAD_HEADER] += 1
            self.ry_gro[i] = -1
            return
        p += h.out.size
        n -= h.out.size
    if h.inn.size:
        if n > h.max_down[0 if self.ry_client[i].family == AF_INET else 1]:
            self.st[C_DROP_TOO_BIG] += 1
            self.ry_gro[i] = -1
            return
        p -= h.inn.size                 # into the slot's HEADROOM
        hdr_write(h.inn.kind, &h.inn.st[idx], p)
        n += h.inn.size
    self.ry_iov[i].iov_base = p
    self.ry_iov[i].iov_len = n


cdef void _hdr_reply_gro(Engine self, int i, int *pk, int *pv, socklen_t nl) noexcept nogil:
    """Forward reply slot i, a GRO buffer, as messages starting at out_msgs[*pk] (whose
    destination the caller wrote in out_names[*pk]) and out_iov[*pv]: each segment
    without its --header-out header (invalid ones dropped), with a --header-in one."""
    cdef hdr_t *hd = &self.hdr
    cdef uint32_t hin = hd.inn.size, hout = hd.out.size
    cdef int seg = self.ry_gro[i]
    cdef uint32_t oseg = <uint32_t>seg - hout + hin
    cdef uint32_t left = <uint32_t>self.ry_iov[i].iov_len, k, count = 0, bad = 0, total = 0
    cdef uint8_t *p = <uint8_t *>self.ry_iov[i].iov_base
    cdef uint8_t *q
    cdef uint8_t *hb
    cdef uint8_t *scratch = hd.scratch + <size_t>self.hdr.tx_iovs * HDR_STRIDE
    cdef hdr_st_t st = hd.ry_st[i]
    cdef sockaddr_any dst = self.out_names[pk[0]]
    cdef int k_msg = pk[0], v = pv[0], j = -1, first = 0
    cdef int msg_cap = self.batch      # out_seg, out_ctrl, out_local: one per reply slot
    cdef uint32_t per_msg = HDR_SEGS if oseg <= self.gso_max else 1
    while left:
        k = <uint32_t>seg if left > <uint32_t>seg else left
        q = p
        p += k
        left -= k
        if hout:
            if not hdr_check(hd.out.kind, q, k):
                bad += 1
                continue
            q += hout
            k -= hout
        if j >= 0 and (count == per_msg or k + hin == 0 or total + k + hin > SQ_GSO_BYTES
                       or v + 2 > self.hdr.out_iovs):
            _hdr_reply_close(self, i, j, first, v, oseg, count, total)
            j = -1
        if j < 0:
            if k_msg >= msg_cap or v + 2 > self.hdr.out_iovs:
                self._send_counted(self.lfd, self.out_msgs, k_msg, C_DOWN_DATAGRAMS)
                k_msg = v = 0
            j = k_msg
            k_msg += 1
            first = v
            count = total = 0
            self.out_names[j] = dst
            self.out_msgs[j].msg_hdr.msg_name = &self.out_names[j]
            self.out_msgs[j].msg_hdr.msg_namelen = nl
        if hin:
            hb = scratch + <size_t>v * HDR_STRIDE
            hdr_write(hd.inn.kind, &st, hb)
            self.out_iov[v].iov_base = hb
            self.out_iov[v].iov_len = hin
            v += 1
        if k or not hin:
            self.out_iov[v].iov_base = q
            self.out_iov[v].iov_len = k
            v += 1
        count += 1
        total += k + hin
        if k + hin == 0:
            _hdr_reply_close(self, i, j, first, v, oseg, count, total)
            j = -1
    if j >= 0:
        _hdr_reply_close(self, i, j, first, v, oseg, count, total)
    if bad:
        self.st[C_DROP_BAD_HEADER] += bad
    # sent now: the replies after this one find a message and an iovec each
    self._send_counted(self.lfd, self.out_msgs, k_msg, C_DOWN_DATAGRAMS)
    pk[0] = pv[0] = 0


cdef void _hdr_reply_close(Engine self, int i, int j, int first, int v, uint32_t oseg,
                           uint32_t count, uint32_t total) noexcept nogil:
    cdef msghdr *h = &self.out_msgs[j].msg_hdr
    _hdr_msg_end(h, &self.out_iov[first], v - first, NULL, oseg, 1)
    if self.local_src:
        self.out_local[j] = self.ry_local[i]
        if self.ry_local[i].family:
            msg_put_src(h, self.out_ctrl + j * OUT_CTRL, self.ry_local[i].family,
                        self.ry_local[i].addr)
    if count > 1:
        msg_put_gso(h, self.out_ctrl + j * OUT_CTRL, <uint16_t>oseg)
    self.out_seg[j] = oseg
    self.out_bytes[j] = total
    self.out_closed[j] = True


cdef inline uint32_t _hdr_added(Engine self, int counter) noexcept nogil:
    """Header bytes in each datagram sent that counter counts (byte counters count payload)."""
    if counter == C_UP_DATAGRAMS:
        return self.hdr.out.size
    if counter == C_DOWN_DATAGRAMS:
        return self.hdr.inn.size
    return 0
