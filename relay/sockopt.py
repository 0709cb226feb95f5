"""Socket options a router relay needs, set in one place with errors that say why."""
import errno
import socket

IP_TRANSPARENT = getattr(socket, "IP_TRANSPARENT", 19)
IPV6_TRANSPARENT = 75
IP_RECVORIGDSTADDR = getattr(socket, "IP_RECVORIGDSTADDR", 20)
IPV6_RECVORIGDSTADDR = 74
SOL_UDP = getattr(socket, "SOL_UDP", 17)
UDP_SEGMENT = getattr(socket, "UDP_SEGMENT", 103)      # GSO: Linux 4.18
UDP_GRO = getattr(socket, "UDP_GRO", 104)              # GRO: Linux 5.0
SO_MARK = getattr(socket, "SO_MARK", 36)
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
IPPROTO_RAW = getattr(socket, "IPPROTO_RAW", 255)
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)


def family_of(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _need(what, cap, err):
    return PermissionError(err.errno, f"{what} needs {cap} (run as root or grant {cap}): {err.strerror}")


def _buf(sock, force, plain, size):
    """Set a buffer size; the FORCE variant bypasses rmem_max/wmem_max when privileged."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, plain, size)


def _rcvbuf(sock, size):
    _buf(sock, SO_RCVBUFFORCE, socket.SO_RCVBUF, size)


def _sndbuf(sock, size):
    _buf(sock, SO_SNDBUFFORCE, socket.SO_SNDBUF, size)


def set_transparent(sock):
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        # IP_TRANSPARENT is also accepted on AF_INET6 sockets (IPv4-mapped traffic).
        sock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
    except PermissionError as e:
        raise _need("IP_TRANSPARENT", "CAP_NET_ADMIN", e) from None


def set_mark(sock, mark):
    if not mark:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    except PermissionError as e:
        raise _need("SO_MARK", "CAP_NET_ADMIN", e) from None


# Replies to clients whose address does not resolve (spoofed sources of a flood) wait in
# the neighbour queue, charged to the sending socket, for seconds; a large send buffer cap
# keeps those from blocking replies to everyone else. It is a cap, not an allocation.
REPLY_SNDBUF = 64 << 20


def udp_listen(addr, *, transparent=False, reuseport=True, bufsize=4 << 20):
    """A bound non-blocking UDP socket on (host, port).

    An IPv6 wildcard ("::") listens on IPv4 too (dual stack). With transparent=True the
    socket accepts TPROXY'd datagrams and reports each one's original destination.
    """
    host, port = addr
    fam = family_of(host)
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        if transparent:
            set_transparent(s)
            s.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVORIGDSTADDR, 1)
        _rcvbuf(s, bufsize)
        _sndbuf(s, REPLY_SNDBUF)
        try:
            s.bind((host, port))
        except OSError as e:
            raise OSError(e.errno, f"cannot listen on {format_addr(addr)}: {e.strerror}") from None
        s.setblocking(False)
        return s
    except BaseException:
        s.close()
        raise


def check_port_free(addr, proto="udp"):
    """Refuse a listen address that another process already serves.

    Every worker binds its own SO_REUSEPORT socket, and the kernel lets any later socket
    with SO_REUSEPORT (of the same effective user) join that group and take a share of the
    traffic - a second relay started on the same port would do just that, silently. This
    binds a probe socket without SO_REUSEPORT, which fails while any socket holds the
    address, then closes it; the supervisor calls it before its workers bind. (TCP probes
    take SO_REUSEADDR, which on Linux still fails against a listening socket but not
    against connections of an earlier run waiting in TIME_WAIT.)"""
    host, port = addr
    fam = family_of(host)
    s = socket.socket(fam, socket.SOCK_DGRAM if proto == "udp" else socket.SOCK_STREAM)
    try:
        if proto == "tcp":
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
        s.bind((host, port))
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise OSError(e.errno, f"{proto.upper()} {format_addr(addr)} is already in use by "
                                   f"another process (another relay?); only the workers of one "
                                   f"relay may share a port") from None
        raise OSError(e.errno, f"cannot listen on {proto.upper()} {format_addr(addr)}: "
                               f"{e.strerror}") from None
    finally:
        s.close()


def raw_socket(family, mark=0, bufsize=REPLY_SNDBUF):
    """An IPPROTO_RAW socket (header included) for spoofed replies."""
    try:
        s = socket.socket(family, socket.SOCK_RAW, IPPROTO_RAW)
    except PermissionError as e:
        raise _need("a raw socket", "CAP_NET_RAW", e) from None
    try:
        if family == socket.AF_INET:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
            # Without IP_RECVERR the kernel reports success for a raw packet that a full
            # queue dropped; with it, sendmmsg says ENOBUFS and the engine can retry/count.
            s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        else:
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
        set_mark(s, mark)
        _sndbuf(s, bufsize)
        s.setblocking(False)
        return s
    except BaseException:
        s.close()
        raise


def ipv6_available():
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
        return True
    except OSError:
        return False


def format_addr(addr):
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
