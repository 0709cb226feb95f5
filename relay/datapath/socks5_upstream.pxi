# Included by relay/datapath/tunnel.pyx: Socks5Upstream: forward/redir through a SOCKS5 server's UDP ASSOCIATE.

cdef enum:
    A_CONNECTING = 1
    A_HANDSHAKE = 2
    A_UP = 3
    A_WAITING = 4             # no sockets yet: waits for one of the handshakes at once
    SOCKS_QUEUE = 65536 + 1024


cdef class Socks5Upstream(UpstreamCore):
    """SOCKS5 UDP ASSOCIATE client core: one association (TCP control connection + UDP
    socket) per client flow, so replies map back to their flow; datagrams wait in a small
    per-flow queue while the association is being set up.

    At most ``handshakes`` associations are set up at once (SOCKS5_HANDSHAKES: a server
    limits the handshakes of one address, relay socks5 to 16): a burst of new flows waits in
    arrival order, without sockets, and each starts when one before it is up or has failed.
    The queues of all flows not yet up hold at most ``queued_max`` bytes together
    (SOCKS5_QUEUED; each at most queue_limit, allocated as datagrams come): the rest is
    dropped and counted (queue_drops).

    At most max_flows associations (relay/datapath/table.pxd, like the engine's): a new
    client at the cap evicts the least recently used one (assoc_evicted: its TCP and UDP
    sockets closed, its queued datagrams dropped); associations idle for `timeout` expire
    from the LRU end; one whose socket lies within FD_RESERVE of the soft descriptor limit
    is refused (assoc_refused)."""

    def __init__(self, server, user=None, password=None, mark=None, stats=None,
                 double timeout=60.0, int max_flows=1024, size_t queue_limit=SOCKS_QUEUE,
                 int batch=32, log=None, port_timeouts=(), client_groups=(), outbound=None,
                 handshakes=None, queued_max=None):
        from relay.datapath.pure.common import SOCKS5_HANDSHAKES, SOCKS5_QUEUED
        if not 1 <= max_flows <= 65536:
            raise ValueError(f"max_flows must be 1-65536, got {max_flows}")
        if not 1 <= batch <= MAX_BATCH:
            raise ValueError(f"batch must be 1-{MAX_BATCH}, got {batch}")
        self._init_stats(stats, log, client_groups)
        self.server = tuple(server)
        self.family, self.addr = _resolve(self.server)
        self.user, self.password, self.mark = user, password, mark
        self.outbound = outbound
        self.timeout = timeout
        self.queue_limit = max(queue_limit, MAX_PAYLOAD + 64)
        self.max_flows = max_flows
        self.batch = batch
        self.hs = {}
        self.handshakes = SOCKS5_HANDSHAKES if handshakes is None else handshakes
        self.queued_max = SOCKS5_QUEUED if queued_max is None else queued_max
        if self.handshakes < 1:
            raise ValueError("handshakes must be at least 1")
        self.loglim = LogLimiter(self.log)
        self.flows = <aflow_t *>calloc(max_flows, sizeof(aflow_t))
        self.waiting = <uint64_t *>calloc(max_flows, sizeof(uint64_t))
        self.scratch = <uint8_t *>malloc(<size_t>batch * (DGRAM_SLOT + UDP_HDR_ROOM))
        if self.flows == NULL or self.scratch == NULL or self.waiting == NULL:
            raise MemoryError()
        table_new(&self.tab, max_flows)
        self.pclass = table_timeouts(&self.tab, timeout, port_timeouts)
        self.fd_ceiling = fd_ceiling()
        sq_init(&self.sb, batch)

    def __dealloc__(self):
        if self.flows != NULL and self.tab.e != NULL:
            for i in range(self.max_flows):
                if self.tab.e[i].used:
                    if self.flows[i].tcp_fd >= 0:
                        close(self.flows[i].tcp_fd)
                    if self.flows[i].udp_fd >= 0:
                        close(self.flows[i].udp_fd)
                    free(self.flows[i].queue)
            free(self.flows)
        free(self.waiting)
        free(self.scratch)
        table_free(&self.tab)
        sq_free(&self.sb)

    def close(self):
        while self.tab.tail >= 0:
            self.flow_close(self.tab.tail, -1)
        UpstreamCore.close(self)

    @property
    def flows_open(self):
        return self.tab.count

    cdef int flow_open(self, const sockaddr_any *client, const akey_t *k,
                       const sockaddr_any *dst) except -2:
        """A new association for client (the least recently used one evicted at the cap):
        its slot, or -1 when it is refused (counted). It connects at once while fewer than
        ``handshakes`` others are being set up, else it waits its turn (start_waiting)."""
        cdef int32_t i
        cdef aflow_t *a
        if self.tab.count >= self.tab.cap:
            self.flow_close(self.tab.tail, C_ASSOC_EVICTED)
        at_once = self.nstarting < self.handshakes and self.w_len == 0
        socks = self._connect() if at_once else None
        if at_once and socks is None:
            self.st[C_ASSOC_REFUSED] += 1
            return -1
        i = table_insert(&self.tab, k, self.now)
        set_flow_class(&self.tab, i, self.pclass, ntohs(dst.v4.sin_port))   # sin6_port: same place
        self.tab.e[i].group = group_of(&self.groups, k)
        a = &self.flows[i]
        memset(a, 0, sizeof(aflow_t))
        memcpy(&a.client, client, sizeof(sockaddr_any))
        a.tcp_fd = a.udp_fd = -1
        a.state = A_WAITING
        self.gen += 1
        a.gen = self.gen
        self.st[C_ASSOC_CREATED] += 1
        self.st[C_ASSOC_OPEN] += 1
        if at_once:
            self._attach(i, socks)
            return i if self.tab.e[i].used else -1
        if self.w_len == self.max_flows:
            self._compact_waiting()
        self.waiting[(self.w_head + self.w_len) % self.max_flows] = (<uint64_t>i << 32) | a.gen
        self.w_len += 1
        return i

    cdef bint _still_waiting(self, uint64_t v) noexcept:
        """Whether ring entry v (slot << 32 | gen) is a flow that is still waiting (not one
        that ended while waiting, nor a later flow of the same slot)."""
        cdef uint32_t i = <uint32_t>(v >> 32)
        return (self.tab.e[i].used and self.flows[i].state == A_WAITING
                and self.flows[i].gen == <uint32_t>(v & 0xffffffffu))

    cdef void _compact_waiting(self) noexcept:
        """Drop the ring's entries of flows that ended while waiting (a full ring holds
        some: at most max_flows flows wait at once). In ring order from the head, the n-th
        kept entry goes to the n-th place, never past the one being read."""
        cdef int j, n = 0
        cdef uint64_t v
        for j in range(self.w_len):
            v = self.waiting[(self.w_head + j) % self.max_flows]
            if self._still_waiting(v):
                self.waiting[(self.w_head + n) % self.max_flows] = v
                n += 1
        self.w_len = n

    cdef int start_waiting(self) except -1:
        """Start waiting flows, oldest first, while fewer than ``handshakes`` are set up."""
        cdef uint64_t v
        while self.w_len and self.nstarting < self.handshakes:
            v = self.waiting[self.w_head]
            self.w_head = (self.w_head + 1) % self.max_flows
            self.w_len -= 1
            if self._still_waiting(v):
                self.flow_start(<int>(v >> 32))
        return 0

    cdef int flow_start(self, int i) except -1:
        """Waiting flow i's sockets and its connect (refused: the flow ends, counted)."""
        socks = self._connect()
        if socks is None:
            self.flow_close(i, C_ASSOC_REFUSED)
        else:
            self._attach(i, socks)
        return 0

    cdef object _connect(self):
        """(UDP socket, TCP socket connecting to the server) of a new association, or None
        (out of descriptors, or the connect refused at once: logged)."""
        u = t = None
        try:
            u = flow_socket(self.family, socket.SOCK_DGRAM, self.fd_ceiling)
            if u is not None:
                t = flow_socket(self.family, socket.SOCK_STREAM, self.fd_ceiling)
            if t is None:                     # out of descriptors
                if u is not None:
                    u.close()
                return None
            u.setblocking(False)
            v6 = self.family == socket.AF_INET6
            if self.mark:
                u.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            _sockopt.bind_outbound(u, self.outbound, v6, wildcard=True)
            t.setblocking(False)
            if self.mark:
                t.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            _sockopt.tcp_client(t, self.outbound, v6)
            err = t.connect_ex(self.addr)
            if err not in (0, _errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
        except OSError as e:
            self.loglim(logging.WARNING, "SOCKS5 association via %s:%s failed: %s",
                        self.server[0], self.server[1], e)
            for sock in (u, t):
                if sock is not None:
                    sock.close()
            return None
        return u, t

    cdef int _attach(self, int i, socks) except -1:
        """Flow i connecting with socks (from _connect)."""
        cdef aflow_t *a = &self.flows[i]
        u, t = socks
        a.deadline = self.now + CONNECT_TIMEOUT
        a.state = A_CONNECTING
        self.nstarting += 1
        a.udp_fd = u.detach()
        a.tcp_fd = t.detach()
        try:
            epoll_set(self.epfd, EPOLL_CTL_ADD, a.tcp_fd, EPOLLIN | EPOLLOUT, KIND_TCP, i)
            epoll_set(self.epfd, EPOLL_CTL_ADD, a.udp_fd, EPOLLIN, KIND_UDP, i)
        except OSError as e:
            self.loglim(logging.WARNING, "SOCKS5 association via %s:%s failed: %s",
                        self.server[0], self.server[1], e)
            self.flow_close(i, C_ASSOC_REFUSED)
        return 0

    cdef int flow_close(self, int i, int counter) except -1:
        cdef aflow_t *a = &self.flows[i]
        if not self.tab.e[i].used:
            return 0
        if self.sb.n and self.sb.fd == a.udp_fd:
            self.c_flush()                    # datagrams batched for this socket go first
        if a.tcp_fd >= 0:
            close(a.tcp_fd)
        if a.udp_fd >= 0:
            close(a.udp_fd)
        if a.state == A_UP:
            self.st[C_CONN_OPEN] -= 1
            self.nup -= 1
        elif a.state == A_CONNECTING or a.state == A_HANDSHAKE:
            self.nstarting -= 1
        self.queued -= a.qcap
        free(a.queue)
        a.queue = NULL
        a.qcap = a.qlen = 0
        a.state = 0
        a.tcp_fd = a.udp_fd = -1
        table_remove(&self.tab, i)
        self.hs.pop(i, None)
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
            self.flow_close(i, -1)
        return 0

    cdef int c_send(self, const sockaddr_any *client, const sockaddr_any *dst,
                    const uint8_t *data, size_t n) except -1:
        cdef akey_t k
        cdef int32_t i
        cdef aflow_t *a
        cdef size_t hl, need
        cdef uint32_t ln
        cdef uint8_t *slot
        if n > MAX_PAYLOAD:
            self.st[C_DROP_TOO_BIG] += 1
            return 0
        akey_from_sockaddr(client, &k)
        i = table_find(&self.tab, &k)
        if i < 0:
            i = self.flow_open(client, &k, dst)
            if i < 0:
                return 0
        table_touch(&self.tab, i, self.now)
        akey_from_sockaddr(dst, &self.tab.e[i].aux)
        flow_out(&self.tab.e[i], &self.groups, 1, n)
        a = &self.flows[i]
        if a.state != A_UP:
            # [len(4)] [SOCKS UDP header] [data]
            need = 4 + 22 + n
            if self.queue_limit - a.qlen < need:
                self.st[C_QUEUE_DROPS] += 1
                return 0
            if a.qcap - a.qlen < need and self._queue_grow(a, a.qlen + need) < 0:
                self.st[C_QUEUE_DROPS] += 1
                return 0
            slot = a.queue + a.qlen
            hl = write_udp_req_hdr(slot + 4, dst)
            memcpy(slot + 4 + hl, data, n)
            ln = <uint32_t>(hl + n)
            memcpy(slot, &ln, 4)
            a.qlen += 4 + hl + n
            return 0
        if self.sb.n and (self.sb.fd != a.udp_fd or sq_full(&self.sb)):
            self.c_flush()
        slot = self.scratch + <size_t>self.sb.niov * (DGRAM_SLOT + UDP_HDR_ROOM)
        hl = write_udp_req_hdr(slot, dst)
        memcpy(slot + hl, data, n)
        self.sb.fd = a.udp_fd
        sq_add(&self.sb, &a.relay, sa_len(&a.relay), slot, hl + n)
        self.st[C_UP_DATAGRAMS] += 1
        self.st[C_UP_BYTES] += n
        return 0

    cdef int _queue_grow(self, aflow_t *a, size_t want) noexcept:
        """Room for want bytes in a's queue (doubling, at most queue_limit), within what all
        queues may hold together; -1 when there is none."""
        cdef size_t cap = a.qcap * 2 if a.qcap else 2048
        cdef uint8_t *q
        while cap < want:
            cap *= 2
        if cap > self.queue_limit:
            cap = self.queue_limit
        if self.queued - a.qcap + cap > self.queued_max:
            return -1
        q = <uint8_t *>realloc(a.queue, cap)
        if q == NULL:
            return -1
        self.queued += cap - a.qcap
        a.queue, a.qcap = q, cap
        return 0

    cdef int c_flush(self) except -1:
        if self.sb.n:
            sq_flush(&self.sb, self.st, -1, -1)
        return 0

    cdef int flow_send_queue(self, int i) except -1:
        cdef aflow_t *a = &self.flows[i]
        cdef size_t pos = 0
        cdef uint32_t ln
        cdef ssize_t r
        while pos < a.qlen:
            memcpy(&ln, a.queue + pos, 4)
            r = sendto(a.udp_fd, a.queue + pos + 4, ln, MSG_DONTWAIT, &a.relay.sa,
                       sa_len(&a.relay))
            if r < 0:
                self.st[C_DROP_SEND_ERROR] += 1
            else:
                self.st[C_UP_DATAGRAMS] += 1
                self.st[C_UP_BYTES] += ln - (10 if a.queue[pos + 4 + 3] == 1 else 22)
            pos += 4 + ln
        self.queued -= a.qcap
        a.qlen = a.qcap = 0
        free(a.queue)
        a.queue = NULL
        return 0

    cdef int flow_handshake(self, int i, uint32_t events) except -1:
        cdef aflow_t *a = &self.flows[i]
        cdef int err = 0
        cdef socklen_t elen = sizeof(int)
        cdef sockaddr_any relay
        if a.state == A_CONNECTING:
            getsockopt(a.tcp_fd, SOL_SOCKET, SO_ERROR, &err, &elen)
            if err or events & (EPOLLERR | EPOLLHUP):
                self.loglim(logging.WARNING, "SOCKS5 server %s:%s: %s", self.server[0],
                            self.server[1], os.strerror(err) if err else "connection failed")
                self.flow_close(i, C_ASSOC_REFUSED)
                return 0
            hs = _proto.ClientHandshake(cmd=_proto.CMD_UDP_ASSOCIATE,
                                        host="::" if self.family == socket.AF_INET6 else "0.0.0.0",
                                        user=self.user, password=self.password)
            self.hs[i] = hs
            a.state = A_HANDSHAKE
            epoll_set(self.epfd, EPOLL_CTL_MOD, a.tcp_fd, EPOLLIN | EPOLLRDHUP, KIND_TCP, i)
            try:
                os.write(a.tcp_fd, hs.start())
            except OSError as e:
                self.flow_close(i, C_ASSOC_REFUSED)
            return 0
        hs = self.hs[i]
        try:
            data = os.read(a.tcp_fd, 4096)
            if not data:
                raise OSError("SOCKS5 server closed the connection during the handshake")
            out = hs.feed(data)
            if out:
                os.write(a.tcp_fd, out)
            if not hs.done:
                return 0
            host, port = hs.bound
            if host in ("0.0.0.0", "::"):
                host = self.addr[0]
            fam, raddr = _resolve((host, port), socket.SOCK_DGRAM)
            if fam != self.family:
                raise OSError(f"relay address {host} is not of the server's family")
            sockaddr_from_tuple(raddr[:2], &relay)
        except BlockingIOError:
            return 0
        except (OSError, ValueError) as e:
            self.loglim(logging.WARNING, "SOCKS5 UDP ASSOCIATE via %s:%s failed: %s",
                        self.server[0], self.server[1], e)
            self.st[C_CONN_REJECTED] += 1
            self.flow_close(i, C_ASSOC_REFUSED)
            return 0
        del self.hs[i]
        memcpy(&a.relay, &relay, sizeof(sockaddr_any))
        a.state = A_UP
        self.nstarting -= 1
        self.nup += 1
        self.st[C_CONN_OPEN] += 1
        self.flow_send_queue(i)
        self.start_waiting()
        return 0

    cdef int flow_recv(self, int i) except -1:
        cdef aflow_t *a = &self.flows[i]
        cdef mmsghdr msgs[MAX_BATCH]
        cdef iovec iovs[MAX_BATCH]
        cdef sockaddr_any names[MAX_BATCH]
        cdef sockaddr_any src
        cdef frame_t f
        cdef Py_ssize_t hl
        cdef int n, j
        for j in range(self.batch):
            iovs[j].iov_base = self.scratch + <size_t>j * (DGRAM_SLOT + UDP_HDR_ROOM)
            iovs[j].iov_len = DGRAM_SLOT + UDP_HDR_ROOM
            msgs[j].msg_hdr.msg_iov = &iovs[j]
            msgs[j].msg_hdr.msg_iovlen = 1
            msgs[j].msg_hdr.msg_name = &names[j]
            msgs[j].msg_hdr.msg_namelen = sizeof(sockaddr_any)
            msgs[j].msg_hdr.msg_control = NULL
            msgs[j].msg_hdr.msg_controllen = 0
            msgs[j].msg_hdr.msg_flags = 0
        with nogil:
            n = recvmmsg(a.udp_fd, msgs, self.batch, MSG_DONTWAIT, NULL)
        if n <= 0:
            return 0
        table_touch(&self.tab, i, self.now)
        for j in range(n):
            if a.state != A_UP or not sa_same(&names[j], &a.relay):
                self.st[C_DROP_MALFORMED] += 1
                continue
            hl = parse_udp_req(<const uint8_t *>iovs[j].iov_base, msgs[j].msg_len, &f)
            if hl < 0:
                self.st[C_DROP_MALFORMED] += 1
                continue
            if f.flow != 0:
                self.st[C_FRAMES_BAD] += 1
                continue
            if frame_to_sockaddr(&f, &src, 0) == 0:
                self.st[C_DROP_NO_ROUTE] += 1
                continue
            self.st[C_DOWN_DATAGRAMS] += 1
            self.st[C_DOWN_BYTES] += f.dlen
            flow_in(&self.tab.e[i], &self.groups, 1, f.dlen)
            if self.reply_fn != NULL:
                self.reply_fn(self.reply_ctx, &a.client, &src, f.data, f.dlen)
        return 0

    cdef int c_process(self) except -1:
        cdef epoll_event evs[EV_MAX]
        cdef int n, j
        cdef uint32_t i, kind, ev
        cdef aflow_t *a
        cdef char junk[512]
        cdef ssize_t r
        with nogil:
            n = epoll_wait(self.epfd, evs, EV_MAX, 0)
        self.now = mono_now()
        for j in range(n):
            i = evs[j].data.u64 & 0xffffffff
            kind = evs[j].data.u64 >> 32
            ev = evs[j].events
            a = &self.flows[i]
            if not self.tab.e[i].used:
                continue
            if kind == KIND_UDP:
                self.flow_recv(i)
            elif a.state != A_UP:
                self.flow_handshake(i, ev)
            else:
                # the control connection: its end ends the association
                r = read(a.tcp_fd, junk, sizeof(junk))
                if r == 0 or (r < 0 and errno != EAGAIN and errno != EINTR):
                    self.flow_close(i, -1)
        return 0

    cdef int c_tick(self, double now) except -1:
        cdef int32_t i, nxt
        self.now = now
        # associations still in their handshake time out (walked while there are some)
        if self.tab.count > self.nup and now >= self.next_expiry:
            self.next_expiry = now + 0.5
            i = self.tab.head
            while i >= 0:
                nxt = self.tab.e[i].next
                if (self.flows[i].state != A_UP and self.flows[i].state != A_WAITING
                        and now > self.flows[i].deadline):
                    self.loglim(logging.WARNING, "SOCKS5 association via %s:%s timed out",
                                self.server[0], self.server[1])
                    self.flow_close(i, C_ASSOC_REFUSED)
                i = nxt
        # idle expiry from the least recently used end: O(associations expired)
        i = table_expired(&self.tab, now)
        while i >= 0:
            self.flow_close(i, C_ASSOC_EXPIRED)
            i = table_expired(&self.tab, now)
        # the turns of handshakes that failed or timed out
        self.start_waiting()
        return 0
