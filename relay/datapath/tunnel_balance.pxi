# Included by relay/datapath/tunnel.pyx: BalancedUpstream, several upstreams behind one
# listener (pure twin: relay/datapath/pure/balance.py, which explains the policy).

cdef enum:
    MAX_UPSTREAMS = 16

BALANCE_MODES = ("failover", "hash")


cdef uint64_t _upstream_seed(str name):
    """FNV-1a (64 bits) of an upstream's name: its rendezvous seed (pure: upstream_seed)."""
    cdef uint64_t h = 0xcbf29ce484222325ULL
    cdef bytes b = name.encode()
    cdef const uint8_t *p = <const uint8_t *><const char *>b
    cdef Py_ssize_t j
    for j in range(len(b)):
        h = (h ^ p[j]) * 0x100000001b3ULL
    return h


cdef inline uint64_t _hrw_score(const akey_t *k, uint64_t seed) noexcept nogil:
    """The rendezvous score of client IP k.addr for an upstream (pure: hrw_score): the
    address read as two big-endian halves, whatever the host's byte order."""
    cdef uint64_t hi = 0, lo = 0
    cdef int j
    for j in range(8):
        hi = (hi << 8) | k.addr[j]
        lo = (lo << 8) | k.addr[8 + j]
    return mix64(mix64(mix64(seed ^ <uint64_t>(4 if k.family == AF_INET else 6)) ^ hi) ^ lo)


cdef int _balance_reply(void *ctx, const sockaddr_any *client, const sockaddr_any *src,
                        const uint8_t *data, size_t n) except -1:
    """A reply from a child core: the flow is in use; on to the balancer's receiver."""
    cdef BalancedUpstream b = <BalancedUpstream>ctx
    cdef akey_t k
    cdef int32_t i
    akey_from_sockaddr(client, &k)
    i = table_find(&b.tab, &k)
    if i >= 0:
        table_touch(&b.tab, i, b.now)
    if b.reply_fn != NULL:
        b.reply_fn(b.reply_ctx, client, src, data, n)
    return 0


cdef class BalancedUpstream(UpstreamCore):
    """Several upstreams: each flow (client address and port) goes to one child core.
    balance="failover": the first healthy upstream of the list; "hash": the healthy one of
    highest rendezvous score for the client's IP address (a client's flows share one
    upstream; losing one moves only its clients). A flow whose upstream is down moves to
    the next healthy one (upstream_failover), and the upstream it left ends it (c_forget);
    failover mode leaves it there when the first comes back, hash mode moves it back to the
    client's own upstream.

    Health is one flag per upstream, read per datagram and never checked here: what
    set_health last said (relay/services/health.py's background checks; healthy until told
    otherwise) and, by_conn[i] true (a multiplexed TunnelUpstream), while its own
    connection's handshake is done. At most max_flows flows (relay/datapath/table.pxd, the children's cap and
    timeouts): the children end and count their flows themselves."""

    def __init__(self, upstreams, names, balance="failover", by_conn=None, stats=None,
                 log=None, int max_flows=4096, double timeout=60.0, port_timeouts=()):
        cdef UpstreamCore kid
        cdef epoll_event ev
        cdef int i
        upstreams, names = list(upstreams), [str(n) for n in names]
        if not 1 <= len(upstreams) <= MAX_UPSTREAMS:
            raise ValueError(f"1-{MAX_UPSTREAMS} upstreams, got {len(upstreams)}")
        if len(names) != len(upstreams):
            raise ValueError("one name per upstream")
        if balance not in BALANCE_MODES:
            raise ValueError(f"balance must be one of {', '.join(BALANCE_MODES)}, got {balance!r}")
        if not 1 <= max_flows <= 65536:
            raise ValueError(f"max_flows must be 1-65536, got {max_flows}")
        for kid in upstreams:           # a TypeError for anything but a core
            pass
        self._init_stats(stats, log)
        self.kids, self.names, self.nkids = upstreams, names, len(upstreams)
        self.hashed = balance == "hash"
        self.max_flows = max_flows
        by_conn = list(by_conn or [False] * self.nkids)
        self.cur = <uint8_t *>calloc(max_flows, 1)
        self.own = <uint8_t *>calloc(max_flows, 1)
        if self.cur == NULL or self.own == NULL:
            raise MemoryError()
        table_new(&self.tab, max_flows)
        self.pclass = table_timeouts(&self.tab, timeout, port_timeouts)
        for i in range(self.nkids):
            kid = upstreams[i]
            self.seeds[i] = _upstream_seed(names[i])
            self.by_conn[i] = bool(by_conn[i]) and isinstance(kid, TunnelUpstream)
            self.healthy[i] = self.probe_ok[i] = 1
            self.nflows[i] = 0
            kid.reply_fn = _balance_reply
            kid.reply_ctx = <void *>self
            ev.events = EPOLLIN
            ev.data.u64 = <uint64_t>i
            if epoll_ctl(self.epfd, EPOLL_CTL_ADD, kid.epfd, &ev) < 0:
                raise_oserror(errno, "epoll_ctl(upstream)")
        self.bal_conn_health()

    def __dealloc__(self):
        free(self.cur)
        free(self.own)
        table_free(&self.tab)

    def close(self):
        cdef UpstreamCore kid
        for kid in self.kids:
            kid.reply_fn = NULL
            kid.reply_ctx = NULL
            kid.close()
        UpstreamCore.close(self)

    # -- what stats, health checks and `relay flows` read
    @property
    def upstream_names(self):
        """The upstreams' URLs without credentials: flow_upstream's indices name these."""
        return list(self.names)

    @property
    def health(self):
        return [bool(self.healthy[i]) for i in range(self.nkids)]

    def set_health(self, int i, ok):
        """Upstream i's health from a background check."""
        if not 0 <= i < self.nkids:
            raise IndexError(i)
        self.probe_ok[i] = 1 if ok else 0
        if not self.by_conn[i]:
            self.healthy[i] = self.probe_ok[i]
        self.bal_conn_health()

    def upstream_flows(self):
        """Flows on each upstream now."""
        return [self.nflows[i] for i in range(self.nkids)]

    def flow_upstream(self, client):
        """The index of the upstream flow ``client`` (host, port) uses, or None."""
        cdef sockaddr_any c
        cdef akey_t k
        cdef int32_t i
        sockaddr_from_tuple(tuple(client[:2]), &c)
        akey_from_sockaddr(&c, &k)
        i = table_find(&self.tab, &k)
        return None if i < 0 else self.cur[i]

    def order(self, host):
        """The upstreams a new flow of client IP ``host`` would try, first choice first."""
        cdef sockaddr_any c
        cdef akey_t k
        if not self.hashed:
            return list(range(self.nkids))
        sockaddr_from_tuple((host, 0), &c)
        akey_from_sockaddr(&c, &k)
        return sorted(range(self.nkids), key=lambda i: (-_hrw_score(&k, self.seeds[i]), i))

    @property
    def connected(self):
        return sum(getattr(k, "connected", 0) for k in self.kids)

    @property
    def flows_open(self):
        return self.tab.count

    def snapshot(self, int n, int sort, bint by_client=False, int clients_cap=4096):
        """relay flows rows of every child (each flow's counters live in the child that
        carries it), a flow row with the child's name appended (relay.flows.row_dict
        reads it as the upstream); the top n of them (per client: the worker merges)."""
        return balanced_rows(self.kids, self.names, n, sort, by_client, clients_cap)

    # -- the data path
    cdef int bal_pick(self, const akey_t *k, int *first) noexcept:
        """The healthy upstream of best rank for client k (failover: the lowest index;
        hash: the highest score), or the best one when none is healthy; *first: the best
        one whatever its health."""
        cdef int i, best = -1, top = -1
        cdef uint64_t s, sbest = 0, stop = 0
        if not self.hashed:
            first[0] = 0
            for i in range(self.nkids):
                if self.healthy[i]:
                    return i
            return 0
        for i in range(self.nkids):
            s = _hrw_score(k, self.seeds[i])
            if top < 0 or s > stop:
                top, stop = i, s
            if self.healthy[i] and (best < 0 or s > sbest):
                best, sbest = i, s
        first[0] = top
        return best if best >= 0 else top

    cdef int c_send(self, const sockaddr_any *client, const sockaddr_any *dst,
                    const uint8_t *data, size_t n) except -1:
        cdef akey_t k
        cdef int32_t i
        cdef int to, first
        akey_from_sockaddr(client, &k)
        i = table_find(&self.tab, &k)
        if i < 0:
            if self.tab.count >= self.tab.cap:
                self.nflows[self.cur[self.tab.tail]] -= 1
                table_remove(&self.tab, self.tab.tail)
            i = table_insert(&self.tab, &k, self.now)
            set_flow_class(&self.tab, i, self.pclass, ntohs(dst.v4.sin_port))   # sin6_port: same place
            to = self.bal_pick(&k, &first)
            self.cur[i], self.own[i] = to, first
            self.nflows[to] += 1
        else:
            table_touch(&self.tab, i, self.now)
            to = self.cur[i]
            if not self.healthy[to]:
                to = self.bal_pick(&k, &first)
                if not self.healthy[to]:
                    to = self.cur[i]
            elif self.hashed and to != self.own[i] and self.healthy[self.own[i]]:
                to = self.own[i]
            if to != self.cur[i]:
                (<UpstreamCore>self.kids[self.cur[i]]).c_forget(client)
                self.nflows[self.cur[i]] -= 1
                self.nflows[to] += 1
                self.cur[i] = to
                self.st[C_UPSTREAM_FAILOVER] += 1
        return (<UpstreamCore>self.kids[to]).c_send(client, dst, data, n)

    cdef int c_flush(self) except -1:
        cdef int i
        for i in range(self.nkids):
            (<UpstreamCore>self.kids[i]).c_flush()
        return 0

    cdef int bal_conn_health(self) except -1:
        cdef int i
        for i in range(self.nkids):
            if self.by_conn[i]:
                self.healthy[i] = self.probe_ok[i] and (<TunnelUpstream>self.kids[i]).nup > 0
        return 0

    cdef int c_process(self) except -1:
        cdef epoll_event evs[MAX_UPSTREAMS]
        cdef int n, j
        with nogil:
            n = epoll_wait(self.epfd, evs, MAX_UPSTREAMS, 0)
        self.now = mono_now()
        for j in range(n):
            (<UpstreamCore>self.kids[<int>evs[j].data.u64]).c_process()
        return self.bal_conn_health()

    cdef int c_tick(self, double now) except -1:
        cdef int j
        cdef int32_t i
        self.now = now
        for j in range(self.nkids):
            (<UpstreamCore>self.kids[j]).c_tick(now)
        self.bal_conn_health()
        i = table_expired(&self.tab, now)
        while i >= 0:
            self.nflows[self.cur[i]] -= 1
            table_remove(&self.tab, i)
            i = table_expired(&self.tab, now)
        return 0
