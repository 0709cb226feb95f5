# cython: language_level=3
# Per-flow and per-client-group counters, and the bounded snapshot `relay flows` reads.
#
# Every flow table (relay/datapath/table.pxd) entry carries datagrams and bytes each way,
# its birth and last use; flow_out / flow_in add to them and, when client groups are
# configured (relay/flows.py), to the group's counters in the stats slot. A snapshot is
# taken by the data path's own thread between batches (never concurrently with it): the
# top n entries by a sort key, found with a bounded heap while walking the LRU list, so it
# costs O(flows log n) and no allocation beyond n indices.
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int32_t
from libc.stdlib cimport calloc, free
from relay.includes.system cimport AF_INET, AF_INET6, memcmp, memset
from relay.datapath.addr cimport sockaddr_any, sockaddr_to_tuple
from relay.datapath.table cimport (
    akey_t, entry_t, table_t, akey_to_sockaddr, table_find, table_insert, table_free, table_new,
)


cdef enum:
    SORT_BYTES = 0           # the order of relay.flows.SORTS
    SORT_AGE = 1
    SORT_IDLE = 2
    GROUP_FIELDS = 4         # per group: datagrams out, bytes out, datagrams in, bytes in


cdef struct groups_t:
    # Client groups (CIDR prefixes; relay/flows.py parses them): group g's counters are
    # ctr[g * GROUP_FIELDS ...]; index n is "other". ctr NULL: no groups configured.
    int n                    # prefixes
    uint8_t *gid             # prefix -> group index
    akey_t *net              # prefix addresses (family, addr; port 0)
    uint8_t *plen            # prefix lengths
    uint64_t *ctr


cdef inline bint _prefix_has(const akey_t *net, uint8_t plen, const akey_t *a) noexcept nogil:
    cdef int full = plen >> 3, rest = plen & 7
    if net.family != a.family:
        return False
    if full and memcmp(net.addr, a.addr, full) != 0:
        return False
    return rest == 0 or ((net.addr[full] ^ a.addr[full]) & (0xff00 >> rest) & 0xff) == 0


cdef inline uint8_t group_of(const groups_t *g, const akey_t *client) noexcept nogil:
    """The group of a client address: its longest matching prefix's, else "other" (n)."""
    cdef int i, best = -1
    cdef uint8_t gid
    if g.ctr == NULL:
        return 0
    gid = <uint8_t>g.n
    for i in range(g.n):
        if (best < 0 or g.plen[i] > best) and _prefix_has(&g.net[i], g.plen[i], client):
            best = g.plen[i]
            gid = g.gid[i]
    return gid


cdef inline void flow_out(entry_t *e, const groups_t *g, uint64_t dgrams, uint64_t nbytes) noexcept nogil:
    e.dg_out += dgrams
    e.by_out += nbytes
    if g.ctr != NULL:
        g.ctr[e.group * GROUP_FIELDS] += dgrams
        g.ctr[e.group * GROUP_FIELDS + 1] += nbytes


cdef inline void flow_in(entry_t *e, const groups_t *g, uint64_t dgrams, uint64_t nbytes) noexcept nogil:
    e.dg_in += dgrams
    e.by_in += nbytes
    if g.ctr != NULL:
        g.ctr[e.group * GROUP_FIELDS + 2] += dgrams
        g.ctr[e.group * GROUP_FIELDS + 3] += nbytes


cdef inline int groups_init(groups_t *g, groups, stats_words, int base) except -1:
    """Fill g from relay.flows.compile_groups' list of (group index, family, address
    bytes, prefix length); counters at word ``base`` of the uint64 memoryview stats_words.
    No groups: g.ctr stays NULL and counting costs one test per datagram."""
    cdef uint64_t[::1] words
    cdef int i
    memset(g, 0, sizeof(groups_t))
    groups = list(groups or ())
    if not groups or stats_words is None:
        return 0
    words = stats_words
    g.gid = <uint8_t *>calloc(len(groups), 1)
    g.net = <akey_t *>calloc(len(groups), sizeof(akey_t))
    g.plen = <uint8_t *>calloc(len(groups), 1)
    if g.gid == NULL or g.net == NULL or g.plen == NULL:
        groups_free(g)
        raise MemoryError("client groups")
    for i, (gid, family, addr, plen) in enumerate(groups):
        g.gid[i] = gid
        g.net[i].family = family
        g.plen[i] = plen
        for j, b in enumerate(addr):
            g.net[i].addr[j] = b
    g.n = len(groups)
    g.ctr = &words[base]
    return 0


cdef inline void groups_free(groups_t *g) noexcept:
    free(g.gid)
    free(g.net)
    free(g.plen)
    memset(g, 0, sizeof(groups_t))


cdef inline double _sort_value(const entry_t *e, int sort, double now) noexcept nogil:
    if sort == SORT_AGE:
        return now - e.born
    if sort == SORT_IDLE:
        return now - e.last
    return <double>(e.by_out + e.by_in)


cdef inline void _sift_down(const table_t *t, int32_t *h, double *v, int n, int i) noexcept nogil:
    cdef int c
    cdef int32_t ti
    cdef double tv
    while True:
        c = 2 * i + 1
        if c >= n:
            return
        if c + 1 < n and v[c + 1] < v[c]:
            c += 1
        if v[i] <= v[c]:
            return
        ti = h[i]; h[i] = h[c]; h[c] = ti
        tv = v[i]; v[i] = v[c]; v[c] = tv
        i = c


cdef inline int table_top(const table_t *t, int sort, int n, double now, int32_t *out,
                          double *val) noexcept nogil:
    """The (at most) n entries with the largest sort values, largest first, into out
    (indices) and val (n slots each). Returns how many."""
    cdef int k = 0, i, j
    cdef int32_t e = t.head, ti
    cdef double x, tv
    if n <= 0:
        return 0
    while e >= 0:                       # a min-heap of the n largest so far
        x = _sort_value(&t.e[e], sort, now)
        if k < n:
            out[k] = e
            val[k] = x
            k += 1
            i = k - 1
            while i > 0 and val[(i - 1) // 2] > val[i]:
                j = (i - 1) // 2
                ti = out[i]; out[i] = out[j]; out[j] = ti
                tv = val[i]; val[i] = val[j]; val[j] = tv
                i = j
        elif x > val[0]:
            out[0] = e
            val[0] = x
            _sift_down(t, out, val, k, 0)
        e = t.e[e].next
    j = k                               # heap sort: smallest to the end
    while j > 1:
        j -= 1
        ti = out[0]; out[0] = out[j]; out[j] = ti
        tv = val[0]; val[0] = val[j]; val[j] = tv
        _sift_down(t, out, val, j, 0)
    return k


cdef inline object akey_tuple(const akey_t *k):
    cdef sockaddr_any sa
    if k.family != AF_INET and k.family != AF_INET6:
        return None
    akey_to_sockaddr(k, k.family, &sa)
    return sockaddr_to_tuple(&sa.sa)


cdef enum:
    ROWS_FLOWS = 0           # client, nothing as destination
    ROWS_FLOWS_DST = 1       # client, destination (the aux address)
    ROWS_CLIENTS = 2         # client host only, plus the flow count (kept in fd)


cdef inline list table_rows(const table_t *t, int sort, int n, double now, int kind):
    """`relay flows` rows of the top n entries: (client, destination, datagrams out, bytes
    out, datagrams in, bytes in, age, idle) and, for ROWS_CLIENTS, the flow count."""
    cdef int32_t *idx
    cdef double *val
    cdef int k, i
    cdef const entry_t *e
    n = min(n, t.count)
    if n <= 0:
        return []
    idx = <int32_t *>calloc(n, sizeof(int32_t))
    val = <double *>calloc(n, sizeof(double))
    if idx == NULL or val == NULL:
        free(idx)
        free(val)
        raise MemoryError("flows snapshot")
    try:
        k = table_top(t, sort, n, now, idx, val)
        rows = []
        for i in range(k):
            e = &t.e[idx[i]]
            row = (akey_tuple(&e.key), akey_tuple(&e.aux) if kind == ROWS_FLOWS_DST else None,
                   e.dg_out, e.by_out, e.dg_in, e.by_in,
                   round(now - e.born, 3), round(now - e.last, 3))
            if kind == ROWS_CLIENTS:
                row = (row[0][0],) + row[1:] + (e.fd,)
            rows.append(row)
        return rows
    finally:
        free(idx)
        free(val)


cdef inline void _add_flow(entry_t *s, const entry_t *f) noexcept nogil:
    s.dg_out += f.dg_out
    s.by_out += f.by_out
    s.dg_in += f.dg_in
    s.by_in += f.by_in
    s.fd += 1
    if f.born < s.born:
        s.born = f.born
    if f.last > s.last:
        s.last = f.last


cdef inline list table_clients(const table_t *t, int sort, int n, int cap, double now):
    """The flows summed per client address: table_rows' ROWS_CLIENTS rows (age: the
    oldest flow's, idle: the most recent one's). At most cap distinct addresses are
    summed; the flows of any beyond them go into one last row whose client is None."""
    cdef table_t agg
    cdef akey_t k
    cdef int32_t e = t.head, a
    cdef entry_t other
    cdef const entry_t *f
    if t.count == 0:
        return []
    table_new(&agg, max(1, min(cap, t.count)))
    memset(&other, 0, sizeof(entry_t))
    other.born = now
    try:
        while e >= 0:
            f = &t.e[e]
            k = f.key
            k.port = 0
            a = table_find(&agg, &k)
            if a < 0:
                a = table_insert(&agg, &k, f.last)
                if a >= 0:
                    agg.e[a].fd = 0
            _add_flow(&agg.e[a] if a >= 0 else &other, f)
            e = f.next
        rows = table_rows(&agg, sort, n, now, ROWS_CLIENTS)
        if other.fd:
            rows.append((None, None, other.dg_out, other.by_out, other.dg_in, other.by_in,
                         round(now - other.born, 3), round(now - other.last, 3), other.fd))
        return rows
    finally:
        table_free(&agg)


cdef inline list table_snapshot(const table_t *t, object core, int n, int sort, bint by_client,
                                int cap, double now, int kind):
    """What a data path's snapshot() answers: its upstream core's rows when it has one,
    else its own table's, as flows (of kind) or summed per client."""
    if core is not None:
        return core.snapshot(n, sort, by_client, cap)
    if by_client:
        return table_clients(t, sort, n, cap, now)
    return table_rows(t, sort, n, now, kind)
