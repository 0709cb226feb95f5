# Included by relay/datapath/tunnel.pyx: Socks5Relay: the SOCKS5 server's UDP ASSOCIATE data path.

cdef enum:
    OWN_PORTS = 8                # ports of the client's own host it sent to, remembered

cdef struct assoc_t:
    sockaddr_any client
    int fd
    uint32_t gen                 # bumped each time the slot is taken
    bint used
    bint port_known
    bint bind_first              # announced port 0: the first sender's port, only that one
    double last                  # last datagram either way (idle expiry)
    double idle                  # its idle timeout: by its first datagram's destination port
    bint classed                 # idle is set (the first datagram from the client came)
    uint16_t own[OWN_PORTS]      # bind_first: ports of its own host the client sent to
    uint32_t nown                # (network order; the most recent OWN_PORTS of them)
    int local_family             # replies to the client leave from local (0: the route's)
    uint8_t local[16]


cdef inline void own_port_add(assoc_t *a, uint16_t port) noexcept nogil:
    if not own_port_has(a, port):
        a.own[a.nown % OWN_PORTS] = port
        a.nown += 1


cdef inline bint own_port_has(const assoc_t *a, uint16_t port) noexcept nogil:
    cdef uint32_t i
    for i in range(a.nown if a.nown < OWN_PORTS else OWN_PORTS):
        if a.own[i] == port:
            return True
    return False


cdef class Socks5Relay(Poller):
    """UDP ASSOCIATE data path of `relay socks5`: one relay socket per association; from
    the client: strip the header, check FRAG and the access list, send; from anyone else:
    prepend the header (in the receive slot's headroom, no copy) and send to the client.
    A client added with port 0 is bound to the first address and port its host sends
    from; datagrams from other ports of that host are dropped (drop_foreign_port) unless
    the client sent to that port (a service on its own host: the last OWN_PORTS kept).
    timeout > 0: tick() closes associations without a datagram either way for that long
    (assoc_expired); port_timeouts ((first, last, seconds), ...) give an association whose
    first datagram goes to one of those ports that port's timeout instead. outbound
    (relay.net.sockopt.Outbound): datagrams to remotes leave from its source of their
    family and through its device, both named in each one's IP_PKTINFO / IPV6_PKTINFO (a
    relay socket talks to its client too: it cannot be bound to either)."""
    cdef assoc_t *assocs
    cdef int max_assoc
    cdef int nassoc
    cdef Acl acl
    cdef int batch
    cdef uint8_t *scratch
    cdef mmsghdr *rmsgs
    cdef iovec *riovs
    cdef sockaddr_any *rnames
    cdef sendq_t sb
    cdef outbind_t ob            # sources of the datagrams to remotes (--source)
    cdef sendq_t sb_down
    cdef double timeout
    cdef double next_scan
    cdef double min_timeout
    cdef bytes pmap              # destination port -> index into ptimeouts (None: timeout)
    cdef list ptimeouts

    def __init__(self, acl_table=(), stats=None, *, int max_assoc=1024, int batch=32, log=None,
                 resolve=None, double timeout=0, port_timeouts=(), outbound=None):
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1-{MAX_BATCH}, got {batch}")
        self._init_stats(stats, log)
        self.acl = acl_table if isinstance(acl_table, Acl) else Acl(acl_table)
        outbind_init(&self.ob, outbound)
        self.max_assoc = max_assoc
        self.batch = batch
        self.timeout = timeout
        self.min_timeout = timeout
        if timeout > 0:
            from relay.datapath.timeouts import port_class_map, timeout_classes
            self.ptimeouts, ranges = timeout_classes(timeout, port_timeouts)
            self.pmap = port_class_map(ranges)
            self.min_timeout = min(self.ptimeouts)
        self.assocs = <assoc_t *>calloc(max_assoc, sizeof(assoc_t))
        self.scratch = <uint8_t *>malloc(<size_t>batch * (DGRAM_SLOT + UDP_HDR_ROOM))
        self.rmsgs = <mmsghdr *>calloc(batch, sizeof(mmsghdr))
        self.riovs = <iovec *>calloc(batch, sizeof(iovec))
        self.rnames = <sockaddr_any *>calloc(batch, sizeof(sockaddr_any))
        if not (self.assocs and self.scratch and self.rmsgs and self.riovs and self.rnames):
            raise MemoryError()
        sq_init(&self.sb, batch)
        sq_init(&self.sb_down, batch)
        for i in range(batch):
            self.riovs[i].iov_base = self.scratch + <size_t>i * (DGRAM_SLOT + UDP_HDR_ROOM) \
                + UDP_HDR_ROOM
            self.riovs[i].iov_len = DGRAM_SLOT
            self.rmsgs[i].msg_hdr.msg_iov = &self.riovs[i]
            self.rmsgs[i].msg_hdr.msg_iovlen = 1
            self.rmsgs[i].msg_hdr.msg_name = &self.rnames[i]
        self.init_dns(resolve)

    def tick(self, double now=0):
        """Give up lookups that take too long, close idle associations (timeout): returns
        the slots closed, for the caller to end their control connections. Call about once
        a second or more often."""
        cdef int i
        self.now = now if now else mono_now()
        self.dns.expire(self, self.now)
        out = []
        if self.timeout <= 0 or self.now < self.next_scan:
            return out
        self.next_scan = self.now + min(1.0, self.min_timeout / 2)
        for i in range(self.max_assoc):
            if self.assocs[i].used and self.now - self.assocs[i].last > self.assocs[i].idle:
                self.remove(i)
                self.st[C_ASSOC_EXPIRED] += 1
                out.append(i)
        return out

    def __dealloc__(self):
        free(self.assocs)
        free(self.scratch)
        free(self.rmsgs)
        free(self.riovs)
        free(self.rnames)
        sq_free(&self.sb)
        sq_free(&self.sb_down)

    @property
    def associations(self):
        return self.nassoc

    def add(self, int fd, client, local=None):
        """Relay for the client at (host, port) through UDP socket fd (owned by the
        caller); port 0: learn it from the first datagram from that host. local: the
        address the client reaches the relay at (its control connection's local address)
        when fd is bound to a wildcard: replies to the client leave from it. Returns a
        slot, -1 when the table is full."""
        cdef int i
        cdef sockaddr_any given, la
        if local is not None:
            sockaddr_from_tuple((local[0], 0), &given)
        for i in range(self.max_assoc):
            if not self.assocs[i].used:
                break
        else:
            return -1
        sockaddr_from_tuple(tuple(client), &self.assocs[i].client)
        self.assocs[i].local_family = 0
        if local is not None:
            sa_unmap(&given, &la)
            self.assocs[i].local_family = la.sa.sa_family
            if la.sa.sa_family == AF_INET:
                memcpy(self.assocs[i].local, &la.v4.sin_addr, 4)
            else:
                memcpy(self.assocs[i].local, la.v6.sin6_addr.s6_addr, 16)
        self.assocs[i].port_known = client[1] != 0
        self.assocs[i].bind_first = client[1] == 0
        self.assocs[i].nown = 0
        self.assocs[i].last = mono_now()
        self.assocs[i].idle = self.timeout
        self.assocs[i].classed = False
        self.assocs[i].fd = fd
        self.assocs[i].gen += 1
        self.assocs[i].used = True
        self.nassoc += 1
        epoll_set(self.epfd, EPOLL_CTL_ADD, fd, EPOLLIN, KIND_UDP, i)
        self.st[C_ASSOC_CREATED] += 1
        self.st[C_ASSOC_OPEN] += 1
        return i

    def remove(self, int i):
        if 0 <= i < self.max_assoc and self.assocs[i].used:
            epoll_ctl(self.epfd, EPOLL_CTL_DEL, self.assocs[i].fd, NULL)
            self.assocs[i].used = False
            self.nassoc -= 1
            self.st[C_ASSOC_OPEN] -= 1

    cdef int on_event(self, uint32_t kind, uint32_t idx, uint32_t events) except -1:
        cdef assoc_t *a = &self.assocs[idx]
        cdef int n, j
        cdef frame_t f
        cdef Py_ssize_t hl
        cdef sockaddr_any dst
        cdef socklen_t dl
        cdef uint8_t *data
        cdef size_t ln, h2
        cdef int fam
        if kind != KIND_UDP or not a.used:
            return 0
        for j in range(self.batch):
            self.rmsgs[j].msg_hdr.msg_namelen = sizeof(sockaddr_any)
            self.rmsgs[j].msg_hdr.msg_flags = 0
        with nogil:
            n = recvmmsg(a.fd, self.rmsgs, self.batch, MSG_DONTWAIT, NULL)
        if n <= 0:
            return 0
        fam = a.client.sa.sa_family
        self.sb.fd = a.fd
        sq_clear(&self.sb)
        self.sb_down.fd = a.fd
        sq_clear(&self.sb_down)
        sq_set_src(&self.sb_down, a.local_family, a.local)
        for j in range(n):
            data = <uint8_t *>self.riovs[j].iov_base
            ln = self.rmsgs[j].msg_len
            if sa_same_ip(&self.rnames[j], &a.client) and (
                    not a.port_known or sa_same(&self.rnames[j], &a.client)):
                if not a.port_known:
                    memcpy(&a.client, &self.rnames[j], sizeof(sockaddr_any))
                    a.port_known = True
                a.last = self.now
                hl = parse_udp_req(data, ln, &f)
                if hl < 0:
                    self.st[C_DROP_MALFORMED] += 1
                    continue
                if f.flow != 0:
                    self.st[C_FRAMES_BAD] += 1       # FRAG != 0: fragments are refused
                    continue
                if f.atyp == ATYP_DOMAIN:
                    dl = self.dns.dst_for(&f, idx, a.gen, fam, self.now, &dst)
                    if dl == 0:
                        continue
                else:
                    dl = frame_to_sockaddr(&f, &dst, fam)
                    if dl == 0:
                        self.st[C_DROP_NO_ROUTE] += 1
                        continue
                if self.acl.denied(&dst):
                    self.st[C_DROP_DENIED] += 1
                    continue
                if a.bind_first and sa_same_ip(&dst, &a.client):
                    own_port_add(a, dst.v4.sin_port)     # sin_port, sin6_port: one offset
                if not a.classed:
                    a.classed = True
                    if self.pmap is not None:
                        a.idle = self.ptimeouts[(<const uint8_t *><const char *>self.pmap)[f.port]]
                outbind_src(&self.sb, &dst, &self.ob, True)
                sq_add(&self.sb, &dst, dl, f.data, f.dlen)
            else:
                if not a.port_known:
                    self.st[C_DROP_NO_ROUTE] += 1
                    continue
                if a.bind_first and sa_same_ip(&self.rnames[j], &a.client) and \
                        not own_port_has(a, self.rnames[j].v4.sin_port):
                    self.st[C_DROP_FOREIGN_PORT] += 1    # another port of the client's host
                    continue
                a.last = self.now
                # the header goes into the slot's headroom, right before the payload
                h2 = frame_hdr_len(&self.rnames[j], False)
                write_udp_req_hdr(data - h2, &self.rnames[j])
                sq_add(&self.sb_down, &a.client, sa_len(&a.client), data - h2, h2 + ln)
                self.st[C_DOWN_DATAGRAMS] += 1
                self.st[C_DOWN_BYTES] += ln
        if self.sb.n:
            sq_flush(&self.sb, self.st, C_UP_DATAGRAMS, C_UP_BYTES)
        if self.sb_down.n:
            sq_flush(&self.sb_down, self.st, -1, -1)
        return 0

    cdef int dns_send(self, uint32_t owner, uint32_t gen, const dname_t *e, uint16_t port,
                      const uint8_t *data, size_t n) except -1:
        cdef assoc_t *a = &self.assocs[owner]
        if not a.used or a.gen != gen:           # the association ended meanwhile
            self.st[C_DROP_NO_ROUTE] += 1
            return 0
        return send_resolved(&self.sb, &self.ob, True, self.st, self.acl, a.fd,
                             a.client.sa.sa_family, e, port, data, n)
