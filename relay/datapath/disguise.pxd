# cython: language_level=3
# The UDP disguise headers in C (the layouts and what is checked: relay/proto/disguise.py,
# whose KIND_IDS number the kinds as below). hdr_write() writes one sender's next header
# and advances its state; hdr_check() says whether a datagram starts with a valid one.
# The engine's side (which datagram gets or loses which header): disguise.pxi.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from relay.includes.system cimport iovec

cdef enum:
    HK_NONE = 0
    HK_NOOP = 1
    HK_SRTP = 2
    HK_UTP = 3
    HK_WECHAT = 4
    HK_WIREGUARD = 5
    HK_DTLS = 6
    HDR_MAX = 13                  # the largest header (wechat-video, dtls)
    HDR_STRIDE = 16               # bytes kept per header written outside the payload
    HDR_ROOM = 16                 # headroom in front of each received client datagram
    HDR_SEGS = 64                 # segments of a GRO buffer per message (the kernel's
                                  # UDP_GRO and older UDP_SEGMENT limit); more: a message each
    HDR_XIOV = 2 * HDR_SEGS + 2   # extra iovecs one GRO buffer may need (header + payload each)


cdef struct hdr_st_t:             # one sender's state (an association, one direction)
    uint32_t seq                  # srtp number, wechat-video sn, dtls sequence
    uint16_t ident                # utp connection id, dtls epoch
    uint16_t length               # dtls length field


cdef struct hdr_dir_t:            # one direction of a listener
    int kind                      # HK_*; HK_NONE and HK_NOOP change nothing
    uint32_t size                 # header bytes (0 when the direction is off)
    hdr_st_t *st                  # per association slot; [cap] is a spare one


cdef struct hdr_t:
    hdr_dir_t out                 # --header-out: added towards upstream, stripped from replies
    hdr_dir_t inn                 # --header-in: stripped from clients, added to replies
    bint up                       # client -> upstream changes datagrams (either side on)
    bint down                     # upstream -> client changes datagrams
    uint64_t rng                  # xorshift64* state for the random starts
    uint8_t *scratch              # headers of GRO segments, HDR_STRIDE per iovec slot
    hdr_st_t *ry_st               # reply slot: the state its GRO segments' headers start from
    uint32_t max_up               # largest payload towards upstream with its header
    uint32_t max_down[2]          # ... towards an IPv4, an IPv6 client
    int tx_iovs                   # iovecs of the engine's upstream (tx) and reply (out)
    int out_iovs                  # send lists; scratch holds a header for each


cdef inline uint64_t hdr_rand(hdr_t *h) noexcept nogil:
    cdef uint64_t x = h.rng
    x ^= x >> 12
    x ^= x << 25
    x ^= x >> 27
    h.rng = x
    return x * 0x2545F4914F6CDD1DULL


cdef inline void hdr_st_init(hdr_t *h, int kind, hdr_st_t *s) noexcept nogil:
    """A new sender: random start number and id, dtls sequence 0 and length 17 (v2ray's)."""
    cdef uint64_t r = hdr_rand(h)
    s.seq = 0 if kind == HK_DTLS else <uint32_t>(r & 0xffff)
    s.ident = <uint16_t>((r >> 16) & 0xffff)
    s.length = 17


cdef inline void hdr_write(int kind, hdr_st_t *s, uint8_t *b) noexcept nogil:
    if kind == HK_SRTP:
        s.seq = (s.seq + 1) & 0xffff
        b[0] = 0xb5; b[1] = 0xe8
        b[2] = <uint8_t>(s.seq >> 8); b[3] = <uint8_t>s.seq
    elif kind == HK_UTP:
        b[0] = <uint8_t>(s.ident >> 8); b[1] = <uint8_t>s.ident
        b[2] = 1; b[3] = 0
    elif kind == HK_WECHAT:
        s.seq += 1
        b[0] = 0xa1; b[1] = 0x08
        b[2] = <uint8_t>(s.seq >> 24); b[3] = <uint8_t>(s.seq >> 16)
        b[4] = <uint8_t>(s.seq >> 8); b[5] = <uint8_t>s.seq
        b[6] = 0x00; b[7] = 0x10; b[8] = 0x11; b[9] = 0x18
        b[10] = 0x30; b[11] = 0x22; b[12] = 0x30
    elif kind == HK_WIREGUARD:
        b[0] = 4; b[1] = 0; b[2] = 0; b[3] = 0
    elif kind == HK_DTLS:
        b[0] = 23; b[1] = 254; b[2] = 253
        b[3] = <uint8_t>(s.ident >> 8); b[4] = <uint8_t>s.ident
        b[5] = 0; b[6] = 0
        b[7] = <uint8_t>(s.seq >> 24); b[8] = <uint8_t>(s.seq >> 16)
        b[9] = <uint8_t>(s.seq >> 8); b[10] = <uint8_t>s.seq
        s.seq += 1
        b[11] = <uint8_t>(s.length >> 8); b[12] = <uint8_t>s.length
        s.length += 17
        if s.length > 100:
            s.length -= 50


cdef inline void hdr_skip(int kind, hdr_st_t *s, uint32_t count) noexcept nogil:
    """Advance s as count hdr_write() calls would (headers written later from a copy)."""
    cdef uint8_t scratch[HDR_STRIDE]
    cdef uint32_t i
    if kind == HK_SRTP or kind == HK_WECHAT:
        s.seq = (s.seq + count) & (0xffff if kind == HK_SRTP else 0xffffffffu)
    elif kind == HK_DTLS:
        for i in range(count):
            hdr_write(kind, s, scratch)


cdef inline bint hdr_check(int kind, const uint8_t *b, size_t n) noexcept nogil:
    """Whether the n bytes at b start with a valid header of kind (n may be shorter)."""
    cdef uint32_t length
    if kind == HK_SRTP:
        return n >= 4 and b[0] == 0xb5 and b[1] == 0xe8
    if kind == HK_UTP:
        return n >= 4 and b[2] == 1 and b[3] == 0
    if kind == HK_WECHAT:
        return (n >= 13 and b[0] == 0xa1 and b[1] == 0x08 and b[6] == 0x00 and b[7] == 0x10
                and b[8] == 0x11 and b[9] == 0x18 and b[10] == 0x30 and b[11] == 0x22
                and b[12] == 0x30)
    if kind == HK_WIREGUARD:
        return n >= 4 and b[0] == 4 and b[1] == 0 and b[2] == 0 and b[3] == 0
    if kind == HK_DTLS:
        if n < 13 or b[0] != 23 or b[1] != 254 or b[2] != 253 or b[5] != 0 or b[6] != 0:
            return False
        length = (<uint32_t>b[11] << 8) | b[12]
        return 17 <= length <= 100
    return True
