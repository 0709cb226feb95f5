# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""Data path of the UDP-over-TCP tunnel and of SOCKS5 UDP (see docs/tunnel.md).

Control (accept, handshakes, logging) stays in Python and happens once per connection;
datagrams and frames are handled here in batches: recvmmsg -> frames -> one TCP write,
TCP read -> frames -> sendmmsg. relay.proto is the pure reference of the codec,
relay.datapath.pure the pure twin of every class here. One module, one file per class or
concern (the include lines at the end).
"""
import errno as _errno
import os
import socket
import logging

from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int16_t
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memmove
from relay.includes.system cimport (
    errno, EAGAIN, EINTR, EMSGSIZE, ENETUNREACH, EHOSTUNREACH, EADDRNOTAVAIL, EPERM, EACCES,
    ECONNREFUSED, memcpy, memset, memcmp, close, read,
    timespec, clock_gettime, CLOCK_MONOTONIC,
    iovec, sockaddr, sockaddr_in, sockaddr_in6, socklen_t, msghdr, mmsghdr,
    AF_INET, AF_INET6, SOCK_DGRAM, SOCK_NONBLOCK, SOCK_CLOEXEC, SOL_SOCKET, SO_ERROR,
    SO_RCVBUF, SO_SNDBUF, MSG_DONTWAIT, MSG_NOSIGNAL, MSG_TRUNC,
    socket as c_socket, setsockopt, getsockopt, sendto, sendmmsg, recvmmsg,
    IPPROTO_IPV6, IPV6_V6ONLY, SO_MARK,
    htons, ntohs,
    epoll_event, EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP, EPOLLRDHUP, EPOLL_CTL_ADD,
    EPOLL_CTL_MOD, EPOLL_CTL_DEL, EPOLL_CLOEXEC, epoll_create1, epoll_ctl, epoll_wait,
)
from relay.includes.wire cimport (
    ATYP_IPV4, ATYP_IPV6, ATYP_DOMAIN, MAX_PAYLOAD, MAX_FRAME_HEADER,
    E_TRUNCATED, E_TOO_BIG, E_BAD_ATYP, E_EMPTY_DOMAIN, E_FRAGMENTED,
)
from relay.datapath.table cimport (
    is_v4mapped, table_t, akey_t, table_new, table_init, table_free, table_find, table_insert,
    table_remove, table_touch, akey_from_sockaddr, akey_from_flow, mix64, table_timeouts,
    table_set_class, table_expired,
)
from relay.datapath.limits cimport (
    fd_ceiling, fd_soft_limit, fd_reserved, FD_LIMIT_MAX, FD_RESERVE as _FD_RESERVE,
)
from relay.datapath.addr cimport sockaddr_any, sockaddr_from_tuple, sockaddr_to_tuple, raise_oserror
from relay.datapath.sendq cimport (
    sendq_t, sq_init, sq_free, sq_add, sq_flush, sq_full, sq_clear, sq_set_src,
)
from relay.datapath.outbind cimport (
    outbind_t, outbind_init, outbind_device, outbind_src, outbind_apply,
)
from relay.datapath.stats cimport (
    N_COUNTERS, stats_ptr, C_UP_DATAGRAMS, C_UP_BYTES, C_DOWN_DATAGRAMS, C_DOWN_BYTES,
    C_ASSOC_OPEN, C_ASSOC_CREATED, C_ASSOC_EXPIRED, C_ASSOC_EVICTED, C_ASSOC_REFUSED,
    C_DROP_MALFORMED, C_DROP_BUFFER_FULL, C_DROP_SEND_ERROR, C_DROP_TABLE_FULL, C_DROP_TOO_BIG,
    C_DROP_NO_ROUTE, C_DROP_DENIED, C_CONN_OPEN, C_CONN_REJECTED, C_CONN_RECONNECTS,
    C_FRAMES_BAD, C_QUEUE_DROPS, C_DROP_FOREIGN_PORT,
)
from relay.datapath.stats cimport C_UPSTREAM_FAILOVER

from relay.datapath.flows cimport (
    flow_in, flow_out, group_of, groups_init, groups_free, table_snapshot, ROWS_FLOWS_DST,
)
from relay import proto as _proto
from relay.flows import balanced_rows, check_group_words
from relay import resolver as _resolver
from relay.net import sockopt as _sockopt
from relay.loglimit import LogLimiter
from relay.net.sockopt import flow_socket

cdef extern from "<sys/socket.h>" nogil:
    ssize_t c_send "send"(int fd, const void *buf, size_t n, int flags)

cdef enum:
    KIND_PY = 1          # fd watched for Python (listen sockets, handshakes)
    KIND_CONN = 2
    KIND_FLOW = 3
    KIND_TCP = 6
    KIND_UDP = 7
    KIND_DNS = 8         # the resolver's wake-up pipe
    EV_MAX = 64
    UDP_HDR_ROOM = 262   # RSV FRAG ATYP LEN DOMAIN PORT: headroom before a datagram

DEF_LOG = logging.getLogger("relay.tunnel")
FD_RESERVE = _FD_RESERVE        # relay/datapath/limits.pxd (Python: relay.config.FD_RESERVE)
FRAME_ERROR_TEXT = {E_TRUNCATED: "truncated frame", E_TOO_BIG: "RSV (length) too big",
                    E_BAD_ATYP: "unknown ATYP", E_EMPTY_DOMAIN: "domain of length 0",
                    E_FRAGMENTED: "FRAG is not 0"}


# ------------------------------------------------------------------------- small helpers

cdef inline double mono_now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline uint16_t rd16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline void wr16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xff


cdef inline bint is_mapped(const sockaddr_any *a) noexcept nogil:
    return is_v4mapped(<const uint8_t *>&a.v6.sin6_addr)      # the one IPv4-mapped check


cdef inline void sa_key(const sockaddr_any *a, uint64_t *k) noexcept nogil:
    k[1] = 0
    k[2] = 0
    if a.sa.sa_family == AF_INET:
        k[0] = AF_INET | (<uint64_t>a.v4.sin_port << 16)
        memcpy(&k[1], &a.v4.sin_addr, 4)
    else:
        k[0] = <uint64_t>a.sa.sa_family | (<uint64_t>a.v6.sin6_port << 16)
        memcpy(&k[1], &a.v6.sin6_addr, 16)


cdef inline void set_flow_class(table_t *t, int32_t i, bytes pclass, uint16_t port):
    """A new flow's idle timeout: the class of the destination port of its first datagram
    (host order), when the listener has per-port timeouts (relay/datapath/timeouts.py)."""
    if pclass is not None:
        table_set_class(t, i, (<const uint8_t *><const char *>pclass)[port])


cdef inline socklen_t sa_len(const sockaddr_any *a) noexcept nogil:
    return sizeof(sockaddr_in) if a.sa.sa_family == AF_INET else sizeof(sockaddr_in6)


cdef inline bint sa_same(const sockaddr_any *a, const sockaddr_any *b) noexcept nogil:
    if a.sa.sa_family != b.sa.sa_family:
        return False
    if a.sa.sa_family == AF_INET:
        return a.v4.sin_port == b.v4.sin_port and a.v4.sin_addr.s_addr == b.v4.sin_addr.s_addr
    return a.v6.sin6_port == b.v6.sin6_port and \
        memcmp(&a.v6.sin6_addr, &b.v6.sin6_addr, 16) == 0


cdef inline bint sa_same_ip(const sockaddr_any *a, const sockaddr_any *b) noexcept nogil:
    if a.sa.sa_family != b.sa.sa_family:
        return False
    if a.sa.sa_family == AF_INET:
        return a.v4.sin_addr.s_addr == b.v4.sin_addr.s_addr
    return memcmp(&a.v6.sin6_addr, &b.v6.sin6_addr, 16) == 0


cdef inline void sa_unmap(const sockaddr_any *a, sockaddr_any *out) noexcept nogil:
    """Copy a, turning an IPv4-mapped IPv6 address into a plain IPv4 one."""
    if a.sa.sa_family == AF_INET6 and is_mapped(a):
        memset(out, 0, sizeof(sockaddr_in))
        out.v4.sin_family = AF_INET
        out.v4.sin_port = a.v6.sin6_port
        memcpy(&out.v4.sin_addr, &a.v6.sin6_addr.s6_addr[12], 4)
    else:
        memcpy(out, a, sizeof(sockaddr_any))


cdef object _stats_view(object stats):
    if stats is None:
        stats = memoryview(bytearray(8 * N_COUNTERS)).cast("Q")
    if not isinstance(stats, memoryview):
        stats = memoryview(stats)
    if stats.format != "Q":
        stats = stats.cast("B").cast("Q")
    if len(stats) < N_COUNTERS:
        raise ValueError(f"stats needs {N_COUNTERS} uint64 counters, got {len(stats)}")
    if stats.readonly:
        raise ValueError("stats must be writable")
    return stats


cdef int epoll_set(int epfd, int op, int fd, uint32_t events, uint32_t kind,
                   uint32_t idx) except -1:
    cdef epoll_event ev
    ev.events = events
    ev.data.u64 = (<uint64_t>kind << 32) | idx
    if epoll_ctl(epfd, op, fd, &ev) < 0:
        raise_oserror(errno, "epoll_ctl")
    return 0


include "tunnel_codec.pxi"
include "tunnel_acl.pxi"
include "tunnel_sockets.pxi"
include "tunnel_names.pxi"
include "tunnel_poller.pxi"
include "tunnel_namecache.pxi"
include "tunnel_server.pxi"
include "tunnel_upstream.pxi"
include "socks5_upstream.pxi"
include "socks5_relay.pxi"
include "direct_upstream.pxi"
include "tunnel_balance.pxi"
