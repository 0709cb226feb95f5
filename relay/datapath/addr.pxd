# cython: language_level=3
# Conversions between Python (host, port) tuples and C socket addresses, and the one
# place errno becomes an OSError. Used at API boundaries, never per datagram.
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from relay.includes.system cimport (
    sockaddr, sockaddr_in, sockaddr_in6, sockaddr_storage, socklen_t,
    AF_INET, AF_INET6, inet_pton, inet_ntop, INET6_ADDRSTRLEN,
    htons, ntohs, htonl, memset, memcpy, strerror,
)

ctypedef union sockaddr_any:
    sockaddr sa
    sockaddr_in v4
    sockaddr_in6 v6
    sockaddr_storage ss


cdef inline int raise_oserror(int err, what=None) except -1:
    """Raise the OSError subclass matching errno err (PermissionError, BlockingIOError...)."""
    msg = strerror(err).decode("utf-8", "replace")
    if what:
        msg = f"{what}: {msg}"
    raise OSError(err, msg)


cdef inline int sockaddr_from_tuple(object addr, sockaddr_any *out) except -1:
    """Fill out from (host, port[, flowinfo, scope_id]) where host is an IP literal.
    Returns the sockaddr length. Raises TypeError/ValueError naming what is wrong."""
    cdef bytes hb
    cdef long port
    if not isinstance(addr, tuple) or len(<tuple>addr) < 2:
        raise TypeError(f"address must be a (host, port) tuple, not {addr!r}")
    host = (<tuple>addr)[0]
    if isinstance(host, str):
        hb = (<str>host).encode("ascii", "replace")
    elif isinstance(host, bytes):
        hb = <bytes>host
    else:
        raise TypeError(f"host must be str, not {type(host).__name__}")
    if b"\0" in hb:
        raise ValueError(f"not an IPv4 or IPv6 address literal: {host!r}")
    pobj = (<tuple>addr)[1]
    if isinstance(pobj, bool) or not isinstance(pobj, int):
        raise TypeError(f"port must be an int, not {type(pobj).__name__}")
    if pobj < 0 or pobj > 65535:
        raise ValueError(f"port out of range 0-65535: {pobj}")
    port = pobj
    memset(out, 0, sizeof(sockaddr_any))
    if inet_pton(AF_INET, hb, &out.v4.sin_addr) == 1:
        out.v4.sin_family = AF_INET
        out.v4.sin_port = htons(<uint16_t>port)
        return sizeof(sockaddr_in)
    if inet_pton(AF_INET6, hb, &out.v6.sin6_addr) == 1:
        out.v6.sin6_family = AF_INET6
        out.v6.sin6_port = htons(<uint16_t>port)
        if len(<tuple>addr) >= 4:
            flow, scope = (<tuple>addr)[2], (<tuple>addr)[3]
            if not (isinstance(flow, int) and 0 <= flow <= 0xfffff):
                raise ValueError(f"flowinfo out of range 0-0xFFFFF: {flow!r}")
            if not (isinstance(scope, int) and 0 <= scope <= 0xffffffff):
                raise ValueError(f"scope_id out of range 0-0xFFFFFFFF: {scope!r}")
            out.v6.sin6_flowinfo = htonl(<uint32_t>flow)
            out.v6.sin6_scope_id = <uint32_t>scope
        return sizeof(sockaddr_in6)
    raise ValueError(f"not an IPv4 or IPv6 address literal: {host!r}")


cdef inline tuple sockaddr_to_tuple(const sockaddr *sa):
    """(host, port) of an AF_INET or AF_INET6 address; None for anything else."""
    cdef char buf[INET6_ADDRSTRLEN]
    if sa.sa_family == AF_INET:
        inet_ntop(AF_INET, &(<sockaddr_in *>sa).sin_addr, buf, INET6_ADDRSTRLEN)
        return (buf.decode("ascii"), ntohs((<sockaddr_in *>sa).sin_port))
    if sa.sa_family == AF_INET6:
        inet_ntop(AF_INET6, &(<sockaddr_in6 *>sa).sin6_addr, buf, INET6_ADDRSTRLEN)
        return (buf.decode("ascii"), ntohs((<sockaddr_in6 *>sa).sin6_port))
    return None


cdef inline tuple ip_to_tuple(int is_v6, const uint8_t *ip, uint16_t port):
    """(host, port) from a raw network-order address as found in a packet header."""
    cdef char buf[INET6_ADDRSTRLEN]
    inet_ntop(AF_INET6 if is_v6 else AF_INET, ip, buf, INET6_ADDRSTRLEN)
    return (buf.decode("ascii"), port)
