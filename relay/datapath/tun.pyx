# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""`relay tun`'s data path in C: UDP datagrams read from a TUN queue, relayed to their IP
destination, replies written back into the TUN as packets from each remote (the pure twin:
relay/datapath/pure/tun.py, same arguments, behaviour and counters).

TUN queue ──read──► tun_parse.pxi: what the packet is ──► whole UDP: association table
                                                      └─► fragments: the reassembler
    (client address+port -> one upstream socket, full cone: table.pxd; or an upstream core)
upstream sockets ──recvmmsg──► tun_write.pxi: IPv4/IPv6+UDP headers in front of each payload,
                               fragments above the MTU; with the virtio-net header, runs of
                               equal replies as one segmentation-offload write (writev)
error queues (IP_RECVERR) ──► ICMP/ICMPv6 errors written into the TUN

The loop runs without the GIL for whole datagrams in both directions; it takes the GIL for
what is rare or Python's: IP fragments (relay/datapath/pure/tun_stack.py's Reassembler, a
Python call per fragment), an upstream core's calls (as the engine does) and the sweep.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from libc.stdlib cimport calloc, free, malloc

from relay.includes.system cimport (
    errno, EAGAIN, EINTR, ENOBUFS, EMSGSIZE, EMFILE, ENFILE, ENOMEM, EPERM, EACCES,
    EHOSTUNREACH, ENETUNREACH, EADDRNOTAVAIL,
    memcpy, memset, close, read, writev, timespec, clock_gettime, CLOCK_MONOTONIC_COARSE,
    iovec, msghdr, mmsghdr, cmsghdr, CMSG_FIRSTHDR, CMSG_NXTHDR, CMSG_DATA,
    socket, setsockopt, sendto, recvmmsg, recvmsg, socklen_t, sockaddr_in, sockaddr_in6,
    AF_INET, AF_INET6, SOCK_DGRAM, SOCK_NONBLOCK, SOCK_CLOEXEC, SOL_SOCKET, SO_MARK,
    IPPROTO_IP, IPPROTO_IPV6, IPV6_V6ONLY, IP_RECVERR, IPV6_RECVERR, MSG_ERRQUEUE,
    MSG_DONTWAIT, sock_extended_err, epoll_event, epoll_create1, epoll_ctl, epoll_wait,
    EPOLLIN, EPOLLERR, EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CLOEXEC, htons, ntohs,
)
from relay.datapath.addr cimport sockaddr_any, raise_oserror, ip_to_tuple, sockaddr_from_tuple
from relay.datapath.table cimport (
    akey_t, table_t, table_init, table_free, table_find, table_insert, table_remove,
    table_touch, table_timeouts, table_set_class, table_expired,
)
from relay.datapath.stats cimport *
from relay.datapath.sendq cimport sq_init, sq_free, sq_full, sq_add, sq_flush
from relay.datapath.limits cimport fd_soft_limit, fd_reserved
from relay.datapath.clock cimport monotonic
from relay.datapath.tunnel cimport UpstreamCore
from relay.datapath.flows cimport (
    flow_in, flow_out, group_of, groups_init, groups_free, table_snapshot, ROWS_FLOWS_DST,
)
from relay.datapath.outbind cimport outbind_init, outbind_apply
from relay.packet.checksum cimport csum_partial, csum_fold, csum_update16, udp_pseudo_sum
from relay.packet.headers cimport (
    put16, get16, write_udp_headers, write_ip_header, write_fragment, frag_chunk,
    frag_next_ident, IPV4_HDR_LEN, IPV6_HDR_LEN, UDP_HDR_LEN, FRAG_HDR_MAX,
)
from relay.packet.icmp cimport write_icmp_unreachable, ICMP_UNREACH_MAX

import os


cdef enum:
    VNET_LEN = TUN_VNET_LEN       # struct virtio_net_hdr (relay/net/tundev.py)
    VNET_F_NEEDS_CSUM = 1
    VNET_F_DATA_VALID = 2
    GSO_NONE = 0
    GSO_UDP_L4 = 5
    GSO_ECN = 0x80
    READ_MAX = VNET_LEN + 65575   # a GSO run or the largest IPv6 packet
    HEADROOM = 64                 # room in front of each reply payload for its headers
    MAXDGRAM = 65535
    SLOT = HEADROOM + MAXDGRAM
    SQ_DATAGRAMS = 1024           # datagrams queued towards upstream before a flush
    RUN_SEGMENTS = 64             # replies in one offload write at most
    RUN_BYTES = 65535 - 48        # payload bytes of one offload write at most
    MAX_EVENTS = TUN_MAX_EVENTS
    K_TUN = 0
    K_CORE = 1
    K_ASSOC = 2                   # + entry index in the low 32 bits
    ERR_CTRL = 512
    SO_EE_ORIGIN_ICMP = 2
    SO_EE_ORIGIN_ICMP6 = 3


cdef inline int send_error_counter(int e) noexcept nogil:
    if e == EAGAIN or e == ENOBUFS:
        return C_DROP_BUFFER_FULL
    if e == EMSGSIZE:
        return C_DROP_TOO_BIG
    if e == ENETUNREACH or e == EHOSTUNREACH or e == EADDRNOTAVAIL:
        return C_DROP_NO_ROUTE
    if e == EACCES or e == EPERM:
        return C_DROP_PERMISSION
    return C_DROP_SEND_ERROR


include "tun_parse.pxi"
include "tun_write.pxi"


cdef int _core_reply(void *ctx, const sockaddr_any *client, const sockaddr_any *src,
                     const uint8_t *data, size_t n) except -1:
    (<TunRelay>ctx).core_reply(client, src, data, n)
    return 0


cdef class TunRelay:
    """TunRelay(tun_fd, *, vnet=False, mtu=1500, mark=0, timeout=60.0, port_timeouts=(),
    max_associations=65536, batch=64, stats=None, log=None, core=None,
    upstream_family=AF_INET6, frag_memory=FRAG_MEMORY, frag_timeout=FRAG_TIMEOUT)

    ``tun_fd``: a non-blocking TUN queue (not owned); ``vnet``: it carries the virtio-net
    header (offload on). ``run(ms)`` moves packets; ``counters()``, ``associations``,
    ``reassembling``, ``tick(now)``, ``close()`` as the pure twin."""

    def __cinit__(self):
        self.ep = -1
        self.closed = True

    def __init__(self, int tun_fd, *, bint vnet=False, int mtu=1500, unsigned long mark=0,
                 double timeout=60.0, port_timeouts=(), int max_associations=65536,
                 int batch=64, stats=None, log=None, UpstreamCore core=None,
                 int upstream_family=AF_INET6, frag_memory=None, frag_timeout=None,
                 client_groups=(), outbound=None):
        cdef epoll_event ev
        from relay.datapath.pure import tun_stack
        tun_stack.check_relay_args(batch, max_associations, timeout, mtu)
        self.fd, self.vnet, self.mtu, self.mark = tun_fd, vnet, mtu, <uint32_t>mark
        self.batch, self.up_family = batch, upstream_family
        if stats is None and core is not None:
            stats = core.stats
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
        outbind_init(&self.ob, outbound)
        self.frags = tun_stack.Reassembler(
            self._count_name,
            memory=tun_stack.FRAG_MEMORY if frag_memory is None else frag_memory,
            timeout=tun_stack.FRAG_TIMEOUT if frag_timeout is None else frag_timeout)
        seed = int.from_bytes(os.urandom(8), "little")
        if table_init(&self.assoc, max_associations, <uint32_t>(seed & 0xffffffff)) < 0:
            raise MemoryError("association table")
        self.ident = <uint32_t>(seed >> 32)
        pmap = table_timeouts(&self.assoc, timeout, port_timeouts)
        if pmap is not None:
            self.port_class = <uint8_t *>malloc(65536)
            if self.port_class == NULL:
                self._free()
                raise MemoryError("port timeouts")
            memcpy(self.port_class, <const char *>pmap, 65536)
        self.nfd = fd_soft_limit()
        self.rbuf = <uint8_t *>malloc(<size_t>batch * READ_MAX)
        try:
            sq_init(&self.sq, SQ_DATAGRAMS)
        except MemoryError:
            self._free()
            raise
        self.ry = <uint8_t *>malloc(<size_t>batch * SLOT)
        self.ry_msgs = <mmsghdr *>calloc(batch, sizeof(mmsghdr))
        self.ry_iov = <iovec *>calloc(batch, sizeof(iovec))
        self.ry_names = <sockaddr_any *>calloc(batch, sizeof(sockaddr_any))
        self.wiov = <iovec *>calloc(RUN_SEGMENTS + 2, sizeof(iovec))
        if (self.rbuf == NULL or self.ry == NULL or self.ry_msgs == NULL or self.ry_iov == NULL
                or self.ry_names == NULL or self.wiov == NULL):
            self._free()
            raise MemoryError("tun buffers")
        self.ep = epoll_create1(EPOLL_CLOEXEC)
        if self.ep < 0:
            e = errno
            self._free()
            raise_oserror(e, "epoll_create1")
        ev.events = EPOLLIN
        ev.data.u64 = <uint64_t>K_TUN << 32
        if epoll_ctl(self.ep, EPOLL_CTL_ADD, tun_fd, &ev) < 0:
            e = errno
            self._free()
            raise_oserror(e, "epoll_ctl(tun)")
        self.closed = False
        self.now = monotonic()
        self.next_sweep = self.now + 1.0
        if core is not None:
            ev.events = EPOLLIN
            ev.data.u64 = <uint64_t>K_CORE << 32
            if epoll_ctl(self.ep, EPOLL_CTL_ADD, core.epfd, &ev) < 0:
                e = errno
                self.close()
                raise_oserror(e, "epoll_ctl(upstream)")
            self.core = core
            core.reply_fn = _core_reply
            core.reply_ctx = <void *>self
            return
        fd = self._upstream_socket(True)
        if fd < 0:
            e = -fd
            self.close()
            raise_oserror(e, "upstream socket (SO_MARK needs CAP_NET_ADMIN)"
                          if e in (EPERM, EACCES) else "upstream socket")
        close(fd)

    def _count_name(self, name, n=1):
        from relay.stats import INDEX
        self.st[INDEX[name]] += n

    # ---- Python API ----------------------------------------------------------------

    @property
    def associations(self):
        return self.assoc.count

    @property
    def reassembling(self):
        return len(self.frags)

    @property
    def flows_open(self):
        return self.core.flows_open if self.core is not None else self.assoc.count

    def snapshot(self, int n, int sort, bint by_client=False, int clients_cap=4096):
        """relay flows rows of the associations (flows.pxd; Engine.snapshot): call it
        between run() calls, from the thread that runs them."""
        if self.closed:
            return []
        return table_snapshot(&self.assoc, self.core, n, sort, by_client, clients_cap,
                              monotonic(), ROWS_FLOWS_DST)

    def counters(self):
        from relay.stats import COUNTERS
        return {name: self.st[i] for i, name in enumerate(COUNTERS)}

    def run(self, int max_ms=200):
        """Move packets for up to max_ms milliseconds (one wait, then what it found)."""
        if self.closed:
            raise ValueError("tun relay is closed")
        self._loop(max_ms)
        if self.now >= self.next_sweep:
            self.tick(self.now)

    def tick(self, double now=0):
        """Expire idle associations and fragments (now: monotonic seconds)."""
        cdef int32_t i
        if now == 0:
            now = monotonic()
        self.next_sweep = now + 1.0
        self.frags.expire(now)
        if self.core is not None:
            self.core.c_tick(now)
            self.core.c_flush()
            return
        while True:
            i = table_expired(&self.assoc, now)
            if i < 0:
                break
            self._close_assoc(i, C_ASSOC_EXPIRED)

    def close(self):
        if self.closed:
            return
        self.closed = True
        while self.assoc.count:
            self._close_assoc(self.assoc.tail, -1)
        if self.core is not None:
            self.core.reply_fn = NULL
            self.core.reply_ctx = NULL
            self.core = None
        self._free()

    def __dealloc__(self):
        if not self.closed:
            while self.assoc.count:
                self._close_assoc(self.assoc.tail, -1)
        self._free()

    cdef void _free(self) noexcept:
        if self.ep >= 0:
            close(self.ep)
            self.ep = -1
        groups_free(&self.groups)
        table_free(&self.assoc)
        sq_free(&self.sq)
        free(self.port_class); self.port_class = NULL
        free(self.rbuf); self.rbuf = NULL
        free(self.ry); self.ry = NULL
        free(self.ry_msgs); self.ry_msgs = NULL
        free(self.ry_iov); self.ry_iov = NULL
        free(self.ry_names); self.ry_names = NULL
        free(self.wiov); self.wiov = NULL

    # ---- the loop ------------------------------------------------------------------

    cdef void _loop(self, int max_ms):
        cdef int n, k
        cdef uint64_t tag
        cdef int32_t idx
        cdef uint32_t evs
        with nogil:
            n = epoll_wait(self.ep, self.events, MAX_EVENTS, max_ms)
        self.now = monotonic()
        for k in range(n):
            tag = self.events[k].data.u64
            evs = self.events[k].events
            if (tag >> 32) == K_TUN:
                self._on_tun()
            elif (tag >> 32) == K_CORE:
                try:
                    self.core.c_process()
                except Exception:
                    pass
            else:
                idx = <int32_t>(tag & 0xffffffffu)
                if idx < self.assoc.cap and self.assoc.e[idx].used and \
                        self.assoc.e[idx].fd == <int>((tag >> 32) - K_ASSOC):
                    if evs & EPOLLERR:
                        self._errqueue(idx)
                    self._on_upstream(idx)

    cdef void _on_tun(self):
        """A batch of reads (one packet or offload run each, into its own slot: what they
        carry upstream stays queued in sq until the batch is sent)."""
        cdef int r
        cdef ssize_t got
        cdef bint valid
        cdef uint8_t flags, gso
        cdef uint16_t seg
        cdef uint8_t *p
        for r in range(self.batch):
            p = self.rbuf + <size_t>r * READ_MAX
            with nogil:
                got = read(self.fd, p, READ_MAX)
            if got < 0:
                if errno == EAGAIN or errno == EINTR:
                    break
                self.st[C_DROP_MALFORMED] += 1
                continue
            if not self.vnet:
                self._on_packet(p, <size_t>got, False)
                continue
            if got < VNET_LEN:
                self.st[C_DROP_MALFORMED] += 1
                continue
            flags, gso = p[0], p[1] & ~GSO_ECN
            seg = <uint16_t>(p[4] | (p[5] << 8))
            valid = (flags & (VNET_F_NEEDS_CSUM | VNET_F_DATA_VALID)) != 0
            if gso == GSO_NONE:
                self._on_packet(p + VNET_LEN, <size_t>got - VNET_LEN, valid)
            elif gso == GSO_UDP_L4:
                self._on_run(p + VNET_LEN, <size_t>got - VNET_LEN, seg)
            else:
                self.st[C_DROP_NOT_UDP] += 1
        if self.sq.n:
            with nogil:
                sq_flush(&self.sq, self.st, C_UP_DATAGRAMS, C_UP_BYTES)
        if self.core is not None:
            try:
                self.core.c_flush()
            except Exception:
                pass

    cdef void _on_run(self, const uint8_t *p, size_t n, uint16_t seg):
        cdef pkt_t k
        cdef size_t off, plen, take
        if classify(p, n, True, &k) != PK_UDP or seg == 0 or k.l4_len < UDP_HDR_LEN:
            self.st[C_DROP_MALFORMED] += 1
            return
        self.st[C_TUN_RUNS_IN] += 1
        plen = k.l4_len - UDP_HDR_LEN
        off = 0
        while True:
            take = plen - off if plen - off < seg else seg
            self._up(&k, k.l4 + UDP_HDR_LEN + off, take)
            off += take
            if off >= plen:
                break

    cdef void _on_packet(self, const uint8_t *p, size_t n, bint valid):
        cdef pkt_t k
        cdef int kind = classify(p, n, valid, &k)
        cdef bytes whole
        if kind == PK_BAD:
            self.st[C_DROP_MALFORMED] += 1
            return
        if kind == PK_OTHER:
            self.st[C_DROP_NOT_UDP] += 1
            return
        if kind == PK_FRAG:
            key = (bool(k.v6), k.src[:16 if k.v6 else 4], k.dst[:16 if k.v6 else 4], k.ident)
            whole = self.frags.add(key, k.frag_off, bool(k.more), k.l4[:k.l4_len], self.now)
            if whole is None:
                return
            k.l4 = <const uint8_t *>whole
            k.l4_len = len(whole)
            valid = False
        if udp_check(&k, valid) < 0:
            self.st[C_DROP_MALFORMED] += 1
            return
        self._up(&k, k.l4 + UDP_HDR_LEN, k.l4_len - UDP_HDR_LEN)
        if kind == PK_FRAG and self.sq.n:       # whole lives only as long as this call
            sq_flush(&self.sq, self.st, C_UP_DATAGRAMS, C_UP_BYTES)

    # ---- client -> upstream --------------------------------------------------------

    cdef void _up(self, pkt_t *k, const uint8_t *data, size_t n):
        cdef akey_t ck
        cdef sockaddr_any dst, cl
        cdef socklen_t dl
        cdef int32_t i
        cdef ssize_t sent
        key_of(k.v6, k.src, k.sport, &ck)
        if self.core is not None:
            sa_of(k.v6, k.src, k.sport, &cl, AF_INET6 if k.v6 else AF_INET)
            sa_of(k.v6, k.dst, k.dport, &dst, AF_INET6 if k.v6 else AF_INET)
            try:
                self.core.c_send(&cl, &dst, data, n)
            except Exception:
                self.st[C_DROP_SEND_ERROR] += 1
            return
        i = table_find(&self.assoc, &ck)
        if i < 0:
            i = self._new_assoc(&ck, k)
            if i < 0:
                return
        else:
            table_touch(&self.assoc, i, self.now)
        key_of(k.v6, k.dst, k.dport, &self.assoc.e[i].aux)     # `relay flows`: latest destination
        flow_out(&self.assoc.e[i], &self.groups, 1, n)
        dl = sa_of(k.v6, k.dst, k.dport, &dst, self.up_family)
        if dl == 0:
            self.st[C_DROP_NO_ROUTE] += 1
            return
        self._sq_for(self.assoc.e[i].fd)
        sq_add(&self.sq, &dst, dl, data, n)     # counted when sent (sq_flush)

    cdef void _sq_for(self, int fd) noexcept nogil:
        """Make the send queue the one of socket fd: what it holds for another goes first;
        a full one too."""
        if self.sq.n and (self.sq.fd != fd or sq_full(&self.sq)):
            sq_flush(&self.sq, self.st, C_UP_DATAGRAMS, C_UP_BYTES)
        self.sq.fd = fd

    cdef int _upstream_socket(self, bint v6) noexcept nogil:
        cdef int fam = self.up_family
        cdef int fd = socket(fam, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0)
        cdef int zero = 0, one = 1
        if fd < 0:
            return -errno
        if fam == AF_INET6:
            setsockopt(fd, IPPROTO_IPV6, IPV6_V6ONLY, &zero, sizeof(int))
            setsockopt(fd, IPPROTO_IPV6, IPV6_RECVERR, &one, sizeof(int))
        setsockopt(fd, IPPROTO_IP, IP_RECVERR, &one, sizeof(int))
        if self.mark and setsockopt(fd, SOL_SOCKET, SO_MARK, &self.mark, sizeof(uint32_t)) < 0:
            one = errno
            close(fd)
            return -one
        one = outbind_apply(fd, fam, v6, &self.ob)
        if one < 0:
            close(fd)
            return one
        return fd

    cdef int32_t _new_assoc(self, akey_t *ck, pkt_t *k):
        cdef int fd
        cdef int32_t i
        cdef epoll_event ev
        if k.v6 and self.up_family != AF_INET6:
            self.st[C_DROP_NO_ROUTE] += 1
            return -1
        if self.assoc.count >= self.assoc.cap:
            self._close_assoc(self.assoc.tail, C_ASSOC_EVICTED)
        fd = self._upstream_socket(k.v6)
        if fd < 0 or fd_reserved(fd, self.nfd):
            if fd >= 0:
                close(fd)
                self.st[C_ASSOC_REFUSED] += 1
            elif -fd in (EMFILE, ENFILE, ENOBUFS, ENOMEM):
                self.st[C_ASSOC_REFUSED] += 1
            else:
                self.st[send_error_counter(-fd)] += 1
            self.st[C_DROP_TABLE_FULL] += 1
            return -1
        i = table_insert(&self.assoc, ck, self.now)
        if i < 0:
            close(fd)
            self.st[C_DROP_TABLE_FULL] += 1
            return -1
        self.assoc.e[i].fd = fd
        self.assoc.e[i].group = group_of(&self.groups, ck)
        if self.port_class != NULL:
            table_set_class(&self.assoc, i, self.port_class[k.dport])
        ev.events = EPOLLIN
        ev.data.u64 = (<uint64_t>(K_ASSOC + fd) << 32) | <uint32_t>i
        epoll_ctl(self.ep, EPOLL_CTL_ADD, fd, &ev)
        self.st[C_ASSOC_CREATED] += 1
        self.st[C_ASSOC_OPEN] += 1
        return i

    cdef void _close_assoc(self, int32_t i, int counter) noexcept:
        cdef int fd = self.assoc.e[i].fd
        if self.sq.n and self.sq.fd == fd:      # queued for it: sent before it closes
            sq_flush(&self.sq, self.st, C_UP_DATAGRAMS, C_UP_BYTES)
        epoll_ctl(self.ep, EPOLL_CTL_DEL, fd, NULL)
        close(fd)
        table_remove(&self.assoc, i)
        self.st[C_ASSOC_OPEN] -= 1
        if counter >= 0:
            self.st[counter] += 1

    # ---- upstream -> client --------------------------------------------------------

    cdef void _on_upstream(self, int32_t i):
        cdef uint64_t nb
        cdef int fd = self.assoc.e[i].fd
        cdef akey_t client = self.assoc.e[i].key
        cdef int n, j
        for j in range(self.batch):
            self.ry_iov[j].iov_base = self.ry + <size_t>j * SLOT + HEADROOM
            self.ry_iov[j].iov_len = MAXDGRAM
            memset(&self.ry_msgs[j].msg_hdr, 0, sizeof(msghdr))
            self.ry_msgs[j].msg_hdr.msg_iov = &self.ry_iov[j]
            self.ry_msgs[j].msg_hdr.msg_iovlen = 1
            self.ry_msgs[j].msg_hdr.msg_name = &self.ry_names[j]
            self.ry_msgs[j].msg_hdr.msg_namelen = sizeof(sockaddr_any)
        with nogil:
            n = recvmmsg(fd, self.ry_msgs, self.batch, MSG_DONTWAIT, NULL)
        if n <= 0:
            return
        table_touch(&self.assoc, i, self.now)
        self.st[C_DOWN_DATAGRAMS] += n
        nb = 0
        for j in range(n):
            nb += self.ry_msgs[j].msg_len
        self.st[C_DOWN_BYTES] += nb
        flow_in(&self.assoc.e[i], &self.groups, n, nb)
        with nogil:
            write_replies(self, &client, n)

    cdef void _errqueue(self, int32_t i):
        cdef akey_t client = self.assoc.e[i].key
        with nogil:
            drain_errqueue(self, self.assoc.e[i].fd, &client)

    cdef void core_reply(self, const sockaddr_any *client, const sockaddr_any *src,
                         const uint8_t *data, size_t n):
        """A reply an upstream core delivers: written into the TUN from src to client."""
        cdef uint8_t cip[16]
        cdef uint8_t sip[16]
        cdef uint16_t cport, sport
        cdef int fam = ip_of_sa(client, cip, &cport)
        if fam == 0 or n > MAXDGRAM or not reply_src(fam == 6, src, sip, &sport):
            self.st[C_DROP_NO_ROUTE] += 1
            return
        memcpy(self.ry + HEADROOM, data, n)
        with nogil:
            write_one(self, fam == 6, sip, sport, cip, cport, self.ry + HEADROOM, n)
