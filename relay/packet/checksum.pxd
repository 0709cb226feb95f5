# cython: language_level=3
# The Internet checksum: RFC 1071 sum over any buffer, fold, RFC 1624 incremental update,
# and the UDP pseudo-header sum. Inline, no allocation.
#
# Sums are kept in *native* byte order (RFC 1071 section 2(B): the one's complement
# sum is byte-order independent); csum_finish() returns the checksum in host order,
# ready for htons().
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from relay.includes.system cimport memcpy, htons, ntohs, htonl


cdef inline uint64_t csum_partial(const uint8_t *p, size_t n, uint64_t s) noexcept nogil:
    """Add n bytes at p to the running native-order sum s (p's offset must be even
    relative to the start of the checksummed data, except for the last piece)."""
    cdef uint32_t w32
    cdef uint16_t w16 = 0
    cdef uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0
    cdef uint32_t a, b, c, d
    while n >= 16:
        memcpy(&a, p, 4)
        memcpy(&b, p + 4, 4)
        memcpy(&c, p + 8, 4)
        memcpy(&d, p + 12, 4)
        s0 += a
        s1 += b
        s2 += c
        s3 += d
        p += 16
        n -= 16
    s += s0 + s1 + s2 + s3
    while n >= 4:
        memcpy(&w32, p, 4)
        s += w32
        p += 4
        n -= 4
    if n >= 2:
        memcpy(&w16, p, 2)
        s += w16
        p += 2
        n -= 2
    if n:
        w16 = 0
        memcpy(&w16, p, 1)     # the lone byte is the high byte of a zero-padded word
        s += w16
    return s


cdef inline uint16_t csum_fold(uint64_t s) noexcept nogil:
    """Fold a native-order 64-bit sum to 16 bits (not complemented), host order."""
    s = (s & 0xffffffffULL) + (s >> 32)
    s = (s & 0xffffffffULL) + (s >> 32)
    s = (s & 0xffffULL) + (s >> 16)
    s = (s & 0xffffULL) + (s >> 16)
    s = (s & 0xffffULL) + (s >> 16)
    return ntohs(<uint16_t>s)


cdef inline uint16_t csum_finish(uint64_t s) noexcept nogil:
    """The Internet checksum (complemented fold) of sum s, in host order."""
    return <uint16_t>(~csum_fold(s) & 0xffff)


cdef inline uint16_t csum_update16(uint16_t csum, uint16_t old, uint16_t new) noexcept nogil:
    """RFC 1624 eqn. 3: HC' = ~(~HC + ~m + m'), all values in host order."""
    cdef uint32_t s = (~csum & 0xffff) + (~old & 0xffff) + new
    s = (s & 0xffff) + (s >> 16)
    s = (s & 0xffff) + (s >> 16)
    return <uint16_t>(~s & 0xffff)


cdef inline uint64_t udp_pseudo_sum(int is_v6, const uint8_t *src, const uint8_t *dst,
                                    uint32_t udp_len) noexcept nogil:
    """Native-order sum of the IPv4 or IPv6 pseudo-header (addresses in network order)."""
    cdef uint64_t s
    if is_v6:
        s = csum_partial(src, 16, 0)
        s = csum_partial(dst, 16, s)
        s += htonl(udp_len)
        s += htonl(17)
    else:
        s = csum_partial(src, 4, 0)
        s = csum_partial(dst, 4, s)
        s += htons(17)
        s += htons(<uint16_t>udp_len)
    return s
