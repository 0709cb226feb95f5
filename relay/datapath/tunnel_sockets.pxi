# Included by relay/datapath/tunnel.pyx: flow sockets (the flow tables are relay/datapath/table.pxd).

cdef int new_udp_socket(int family, object mark, const outbind_t *ob) except -2:
    """Non-blocking UDP socket (dual stack for AF_INET6), SO_MARK and the outbound device
    applied (its sources go on each datagram: outbind_src); -1 with errno set on failure
    (EMFILE and friends are counted by the caller)."""
    cdef int fd, zero = 0, m, e
    fd = c_socket(family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
    if fd < 0:
        return -1
    if family == AF_INET6:
        setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(int))
    if mark:
        m = mark
        if setsockopt(fd, SOL_SOCKET, SO_MARK, &m, sizeof(int)) < 0:
            e = errno
            close(fd)
            raise_oserror(e, "SO_MARK")
    e = outbind_device(fd, ob)
    if e < 0:
        close(fd)
        raise_oserror(-e, f"SO_BINDTODEVICE {(<bytes>ob.dev).decode()}")
    return fd
