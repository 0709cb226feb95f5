# Included by relay/datapath/tunnel.pyx: host-name destinations: the name cache and the datagrams parked for a name.

cdef enum:
    DNS_WAYS = 4                 # the cache is set associative: sets of 4 entries
    N_EMPTY = 0
    N_PENDING = 1                # being resolved; datagrams wait (parked)
    N_OK = 2
    N_FAIL = 3

cdef struct dname_t:             # one cached host name
    double expires               # N_OK / N_FAIL: valid until then; N_PENDING: give up then
    double used
    uint32_t seq                 # tells a stale answer from the current one
    int32_t park_head
    int32_t park_tail
    uint32_t park_bytes
    uint16_t nparked
    uint8_t state
    uint8_t nlen
    uint8_t first                # 4 or 6: the family getaddrinfo gave first
    uint8_t has4
    uint8_t has6
    uint8_t a4[4]
    uint8_t a6[16]
    uint8_t name[255]            # lower case

cdef struct parked_t:            # a datagram waiting for its name
    uint8_t *data
    size_t n
    uint32_t owner               # flow / association slot of the owner ...
    uint32_t gen                 # ... and its generation, so a reused slot is told apart
    int32_t next
    uint16_t port


cdef inline uint8_t ascii_lower(uint8_t c) noexcept nogil:
    return c + 32 if 65 <= c <= 90 else c


cdef socklen_t dname_to_sockaddr(const dname_t *e, uint16_t port, int family,
                                 sockaddr_any *out) noexcept nogil:
    """Address of a resolved name for a socket of `family`: IPv4 sockets take its first
    IPv4 address; dual-stack IPv6 sockets the first address getaddrinfo gave (IPv4
    mapped). 0 when it has none of that kind."""
    cdef frame_t f
    if e.state != N_OK:
        return 0
    f.port = port
    if family == AF_INET or e.first == 4:
        if not e.has4:
            return 0
        f.atyp = ATYP_IPV4
        f.addr = e.a4
    else:
        f.atyp = ATYP_IPV6
        f.addr = e.a6
    return <socklen_t>frame_to_sockaddr(&f, out, family)


cdef int send_resolved(sendq_t *sb, const outbind_t *ob, bint via_dev, uint64_t *st, Acl acl,
                       int fd, int family, const dname_t *e, uint16_t port,
                       const uint8_t *data, size_t n) except -1:
    """Send a datagram that waited for its host name from socket fd (of `family`), after
    the access list has judged the address it resolved to (from ob's source of its
    family, when given; through ob's device with via_dev)."""
    cdef sockaddr_any dst
    cdef socklen_t dl = dname_to_sockaddr(e, port, family, &dst)
    if dl == 0:
        st[C_DROP_NO_ROUTE] += 1
        return 0
    if acl.denied(&dst):
        st[C_DROP_DENIED] += 1
        return 0
    sq_clear(sb)
    sb.fd = fd
    outbind_src(sb, &dst, ob, via_dev)
    sq_add(sb, &dst, dl, data, n)
    sq_flush(sb, st, C_UP_DATAGRAMS, C_UP_BYTES)
    return 0
