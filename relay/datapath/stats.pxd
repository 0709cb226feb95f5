# cython: language_level=3
# Counter slots shared with relay/stats.py (COUNTERS there lists the same names in the
# same order). The data path bumps them with plain stores: each slot belongs to exactly one
# worker process, so no locks are needed; readers sum over slots.
from libc.stdint cimport uint64_t

cdef enum:
    C_UP_DATAGRAMS = 0        # client -> upstream
    C_UP_BYTES
    C_DOWN_DATAGRAMS          # upstream -> client
    C_DOWN_BYTES
    C_ASSOC_OPEN              # gauge
    C_ASSOC_CREATED
    C_ASSOC_EXPIRED
    C_ASSOC_EVICTED
    C_ASSOC_REFUSED
    C_DROP_MALFORMED
    C_DROP_BUFFER_FULL
    C_DROP_SEND_ERROR
    C_DROP_TABLE_FULL
    C_DROP_TOO_BIG
    C_DROP_NO_ROUTE
    C_DROP_DENIED
    C_REPLY_FALLBACK          # replies sent the transparent way because raw could not
    C_REPLY_FRAGMENTED        # raw replies larger than the MTU, sent as IP fragments
    C_TRANSPARENT_OPEN        # gauge: transparent reply sockets open
    C_CONN_OPEN               # gauge: tunnel / SOCKS5 TCP connections
    C_CONN_ACCEPTED
    C_CONN_REJECTED
    C_CONN_RECONNECTS
    C_FRAMES_BAD
    C_QUEUE_DROPS
    C_ICMP_ERRORS
    C_DROP_RCVBUF             # the kernel's count for the listen socket (SO_MEMINFO)
    C_DROP_PERMISSION         # a send or reply socket refused for lack of a privilege
    C_REJECTED                # datagrams to a --reject port (answered: port unreachable)
    C_REJECT_RATELIMITED      # ... whose ICMP error the rate limit held back
    C_DROP_FOREIGN_PORT       # SOCKS5 UDP: the client's host, not the port that claimed it
    C_DROP_BAD_HEADER         # forward --header-in/--header-out: no valid disguise header
    C_DROP_NOT_UDP            # tun: packets that are not UDP
    C_FRAG_REASSEMBLED        # tun: datagrams reassembled from fragments
    C_FRAG_TIMEOUT
    C_FRAG_OVERLAP            # RFC 5722
    C_FRAG_DROPPED_MEMORY     # reassembly bounds
    C_TUN_ICMP_SENT           # ICMP errors written into the TUN
    C_TUN_RUNS_IN             # offload runs read
    C_TUN_RUNS_OUT            # offload runs written
    C_UPSTREAM_FAILOVER       # flows moved from one upstream to another (several upstreams)
    C_OFFLOAD_FALLBACK        # GSO sends the kernel refused, sent one datagram at a time
    N_COUNTERS


cdef inline uint64_t *stats_ptr(object view) except NULL:
    """The first counter of a writable uint64 memoryview (a stats slot)."""
    cdef uint64_t[::1] mv = view
    return &mv[0]
