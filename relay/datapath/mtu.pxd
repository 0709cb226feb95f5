# cython: language_level=3
# The MTU towards an address, for senders that write their own IP headers and fragment
# themselves (RawSender, the engine's raw replies). Off the per-datagram path: called when a
# reply is larger than anything known to fit, or after the kernel refused one (EMSGSIZE).
from libc.stdint cimport uint32_t
from relay.includes.system cimport (
    errno, memset, close, iovec, msghdr, cmsghdr, CMSG_FIRSTHDR, CMSG_NXTHDR, CMSG_DATA,
    socket, connect, setsockopt, getsockopt, recvmsg, socklen_t, AF_INET6, SOCK_DGRAM,
    SOCK_CLOEXEC, SOL_SOCKET, SO_MARK, IPPROTO_IP, IPPROTO_IPV6, IP_MTU, IPV6_MTU,
    MSG_ERRQUEUE, MSG_DONTWAIT, EMSGSIZE, sock_extended_err,
)
from relay.datapath.addr cimport sockaddr_any


cdef inline uint32_t errqueue_mtu(int fd) noexcept nogil:
    """Drain fd's error queue (IP_RECVERR / IPV6_RECVERR): the MTU the last EMSGSIZE
    entry reports (the kernel queues one for each packet it refuses as too big), or 0."""
    cdef uint32_t mtu = 0
    cdef msghdr em
    cdef cmsghdr *cm
    cdef sock_extended_err *ee
    cdef char ctrl[512]
    cdef char dummy[8]
    cdef iovec eiov
    cdef int rounds
    for rounds in range(64):            # bounded: the queue holds at most a socket buffer
        memset(&em, 0, sizeof(em))
        eiov.iov_base = dummy
        eiov.iov_len = sizeof(dummy)
        em.msg_iov = &eiov
        em.msg_iovlen = 1
        em.msg_control = ctrl
        em.msg_controllen = sizeof(ctrl)
        if recvmsg(fd, &em, MSG_ERRQUEUE | MSG_DONTWAIT) < 0:
            break
        cm = CMSG_FIRSTHDR(&em)
        while cm != NULL:
            ee = <sock_extended_err *>CMSG_DATA(cm)
            if ee.ee_errno == EMSGSIZE:
                mtu = ee.ee_info
            cm = CMSG_NXTHDR(&em, cm)
    return mtu


cdef inline uint32_t route_mtu(const sockaddr_any *dst, socklen_t dst_len,
                               uint32_t mark) noexcept nogil:
    """The MTU of the route to dst (taken with SO_MARK mark when nonzero, as the sender's
    packets are): a UDP socket connected to dst reports IP_MTU / IPV6_MTU (the path MTU
    the kernel knows), then is closed. 0 when there is no route or no socket."""
    cdef int fam = dst.sa.sa_family
    cdef int fd = socket(fam, SOCK_DGRAM | SOCK_CLOEXEC, 0)
    cdef int mtu = 0
    cdef socklen_t ln = sizeof(mtu)
    if fd < 0:
        return 0
    if mark:
        setsockopt(fd, SOL_SOCKET, SO_MARK, &mark, sizeof(mark))
    if connect(fd, &dst.sa, dst_len) < 0 or getsockopt(
            fd, IPPROTO_IPV6 if fam == AF_INET6 else IPPROTO_IP,
            IPV6_MTU if fam == AF_INET6 else IP_MTU, &mtu, &ln) < 0 or mtu < 0:
        mtu = 0
    close(fd)
    return <uint32_t>mtu
