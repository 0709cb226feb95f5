# cython: language_level=3
# UDP-over-TCP tunnel (gost-compatible framing, see docs/tunnel.md) and SOCKS5 UDP:
# frame codec, destination access list, and the upstream cores the engine drives.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t, int32_t, int16_t
from relay.datapath.addr cimport sockaddr_any
from relay.datapath.sendq cimport sendq_t
from relay.datapath.table cimport table_t, akey_t
from relay.datapath.flows cimport groups_t
from relay.datapath.outbind cimport outbind_t
from relay.includes.system cimport mmsghdr, iovec, epoll_event

# The wire constants (ATYP_*, E_* frame errors, MAX_PAYLOAD, MAX_FRAME_HEADER) come from
# relay/includes/wire.pxd: their values are defined once, in relay/proto/wire.py.
cdef enum:
    RX_CAP = 135168              # two maximal frames
    DGRAM_SLOT = 65536           # one receive slot per datagram of a batch
    MAX_BATCH = 256

cdef struct frame_t:
    const uint8_t *addr          # 4 or 16 address bytes, or the domain name
    const uint8_t *data
    size_t dlen
    uint32_t flow
    uint16_t port
    uint8_t atyp
    uint8_t alen

cdef struct acl_rule_t:
    uint8_t family               # 4 or 6
    uint8_t plen
    uint8_t action               # 0 allow, 1 deny
    uint8_t net[16]

ctypedef int (*reply_fn_t)(void *ctx, const sockaddr_any *client, const sockaddr_any *src,
                           const uint8_t *data, size_t n) except -1

cdef Py_ssize_t parse_frame(const uint8_t *p, size_t n, bint mux, size_t maxp,
                            frame_t *f) noexcept nogil
cdef size_t frame_hdr_len(const sockaddr_any *a, bint mux) noexcept nogil
cdef size_t write_frame_hdr(uint8_t *o, const sockaddr_any *a, uint32_t flow, bint mux,
                            size_t dlen) noexcept nogil
cdef int frame_to_sockaddr(const frame_t *f, sockaddr_any *out, int family) noexcept nogil


cdef class Acl:
    cdef acl_rule_t *rules
    cdef int n
    cdef uint8_t *hosts          # the host's own addresses: sorted 16-byte keys (IPv4 mapped)
    cdef int nhosts
    cdef readonly uint32_t version   # bumped by set_hosts: verdicts remembered before are stale
    cdef bint is_host(self, const uint8_t *k) noexcept nogil
    cdef bint denied(self, const sockaddr_any *a) noexcept nogil


cdef class UpstreamCore:
    """Carries datagrams of many client flows to an upstream; the engine polls ``epfd``."""
    cdef int epfd
    cdef reply_fn_t reply_fn
    cdef void *reply_ctx
    cdef uint64_t *st
    cdef object _stats_ref
    cdef double now
    cdef double timeout
    cdef bytes pclass            # destination port -> timeout class (None: all class 0)
    cdef Acl acl                 # unused by the clients, kept for symmetry
    cdef object log
    cdef object _collector
    cdef table_t tab             # client -> flow slot, LRU order, last use, flow counters
    cdef groups_t groups         # client groups' counters (relay/datapath/flows.pxd)
    cdef int c_send(self, const sockaddr_any *client, const sockaddr_any *dst,
                    const uint8_t *data, size_t n) except -1
    cdef int c_flush(self) except -1
    cdef int c_process(self) except -1
    cdef int c_tick(self, double now) except -1
    # several upstreams: the flow of client moved to another upstream; end it here
    cdef int c_forget(self, const sockaddr_any *client) except -1


cdef struct cconn_t:             # one tunnel TCP connection of TunnelUpstream
    int fd
    int state
    double next_try
    double backoff
    double deadline
    uint8_t *rx
    size_t rx_len
    uint8_t *tx
    size_t tx_frame              # start of the first frame not completely sent
    size_t tx_start              # first byte not sent
    size_t tx_end
    bint want_out
    bint dirty
    bint ever_up

cdef struct cflow_t:             # one flow of TunnelUpstream: its slot is its table entry
    sockaddr_any client          # as the engine gave it (replies go back to this)
    uint32_t id                  # (gen << 16) | slot: replies for an older id find no route
    uint16_t gen
    int16_t conn


cdef class TunnelUpstream(UpstreamCore):
    cdef cconn_t *conns          # mux: `connections` of them; gost: one per flow slot
    cdef int nconns
    cdef int nup                 # connections whose handshake is done
    cdef int *dirty              # connections with frames to write at the next flush
    cdef int ndirty
    cdef size_t queue_limit      # bytes waiting per connection (per flow in gost mode)
    cdef size_t rx_cap
    cdef cflow_t *flows          # by table entry: flows[i] belongs to tab.e[i]
    cdef int max_flows
    cdef int fd_ceiling          # flow sockets at or above are refused (relay/datapath/limits.pxd)
    cdef int next_conn
    cdef double next_check
    cdef bint gost               # gost server: CMD 0xF3, one connection per flow, no flow id
    cdef bint mux
    cdef bint rep7_logged
    cdef object server
    cdef object family
    cdef object addr
    cdef object secret
    cdef object user
    cdef object password
    cdef object mark
    cdef object outbound         # relay.net.sockopt.Outbound of its connections
    cdef object say              # relay.loglimit.LogLimiter
    cdef dict hs
    cdef int conn_open_buffers(self, int i) except -1
    cdef int conn_shut(self, int i) except -1
    cdef int conn_close(self, int i) except -1
    cdef object conn_name(self, int i)
    cdef int conn_down(self, int i, str why) except -1
    cdef int conn_write(self, int i) except -1
    cdef int conn_read(self, int i) except -1
    cdef int conn_connect(self, int i) except -1
    cdef int conn_handshake(self, int i, uint32_t events) except -1
    cdef int conn_frames(self, int i) except -1
    cdef int conn_upkeep(self, int i, double now) except -1
    cdef int flow_for(self, const sockaddr_any *client, const sockaddr_any *dst) except -2
    cdef int flow_end(self, int i, int counter) except -1


cdef struct aflow_t:             # one SOCKS5 UDP association of Socks5Upstream (its table entry's slot)
    sockaddr_any client
    sockaddr_any relay
    double deadline
    uint8_t *queue               # datagrams waiting for the association: [len(4) dst hdr data]
    size_t qlen
    size_t qcap                  # bytes allocated for queue (grown as datagrams come)
    int tcp_fd
    int udp_fd
    int state
    uint32_t gen                 # which flow of this slot a waiting-ring entry is for


cdef class Socks5Upstream(UpstreamCore):
    cdef aflow_t *flows          # by table entry: flows[i] belongs to tab.e[i]
    cdef int max_flows
    cdef int nup                 # associations whose handshake is done
    cdef int nstarting           # ... connecting or in their handshake (at most handshakes)
    cdef int handshakes          # handshakes at once towards the server
    cdef size_t queued           # queue bytes of every flow not up yet (at most queued_max)
    cdef size_t queued_max
    cdef uint32_t gen
    cdef uint64_t *waiting       # ring of flows waiting for a handshake: slot << 32 | gen
    cdef int w_head
    cdef int w_len
    cdef object loglim
    cdef int fd_ceiling          # flow sockets at or above are refused (relay/datapath/limits.pxd)
    cdef size_t queue_limit
    cdef double next_expiry
    cdef object server
    cdef object family
    cdef object addr
    cdef object user
    cdef object password
    cdef object mark
    cdef object outbound         # relay.net.sockopt.Outbound of its TCP and UDP sockets
    cdef dict hs
    cdef int batch
    cdef uint8_t *scratch
    cdef sendq_t sb
    cdef int flow_open(self, const sockaddr_any *client, const akey_t *k,
                       const sockaddr_any *dst) except -2
    cdef int flow_start(self, int i) except -1
    cdef object _connect(self)
    cdef int _attach(self, int i, socks) except -1
    cdef int start_waiting(self) except -1
    cdef bint _still_waiting(self, uint64_t v) noexcept
    cdef void _compact_waiting(self) noexcept
    cdef int _queue_grow(self, aflow_t *a, size_t want) noexcept
    cdef int flow_handshake(self, int i, uint32_t events) except -1
    cdef int flow_close(self, int i, int counter) except -1
    cdef int flow_send_queue(self, int i) except -1
    cdef int flow_recv(self, int i) except -1


from libc.stdint cimport int64_t

cdef class BalancedUpstream(UpstreamCore):
    # several upstreams (relay/datapath/tunnel_balance.pxi; pure twin: pure/balance.py)
    cdef list kids               # the child cores, UpstreamCore each
    cdef list names              # their URLs without credentials
    cdef int nkids
    cdef bint hashed             # --balance hash (else failover)
    cdef uint8_t healthy[16]
    cdef uint8_t by_conn[16]     # 1: also the child's own connection (multiplexed tunnel)
    cdef uint8_t probe_ok[16]    # the last background check (set_health)
    cdef uint64_t seeds[16]      # rendezvous (HRW) seeds, from the names
    cdef int64_t nflows[16]      # flows on each upstream now
    cdef uint8_t *cur            # by table entry: the upstream the flow uses
    cdef uint8_t *own            # by table entry: its first choice (hash: the client's own)
    cdef int max_flows
    cdef int bal_pick(self, const akey_t *k, int *first) noexcept
    cdef int bal_conn_health(self) except -1


cdef class DirectUpstream(UpstreamCore):
    # plain UDP as one of several upstreams (relay/datapath/direct_upstream.pxi)
    cdef sockaddr_any *clients   # by table entry: the flow's client (its socket: tab.e[i].fd)
    cdef int max_flows
    cdef int family              # of the flow sockets (AF_INET6: dual stack)
    cdef int batch
    cdef int fd_ceiling
    cdef object mark
    cdef outbind_t ob            # --bind-interface / --source of its flow sockets
    cdef uint8_t *scratch
    cdef mmsghdr *rmsgs
    cdef iovec *riovs
    cdef sockaddr_any *rnames
    cdef int dflow_close(self, int i, int counter) except -1
    cdef int dflow_read(self, int i) except -1
