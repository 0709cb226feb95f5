"""Pure-Python packet API: the fallback of ``relay.packet._fast``, with the same names,
signatures, results and error messages.

``inet_checksum``   RFC 1071 Internet checksum of a buffer
``checksum_update`` RFC 1624 incremental checksum update for a replaced field
``build_udp``       a complete IPv4+UDP or IPv6+UDP packet as bytes
``build_udp_into``  the same, written into a caller's buffer
``build_udp_fragments`` the packets (one, or the fragments) carrying it over an MTU
``build_icmp_unreachable`` the ICMP/ICMPv6 port unreachable error answering a datagram
``parse_udp``       validate an IPv4/IPv6 UDP packet, return (src, dst, payload)

This module also holds the one table of ``parse_udp`` error reasons and messages: the
extension raises its errors through :func:`parse_error`, so both implementations give
byte-identical messages. Every message starts with one of the reason strings below.

The checksum arithmetic uses the identity behind RFC 1071: the one's complement sum
of the 16-bit big-endian words of a byte string equals the string read as one big
integer modulo 0xFFFF (2**16 == 1 mod 0xFFFF), with 0xFFFF standing for a nonzero
multiple of 0xFFFF. ``int.from_bytes`` and ``%`` do the whole sum in C.
"""
import socket as _socket
import struct as _struct

from relay.errors import PacketTooBig

__all__ = [
    "inet_checksum", "checksum_update", "build_udp", "build_udp_into", "build_udp_fragments",
    "build_icmp_unreachable", "parse_udp", "MAX_IPV4_PAYLOAD", "MAX_IPV6_PAYLOAD", "BatchSocket",
]

MAX_IPV4_PAYLOAD = 65507     # 65535 - 20 (IPv4 header) - 8 (UDP header)
MAX_IPV6_PAYLOAD = 65527     # 65535 (payload length field) - 8 (UDP header)
IPV4_MIN_MTU = 68            # RFC 791
IPV6_MIN_MTU = 1280          # RFC 8200
IPV4_MAX_PACKET = 65535      # total length field
IPV6_MAX_PACKET = 65575      # 40-byte header + payload length field
ICMP4_ERROR_MAX = 576        # RFC 1812 4.3.2.3: an ICMP error's largest size
ICMP6_ERROR_MAX = 1280       # RFC 4443 2.4(c)

# -- parse_udp error reasons: every ValueError message starts with one of these ----------
TRUNCATED = "truncated"
BAD_VERSION = "bad IP version"
BAD_IHL = "bad IPv4 header length"
BAD_IPV4_CHECKSUM = "bad IPv4 header checksum"
BAD_TOTAL_LENGTH = "bad IPv4 total length"
FRAGMENTED = "fragmented"
NOT_UDP = "not UDP"
BAD_IPV6_PAYLOAD_LENGTH = "bad IPv6 payload length"
BAD_ROUTING_HEADER = "bad IPv6 routing header"
BAD_UDP_LENGTH = "bad UDP length"
BAD_UDP_CHECKSUM = "bad UDP checksum"

PARSE_REASONS = (
    TRUNCATED, BAD_VERSION, BAD_IHL, BAD_IPV4_CHECKSUM, BAD_TOTAL_LENGTH, FRAGMENTED,
    NOT_UDP, BAD_IPV6_PAYLOAD_LENGTH, BAD_ROUTING_HEADER, BAD_UDP_LENGTH, BAD_UDP_CHECKSUM,
)

# Error codes (the extension's parser returns the same numbers; a test checks that
# both implementations give identical messages for the same packets).
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

# code -> (reason, detail template over the two numbers a and b)
_ERRORS = {
    E_EMPTY: (TRUNCATED, "empty packet"),
    E_VERSION: (BAD_VERSION, "version {a}, expected 4 or 6"),
    E_V4_SHORT: (TRUNCATED, "IPv4 header needs {a} bytes, {b} given"),
    E_V4_IHL: (BAD_IHL, "IHL {a} is below 5"),
    E_V4_CHECKSUM: (BAD_IPV4_CHECKSUM, "checksum field 0x{a:04x}, expected 0x{b:04x}"),
    E_V4_TOTLEN_SMALL: (BAD_TOTAL_LENGTH, "total length {a} is below the header length {b}"),
    E_V4_TOTLEN_BIG: (TRUNCATED, "IPv4 total length {a}, {b} bytes given"),
    E_V4_PROTO: (NOT_UDP, "IPv4 protocol {a}"),
    E_V4_FRAG: (FRAGMENTED, "IPv4 fragment offset {a}, more fragments {b}"),
    E_V6_SHORT: (TRUNCATED, "IPv6 header needs 40 bytes, {b} given"),
    E_V6_JUMBO: (BAD_IPV6_PAYLOAD_LENGTH, "payload length 0 (jumbograms are not supported)"),
    E_V6_PLEN_BIG: (TRUNCATED, "IPv6 payload length {a}, {b} bytes given after the header"),
    E_V6_EXT_SHORT: (TRUNCATED, "IPv6 extension header {a} runs past the payload at offset {b}"),
    E_V6_FRAG: (FRAGMENTED, "IPv6 fragment header at offset {b}"),
    E_V6_ROUTING: (BAD_ROUTING_HEADER, "routing type {a} with {b} segments left"),
    E_V6_NEXT: (NOT_UDP, "IPv6 next header {a}"),
    E_UDP_SHORT: (TRUNCATED, "UDP header needs 8 bytes, {a} given"),
    E_UDP_LENGTH: (BAD_UDP_LENGTH, "UDP length {a}, IP payload {b} bytes"),
    E_UDP_CHECKSUM: (BAD_UDP_CHECKSUM, "checksum field 0x{a:04x}, expected 0x{b:04x}"),
    E_UDP_ZERO6: (BAD_UDP_CHECKSUM, "zero checksum is not allowed over IPv6"),
}


def parse_error(code, a=0, b=0):
    """The ValueError for parse error `code` with detail numbers a and b."""
    reason, detail = _ERRORS[code]
    return ValueError(f"{reason}: {detail.format(a=a, b=b)}")


class _ParseFailure(Exception):
    def __init__(self, code, a=0, b=0):
        self.code, self.a, self.b = code, a, b


# -- argument checks (same messages as the extension) ------------------------------------

def _view(obj, name):
    """A flat unsigned-byte memoryview of a bytes-like obj (read-only is fine)."""
    try:
        mv = memoryview(obj)
    except TypeError:
        raise TypeError(f"{name} must be a bytes-like object, not {type(obj).__name__}") from None
    if not mv.c_contiguous:
        raise ValueError(f"{name} must be a contiguous buffer")
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv


def _int_arg(value, name, lo, hi):
    if not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < lo or value > hi:
        raise ValueError(f"{name} out of range {lo}-{hi}: {value}")
    return int(value)


def _ip_of(addr, name):
    """(is_v6, packed address, port) of a (host, port) tuple with an IP literal host."""
    if not isinstance(addr, tuple) or not 2 <= len(addr) <= 4:
        raise TypeError(f"{name} must be a (host, port) tuple, not {addr!r}")
    host, port = addr[0], addr[1]
    if isinstance(host, bytes):
        hb = host
    elif isinstance(host, str):
        hb = host.encode("utf-8", "replace")
    else:
        raise TypeError(f"{name} host must be str, not {type(host).__name__}")
    if not isinstance(port, int):
        raise TypeError(f"{name} port must be an int, not {type(port).__name__}")
    if port < 0 or port > 65535:
        raise ValueError(f"{name} port out of range 0-65535: {port}")
    if b"\0" not in hb and hb.isascii():     # every IP literal is ASCII
        text = hb.decode("ascii")
        try:
            return False, _socket.inet_pton(_socket.AF_INET, text), int(port)
        except OSError:
            pass
        try:
            return True, _socket.inet_pton(_socket.AF_INET6, text), int(port)
        except OSError:
            pass
    raise ValueError(f"{name} host is not an IPv4 or IPv6 address literal: {addr[0]!r}")


# -- checksum arithmetic ------------------------------------------------------------------

def _fold(n):
    """End-around-carry fold of a nonnegative integer's 16-bit words: 0 only for 0."""
    s = n % 0xFFFF
    return 0xFFFF if s == 0 and n else s


def _sum(mv):
    """The sum of mv's 16-bit big-endian words (odd length: zero-padded) as an int."""
    n = int.from_bytes(mv, "big")
    return n << 8 if len(mv) & 1 else n


def inet_checksum(buf):
    """RFC 1071 Internet checksum of a bytes-like object (bytes, bytearray, memoryview,
    array...; odd lengths are zero-padded). Returns the 16-bit value that goes in a
    header field as an int, so a buffer that includes a correct checksum gives 0."""
    return ~_fold(_sum(_view(buf, "buf"))) & 0xFFFF


def checksum_update(csum, old, new):
    """RFC 1624 (eqn. 3) update of checksum `csum` after a field changed from old to new.

    old/new are ints 0..0xFFFF for a 16-bit field or up to 0xFFFFFFFF for a 32-bit
    field (two 16-bit words, big-endian), or equal-length bytes-like objects of even
    length (e.g. 16-byte IPv6 addresses). Returns the new checksum. A UDP checksum of
    0 must go out as 0xFFFF: map a result of 0 before writing it into a UDP header.
    """
    csum = _int_arg(csum, "csum", 0, 0xFFFF)
    o_int, n_int = isinstance(old, int), isinstance(new, int)
    if o_int and n_int:
        o = _int_arg(old, "old", 0, 0xFFFFFFFF)
        n = _int_arg(new, "new", 0, 0xFFFFFFFF)
        fo = _fold((o >> 16) + (o & 0xFFFF))
        fn = _fold((n >> 16) + (n & 0xFFFF))
    elif o_int or n_int:
        raise TypeError("old and new must both be ints or both be bytes-like objects")
    else:
        ov, nv = _view(old, "old"), _view(new, "new")
        if len(ov) != len(nv):
            raise ValueError(f"old and new differ in length: {len(ov)} != {len(nv)}")
        if len(ov) & 1:
            raise ValueError(f"old and new must have an even length, not {len(ov)}")
        fo, fn = _fold(_sum(ov)), _fold(_sum(nv))
    s = (~csum & 0xFFFF) + (~fo & 0xFFFF) + fn
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


# -- build --------------------------------------------------------------------------------

def _prepare(src, dst, payload, ttl, tos, ident, flowlabel):
    v6s, sip, sport = _ip_of(src, "src")
    v6d, dip, dport = _ip_of(dst, "dst")
    if v6s != v6d:
        raise ValueError("src and dst address families differ (IPv4 and IPv6)")
    pv = _view(payload, "payload")
    ttl = _int_arg(ttl, "ttl", 0, 255)
    tos = _int_arg(tos, "tos", 0, 255)
    ident = _int_arg(ident, "ident", 0, 0xFFFF)
    flowlabel = _int_arg(flowlabel, "flowlabel", 0, 0xFFFFF)
    plen = len(pv)
    if v6s and plen > MAX_IPV6_PAYLOAD:
        raise PacketTooBig(f"payload of {plen} bytes exceeds the IPv6 maximum of "
                           f"{MAX_IPV6_PAYLOAD}", size=plen + 48, limit="IPv6 maximum")
    if not v6s and plen > MAX_IPV4_PAYLOAD:
        raise PacketTooBig(f"payload of {plen} bytes exceeds the IPv4 maximum of "
                           f"{MAX_IPV4_PAYLOAD}", size=plen + 28, limit="IPv4 maximum")
    return v6s, sip, sport, dip, dport, pv, ttl, tos, ident, flowlabel


def _ip_header(v6, sip, dip, length, proto, ttl, tos, ident, frag, flowlabel):
    """IPv4 header (20 B, checksum included; frag: flags + fragment offset) or IPv6
    header (40 B; proto is the next header) for length bytes after it."""
    if v6:
        return _struct.pack("!IHBB16s16s", (6 << 28) | (tos << 20) | flowlabel,
                            length, proto, ttl, sip, dip)
    ip = _struct.pack("!BBHHHBBH4s4s", 0x45, tos, 20 + length, ident, frag, ttl, proto, 0,
                      sip, dip)
    csum = ~_fold(int.from_bytes(ip, "big")) & 0xFFFF
    return ip[:10] + csum.to_bytes(2, "big") + ip[12:]


def _headers(v6, sip, sport, dip, dport, pv, ttl, tos, ident, df, flowlabel):
    """IPv4 (20 B) or IPv6 (40 B) header + UDP header (8 B), checksums included."""
    udp_len = 8 + len(pv)
    ip = _ip_header(v6, sip, dip, udp_len, 17, ttl, tos, ident, 0x4000 if df else 0, flowlabel)
    if v6:
        pseudo = _struct.pack("!16s16sII", sip, dip, udp_len, 17)
    else:
        pseudo = _struct.pack("!4s4sHH", sip, dip, 17, udp_len)
    udp = _struct.pack("!HHHH", sport, dport, udp_len, 0)
    # pseudo-header and UDP header have even lengths, so the sums just add up
    csum = ~_fold(int.from_bytes(pseudo + udp, "big") + _sum(pv)) & 0xFFFF
    return ip + udp[:6] + (csum or 0xFFFF).to_bytes(2, "big")


def check_mtu(mtu, v6):
    """mtu checked against the family's minimum, capped at 65575 (the largest packet:
    IPv6, 40 + 65535 bytes)."""
    if not isinstance(mtu, int):
        raise TypeError(f"mtu must be an int, not {type(mtu).__name__}")
    low = IPV6_MIN_MTU if v6 else IPV4_MIN_MTU
    if mtu < low:
        raise ValueError(f"mtu of {mtu} bytes is below the {'IPv6' if v6 else 'IPv4'} "
                         f"minimum of {low}")
    return min(int(mtu), IPV6_MAX_PACKET)


def fragment_headers(v6, sip, dip, udp, plen, mtu, ident, ttl, tos=0, flowlabel=0):
    """The fragments of a datagram (UDP header udp, checksum done, + plen payload bytes)
    at mtu, as (header, start, end): each fragment is header + payload[start:end], the
    first one's header ending with the UDP header (see build_udp_fragments)."""
    chunk = (min(mtu, IPV6_MAX_PACKET if v6 else IPV4_MAX_PACKET) - (48 if v6 else 20)) & ~7
    udp_len = 8 + plen
    for off in range(0, udp_len, chunk):
        n = min(chunk, udp_len - off)
        more = off + n < udp_len
        if v6:
            hdr = _ip_header(True, sip, dip, 8 + n, 44, ttl, tos, 0, 0, flowlabel) + \
                _struct.pack("!BBHI", 17, 0, off | more, ident)
        else:
            hdr = _ip_header(False, sip, dip, n, 17, ttl, tos, ident & 0xFFFF,
                             (off >> 3) | (0x2000 if more else 0), 0)
        if off == 0:
            yield hdr + udp, 0, n - 8
        else:
            yield hdr, off - 8, off - 8 + n


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
    v6, sip, sport, dip, dport, pv, ttl, tos, ident, flowlabel = _prepare(
        src, dst, payload, ttl, tos, ident, flowlabel)
    return _headers(v6, sip, sport, dip, dport, pv, ttl, tos, ident, df, flowlabel) + pv


def build_udp_into(buffer, offset, src, dst, payload, *, ttl=64, tos=0, ident=0, df=True,
                   flowlabel=0):
    """Write the packet build_udp() would return into the writable buffer at offset,
    without allocating a packet object, and return its length. The payload may lie
    inside buffer (e.g. already in place after room left for the headers). Raises
    ValueError when it does not fit, naming the bytes needed; otherwise the same
    errors as build_udp().
    """
    try:
        bv = memoryview(buffer)
    except TypeError:
        raise TypeError(f"buffer must be a bytes-like object, not {type(buffer).__name__}") from None
    if not bv.c_contiguous:
        raise ValueError("buffer must be a contiguous buffer")
    if bv.readonly:
        raise TypeError("buffer must be writable")
    if bv.ndim != 1 or bv.format != "B":
        bv = bv.cast("B")
    if not isinstance(offset, int):
        raise TypeError(f"offset must be an int, not {type(offset).__name__}")
    if offset < 0:
        raise ValueError(f"offset must be >= 0, not {offset}")
    v6, sip, sport, dip, dport, pv, ttl, tos, ident, flowlabel = _prepare(
        src, dst, payload, ttl, tos, ident, flowlabel)
    size = (48 if v6 else 28) + len(pv)
    if offset + size > len(bv):
        raise ValueError(f"buffer too small: the packet needs {size} bytes at offset {offset}, "
                         f"the buffer has {max(len(bv) - offset, 0)} bytes there")
    data = bytes(pv)        # the payload may overlap the destination
    hdr = _headers(v6, sip, sport, dip, dport, data, ttl, tos, ident, df, flowlabel)
    bv[offset + len(hdr):offset + size] = data
    bv[offset:offset + len(hdr)] = hdr
    return size


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
    v6, sip, sport, dip, dport, pv, ttl, tos, _, flowlabel = _prepare(
        src, dst, payload, ttl, tos, 0, flowlabel)
    ident = _int_arg(ident, "ident", 0, 0xFFFFFFFF if v6 else 0xFFFF)
    mtu = check_mtu(mtu, v6)
    hdr = _headers(v6, sip, sport, dip, dport, pv, ttl, tos, ident & 0xFFFF, False, flowlabel)
    if len(hdr) + len(pv) <= mtu:
        return [hdr + pv]
    return [h + pv[a:b] for h, a, b in fragment_headers(v6, sip, dip, hdr[-8:], len(pv), mtu, ident,
                                                 ttl, tos, flowlabel)]


def build_icmp_unreachable(src, dst, payload, *, ttl=64, ident=0):
    """The ICMP (IPv4: type 3 code 3) or ICMPv6 (type 1 code 4) port unreachable error
    answering the UDP datagram build_udp(src, dst, payload) would be, as bytes: from dst's
    host to src's host, quoting that datagram's IP header (TTL 64, DF set), its UDP header
    (the checksum over the whole payload) and as much payload as keeps the error within
    576 bytes (IPv4, RFC 1812) or 1280 bytes (IPv6, RFC 4443). ttl is the error's own TTL
    (hop limit), ident its IPv4 identification (DF clear). Checksums: the IPv4 headers',
    the ICMP message's, ICMPv6's over its pseudo-header. Errors are build_udp()'s.
    """
    v6, sip, sport, dip, dport, pv, ttl, _, ident, _ = _prepare(
        src, dst, payload, ttl, 0, ident, 0)
    quoted = _headers(v6, sip, sport, dip, dport, pv, 64, 0, 0, True, 0)
    room = (ICMP6_ERROR_MAX - 40 if v6 else ICMP4_ERROR_MAX - 20) - 8 - len(quoted)
    quoted += pv[:room]
    icmp_len = 8 + len(quoted)
    icmp = bytes((1, 4) if v6 else (3, 3)) + bytes(6) + quoted
    pseudo = _struct.pack("!16s16sII", dip, sip, icmp_len, 58) if v6 else b""
    csum = ~_fold(int.from_bytes(pseudo, "big") + _sum(icmp)) & 0xFFFF
    ip = _ip_header(v6, dip, sip, icmp_len, 58 if v6 else 1, ttl, 0, ident, 0, 0)
    return ip + icmp[:2] + csum.to_bytes(2, "big") + icmp[4:]


# -- parse --------------------------------------------------------------------------------

def _parse(p):
    """Validate packet p (a flat memoryview); returns (is_v6, src, dst, sport, dport,
    payload start, payload end) or raises _ParseFailure(code, a, b)."""
    n = len(p)
    if n < 1:
        raise _ParseFailure(E_EMPTY)
    version = p[0] >> 4
    if version == 4:
        if n < 20:
            raise _ParseFailure(E_V4_SHORT, 20, n)
        ihl = (p[0] & 15) * 4
        if ihl < 20:
            raise _ParseFailure(E_V4_IHL, ihl // 4)
        if ihl > n:
            raise _ParseFailure(E_V4_SHORT, ihl, n)
        s = int.from_bytes(p[:ihl], "big")
        if _fold(s) != 0xFFFF:
            field = (p[10] << 8) | p[11]
            raise _ParseFailure(E_V4_CHECKSUM, field, ~_fold(s + (~field & 0xFFFF)) & 0xFFFF)
        total = (p[2] << 8) | p[3]
        if total < ihl:
            raise _ParseFailure(E_V4_TOTLEN_SMALL, total, ihl)
        if total > n:
            raise _ParseFailure(E_V4_TOTLEN_BIG, total, n)
        if p[9] != 17:
            raise _ParseFailure(E_V4_PROTO, p[9])
        frag = (p[6] << 8) | p[7]
        if frag & 0x3FFF:
            raise _ParseFailure(E_V4_FRAG, frag & 0x1FFF, (frag >> 13) & 1)
        src, dst = bytes(p[12:16]), bytes(p[16:20])
        off, end, v6 = ihl, total, False
        pseudo = src + dst
    elif version == 6:
        if n < 40:
            raise _ParseFailure(E_V6_SHORT, 40, n)
        plen = (p[4] << 8) | p[5]
        if plen == 0:
            raise _ParseFailure(E_V6_JUMBO)
        if 40 + plen > n:
            raise _ParseFailure(E_V6_PLEN_BIG, plen, n - 40)
        src, dst = bytes(p[8:24]), bytes(p[24:40])
        final = dst
        nh, off, end, v6 = p[6], 40, 40 + plen, True
        while nh != 17:
            if nh == 44:
                raise _ParseFailure(E_V6_FRAG, 0, off)
            if nh not in (0, 43, 60):
                raise _ParseFailure(E_V6_NEXT, nh)
            if end - off < 8:
                raise _ParseFailure(E_V6_EXT_SHORT, nh, off)
            hlen = (p[off + 1] + 1) * 8
            if hlen > end - off:
                raise _ParseFailure(E_V6_EXT_SHORT, nh, off)
            if nh == 43 and p[off + 3]:
                final = _final_destination(p, off, hlen, final)
            nh = p[off]
            off += hlen
        pseudo = src + final
        dst = final
    else:
        raise _ParseFailure(E_VERSION, version)
    if end - off < 8:
        raise _ParseFailure(E_UDP_SHORT, end - off)
    sport = (p[off] << 8) | p[off + 1]
    dport = (p[off + 2] << 8) | p[off + 3]
    ulen = (p[off + 4] << 8) | p[off + 5]
    field = (p[off + 6] << 8) | p[off + 7]
    if ulen != end - off:
        raise _ParseFailure(E_UDP_LENGTH, ulen, end - off)
    if field == 0:
        if v6:
            raise _ParseFailure(E_UDP_ZERO6)
    else:
        extra = (ulen << 32) | 17 if v6 else (17 << 16) | ulen
        s = int.from_bytes(pseudo, "big") + extra + _sum(p[off:end])
        if _fold(s) != 0xFFFF:
            expect = ~_fold(s + (~field & 0xFFFF)) & 0xFFFF
            raise _ParseFailure(E_UDP_CHECKSUM, field, expect or 0xFFFF)
    return v6, src, dst, sport, dport, off + 8, end


def _final_destination(p, off, hlen, final):
    """The final destination named by the routing header at off with segments left > 0
    (RFC 8200 8.1: the UDP pseudo-header uses it)."""
    rtype, left = p[off + 2], p[off + 3]
    count = (hlen - 8) // 16
    if rtype in (0, 2):            # type 0 (deprecated) and 2 (Mobile IPv6): last address
        if hlen != 8 + 16 * count or count == 0 or left > count:
            raise _ParseFailure(E_V6_ROUTING, rtype, left)
        last = off + 8 + 16 * (count - 1)
        return bytes(p[last:last + 16])
    if rtype == 4:                 # segment routing (RFC 8754): segment list[0]
        if count == 0 or p[off + 4] >= count or left > p[off + 4]:
            raise _ParseFailure(E_V6_ROUTING, rtype, left)
        return bytes(p[off + 8:off + 24])
    raise _ParseFailure(E_V6_ROUTING, rtype, left)


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
    p = _view(packet, "packet")
    try:
        v6, src, dst, sport, dport, start, end = _parse(p)
    except _ParseFailure as e:
        raise parse_error(e.code, e.a, e.b) from None
    family = _socket.AF_INET6 if v6 else _socket.AF_INET
    return ((_socket.inet_ntop(family, src), sport), (_socket.inet_ntop(family, dst), dport),
            bytes(p[start:end]))


from relay.packet.pure.batch import BatchSocket  # noqa: E402  (after the definitions above)
