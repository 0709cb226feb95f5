# Included by relay/datapath/tunnel.pyx: DirectUpstream, plain UDP to each destination as
# one of several upstreams (forward/redir send directly through the engine's own sockets
# when direct is their only way; pure twin: relay/datapath/pure/direct_upstream.py).
from relay.datapath.sendq cimport _sq_drop
from relay.datapath.table cimport akey_to_sockaddr


cdef class DirectUpstream(UpstreamCore):
    """Direct UDP behind a BalancedUpstream (`upstream = ["tunnel://...", "direct"]`): one
    UDP socket per client flow (dual stack where the host has IPv6), each datagram sent to
    its destination, every reply on it handed back to the flow's client with its source.

    At most max_flows flows (relay/datapath/table.pxd): a new client at the cap evicts the
    least recently used one (assoc_evicted), idle flows expire from the LRU end, a socket
    within FD_RESERVE of the soft descriptor limit refuses its flow (assoc_refused)."""

    def __init__(self, family=None, mark=None, stats=None, double timeout=60.0,
                 int max_flows=4096, int batch=32, log=None, port_timeouts=(), client_groups=(),
                 outbound=None):
        cdef int j
        if not 1 <= max_flows <= 65536:
            raise ValueError(f"max_flows must be 1-65536, got {max_flows}")
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1-{MAX_BATCH}, got {batch}")
        self._init_stats(stats, log, client_groups)
        outbind_init(&self.ob, outbound)
        self.family = family if family is not None else (
            AF_INET6 if _sockopt.ipv6_available() else AF_INET)
        self.mark, self.timeout = mark, timeout
        self.max_flows, self.batch = max_flows, batch
        self.clients = <sockaddr_any *>calloc(max_flows, sizeof(sockaddr_any))
        self.scratch = <uint8_t *>malloc(<size_t>batch * DGRAM_SLOT)
        self.rmsgs = <mmsghdr *>calloc(batch, sizeof(mmsghdr))
        self.riovs = <iovec *>calloc(batch, sizeof(iovec))
        self.rnames = <sockaddr_any *>calloc(batch, sizeof(sockaddr_any))
        if self.clients == NULL or self.scratch == NULL or self.rmsgs == NULL or \
                self.riovs == NULL or self.rnames == NULL:
            raise MemoryError()
        for j in range(batch):
            self.riovs[j].iov_base = self.scratch + <size_t>j * DGRAM_SLOT
            self.riovs[j].iov_len = DGRAM_SLOT
            self.rmsgs[j].msg_hdr.msg_iov = &self.riovs[j]
            self.rmsgs[j].msg_hdr.msg_iovlen = 1
            self.rmsgs[j].msg_hdr.msg_name = &self.rnames[j]
        table_new(&self.tab, max_flows)
        self.pclass = table_timeouts(&self.tab, timeout, port_timeouts)
        self.fd_ceiling = fd_ceiling()

    def __dealloc__(self):
        cdef int i
        if self.tab.e != NULL:
            for i in range(self.max_flows):
                if self.tab.e[i].used and self.tab.e[i].fd >= 0:
                    close(self.tab.e[i].fd)
        free(self.clients)
        free(self.scratch)
        free(self.rmsgs)
        free(self.riovs)
        free(self.rnames)
        table_free(&self.tab)

    def close(self):
        while self.tab.tail >= 0:
            self.dflow_close(self.tab.tail, -1)
        UpstreamCore.close(self)

    @property
    def flows_open(self):
        return self.tab.count

    @property
    def connected(self):
        return 0

    cdef int dflow_close(self, int i, int counter) except -1:
        if self.tab.e[i].fd >= 0:
            close(self.tab.e[i].fd)          # leaves the epoll set with it
            self.tab.e[i].fd = -1
        table_remove(&self.tab, i)
        self.st[C_ASSOC_OPEN] -= 1
        if counter >= 0:
            self.st[counter] += 1
        return 0

    cdef int c_forget(self, const sockaddr_any *client) except -1:
        cdef akey_t k
        cdef int32_t i
        akey_from_sockaddr(client, &k)
        i = table_find(&self.tab, &k)
        if i >= 0:
            self.dflow_close(i, -1)
        return 0

    cdef int c_send(self, const sockaddr_any *client, const sockaddr_any *dst,
                    const uint8_t *data, size_t n) except -1:
        cdef akey_t k, dk
        cdef int32_t i
        cdef int fd
        cdef sockaddr_any to
        cdef socklen_t tolen
        cdef ssize_t r
        akey_from_sockaddr(dst, &dk)
        tolen = <socklen_t>akey_to_sockaddr(&dk, self.family, &to)
        if tolen == 0:
            self.st[C_DROP_NO_ROUTE] += 1             # an IPv6 destination, no IPv6 here
            return 0
        akey_from_sockaddr(client, &k)
        i = table_find(&self.tab, &k)
        if i < 0:
            if self.tab.count >= self.tab.cap:
                self.dflow_close(self.tab.tail, C_ASSOC_EVICTED)
            fd = new_udp_socket(self.family, self.mark, &self.ob)
            if fd >= 0 and outbind_apply(fd, self.family, dk.family == AF_INET6, &self.ob) < 0:
                close(fd)                       # its source (of the first destination's family)
                self.st[C_DROP_NO_ROUTE] += 1
                return 0
            if fd >= self.fd_ceiling:
                close(fd)
                fd = -1
            if fd < 0:
                self.st[C_ASSOC_REFUSED] += 1
                return 0
            i = table_insert(&self.tab, &k, self.now)
            set_flow_class(&self.tab, i, self.pclass, ntohs(dst.v4.sin_port))   # sin6_port: same place
            self.tab.e[i].fd = fd
            self.tab.e[i].group = group_of(&self.groups, &k)
            memcpy(&self.clients[i], client, sizeof(sockaddr_any))
            self.st[C_ASSOC_CREATED] += 1
            self.st[C_ASSOC_OPEN] += 1
            epoll_set(self.epfd, EPOLL_CTL_ADD, fd, EPOLLIN, KIND_UDP, i)
        table_touch(&self.tab, i, self.now)
        self.tab.e[i].aux = dk
        flow_out(&self.tab.e[i], &self.groups, 1, n)
        r = sendto(self.tab.e[i].fd, data, n, MSG_DONTWAIT, &to.sa, tolen)
        if r < 0:
            _sq_drop(self.st, errno, 1)
            return 0
        self.st[C_UP_DATAGRAMS] += 1
        self.st[C_UP_BYTES] += n
        return 0

    cdef int dflow_read(self, int i) except -1:
        cdef int n, j
        cdef sockaddr_any src
        for j in range(self.batch):
            self.rmsgs[j].msg_hdr.msg_namelen = sizeof(sockaddr_any)
            self.rmsgs[j].msg_hdr.msg_flags = 0
        with nogil:
            n = recvmmsg(self.tab.e[i].fd, self.rmsgs, self.batch, MSG_DONTWAIT, NULL)
        if n <= 0:
            return 0
        table_touch(&self.tab, i, self.now)
        for j in range(n):
            if self.rmsgs[j].msg_hdr.msg_flags & MSG_TRUNC or self.rmsgs[j].msg_len > MAX_PAYLOAD:
                self.st[C_DROP_TOO_BIG] += 1
                continue
            sa_unmap(&self.rnames[j], &src)
            self.st[C_DOWN_DATAGRAMS] += 1
            self.st[C_DOWN_BYTES] += self.rmsgs[j].msg_len
            flow_in(&self.tab.e[i], &self.groups, 1, self.rmsgs[j].msg_len)
            if self.reply_fn != NULL:
                self.reply_fn(self.reply_ctx, &self.clients[i], &src,
                              self.scratch + <size_t>j * DGRAM_SLOT, self.rmsgs[j].msg_len)
        return 0

    cdef int c_process(self) except -1:
        cdef epoll_event evs[EV_MAX]
        cdef int n, j
        cdef uint32_t i
        with nogil:
            n = epoll_wait(self.epfd, evs, EV_MAX, 0)
        self.now = mono_now()
        for j in range(n):
            i = evs[j].data.u64 & 0xffffffff
            if i < <uint32_t>self.max_flows and self.tab.e[i].used and self.tab.e[i].fd >= 0:
                self.dflow_read(i)
        return 0

    cdef int c_tick(self, double now) except -1:
        cdef int32_t i
        self.now = now
        i = table_expired(&self.tab, now)
        while i >= 0:
            self.dflow_close(i, C_ASSOC_EXPIRED)
            i = table_expired(&self.tab, now)
        return 0
