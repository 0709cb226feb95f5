"""The small IP stack of `relay tun`, in pure Python: what a packet read from the TUN is
(IPv4/IPv6, UDP or not, a fragment or whole, well formed or not) and IP fragment
reassembly, bounded in memory, datagrams and time, overlaps refused (RFC 5722).

``classify(pkt, csum_valid)`` returns one of
  (UDP, v6, src, dst, l4)         a whole UDP datagram: l4 is its UDP header + payload
  (FRAG, v6, src, dst, key, off, more, data)   a fragment of a UDP datagram
  (OTHER, proto)                  not UDP (TCP, ICMP, ...)
and raises BadPacket(reason) for what is malformed. src and dst are address bytes.
``udp_check(v6, src, dst, l4, csum_valid)`` checks a UDP header (lengths, checksum)."""
from relay.packet import inet_checksum

UDP, FRAG, OTHER = 0, 1, 2
PROTO_UDP = 17
V6_EXT = (0, 43, 60)            # hop-by-hop, routing, destination options: skipped
V6_FRAG = 44
V6_NONE = 59
MAX_V4_TOTAL = 65535
MAX_V6_FRAGMENTABLE = 65535     # the payload length field's reach
FRAG_TIMEOUT = 30.0             # seconds a datagram may take to arrive (Linux ipfrag_time)
FRAG_MEMORY = 4 << 20           # bytes of fragments held per worker at most
FRAG_DATAGRAMS = 1024           # datagrams being reassembled at most
FRAG_PIECES = 2048              # fragments of one datagram at most


class BadPacket(ValueError):
    """A malformed packet; args[0] is the reason."""


def check_relay_args(batch, max_associations, timeout, mtu):
    """TunRelay's arguments, checked the same for the compiled and the pure one."""
    if not 1 <= batch <= 1024:
        raise ValueError(f"batch must be 1-1024, not {batch}")
    if max_associations < 1:
        raise ValueError("max_associations must be at least 1")
    if timeout <= 0:
        raise ValueError("timeouts must be positive")
    if not 1280 <= mtu <= 65535:
        raise ValueError(f"mtu must be 1280-65535, not {mtu}")


def _sum16(b):
    return inet_checksum(b)


def pseudo_ok(v6, src, dst, l4):
    """Whether a UDP datagram's checksum is right (over the pseudo-header)."""
    n = len(l4)
    if v6:
        pseudo = src + dst + n.to_bytes(4, "big") + b"\0\0\0\x11"
    else:
        pseudo = src + dst + b"\0\x11" + n.to_bytes(2, "big")
    return inet_checksum(pseudo + bytes(l4)) == 0


def classify(pkt, csum_valid=False):
    n = len(pkt)
    if n < 1:
        raise BadPacket("empty")
    version = pkt[0] >> 4
    if version == 4:
        if n < 20:
            raise BadPacket("IPv4 header truncated")
        ihl = (pkt[0] & 15) * 4
        if ihl < 20 or ihl > n:
            raise BadPacket("bad IPv4 header length")
        total = (pkt[2] << 8) | pkt[3]
        if total < ihl or total > n:
            raise BadPacket("bad IPv4 total length")
        if _sum16(pkt[:ihl]) != 0:
            raise BadPacket("bad IPv4 header checksum")
        proto = pkt[9]
        if proto != PROTO_UDP:
            return (OTHER, proto)
        src, dst = bytes(pkt[12:16]), bytes(pkt[16:20])
        frag = (pkt[6] << 8) | pkt[7]
        off, more = (frag & 0x1FFF) * 8, bool(frag & 0x2000)
        data = pkt[ihl:total]
        if off or more:
            if more and len(data) % 8:
                raise BadPacket("IPv4 fragment not a multiple of 8 bytes")
            key = (False, src, dst, (pkt[4] << 8) | pkt[5])
            return (FRAG, False, src, dst, key, off, more, data)
        return (UDP, False, src, dst, data)
    if version == 6:
        if n < 40:
            raise BadPacket("IPv6 header truncated")
        plen = (pkt[4] << 8) | pkt[5]
        if plen == 0 or 40 + plen > n:
            raise BadPacket("bad IPv6 payload length")
        src, dst = bytes(pkt[8:24]), bytes(pkt[24:40])
        nh, pos, end = pkt[6], 40, 40 + plen
        frag = None
        while nh != PROTO_UDP:
            if nh == V6_FRAG:
                if frag is not None or end - pos < 8:
                    raise BadPacket("bad IPv6 fragment header")
                fo = (pkt[pos + 2] << 8) | pkt[pos + 3]
                frag = ((fo >> 3) * 8, bool(fo & 1), int.from_bytes(pkt[pos + 4:pos + 8], "big"))
                nh = pkt[pos]
                pos += 8
                if frag[0]:         # not the first: what follows is payload, not headers
                    break
                continue
            if nh not in V6_EXT:
                return (OTHER, nh)
            if end - pos < 8:
                raise BadPacket("IPv6 extension header truncated")
            hlen = (pkt[pos + 1] + 1) * 8
            if hlen > end - pos:
                raise BadPacket("IPv6 extension header truncated")
            nh = pkt[pos]
            pos += hlen
        if frag is None:
            return (UDP, True, src, dst, pkt[pos:end])
        if nh != PROTO_UDP:
            return (OTHER, nh)
        off, more, ident = frag
        data = pkt[pos:end]
        if more and len(data) % 8:
            raise BadPacket("IPv6 fragment not a multiple of 8 bytes")
        # the first fragment: its UDP header begins the datagram (reassembly rebuilds the
        # unfragmentable part as the plain header, extension headers dropped)
        return (FRAG, True, src, dst, (True, src, dst, ident), off, more, data)
    raise BadPacket(f"IP version {version}")


def udp_check(v6, src, dst, l4, csum_valid=False):
    """Raise BadPacket unless l4 is a whole UDP datagram (header, length, checksum)."""
    n = len(l4)
    if n < 8:
        raise BadPacket("UDP header truncated")
    if ((l4[4] << 8) | l4[5]) != n:
        raise BadPacket("bad UDP length")
    if csum_valid:
        return
    field = (l4[6] << 8) | l4[7]
    if field == 0:
        if v6:
            raise BadPacket("zero UDP checksum over IPv6")
        return
    if not pseudo_ok(v6, src, dst, l4):
        raise BadPacket("bad UDP checksum")


class _Partial:
    __slots__ = ("pieces", "size", "total", "first", "born")

    def __init__(self, now):
        self.pieces = {}        # offset -> data
        self.size = 0           # bytes held
        self.total = None       # known once the last fragment came
        self.born = now


class Reassembler:
    """IPv4 and IPv6 fragments back into datagrams. Bounds: ``memory`` bytes held at most
    (the oldest datagrams go first, counted ``frag_dropped_memory``), ``datagrams`` at
    once, ``pieces`` per datagram, ``timeout`` seconds to complete (``frag_timeout``).
    A fragment overlapping another of its datagram drops the whole datagram and every
    fragment of it that comes later within the timeout (RFC 5722; ``frag_overlap``); an
    exact duplicate is ignored. ``count(name)`` bumps a counter."""

    def __init__(self, count, *, memory=FRAG_MEMORY, datagrams=FRAG_DATAGRAMS,
                 pieces=FRAG_PIECES, timeout=FRAG_TIMEOUT):
        self.count = count
        self.memory, self.datagrams, self.max_pieces, self.timeout = (
            memory, datagrams, pieces, timeout)
        self.partial = {}           # key -> _Partial, oldest first (dict order)
        self.dead = {}              # key -> expiry: datagrams refused for an overlap
        self.held = 0

    def __len__(self):
        return len(self.partial)

    def _drop(self, key, counter):
        p = self.partial.pop(key)
        self.held -= p.size
        if counter:
            self.count(counter)

    def add(self, key, off, more, data, now):
        """Take one fragment; returns the whole L4 payload when this one completed it."""
        if key in self.dead:
            if self.dead[key] > now:
                self.count("frag_overlap")
                return None
            del self.dead[key]
        n = len(data)
        limit = MAX_V6_FRAGMENTABLE if key[0] else MAX_V4_TOTAL - 20
        if off + n > limit:
            self.count("drop_malformed")
            return None
        p = self.partial.get(key)
        if p is None:
            if n > self.memory:
                self.count("frag_dropped_memory")
                return None
            while len(self.partial) >= self.datagrams:
                self._drop(next(iter(self.partial)), "frag_dropped_memory")
            p = self.partial[key] = _Partial(now)
        if (not more and p.total is not None and p.total != off + n) or \
                (p.total is not None and off + n > p.total) or \
                (not more and any(o + len(d) > off + n for o, d in p.pieces.items())):
            self._overlap(key, now)
            return None
        old = p.pieces.get(off)
        if old is not None and len(old) == n and bytes(old) == bytes(data):
            return None                                 # an exact duplicate
        for o, d in p.pieces.items():
            if o < off + n and off < o + len(d):
                self._overlap(key, now)
                return None
        if len(p.pieces) >= self.max_pieces:
            self._drop(key, "frag_dropped_memory")
            return None
        while self.held + n > self.memory and self.partial:
            oldest = next(iter(self.partial))
            self._drop(oldest, "frag_dropped_memory")
            if oldest == key:
                return None
        p.pieces[off] = bytes(data)
        p.size += n
        self.held += n
        if not more:
            p.total = off + n
        if p.total is None or p.size != p.total:
            return None
        self._drop(key, None)
        out = b"".join(p.pieces[o] for o in sorted(p.pieces))
        self.count("frag_reassembled")
        return out

    def _overlap(self, key, now):
        self._drop(key, "frag_overlap")
        if len(self.dead) >= self.datagrams:
            self.dead.pop(next(iter(self.dead)))
        self.dead[key] = now + self.timeout

    def expire(self, now):
        """Drop the datagrams older than the timeout (counted frag_timeout)."""
        while self.partial:
            key, p = next(iter(self.partial.items()))
            if p.born + self.timeout > now:
                break
            self._drop(key, "frag_timeout")
        while self.dead:
            key, until = next(iter(self.dead.items()))
            if until > now:
                break
            del self.dead[key]
