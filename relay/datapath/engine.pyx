# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The forward / redir data path: one epoll loop per (listener, worker), run without the GIL.

client ──► listen socket ──recvmmsg──► association table (client → upstream socket)
                                            │ sendmmsg, runs of one socket per call
remote ──► upstream sockets ──recvmmsg──► reply ring ──► forward: sendmmsg on the listen socket
                                                    └─► redir: IPv4/IPv6+UDP headers written in
                                                        front of each payload, sendmmsg on a raw
                                                        socket (source = the remote: full cone;
                                                        larger than the MTU to the client: as IP
                                                        fragments, in the same sendmmsg); or sendto
                                                        on a transparent socket bound to the remote
                                                        (asked for, or what raw cannot carry)

Nothing here creates a Python object per datagram. Python sets up sockets, calls
``Engine.run(ms)`` in a loop and reads counters from shared memory.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from libc.stdlib cimport calloc, malloc, free

from libc.string cimport memcmp
from relay.includes.system cimport (
    errno, EAGAIN, EINTR, ENOBUFS, EIO, ECONNREFUSED, EMSGSIZE, EMFILE, ENFILE, ENOMEM,
    EHOSTUNREACH, ENETUNREACH, EADDRNOTAVAIL, EINVAL, EPERM, EACCES,
    memcpy, memset, close, timespec, clock_gettime, CLOCK_MONOTONIC_COARSE, CLOCK_MONOTONIC,
    iovec, msghdr, mmsghdr, cmsghdr, CMSG_FIRSTHDR, CMSG_NXTHDR, CMSG_DATA,
    socket, bind, connect, setsockopt, getsockopt, sendmmsg, recvmmsg, sendto, socklen_t, sockaddr,
    sockaddr_in, sockaddr_in6,
    AF_INET, AF_INET6, SOCK_DGRAM, SOCK_NONBLOCK, SOCK_CLOEXEC, SOL_SOCKET, SO_REUSEADDR,
    SO_REUSEPORT, SO_RCVBUF, MSG_DONTWAIT, MSG_TRUNC, IPPROTO_IP, IPPROTO_IPV6, IPV6_V6ONLY,
    IP_TRANSPARENT, IPV6_TRANSPARENT, IP_ORIGDSTADDR, IPV6_ORIGDSTADDR, SO_MARK,
    epoll_event, epoll_create1, epoll_ctl, epoll_wait, EPOLLIN, EPOLL_CTL_ADD, EPOLL_CTL_DEL,
    EPOLL_CLOEXEC, htons, ntohs, pollfd, poll, POLLOUT, SOL_UDP, UDP_GRO, UDP_SEGMENT,
    CMSG_SPACE, SO_RCVBUFFORCE, SO_MEMINFO, RELAY_SK_MEMINFO_DROPS, IP_PKTINFO, IPV6_RECVPKTINFO,
    sendmsg,
)
from relay.datapath.addr cimport sockaddr_any, sockaddr_from_tuple, sockaddr_to_tuple, raise_oserror
from relay.datapath.ring cimport (
    msg_put_gso, msg_put_src, msg_gso_size, msg_one_of, cmsg_local, SRC_CTRL,
)
from relay.datapath.sendq cimport run_join, run_start, SQ_GSO_MAX, SQ_GSO_BYTES
from relay.datapath.disguise cimport *
from relay.packet.headers cimport (
    write_udp_headers, write_udp_header, write_fragment, frag_chunk, frag_next_ident,
    IPV4_UDP_HDR_LEN, IPV6_UDP_HDR_LEN, UDP_HDR_LEN, MAX_IPV4_UDP_PAYLOAD, MAX_IPV6_UDP_PAYLOAD,
    IPV4_MIN_MTU, IPV6_MIN_MTU, FRAG_HDR_MAX,
)
from relay.packet.icmp cimport write_icmp_unreachable
from relay.datapath.mtu cimport errqueue_mtu, route_mtu
from relay.datapath.table cimport (
    akey_t, entry_t, table_t, table_init, table_free, table_find, table_insert, table_remove,
    table_touch, akey_from_sockaddr, akey_to_sockaddr, table_timeouts, table_set_class,
    table_timeout, table_expired,
)
from relay.datapath.stats cimport *
from relay.datapath.flows cimport (
    flow_in, flow_out, group_of, groups_init, groups_free, table_snapshot,
    ROWS_FLOWS, ROWS_FLOWS_DST,
)
from relay.datapath.limits cimport fd_soft_limit, fd_reserved
from relay.datapath.clock cimport monotonic
from relay.datapath.tunnel cimport UpstreamCore
from relay.datapath.outbind cimport outbind_init, outbind_apply

import os



cdef inline int wait_writable(int fd) noexcept nogil:
    cdef pollfd p
    p.fd = fd
    p.events = POLLOUT
    p.revents = 0
    return poll(&p, 1, 1)


cdef inline uint64_t _msg_bytes(msghdr *h) noexcept nogil:
    cdef uint64_t total = 0
    cdef size_t k
    for k in range(h.msg_iovlen):
        total += h.msg_iov[k].iov_len
    return total


cdef inline uint64_t _segments(msghdr *h) noexcept nogil:
    """Datagrams a message stands for: 1 without a GSO size, else its bytes in segments (a
    coalesced run: an iovec each; a GRO receive passed on: one buffer; with a disguise
    header: a header iovec and a payload iovec each)."""
    cdef uint16_t seg = msg_gso_size(h)
    cdef size_t n
    if seg == 0:
        return 1
    n = h.msg_iov[0].iov_len if h.msg_iovlen == 1 else _msg_bytes(h)
    return (n + seg - 1) // seg


cdef inline uint64_t _datagrams(mmsghdr *m, int n) noexcept nogil:
    cdef uint64_t total = 0
    cdef int i
    for i in range(n):
        total += _segments(&m[i].msg_hdr)
    return total


cdef bint _reports_local(int fd, int family) noexcept nogil:
    """Whether socket fd has IP_PKTINFO (or, AF_INET6, IPV6_RECVPKTINFO) on."""
    cdef int on = 0
    cdef socklen_t ln = sizeof(int)
    if getsockopt(fd, IPPROTO_IP, IP_PKTINFO, &on, &ln) == 0 and on:
        return True
    ln = sizeof(int)
    return (family == AF_INET6 and getsockopt(fd, IPPROTO_IPV6, IPV6_RECVPKTINFO, &on, &ln) == 0
            and on != 0)


cdef int _core_reply(void *ctx, const sockaddr_any *client, const sockaddr_any *src,
                     const uint8_t *data, size_t n) except -1:
    return (<Engine>ctx)._core_reply(client, src, data, n)


cdef class Engine:
    """The data path of one listener in one worker.

    Engine(listen_fd, mode, *, to=None, raw4_fd=-1, raw6_fd=-1, reply="raw", mark=0,
           timeout=60.0, max_associations=65536, transparent_cache=1024,
           transparent_idle=30.0, batch=64, stats=None, upstream_family=AF_INET6,
           reject=())

    ``listen_fd`` is a bound, non-blocking UDP socket (for redir: IP_TRANSPARENT with
    IP(V6)_RECVORIGDSTADDR). The engine does not own it. ``stats`` is a writable
    memoryview of N_COUNTERS uint64 counters. ``reject`` (redir only, with a raw socket in
    either reply mode): original destination ports answered with an ICMP port unreachable
    instead of relayed (reject.pxi). ``gro``: UDP_GRO on the listen socket (and forward's
    upstream sockets), each coalesced buffer passed on as one GSO send; ``gso``: runs of a
    flow's equal-size datagrams joined into one GSO send (False: one datagram per message).
    The listener's ``offload`` chooses both (relay.net.sockopt.udp_offload).
    """

    def __cinit__(self):
        self.ep = -1
        self.lfd = -1
        self.raw4 = -1
        self.raw6 = -1
        self.closed = True

    def __init__(self, int listen_fd, str mode, *, to=None, int raw4_fd=-1, int raw6_fd=-1,
                 str reply="raw", unsigned long mark=0, double timeout=60.0,
                 int max_associations=65536, int transparent_cache=1024,
                 double transparent_idle=30.0, int batch=64, stats=None,
                 int upstream_family=AF_INET6, int listen_family=AF_INET6,
                 UpstreamCore core=None, bint gro=False, bint gso=True, port_timeouts=(),
                 reject=(),
                 client_groups=(), header_out=None, header_in=None, outbound=None):
        cdef epoll_event ev
        if mode not in ("forward", "redir"):
            raise ValueError(f"mode must be 'forward' or 'redir', not {mode!r}")
        if reply not in ("raw", "transparent"):
            raise ValueError(f"reply must be 'raw' or 'transparent', not {reply!r}")
        if not 1 <= batch <= 1024:
            raise ValueError(f"batch must be 1-1024, not {batch}")
        if max_associations < 1 or transparent_cache < 1:
            raise ValueError("max_associations and transparent_cache must be at least 1")
        if timeout <= 0 or transparent_idle <= 0:
            raise ValueError("timeouts must be positive")
        self.mode = MODE_FORWARD if mode == "forward" else MODE_REDIR
        self.reply_mode = REPLY_RAW if reply == "raw" else REPLY_TRANSPARENT
        if self.mode == MODE_FORWARD:
            if to is None:
                raise ValueError("forward needs a destination (to)")
            self.to_len = sockaddr_from_tuple(to, &self.to_addr)
            upstream_family = self.to_addr.sa.sa_family
        elif self.reply_mode == REPLY_RAW and raw4_fd < 0 and raw6_fd < 0:
            raise ValueError("redir with raw replies needs a raw socket")
        reject = tuple(reject or ())
        if reject and self.mode != MODE_REDIR:
            raise ValueError("reject applies to redir only")
        if reject and raw4_fd < 0 and raw6_fd < 0:
            raise ValueError("reject needs a raw socket for its ICMP errors")
        self.lfd = listen_fd
        self.lfamily = listen_family
        self.raw4 = raw4_fd
        self.raw6 = raw6_fd
        self.up_family = upstream_family
        self.mark = <uint32_t>mark
        outbind_init(&self.ob, outbound)
        self.timeout = timeout
        self.tp_idle = transparent_idle
        self.batch = batch
        if stats is None:
            memset(self.own_stats, 0, sizeof(self.own_stats))
            self.st = self.own_stats
        else:
            self.stats_ref = memoryview(stats).cast("B").cast("Q")
            if len(self.stats_ref) < N_COUNTERS or self.stats_ref.readonly:
                raise ValueError(f"stats must be a writable buffer of {N_COUNTERS} uint64")
            self.st = stats_ptr(self.stats_ref)
        from relay.flows import check_group_words
        check_group_words(client_groups, self.stats_ref)
        groups_init(&self.groups, client_groups, self.stats_ref, N_COUNTERS)
        seed = int.from_bytes(os.urandom(8), "little")
        if table_init(&self.assoc, max_associations, <uint32_t>(seed & 0xffffffff)) < 0:
            raise MemoryError("association table")
        self._set_timeouts(timeout, port_timeouts)
        if table_init(&self.tp, transparent_cache if self.mode == MODE_REDIR else 1,
                      <uint32_t>((seed >> 32) & 0xffffffff)) < 0:
            raise MemoryError("transparent socket cache")
        seed = int.from_bytes(os.urandom(8), "little")
        if table_init(&self.mtus, min(max_associations, MTU_CACHE) if self.mode == MODE_REDIR
                      else 1, <uint32_t>(seed & 0xffffffff)) < 0:
            raise MemoryError("MTU cache")
        self.frag_ident = <uint32_t>(seed >> 32)
        self.frag_over[0] = self.frag_over[1] = MTU_UNASKED
        self.mtu_known[0] = self.mtu_known[1] = False
        self.nfd = fd_soft_limit()
        self.rx = <uint8_t *>calloc(batch, MAXDGRAM + HDR_ROOM)
        self.rx_msgs = <mmsghdr *>calloc(batch, sizeof(mmsghdr))
        self.rx_iov = <iovec *>calloc(batch, sizeof(iovec))
        self.rx_names = <sockaddr_any *>calloc(batch, sizeof(sockaddr_any))
        self.rx_ctrl = <uint8_t *>calloc(batch, CTRL)
        self.tx_msgs = <mmsghdr *>calloc(batch, sizeof(mmsghdr))
        self.tx_iov = <iovec *>calloc(batch + HDR_XIOV, sizeof(iovec))
        self.tx_names = <sockaddr_any *>calloc(batch, sizeof(sockaddr_any))
        self.tx_fd = <int *>calloc(batch, sizeof(int))
        self.tx_seg = <uint32_t *>calloc(batch, sizeof(uint32_t))
        self.tx_bytes = <uint32_t *>calloc(batch, sizeof(uint32_t))
        self.tx_closed = <bint *>calloc(batch, sizeof(bint))
        self.gso_max = SQ_GSO_MAX
        self.ry = <uint8_t *>calloc(batch, SLOT)
        self.ry_msgs = <mmsghdr *>calloc(batch, sizeof(mmsghdr))
        self.ry_iov = <iovec *>calloc(batch, sizeof(iovec))
        self.ry_names = <sockaddr_any *>calloc(batch, sizeof(sockaddr_any))
        self.ry_client = <akey_t *>calloc(batch, sizeof(akey_t))
        self.out_msgs = <mmsghdr *>calloc(batch + FRAG_CAP, sizeof(mmsghdr))
        self.out_iov = <iovec *>calloc(batch + FRAG_CAP + HDR_XIOV, sizeof(iovec))
        self.out_names = <sockaddr_any *>calloc(batch + FRAG_CAP, sizeof(sockaddr_any))
        self.out_slot = <int *>calloc(batch + FRAG_CAP, sizeof(int))
        self.out_kind = <uint8_t *>calloc(batch + FRAG_CAP, 1)
        self.fr_hdr = <uint8_t *>calloc(FRAG_CAP, FRAG_HDR_MAX)
        self.fr_iov = <iovec *>calloc(2 * FRAG_CAP, sizeof(iovec))
        self.retry = <int *>calloc(batch, sizeof(int))
        self.out_seg = <uint32_t *>calloc(batch, sizeof(uint32_t))
        self.out_bytes = <uint32_t *>calloc(batch, sizeof(uint32_t))
        self.out_closed = <bint *>calloc(batch, sizeof(bint))
        self.cl_names = <sockaddr_any *>calloc(batch, sizeof(sockaddr_any))
        self.tx_ctrl = <uint8_t *>calloc(batch, GSO_CTRL)
        self.out_ctrl = <uint8_t *>calloc(batch, OUT_CTRL)
        self.ry_local = <akey_t *>calloc(batch, sizeof(akey_t))
        self.out_local = <akey_t *>calloc(batch, sizeof(akey_t))
        self.ry_ctrl = <uint8_t *>calloc(batch, CTRL)
        self.ry_gro = <int *>calloc(batch, sizeof(int))
        if (self.tx_ctrl == NULL or self.out_ctrl == NULL or self.ry_ctrl == NULL
                or self.ry_local == NULL or self.out_local == NULL
                or self.ry_gro == NULL or self.cl_names == NULL or self.rx == NULL or self.rx_msgs == NULL or self.rx_iov == NULL
                or self.rx_names == NULL or self.rx_ctrl == NULL or self.tx_msgs == NULL
                or self.tx_iov == NULL or self.tx_names == NULL or self.tx_fd == NULL
                or self.tx_seg == NULL or self.tx_bytes == NULL or self.tx_closed == NULL
                or self.out_seg == NULL or self.out_bytes == NULL or self.out_closed == NULL
                or self.ry == NULL or self.ry_msgs == NULL or self.ry_iov == NULL
                or self.ry_names == NULL or self.ry_client == NULL or self.out_msgs == NULL
                or self.out_iov == NULL or self.out_names == NULL or self.out_slot == NULL
                or self.out_kind == NULL or self.fr_hdr == NULL or self.fr_iov == NULL
                or self.retry == NULL):
            self._free()
            raise MemoryError("engine buffers")
        if reject:
            try:
                self.reject_map = _reject_map(reject)
            except BaseException:
                self._free()
                raise
            self.rj_tokens = REJECT_BURST
            self.rj_last = monotonic()
        self.ep = epoll_create1(EPOLL_CLOEXEC)
        if self.ep < 0:
            e = errno
            self._free()
            raise_oserror(e, "epoll_create1")
        ev.events = EPOLLIN
        ev.data.u64 = (<uint64_t>K_LISTEN << 32)
        if epoll_ctl(self.ep, EPOLL_CTL_ADD, listen_fd, &ev) < 0:
            e = errno
            self._free()
            raise_oserror(e, "epoll_ctl(listen socket)")
        self.rcvbuf_base = self.st[C_DROP_RCVBUF]
        self.drops0 = self._socket_drops()
        one = 1
        self.gro = gro
        if not gso:                     # --offload off: no run is ever coalesced
            self.gso_max = 0
        if gro:
            if setsockopt(listen_fd, SOL_UDP, UDP_GRO, &one, sizeof(int)) < 0:
                e = errno
                self._free()
                raise_oserror(e, "UDP_GRO on the listen socket")
        # A wildcard forward listener (relay.net.sockopt.udp_listen turned packet info on):
        # each reply leaves from the address its client sent to, not from the one the
        # kernel's route would pick. Other listeners keep replies without control data.
        self.local_src = self.mode == MODE_FORWARD and _reports_local(listen_fd, listen_family)
        if self.local_src and core is not None:
            if table_init(&self.locals, max_associations, <uint32_t>((seed >> 16) & 0xffffffff)) < 0:
                self._free()
                raise MemoryError("local address table")
            self.local_map = True
        if core is not None:
            ev.events = EPOLLIN
            ev.data.u64 = <uint64_t>K_CORE << 32
            if epoll_ctl(self.ep, EPOLL_CTL_ADD, core.epfd, &ev) < 0:
                e = errno
                self._free()
                raise_oserror(e, "epoll_ctl(upstream)")
            self.core = core
            core.reply_fn = _core_reply
            core.reply_ctx = <void *>self
        try:
            _hdr_setup(self, header_out, header_in, max_associations, batch + HDR_XIOV,
                       batch + FRAG_CAP + HDR_XIOV)
        except BaseException:
            self._free()
            raise
        self.closed = False
        self.next_sweep = monotonic() + 1.0
        if core is not None:
            return
        # Open one upstream socket now, so a missing privilege (SO_MARK needs
        # CAP_NET_ADMIN, SO_BINDTODEVICE CAP_NET_RAW before Linux 5.7) or a source address
        # gone is reported at start and not as a drop counter later.
        fd = self._upstream_socket(self.up_family)
        if fd < 0:
            e = -fd
            self.close()
            raise_oserror(e, "upstream socket (SO_MARK needs CAP_NET_ADMIN, --bind-interface "
                          "CAP_NET_RAW on older kernels)" if e in (EPERM, EACCES)
                          else "upstream socket (--bind-interface, --source)"
                          if outbound else "upstream socket")
        close(fd)

    # ---- control ---------------------------------------------------------------------

    def run(self, int max_ms=200):
        """Move datagrams for up to max_ms milliseconds (or until stop()); releases the GIL."""
        if self.closed:
            raise ValueError("engine is closed")
        # With an upstream core the loop takes the GIL only around the core's calls, so
        # other services' threads in the worker run while it waits in epoll.
        with nogil:
            self._loop(max_ms)

    def stop(self):
        self.stopping = 1

    def counters(self):
        """A dict of this engine's counters (the same memory the data path writes)."""
        from relay.stats import COUNTERS
        if not self.closed:
            self._read_drops()
        return {name: self.st[i] for i, name in enumerate(COUNTERS)}

    def snapshot(self, int n, int sort, bint by_client=False, int clients_cap=4096):
        """The top n associations by sort (relay.flows.SORTS index) as relay.flows rows;
        by_client: summed per client address (at most clients_cap addresses). Call it
        from the thread that runs the engine, between run() calls (services/redirect.py)."""
        if self.closed:
            return []
        rows = table_snapshot(&self.assoc, self.core, n, sort, by_client, clients_cap,
                              monotonic(), ROWS_FLOWS_DST if self.mode == MODE_REDIR else ROWS_FLOWS)
        if self.mode == MODE_REDIR or by_client or self.core is not None:
            return rows
        to = sockaddr_to_tuple(&self.to_addr.sa)       # forward: every flow goes to --to
        return [(r[0], to) + r[2:] for r in rows]

    @property
    def associations(self):
        return self.assoc.count

    @property
    def flows_open(self):
        """The flows snapshot() chooses from: associations, or the upstream core's flows."""
        return self.core.flows_open if self.core is not None else self.assoc.count

    @property
    def pktinfo(self):
        """True when replies leave from the address each client sent to (a wildcard
        forward listener with packet info on)."""
        return bool(self.local_src)

    @property
    def local_addresses(self):
        """Clients in the client -> local address table (pktinfo with an upstream core)."""
        return self.locals.count if self.local_map else 0

    @property
    def transparent_sockets(self):
        return self.tp.count

    def close(self):
        """Close every upstream and reply socket the engine opened (not the listen socket)."""
        if self.closed:
            return
        self.closed = True
        self._flush_tx()
        self._flush_replies(monotonic())
        self._read_drops()
        while self.assoc.count:
            self._close_assoc(self.assoc.tail, -1)
        while self.tp.count:
            _close_tp(self, self.tp.tail)
        if self.core is not None:
            self.core.reply_fn = NULL
            self.core.reply_ctx = NULL
            self.core = None
        self._free()

    cdef void _free(self) noexcept:
        groups_free(&self.groups)
        if self.ep >= 0:
            close(self.ep)
            self.ep = -1
        table_free(&self.assoc)
        table_free(&self.tp)
        table_free(&self.mtus)
        free(self.port_class); self.port_class = NULL
        free(self.rx); self.rx = NULL
        free(self.rx_msgs); self.rx_msgs = NULL
        free(self.rx_iov); self.rx_iov = NULL
        free(self.rx_names); self.rx_names = NULL
        free(self.rx_ctrl); self.rx_ctrl = NULL
        free(self.tx_msgs); self.tx_msgs = NULL
        free(self.tx_iov); self.tx_iov = NULL
        free(self.tx_names); self.tx_names = NULL
        free(self.tx_fd); self.tx_fd = NULL
        free(self.tx_seg); self.tx_seg = NULL
        free(self.tx_bytes); self.tx_bytes = NULL
        free(self.tx_closed); self.tx_closed = NULL
        free(self.out_seg); self.out_seg = NULL
        free(self.out_bytes); self.out_bytes = NULL
        free(self.out_closed); self.out_closed = NULL
        free(self.ry); self.ry = NULL
        free(self.ry_msgs); self.ry_msgs = NULL
        free(self.ry_iov); self.ry_iov = NULL
        free(self.ry_names); self.ry_names = NULL
        free(self.ry_client); self.ry_client = NULL
        free(self.out_msgs); self.out_msgs = NULL
        free(self.out_iov); self.out_iov = NULL
        free(self.out_names); self.out_names = NULL
        free(self.out_slot); self.out_slot = NULL
        free(self.out_kind); self.out_kind = NULL
        free(self.fr_hdr); self.fr_hdr = NULL
        free(self.fr_iov); self.fr_iov = NULL
        free(self.retry); self.retry = NULL
        free(self.cl_names); self.cl_names = NULL
        free(self.tx_ctrl); self.tx_ctrl = NULL
        free(self.out_ctrl); self.out_ctrl = NULL
        free(self.ry_ctrl); self.ry_ctrl = NULL
        free(self.ry_gro); self.ry_gro = NULL
        free(self.ry_local); self.ry_local = NULL
        free(self.out_local); self.out_local = NULL
        free(self.reject_map); self.reject_map = NULL
        table_free(&self.locals)
        _hdr_free(self)

    def __dealloc__(self):
        if not self.closed:
            self.closed = True
            while self.assoc.count and self.assoc.e != NULL:
                close(self.assoc.e[self.assoc.tail].fd)
                table_remove(&self.assoc, self.assoc.tail)
            while self.tp.count and self.tp.e != NULL:
                close(self.tp.e[self.tp.tail].fd)
                table_remove(&self.tp, self.tp.tail)
        self._free()

    # ---- the loop --------------------------------------------------------------------

    cdef void _loop(self, int max_ms) noexcept nogil:
        cdef double now = monotonic()
        cdef double deadline = now + max_ms / 1000.0
        cdef int n, i, wait_ms
        cdef uint64_t tag
        cdef int32_t idx
        cdef int fd
        while not self.stopping:
            wait_ms = <int>((deadline - now) * 1000.0)
            if wait_ms < 0:
                wait_ms = 0
            n = epoll_wait(self.ep, self.events, MAX_EVENTS, wait_ms)
            now = monotonic()
            for i in range(n):
                tag = self.events[i].data.u64
                if (tag >> 32) == K_LISTEN:
                    self._on_listen(now)
                elif (tag >> 32) == K_CORE:
                    with gil:
                        self._core_call(0, now)
                else:
                    idx = <int32_t>(tag & 0xffffffffu)
                    fd = <int>((tag >> 32) - K_ASSOC)
                    if idx < self.assoc.cap and self.assoc.e[idx].used and self.assoc.e[idx].fd == fd:
                        self._on_upstream(idx, now)
            if self.ry_count:
                self._flush_replies(now)
            if self.core is not None:
                with gil:
                    self._core_call(1, now)
            if now >= self.next_sweep:
                self._sweep(now)
            if now >= deadline:
                break

    def _set_timeouts(self, double timeout, port_timeouts):
        """Timeout classes of the association table (relay/datapath/timeouts.py). forward's
        flows all go to --to: its port's timeout is the table's one class (no class lists)."""
        cdef int port
        if self.mode == MODE_FORWARD:
            from relay.datapath.timeouts import timeout_for
            port = ntohs(self.to_addr.v4.sin_port)       # sin6_port: the same place
            timeout = timeout_for(timeout, port_timeouts, port)
            port_timeouts = ()
        pmap = table_timeouts(&self.assoc, timeout, port_timeouts)
        self.min_timeout = min([timeout] + [sec for _, _, sec in port_timeouts])
        if pmap is None:
            return
        self.port_class = <uint8_t *>malloc(65536)
        if self.port_class == NULL:
            raise MemoryError("port timeouts")
        memcpy(self.port_class, <const char *>pmap, 65536)

    def association_timeout(self, client):
        """The idle timeout of the association of ``client`` (HOST, PORT), None if none."""
        cdef sockaddr_any sa
        cdef akey_t k
        cdef int32_t i
        sockaddr_from_tuple(tuple(client), &sa)
        akey_from_sockaddr(&sa, &k)
        i = table_find(&self.assoc, &k)
        return None if i < 0 else table_timeout(&self.assoc, i)

    cdef void _sweep(self, double now) noexcept nogil:
        cdef double idle = self.timeout
        cdef int32_t i = table_expired(&self.assoc, now)
        while i >= 0:
            self._close_assoc(i, C_ASSOC_EXPIRED)
            i = table_expired(&self.assoc, now)
        while self.tp.tail >= 0 and self.tp.e[self.tp.tail].last + self.tp_idle <= now:
            _close_tp(self, self.tp.tail)
        while (self.local_map and self.locals.tail >= 0
               and self.locals.e[self.locals.tail].last + idle <= now):
            table_remove(&self.locals, self.locals.tail)
        self.next_sweep = now + (1.0 if self.min_timeout > 4.0 else self.min_timeout / 4.0)
        self._read_drops()

    cdef uint32_t _socket_drops(self) noexcept nogil:
        """What the kernel dropped at the listen socket so far (full receive buffer): one
        getsockopt per sweep instead of an SO_RXQ_OVFL control message on every datagram."""
        cdef uint32_t mem[16]
        cdef socklen_t ln = sizeof(mem)
        if getsockopt(self.lfd, SOL_SOCKET, SO_MEMINFO, mem, &ln) < 0 or \
                ln <= RELAY_SK_MEMINFO_DROPS * sizeof(uint32_t):
            return self.drops0
        return mem[RELAY_SK_MEMINFO_DROPS]

    cdef void _read_drops(self) noexcept nogil:
        self.st[C_DROP_RCVBUF] = self.rcvbuf_base + <uint32_t>(self._socket_drops() - self.drops0)

    # ---- client -> upstream ----------------------------------------------------------

    cdef void _on_listen(self, double now) noexcept nogil:
        cdef int rounds, n, i, b = self.batch
        cdef mmsghdr *m
        cdef akey_t ck, dk, lk
        cdef int32_t idx
        cdef socklen_t nl
        cdef bint got
        cdef int seg
        cdef uint8_t *data
        cdef uint32_t dlen
        for rounds in range(LISTEN_ROUNDS):
            for i in range(b):
                self.rx_iov[i].iov_base = self.rx + <size_t>i * (MAXDGRAM + HDR_ROOM) + HDR_ROOM
                self.rx_iov[i].iov_len = MAXDGRAM
                m = &self.rx_msgs[i]
                m.msg_hdr.msg_iov = &self.rx_iov[i]
                m.msg_hdr.msg_iovlen = 1
                m.msg_hdr.msg_name = &self.rx_names[i]
                m.msg_hdr.msg_namelen = sizeof(sockaddr_any)
                m.msg_hdr.msg_control = self.rx_ctrl + i * CTRL
                m.msg_hdr.msg_controllen = CTRL
                m.msg_hdr.msg_flags = 0
            n = recvmmsg(self.lfd, self.rx_msgs, b, MSG_DONTWAIT, NULL)
            if n <= 0:
                return
            self.ntx = 0
            self.niov = 0
            for i in range(n):
                m = &self.rx_msgs[i]
                if m.msg_hdr.msg_flags & MSG_TRUNC:
                    self.st[C_DROP_TOO_BIG] += 1
                    continue
                akey_from_sockaddr(&self.rx_names[i], &ck)
                if ck.family == 0:
                    self.st[C_DROP_MALFORMED] += 1
                    continue
                got = self._cmsgs(&m.msg_hdr, &dk, &lk, &seg)
                if self.mode == MODE_REDIR and not got:
                    self.st[C_DROP_NO_ROUTE] += 1
                    continue
                data = <uint8_t *>self.rx_iov[i].iov_base
                dlen = m.msg_len
                if self.hdr.up and not _hdr_client_in(self, &data, &dlen, seg):
                    continue
                if self.reject_map != NULL and _port_rejected(self.reject_map, dk.port):
                    _reject(self, i, &ck, &dk, seg, now)
                    continue
                if self.core is not None:
                    if self.local_map:
                        self._note_local(&ck, &lk, now)
                    self._core_queue(i, &ck, &dk, seg)
                    continue
                idx = table_find(&self.assoc, &ck)
                if idx < 0:
                    idx = self._new_assoc(&ck, now)
                    if idx < 0:
                        continue
                    # its idle timeout: by the destination port of its first datagram
                    if self.port_class != NULL:
                        table_set_class(&self.assoc, idx, self.port_class[ntohs(dk.port)])
                    if self.hdr.up:
                        _hdr_new_flow(self, idx)
                else:
                    table_touch(&self.assoc, idx, now)
                if self.local_src:          # the client may have moved to another address
                    self.assoc.e[idx].aux = lk
                elif self.mode == MODE_REDIR:
                    self.assoc.e[idx].aux = dk      # `relay flows`: its latest destination
                flow_out(&self.assoc.e[idx], &self.groups,
                         (m.msg_len + seg - 1) // seg if seg > 0 else 1, m.msg_len)
                if self.mode == MODE_REDIR:
                    nl = akey_to_sockaddr(&dk, self.up_family if ck.family != AF_INET else AF_INET,
                                          &self.tx_names[self.ntx])
                    if nl == 0:
                        self.st[C_DROP_NO_ROUTE] += 1
                        continue
                else:
                    nl = 0
                if self.hdr.up:
                    _hdr_tx(self, idx, self.assoc.e[idx].fd, data, dlen, seg, nl)
                else:
                    self._tx_add(self.assoc.e[idx].fd, data, dlen, seg, nl)
            if self.core is not None:
                with gil:
                    self._core_send()
            else:
                self._flush_tx()
            if n < b:
                return

    cdef void _tx_add(self, int fd, uint8_t *data, uint32_t n, int seg,
                      socklen_t nl) noexcept nogil:
        """Queue one received datagram (or GRO buffer of seg-byte segments) for fd; the
        destination, for redir, is already in tx_names[ntx] (nl bytes). A datagram that
        continues a run (same socket, same destination, same size as the run's datagrams;
        the last may be shorter) joins the previous message as one more iovec, and the
        message becomes a UDP_SEGMENT (GSO) send: one trip through the stack for the run."""
        cdef int j = self.ntx - 1
        cdef msghdr *h
        if (j >= 0 and seg <= 0 and self.tx_fd[j] == fd
                and self.tx_msgs[j].msg_hdr.msg_namelen == nl
                and (nl == 0 or memcmp(&self.tx_names[j], &self.tx_names[self.ntx], nl) == 0)
                and run_join(&self.tx_msgs[j].msg_hdr, self.tx_ctrl + j * GSO_CTRL,
                             &self.tx_seg[j], &self.tx_bytes[j], &self.tx_closed[j],
                             &self.tx_iov[self.niov], data, n, self.gso_max)):
            self.niov += 1
            return
        j = self.ntx
        h = &self.tx_msgs[j].msg_hdr
        run_start(h, &self.tx_iov[self.niov], &self.tx_names[j], nl, data, n,
                  &self.tx_seg[j], &self.tx_bytes[j], &self.tx_closed[j])
        if seg > 0:                     # a GRO buffer: sent as it came, never joined
            self.tx_closed[j] = True
            if n > <uint32_t>seg:
                msg_put_gso(h, self.tx_ctrl + j * GSO_CTRL, <uint16_t>seg)
        self.tx_fd[j] = fd
        self.niov += 1
        self.ntx += 1

    # ---- through an upstream core (tunnel, SOCKS5) ----------------------------------

    cdef void _core_queue(self, int i, akey_t *ck, akey_t *dk, int seg) noexcept nogil:
        """Note datagram i of the receive ring for the core: client, destination, payload.
        A GRO buffer (seg > 0) is handed over as the datagrams it was coalesced from."""
        cdef uint8_t *p = <uint8_t *>self.rx_iov[i].iov_base
        cdef size_t left = self.rx_msgs[i].msg_len
        cdef size_t n
        if seg <= 0:
            seg = <int>left if left else 1
        while True:
            if self.ntx == self.batch:
                with gil:
                    self._core_send()
            n = <size_t>seg if left > <size_t>seg else left
            akey_to_sockaddr(ck, ck.family, &self.cl_names[self.ntx])
            if self.mode == MODE_REDIR:
                akey_to_sockaddr(dk, dk.family, &self.tx_names[self.ntx])
            else:
                self.tx_names[self.ntx] = self.to_addr
            self.tx_iov[self.ntx].iov_base = p
            self.tx_iov[self.ntx].iov_len = n
            self.ntx += 1
            p += n
            left -= n
            if left == 0:
                break

    cdef int _core_send(self) except -1:
        cdef int j, n = self.ntx
        self.ntx = 0
        for j in range(n):
            self.core.c_send(&self.cl_names[j], &self.tx_names[j],
                             <const uint8_t *>self.tx_iov[j].iov_base, self.tx_iov[j].iov_len)
        self.core.c_flush()
        return 0

    cdef void _core_call(self, int what, double now) noexcept:
        try:
            if what == 0:
                self.core.c_process()
            else:
                self.core.c_tick(now)
                self.core.c_flush()
        except Exception as e:          # a bug in a core must not stop the worker
            import logging
            logging.getLogger("relay").exception("upstream: %s", e)
            self.st[C_DROP_SEND_ERROR] += 1

    cdef int _core_reply(self, const sockaddr_any *client, const sockaddr_any *src,
                         const uint8_t *data, size_t n) noexcept nogil:
        """A reply from the core: copy it into the reply ring like one from a socket."""
        cdef int slot
        cdef int32_t idx
        if n > MAXDGRAM:
            self.st[C_DROP_TOO_BIG] += 1
            return 0
        if self.ry_count == self.batch:
            self._flush_replies(monotonic())
        slot = self.ry_count
        memcpy(self.ry + <size_t>slot * SLOT + HEADROOM, data, n)
        self.ry_iov[slot].iov_base = self.ry + <size_t>slot * SLOT + HEADROOM
        self.ry_iov[slot].iov_len = n
        self.ry_msgs[slot].msg_len = <unsigned int>n
        self.ry_gro[slot] = 0
        memcpy(&self.ry_names[slot], src, sizeof(sockaddr_any))
        akey_from_sockaddr(client, &self.ry_client[slot])
        if self.local_map:
            idx = table_find(&self.locals, &self.ry_client[slot])
            if idx >= 0:
                self.ry_local[slot] = self.locals.e[idx].aux
                table_touch(&self.locals, idx, monotonic())
            else:
                memset(&self.ry_local[slot], 0, sizeof(akey_t))
        self.ry_count += 1
        return 0

    cdef bint _cmsgs(self, msghdr *h, akey_t *origdst, akey_t *local, int *gro) noexcept nogil:
        """Read the original destination (returns whether there was one), the GRO
        segment size (0 when the datagram was not coalesced) and, with local_src, the
        local address it came to (family 0: unknown) from the control messages."""
        cdef cmsghdr *c = CMSG_FIRSTHDR(h)
        cdef bint got = False
        gro[0] = 0
        if self.local_src:
            memset(local, 0, sizeof(akey_t))
        while c != NULL:
            if ((c.cmsg_level == IPPROTO_IP and c.cmsg_type == IP_ORIGDSTADDR)
                    or (c.cmsg_level == IPPROTO_IPV6 and c.cmsg_type == IPV6_ORIGDSTADDR)):
                akey_from_sockaddr(<sockaddr_any *>CMSG_DATA(c), origdst)
                got = origdst.family != 0
            elif c.cmsg_level == SOL_UDP and c.cmsg_type == UDP_GRO:
                memcpy(gro, CMSG_DATA(c), sizeof(int))
            elif self.local_src:
                cmsg_local(c, &local.family, local.addr)
            c = CMSG_NXTHDR(h, c)
        return got

    cdef void _note_local(self, akey_t *client, akey_t *local, double now) noexcept nogil:
        """Remember the local address client sent to last (with an upstream core replies
        come back through _core_reply, without an association entry to keep it in)."""
        cdef int32_t idx = table_find(&self.locals, client)
        if idx < 0:
            if self.locals.count >= self.locals.cap:
                table_remove(&self.locals, self.locals.tail)
            idx = table_insert(&self.locals, client, now)
            if idx < 0:
                return
        else:
            table_touch(&self.locals, idx, now)
        self.locals.e[idx].aux = local[0]

    cdef void _flush_tx(self) noexcept nogil:
        """Send the pending upstream datagrams: one sendmmsg per run of the same socket."""
        cdef int j = 0, k, n = self.ntx
        self.ntx = 0
        self.niov = 0
        while j < n:
            k = j + 1
            while k < n and self.tx_fd[k] == self.tx_fd[j]:
                k += 1
            self._send_counted(self.tx_fd[j], &self.tx_msgs[j], k - j, C_UP_DATAGRAMS)
            j = k

    cdef int _send_some(self, int fd, mmsghdr *m, int n, int *err) noexcept nogil:
        """sendmmsg until all n went or one fails for good. Returns how many went; when
        fewer than n, *err is the errno of message [returned index]. Transient conditions
        (EINTR, a full buffer, a pending ICMP error) are retried a bounded number of times."""
        cdef int sent = 0, r, e, tries = 0
        err[0] = 0
        while sent < n:
            r = sendmmsg(fd, m + sent, n - sent, MSG_DONTWAIT)
            if r > 0:
                sent += r
                tries = 0
                continue
            e = errno
            if e == EINTR:
                continue
            if (e == EAGAIN or e == ENOBUFS) and tries < SEND_RETRIES:
                tries += 1
                wait_writable(fd)
                continue
            if e == ECONNREFUSED and tries < SEND_RETRIES:
                # the error of an earlier datagram (ICMP port unreachable); this one was not sent
                tries += 1
                self.st[C_ICMP_ERRORS] += 1
                continue
            err[0] = e
            return sent
        return sent

    cdef void _count_sent(self, mmsghdr *m, int n, int counter) noexcept nogil:
        cdef int i
        cdef uint64_t nbytes = 0, ndgrams = 0
        for i in range(n):
            nbytes += _msg_bytes(&m[i].msg_hdr)
        ndgrams = _datagrams(m, n)
        nbytes -= ndgrams * _hdr_added(self, counter)
        if counter == C_DOWN_DATAGRAMS:
            self._count_down(ndgrams, nbytes)
        else:
            self.st[counter] += ndgrams
            self.st[counter + 1] += nbytes

    cdef void _count_down(self, uint64_t n, uint64_t nbytes) noexcept nogil:
        # An upstream core counts the replies it brings back itself.
        if self.core is None:
            self.st[C_DOWN_DATAGRAMS] += n
            self.st[C_DOWN_BYTES] += nbytes

    cdef void _count_error(self, int e) noexcept nogil:
        if e == EAGAIN or e == ENOBUFS:
            self.st[C_DROP_BUFFER_FULL] += 1
        elif e == EMSGSIZE:
            self.st[C_DROP_TOO_BIG] += 1
        elif e == ENETUNREACH or e == EHOSTUNREACH or e == EADDRNOTAVAIL or e == EINVAL:
            self.st[C_DROP_NO_ROUTE] += 1
        elif e == ECONNREFUSED:
            self.st[C_ICMP_ERRORS] += 1
            self.st[C_DROP_SEND_ERROR] += 1
        elif e == EACCES or e == EPERM:
            self.st[C_DROP_PERMISSION] += 1
        else:
            self.st[C_DROP_SEND_ERROR] += 1

    cdef void _send_counted(self, int fd, mmsghdr *m, int n, int counter) noexcept nogil:
        """Send n messages, counting what went (counter, counter+1 = datagrams, bytes) and
        each one that could not go (by reason); the rest of the batch is always tried."""
        cdef int done = 0, r, e
        while done < n:
            r = self._send_some(fd, m + done, n - done, &e)
            self._count_sent(m + done, r, counter)
            done += r
            if done < n:
                if e == EAGAIN or e == ENOBUFS:
                    # Still full after a wait: drop (and count) the rest of this run rather
                    # than stall every other flow behind this socket.
                    self.st[C_DROP_BUFFER_FULL] += _datagrams(m + done, n - done)
                    return
                if msg_gso_size(&m[done].msg_hdr) and (e == EINVAL or e == EMSGSIZE or e == EIO):
                    self.st[C_OFFLOAD_FALLBACK] += 1
                    if m[done].msg_hdr.msg_iovlen > 1:
                        # a route (MTU) that refuses this segment size, or a device without
                        # GSO (EIO): stop coalescing such runs
                        if e == EIO:
                            self.gso_max = 0
                        elif msg_gso_size(&m[done].msg_hdr) <= self.gso_max:
                            self.gso_max = <uint32_t>msg_gso_size(&m[done].msg_hdr) - 1
                    self._send_split(fd, &m[done].msg_hdr, counter)
                else:
                    self._count_error(e)
                done += 1

    cdef void _send_split(self, int fd, msghdr *h, int counter) noexcept nogil:
        """The kernel refused a GSO send (segment larger than the route allows, ...):
        send its datagrams one by one instead, each with the message's source address if
        it has one. A datagram is the next GSO-size bytes of the message's iovecs: an
        iovec of a coalesced run, a segment of a GRO buffer, or a disguise header's iovec
        and its payload's."""
        cdef uint16_t seg = msg_gso_size(h)
        cdef uint64_t total = _msg_bytes(h), done = 0
        cdef uint32_t added = _hdr_added(self, counter)
        cdef size_t v = 0, off = 0, avail, take, got
        cdef ssize_t r
        cdef msghdr one
        cdef iovec parts[4]
        msg_one_of(h, &one)
        one.msg_iov = parts
        if seg == 0:
            seg = <uint16_t>total
        while done < total:
            one.msg_iovlen = 0
            got = 0
            while got < seg and v < h.msg_iovlen and one.msg_iovlen < 4:
                avail = h.msg_iov[v].iov_len - off
                if avail == 0:
                    v += 1
                    off = 0
                    continue
                take = seg - got if avail > seg - got else avail
                parts[one.msg_iovlen].iov_base = <uint8_t *>h.msg_iov[v].iov_base + off
                parts[one.msg_iovlen].iov_len = take
                one.msg_iovlen += 1
                got += take
                off += take
            done += got
            r = sendmsg(fd, &one, MSG_DONTWAIT)
            if r < 0:
                self._count_error(errno)
            elif counter == C_DOWN_DATAGRAMS:
                self._count_down(1, got - added if got > added else 0)
            else:
                self.st[counter] += 1
                self.st[counter + 1] += got - added if got > added else 0

    cdef int _upstream_socket(self, int family) noexcept nogil:
        """A new non-blocking upstream socket of family with the mark and the outbound
        binding (an AF_INET6 socket: IPv6 destinations; forward's family is --to's), or
        -errno."""
        cdef int fd = socket(family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        cdef int zero = 0, one = 1, e, rcvbuf = UPSTREAM_RCVBUF
        if fd < 0:
            return -errno
        if self.mark and setsockopt(fd, SOL_SOCKET, SO_MARK, &self.mark, sizeof(self.mark)) < 0:
            e = errno
            close(fd)
            return -e
        if family == AF_INET6:
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(zero))
        if setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf)) < 0:
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf))
        e = outbind_apply(fd, family, family == AF_INET6, &self.ob)
        if e < 0:
            close(fd)
            return e
        if self.mode == MODE_FORWARD:
            if self.gro:
                setsockopt(fd, SOL_UDP, UDP_GRO, &one, sizeof(one))
            if connect(fd, &self.to_addr.sa, self.to_len) < 0:
                e = errno
                close(fd)
                return -e
        return fd

    cdef int32_t _new_assoc(self, akey_t *ck, double now) noexcept nogil:
        cdef int fd
        cdef int32_t idx
        cdef epoll_event ev
        if self.assoc.count >= self.assoc.cap:
            # Datagrams already queued may use the socket about to be closed: send them first.
            self._flush_tx()
            self._close_assoc(self.assoc.tail, C_ASSOC_EVICTED)
        # redir: a socket of the client's own family (a TPROXY'd IPv4 client only has IPv4
        # destinations); sending IPv4 through an AF_INET6 socket takes a slower kernel path.
        fd = self._upstream_socket(self.up_family if self.mode == MODE_FORWARD or
                                   ck.family != AF_INET else AF_INET)
        if fd < 0:
            if -fd == EMFILE or -fd == ENFILE or -fd == ENOBUFS or -fd == ENOMEM:
                self.st[C_ASSOC_REFUSED] += 1
            else:
                self.st[C_DROP_NO_ROUTE] += 1
            return -1
        if fd_reserved(fd, self.nfd):
            close(fd)
            self.st[C_ASSOC_REFUSED] += 1
            return -1
        idx = table_insert(&self.assoc, ck, now)
        if idx < 0:
            close(fd)
            self.st[C_DROP_TABLE_FULL] += 1
            return -1
        ev.events = EPOLLIN
        ev.data.u64 = ((<uint64_t>(K_ASSOC + fd)) << 32) | <uint32_t>idx
        if epoll_ctl(self.ep, EPOLL_CTL_ADD, fd, &ev) < 0:
            close(fd)
            table_remove(&self.assoc, idx)
            self.st[C_ASSOC_REFUSED] += 1
            return -1
        self.assoc.e[idx].fd = fd
        self.assoc.e[idx].group = group_of(&self.groups, ck)
        self.st[C_ASSOC_CREATED] += 1
        self.st[C_ASSOC_OPEN] = self.assoc.count
        return idx

    cdef void _close_assoc(self, int32_t idx, int counter) noexcept nogil:
        cdef int fd = self.assoc.e[idx].fd
        if fd >= 0:
            epoll_ctl(self.ep, EPOLL_CTL_DEL, fd, NULL)
            close(fd)
        table_remove(&self.assoc, idx)
        if counter >= 0:
            self.st[counter] += 1
        self.st[C_ASSOC_OPEN] = self.assoc.count

    # ---- upstream -> client ----------------------------------------------------------

    cdef void _on_upstream(self, int32_t idx, double now) noexcept nogil:
        cdef int rounds, n, i, space, base
        cdef uint64_t nd, nb
        cdef int fd = self.assoc.e[idx].fd
        cdef mmsghdr *m
        cdef akey_t scratch, scratch_local
        cdef akey_t client = self.assoc.e[idx].key
        cdef akey_t local = self.assoc.e[idx].aux
        for rounds in range(REPLY_ROUNDS):
            if self.ry_count == self.batch:
                self._flush_replies(now)
            base = self.ry_count
            space = self.batch - base
            for i in range(base, self.batch):
                self.ry_iov[i].iov_base = self.ry + <size_t>i * SLOT + HEADROOM
                self.ry_iov[i].iov_len = MAXDGRAM
                m = &self.ry_msgs[i]
                m.msg_hdr.msg_iov = &self.ry_iov[i]
                m.msg_hdr.msg_iovlen = 1
                m.msg_hdr.msg_name = &self.ry_names[i]
                m.msg_hdr.msg_namelen = sizeof(sockaddr_any)
                if self.gro and self.mode == MODE_FORWARD:
                    m.msg_hdr.msg_control = self.ry_ctrl + i * CTRL
                    m.msg_hdr.msg_controllen = CTRL
                else:
                    m.msg_hdr.msg_control = NULL
                    m.msg_hdr.msg_controllen = 0
                m.msg_hdr.msg_flags = 0
            n = recvmmsg(fd, &self.ry_msgs[base], space, MSG_DONTWAIT, NULL)
            if n <= 0:
                if n < 0 and errno == ECONNREFUSED:
                    self.st[C_ICMP_ERRORS] += 1
                    continue
                return
            nd = nb = 0
            for i in range(base, base + n):
                self.ry_client[i] = client
                if self.local_src:
                    self.ry_local[i] = local
                self.ry_iov[i].iov_len = self.ry_msgs[i].msg_len
                self.ry_gro[i] = 0
                if self.ry_msgs[i].msg_hdr.msg_controllen:
                    self._cmsgs(&self.ry_msgs[i].msg_hdr, &scratch, &scratch_local, &self.ry_gro[i])
                nb += self.ry_msgs[i].msg_len
                nd += ((self.ry_msgs[i].msg_len + self.ry_gro[i] - 1) // self.ry_gro[i]
                       if self.ry_gro[i] > 0 else 1)
                if self.hdr.down:
                    _hdr_reply(self, i, idx)
            flow_in(&self.assoc.e[idx], &self.groups, nd, nb)
            self.ry_count += n
            table_touch(&self.assoc, idx, now)
            if n < space:
                return

    cdef void _flush_replies(self, double now) noexcept nogil:
        cdef int n = self.ry_count
        self.ry_count = 0
        if n == 0:
            return
        if self.mode == MODE_FORWARD:
            self._replies_forward(n)
        elif self.reply_mode == REPLY_RAW:
            _replies_raw(self, n, AF_INET, now)
            _replies_raw(self, n, AF_INET6, now)
        else:
            _replies_transparent(self, 0, n, now)

    cdef void _replies_forward(self, int n) noexcept nogil:
        """Replies to clients from the listen socket. A run of equal-size replies to one
        client (the last may be shorter) goes as one UDP_SEGMENT message, an iovec each.
        With local_src each message also carries the local address its client sent to
        as its source (IP_PKTINFO / IPV6_PKTINFO), and a run joins only replies that
        leave from the same address."""
        cdef int i, j, k = 0, v = 0
        cdef socklen_t nl
        cdef uint32_t ln
        cdef msghdr *h
        for i in range(n):
            if self.ry_gro[i] < 0:          # refused by its disguise header (counted)
                continue
            nl = akey_to_sockaddr(&self.ry_client[i], self.lfamily, &self.out_names[k])
            if nl == 0:
                self.st[C_DROP_NO_ROUTE] += 1
                continue
            if self.hdr.down and self.ry_gro[i] > 0:
                _hdr_reply_gro(self, i, &k, &v, nl)
                continue
            ln = <uint32_t>self.ry_iov[i].iov_len
            j = k - 1
            if (j >= 0 and self.ry_gro[i] <= 0 and self.out_msgs[j].msg_hdr.msg_namelen == nl
                    and memcmp(&self.out_names[j], &self.out_names[k], nl) == 0
                    and (not self.local_src
                         or memcmp(&self.out_local[j], &self.ry_local[i], sizeof(akey_t)) == 0)
                    and run_join(&self.out_msgs[j].msg_hdr, self.out_ctrl + j * OUT_CTRL,
                                 &self.out_seg[j], &self.out_bytes[j], &self.out_closed[j],
                                 &self.out_iov[v], self.ry_iov[i].iov_base, ln, self.gso_max)):
                v += 1
                continue
            h = &self.out_msgs[k].msg_hdr
            run_start(h, &self.out_iov[v], &self.out_names[k], nl, self.ry_iov[i].iov_base, ln,
                      &self.out_seg[k], &self.out_bytes[k], &self.out_closed[k])
            if self.local_src:
                self.out_local[k] = self.ry_local[i]
                if self.ry_local[i].family:
                    msg_put_src(h, self.out_ctrl + k * OUT_CTRL, self.ry_local[i].family,
                                self.ry_local[i].addr)
            if self.ry_gro[i] > 0:      # a GRO buffer: sent as it came, never joined
                self.out_closed[k] = True
                if <int>ln > self.ry_gro[i]:
                    msg_put_gso(h, self.out_ctrl + k * OUT_CTRL, <uint16_t>self.ry_gro[i])
            v += 1
            k += 1
        self._send_counted(self.lfd, self.out_msgs, k, C_DOWN_DATAGRAMS)


include "reply_raw.pxi"
include "reply_transparent.pxi"
include "reject.pxi"
include "disguise.pxi"
