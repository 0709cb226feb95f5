"""UDP header disguise: the headers `--header-out` / `--header-in` put in front of datagrams.

The layouts are those of v2ray-core's packet headers (transport/internet/headers/*), so two
relays carry any UDP looking like another protocol on the wire. Each sender (here: each
association of a forward listener, per direction) keeps its own state, started at random
the way v2ray starts it. Sizes and bytes (numbers big-endian):

    noop          0   nothing
    srtp          4   B5 E8 | number:16      number + 1 before each datagram (random start)
    utp           4   connection id:16 | 01 00                 (random id, fixed per sender)
    wechat-video 13   A1 08 | sn:32 | 00 10 11 18 30 22 30  sn + 1 before each datagram
                                                                 (random 16-bit start)
    wireguard     4   04 00 00 00
    dtls         13   17 FE FD | epoch:16 | 00 00 | sequence:32 | length:16
                      (DTLS 1.2 application data record; random epoch fixed per sender,
                      sequence from 0, +1 after each; length from 17, +17 after each and
                      -50 once above 100, so always 17..100: v2ray's, not the payload's)

What a receiver checks (check()), per kind: srtp its two fixed bytes, utp its two fixed
bytes, wechat-video its nine fixed bytes, wireguard all four, dtls the content type, the
version (254.253), the two zero sequence bytes and a length field within 17..100 (what a
v2ray sender writes); noop nothing. Sequence numbers, ids and epochs are not checked: a
receiver cannot tell a lost datagram from a forged one. A datagram shorter than its header
fails. The C data path (relay/datapath/disguise.pxi) writes and checks the same bytes.
"""
import os
import struct

__all__ = ["KINDS", "SIZES", "KIND_IDS", "HeaderWriter", "check", "strip", "size"]

# Kind name -> header bytes; KIND_IDS is the number the data path uses (0: none).
SIZES = {"noop": 0, "srtp": 4, "utp": 4, "wechat-video": 13, "wireguard": 4, "dtls": 13}
KINDS = tuple(SIZES)
KIND_IDS = {name: i + 1 for i, name in enumerate(KINDS)}
MAX_SIZE = max(SIZES.values())

SRTP_MAGIC = b"\xb5\xe8"
UTP_TAIL = b"\x01\x00"
WECHAT_HEAD = b"\xa1\x08"
WECHAT_TAIL = b"\x00\x10\x11\x18\x30\x22\x30"
WIREGUARD = b"\x04\x00\x00\x00"
DTLS_HEAD = b"\x17\xfe\xfd"         # application data, DTLS 1.2
DTLS_LEN_FIRST, DTLS_LEN_STEP, DTLS_LEN_MAX, DTLS_LEN_BACK = 17, 17, 100, 50


def size(kind):
    """Header bytes of ``kind`` (ValueError for an unknown one)."""
    try:
        return SIZES[kind]
    except KeyError:
        raise ValueError(f"unknown header kind {kind!r} (known: {', '.join(KINDS)})") from None


def dtls_next_length(length):
    """The dtls length field after ``length`` (v2ray's fake record length)."""
    length += DTLS_LEN_STEP
    return length - DTLS_LEN_BACK if length > DTLS_LEN_MAX else length


class HeaderWriter:
    """The headers one sender puts in front of its datagrams, one per next() call.

    ``rand`` (bytes -> random bytes of that length, default os.urandom) draws the random
    start values; tests pass their own."""

    def __init__(self, kind, rand=os.urandom):
        self.kind = kind
        self.size = size(kind)
        r16 = int.from_bytes(rand(2), "big")
        self.number = r16           # srtp number, wechat-video sn
        self.ident = int.from_bytes(rand(2), "big")   # utp connection id, dtls epoch
        self.sequence = 0           # dtls
        self.length = DTLS_LEN_FIRST

    def next(self):
        k = self.kind
        if k == "noop":
            return b""
        if k == "srtp":
            self.number = (self.number + 1) & 0xFFFF
            return SRTP_MAGIC + struct.pack(">H", self.number)
        if k == "utp":
            return struct.pack(">H", self.ident) + UTP_TAIL
        if k == "wechat-video":
            self.number = (self.number + 1) & 0xFFFFFFFF
            return WECHAT_HEAD + struct.pack(">I", self.number) + WECHAT_TAIL
        if k == "wireguard":
            return WIREGUARD
        out = DTLS_HEAD + struct.pack(">HHIH", self.ident, 0, self.sequence, self.length)
        self.sequence = (self.sequence + 1) & 0xFFFFFFFF
        self.length = dtls_next_length(self.length)
        return out


def check(kind, data):
    """Does ``data`` (a datagram) start with a valid header of ``kind``?"""
    n = size(kind)
    if len(data) < n:
        return False
    h = bytes(data[:n])
    if kind == "noop":
        return True
    if kind == "srtp":
        return h[:2] == SRTP_MAGIC
    if kind == "utp":
        return h[2:] == UTP_TAIL
    if kind == "wechat-video":
        return h[:2] == WECHAT_HEAD and h[6:] == WECHAT_TAIL
    if kind == "wireguard":
        return h == WIREGUARD
    length = struct.unpack_from(">H", h, 11)[0]
    return (h[:3] == DTLS_HEAD and h[5:7] == b"\0\0"
            and DTLS_LEN_FIRST <= length <= DTLS_LEN_MAX)


def strip(kind, data):
    """The payload of ``data`` without its ``kind`` header, None when the header is invalid."""
    return bytes(data[size(kind):]) if check(kind, data) else None


def fields(kind, header):
    """The varying fields of a valid header as a dict (for tests and captures)."""
    if kind == "srtp":
        return {"number": struct.unpack_from(">H", header, 2)[0]}
    if kind == "utp":
        return {"ident": struct.unpack_from(">H", header, 0)[0]}
    if kind == "wechat-video":
        return {"number": struct.unpack_from(">I", header, 2)[0]}
    if kind == "dtls":
        epoch, _, seq, length = struct.unpack_from(">HHIH", header, 3)
        return {"ident": epoch, "sequence": seq, "length": length}
    return {}
