# Included by relay/datapath/tunnel.pyx: UpstreamCore and TunnelUpstream: the tunnel client core (relay tunnel-server or gost).

cdef class UpstreamCore:
    def __cinit__(self, *args, **kw):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise_oserror(errno, "epoll_create1")
        self.reply_fn = NULL
        self.reply_ctx = NULL

    def _init_stats(self, stats, log, client_groups=()):
        self._stats_ref = _stats_view(stats)
        self.st = stats_ptr(self._stats_ref)
        check_group_words(client_groups, self._stats_ref)
        groups_init(&self.groups, client_groups, self._stats_ref, N_COUNTERS)
        self.log = log or DEF_LOG
        self.now = mono_now()

    @property
    def stats(self):
        return self._stats_ref

    def fileno(self):
        return self.epfd

    def snapshot(self, int n, int sort, bint by_client=False, int clients_cap=4096):
        """The top n flows by sort as relay.flows rows (the destination: the latest a
        flow sent to), or, by_client, summed per client address (see Engine.flows)."""
        return table_snapshot(&self.tab, None, n, sort, by_client, clients_cap, mono_now(),
                              ROWS_FLOWS_DST)

    cdef int c_send(self, const sockaddr_any *client, const sockaddr_any *dst,
                    const uint8_t *data, size_t n) except -1:
        return 0

    cdef int c_flush(self) except -1:
        return 0

    cdef int c_process(self) except -1:
        return 0

    cdef int c_tick(self, double now) except -1:
        return 0

    cdef int c_forget(self, const sockaddr_any *client) except -1:
        return 0

    # Python probes of the C interface (tests, tools); replies are collected in a list.
    def send(self, client, dst, data):
        """Queue one datagram of flow `client` for `dst` (flush() writes it)."""
        cdef sockaddr_any c, d
        cdef bytes b = bytes(data)
        sockaddr_from_tuple(tuple(client), &c)
        sockaddr_from_tuple(tuple(dst), &d)
        self.c_send(&c, &d, <const uint8_t *><const char *>b, len(b))

    def flush(self):
        self.c_flush()

    def forget(self, client):
        """End the flow of `client` (it moved to another upstream), counted nowhere."""
        cdef sockaddr_any c
        sockaddr_from_tuple(tuple(client), &c)
        self.c_forget(&c)

    def process(self):
        self.c_process()

    def tick(self, double now=0):
        self.c_tick(now if now else mono_now())

    def collect_replies(self, list into):
        """Deliver replies as (client, src, bytes) tuples appended to `into`."""
        self._collector = into
        self.reply_ctx = <void *>into
        self.reply_fn = _collect_reply

    def close(self):
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)
        groups_free(&self.groups)


cdef int _collect_reply(void *ctx, const sockaddr_any *client, const sockaddr_any *src,
                        const uint8_t *data, size_t n) except -1:
    (<list>ctx).append((sockaddr_to_tuple(&client.sa), sockaddr_to_tuple(&src.sa),
                        (<const char *>data)[:n]))
    return 0


cdef enum:
    S_DOWN = 0
    S_CONNECTING = 1
    S_HANDSHAKE = 2
    S_UP = 3

cdef double BACKOFF_MIN = 0.05
cdef double BACKOFF_MAX = 2.0
cdef double CONNECT_TIMEOUT = 5.0
cdef double CHECK_INTERVAL = 0.02       # connection upkeep at most this often


def _resolve(server, int socktype=socket.SOCK_STREAM):
    host, port = server
    infos = socket.getaddrinfo(host, port, 0, socktype)
    if not infos:
        raise ValueError(f"cannot resolve {host!r}")
    fam, _, _, _, addr = infos[0]
    return fam, addr


cdef class TunnelUpstream(UpstreamCore):
    """Tunnel client core, flows keyed by client address. Multiplexed (CMD 0xFA): flows
    spread over `connections` TCP connections, frames carry flow ids. gost=True: one
    connection per flow (CMD 0xF3, RFC 1929 user/password), opened when the flow starts,
    closed when it idles out, its buffers allocated and freed with it. Connections
    reconnect with backoff; frames queue while down (queue_limit bytes per connection).

    At most max_flows flows (relay/datapath/table.pxd, like the engine's associations): a
    new client at the cap evicts the least recently used flow (assoc_evicted; a gost flow's
    connection and queued frames go with it, a multiplexed flow's id is retired); flows
    idle for `timeout` expire from the LRU end; a gost connection whose descriptor lies
    within FD_RESERVE of the soft limit is closed and its flow refused (assoc_refused)."""

    def __init__(self, server, secret=None, int connections=1, mark=None, stats=None,
                 queue_limit=None, double timeout=60.0, int max_flows=4096, log=None,
                 bint gost=False, user=None, password=None, port_timeouts=(), client_groups=(),
                 outbound=None):
        if not 1 <= connections <= 64:
            raise ValueError(f"connections must be 1-64, got {connections}")
        if not 1 <= max_flows <= 65536:
            raise ValueError(f"max_flows must be 1-65536, got {max_flows}")
        _proto.check_client_options(gost, secret, connections, user, password)
        if queue_limit is None:
            queue_limit = _proto.GOST_QUEUE_LIMIT if gost else _proto.MUX_QUEUE_LIMIT
        if queue_limit < MAX_PAYLOAD + MAX_FRAME_HEADER:
            raise ValueError(f"queue_limit must be at least {MAX_PAYLOAD + MAX_FRAME_HEADER}")
        self._init_stats(stats, log, client_groups)
        self.server = tuple(server)
        self.family, self.addr = _resolve(self.server)
        self.secret, self.user, self.password, self.mark = secret, user, password, mark
        self.outbound = outbound
        self.gost = gost
        self.mux = not gost
        self.say = LogLimiter(self.log)
        self.timeout = timeout
        self.queue_limit = queue_limit
        self.rx_cap = _proto.GOST_RX_CAP if gost else RX_CAP
        self.nconns = max_flows if gost else connections
        self.max_flows = max_flows
        self.hs = {}
        self.conns = <cconn_t *>calloc(self.nconns, sizeof(cconn_t))
        self.dirty = <int *>calloc(self.nconns, sizeof(int))
        self.flows = <cflow_t *>calloc(max_flows, sizeof(cflow_t))
        if self.conns == NULL or self.dirty == NULL or self.flows == NULL:
            raise MemoryError()
        table_new(&self.tab, max_flows)
        self.pclass = table_timeouts(&self.tab, timeout, port_timeouts)
        self.fd_ceiling = fd_ceiling()
        for i in range(self.nconns):
            self.conns[i].fd = -1
            self.conns[i].backoff = BACKOFF_MIN
        if not gost:
            for i in range(connections):
                self.conn_open_buffers(i)
        self.c_tick(mono_now())

    def __dealloc__(self):
        if self.conns != NULL:
            for i in range(self.nconns):
                if self.conns[i].fd >= 0:
                    close(self.conns[i].fd)
                free(self.conns[i].rx)
                free(self.conns[i].tx)
            free(self.conns)
        free(self.dirty)
        free(self.flows)
        table_free(&self.tab)

    def close(self):
        for i in range(self.nconns):
            if self.conns[i].fd >= 0:
                self.conn_close(i)
        UpstreamCore.close(self)

    @property
    def connected(self):
        """Number of connections whose handshake is done."""
        return self.nup

    @property
    def flows_open(self):
        return self.tab.count

    cdef int conn_open_buffers(self, int i) except -1:
        """Give connection i its receive buffer and send queue (for a gost flow: when the
        flow starts); -1 raised as MemoryError."""
        cdef cconn_t *c = &self.conns[i]
        c.rx = <uint8_t *>malloc(self.rx_cap)
        c.tx = <uint8_t *>malloc(self.queue_limit)
        if c.rx == NULL or c.tx == NULL:
            free(c.rx)
            free(c.tx)
            c.rx = c.tx = NULL
            raise MemoryError()
        c.fd = -1
        c.state = S_DOWN
        c.next_try = 0
        c.backoff = BACKOFF_MIN
        c.rx_len = c.tx_frame = c.tx_start = c.tx_end = 0
        c.want_out = c.ever_up = False
        return 0

    cdef int conn_shut(self, int i) except -1:
        """Close connection i's socket: 1 when its handshake had been done, else 0."""
        cdef cconn_t *c = &self.conns[i]
        cdef int was_up = c.state == S_UP
        if c.fd >= 0:
            close(c.fd)
            c.fd = -1
        if was_up:
            self.st[C_CONN_OPEN] -= 1
            self.nup -= 1
        c.state = S_DOWN
        self.hs.pop(i, None)
        return was_up

    cdef int conn_close(self, int i) except -1:
        """Close connection i for good (its flow ended, or the core closes)."""
        cdef cconn_t *c = &self.conns[i]
        self.conn_shut(i)
        if self.gost:
            free(c.rx)
            free(c.tx)
            c.rx = c.tx = NULL
        return 0

    cdef object conn_name(self, int i):
        if self.gost:
            return "gost connection of flow %s:%s" % sockaddr_to_tuple(&self.flows[i].client.sa)
        return f"tunnel connection {i}"

    cdef int flow_for(self, const sockaddr_any *client, const sockaddr_any *dst) except -2:
        """The flow slot of client, a new flow if it has none (the least recently used one
        evicted at the cap); -1 when it is refused (counted)."""
        cdef akey_t k
        cdef int32_t i
        cdef cflow_t *fl
        akey_from_sockaddr(client, &k)
        i = table_find(&self.tab, &k)
        if i >= 0:
            return i
        if self.tab.count >= self.tab.cap:
            self.flow_end(self.tab.tail, C_ASSOC_EVICTED)
        i = table_insert(&self.tab, &k, self.now)
        set_flow_class(&self.tab, i, self.pclass, ntohs(dst.v4.sin_port))   # sin6_port: same place
        self.tab.e[i].group = group_of(&self.groups, &k)
        fl = &self.flows[i]
        memcpy(&fl.client, client, sizeof(sockaddr_any))
        fl.gen += 1
        fl.id = (<uint32_t>fl.gen << 16) | <uint32_t>i
        if self.gost:
            fl.conn = i
            try:
                self.conn_open_buffers(i)
            except MemoryError:
                table_remove(&self.tab, i)
                self.st[C_ASSOC_REFUSED] += 1
                return -1
            if self.conn_connect(i):
                self.conn_close(i)
                table_remove(&self.tab, i)
                self.st[C_ASSOC_REFUSED] += 1
                return -1
        else:
            fl.conn = self.next_conn
            self.next_conn = (self.next_conn + 1) % self.nconns
        self.st[C_ASSOC_CREATED] += 1
        self.st[C_ASSOC_OPEN] += 1
        return i

    cdef int flow_end(self, int i, int counter) except -1:
        """End flow i (evicted, expired or refused: counter, or -1): a gost flow's connection
        closes with its queued frames; a multiplexed flow's id is retired (replies still on
        their way for it are dropped as no-route; the slot's next flow has a new id)."""
        if self.gost:
            self.conn_close(i)
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
            self.flow_end(i, -1)
        return 0

    cdef int c_send(self, const sockaddr_any *client, const sockaddr_any *dst,
                    const uint8_t *data, size_t n) except -1:
        cdef int f, ci
        cdef cconn_t *c
        cdef size_t need
        if n > MAX_PAYLOAD:
            self.st[C_DROP_TOO_BIG] += 1
            return 0
        if n == 0 and self.gost:
            # gost reads RSV = 0 as "length unknown": an empty datagram cannot be framed
            self.st[C_DROP_MALFORMED] += 1
            return 0
        f = self.flow_for(client, dst)
        if f < 0:
            return 0
        table_touch(&self.tab, f, self.now)
        akey_from_sockaddr(dst, &self.tab.e[f].aux)
        flow_out(&self.tab.e[f], &self.groups, 1, n)
        ci = self.flows[f].conn
        c = &self.conns[ci]
        need = frame_hdr_len(dst, self.mux) + n
        if self.queue_limit - c.tx_end < need and c.tx_frame:
            memmove(c.tx, c.tx + c.tx_frame, c.tx_end - c.tx_frame)
            c.tx_start -= c.tx_frame
            c.tx_end -= c.tx_frame
            c.tx_frame = 0
        if self.queue_limit - c.tx_end < need:
            self.st[C_DROP_BUFFER_FULL if c.state == S_UP else C_QUEUE_DROPS] += 1
            return 0
        c.tx_end += write_frame_hdr(c.tx + c.tx_end, dst, self.flows[f].id, self.mux, n)
        memcpy(c.tx + c.tx_end, data, n)
        c.tx_end += n
        if not c.dirty:
            c.dirty = True
            self.dirty[self.ndirty] = ci
            self.ndirty += 1
        self.st[C_UP_DATAGRAMS] += 1
        self.st[C_UP_BYTES] += n
        return 0

    cdef int c_flush(self) except -1:
        cdef int j, i
        for j in range(self.ndirty):
            i = self.dirty[j]
            self.conns[i].dirty = False
            if self.conns[i].state == S_UP and not self.conns[i].want_out:
                self.conn_write(i)
        self.ndirty = 0
        return 0

    cdef int conn_write(self, int i) except -1:
        cdef cconn_t *c = &self.conns[i]
        cdef ssize_t n
        cdef size_t fl
        cdef int e
        if c.state != S_UP:
            return 0
        if c.tx_end > c.tx_start:
            with nogil:
                n = c_send(c.fd, c.tx + c.tx_start, c.tx_end - c.tx_start,
                           MSG_NOSIGNAL | MSG_DONTWAIT)
            if n < 0:
                e = errno
                if e != EAGAIN and e != EINTR:
                    self.conn_down(i, os.strerror(e))
                    return 0
                n = 0
            c.tx_start += n
            # keep tx_frame on a frame boundary at or before tx_start
            while c.tx_frame < c.tx_start:
                fl = own_frame_len(c.tx + c.tx_frame, self.mux)
                if c.tx_frame + fl > c.tx_start:
                    break
                c.tx_frame += fl
        if c.tx_start == c.tx_end:
            c.tx_start = c.tx_end = c.tx_frame = 0
            if c.want_out:
                c.want_out = False
                epoll_set(self.epfd, EPOLL_CTL_MOD, c.fd, EPOLLIN | EPOLLRDHUP, KIND_CONN, i)
        elif not c.want_out:
            c.want_out = True
            epoll_set(self.epfd, EPOLL_CTL_MOD, c.fd, EPOLLIN | EPOLLOUT | EPOLLRDHUP,
                      KIND_CONN, i)
        return 0

    cdef int conn_down(self, int i, str why) except -1:
        """Connection i failed or was lost: retry after the backoff."""
        cdef cconn_t *c = &self.conns[i]
        cdef size_t fl
        if self.conn_shut(i):
            self.say(logging.WARNING, "%s to %s:%s lost (%s); reconnecting",
                     self.conn_name(i), self.server[0], self.server[1], why)
        elif why:
            self.say(logging.INFO, "%s to %s:%s failed (%s); retry in %.2fs",
                     self.conn_name(i), self.server[0], self.server[1], why, c.backoff)
        c.want_out = False
        c.next_try = self.now + c.backoff
        c.backoff = min(c.backoff * 2, BACKOFF_MAX)
        c.rx_len = 0
        # A frame cut by the disconnect is lost; whole frames after it wait for the next
        # connection.
        if c.tx_frame < c.tx_start:
            fl = own_frame_len(c.tx + c.tx_frame, self.mux)
            c.tx_frame += fl
            self.st[C_QUEUE_DROPS] += 1
        c.tx_start = c.tx_frame
        return 0

    cdef int conn_connect(self, int i) except -1:
        """Start connecting connection i: 0 (connecting, or failed and retried after the
        backoff), or 1 when the process is out of descriptors for a gost flow's connection
        (none left, or one within FD_RESERVE of the limit): the caller refuses the flow."""
        cdef cconn_t *c = &self.conns[i]
        s = flow_socket(self.family, socket.SOCK_STREAM, self.fd_ceiling if self.gost else FD_LIMIT_MAX)
        if s is None:
            if self.gost:
                return 1
            self.conn_down(i, "out of descriptors")
            return 0
        try:
            s.setblocking(False)
            if self.mark:
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            _sockopt.tcp_client(s, self.outbound, self.family == AF_INET6)
            err = s.connect_ex(self.addr)
        except OSError as e:
            s.close()
            self.conn_down(i, str(e))
            return 0
        if err not in (0, _errno.EINPROGRESS):
            s.close()
            self.conn_down(i, os.strerror(err))
            return 0
        c.fd = s.detach()
        c.state = S_CONNECTING
        c.deadline = self.now + CONNECT_TIMEOUT
        epoll_set(self.epfd, EPOLL_CTL_ADD, c.fd, EPOLLOUT | EPOLLIN, KIND_CONN, i)
        return 0

    cdef int conn_handshake(self, int i, uint32_t events) except -1:
        cdef cconn_t *c = &self.conns[i]
        cdef int err = 0
        cdef socklen_t elen = sizeof(int)
        if c.state == S_CONNECTING:
            getsockopt(c.fd, SOL_SOCKET, SO_ERROR, &err, &elen)
            if err or events & (EPOLLERR | EPOLLHUP):
                self.conn_down(i, os.strerror(err) if err else "connection failed")
                return 0
            hs = _proto.ClientHandshake(
                cmd=_proto.CMD_UDP_TUN if self.gost else _proto.CMD_UDP_TUN_MUX,
                secret=self.secret, user=self.user, password=self.password)
            self.hs[i] = hs
            c.state = S_HANDSHAKE
            epoll_set(self.epfd, EPOLL_CTL_MOD, c.fd, EPOLLIN | EPOLLRDHUP, KIND_CONN, i)
            try:
                os.write(c.fd, hs.start())
            except OSError as e:
                self.conn_down(i, str(e))
            return 0
        hs = self.hs[i]
        try:
            data = os.read(c.fd, 4096)
            if not data:
                self.conn_down(i, "server closed the connection during the handshake")
                return 0
            out = hs.feed(data)
            if out:
                os.write(c.fd, out)
        except BlockingIOError:
            return 0
        except (OSError, ValueError) as e:
            self.st[C_CONN_REJECTED] += 1
            if self.mux and getattr(e, "rep", None) == _proto.REP_CMD_UNSUPPORTED:
                if not self.rep7_logged:
                    self.rep7_logged = True
                    self.log.error(_proto.REP7_HINT, self.server[0], self.server[1])
                self.conn_down(i, None)
            else:
                self.conn_down(i, f"handshake: {e}")
            return 0
        if not hs.done:
            return 0
        del self.hs[i]
        c.state = S_UP
        c.backoff = BACKOFF_MIN
        self.nup += 1
        self.st[C_CONN_OPEN] += 1
        if c.ever_up:
            self.st[C_CONN_RECONNECTS] += 1
            self.say(logging.WARNING, "%s to %s:%s re-established", self.conn_name(i),
                     self.server[0], self.server[1])
        c.ever_up = True
        left = hs.leftover
        if left:
            memcpy(c.rx, <const char *>left, len(left))
            c.rx_len = len(left)
            self.conn_frames(i)
        self.conn_write(i)
        return 0

    cdef int conn_read(self, int i) except -1:
        cdef cconn_t *c = &self.conns[i]
        cdef ssize_t n
        with nogil:
            n = read(c.fd, c.rx + c.rx_len, self.rx_cap - c.rx_len)
        if n == 0:
            self.conn_down(i, "server closed the connection")
            return 0
        if n < 0:
            if errno == EAGAIN or errno == EINTR:
                return 0
            self.conn_down(i, os.strerror(errno))
            return 0
        c.rx_len += n
        return self.conn_frames(i)

    cdef int conn_frames(self, int i) except -1:
        cdef cconn_t *c = &self.conns[i]
        cdef size_t pos = 0
        cdef Py_ssize_t r
        cdef frame_t f
        cdef sockaddr_any src
        cdef uint32_t slot
        cdef cflow_t *fl
        while pos < c.rx_len:
            r = parse_frame(c.rx + pos, c.rx_len - pos, self.mux, MAX_PAYLOAD, &f)
            if r == 0:
                break
            if r < 0:
                self.st[C_FRAMES_BAD] += 1
                self.conn_down(i, f"bad frame from server: {FRAME_ERROR_TEXT[-r]}")
                return 0
            pos += r
            slot = i if self.gost else f.flow & 0xffff
            if slot >= <uint32_t>self.max_flows or not self.tab.e[slot].used or \
                    (self.mux and self.flows[slot].id != f.flow):
                self.st[C_DROP_NO_ROUTE] += 1
                continue
            if frame_to_sockaddr(&f, &src, 0) == 0:
                self.st[C_DROP_NO_ROUTE] += 1
                continue
            fl = &self.flows[slot]
            table_touch(&self.tab, slot, self.now)
            flow_in(&self.tab.e[slot], &self.groups, 1, f.dlen)
            self.st[C_DOWN_DATAGRAMS] += 1
            self.st[C_DOWN_BYTES] += f.dlen
            if self.reply_fn != NULL:
                self.reply_fn(self.reply_ctx, &fl.client, &src, f.data, f.dlen)
        if pos < c.rx_len:
            memmove(c.rx, c.rx + pos, c.rx_len - pos)
        c.rx_len -= pos
        return 0

    cdef int c_process(self) except -1:
        cdef epoll_event evs[EV_MAX]
        cdef int n, j
        cdef uint32_t i, ev
        cdef cconn_t *c
        with nogil:
            n = epoll_wait(self.epfd, evs, EV_MAX, 0)
        self.now = mono_now()
        for j in range(n):
            i = evs[j].data.u64 & 0xffffffff
            ev = evs[j].events
            c = &self.conns[i]
            if c.fd < 0:
                continue
            if c.state == S_CONNECTING or c.state == S_HANDSHAKE:
                self.conn_handshake(i, ev)
                continue
            if ev & EPOLLOUT:
                self.conn_write(i)
            if c.state == S_UP and ev & (EPOLLIN | EPOLLHUP | EPOLLERR | EPOLLRDHUP):
                self.conn_read(i)
        return 0

    cdef int conn_upkeep(self, int i, double now) except -1:
        """Connect or reconnect connection i when its backoff is over, or time out its
        connect or handshake."""
        cdef cconn_t *c = &self.conns[i]
        if c.state == S_DOWN and now >= c.next_try:
            if self.conn_connect(i):
                self.flow_end(i, C_ASSOC_REFUSED)       # a gost flow out of descriptors
        elif (c.state == S_CONNECTING or c.state == S_HANDSHAKE) and now > c.deadline:
            self.conn_down(i, "timed out")
        return 0

    cdef int c_tick(self, double now) except -1:
        cdef int32_t i, nxt
        self.now = now
        # connect, reconnect, time out handshakes: only while some connection is not up
        # (gost: the connections of the flows open, walked along the LRU list)
        if (self.tab.count if self.gost else self.nconns) > self.nup and now >= self.next_check:
            self.next_check = now + CHECK_INTERVAL
            if self.gost:
                i = self.tab.head
                while i >= 0:
                    nxt = self.tab.e[i].next
                    self.conn_upkeep(i, now)
                    i = nxt
            else:
                for i in range(self.nconns):
                    self.conn_upkeep(i, now)
        # idle expiry from the least recently used end: O(flows expired)
        i = table_expired(&self.tab, now)
        while i >= 0:
            self.flow_end(i, C_ASSOC_EXPIRED)
            i = table_expired(&self.tab, now)
        return 0
