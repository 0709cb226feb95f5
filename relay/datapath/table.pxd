# cython: language_level=3
# A fixed-capacity hash table keyed by socket address, with an LRU list and a last-use
# time per entry. Used for the association table (client -> upstream socket) and for the
# cache of transparent reply sockets (remote -> bound socket). All memory is allocated
# once; no Python objects; no allocation per lookup.
#
# Idle timeouts: every entry is in one of TCLASSES timeout classes (class 0 unless
# table_set_class moves it), each with its own timeout and its own LRU list, so the entry
# idle the longest past its own timeout is always at the tail of its class: table_expired
# finds it in O(TCLASSES), whatever the mix of timeouts (per destination port: DNS short,
# games long). The one global LRU list (head/tail) still chooses whom a full table evicts.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from libc.stdlib cimport calloc, free
from relay.includes.system cimport (
    memcpy, memset, memcmp, AF_INET, AF_INET6, sockaddr_in, sockaddr_in6, htons, ntohs,
)
from relay.datapath.addr cimport sockaddr_any


cdef struct akey_t:
    # A canonical address: IPv4-mapped IPv6 addresses are stored as IPv4.
    uint16_t family
    uint16_t port            # network order
    uint8_t addr[16]         # 4 or 16 bytes used, rest zero


cdef enum:
    TCLASSES = 8             # timeout classes per table (0: the table's default timeout)


cdef struct entry_t:
    akey_t key
    akey_t aux               # a second address (the client's original destination, ...)
    int fd
    int32_t prev             # LRU: towards most recent
    int32_t next             # LRU: towards least recent
    int32_t cprev            # the LRU of its timeout class, same directions
    int32_t cnext
    int32_t hnext            # hash chain / free list
    uint32_t hash
    uint8_t used
    uint8_t tclass           # timeout class
    uint16_t mtu             # the MTU of the route to the key (the engine's MTU cache)
    uint8_t group            # the client's group for per-client counters (flows.pxd)
    double last
    double born              # when it was inserted (`relay flows`: age)
    uint64_t dg_out          # per-flow counters (flows.pxd): client -> remote
    uint64_t by_out
    uint64_t dg_in           # remote -> client
    uint64_t by_in


cdef struct table_t:
    entry_t *e
    int32_t *buckets
    int32_t cap
    int32_t count
    uint32_t mask
    uint32_t seed
    int32_t head             # most recently used
    int32_t tail             # least recently used
    int32_t free_head
    int32_t chead[TCLASSES]  # per timeout class: most and least recently used
    int32_t ctail[TCLASSES]
    double ctimeout[TCLASSES]
    uint8_t nclass           # classes in use: 1 keeps no class lists (the global LRU is it)


cdef inline bint is_v4mapped(const uint8_t *a) noexcept nogil:
    cdef int i
    for i in range(10):
        if a[i]:
            return False
    return a[10] == 0xff and a[11] == 0xff


cdef inline void akey_from_sockaddr(const sockaddr_any *sa, akey_t *k) noexcept nogil:
    memset(k, 0, sizeof(akey_t))
    if sa.sa.sa_family == AF_INET6:
        k.port = sa.v6.sin6_port
        if is_v4mapped(sa.v6.sin6_addr.s6_addr):
            k.family = AF_INET
            memcpy(k.addr, &sa.v6.sin6_addr.s6_addr[12], 4)
        else:
            k.family = AF_INET6
            memcpy(k.addr, sa.v6.sin6_addr.s6_addr, 16)
    elif sa.sa.sa_family == AF_INET:
        k.family = AF_INET
        k.port = sa.v4.sin_port
        memcpy(k.addr, &sa.v4.sin_addr, 4)


cdef inline int akey_to_sockaddr(const akey_t *k, int sock_family, sockaddr_any *out) noexcept nogil:
    """Fill out for a socket of sock_family (IPv4 keys become IPv4-mapped on AF_INET6
    sockets); returns the address length, or 0 if an IPv6 key cannot go on AF_INET."""
    memset(out, 0, sizeof(sockaddr_any))
    if sock_family == AF_INET6:
        out.v6.sin6_family = AF_INET6
        out.v6.sin6_port = k.port
        if k.family == AF_INET:
            out.v6.sin6_addr.s6_addr[10] = 0xff
            out.v6.sin6_addr.s6_addr[11] = 0xff
            memcpy(&out.v6.sin6_addr.s6_addr[12], k.addr, 4)
        else:
            memcpy(out.v6.sin6_addr.s6_addr, k.addr, 16)
        return sizeof(sockaddr_in6)
    if k.family != AF_INET:
        return 0
    out.v4.sin_family = AF_INET
    out.v4.sin_port = k.port
    memcpy(&out.v4.sin_addr, k.addr, 4)
    return sizeof(sockaddr_in)


cdef inline uint32_t _mix(uint32_t h) noexcept nogil:
    h ^= h >> 16
    h *= 0x7feb352du
    h ^= h >> 15
    h *= 0x846ca68bu
    h ^= h >> 16
    return h


cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    """A 64-bit finalizer (murmur3's): for other hashed structures (the name cache's sets)."""
    x ^= x >> 33
    x *= 0xff51afd7ed558ccdULL
    x ^= x >> 33
    x *= 0xc4ceb9fe1a85ec53ULL
    x ^= x >> 33
    return x


cdef inline uint32_t akey_hash(const akey_t *k, uint32_t seed) noexcept nogil:
    cdef uint32_t w, h = seed ^ (<uint32_t>k.family << 16) ^ k.port
    cdef int i
    for i in range(4):
        memcpy(&w, &k.addr[i * 4], 4)
        h = _mix(h ^ w) + 0x9e3779b9u
    return _mix(h)


cdef inline int table_init(table_t *t, int32_t cap, uint32_t seed) noexcept nogil:
    """0 on success, -1 when out of memory."""
    cdef uint32_t nb = 16
    cdef int32_t i
    while nb < <uint32_t>cap * 2:
        nb <<= 1
    memset(t, 0, sizeof(table_t))
    t.e = <entry_t *>calloc(cap, sizeof(entry_t))
    t.buckets = <int32_t *>calloc(nb, sizeof(int32_t))
    if t.e == NULL or t.buckets == NULL:
        free(t.e)
        free(t.buckets)
        t.e = NULL
        t.buckets = NULL
        return -1
    t.cap = cap
    t.mask = nb - 1
    t.seed = seed
    t.head = -1
    t.tail = -1
    for i in range(TCLASSES):
        t.chead[i] = -1
        t.ctail[i] = -1
        t.ctimeout[i] = 0
    t.nclass = 1
    for i in range(nb):
        t.buckets[i] = -1
    for i in range(cap):
        t.e[i].fd = -1
        t.e[i].hnext = i + 1 if i + 1 < cap else -1
    t.free_head = 0 if cap > 0 else -1
    return 0


cdef inline void table_free(table_t *t) noexcept nogil:
    free(t.e)
    free(t.buckets)
    t.e = NULL
    t.buckets = NULL
    t.cap = 0
    t.count = 0


cdef inline int32_t table_find(table_t *t, const akey_t *k) noexcept nogil:
    cdef uint32_t h = akey_hash(k, t.seed)
    cdef int32_t i = t.buckets[h & t.mask]
    while i >= 0:
        if t.e[i].hash == h and memcmp(&t.e[i].key, k, sizeof(akey_t)) == 0:
            return i
        i = t.e[i].hnext
    return -1


cdef inline void _lru_unlink(table_t *t, int32_t i) noexcept nogil:
    cdef entry_t *e = &t.e[i]
    if e.prev >= 0:
        t.e[e.prev].next = e.next
    else:
        t.head = e.next
    if e.next >= 0:
        t.e[e.next].prev = e.prev
    else:
        t.tail = e.prev


cdef inline void _lru_push_head(table_t *t, int32_t i) noexcept nogil:
    cdef entry_t *e = &t.e[i]
    e.prev = -1
    e.next = t.head
    if t.head >= 0:
        t.e[t.head].prev = i
    t.head = i
    if t.tail < 0:
        t.tail = i


cdef inline void _class_unlink(table_t *t, int32_t i) noexcept nogil:
    cdef entry_t *e = &t.e[i]
    if e.cprev >= 0:
        t.e[e.cprev].cnext = e.cnext
    else:
        t.chead[e.tclass] = e.cnext
    if e.cnext >= 0:
        t.e[e.cnext].cprev = e.cprev
    else:
        t.ctail[e.tclass] = e.cprev


cdef inline void _class_push_head(table_t *t, int32_t i) noexcept nogil:
    cdef entry_t *e = &t.e[i]
    cdef uint8_t c = e.tclass
    e.cprev = -1
    e.cnext = t.chead[c]
    if t.chead[c] >= 0:
        t.e[t.chead[c]].cprev = i
    t.chead[c] = i
    if t.ctail[c] < 0:
        t.ctail[c] = i


cdef inline void table_touch(table_t *t, int32_t i, double now) noexcept nogil:
    t.e[i].last = now
    if t.head != i:
        _lru_unlink(t, i)
        _lru_push_head(t, i)
    if t.nclass > 1 and t.chead[t.e[i].tclass] != i:
        _class_unlink(t, i)
        _class_push_head(t, i)


cdef inline void table_set_timeout(table_t *t, uint8_t c, double seconds) noexcept nogil:
    """Idle timeout of class c (class 0: the default every entry starts in). Set them
    before the first insert: with class 0 alone the table keeps no class lists."""
    if c < TCLASSES:
        t.ctimeout[c] = seconds
        if c >= t.nclass:
            t.nclass = c + 1


cdef inline void table_set_class(table_t *t, int32_t i, uint8_t c) noexcept nogil:
    """Move entry i into timeout class c. For an entry just inserted or touched: it goes
    to the head of its new class, which is only in order when its last use is the newest."""
    if c >= t.nclass or t.e[i].tclass == c:
        return
    _class_unlink(t, i)
    t.e[i].tclass = c
    _class_push_head(t, i)


cdef inline double table_timeout(const table_t *t, int32_t i) noexcept nogil:
    return t.ctimeout[t.e[i].tclass]


cdef inline object table_timeouts(table_t *t, double timeout, port_timeouts):
    """Give t its timeout classes: class 0 ``timeout``, the others from ``port_timeouts``
    ((first, last, seconds), ...; relay/datapath/timeouts.py). Returns the destination port
    -> class map (65536 bytes), or None when every port is class 0."""
    from relay.datapath.timeouts import port_class_map, timeout_classes
    values, ranges = timeout_classes(timeout, port_timeouts)
    for c, v in enumerate(values):
        if v <= 0:
            raise ValueError("timeouts must be positive")
        table_set_timeout(t, c, v)
    return port_class_map(ranges)


cdef inline int32_t table_expired(const table_t *t, double now) noexcept nogil:
    """An entry idle for at least its class's timeout, or -1: O(TCLASSES), since each
    class's least recently used entry is the first of that class to expire."""
    cdef int c
    cdef int32_t i
    if t.nclass == 1:
        i = t.tail
        return i if i >= 0 and t.e[i].last + t.ctimeout[0] <= now else -1
    for c in range(t.nclass):
        i = t.ctail[c]
        if i >= 0 and t.e[i].last + t.ctimeout[c] <= now:
            return i
    return -1


cdef inline int32_t table_insert(table_t *t, const akey_t *k, double now) noexcept nogil:
    """Add key k (not present); returns its index, or -1 when the table is full."""
    cdef int32_t i = t.free_head
    cdef uint32_t h
    if i < 0:
        return -1
    t.free_head = t.e[i].hnext
    h = akey_hash(k, t.seed)
    memcpy(&t.e[i].key, k, sizeof(akey_t))
    memset(&t.e[i].aux, 0, sizeof(akey_t))
    t.e[i].hash = h
    t.e[i].used = 1
    t.e[i].fd = -1
    t.e[i].last = now
    t.e[i].born = now
    t.e[i].tclass = 0
    t.e[i].group = 0
    t.e[i].dg_out = t.e[i].by_out = t.e[i].dg_in = t.e[i].by_in = 0
    t.e[i].hnext = t.buckets[h & t.mask]
    t.buckets[h & t.mask] = i
    _lru_push_head(t, i)
    if t.nclass > 1:
        _class_push_head(t, i)
    t.count += 1
    return i


cdef inline void table_remove(table_t *t, int32_t i) noexcept nogil:
    cdef entry_t *e = &t.e[i]
    cdef int32_t *link = &t.buckets[e.hash & t.mask]
    while link[0] >= 0 and link[0] != i:
        link = &t.e[link[0]].hnext
    if link[0] == i:
        link[0] = e.hnext
    _lru_unlink(t, i)
    if t.nclass > 1:
        _class_unlink(t, i)
    e.used = 0
    e.fd = -1
    e.hnext = t.free_head
    t.free_head = i
    t.count -= 1


# Keys that are not socket addresses. The tunnel server keys its per-flow sockets by
# (connection slot, connection generation, flow id): such a key has the family AKEY_FLOW,
# which no socket address uses (AF_* values are below 64), so it never equals an address
# key; port 0, the three numbers in addr[0:12], addr[12:16] zero.
cdef enum:
    AKEY_FLOW = 0xF10F


cdef inline void akey_from_flow(uint32_t conn, uint32_t gen, uint32_t flow,
                                akey_t *k) noexcept nogil:
    memset(k, 0, sizeof(akey_t))
    k.family = AKEY_FLOW
    memcpy(&k.addr[0], &conn, 4)
    memcpy(&k.addr[4], &gen, 4)
    memcpy(&k.addr[8], &flow, 4)


cdef inline int table_new(table_t *t, int32_t cap) except -1:
    """table_init with a fresh random seed (os.urandom): keys chosen by peers cannot aim at
    one hash chain. Raises MemoryError; table_free when done."""
    from os import urandom
    if table_init(t, cap, <uint32_t>int.from_bytes(urandom(4), "little")) < 0:
        raise MemoryError()
    return 0
