# Included by relay/datapath/tunnel.pyx: the destination access list, matched in C.

cdef class Acl:
    """Destination access list compiled from relay.proto.acl.AccessList: the rules of its
    table() and the host addresses of its host_keys() (sorted 16-byte keys, IPv4 in its
    IPv4-mapped form), which set_hosts() replaces while the cores run."""

    def __cinit__(self, table=(), hosts=()):
        table = list(table)
        self.n = len(table)
        self.rules = <acl_rule_t *>calloc(max(self.n, 1), sizeof(acl_rule_t))
        if self.rules == NULL:
            raise MemoryError()
        for i, (fam, plen, action, net) in enumerate(table):
            self.rules[i].family = fam
            self.rules[i].plen = plen
            self.rules[i].action = action
            memcpy(self.rules[i].net, <const char *>net, 16)
        self.set_hosts(hosts)

    def __dealloc__(self):
        free(self.rules)
        free(self.hosts)

    def set_hosts(self, keys):
        """Replace the host addresses (16-byte keys, sorted as AccessList.host_keys gives
        them). The new array is filled before it takes the old one's place: the cores run
        in this thread between their polls, so no datagram sees half of it."""
        cdef int i, n
        cdef uint8_t *arr
        cdef uint8_t *old
        keys = sorted(bytes(k) for k in keys)
        n = len(keys)
        arr = <uint8_t *>malloc(max(n, 1) * 16)
        if arr == NULL:
            raise MemoryError()
        for i in range(n):
            if len(keys[i]) != 16:
                free(arr)
                raise ValueError(f"host address key of {len(keys[i])} bytes, not 16")
            memcpy(arr + 16 * i, <const char *>keys[i], 16)
        old = self.hosts
        self.hosts, self.nhosts = arr, n
        self.version += 1
        free(old)

    @property
    def host_count(self):
        return self.nhosts

    cdef bint is_host(self, const uint8_t *k) noexcept nogil:
        cdef int lo = 0, hi = self.nhosts - 1, mid, c
        while lo <= hi:
            mid = (lo + hi) >> 1
            c = memcmp(k, self.hosts + 16 * mid, 16)
            if c == 0:
                return True
            if c < 0:
                hi = mid - 1
            else:
                lo = mid + 1
        return False

    cdef bint denied(self, const sockaddr_any *a) noexcept nogil:
        cdef const uint8_t *ip
        cdef int fam, i, full, bits
        cdef acl_rule_t *r
        cdef uint8_t k[16]
        if a.sa.sa_family == AF_INET:
            fam = 4
            ip = <const uint8_t *>&a.v4.sin_addr
        elif is_mapped(a):
            fam = 4
            ip = &a.v6.sin6_addr.s6_addr[12]
        else:
            fam = 6
            ip = <const uint8_t *>&a.v6.sin6_addr
        if self.nhosts:
            if fam == 4:
                memset(k, 0, 10)
                k[10] = 0xff
                k[11] = 0xff
                memcpy(&k[12], ip, 4)
            else:
                memcpy(k, ip, 16)
            if self.is_host(k):
                return True
        for i in range(self.n):
            r = &self.rules[i]
            if r.family != fam:
                continue
            full = r.plen >> 3
            bits = r.plen & 7
            if full and memcmp(ip, r.net, full) != 0:
                continue
            if bits and ((ip[full] ^ r.net[full]) & (0xff00 >> bits) & 0xff):
                continue
            return r.action != 0
        return False

    def allowed(self, host):
        """Python probe of the C matcher (tests cross-check it with AccessList)."""
        cdef sockaddr_any sa
        sockaddr_from_tuple((host, 0), &sa)
        return not self.denied(&sa)
