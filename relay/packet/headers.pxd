# cython: language_level=3
# IPv4/IPv6 + UDP headers and IP fragments, written into caller-owned buffers with their
# checksums (relay/packet/checksum.pxd), no allocation: the packet core of the packet
# library and of the data path's spoofed replies.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from relay.includes.system cimport memcpy, htons, ntohs, htonl
from relay.packet.checksum cimport (
    csum_partial, csum_fold, csum_finish, csum_update16, udp_pseudo_sum,
)


cdef enum:
    IPV4_HDR_LEN = 20
    IPV6_HDR_LEN = 40
    UDP_HDR_LEN = 8
    IPV4_UDP_HDR_LEN = 28
    IPV6_UDP_HDR_LEN = 48
    MAX_IPV4_UDP_PAYLOAD = 65507     # 65535 - 20 - 8
    MAX_IPV6_UDP_PAYLOAD = 65527     # 65535 - 8 (payload length field, no jumbograms)


cdef inline void put16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = <uint8_t>(v >> 8)
    p[1] = <uint8_t>v


cdef inline uint16_t get16(const uint8_t *p) noexcept nogil:
    return <uint16_t>((p[0] << 8) | p[1])


cdef inline uint16_t udp_checksum(int is_v6, const uint8_t *src, const uint8_t *dst,
                                  const uint8_t *udp_hdr, const uint8_t *payload,
                                  size_t plen) noexcept nogil:
    """UDP checksum over pseudo-header, the 8-byte UDP header (its checksum field
    must be zero) and the payload; a computed 0 is returned as 0xFFFF (RFC 768/8200)."""
    cdef uint64_t s = udp_pseudo_sum(is_v6, src, dst, <uint32_t>(UDP_HDR_LEN + plen))
    s = csum_partial(udp_hdr, UDP_HDR_LEN, s)
    s = csum_partial(payload, plen, s)
    cdef uint16_t c = csum_finish(s)
    return 0xffff if c == 0 else c


cdef inline size_t write_ip_header(uint8_t *out, int is_v6, const uint8_t *src,
                                   const uint8_t *dst, size_t ip_payload, uint8_t proto,
                                   uint8_t ttl, uint8_t tos, uint16_t ident, uint16_t frag,
                                   uint32_t flowlabel) noexcept nogil:
    """Write an IPv4 header (20 B, checksum included; frag is the flags + fragment offset
    field) or an IPv6 header (40 B; proto is the next header, ident and frag unused) for
    ip_payload bytes after it. Addresses are in network order. Returns the header length."""
    cdef uint32_t w
    if is_v6:
        w = (6u << 28) | (<uint32_t>tos << 20) | (flowlabel & 0xfffffu)
        out[0] = <uint8_t>(w >> 24)
        out[1] = <uint8_t>(w >> 16)
        out[2] = <uint8_t>(w >> 8)
        out[3] = <uint8_t>w
        put16(out + 4, <uint16_t>ip_payload)
        out[6] = proto
        out[7] = ttl
        memcpy(out + 8, src, 16)
        memcpy(out + 24, dst, 16)
        return IPV6_HDR_LEN
    out[0] = 0x45
    out[1] = tos
    put16(out + 2, <uint16_t>(IPV4_HDR_LEN + ip_payload))
    put16(out + 4, ident)
    put16(out + 6, frag)
    out[8] = ttl
    out[9] = proto
    out[10] = 0
    out[11] = 0
    memcpy(out + 12, src, 4)
    memcpy(out + 16, dst, 4)
    put16(out + 10, csum_finish(csum_partial(out, IPV4_HDR_LEN, 0)))
    return IPV4_HDR_LEN


cdef inline void write_udp_header(uint8_t *udp, int is_v6,
                                  const uint8_t *src, uint16_t sport,
                                  const uint8_t *dst, uint16_t dport,
                                  const uint8_t *payload, size_t plen) noexcept nogil:
    """Write the 8-byte UDP header of a datagram of plen payload bytes, with the checksum
    over the whole datagram (pseudo-header of src/dst, header, payload)."""
    put16(udp, sport)
    put16(udp + 2, dport)
    put16(udp + 4, <uint16_t>(UDP_HDR_LEN + plen))
    udp[6] = 0
    udp[7] = 0
    put16(udp + 6, udp_checksum(is_v6, src, dst, udp, payload, plen))


cdef inline size_t write_udp_headers(uint8_t *out, int is_v6,
                                     const uint8_t *src, uint16_t sport,
                                     const uint8_t *dst, uint16_t dport,
                                     const uint8_t *payload, size_t plen,
                                     uint8_t ttl, uint8_t tos, uint16_t ident,
                                     bint df, uint32_t flowlabel) noexcept nogil:
    """Write an IPv4 (20 B) or IPv6 (40 B) header and the UDP header (8 B) into out,
    checksums included; the payload is only read. Addresses are in network order
    (4 or 16 bytes), ports in host order. The caller checks plen against the
    family's maximum. Returns the header length (28 or 48)."""
    cdef size_t hl = write_ip_header(out, is_v6, src, dst, UDP_HDR_LEN + plen, 17, ttl, tos,
                                     ident, 0x4000 if df else 0, flowlabel)
    write_udp_header(out + hl, is_v6, src, sport, dst, dport, payload, plen)
    return hl + UDP_HDR_LEN


# -- fragments ------------------------------------------------------------------------------
#
# A UDP datagram (8-byte header + payload) larger than an MTU goes out as fragments, each
# an IP header (IPv6: + an 8-byte Fragment header) followed by a piece of the datagram.
# Every piece but the last is a multiple of 8 bytes; the first starts with the UDP header,
# whose checksum covers the whole datagram. The caller keeps the payload where it is and
# sends each fragment as two pieces: the header written here (<= FRAG_HDR_MAX bytes, the
# UDP header included in the first) and the payload range frag_data() names.

cdef enum:
    IPV6_FRAG_LEN = 8                # the Fragment extension header
    IPV4_MIN_MTU = 68                # RFC 791
    IPV6_MIN_MTU = 1280              # RFC 8200
    FRAG_HDR_MAX = 56                # IPv6 40 + Fragment 8 + UDP 8 (first fragment)
    IPV4_MAX_PACKET = 65535          # total length field
    IPV6_MAX_PACKET = 65575          # 40-byte header + payload length field


cdef inline size_t frag_chunk(int is_v6, size_t mtu) noexcept nogil:
    """Bytes of the UDP datagram one fragment carries at mtu (>= the family's minimum):
    what is left after the headers in a packet of at most mtu bytes (and at most the
    family's largest packet), rounded down to a multiple of 8."""
    cdef size_t top = IPV6_MAX_PACKET if is_v6 else IPV4_MAX_PACKET
    if mtu > top:
        mtu = top
    return (mtu - (IPV6_HDR_LEN + IPV6_FRAG_LEN if is_v6 else IPV4_HDR_LEN)) & ~(<size_t>7)


cdef inline uint32_t frag_next_ident(uint32_t ident) noexcept nogil:
    """The identification after ident for the next fragmented datagram: a counter whose
    low 16 bits (the IPv4 field) are never 0 (a raw IPv4 socket would replace 0 with an
    identification of its own in each fragment)."""
    ident += 1
    if (ident & 0xffff) == 0:
        ident += 1
    return ident


cdef inline size_t frag_count(size_t udp_len, size_t chunk) noexcept nogil:
    """Fragments of a UDP datagram of udp_len bytes (header included) in chunk-byte pieces."""
    return (udp_len + chunk - 1) // chunk


cdef inline size_t write_fragment(uint8_t *out, int is_v6,
                                  const uint8_t *src, const uint8_t *dst,
                                  const uint8_t *udp, size_t udp_len,
                                  size_t off, size_t chunk, uint32_t ident,
                                  uint8_t ttl, uint8_t tos, uint32_t flowlabel,
                                  size_t *data_off, size_t *data_len) noexcept nogil:
    """Write the header of the fragment at byte off (a multiple of chunk) of a datagram of
    udp_len bytes whose UDP header (checksum done) is udp: IPv4 with DF clear, MF on all
    but the last fragment, ident as identification (its low 16 bits), own checksum; or IPv6
    with a Fragment header (next header 17, M flag, 32-bit ident). The first fragment's
    header ends with the UDP header. Returns the header length; *data_off and *data_len
    give the payload bytes (offsets in the payload, after the UDP header) that follow it."""
    cdef size_t n = udp_len - off
    cdef size_t hl
    cdef bint more = n > chunk
    if more:
        n = chunk
    if is_v6:
        hl = write_ip_header(out, 1, src, dst, IPV6_FRAG_LEN + n, 44, ttl, tos, 0, 0,
                             flowlabel)
        out[hl] = 17
        out[hl + 1] = 0
        put16(out + hl + 2, <uint16_t>(off | (1 if more else 0)))
        out[hl + 4] = <uint8_t>(ident >> 24)
        out[hl + 5] = <uint8_t>(ident >> 16)
        out[hl + 6] = <uint8_t>(ident >> 8)
        out[hl + 7] = <uint8_t>ident
        hl += IPV6_FRAG_LEN
    else:
        hl = write_ip_header(out, 0, src, dst, n, 17, ttl, tos, <uint16_t>ident,
                             <uint16_t>((off >> 3) | (0x2000 if more else 0)), 0)
    if off == 0:
        memcpy(out + hl, udp, UDP_HDR_LEN)
        data_off[0] = 0
        data_len[0] = n - UDP_HDR_LEN
        return hl + UDP_HDR_LEN
    data_off[0] = off - UDP_HDR_LEN
    data_len[0] = n
    return hl
