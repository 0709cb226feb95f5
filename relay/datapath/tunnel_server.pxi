# Included by relay/datapath/tunnel.pyx: TunnelServer: frames from tunnel clients to per-flow UDP sockets and back.
#
# The flows live in a table_t (relay/datapath/table.pxd) keyed by (connection slot,
# connection generation, flow id; 0 for a gost connection's one flow): entry i of the table
# is flow slot i here, and holds the flow's socket, its last-use time and its place in the
# LRU list. Each connection keeps its own flows in a second list, most recently used first,
# so that closing it releases them and a connection at its share can give up its oldest.
# A full table makes room (assoc_evicted): a connection holding its share of the table or
# more (max_flows / connections) evicts its own least recently used flow, any other the
# table's. Idle flows expire from the LRU tail. A flow socket numbered within FD_RESERVE
# (relay/datapath/limits.pxd) of the soft descriptor limit is closed, its flow refused.

cdef struct sconn_t:
    int fd
    int used
    uint32_t gen
    bint mux
    bint want_out
    uint8_t *rx
    size_t rx_len
    uint8_t *tx
    size_t tx_start
    size_t tx_end
    double stall_since
    int flow_head                # the connection's flows, most recently used first
    int flow_tail
    int nflows

cdef struct sflow_t:             # the socket, last use, LRU place: the table's entry
    sockaddr_any last_dst
    int conn
    uint32_t id
    uint32_t gen                 # bumped each time the slot is taken
    int prev
    int next
    int family
    bint last_ok                 # last_dst passed the access list of version acl_version
    uint32_t acl_version


cdef class TunnelServer(Poller):
    """Data path of `relay tunnel-server`: connections whose handshake Python finished
    (add_conn), per-flow UDP sockets, frames both ways."""
    cdef sconn_t *conns
    cdef int max_conns
    cdef int *conn_free
    cdef int nconn_free
    cdef sflow_t *flows
    cdef int max_flows
    cdef table_t tab
    cdef int nfd                 # the soft descriptor limit (flow sockets keep FD_RESERVE)
    cdef Acl acl
    cdef size_t tx_limit
    cdef double timeout
    cdef bytes pclass            # destination port -> timeout class (None: all class 0)
    cdef double stall_timeout
    cdef double next_tick
    cdef int family
    cdef int batch
    cdef object mark
    cdef outbind_t ob            # the flow sockets' device and sources (--bind-interface, --source)
    cdef uint8_t *scratch
    cdef mmsghdr *rmsgs
    cdef iovec *riovs
    cdef sockaddr_any *rnames
    cdef sendq_t sb

    def __init__(self, acl_table=(), stats=None, *, int max_conns=1024, int max_flows=4096,
                 double timeout=60.0, size_t tx_limit=1 << 20, int batch=32, mark=None,
                 double stall_timeout=5.0, log=None, resolve=None, port_timeouts=(),
                 outbound=None):
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1-{MAX_BATCH}, got {batch}")
        if max_conns < 1 or max_flows < 1:
            raise ValueError("max_conns and max_flows must be at least 1")
        if tx_limit < 2 * (MAX_PAYLOAD + MAX_FRAME_HEADER):
            raise ValueError(f"tx_limit must be at least {2 * (MAX_PAYLOAD + MAX_FRAME_HEADER)}")
        self._init_stats(stats, log)
        self.acl = acl_table if isinstance(acl_table, Acl) else Acl(acl_table)
        self.max_conns, self.max_flows, self.batch = max_conns, max_flows, batch
        self.timeout, self.tx_limit, self.stall_timeout = timeout, tx_limit, stall_timeout
        self.mark = mark
        outbind_init(&self.ob, outbound)
        self.family = AF_INET6
        self.conns = <sconn_t *>calloc(max_conns, sizeof(sconn_t))
        self.conn_free = <int *>malloc(max_conns * sizeof(int))
        self.flows = <sflow_t *>calloc(max_flows, sizeof(sflow_t))
        self.scratch = <uint8_t *>malloc(<size_t>batch * DGRAM_SLOT)
        self.rmsgs = <mmsghdr *>calloc(batch, sizeof(mmsghdr))
        self.riovs = <iovec *>calloc(batch, sizeof(iovec))
        self.rnames = <sockaddr_any *>calloc(batch, sizeof(sockaddr_any))
        if not (self.conns and self.conn_free and self.flows and
                self.scratch and self.rmsgs and self.riovs and self.rnames):
            raise MemoryError()
        table_new(&self.tab, max_flows)
        self.pclass = table_timeouts(&self.tab, timeout, port_timeouts)
        self.nfd = fd_soft_limit()
        sq_init(&self.sb, batch)
        for i in range(max_conns):
            self.conn_free[i] = max_conns - 1 - i
            self.conns[i].fd = -1
        self.nconn_free = max_conns
        for i in range(batch):
            self.riovs[i].iov_base = self.scratch + <size_t>i * DGRAM_SLOT
            self.riovs[i].iov_len = DGRAM_SLOT
            self.rmsgs[i].msg_hdr.msg_iov = &self.riovs[i]
            self.rmsgs[i].msg_hdr.msg_iovlen = 1
            self.rmsgs[i].msg_hdr.msg_name = &self.rnames[i]
        self.init_dns(resolve)

    def __dealloc__(self):
        if self.conns != NULL:
            for i in range(self.max_conns):
                if self.conns[i].used:
                    self.conn_close(i, None, -1)
        if self.tab.e != NULL:
            for i in range(self.tab.cap):
                if self.tab.e[i].used:
                    close(self.tab.e[i].fd)
        free(self.conns)
        free(self.conn_free)
        free(self.flows)
        free(self.scratch)
        free(self.rmsgs)
        free(self.riovs)
        free(self.rnames)
        table_free(&self.tab)
        sq_free(&self.sb)

    @property
    def connections(self):
        return self.max_conns - self.nconn_free

    @property
    def flows_open(self):
        return self.tab.count

    def add_conn(self, int fd, bint mux, leftover=b""):
        """Take over fd (handshake done): returns its slot, or -1 when the table is full
        (the caller closes fd and counts). Bytes already read after the request go in."""
        cdef int i
        cdef sconn_t *c
        if self.nconn_free == 0:
            return -1
        i = self.conn_free[self.nconn_free - 1]
        c = &self.conns[i]
        c.rx = <uint8_t *>malloc(RX_CAP)
        c.tx = <uint8_t *>malloc(self.tx_limit)
        if c.rx == NULL or c.tx == NULL:
            free(c.rx)
            free(c.tx)
            c.rx = c.tx = NULL
            return -1
        self.nconn_free -= 1
        c.fd = fd
        c.used = 1
        c.gen += 1
        c.mux = mux
        c.want_out = False
        c.rx_len = 0
        c.tx_start = c.tx_end = 0
        c.stall_since = 0
        c.flow_head = c.flow_tail = -1
        c.nflows = 0
        epoll_set(self.epfd, EPOLL_CTL_ADD, fd, EPOLLIN | EPOLLRDHUP, KIND_CONN, i)
        if leftover:
            if len(leftover) > RX_CAP:
                self.conn_close(i, "handshake leftover too long", C_FRAMES_BAD)
                return i
            memcpy(c.rx, <const char *>leftover, len(leftover))
            c.rx_len = len(leftover)
            self.conn_frames(i)
        return i

    def close_all(self):
        for i in range(self.max_conns):
            if self.conns[i].used:
                self.conn_close(i, None, -1)

    cdef int conn_close(self, int i, str why, int counter) except -1:
        cdef sconn_t *c = &self.conns[i]
        cdef int f, nxt
        if not c.used:
            return 0
        f = c.flow_head
        while f >= 0:
            nxt = self.flows[f].next
            self.flow_release(f, -1)
            f = nxt
        close(c.fd)
        free(c.rx)
        free(c.tx)
        c.rx = c.tx = NULL
        c.fd = -1
        c.used = 0
        self.conn_free[self.nconn_free] = i
        self.nconn_free += 1
        self.st[C_CONN_OPEN] -= 1
        if counter >= 0:
            self.st[counter] += 1
        if why:
            self.log.warning("tunnel connection closed: %s", why)
        return 0

    cdef void conn_unlink(self, sconn_t *c, int f) noexcept nogil:
        """Take flow f out of its connection's list."""
        cdef sflow_t *fl = &self.flows[f]
        if fl.prev >= 0:
            self.flows[fl.prev].next = fl.next
        else:
            c.flow_head = fl.next
        if fl.next >= 0:
            self.flows[fl.next].prev = fl.prev
        else:
            c.flow_tail = fl.prev

    cdef void conn_link(self, sconn_t *c, int f) noexcept nogil:
        """Put flow f first (most recently used) in its connection's list."""
        cdef sflow_t *fl = &self.flows[f]
        fl.prev = -1
        fl.next = c.flow_head
        if c.flow_head >= 0:
            self.flows[c.flow_head].prev = f
        c.flow_head = f
        if c.flow_tail < 0:
            c.flow_tail = f

    cdef void flow_touch(self, int f) noexcept nogil:
        """Flow f was used now: first in the table's LRU list and in its connection's."""
        cdef sconn_t *c = &self.conns[self.flows[f].conn]
        table_touch(&self.tab, f, self.now)
        if c.flow_head != f:
            self.conn_unlink(c, f)
            self.conn_link(c, f)

    cdef int flow_release(self, int f, int counter) except -1:
        cdef sflow_t *fl = &self.flows[f]
        cdef sconn_t *c = &self.conns[fl.conn]
        if not self.tab.e[f].used:
            return 0
        close(self.tab.e[f].fd)
        table_remove(&self.tab, f)
        self.conn_unlink(c, f)
        c.nflows -= 1
        self.st[C_ASSOC_OPEN] -= 1
        if counter >= 0:
            self.st[counter] += 1
        return 0

    cdef int flow_get(self, int ci, uint32_t id, uint16_t dport) except -2:
        cdef sconn_t *c = &self.conns[ci]
        cdef akey_t k
        cdef int f, fd, share
        cdef sflow_t *fl
        akey_from_flow(ci, c.gen, id if c.mux else 0, &k)
        f = table_find(&self.tab, &k)
        if f >= 0:
            return f
        if self.tab.count >= self.tab.cap:
            # Datagrams queued may use the socket about to be closed (or its number reused).
            sq_flush(&self.sb, self.st, C_UP_DATAGRAMS, C_UP_BYTES)
            # A connection at its share (or over) gives up its own oldest flow, any other
            # connection the table's oldest: whoever holds the table cannot push others out.
            share = self.max_flows // (self.max_conns - self.nconn_free)
            if c.nflows and c.nflows >= share:
                self.flow_release(c.flow_tail, C_ASSOC_EVICTED)
            else:
                self.flow_release(self.tab.tail, C_ASSOC_EVICTED)
        fd = new_udp_socket(self.family, self.mark, &self.ob)
        if fd < 0 and self.family == AF_INET6 and errno == _errno.EAFNOSUPPORT:
            self.family = AF_INET
            fd = new_udp_socket(self.family, self.mark, &self.ob)
        if fd < 0:
            self.st[C_ASSOC_REFUSED] += 1
            return -1
        if fd_reserved(fd, self.nfd):
            close(fd)
            self.st[C_ASSOC_REFUSED] += 1
            return -1
        f = table_insert(&self.tab, &k, self.now)
        set_flow_class(&self.tab, f, self.pclass, dport)
        self.tab.e[f].fd = fd
        fl = &self.flows[f]
        fl.conn = ci
        fl.id = id
        fl.gen += 1
        fl.family = self.family
        fl.last_ok = False
        self.conn_link(c, f)
        c.nflows += 1
        epoll_set(self.epfd, EPOLL_CTL_ADD, fd, EPOLLIN, KIND_FLOW, f)
        self.st[C_ASSOC_CREATED] += 1
        self.st[C_ASSOC_OPEN] += 1
        return f

    cdef int on_event(self, uint32_t kind, uint32_t idx, uint32_t events) except -1:
        cdef sconn_t *c
        if kind == KIND_CONN:
            c = &self.conns[idx]
            if not c.used:
                return 0
            if events & EPOLLOUT:
                self.conn_write(idx)
                if not c.used:
                    return 0
            if events & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP):
                self.conn_read(idx)
        elif kind == KIND_FLOW:
            if self.tab.e[idx].used:
                self.flow_read(idx)
        return 0

    cdef int conn_read(self, int i) except -1:
        cdef sconn_t *c = &self.conns[i]
        cdef ssize_t n
        with nogil:
            n = read(c.fd, c.rx + c.rx_len, RX_CAP - c.rx_len)
        if n == 0:
            if c.rx_len:
                self.conn_close(i, f"truncated frame: stream ended with {c.rx_len} bytes "
                                   f"of an incomplete frame", C_FRAMES_BAD)
            else:
                self.conn_close(i, None, -1)
            return 0
        if n < 0:
            if errno == EAGAIN or errno == EINTR:
                return 0
            self.conn_close(i, None, -1)
            return 0
        c.rx_len += n
        return self.conn_frames(i)

    cdef int conn_frames(self, int i) except -1:
        """Send every complete frame of the receive buffer to its destination."""
        cdef sconn_t *c = &self.conns[i]
        cdef size_t pos = 0
        cdef Py_ssize_t r
        cdef frame_t f
        cdef int fi
        cdef sflow_t *fl
        cdef sockaddr_any dst
        cdef socklen_t dlen
        cdef uint32_t gen = c.gen
        sq_clear(&self.sb)
        while pos < c.rx_len:
            r = parse_frame(c.rx + pos, c.rx_len - pos, c.mux, MAX_PAYLOAD, &f)
            if r == 0:
                break
            if r < 0:
                sq_flush(&self.sb, self.st, C_UP_DATAGRAMS, C_UP_BYTES)
                self.conn_close(i, f"bad frame: {FRAME_ERROR_TEXT[-r]}", C_FRAMES_BAD)
                return 0
            pos += r
            fi = self.flow_get(i, f.flow, f.port)
            if fi < 0:
                continue
            fl = &self.flows[fi]
            self.flow_touch(fi)
            if f.atyp == ATYP_DOMAIN:
                dlen = self.dns.dst_for(&f, fi, fl.gen, fl.family, self.now, &dst)
                if dlen == 0:
                    continue
            else:
                dlen = frame_to_sockaddr(&f, &dst, fl.family)
                if dlen == 0:
                    self.st[C_DROP_NO_ROUTE] += 1
                    continue
            if not self.flow_dst_ok(fl, &dst):
                continue
            if self.sb.n and (self.sb.fd != self.tab.e[fi].fd or sq_full(&self.sb)):
                sq_flush(&self.sb, self.st, C_UP_DATAGRAMS, C_UP_BYTES)
            self.sb.fd = self.tab.e[fi].fd
            outbind_src(&self.sb, &dst, &self.ob, False)    # the device: on the socket
            sq_add(&self.sb, &dst, dlen, f.data, f.dlen)
        sq_flush(&self.sb, self.st, C_UP_DATAGRAMS, C_UP_BYTES)
        if c.used and c.gen == gen:
            if pos < c.rx_len:
                memmove(c.rx, c.rx + pos, c.rx_len - pos)
            c.rx_len -= pos
        return 0

    cdef bint flow_dst_ok(self, sflow_t *fl, const sockaddr_any *dst) noexcept nogil:
        """The access list on a flow's destination (remembered while it does not change)."""
        if fl.last_ok and fl.acl_version == self.acl.version and sa_same(dst, &fl.last_dst):
            return True
        if self.acl.denied(dst):
            self.st[C_DROP_DENIED] += 1
            return False
        fl.last_ok = True
        fl.acl_version = self.acl.version
        memcpy(&fl.last_dst, dst, sizeof(sockaddr_any))
        return True

    cdef int dns_send(self, uint32_t owner, uint32_t gen, const dname_t *e, uint16_t port,
                      const uint8_t *data, size_t n) except -1:
        cdef sflow_t *fl = &self.flows[owner]
        if not self.tab.e[owner].used or fl.gen != gen:   # the flow ended while its name was resolved
            self.st[C_DROP_NO_ROUTE] += 1
            return 0
        return send_resolved(&self.sb, &self.ob, False, self.st, self.acl,
                             self.tab.e[owner].fd, fl.family, e, port, data, n)

    cdef int flow_read(self, int fi) except -1:
        """Replies of one flow socket: recvmmsg, frame them into the connection, write."""
        cdef sflow_t *fl = &self.flows[fi]
        cdef sconn_t *c = &self.conns[fl.conn]
        cdef int n, j
        cdef size_t dl, need
        cdef const uint8_t *data
        for j in range(self.batch):
            self.rmsgs[j].msg_hdr.msg_namelen = sizeof(sockaddr_any)
            self.rmsgs[j].msg_hdr.msg_flags = 0
        with nogil:
            n = recvmmsg(self.tab.e[fi].fd, self.rmsgs, self.batch, MSG_DONTWAIT, NULL)
        if n <= 0:
            return 0
        self.flow_touch(fi)
        for j in range(n):
            dl = self.rmsgs[j].msg_len
            if self.rmsgs[j].msg_hdr.msg_flags & MSG_TRUNC or dl > MAX_PAYLOAD:
                self.st[C_DROP_TOO_BIG] += 1
                continue
            if dl == 0 and not c.mux:
                # gost reads RSV=0 as "no length given": a plain peer cannot take it.
                self.st[C_DROP_MALFORMED] += 1
                continue
            data = self.scratch + <size_t>j * DGRAM_SLOT
            need = frame_hdr_len(&self.rnames[j], c.mux) + dl
            if self.tx_limit - c.tx_end < need and c.tx_start:
                memmove(c.tx, c.tx + c.tx_start, c.tx_end - c.tx_start)
                c.tx_end -= c.tx_start
                c.tx_start = 0
            if self.tx_limit - c.tx_end < need:
                self.st[C_DROP_BUFFER_FULL] += 1
                if c.stall_since == 0:
                    c.stall_since = self.now
                continue
            c.tx_end += write_frame_hdr(c.tx + c.tx_end, &self.rnames[j], fl.id, c.mux, dl)
            memcpy(c.tx + c.tx_end, data, dl)
            c.tx_end += dl
            self.st[C_DOWN_DATAGRAMS] += 1
            self.st[C_DOWN_BYTES] += dl
        if not c.want_out:
            self.conn_write(fl.conn)
        return 0

    cdef int conn_write(self, int i) except -1:
        cdef sconn_t *c = &self.conns[i]
        cdef ssize_t n
        cdef int e
        if c.tx_end > c.tx_start:
            with nogil:
                n = c_send(c.fd, c.tx + c.tx_start, c.tx_end - c.tx_start,
                           MSG_NOSIGNAL | MSG_DONTWAIT)
            if n < 0:
                e = errno
                if e != EAGAIN and e != EINTR:
                    self.conn_close(i, None, -1)
                    return 0
                n = 0
            if n > 0:
                c.tx_start += n
                c.stall_since = 0
        if c.tx_start == c.tx_end:
            c.tx_start = c.tx_end = 0
            if c.want_out:
                c.want_out = False
                epoll_set(self.epfd, EPOLL_CTL_MOD, c.fd, EPOLLIN | EPOLLRDHUP, KIND_CONN, i)
        elif not c.want_out:
            c.want_out = True
            epoll_set(self.epfd, EPOLL_CTL_MOD, c.fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP,
                      KIND_CONN, i)
        return 0

    def tick(self, double now=0):
        """Idle flows out (from the LRU tail: only the expired are visited), disconnect peers
        that stopped reading. Call about once a second."""
        cdef int i
        if now == 0:
            now = mono_now()
        self.now = now
        if now < self.next_tick:
            return
        self.next_tick = now + 0.5
        i = table_expired(&self.tab, now)
        while i >= 0:
            self.flow_release(i, C_ASSOC_EXPIRED)
            i = table_expired(&self.tab, now)
        self.dns.expire(self, now)
        for i in range(self.max_conns):
            if self.conns[i].used and self.conns[i].stall_since and \
                    now - self.conns[i].stall_since > self.stall_timeout:
                self.conn_close(i, f"peer has not read for {self.stall_timeout:g}s with its "
                                   f"send buffer full", C_CONN_REJECTED)
