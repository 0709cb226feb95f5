# cython: language_level=3
# The tunnel cores' flow table: open addressing with linear probing over 24-byte keys
# (a socket address, plus a flow id or connection on the server), backward-shift deletion,
# sized once for twice its entries. The keys come from peers, so every table hashes with
# its own random seed (htab_new draws it from os.urandom): slots cannot be aimed at from outside.
from libc.stdint cimport uint32_t, uint64_t, int32_t
from libc.stdlib cimport malloc


cdef struct hslot_t:             # one slot, 24-byte key
    uint64_t k0
    uint64_t k1
    uint64_t k2
    int32_t val                  # -1: empty

cdef struct htab_t:
    hslot_t *slots
    uint32_t mask
    uint32_t count
    uint64_t seed


cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    x ^= x >> 33
    x *= 0xff51afd7ed558ccdULL
    x ^= x >> 33
    x *= 0xc4ceb9fe1a85ec53ULL
    x ^= x >> 33
    return x


cdef inline int htab_init(htab_t *h, uint32_t entries, uint64_t seed) noexcept nogil:
    """0 on success, -1 when out of memory."""
    cdef uint32_t cap = 16, i
    while cap < entries * 2:
        cap <<= 1
    h.slots = <hslot_t *>malloc(cap * sizeof(hslot_t))
    if h.slots == NULL:
        return -1
    for i in range(cap):
        h.slots[i].val = -1
    h.mask = cap - 1
    h.count = 0
    h.seed = seed
    return 0


cdef inline int htab_new(htab_t *h, uint32_t entries) except -1:
    """A table for ``entries`` keys with a fresh random seed (free h.slots when done)."""
    from os import urandom
    if htab_init(h, entries, <uint64_t>int.from_bytes(urandom(8), "little")) < 0:
        raise MemoryError()
    return 0


cdef inline uint32_t htab_hash(const htab_t *h, const uint64_t *k) noexcept nogil:
    return <uint32_t>mix64(k[0] ^ mix64(k[1] ^ mix64(k[2] ^ h.seed)))


cdef inline int32_t htab_find(const htab_t *h, const uint64_t *k) noexcept nogil:
    cdef uint32_t i = htab_hash(h, k) & h.mask
    cdef const hslot_t *s
    while True:
        s = &h.slots[i]
        if s.val < 0:
            return -1
        if s.k0 == k[0] and s.k1 == k[1] and s.k2 == k[2]:
            return s.val
        i = (i + 1) & h.mask


cdef inline void htab_put(htab_t *h, const uint64_t *k, int32_t val) noexcept nogil:
    """Insert (the key must be absent; the table is sized for twice the entries)."""
    cdef uint32_t i = htab_hash(h, k) & h.mask
    while h.slots[i].val >= 0:
        i = (i + 1) & h.mask
    h.slots[i].k0 = k[0]
    h.slots[i].k1 = k[1]
    h.slots[i].k2 = k[2]
    h.slots[i].val = val
    h.count += 1


cdef inline void htab_del(htab_t *h, const uint64_t *k) noexcept nogil:
    """Remove with backward-shift deletion (linear probing, no tombstones)."""
    cdef uint32_t i = htab_hash(h, k) & h.mask, j, home
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
        home = htab_hash(h, &h.slots[j].k0) & h.mask
        # keep slot j where it is if its home lies cyclically in (i, j]
        if (j > i and (home <= i or home > j)) or (j < i and (home <= i and home > j)):
            h.slots[i] = h.slots[j]
            i = j
    h.slots[i].val = -1
