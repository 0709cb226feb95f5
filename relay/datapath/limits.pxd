# cython: language_level=3
# Descriptor limits of the data path, defined once for every extension (the engine, the
# tunnel and SOCKS5 cores). The Python twin of FD_RESERVE is relay.config.FD_RESERVE.
from posix.resource cimport getrlimit, rlimit, RLIMIT_NOFILE, RLIM_INFINITY


cdef enum:
    FD_RESERVE = 32               # descriptors kept free for reply sockets and the control plane
    FD_LIMIT_MAX = 2097152        # an unlimited (or larger) soft limit counts as this


cdef inline int fd_soft_limit() noexcept nogil:
    """The soft RLIMIT_NOFILE (capped at FD_LIMIT_MAX): read once when a table is made."""
    cdef rlimit r
    if getrlimit(RLIMIT_NOFILE, &r) < 0 or r.rlim_cur == RLIM_INFINITY or \
            r.rlim_cur > FD_LIMIT_MAX:
        return FD_LIMIT_MAX
    return <int>r.rlim_cur


cdef inline int fd_ceiling() noexcept nogil:
    """Descriptors at or above this lie within the reserve: a flow socket there is refused."""
    return fd_soft_limit() - FD_RESERVE


cdef inline bint fd_reserved(int fd, int nfd) noexcept nogil:
    """A new descriptor fd lies within the reserve of the limit nfd: close it, refuse the flow."""
    return fd >= nfd - FD_RESERVE
