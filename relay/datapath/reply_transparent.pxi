# Included by relay/datapath/engine.pyx: redir's replies from IP_TRANSPARENT UDP sockets bound
# to each remote (--reply transparent, and what the raw way cannot send): a bounded LRU cache
# of those sockets, closed when idle.

cdef void _replies_transparent(Engine self, int start, int stop, double now) noexcept nogil:
    cdef int i, fd, e
    cdef bint waited = False
    cdef akey_t remote
    cdef sockaddr_any dst
    cdef socklen_t nl
    cdef ssize_t r
    for i in range(start, stop):
        akey_from_sockaddr(&self.ry_names[i], &remote)
        fd = _tp_socket(self, &remote, now)
        if fd < 0:
            continue
        nl = akey_to_sockaddr(&self.ry_client[i], remote.family, &dst)
        if nl == 0:
            self.st[C_DROP_NO_ROUTE] += 1
            continue
        r = sendto(fd, self.ry_iov[i].iov_base, self.ry_iov[i].iov_len, MSG_DONTWAIT,
                   &dst.sa, nl)
        if r < 0:
            e = errno
            # one wait per flush at most: a full socket must not stall the loop
            if (e == EAGAIN or e == ENOBUFS) and not waited and wait_writable(fd) >= 0:
                waited = True
                r = sendto(fd, self.ry_iov[i].iov_base, self.ry_iov[i].iov_len,
                           MSG_DONTWAIT, &dst.sa, nl)
                e = errno
            if r < 0:
                self._count_error(e)
                continue
        self._count_down(1, <uint64_t>r)

cdef int _tp_socket(Engine self, akey_t *remote, double now) noexcept nogil:
    """The transparent socket bound to remote (from the LRU cache, or new), or -1."""
    cdef int32_t idx = table_find(&self.tp, remote)
    cdef int fd, one = 1, small = 4096, e
    cdef sockaddr_any sa
    cdef socklen_t nl
    if idx >= 0:
        table_touch(&self.tp, idx, now)
        return self.tp.e[idx].fd
    if self.tp.count >= self.tp.cap:
        _close_tp(self, self.tp.tail)
    fd = socket(remote.family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        self.st[C_DROP_SEND_ERROR] += 1
        return -1
    if remote.family == AF_INET6:
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &one, sizeof(one))
        e = setsockopt(fd, IPPROTO_IPV6, IPV6_TRANSPARENT, &one, sizeof(one))
    else:
        e = setsockopt(fd, IPPROTO_IP, IP_TRANSPARENT, &one, sizeof(one))
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one))
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof(one))
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &small, sizeof(small))
    if self.mark:
        setsockopt(fd, SOL_SOCKET, SO_MARK, &self.mark, sizeof(self.mark))
    nl = akey_to_sockaddr(remote, remote.family, &sa)
    if e < 0 or bind(fd, &sa.sa, nl) < 0:
        # IP_TRANSPARENT needs CAP_NET_ADMIN, a remote port below 1024 CAP_NET_BIND_SERVICE
        e = errno
        close(fd)
        self._count_error(e)
        return -1
    idx = table_insert(&self.tp, remote, now)
    if idx < 0:
        close(fd)
        self.st[C_DROP_SEND_ERROR] += 1
        return -1
    self.tp.e[idx].fd = fd
    self.st[C_TRANSPARENT_OPEN] = self.tp.count
    return fd

cdef void _close_tp(Engine self, int32_t idx) noexcept nogil:
    close(self.tp.e[idx].fd)
    table_remove(&self.tp, idx)
    self.st[C_TRANSPARENT_OPEN] = self.tp.count
