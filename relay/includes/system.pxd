# Declarations of the system headers the extensions use: one place, only the fields used.
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t

cdef extern from "<errno.h>" nogil:
    int errno
    enum:
        EAGAIN
        EWOULDBLOCK
        EINTR
        ENOBUFS
        ECONNREFUSED
        EMSGSIZE
        EMFILE
        ENFILE
        ENOMEM
        EPERM
        EACCES
        EINVAL
        EHOSTUNREACH
        ENETUNREACH
        EADDRNOTAVAIL
        ENOTCONN
        EIO

cdef extern from "<string.h>" nogil:
    void *memcpy(void *dest, const void *src, size_t n)
    void *memset(void *s, int c, size_t n)
    int memcmp(const void *a, const void *b, size_t n)
    char *strerror(int errnum)

cdef extern from "<unistd.h>" nogil:
    int close(int fd)
    ssize_t read(int fd, void *buf, size_t count)
    ssize_t write(int fd, const void *buf, size_t count)

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    enum:
        CLOCK_MONOTONIC
        CLOCK_MONOTONIC_COARSE
    int clock_gettime(int clk_id, timespec *tp)

cdef extern from "<sys/uio.h>" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)

cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    ctypedef unsigned short sa_family_t

    struct sockaddr:
        sa_family_t sa_family

    struct sockaddr_storage:
        sa_family_t ss_family

    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len

    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    cmsghdr *CMSG_NXTHDR(msghdr *msg, cmsghdr *cmsg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)

    enum:
        AF_INET
        AF_INET6
        AF_UNSPEC
        SOCK_DGRAM
        SOCK_STREAM
        SOCK_RAW
        SOCK_NONBLOCK
        SOCK_CLOEXEC
        SOL_SOCKET
        SO_REUSEADDR
        SO_REUSEPORT
        SO_RCVBUF
        SO_SNDBUF
        SO_ERROR
        MSG_DONTWAIT
        MSG_TRUNC
        MSG_CTRUNC
        MSG_WAITFORONE
        MSG_NOSIGNAL
        SHUT_RD
        SO_RXQ_OVFL
        SO_RCVBUFFORCE
        SO_BINDTODEVICE

    int socket(int domain, int type, int protocol)
    int bind(int fd, const sockaddr *addr, socklen_t len)
    int connect(int fd, const sockaddr *addr, socklen_t len)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
    int getsockname(int fd, sockaddr *addr, socklen_t *len)
    ssize_t sendto(int fd, const void *buf, size_t len, int flags, const sockaddr *addr, socklen_t alen)
    ssize_t recvfrom(int fd, void *buf, size_t len, int flags, sockaddr *addr, socklen_t *alen)
    ssize_t sendmsg(int fd, const msghdr *msg, int flags)
    ssize_t recvmsg(int fd, msghdr *msg, int flags)
    int sendmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags)
    int recvmmsg(int fd, mmsghdr *msgvec, unsigned int vlen, int flags, timespec *timeout)

cdef extern from "<netinet/in.h>" nogil:
    struct in_addr:
        uint32_t s_addr

    struct in6_addr:
        unsigned char s6_addr[16]

    struct sockaddr_in:
        sa_family_t sin_family
        uint16_t sin_port
        in_addr sin_addr

    struct sockaddr_in6:
        sa_family_t sin6_family
        uint16_t sin6_port
        uint32_t sin6_flowinfo
        in6_addr sin6_addr
        uint32_t sin6_scope_id

    # IP_PKTINFO / IPV6_PKTINFO: a datagram's local address (received), its source (sent)
    struct in_pktinfo:
        int ipi_ifindex
        in_addr ipi_spec_dst
        in_addr ipi_addr

    struct in6_pktinfo:
        in6_addr ipi6_addr
        unsigned int ipi6_ifindex

    enum:
        IPPROTO_IP
        IPPROTO_IPV6
        IPPROTO_UDP
        IPPROTO_TCP
        IPPROTO_RAW
        IP_HDRINCL
        IP_TTL
        IPV6_V6ONLY

    uint16_t htons(uint16_t)
    uint16_t ntohs(uint16_t)
    uint32_t htonl(uint32_t)
    uint32_t ntohl(uint32_t)

cdef extern from "compat.h" nogil:
    enum:
        IP_TRANSPARENT
        IP_RECVORIGDSTADDR
        IP_ORIGDSTADDR
        IPV6_TRANSPARENT
        IPV6_RECVORIGDSTADDR
        IPV6_ORIGDSTADDR
        IP_MTU_DISCOVER
        IP_PMTUDISC_DONT
        IP_MTU
        IPV6_MTU
        SO_MARK
        SOL_UDP
        UDP_SEGMENT
        UDP_GRO
        IPV6_HDRINCL
        SO_MEMINFO
        RELAY_SK_MEMINFO_DROPS
        IP_PKTINFO
        IPV6_RECVPKTINFO
        IPV6_PKTINFO

cdef extern from "<netinet/tcp.h>" nogil:
    enum:
        TCP_NODELAY

cdef extern from "<sys/epoll.h>" nogil:
    union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLLRDHUP
        EPOLLET
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)

cdef extern from "<arpa/inet.h>" nogil:
    int inet_pton(int af, const char *src, void *dst)
    const char *inet_ntop(int af, const void *src, char *dst, socklen_t size)
    enum:
        INET6_ADDRSTRLEN

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    enum:
        POLLIN
        POLLOUT
    int poll(pollfd *fds, unsigned long nfds, int timeout)

cdef extern from "<netinet/in.h>" nogil:
    enum:
        IP_RECVERR
        IPV6_RECVERR

cdef extern from "<sys/socket.h>" nogil:
    enum:
        MSG_ERRQUEUE

cdef extern from "<linux/errqueue.h>" nogil:
    struct sock_extended_err:
        uint32_t ee_errno
        uint8_t ee_origin
        uint8_t ee_type
        uint8_t ee_code
        uint32_t ee_info
        uint32_t ee_data

cdef extern from "<sys/socket.h>" nogil:
    enum:
        SO_DOMAIN
        SO_TYPE
