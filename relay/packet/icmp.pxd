# cython: language_level=3
# ICMP / ICMPv6 port unreachable errors, written into a caller-owned buffer with their
# checksums, no allocation: the packet core of `redir --reject` and of the packet library's
# build_icmp_unreachable (relay/packet/_fast.pyx; pure twin relay/packet/pure/fast.py).
#
# The error answers a UDP datagram src -> dst (the original sender and the original
# destination): it goes from dst's host to src's host and quotes the "original datagram" --
# its IP header (as build_udp would write it: TTL 64, DF set, identification 0; IPv6: hop
# limit 64), its UDP header (ports, length and checksum of the whole datagram) and as much
# of its payload as keeps the error within 576 bytes (IPv4, RFC 1812 4.3.2.3) or 1280 bytes
# (IPv6, RFC 4443 2.4(c)). The lengths in the quoted headers are the original ones.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from relay.includes.system cimport memcpy, htons, htonl
from relay.packet.checksum cimport csum_partial, csum_finish
from relay.packet.headers cimport (
    put16, write_ip_header, write_udp_header, IPV4_HDR_LEN, IPV6_HDR_LEN, UDP_HDR_LEN,
)


cdef enum:
    ICMP_HDR_LEN = 8                 # type, code, checksum, 4 bytes unused
    ICMP4_ERROR_MAX = 576            # RFC 1812 4.3.2.3
    ICMP6_ERROR_MAX = 1280           # RFC 4443 2.4(c)
    ICMP_UNREACH_MAX = 1280          # a buffer this large holds an error of either family
    ICMP4_PROTO = 1
    ICMP6_PROTO = 58
    ICMP4_DEST_UNREACH = 3           # type 3 code 3: port unreachable
    ICMP4_PORT_UNREACH = 3
    ICMP6_DEST_UNREACH = 1           # type 1 code 4: port unreachable
    ICMP6_PORT_UNREACH = 4
    QUOTED_TTL = 64                  # the quoted header's TTL / hop limit (build_udp's default)


cdef inline size_t icmp_quoted(int is_v6, size_t plen) noexcept nogil:
    """Payload bytes of the original datagram an error quotes: all of them, or what fits."""
    cdef size_t room
    if is_v6:
        room = ICMP6_ERROR_MAX - 2 * IPV6_HDR_LEN - ICMP_HDR_LEN - UDP_HDR_LEN     # 1184
    else:
        room = ICMP4_ERROR_MAX - 2 * IPV4_HDR_LEN - ICMP_HDR_LEN - UDP_HDR_LEN     # 520
    return plen if plen < room else room


cdef inline size_t write_icmp_unreachable(uint8_t *out, int is_v6,
                                          const uint8_t *src, uint16_t sport,
                                          const uint8_t *dst, uint16_t dport,
                                          const uint8_t *payload, size_t plen,
                                          uint8_t ttl, uint16_t ident) noexcept nogil:
    """Write into out (at least ICMP_UNREACH_MAX bytes) the port unreachable error for the
    UDP datagram src:sport -> dst:dport carrying plen payload bytes (read whole: the quoted
    UDP checksum covers them all; the caller checks plen against the family's maximum).
    Addresses in network order, ports in host order; ttl and ident (IPv4 only, DF clear)
    are the error's own. Returns the error's length."""
    cdef size_t q = icmp_quoted(is_v6, plen)
    cdef size_t hl = IPV6_HDR_LEN if is_v6 else IPV4_HDR_LEN
    cdef size_t icmp_len = ICMP_HDR_LEN + hl + UDP_HDR_LEN + q
    cdef uint8_t *icmp = out + hl
    cdef uint8_t *inner = icmp + ICMP_HDR_LEN
    cdef uint64_t s = 0
    write_ip_header(out, is_v6, dst, src, icmp_len, ICMP6_PROTO if is_v6 else ICMP4_PROTO,
                    ttl, 0, ident, 0, 0)
    icmp[0] = ICMP6_DEST_UNREACH if is_v6 else ICMP4_DEST_UNREACH
    icmp[1] = ICMP6_PORT_UNREACH if is_v6 else ICMP4_PORT_UNREACH
    icmp[2] = icmp[3] = icmp[4] = icmp[5] = icmp[6] = icmp[7] = 0
    write_ip_header(inner, is_v6, src, dst, UDP_HDR_LEN + plen, 17, QUOTED_TTL, 0, 0, 0x4000, 0)
    write_udp_header(inner + hl, is_v6, src, sport, dst, dport, payload, plen)
    memcpy(inner + hl + UDP_HDR_LEN, payload, q)
    if is_v6:
        # ICMPv6 pseudo-header: source, destination, upper-layer length, next header 58
        s = csum_partial(dst, 16, 0)
        s = csum_partial(src, 16, s)
        s += htonl(<uint32_t>icmp_len)
        s += htonl(ICMP6_PROTO)
    put16(icmp + 2, csum_finish(csum_partial(icmp, icmp_len, s)))
    return hl + icmp_len
