# Included by relay/datapath/tunnel.pyx: the destination access list, matched in C.

cdef class Acl:
    """Destination access list compiled from relay.proto.acl.AccessList.table()."""

    def __cinit__(self, table=()):
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

    def __dealloc__(self):
        free(self.rules)

    cdef bint denied(self, const sockaddr_any *a) noexcept nogil:
        cdef const uint8_t *ip
        cdef int fam, i, full, bits
        cdef acl_rule_t *r
        if a.sa.sa_family == AF_INET:
            fam = 4
            ip = <const uint8_t *>&a.v4.sin_addr
        elif is_mapped(a):
            fam = 4
            ip = &a.v6.sin6_addr.s6_addr[12]
        else:
            fam = 6
            ip = <const uint8_t *>&a.v6.sin6_addr
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
