"""Socket options a router relay needs, set in one place with errors that say why."""
import errno
import logging
import ipaddress
import math
import socket
import struct
from dataclasses import dataclass
from typing import Optional

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
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
# recvmsg room for the packet info of an IPv4 datagram on a dual-stack socket, which
# comes twice: IPV6_PKTINFO (in6_pktinfo, 20 bytes) and IP_PKTINFO (in_pktinfo, 12)
PKTINFO_ANCBUF = socket.CMSG_SPACE(20) + socket.CMSG_SPACE(12)
TCP_KEEPIDLE = getattr(socket, "TCP_KEEPIDLE", 4)
TCP_KEEPINTVL = getattr(socket, "TCP_KEEPINTVL", 5)
TCP_KEEPCNT = getattr(socket, "TCP_KEEPCNT", 6)
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
TCP_CONGESTION = getattr(socket, "TCP_CONGESTION", 13)
TCP_FASTOPEN = getattr(socket, "TCP_FASTOPEN", 23)
TCP_FASTOPEN_CONNECT = getattr(socket, "TCP_FASTOPEN_CONNECT", 30)   # Linux 4.11
IFNAMSIZ = 16

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


def is_wildcard(host):
    """True for the unspecified address of either family (0.0.0.0, ::)."""
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def set_pktinfo(sock):
    """Have sock report each datagram's local address, so that a socket bound to a
    wildcard address can answer from the address its client sent to (the kernel's
    route would pick its own source otherwise, and the client drops the reply). IPv4
    datagrams come with IP_PKTINFO, on a dual-stack AF_INET6 socket too; IPv6 ones
    with IPV6_PKTINFO (IPV6_RECVPKTINFO)."""
    sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)


def pktinfo_enabled(sock):
    """Whether sock reports local addresses (set_pktinfo)."""
    if sock.getsockopt(socket.IPPROTO_IP, IP_PKTINFO):
        return True
    return (sock.family == socket.AF_INET6
            and bool(sock.getsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO)))


def local_of(ancdata):
    """The address to answer a datagram from, out of recvmsg's ancillary data on a
    socket with set_pktinfo, or None. IP_PKTINFO's ipi_spec_dst (a local unicast address
    even for a broadcast) wins over IPV6_PKTINFO's destination; an IPv4-mapped one is
    given as IPv4, a multicast one not at all (the kernel chooses then). The same rules
    as relay/datapath/ring.pxd cmsg_local."""
    found = None
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            return socket.inet_ntop(socket.AF_INET, data[4:8])
        if (found is None and level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO
                and len(data) >= 20 and data[0] != 0xFF):
            ip = ipaddress.IPv6Address(data[:16])
            found = str(ip.ipv4_mapped or ip)
    return found


def src_cmsg(host, ifindex=0):
    """sendmsg ancillary data that makes a datagram leave from local address host:
    IP_PKTINFO (ipi_spec_dst) for IPv4, on AF_INET6 sockets too, else IPV6_PKTINFO;
    through interface ifindex (0: routing picks the interface; with one, host may be the
    unspecified address: the source that interface's route picks)."""
    ip = ipaddress.ip_address(host)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.version == 4:
        return [(socket.IPPROTO_IP, IP_PKTINFO,
                 struct.pack("=i4s4s", ifindex, ip.packed, bytes(4)))]
    return [(socket.IPPROTO_IPV6, IPV6_PKTINFO, ip.packed + struct.pack("=I", ifindex))]


def udp_listen(addr, *, transparent=False, reuseport=True, bufsize=4 << 20):
    """A bound non-blocking UDP socket on (host, port).

    An IPv6 wildcard ("::") listens on IPv4 too (dual stack). With transparent=True the
    socket accepts TPROXY'd datagrams and reports each one's original destination.
    Otherwise a wildcard socket reports each datagram's local address (set_pktinfo), so
    replies can leave from the address the client sent to.
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
        elif is_wildcard(host):
            set_pktinfo(s)
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


OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def flow_socket(family, type, ceiling):
    """A new socket for one flow (a gost connection, a SOCKS5 association's TCP or UDP
    socket), or None when the process is out of descriptors: none left, or the new one at
    or above ceiling (the soft limit less the data path's reserve; closed again), like the
    engine's associations."""
    try:
        s = socket.socket(family, type)
    except OSError as e:
        if e.errno in OUT_OF_FDS:
            return None
        raise
    if s.fileno() >= ceiling:
        s.close()
        return None
    return s


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


# Segmentation offload of UDP (forward, redir, tunnel-client: UDP_GRO on receive, runs sent as
# one UDP_SEGMENT message; tun: the virtio-net header, relay/net/tundev.py), one set of modes.
OFFLOAD_MODES = ("auto", "on", "off")
# "auto" takes UDP offload from this kernel on. UDP_SEGMENT came in 4.18 and UDP_GRO for
# sockets in 5.0, and both had bugs fixed through the 5.x series (datagrams of a GRO run
# delivered merged, GSO sends refused on some paths); 5.10 is the first long-term kernel
# with the fixes. Older kernels keep one datagram per message unless "on" is asked for.
OFFLOAD_KERNEL = (5, 10)


def kernel_version(release=None):
    """(major, minor) of ``release`` (default: this kernel's, os.uname), (0, 0) if unreadable."""
    import os
    import re
    m = re.match(r"(\d+)\.(\d+)", release if release is not None else os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def udp_offload_missing():
    """What this kernel lacks of UDP segmentation offload ("UDP_SEGMENT", "UDP_GRO"), ()
    when it has both (a probe socket asks for each)."""
    missing = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.getsockopt(SOL_UDP, UDP_SEGMENT)
        except OSError:
            missing.append("UDP_SEGMENT")
        try:
            s.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError:
            missing.append("UDP_GRO")
    return tuple(missing)


def udp_offload(mode, release=None):
    """Whether a forward, redir or tunnel-client listener uses UDP segmentation offload
    (GRO in, coalesced GSO sends out) for ``mode``: "off" never; "on" always, or OSError
    naming what the kernel lacks; "auto" where the kernel has both and is OFFLOAD_KERNEL or
    newer. A path that refuses a GSO send at run time (a device without checksum offload,
    a route with a smaller MTU) gets its datagrams one by one, counted in offload_fallback."""
    if mode not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, not {mode!r}")
    if mode == "off":
        return False
    missing = udp_offload_missing()
    if mode == "on":
        if missing:
            raise OSError(errno.EOPNOTSUPP, f"this kernel has no {' or '.join(missing)} "
                                            "(UDP_SEGMENT came in Linux 4.18, UDP_GRO in 5.0)")
        return True
    return not missing and kernel_version(release) >= OFFLOAD_KERNEL


def usable_mark(mark):
    """The SO_MARK to use, or None when it is 0 or cannot be set here (not root)."""
    if not mark:
        return None
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        return mark
    except OSError as e:
        logging.getLogger("relay").warning("SO_MARK %d unavailable (%s); sockets stay unmarked", mark, e)
        return None
    finally:
        probe.close()


def tcp_listen(addr, reuseport=False, backlog=512, tune=False):
    """A bound, listening, non-blocking TCP socket on (host, port); "::" takes IPv4 too.
    tune: a tunnel or SOCKS5 server's socket, with Fast Open and the congestion control
    (tcp_tune), which its connections inherit."""
    host, port = addr[0], addr[1]
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if fam == socket.AF_INET6 and host not in ("::",):
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        if tune:
            tcp_tune(s, "server")
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


# ------------------------------------------------------------------------- dead TCP peers
# Every long-lived TCP connection relay holds (tunnel connections at both ends, SOCKS5
# control and CONNECT connections, SOCKS5 upstream control connections) probes a silent
# peer: after KEEPALIVE idle seconds keepalive probes go out every KEEPALIVE_INTERVAL
# seconds (at most that idle time), KEEPALIVE_PROBES of them, and TCP_USER_TIMEOUT gives
# up on data left unacknowledged for as long as the probes take (idle + interval * probes),
# so a peer that vanished (a NAT that forgot the flow, a crash, a cut cable) is noticed
# whether the connection is quiet or has data to send. One value per relay process
# ([global] tcp_keepalive, --tcp-keepalive); 0 turns it all off.
KEEPALIVE_INTERVAL = 10
KEEPALIVE_PROBES = 3
_keepalive_idle = [60.0]        # set_tcp_keepalive: relay.config.GlobalConfig.tcp_keepalive


def keepalive_params(idle):
    """(idle, interval, probes, user timeout in ms) for idle seconds (> 0); probes go out
    every min(KEEPALIVE_INTERVAL, idle) seconds, whole seconds, at least 1."""
    idle_s = max(1, int(math.ceil(idle)))
    interval = max(1, min(KEEPALIVE_INTERVAL, idle_s))
    return idle_s, interval, KEEPALIVE_PROBES, (idle_s + interval * KEEPALIVE_PROBES) * 1000


def set_tcp_keepalive(idle):
    """The idle time (seconds, 0: off) tcp_keepalive uses from now on in this process."""
    _keepalive_idle[0] = float(idle)


def tcp_keepalive(sock_or_fd, idle=None):
    """SO_KEEPALIVE, TCP_KEEPIDLE/KEEPINTVL/KEEPCNT and TCP_USER_TIMEOUT on a TCP socket
    (a socket object or a descriptor) for ``idle`` seconds (default: set_tcp_keepalive's;
    0: nothing is set). Errors are ignored: a socket the peer already reset has nothing
    left to watch."""
    idle = _keepalive_idle[0] if idle is None else idle
    if not idle:
        return
    keepidle, interval, probes, user_ms = keepalive_params(idle)
    sock = sock_or_fd if isinstance(sock_or_fd, socket.socket) else socket.socket(
        fileno=sock_or_fd)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_KEEPIDLE, keepidle)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_KEEPCNT, probes)
        sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, user_ms)
    except OSError:
        pass
    finally:
        if sock is not sock_or_fd:
            sock.detach()


def keepalive_of(sock):
    """(SO_KEEPALIVE, idle, interval, probes, user timeout ms) as set on sock (tests, doctor)."""
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, TCP_KEEPINTVL),
            sock.getsockopt(socket.IPPROTO_TCP, TCP_KEEPCNT),
            sock.getsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT))


# ------------------------------------------------------------------ outbound binding
# The upstream side of every mode (forward's and redir's direct sockets, the tunnel,
# gost and SOCKS5 upstream connections and SOCKS5 UDP sockets, tunnel-client's
# connections, the tunnel server's flow sockets, the SOCKS5 server's CONNECT and UDP
# sockets) may leave through one interface (SO_BINDTODEVICE: routes through other
# devices are not used) and from one source address per family (bound before connect or
# the first send). relay/datapath/outbind.pxd does the same for the C data path.

@dataclass(frozen=True)
class Outbound:
    """Where a listener's upstream traffic leaves: ``device`` (an interface name) and one
    source address per family (``source4``, ``source6``: IP literals), each None when
    not given: the route decides."""
    device: Optional[str] = None
    source4: Optional[str] = None
    source6: Optional[str] = None

    def __bool__(self):
        return bool(self.device or self.source4 or self.source6)

    @classmethod
    def of(cls, bind_interface=None, source=()):
        """From a listener's (or an upstream URL's) bind_interface and source tuple."""
        v4 = [a for a in source if ":" not in a]
        v6 = [a for a in source if ":" in a]
        return cls(bind_interface or None, v4[0] if v4 else None, v6[0] if v6 else None)

    def under(self, base):
        """This binding, its unset parts taken from base (an upstream's over its listener's)."""
        if base is None:
            return self
        return Outbound(self.device or base.device, self.source4 or base.source4,
                        self.source6 or base.source6)

    def source_for(self, v6):
        return self.source6 if v6 else self.source4


NO_OUTBOUND = Outbound()


def bind_outbound(sock, out, v6_dest, wildcard=False):
    """Bind sock (a socket object, not yet connected or bound) to out's device and to
    its source address of the destination's family (``v6_dest``: True for an IPv6
    destination; an AF_INET6 socket towards IPv4 is bound to the IPv4-mapped address);
    without such a source, to the wildcard address when ``wildcard``. Errors say which
    part failed."""
    if not out:
        if wildcard:
            sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", 0))
        return
    if out.device:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, out.device.encode())
        except PermissionError as e:
            raise _need(f"SO_BINDTODEVICE {out.device}", "CAP_NET_RAW", e) from None
        except OSError as e:
            raise OSError(e.errno, f"cannot bind to interface {out.device}: {e.strerror}") from None
    src = out.source_for(v6_dest)
    if src:
        if sock.family == socket.AF_INET6 and not v6_dest:
            src = "::ffff:" + src
        try:
            sock.bind((src, 0))
        except OSError as e:
            raise OSError(e.errno, f"cannot bind to source {src}: {e.strerror}") from None
    elif wildcard:
        sock.bind(("::" if sock.family == socket.AF_INET6 else "0.0.0.0", 0))


def outbound_cmsgs(out, via_dev=False):
    """(for IPv4, for IPv6) destinations: the sendmsg ancillary data that makes a
    datagram leave from out's source of that family (and with via_dev through its
    device), None where there is nothing to say (the sockets that send to both families:
    relay/datapath/outbind.pxd outbind_src)."""
    if not out:
        return (None, None)
    ifindex = socket.if_nametoindex(out.device) if via_dev and out.device else 0
    return tuple(src_cmsg(a or unspec, ifindex) if a or ifindex else None
                 for a, unspec in ((out.source4, "0.0.0.0"), (out.source6, "::")))


def cmsg_for(cmsgs, host):
    """The one of outbound_cmsgs' pair for a destination host (IPv4-mapped: IPv4)."""
    v6 = ":" in host and not (host.startswith("::ffff:") and "." in host)
    return cmsgs[v6]


def check_interface(name):
    """Refuse (ValueError) an interface name this host (namespace) does not have."""
    size = len(name.encode("utf-8", "surrogateescape"))
    if not name or size >= IFNAMSIZ or "/" in name or name.strip() != name or \
            not name.isprintable():
        raise ValueError(f"not an interface name: {name!r} (1-{IFNAMSIZ - 1} characters)")
    try:
        socket.if_nametoindex(name)
    except (OSError, UnicodeError):
        have = ", ".join(n for _i, n in socket.if_nameindex())
        raise ValueError(f"no such interface: {name} (this host has: {have})") from None


def check_source(host):
    """Refuse (ValueError) a source address that is not one of this host's: binding a
    probe socket to it fails otherwise."""
    fam = family_of(host)
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        if fam == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, 0))
    except OSError as e:
        why = "not an address of this host" if e.errno == errno.EADDRNOTAVAIL else e.strerror
        raise ValueError(f"{host}: {why}") from None
    finally:
        s.close()


# ------------------------------------------------------------------ tunnel TCP options
# TCP Fast Open: the client's connections (tunnel://, gost://, socks5:// control
# connections, tunnel-client) have TCP_FASTOPEN_CONNECT, so once a server gave this host
# a cookie the handshake's first bytes ride in the SYN and a reconnect saves a round
# trip; the tunnel server's and the SOCKS5 server's listen sockets take TCP_FASTOPEN.
# The kernel allows each side by a bit of net.ipv4.tcp_fastopen (1: client, 2: server);
# a side it does not allow is left off (fastopen_missing says which). TCP_CONGESTION:
# every tunnel connection, both ends (accepted ones inherit their listen socket's).
FASTOPEN_QLEN = 256             # SYNs with data waiting for accept, per listen socket
FASTOPEN_SYSCTL = "/proc/sys/net/ipv4/tcp_fastopen"
CONGESTION_AVAILABLE = "/proc/sys/net/ipv4/tcp_available_congestion_control"
CONGESTION_ALLOWED = "/proc/sys/net/ipv4/tcp_allowed_congestion_control"
_tcp_tuning = {"client": True, "server": True, "congestion": None}   # set_tcp_tuning


def _read_proc(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def fastopen_bits(path=FASTOPEN_SYSCTL):
    """net.ipv4.tcp_fastopen of this network namespace (0 when unreadable)."""
    text = _read_proc(path)
    try:
        return int(text, 0) if text else 0
    except ValueError:
        return 0


def fastopen_missing(bits=None):
    """The sides ("client", "server") the kernel does not allow Fast Open on."""
    bits = fastopen_bits() if bits is None else bits
    return tuple(side for side, bit in (("client", 1), ("server", 2)) if not bits & bit)


def congestion_available(path=CONGESTION_AVAILABLE):
    text = _read_proc(path)
    return tuple(text.split()) if text else ()


def congestion_allowed(path=CONGESTION_ALLOWED):
    """The algorithms a process without CAP_NET_ADMIN may set."""
    text = _read_proc(path)
    return tuple(text.split()) if text else ()


def check_congestion(name):
    """Refuse (ValueError) a congestion control the kernel lacks."""
    have = congestion_available()
    if name not in have:
        raise ValueError(f"the kernel has no TCP congestion control {name!r} (available: "
                         f"{', '.join(have) or 'none readable'}; a module such as tcp_{name} "
                         f"may need loading)")


def set_tcp_tuning(fastopen=True, congestion=None):
    """What tcp_tune applies from now on in this process ([global] tcp_fastopen and
    tcp_congestion): Fast Open where the kernel allows the side, the congestion control
    (None: the kernel's default)."""
    missing = fastopen_missing() if fastopen else ("client", "server")
    _tcp_tuning["client"] = "client" not in missing
    _tcp_tuning["server"] = "server" not in missing
    _tcp_tuning["congestion"] = congestion.encode() if congestion else None


def tcp_tune(sock, side="client"):
    """Fast Open (TCP_FASTOPEN_CONNECT on a client's socket before its connect,
    TCP_FASTOPEN on a listen socket before listen: side "server") and the congestion
    control on a TCP socket, as set_tcp_tuning says. A kernel without Fast Open (older
    than 4.11 for the client) leaves the socket as it is; a congestion control the
    kernel refuses raises."""
    try:
        if side == "client" and _tcp_tuning["client"]:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT, 1)
        elif side == "server" and _tcp_tuning["server"]:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN, FASTOPEN_QLEN)
    except OSError as e:
        if e.errno not in (errno.ENOPROTOOPT, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    cc = _tcp_tuning["congestion"]
    if cc:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, cc)
        except PermissionError as e:
            raise _need(f"TCP_CONGESTION {cc.decode()}", "CAP_NET_ADMIN", e) from None


def tcp_client(sock, out=None, v6_dest=False):
    """Everything an outgoing tunnel or SOCKS5 upstream TCP connection gets before its
    connect: TCP_NODELAY, keepalive, Fast Open, the congestion control, the outbound
    binding."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    tcp_keepalive(sock)
    tcp_tune(sock, "client")
    if out:
        bind_outbound(sock, out, v6_dest)


def tcp_options_of(sock):
    """(TCP_FASTOPEN_CONNECT, TCP_FASTOPEN queue, congestion control name) of sock (tests)."""
    cc = sock.getsockopt(socket.IPPROTO_TCP, TCP_CONGESTION, 16).split(b"\0", 1)[0].decode()
    return (sock.getsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN_CONNECT),
            sock.getsockopt(socket.IPPROTO_TCP, TCP_FASTOPEN), cc)


def device_of(sock):
    """The interface sock is bound to (SO_BINDTODEVICE), "" for none (tests, doctor)."""
    return sock.getsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, IFNAMSIZ).split(b"\0", 1)[0].decode()
