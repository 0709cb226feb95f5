# Included by relay/datapath/tunnel.pyx: the epoll poller every core is built on.

cdef class Poller:
    """An epoll set whose data events are handled in C; fds registered with watch()
    (listen sockets, handshakes) are handed back to Python by poll()."""
    cdef int epfd
    cdef epoll_event evs[EV_MAX]
    cdef uint64_t *st
    cdef object _stats_ref
    cdef public object log
    cdef double now
    cdef readonly NameCache dns      # host name destinations (services that relay to them)

    def __cinit__(self, *args, **kw):
        self.epfd = epoll_create1(EPOLL_CLOEXEC)
        if self.epfd < 0:
            raise_oserror(errno, "epoll_create1")

    def _init_stats(self, stats, log):
        self._stats_ref = _stats_view(stats)
        self.st = stats_ptr(self._stats_ref)
        self.log = log or DEF_LOG
        self.now = mono_now()

    def init_dns(self, resolve=None):
        """Accept destinations given as host names: a NameCache whose resolver threads
        wake this epoll set (resolve: the function they call, default getaddrinfo)."""
        self.dns = NameCache(self, resolve)
        epoll_set(self.epfd, EPOLL_CTL_ADD, self.dns.fileno(), EPOLLIN, KIND_DNS, 0)

    @property
    def stats(self):
        return self._stats_ref

    def fileno(self):
        return self.epfd

    def watch(self, int fd, uint32_t token, bint read=True, bint write=False, bint modify=False):
        """Hand readiness of fd back to Python as (token, events) from poll()."""
        cdef uint32_t ev = (EPOLLIN if read else 0) | (EPOLLOUT if write else 0)
        epoll_set(self.epfd, EPOLL_CTL_MOD if modify else EPOLL_CTL_ADD, fd, ev, KIND_PY, token)

    def unwatch(self, int fd):
        epoll_ctl(self.epfd, EPOLL_CTL_DEL, fd, NULL)

    def poll(self, int timeout_ms=100):
        """Wait up to timeout_ms, handle data events; return [(token, events)] for Python."""
        cdef int n, i
        cdef uint64_t d
        with nogil:
            n = epoll_wait(self.epfd, self.evs, EV_MAX, timeout_ms)
        self.now = mono_now()
        if n < 0:
            if errno == EINTR:
                return []
            raise_oserror(errno, "epoll_wait")
        py = []
        for i in range(n):
            d = self.evs[i].data.u64
            if (d >> 32) == KIND_PY:
                py.append((<uint32_t>(d & 0xffffffff), self.evs[i].events))
            elif (d >> 32) == KIND_DNS:
                self.dns.drain(self)
            else:
                self.on_event(<uint32_t>(d >> 32), <uint32_t>(d & 0xffffffff),
                              self.evs[i].events)
        self.after_poll()
        return py

    cdef int on_event(self, uint32_t kind, uint32_t idx, uint32_t events) except -1:
        return 0

    cdef int after_poll(self) except -1:
        return 0

    cdef int dns_send(self, uint32_t owner, uint32_t gen, const dname_t *e, uint16_t port,
                      const uint8_t *data, size_t n) except -1:
        """Send a datagram that waited for its host name (owner: slot and generation given
        to NameCache.dst_for)."""
        return 0

    def close(self):
        if self.dns is not None:
            self.dns.close()
        if self.epfd >= 0:
            close(self.epfd)
            self.epfd = -1

    def __dealloc__(self):
        if self.epfd >= 0:
            close(self.epfd)
