# cython: language_level=3, boundscheck=False, wraparound=False, initializedcheck=False, cdivision=True
"""Packet API of the data path: RFC 1071 checksum, RFC 1624 update, IPv4/IPv6+UDP
build and parse, plus BatchSocket (batch datagram I/O, see _batch.pxi).

Same names, signatures, results and error messages as the pure-Python fallback
``relay.packet.pure.fast``; that module also holds the table of parse_udp error reasons,
which this one raises through ``parse_error`` so the messages never drift apart.
Buffers are read through the buffer protocol (``Py_buffer``), checksums and headers
are computed with the inline helpers of ``relay/packet/headers.pxd``, and packets are parsed
with pointers: no Python object is made except the results.
"""
from cpython.buffer cimport (
    PyObject_CheckBuffer, PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE,
)
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memmove, memchr

from relay.packet.checksum cimport csum_partial, csum_fold, csum_finish, udp_pseudo_sum
from relay.packet.headers cimport (
    write_udp_headers, write_udp_header,
    write_fragment, frag_chunk, get16, IPV4_UDP_HDR_LEN, IPV6_UDP_HDR_LEN, UDP_HDR_LEN,
    MAX_IPV4_UDP_PAYLOAD, MAX_IPV6_UDP_PAYLOAD, FRAG_HDR_MAX,
)
from relay.packet.icmp cimport write_icmp_unreachable, ICMP_UNREACH_MAX
from relay.datapath.addr cimport ip_to_tuple
from relay.includes.system cimport AF_INET, AF_INET6, inet_pton

from relay.errors import PacketTooBig
from relay.packet.pure.fast import (  # the one table of parse_udp reasons and messages
    parse_error, check_mtu, PARSE_REASONS, TRUNCATED, BAD_VERSION, BAD_IHL, BAD_IPV4_CHECKSUM,
    BAD_TOTAL_LENGTH, FRAGMENTED, NOT_UDP, BAD_IPV6_PAYLOAD_LENGTH, BAD_ROUTING_HEADER,
    BAD_UDP_LENGTH, BAD_UDP_CHECKSUM,
)

__all__ = [
    "inet_checksum", "checksum_update", "build_udp", "build_udp_into", "build_udp_fragments",
    "build_icmp_unreachable", "parse_udp", "MAX_IPV4_PAYLOAD", "MAX_IPV6_PAYLOAD", "BatchSocket",
]

MAX_IPV4_PAYLOAD = MAX_IPV4_UDP_PAYLOAD     # 65507
MAX_IPV6_PAYLOAD = MAX_IPV6_UDP_PAYLOAD     # 65527

cdef enum:
    NOGIL_MIN = 16384       # buffers at least this long are summed/copied without the GIL


# -- argument helpers (messages identical to relay.packet.pure.fast) ----------------------------

cdef int _get_buffer(object obj, Py_buffer *view, str name, bint writable) except -1:
    """Acquire obj's bytes as one contiguous run (read-only is fine unless writable)."""
    if not PyObject_CheckBuffer(obj):
        raise TypeError(f"{name} must be a bytes-like object, not {type(obj).__name__}")
    try:
        PyObject_GetBuffer(obj, view, PyBUF_SIMPLE)
    except BufferError:
        raise ValueError(f"{name} must be a contiguous buffer") from None
    if writable and view.readonly:
        PyBuffer_Release(view)
        raise TypeError(f"{name} must be writable")
    return 0


cdef long _int_arg(object value, str name, long lo, long hi) except -1:
    """value as a C long, TypeError if not an int, ValueError outside lo..hi (lo >= 0)."""
    cdef long x
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    try:
        x = value
    except OverflowError:
        x = -1
    if x < lo or x > hi:
        raise ValueError(f"{name} out of range {lo}-{hi}: {value}")
    return x


cdef int _ip_of(object addr, str name, uint8_t *ip, uint16_t *port) except -1:
    """Parse a (host, port) tuple with an IP literal host into ip (network order, 4 or
    16 bytes) and port; returns 1 for IPv6, 0 for IPv4."""
    cdef const char *h = NULL
    cdef Py_ssize_t hlen = 0
    cdef long pn
    if not isinstance(addr, tuple) or not 2 <= len(<tuple>addr) <= 4:
        raise TypeError(f"{name} must be a (host, port) tuple, not {addr!r}")
    host = (<tuple>addr)[0]
    p = (<tuple>addr)[1]
    if isinstance(host, str):
        try:
            h = PyUnicode_AsUTF8AndSize(host, &hlen)
        except UnicodeEncodeError:            # lone surrogates: not an IP literal
            h = NULL
    elif isinstance(host, bytes):
        h = PyBytes_AS_STRING(host)
        hlen = PyBytes_GET_SIZE(host)
    else:
        raise TypeError(f"{name} host must be str, not {type(host).__name__}")
    if not isinstance(p, int):
        raise TypeError(f"{name} port must be an int, not {type(p).__name__}")
    try:
        pn = p
    except OverflowError:
        pn = -1
    if pn < 0 or pn > 65535:
        raise ValueError(f"{name} port out of range 0-65535: {p}")
    port[0] = <uint16_t>pn
    if h != NULL and memchr(h, 0, <size_t>hlen) == NULL:
        if inet_pton(AF_INET, h, ip) == 1:
            return 0
        if inet_pton(AF_INET6, h, ip) == 1:
            return 1
    raise ValueError(f"{name} host is not an IPv4 or IPv6 address literal: {host!r}")


cdef struct udp_args:
    int is_v6
    uint8_t src[16]
    uint8_t dst[16]
    uint16_t sport
    uint16_t dport
    uint8_t ttl
    uint8_t tos
    uint16_t ident
    uint32_t flowlabel


cdef int _addresses(object src, object dst, udp_args *a) except -1:
    cdef int v6d
    a.is_v6 = _ip_of(src, "src", a.src, &a.sport)
    v6d = _ip_of(dst, "dst", a.dst, &a.dport)
    if a.is_v6 != v6d:
        raise ValueError("src and dst address families differ (IPv4 and IPv6)")
    return 0


cdef int _options(udp_args *a, object ttl, object tos, object ident, object flowlabel,
                  Py_ssize_t plen) except -1:
    a.ttl = <uint8_t>_int_arg(ttl, "ttl", 0, 255)
    a.tos = <uint8_t>_int_arg(tos, "tos", 0, 255)
    a.ident = <uint16_t>_int_arg(ident, "ident", 0, 0xFFFF)
    a.flowlabel = <uint32_t>_int_arg(flowlabel, "flowlabel", 0, 0xFFFFF)
    if a.is_v6 and plen > MAX_IPV6_UDP_PAYLOAD:
        raise PacketTooBig(f"payload of {plen} bytes exceeds the IPv6 maximum of "
                           f"{MAX_IPV6_UDP_PAYLOAD}", size=plen + IPV6_UDP_HDR_LEN,
                           limit="IPv6 maximum")
    if not a.is_v6 and plen > MAX_IPV4_UDP_PAYLOAD:
        raise PacketTooBig(f"payload of {plen} bytes exceeds the IPv4 maximum of "
                           f"{MAX_IPV4_UDP_PAYLOAD}", size=plen + IPV4_UDP_HDR_LEN,
                           limit="IPv4 maximum")
    return 0


cdef inline void _write(uint8_t *out, const udp_args *a, const uint8_t *payload,
                        size_t plen, bint df) noexcept nogil:
    """Copy the payload after the headers (memmove: it may overlap out) and write them."""
    cdef size_t hlen = IPV6_UDP_HDR_LEN if a.is_v6 else IPV4_UDP_HDR_LEN
    memmove(out + hlen, payload, plen)
    write_udp_headers(out, a.is_v6, a.src, a.sport, a.dst, a.dport, out + hlen, plen,
                      a.ttl, a.tos, a.ident, df, a.flowlabel)


cdef inline uint32_t _fold16(uint64_t s) noexcept nogil:
    """End-around-carry fold of a host-order sum to 16 bits (0 only for 0)."""
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return <uint32_t>s


# -- checksums ----------------------------------------------------------------------------

def inet_checksum(buf):
    """RFC 1071 Internet checksum of a bytes-like object (bytes, bytearray, memoryview,
    array...; odd lengths are zero-padded). Returns the 16-bit value that goes in a
    header field as an int, so a buffer that includes a correct checksum gives 0."""
    cdef Py_buffer v
    cdef uint16_t c
    _get_buffer(buf, &v, "buf", False)
    if v.len >= NOGIL_MIN:
        with nogil:
            c = csum_finish(csum_partial(<const uint8_t *>v.buf, <size_t>v.len, 0))
    else:
        c = csum_finish(csum_partial(<const uint8_t *>v.buf, <size_t>v.len, 0))
    PyBuffer_Release(&v)
    return c


cdef uint32_t _field_sum(object value, str name, Py_ssize_t *blen) except 0xffffffff:
    """Folded host-order sum of an int field (<= 32 bits) or an even-length buffer."""
    cdef Py_buffer v
    cdef uint64_t s
    if isinstance(value, int):
        s = <uint64_t>_int_arg(value, name, 0, 0xFFFFFFFF)
        blen[0] = -1
        return _fold16((s >> 16) + (s & 0xffff))
    _get_buffer(value, &v, name, False)
    blen[0] = v.len
    s = csum_fold(csum_partial(<const uint8_t *>v.buf, <size_t>v.len, 0))
    PyBuffer_Release(&v)
    return <uint32_t>s


def checksum_update(csum, old, new):
    """RFC 1624 (eqn. 3) update of checksum `csum` after a field changed from old to new.

    old/new are ints 0..0xFFFF for a 16-bit field or up to 0xFFFFFFFF for a 32-bit
    field (two 16-bit words, big-endian), or equal-length bytes-like objects of even
    length (e.g. 16-byte IPv6 addresses). Returns the new checksum. A UDP checksum of
    0 must go out as 0xFFFF: map a result of 0 before writing it into a UDP header.
    """
    cdef uint32_t c, fo, fn
    cdef Py_ssize_t lo, ln
    cdef uint64_t s
    c = <uint32_t>_int_arg(csum, "csum", 0, 0xFFFF)
    if isinstance(old, int) != isinstance(new, int):
        raise TypeError("old and new must both be ints or both be bytes-like objects")
    fo = _field_sum(old, "old", &lo)
    fn = _field_sum(new, "new", &ln)
    if lo != ln:
        raise ValueError(f"old and new differ in length: {lo} != {ln}")
    if lo > 0 and lo & 1:
        raise ValueError(f"old and new must have an even length, not {lo}")
    s = (~c & 0xffff) + (~fo & 0xffff) + fn
    s = (s & 0xffff) + (s >> 16)
    s = (s & 0xffff) + (s >> 16)
    return <uint16_t>(~s & 0xffff)


# -- build --------------------------------------------------------------------------------

cdef bytes _packet(udp_args *a, Py_buffer *pv, bint df):
    """The whole packet for the checked arguments a and payload pv, as bytes."""
    cdef size_t plen = <size_t>pv.len
    cdef bytes out = PyBytes_FromStringAndSize(
        NULL, (IPV6_UDP_HDR_LEN if a.is_v6 else IPV4_UDP_HDR_LEN) + pv.len)
    cdef uint8_t *p = <uint8_t *>PyBytes_AS_STRING(out)
    if plen >= NOGIL_MIN:
        with nogil:
            _write(p, a, <const uint8_t *>pv.buf, plen, df)
    else:
        _write(p, a, <const uint8_t *>pv.buf, plen, df)
    return out


def build_udp(src, dst, payload, *, ttl=64, tos=0, ident=0, df=True, flowlabel=0):
    """A complete IPv4+UDP or IPv6+UDP packet as bytes.

    src/dst are (host, port) tuples with IP literal hosts (extra items of an IPv6
    4-tuple are ignored); both must be of one family (a v4-mapped IPv6 literal is
    IPv6). payload is any bytes-like object. ttl and tos (IPv6 hop limit and traffic
    class) are 0..255; ident and df (don't fragment) are IPv4-only, flowlabel
    (0..0xFFFFF) IPv6-only. The UDP checksum is always computed (a computed 0 goes
    out as 0xFFFF). Raises TypeError/ValueError naming the bad argument, and
    PacketTooBig (a ValueError) when the payload exceeds MAX_IPV4_PAYLOAD (65507)
    or MAX_IPV6_PAYLOAD (65527) bytes.
    """
    cdef udp_args a
    cdef Py_buffer pv
    _addresses(src, dst, &a)
    _get_buffer(payload, &pv, "payload", False)
    try:
        _options(&a, ttl, tos, ident, flowlabel, pv.len)
        return _packet(&a, &pv, df)
    finally:
        PyBuffer_Release(&pv)


def build_udp_fragments(src, dst, payload, mtu, *, ttl=64, tos=0, ident=0, flowlabel=0):
    """The UDP datagram build_udp() would make, as the list of packets (bytes) that carry
    it over a link of mtu bytes: one whole packet when it fits, else its fragments.

    Every packet is at most mtu bytes (mtu: an int, at least 68 for IPv4 and 1280 for
    IPv6, else ValueError; from 65575 on, the largest IPv6 packet, nothing is fragmented). Each fragment carries
    a multiple of 8 bytes of the datagram (the last: the rest), the first one with the
    UDP header, whose checksum covers the whole datagram. IPv4: DF clear, MF on all but
    the last, ident (0..0xFFFF) as identification, each header with its own checksum.
    IPv6: a Fragment header (next header 44) with the M flag and ident (0..0xFFFFFFFF)
    as the 32-bit identification. The whole packet (when the datagram fits) has DF clear
    and ident too. A raw IPv4 socket replaces an identification of 0 in each packet, so
    fragments sent through one need a nonzero ident. ttl, tos, flowlabel and the errors
    are those of build_udp().
    """
    cdef udp_args a
    cdef Py_buffer pv
    cdef size_t plen, m, chunk, off, udp_len, hl, doff = 0, dlen = 0
    cdef uint32_t idv
    cdef uint8_t udp[UDP_HDR_LEN]
    cdef uint8_t hdr[FRAG_HDR_MAX]
    cdef const uint8_t *data
    cdef bytes pkt
    cdef uint8_t *p
    cdef list out
    _addresses(src, dst, &a)
    _get_buffer(payload, &pv, "payload", False)
    try:
        _options(&a, ttl, tos, 0, flowlabel, pv.len)
        idv = <uint32_t>_int_arg(ident, "ident", 0, 0xFFFFFFFF if a.is_v6 else 0xFFFF)
        m = <size_t>check_mtu(mtu, a.is_v6)
        plen = <size_t>pv.len
        data = <const uint8_t *>pv.buf
        if (IPV6_UDP_HDR_LEN if a.is_v6 else IPV4_UDP_HDR_LEN) + plen <= m:
            a.ident = <uint16_t>idv
            return [_packet(&a, &pv, False)]
        if plen >= NOGIL_MIN:
            with nogil:
                write_udp_header(udp, a.is_v6, a.src, a.sport, a.dst, a.dport, data, plen)
        else:
            write_udp_header(udp, a.is_v6, a.src, a.sport, a.dst, a.dport, data, plen)
        chunk = frag_chunk(a.is_v6, m)
        udp_len = UDP_HDR_LEN + plen
        out = []
        off = 0
        while off < udp_len:
            hl = write_fragment(hdr, a.is_v6, a.src, a.dst, udp, udp_len, off, chunk, idv,
                                a.ttl, a.tos, a.flowlabel, &doff, &dlen)
            pkt = PyBytes_FromStringAndSize(NULL, <Py_ssize_t>(hl + dlen))
            p = <uint8_t *>PyBytes_AS_STRING(pkt)
            memmove(p, hdr, hl)
            memmove(p + hl, data + doff, dlen)
            out.append(pkt)
            off += chunk
        return out
    finally:
        PyBuffer_Release(&pv)


def build_udp_into(buffer, offset, src, dst, payload, *, ttl=64, tos=0, ident=0, df=True,
                   flowlabel=0):
    """Write the packet build_udp() would return into the writable buffer at offset,
    without allocating a packet object, and return its length. The payload may lie
    inside buffer (e.g. already in place after room left for the headers). Raises
    ValueError when it does not fit, naming the bytes needed; otherwise the same
    errors as build_udp().
    """
    cdef udp_args a
    cdef Py_buffer bv, pv
    cdef bint dfl
    cdef size_t plen
    cdef Py_ssize_t size, off
    cdef uint8_t *p
    _get_buffer(buffer, &bv, "buffer", True)
    try:
        if not isinstance(offset, int):
            raise TypeError(f"offset must be an int, not {type(offset).__name__}")
        if offset < 0:
            raise ValueError(f"offset must be >= 0, not {offset}")
        _addresses(src, dst, &a)
        _get_buffer(payload, &pv, "payload", False)
        try:
            _options(&a, ttl, tos, ident, flowlabel, pv.len)
            dfl = df
            plen = <size_t>pv.len
            size = (IPV6_UDP_HDR_LEN if a.is_v6 else IPV4_UDP_HDR_LEN) + pv.len
            if offset > bv.len - size:
                raise ValueError(f"buffer too small: the packet needs {size} bytes at offset "
                                 f"{offset}, the buffer has {max(bv.len - offset, 0)} bytes there")
            off = offset
            p = <uint8_t *>bv.buf + off
            if plen >= NOGIL_MIN:
                with nogil:
                    _write(p, &a, <const uint8_t *>pv.buf, plen, dfl)
            else:
                _write(p, &a, <const uint8_t *>pv.buf, plen, dfl)
        finally:
            PyBuffer_Release(&pv)
    finally:
        PyBuffer_Release(&bv)
    return size


def build_icmp_unreachable(src, dst, payload, *, ttl=64, ident=0):
    """The ICMP (IPv4: type 3 code 3) or ICMPv6 (type 1 code 4) port unreachable error
    answering the UDP datagram build_udp(src, dst, payload) would be, as bytes: from dst's
    host to src's host, quoting that datagram's IP header (TTL 64, DF set), its UDP header
    (the checksum over the whole payload) and as much payload as keeps the error within
    576 bytes (IPv4, RFC 1812) or 1280 bytes (IPv6, RFC 4443). ttl is the error's own TTL
    (hop limit), ident its IPv4 identification (DF clear). Checksums: the IPv4 headers',
    the ICMP message's, ICMPv6's over its pseudo-header. Errors are build_udp()'s.
    """
    cdef udp_args a
    cdef Py_buffer pv
    cdef uint8_t out[ICMP_UNREACH_MAX]
    cdef size_t n
    _addresses(src, dst, &a)
    _get_buffer(payload, &pv, "payload", False)
    try:
        _options(&a, ttl, 0, ident, 0, pv.len)
        n = write_icmp_unreachable(out, a.is_v6, a.src, a.sport, a.dst, a.dport,
                                   <const uint8_t *>pv.buf, <size_t>pv.len, a.ttl, a.ident)
        return PyBytes_FromStringAndSize(<const char *>out, <Py_ssize_t>n)
    finally:
        PyBuffer_Release(&pv)


# -- parse --------------------------------------------------------------------------------

# Error codes: the same numbers as E_* in relay/packet/pure/fast.py (a test compares the
# messages of both implementations over random and mutated packets).
cdef enum:
    E_EMPTY = 1
    E_VERSION = 2
    E_V4_SHORT = 3
    E_V4_IHL = 4
    E_V4_CHECKSUM = 5
    E_V4_TOTLEN_SMALL = 6
    E_V4_TOTLEN_BIG = 7
    E_V4_PROTO = 8
    E_V4_FRAG = 9
    E_V6_SHORT = 10
    E_V6_JUMBO = 11
    E_V6_PLEN_BIG = 12
    E_V6_EXT_SHORT = 13
    E_V6_FRAG = 14
    E_V6_ROUTING = 15
    E_V6_NEXT = 16
    E_UDP_SHORT = 17
    E_UDP_LENGTH = 18
    E_UDP_CHECKSUM = 19
    E_UDP_ZERO6 = 20


cdef struct parsed_t:
    int is_v6
    const uint8_t *src        # network-order addresses inside the packet
    const uint8_t *dst        # final destination (routing header) for IPv6
    uint16_t sport
    uint16_t dport
    size_t start              # payload offsets
    size_t end
    size_t a                  # error detail numbers
    size_t b


cdef inline int _fail(parsed_t *r, int code, size_t a, size_t b) noexcept nogil:
    r.a = a
    r.b = b
    return code


cdef int _final_destination(const uint8_t *p, size_t off, size_t hlen,
                            const uint8_t **final, parsed_t *r) noexcept nogil:
    """Final destination of the routing header at off with segments left > 0
    (RFC 8200 8.1: the UDP pseudo-header uses it); 0 or an error code."""
    cdef uint8_t rtype = p[off + 2], left = p[off + 3], last
    cdef size_t count = (hlen - 8) // 16
    if rtype == 0 or rtype == 2:      # type 0 (deprecated), 2 (Mobile IPv6): last address
        if hlen != 8 + 16 * count or count == 0 or left > count:
            return _fail(r, E_V6_ROUTING, rtype, left)
        final[0] = p + off + 8 + 16 * (count - 1)
        return 0
    if rtype == 4:                    # segment routing (RFC 8754): segment list[0]
        last = p[off + 4]
        if count == 0 or last >= count or left > last:
            return _fail(r, E_V6_ROUTING, rtype, left)
        final[0] = p + off + 8
        return 0
    return _fail(r, E_V6_ROUTING, rtype, left)


cdef int _parse(const uint8_t *p, size_t n, parsed_t *r) noexcept nogil:
    """Validate the IPv4/IPv6 UDP packet p[0:n]; fill r and return 0, or return an
    error code with r.a/r.b set to the numbers of its message."""
    cdef size_t ihl, total, off, end, hlen, plen
    cdef uint32_t field, ulen, f
    cdef uint16_t frag
    cdef uint8_t nh
    cdef uint64_t s
    cdef int version, rc
    if n < 1:
        return _fail(r, E_EMPTY, 0, 0)
    version = p[0] >> 4
    if version == 4:
        if n < 20:
            return _fail(r, E_V4_SHORT, 20, n)
        ihl = (p[0] & 15) * 4
        if ihl < 20:
            return _fail(r, E_V4_IHL, ihl // 4, 0)
        if ihl > n:
            return _fail(r, E_V4_SHORT, ihl, n)
        f = csum_fold(csum_partial(p, ihl, 0))
        if f != 0xffff:
            field = get16(p + 10)
            return _fail(r, E_V4_CHECKSUM, field, ~_fold16(f + (~field & 0xffff)) & 0xffff)
        total = get16(p + 2)
        if total < ihl:
            return _fail(r, E_V4_TOTLEN_SMALL, total, ihl)
        if total > n:
            return _fail(r, E_V4_TOTLEN_BIG, total, n)
        if p[9] != 17:
            return _fail(r, E_V4_PROTO, p[9], 0)
        frag = get16(p + 6)
        if frag & 0x3fff:
            return _fail(r, E_V4_FRAG, frag & 0x1fff, (frag >> 13) & 1)
        r.is_v6 = 0
        r.src = p + 12
        r.dst = p + 16
        off = ihl
        end = total
    elif version == 6:
        if n < 40:
            return _fail(r, E_V6_SHORT, 40, n)
        plen = get16(p + 4)
        if plen == 0:
            return _fail(r, E_V6_JUMBO, 0, 0)
        if 40 + plen > n:
            return _fail(r, E_V6_PLEN_BIG, plen, n - 40)
        r.is_v6 = 1
        r.src = p + 8
        r.dst = p + 24
        nh = p[6]
        off = 40
        end = 40 + plen
        while nh != 17:
            if nh == 44:
                return _fail(r, E_V6_FRAG, 0, off)
            if nh != 0 and nh != 43 and nh != 60:
                return _fail(r, E_V6_NEXT, nh, 0)
            if end - off < 8:
                return _fail(r, E_V6_EXT_SHORT, nh, off)
            hlen = (<size_t>p[off + 1] + 1) * 8
            if hlen > end - off:
                return _fail(r, E_V6_EXT_SHORT, nh, off)
            if nh == 43 and p[off + 3] != 0:
                rc = _final_destination(p, off, hlen, &r.dst, r)
                if rc:
                    return rc
            nh = p[off]
            off += hlen
    else:
        return _fail(r, E_VERSION, version, 0)
    if end - off < 8:
        return _fail(r, E_UDP_SHORT, end - off, 0)
    r.sport = get16(p + off)
    r.dport = get16(p + off + 2)
    ulen = get16(p + off + 4)
    field = get16(p + off + 6)
    if ulen != end - off:
        return _fail(r, E_UDP_LENGTH, ulen, end - off)
    if field == 0:
        if r.is_v6:
            return _fail(r, E_UDP_ZERO6, 0, 0)
    else:
        s = udp_pseudo_sum(r.is_v6, r.src, r.dst, ulen)
        f = csum_fold(csum_partial(p + off, ulen, s))
        if f != 0xffff:
            f = ~_fold16(f + (~field & 0xffff)) & 0xffff
            return _fail(r, E_UDP_CHECKSUM, field, f if f else 0xffff)
    r.start = off + 8
    r.end = end
    return 0


def parse_udp(packet):
    """Validate an IPv4 or IPv6 UDP packet and return (src, dst, payload).

    src/dst are (host, port) with the host as text, payload is bytes. Bytes beyond
    the IPv4 total length / IPv6 payload length are ignored. IPv4 options are skipped
    (not interpreted). IPv6 hop-by-hop (0), routing (43) and destination options (60)
    headers are followed to reach UDP; with a routing header that has segments left
    (types 0, 2 and 4), dst is the final destination and the UDP checksum is checked
    against it. A zero UDP checksum means "none" over IPv4 and is refused over IPv6.
    Raises ValueError whose message starts with the reason: "truncated",
    "bad IP version", "bad IPv4 header length", "bad IPv4 header checksum",
    "bad IPv4 total length", "fragmented", "not UDP", "bad IPv6 payload length",
    "bad IPv6 routing header", "bad UDP length" or "bad UDP checksum"
    (see PARSE_REASONS); TypeError if packet is not bytes-like.
    """
    cdef Py_buffer v
    cdef parsed_t r
    cdef int code
    _get_buffer(packet, &v, "packet", False)
    try:
        if v.len >= NOGIL_MIN:
            with nogil:
                code = _parse(<const uint8_t *>v.buf, <size_t>v.len, &r)
        else:
            code = _parse(<const uint8_t *>v.buf, <size_t>v.len, &r)
        if code:
            raise parse_error(code, r.a, r.b)
        return (ip_to_tuple(r.is_v6, r.src, r.sport), ip_to_tuple(r.is_v6, r.dst, r.dport),
                PyBytes_FromStringAndSize(<const char *>v.buf + r.start,
                                          <Py_ssize_t>(r.end - r.start)))
    finally:
        PyBuffer_Release(&v)


include "_batch.pxi"
