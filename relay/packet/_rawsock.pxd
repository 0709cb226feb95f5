# cython: language_level=3
# RawSender: spoofed IPv4/IPv6 + UDP datagrams through IPPROTO_RAW sockets, batched
# with sendmmsg. Other extensions can cimport the class and queue packets from C:
#
#     sender.queue_raw(is_v6, src_ip, sport, dst_ip, dport, payload, plen)  # per packet
#     sender.flush()                                                        # at the end
#
# queue_raw() flushes by itself when the ring is full or the family changes, so the
# payload memory must stay valid until the next queue_raw()/flush() returns. A sender made
# with mtu fragments what is larger (one message per fragment, same ring).
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from relay.includes.system cimport iovec, mmsghdr
from relay.datapath.addr cimport sockaddr_any


cdef class RawSender:
    cdef int _fd4
    cdef int _fd6
    cdef bint _closed
    cdef bint _busy
    cdef bint _has_mark
    cdef uint32_t _mark
    cdef uint8_t _ttl
    cdef unsigned int _batch
    cdef uint32_t _mtu              # 0: never fragment
    cdef uint32_t _ident            # identification of the last fragmented datagram

    # The ring: _cap messages, each a 56-byte header slot, two iovecs (header, payload),
    # one destination sockaddr (port 0), the Py_buffer holding the payload (obj NULL
    # when the slot was queued from C, or is a datagram's second or later fragment) and
    # its kind (0 a whole datagram, 1 a fragment, 2 a datagram's last fragment). _nq
    # messages are queued, holding _nd datagrams.
    cdef uint8_t *_hdrs
    cdef iovec *_iov
    cdef mmsghdr *_msgs
    cdef sockaddr_any *_names
    cdef Py_buffer *_views
    cdef uint8_t *_kind
    cdef unsigned int _cap
    cdef unsigned int _nq
    cdef unsigned int _nd
    cdef bint _q_v6

    # Datagrams sent since the current send()/send_many() call started.
    cdef Py_ssize_t _sent

    # Last converted source/destination: floods repeat the same addresses.
    cdef object _src_obj
    cdef object _src_host
    cdef object _src_port
    cdef sockaddr_any _src_sa
    cdef object _dst_obj
    cdef object _dst_host
    cdef object _dst_port
    cdef sockaddr_any _dst_sa

    cdef _teardown(self)
    cdef int _open(self, bint is_v6) except -1
    cdef int _queue_item(self, object item) except -1
    cdef int _resolve(self, object addr, bint is_src) except -1
    cdef int _queue(self, object src, object dst, object payload) except -1
    cdef int _put(self, bint is_v6, const uint8_t *src, uint16_t sport,
                  const uint8_t *dst, uint16_t dport, const sockaddr_any *dst_sa,
                  const uint8_t *payload, size_t plen, Py_buffer *view) except -1
    cdef int _slot(self, bint is_v6, const uint8_t *src, uint16_t sport,
                   const uint8_t *dst, uint16_t dport, const sockaddr_any *dst_sa,
                   const uint8_t *payload, size_t plen) except -1
    cdef void _name(self, unsigned int i, bint is_v6, const uint8_t *dst,
                    const sockaddr_any *dst_sa) noexcept
    cdef void _release(self) noexcept
    cdef int _enter(self) except -1
    cdef int _recover(self, object exc) except -1
    cdef int _too_big_mtu(self, int fd, unsigned int off) except -1
    cdef int queue_raw(self, bint is_v6, const uint8_t *src, uint16_t sport,
                       const uint8_t *dst, uint16_t dport,
                       const uint8_t *payload, size_t plen) except -1
    cdef int flush(self) except -1
