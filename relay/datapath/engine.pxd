# cython: language_level=3
# The Engine's state (relay/datapath/engine.pyx): declared here so that the reply paths in
# reply_raw.pxi and reply_transparent.pxi, module-level functions of the same extension,
# reach it.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from relay.includes.system cimport iovec, msghdr, mmsghdr, socklen_t, epoll_event
from relay.datapath.addr cimport sockaddr_any
from relay.datapath.ring cimport SRC_CTRL
from relay.datapath.table cimport akey_t, table_t
from relay.datapath.flows cimport groups_t
from relay.datapath.stats cimport N_COUNTERS
from relay.datapath.tunnel cimport UpstreamCore
from relay.packet.icmp cimport ICMP_UNREACH_MAX
from relay.datapath.disguise cimport hdr_t
from relay.datapath.outbind cimport outbind_t


cdef enum:
    MODE_FORWARD = 0
    MODE_REDIR = 1
    REPLY_RAW = 0
    REPLY_TRANSPARENT = 1
    HEADROOM = 64                 # room in front of each reply payload for IPv6+UDP headers
    MAXDGRAM = 65535
    SLOT = MAXDGRAM + HEADROOM
    CTRL = 128                    # IPV6_ORIGDSTADDR (48) or IPV6_PKTINFO (40) + IP_PKTINFO (32),
                                  # + UDP_GRO (24) control messages
    GSO_CTRL = 32                 # one UDP_SEGMENT control message (24)
    OUT_CTRL = SRC_CTRL + 24      # a reply's source address (IPV6_PKTINFO, 40) + UDP_SEGMENT (24)
    K_CORE = 0                    # the upstream core's own epoll fd
    K_LISTEN = 1
    K_ASSOC = 2
    MAX_EVENTS = 256
    LISTEN_ROUNDS = 1             # client batches per wake-up before replies are served: under
    REPLY_ROUNDS = 4              # overload, alternating keeps upstream receive buffers drained
    UPSTREAM_RCVBUF = 1 << 20     # cap on an upstream socket's receive buffer (used only if full)
    SEND_RETRIES = 1              # waits for a full buffer per run: a shared socket must not stall the loop
    FRAG_CAP = 256                # raw reply fragments per sendmmsg (more: flush and continue)
    MTU_CACHE = 4096              # client hosts whose route MTU is remembered (oldest learned go first)
    MTU_UNASKED = 1280            # raw replies this size or less go whole until an MTU is learned
    MTU_TTL = 600                 # seconds a learned MTU is trusted (the kernel's PMTU expiry)
    K_WHOLE = 0                   # raw reply messages: a whole datagram,
    K_FRAG = 1                    # a fragment, or
    K_LAST = 2                    # a datagram's last fragment


cdef class Engine:
    cdef int mode, reply_mode, lfd, lfamily, ep, raw4, raw6, up_family, batch, nfd
    cdef uint32_t mark
    cdef outbind_t ob             # --bind-interface, --source of the upstream sockets
    cdef sockaddr_any to_addr
    cdef socklen_t to_len
    cdef double timeout, tp_idle, next_sweep, min_timeout
    cdef uint8_t *port_class      # redir: destination port -> timeout class (NULL: all class 0)
    cdef table_t assoc
    cdef groups_t groups          # client groups' counters (flows.pxd), after the stats
    cdef table_t tp
    cdef uint64_t *st
    cdef object stats_ref
    cdef uint64_t[N_COUNTERS] own_stats
    cdef volatile int stopping
    cdef bint closed
    cdef UpstreamCore core        # tunnel / SOCKS5 upstream instead of direct sockets
    cdef bint gro                 # UDP_GRO on receive, the same segments out as one GSO send
    cdef uint64_t rcvbuf_base     # drop_rcvbuf when this engine started (slots outlive engines)
    cdef uint32_t drops0          # the listen socket's own drop count then (sockets do too)
    cdef bint local_src           # forward on a wildcard address: the listen socket reports
                                  # each datagram's local address (IP_PKTINFO/IPV6_RECVPKTINFO)
                                  # and replies leave from it (association aux, or `locals`)
    cdef bint local_map           # local_src with an upstream core: no association entries, so
    cdef table_t locals           # client -> local address (aux), LRU-capped, idle-expired
    cdef uint8_t *tx_ctrl
    cdef uint8_t *ry_ctrl
    cdef uint8_t *out_ctrl
    cdef int *ry_gro
    cdef sockaddr_any *cl_names   # client address of each datagram for the core
    # client side: receive ring and the upstream send list that points into it
    cdef uint8_t *rx
    cdef mmsghdr *rx_msgs
    cdef iovec *rx_iov
    cdef sockaddr_any *rx_names
    cdef uint8_t *rx_ctrl
    cdef mmsghdr *tx_msgs
    cdef iovec *tx_iov
    cdef sockaddr_any *tx_names
    cdef int *tx_fd
    cdef uint32_t *tx_seg         # message j: its segment size (its first datagram's size)
    cdef uint32_t *tx_bytes       # message j: payload bytes
    cdef bint *tx_closed          # message j: a run that may not grow (shorter end, GRO buffer)
    cdef int ntx
    cdef int niov                 # datagrams in the tx messages (iovecs used)
    cdef uint32_t gso_max         # largest datagram still coalesced into runs (routes refuse more)
    # reply side: receive ring (payload at HEADROOM in each slot), owner client per slot
    cdef uint8_t *ry
    cdef mmsghdr *ry_msgs
    cdef iovec *ry_iov
    cdef sockaddr_any *ry_names
    cdef akey_t *ry_client
    cdef akey_t *ry_local         # local_src: the local address the slot's client last sent to
    cdef int ry_count
    cdef mmsghdr *out_msgs
    cdef iovec *out_iov
    cdef sockaddr_any *out_names
    cdef int *out_slot
    cdef uint32_t *out_seg        # forward replies: a run's segment size, bytes, whether closed
    cdef uint32_t *out_bytes
    cdef bint *out_closed
    # raw replies larger than the MTU to their client: fragments, a header each in fr_hdr and
    # two iovecs (header, piece of the payload where it lies in the reply ring); out_msgs has
    # room for batch whole replies and FRAG_CAP fragments, out_kind says which each is
    cdef uint8_t *fr_hdr
    cdef iovec *fr_iov
    cdef int nfr
    cdef uint8_t *out_kind
    cdef uint32_t frag_ident      # identification of the last fragmented reply
    cdef int fr_abort             # reply slot whose remaining fragments are not to be sent
    cdef int *retry               # reply slots refused as too big, sent again once the MTU is known
    cdef int nretry
    cdef bint retrying
    cdef table_t mtus             # client host (port 0) -> MTU of the route to it, entry .mtu
    cdef uint32_t frag_over[2]    # [IPv4, IPv6]: raw replies larger than this ask for the MTU
    cdef bint mtu_known[2]
    cdef akey_t *out_local        # local_src: forward reply message k leaves from this address
    # --reject (reject.pxi): the rejected ports (a bit each, NULL: none), the ICMP errors'
    # token bucket and the buffer each error is written in
    cdef uint8_t *reject_map
    cdef double rj_tokens, rj_last
    cdef uint8_t[ICMP_UNREACH_MAX] rj_out
    cdef epoll_event[MAX_EVENTS] events
    cdef hdr_t hdr                # --header-out / --header-in (disguise.pxi)


    cdef void _free(self) noexcept
    cdef void _loop(self, int max_ms) noexcept nogil
    cdef void _sweep(self, double now) noexcept nogil
    cdef uint32_t _socket_drops(self) noexcept nogil
    cdef void _read_drops(self) noexcept nogil
    cdef void _on_listen(self, double now) noexcept nogil
    cdef void _tx_add(self, int fd, uint8_t *data, uint32_t n, int seg,
                      socklen_t nl) noexcept nogil
    cdef void _core_queue(self, int i, akey_t *ck, akey_t *dk, int seg) noexcept nogil
    cdef int _core_send(self) except -1
    cdef void _core_call(self, int what, double now) noexcept
    cdef int _core_reply(self, const sockaddr_any *client, const sockaddr_any *src,
                         const uint8_t *data, size_t n) noexcept nogil
    cdef bint _cmsgs(self, msghdr *h, akey_t *origdst, akey_t *local, int *gro) noexcept nogil
    cdef void _note_local(self, akey_t *client, akey_t *local, double now) noexcept nogil
    cdef void _flush_tx(self) noexcept nogil
    cdef int _send_some(self, int fd, mmsghdr *m, int n, int *err) noexcept nogil
    cdef void _count_sent(self, mmsghdr *m, int n, int counter) noexcept nogil
    cdef void _count_down(self, uint64_t n, uint64_t nbytes) noexcept nogil
    cdef void _count_error(self, int e) noexcept nogil
    cdef void _send_counted(self, int fd, mmsghdr *m, int n, int counter) noexcept nogil
    cdef void _send_split(self, int fd, msghdr *h, int counter) noexcept nogil
    cdef int _upstream_socket(self, int family) noexcept nogil
    cdef int32_t _new_assoc(self, akey_t *ck, double now) noexcept nogil
    cdef void _close_assoc(self, int32_t idx, int counter) noexcept nogil
    cdef void _on_upstream(self, int32_t idx, double now) noexcept nogil
    cdef void _flush_replies(self, double now) noexcept nogil
    cdef void _replies_forward(self, int n) noexcept nogil
