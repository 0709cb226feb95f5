# Included by relay/datapath/tunnel.pyx: NameCache, the bounded cache of resolved host names
# and the datagrams parked while a name resolves.

cdef class NameCache:
    """Destinations given as host names (ATYP 3) for a Poller that relays datagrams: a
    bounded set-associative cache name -> addresses with positive and negative lifetimes,
    and the datagrams waiting for a name parked in bounded queues. Lookups run in the
    threads of a relay.resolver.ResolverPool, which only see names, hand back addresses and
    wake the owner's epoll through a wake-up pipe; they never touch this memory."""
    cdef dname_t *names
    cdef parked_t *park
    cdef uint32_t mask               # sets - 1
    cdef uint64_t seed               # of the set hash: names come from peers
    cdef int nnames
    cdef int32_t park_free
    cdef int park_max
    cdef int per_name
    cdef int nparked
    cdef size_t park_bytes
    cdef size_t park_bytes_max
    cdef int inflight
    cdef int max_inflight
    cdef uint32_t seq
    cdef double ttl_ok
    cdef double ttl_fail
    cdef double give_up
    cdef uint64_t *st
    cdef object _stats_ref
    cdef object pool
    cdef object say

    def __cinit__(self, *args, **kw):
        self.names = NULL
        self.park = NULL

    def __init__(self, Poller owner, resolve=None):
        cdef int i
        sets = _resolver.DNS_MAX_NAMES // DNS_WAYS
        if sets < 1 or sets & (sets - 1):
            raise ValueError("DNS_MAX_NAMES must be 4 times a power of two")
        self.mask = sets - 1
        self.seed = int.from_bytes(os.urandom(8), "little")
        self.nnames = sets * DNS_WAYS
        self.park_max = _resolver.DNS_PARK_MAX
        self.per_name = _resolver.DNS_PARK_PER_NAME
        self.park_bytes_max = _resolver.DNS_PARK_BYTES
        self.max_inflight = _resolver.DNS_INFLIGHT
        self.ttl_ok, self.ttl_fail = _resolver.DNS_TTL_OK, _resolver.DNS_TTL_FAIL
        self.give_up = _resolver.DNS_GIVE_UP
        self.names = <dname_t *>calloc(self.nnames, sizeof(dname_t))
        self.park = <parked_t *>calloc(self.park_max, sizeof(parked_t))
        if self.names == NULL or self.park == NULL:
            raise MemoryError()
        for i in range(self.park_max):
            self.park[i].next = i + 1 if i + 1 < self.park_max else -1
        self.park_free = 0
        self._stats_ref = owner._stats_ref
        self.st = owner.st
        self.say = LogLimiter(owner.log)
        self.pool = _resolver.ResolverPool(resolve)

    def __dealloc__(self):
        cdef int i
        if self.park != NULL:
            for i in range(self.park_max):
                free(self.park[i].data)
        free(self.park)
        free(self.names)

    def fileno(self):
        return self.pool.fileno()

    def close(self):
        self.pool.close()

    cdef int32_t find(self, const uint8_t *name, size_t n, double now) except -2:
        """The entry of a name, made pending (and its lookup queued) on a miss or when it
        has expired; -1 when there is no room to resolve it now."""
        cdef uint64_t h = 14695981039346656037ULL ^ self.seed
        cdef size_t i
        cdef int w, base, victim = -1
        cdef dname_t *e
        for i in range(n):
            h = (h ^ ascii_lower(name[i])) * 1099511628211ULL
        base = <int>(mix64(h) & self.mask) * DNS_WAYS
        for w in range(base, base + DNS_WAYS):
            e = &self.names[w]
            if e.state == N_EMPTY:
                if victim < 0 or self.names[victim].state != N_EMPTY:
                    victim = w
                continue
            if e.nlen == n:
                i = 0
                while i < n and e.name[i] == ascii_lower(name[i]):
                    i += 1
                if i == n:
                    if e.state == N_PENDING or now < e.expires:
                        e.used = now
                        return w
                    victim = w               # expired: resolve it again in place
                    break
            if e.state != N_PENDING and (victim < 0 or (
                    self.names[victim].state != N_EMPTY and e.used < self.names[victim].used)):
                victim = w
        if victim < 0 or self.inflight >= self.max_inflight:
            return -1
        e = &self.names[victim]
        for i in range(n):
            e.name[i] = ascii_lower(name[i])
        e.nlen = <uint8_t>n
        e.state = N_PENDING
        self.seq += 1
        e.seq = self.seq
        e.expires = now + self.give_up
        e.used = now
        e.park_head = e.park_tail = -1
        e.nparked = 0
        e.park_bytes = 0
        e.has4 = e.has6 = e.first = 0
        self.inflight += 1
        why = self.pool.submit((victim, e.seq), (<const char *>e.name)[:n])
        if why is not None:
            self.settle(victim, (), why, None, now)
        return victim

    cdef int park_dgram(self, int32_t idx, uint32_t owner, uint32_t gen, uint16_t port,
                        const uint8_t *data, size_t n) except -1:
        cdef dname_t *e = &self.names[idx]
        cdef int32_t p = self.park_free
        cdef uint8_t *copy = NULL
        if e.nparked < self.per_name and p >= 0 and self.park_bytes + n <= self.park_bytes_max:
            copy = <uint8_t *>malloc(n if n else 1)
        if copy == NULL:
            self.st[C_QUEUE_DROPS] += 1
            return 0
        memcpy(copy, data, n)
        self.park_free = self.park[p].next
        self.park[p].data = copy
        self.park[p].n = n
        self.park[p].owner = owner
        self.park[p].gen = gen
        self.park[p].port = port
        self.park[p].next = -1
        if e.park_tail >= 0:
            self.park[e.park_tail].next = p
        else:
            e.park_head = p
        e.park_tail = p
        e.nparked += 1
        e.park_bytes += n
        self.nparked += 1
        self.park_bytes += n
        return 0

    cdef int dst_for(self, const frame_t *f, uint32_t owner, uint32_t gen, int family,
                     double now, sockaddr_any *dst) except -1:
        """Destination of a datagram addressed to a host name, for a socket of `family`:
        its length, or 0 when the datagram waits for the name or was dropped (counted)."""
        cdef int32_t idx = self.find(f.addr, f.alen, now)
        cdef socklen_t dl
        if idx < 0:
            self.st[C_QUEUE_DROPS] += 1
            return 0
        if self.names[idx].state == N_PENDING:
            self.park_dgram(idx, owner, gen, f.port, f.data, f.dlen)
            return 0
        dl = dname_to_sockaddr(&self.names[idx], f.port, family, dst)
        if dl == 0:
            self.st[C_DROP_NO_ROUTE] += 1
        return dl

    cdef int settle(self, int32_t idx, object addrs, object err, Poller owner,
                    double now) except -1:
        """Store the answer for entry idx and pass its parked datagrams to the owner (or
        drop and count them when the name has no address)."""
        cdef dname_t *e = &self.names[idx]
        cdef const uint8_t *b
        cdef int32_t p, nxt
        self.inflight -= 1
        e.has4 = e.has6 = e.first = 0
        for ver, packed in addrs:
            b = <const uint8_t *><const char *>packed
            if ver == 4 and not e.has4:
                memcpy(e.a4, b, 4)
                e.has4 = 1
            elif ver == 6 and not e.has6:
                memcpy(e.a6, b, 16)
                e.has6 = 1
            else:
                continue
            if not e.first:
                e.first = ver
        if e.first:
            e.state = N_OK
            e.expires = now + self.ttl_ok
        else:
            e.state = N_FAIL
            e.expires = now + self.ttl_fail
            self.say(logging.INFO, "cannot resolve %r: %s",
                     (<const char *>e.name)[:e.nlen].decode("latin-1"), err)
        p = e.park_head
        self.nparked -= e.nparked
        self.park_bytes -= e.park_bytes
        e.park_head = e.park_tail = -1
        e.nparked = 0
        e.park_bytes = 0
        while p >= 0:
            nxt = self.park[p].next
            if e.state == N_OK and owner is not None:
                owner.dns_send(self.park[p].owner, self.park[p].gen, e, self.park[p].port,
                               self.park[p].data, self.park[p].n)
            else:
                self.st[C_DROP_NO_ROUTE] += 1
            free(self.park[p].data)
            self.park[p].data = NULL
            self.park[p].next = self.park_free
            self.park_free = p
            p = nxt
        return 0

    cdef int drain(self, Poller owner) except -1:
        """Answers from the resolver threads (the wake-up pipe said so)."""
        cdef double now = mono_now()
        for (idx, seq), addrs, err in self.pool.results():
            if self.names[<int>idx].state == N_PENDING and self.names[<int>idx].seq == seq:
                self.settle(idx, addrs, err, owner, now)
        return 0

    cdef int expire(self, Poller owner, double now) except -1:
        """Give up lookups that took longer than DNS_GIVE_UP."""
        cdef int i
        if self.inflight == 0:
            return 0
        for i in range(self.nnames):
            if self.names[i].state == N_PENDING and now > self.names[i].expires:
                self.settle(i, (), "no answer in time", owner, now)
        return 0

    @property
    def parked(self):
        """Datagrams waiting for their names (a probe for tests and tools)."""
        return self.nparked
