# cython: language_level=3
# The TunRelay's state (relay/datapath/tun.pyx): declared here so that the writing part in
# tun_write.pxi, module-level functions of the same extension, reach it.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t
from relay.includes.system cimport iovec, mmsghdr, epoll_event
from relay.datapath.addr cimport sockaddr_any
from relay.datapath.table cimport akey_t, table_t
from relay.datapath.flows cimport groups_t
from relay.datapath.outbind cimport outbind_t
from relay.datapath.sendq cimport sendq_t
from relay.datapath.stats cimport N_COUNTERS
from relay.datapath.tunnel cimport UpstreamCore
from relay.packet.headers cimport FRAG_HDR_MAX
from relay.packet.icmp cimport ICMP_UNREACH_MAX


cdef enum:
    TUN_MAX_EVENTS = 256
    TUN_VNET_LEN = 10


cdef struct pkt_t:
    bint v6
    uint8_t src[16]
    uint8_t dst[16]
    uint16_t sport               # host order
    uint16_t dport
    const uint8_t *l4            # UDP header + payload (a fragment: its piece)
    size_t l4_len
    uint32_t frag_off            # a fragment: byte offset, more fragments, identification
    bint more
    uint32_t ident


cdef class TunRelay:
    cdef int fd, ep, batch, up_family, nfd
    cdef uint32_t mtu, mark
    cdef bint vnet, closed
    cdef table_t assoc
    cdef groups_t groups          # client groups' counters (flows.pxd)
    cdef outbind_t ob             # --bind-interface / --source of the upstream sockets
    cdef uint8_t *port_class
    cdef uint64_t *st
    cdef object stats_ref
    cdef uint64_t[N_COUNTERS] own_stats
    cdef UpstreamCore core
    cdef object frags             # relay.datapath.pure.tun_stack.Reassembler
    cdef uint32_t ident
    cdef readonly double next_sweep
    cdef public double now
    cdef uint8_t *rbuf            # the reads of one batch (batch slots of a TUN read each)
    cdef sendq_t sq               # datagrams to the upstream socket being sent to, and runs
    cdef uint8_t *ry              # reply slots: headroom, then the payload
    cdef mmsghdr *ry_msgs
    cdef iovec *ry_iov
    cdef sockaddr_any *ry_names
    cdef iovec *wiov              # a run's iovecs: virtio header, headers, payloads
    cdef uint8_t[FRAG_HDR_MAX + TUN_VNET_LEN] whdr
    cdef uint8_t[ICMP_UNREACH_MAX + TUN_VNET_LEN] ibuf
    cdef epoll_event[TUN_MAX_EVENTS] events

    cdef void _free(self) noexcept
    cdef void _loop(self, int max_ms)
    cdef void _on_tun(self)
    cdef void _sq_for(self, int fd) noexcept nogil
    cdef void _on_run(self, const uint8_t *p, size_t n, uint16_t seg)
    cdef void _on_packet(self, const uint8_t *p, size_t n, bint valid)
    cdef void _up(self, pkt_t *k, const uint8_t *data, size_t n)
    cdef int _upstream_socket(self, bint v6) noexcept nogil
    cdef int32_t _new_assoc(self, akey_t *ck, pkt_t *k)
    cdef void _close_assoc(self, int32_t i, int counter) noexcept
    cdef void _on_upstream(self, int32_t i)
    cdef void _errqueue(self, int32_t i)
    cdef void core_reply(self, const sockaddr_any *client, const sockaddr_any *src,
                         const uint8_t *data, size_t n)
