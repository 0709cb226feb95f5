# Included by relay/datapath/tunnel.pyx: the frame codec: tunnel frames and SOCKS5 UDP headers parsed and written in C.

cdef Py_ssize_t parse_frame(const uint8_t *p, size_t n, bint mux, size_t maxp,
                            frame_t *f) noexcept nogil:
    """Parse one frame at p[0:n]: bytes consumed, 0 when incomplete, -E_* on error.
    Checks run in wire order (RSV, FRAG, ATYP, domain length), like relay.proto.frame."""
    cdef size_t pos, alen, end
    if n < 4:
        return 0
    f.dlen = rd16(p)
    if f.dlen > maxp:
        return -E_TOO_BIG
    if p[2] != 0:
        return -E_FRAGMENTED
    f.atyp = p[3]
    if f.atyp == ATYP_IPV4:
        alen = 4
        pos = 4
    elif f.atyp == ATYP_IPV6:
        alen = 16
        pos = 4
    elif f.atyp == ATYP_DOMAIN:
        if n < 5:
            return 0
        alen = p[4]
        if alen == 0:
            return -E_EMPTY_DOMAIN
        pos = 5
    else:
        return -E_BAD_ATYP
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
    cdef size_t alen = 4 if p[3] == ATYP_IPV4 else (16 if p[3] == ATYP_IPV6 else 1 + p[4])
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
        o[3] = ATYP_IPV4
        memcpy(o + 4, &a.v4.sin_addr, 4)
        memcpy(o + 8, &a.v4.sin_port, 2)
        pos = 10
    elif is_mapped(a):
        o[3] = ATYP_IPV4
        memcpy(o + 4, &a.v6.sin6_addr.s6_addr[12], 4)
        memcpy(o + 8, &a.v6.sin6_port, 2)
        pos = 10
    else:
        o[3] = ATYP_IPV6
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
    if f.atyp == ATYP_IPV4:
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
    if f.atyp == ATYP_IPV6 and family != AF_INET:
        out.v6.sin6_family = AF_INET6
        memcpy(&out.v6.sin6_addr, f.addr, 16)
        out.v6.sin6_port = htons(f.port)
        return sizeof(sockaddr_in6)
    return 0


cdef inline Py_ssize_t parse_udp_req(const uint8_t *p, size_t n, frame_t *f) noexcept nogil:
    """SOCKS5 UDP request header (RSV ignored): header length, -E_* on error."""
    cdef size_t alen, pos
    if n < 4:
        return -E_TRUNCATED
    f.atyp = p[3]
    if f.atyp == ATYP_IPV4:
        alen = 4
        pos = 4
    elif f.atyp == ATYP_IPV6:
        alen = 16
        pos = 4
    elif f.atyp == ATYP_DOMAIN:
        if n < 5:
            return -E_TRUNCATED
        alen = p[4]
        if alen == 0:
            return -E_EMPTY_DOMAIN
        pos = 5
    else:
        return -E_BAD_ATYP
    if n < pos + alen + 2:
        return -E_TRUNCATED
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
    if f.atyp == ATYP_IPV4:
        return socket.inet_ntop(socket.AF_INET, (<const char *>f.addr)[:4])
    if f.atyp == ATYP_IPV6:
        return socket.inet_ntop(socket.AF_INET6, (<const char *>f.addr)[:16])
    return (<const char *>f.addr)[:f.alen].decode("latin-1")


def parse_frames(buf, *, bint mux=False, bint final=False, size_t max_payload=MAX_PAYLOAD):
    """C codec, same contract as relay.proto.frame.parse_frames: ([Frame], consumed)."""
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
                raise _frame_error(E_TRUNCATED,
                                   f"truncated frame: {n - pos} bytes left at end of stream")
            break
        if r < 0:
            if r == -E_TOO_BIG:
                raise _frame_error(E_TOO_BIG, f"frame length {f.dlen} exceeds {max_payload}")
            if r == -E_FRAGMENTED:
                raise _frame_error(E_FRAGMENTED, f"FRAG must be 0, got {mv[pos + 2]}")
            if r == -E_BAD_ATYP:
                raise _frame_error(E_BAD_ATYP, f"unknown address type 0x{f.atyp:02x}")
            raise _frame_error(-r, "domain of length 0")
        out.append(_proto.Frame(f.flow if mux else None, f.atyp, _frame_host(&f), f.port,
                                (<const char *>f.data)[:f.dlen]))
        pos += r
    return out, pos


def encode_frames(items, bint mux=False):
    """Frames for [(host, port, data[, flow])...] written by the C encoder; hosts must be
    IP literals (domain frames come from relay.proto.frame)."""
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
