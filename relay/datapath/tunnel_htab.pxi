# Included by relay/datapath/tunnel.pyx: the flow hash table keyed by socket address, and flow sockets.

cdef int htab_init(htab_t *h, uint32_t entries) except -1:
    cdef uint32_t cap = 16
    while cap < entries * 2:
        cap <<= 1
    h.slots = <hslot_t *>malloc(cap * sizeof(hslot_t))
    if h.slots == NULL:
        raise MemoryError()
    for i in range(cap):
        h.slots[i].val = -1
    h.mask = cap - 1
    h.count = 0
    return 0


cdef inline uint32_t htab_hash(const uint64_t *k) noexcept nogil:
    return <uint32_t>mix64(k[0] ^ mix64(k[1] ^ mix64(k[2])))


cdef int32_t htab_find(htab_t *h, const uint64_t *k) noexcept nogil:
    cdef uint32_t i = htab_hash(k) & h.mask
    cdef hslot_t *s
    while True:
        s = &h.slots[i]
        if s.val < 0:
            return -1
        if s.k0 == k[0] and s.k1 == k[1] and s.k2 == k[2]:
            return s.val
        i = (i + 1) & h.mask


cdef void htab_put(htab_t *h, const uint64_t *k, int32_t val) noexcept nogil:
    """Insert (the key must be absent; the table is sized for twice the entries)."""
    cdef uint32_t i = htab_hash(k) & h.mask
    while h.slots[i].val >= 0:
        i = (i + 1) & h.mask
    h.slots[i].k0 = k[0]
    h.slots[i].k1 = k[1]
    h.slots[i].k2 = k[2]
    h.slots[i].val = val
    h.count += 1


cdef void htab_del(htab_t *h, const uint64_t *k) noexcept nogil:
    """Remove with backward-shift deletion (linear probing, no tombstones)."""
    cdef uint32_t i = htab_hash(k) & h.mask, j, home
    cdef hslot_t *s
    while True:
        s = &h.slots[i]
        if s.val < 0:
            return
        if s.k0 == k[0] and s.k1 == k[1] and s.k2 == k[2]:
            break
        i = (i + 1) & h.mask
    h.count -= 1
    j = i
    while True:
        j = (j + 1) & h.mask
        if h.slots[j].val < 0:
            break
        home = htab_hash(&h.slots[j].k0) & h.mask
        # keep slot j where it is if its home lies cyclically in (i, j]
        if (j > i and (home <= i or home > j)) or (j < i and (home <= i and home > j)):
            h.slots[i] = h.slots[j]
            i = j
    h.slots[i].val = -1


cdef int new_udp_socket(int family, object mark) except -2:
    """Non-blocking UDP socket (dual stack for AF_INET6), SO_MARK applied; -1 with
    errno set on failure (EMFILE and friends are counted by the caller)."""
    cdef int fd, zero = 0, m
    fd = c_socket(family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        return -1
    if family == AF_INET6:
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(int))
    if mark:
        m = mark
        if setsockopt(fd, SOL_SOCKET, SO_MARK, &m, sizeof(int)) < 0:
            e = errno
            close(fd)
            raise_oserror(e, "SO_MARK")
    return fd
