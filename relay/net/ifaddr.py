"""The host's own addresses (every address of every interface, IPv4 and IPv6), read over
rtnetlink, and a watch that learns when they change.

``host_addresses()`` dumps them once (RTM_GETADDR) in the calling thread's namespace.
``AddressWatch`` subscribes to the address groups (RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR)
before its first dump, so no change is missed between the two (its dumps use a socket of
its own, opened with it: the same namespace); a service watches its descriptor in its
poller and calls ``update()`` when it is readable: the pending notices are drained (they
only say "something changed") and the addresses dumped again, also after the kernel dropped
notices (ENOBUFS). Unprivileged processes may do both. Addresses are 16-byte keys: IPv6 as it is, IPv4 as its
IPv4-mapped form (::ffff:a.b.c.d), the form relay.datapath's Acl looks them up in.
"""
import errno
import ipaddress
import os
import socket
import struct

NETLINK_ROUTE = 0
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR = 0x10, 0x100
IFA_ADDRESS, IFA_LOCAL = 1, 2
_NLMSG = struct.Struct("=IHHII")          # nlmsghdr: len, type, flags, seq, pid
_IFADDRMSG = struct.Struct("=BBBBI")      # ifaddrmsg: family, prefixlen, flags, scope, index
_RTATTR = struct.Struct("=HH")            # rtattr: len, type
_MAPPED = b"\0" * 10 + b"\xff\xff"
MAX_ADDRESSES = 1 << 16                   # a dump longer than this is cut (and said so)
MAX_NOTICES = 4096                        # notices drained per update() at most
DUMP_TIMEOUT = 2.0


def key(ip):
    """The 16-byte key of an address (text, bytes of 4 or 16, or an ipaddress object)."""
    if isinstance(ip, (bytes, bytearray)):
        raw = bytes(ip)
    else:
        raw = ipaddress.ip_address(ip).packed
    return _MAPPED + raw if len(raw) == 4 else raw


def _align(n):
    return (n + 3) & ~3


def parse_addresses(buf, out, seq=None):
    """Add the local address of every RTM_NEWADDR message in buf (of dump seq, when given)
    to the set out; True once the dump's NLMSG_DONE is seen. IFA_LOCAL is the interface's
    own address when given (on a point-to-point link IFA_ADDRESS is the peer's), else
    IFA_ADDRESS."""
    off, n = 0, len(buf)
    while off + _NLMSG.size <= n:
        mlen, mtype, _flags, mseq, _pid = _NLMSG.unpack_from(buf, off)
        if mlen < _NLMSG.size or off + mlen > n:
            raise OSError(errno.EBADMSG, "truncated netlink message")
        if seq is not None and mseq != seq:         # the rest of an earlier, abandoned dump
            off += _align(mlen)
            continue
        if mtype == NLMSG_DONE:
            return True
        if mtype == NLMSG_ERROR:
            code = -struct.unpack_from("=i", buf, off + _NLMSG.size)[0] if mlen >= 20 else 0
            code = code or errno.EIO
            raise OSError(code, "netlink address dump: " + os.strerror(code))
        if mtype == RTM_NEWADDR and mlen >= _NLMSG.size + _IFADDRMSG.size:
            family = buf[off + _NLMSG.size]
            alen = 4 if family == socket.AF_INET else 16 if family == socket.AF_INET6 else 0
            found = {}
            a = off + _NLMSG.size + _IFADDRMSG.size
            end = off + mlen
            while alen and a + _RTATTR.size <= end:
                rlen, rtype = _RTATTR.unpack_from(buf, a)
                if rlen < _RTATTR.size or a + rlen > end:
                    break
                if rtype in (IFA_ADDRESS, IFA_LOCAL) and rlen - _RTATTR.size == alen:
                    found[rtype] = bytes(buf[a + _RTATTR.size:a + rlen])
                a += _align(rlen)
            addr = found.get(IFA_LOCAL, found.get(IFA_ADDRESS))
            if addr is not None and len(out) < MAX_ADDRESSES:
                out.add(key(addr))
        off += _align(mlen)
    return False


def _dump_socket():
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
    try:
        s.settimeout(DUMP_TIMEOUT)
        s.bind((0, 0))
    except BaseException:
        s.close()
        raise
    return s


def dump(s, seq=1):
    """frozenset of the 16-byte keys of every address on every interface, asked over the
    netlink socket s (so: of the namespace s was opened in)."""
    body = _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)
    s.send(_NLMSG.pack(_NLMSG.size + len(body), RTM_GETADDR, NLM_F_REQUEST | NLM_F_DUMP,
                       seq, 0) + body)
    out = set()
    for _ in range(MAX_ADDRESSES):              # a message holds at least one address
        if parse_addresses(s.recv(65536), out, seq):
            return frozenset(out)
    raise OSError(errno.EMSGSIZE, "netlink address dump did not end")


def host_addresses():
    """The host's addresses (dump()) in the namespace of the calling thread."""
    s = _dump_socket()
    try:
        return dump(s)
    finally:
        s.close()


class AddressWatch:
    """The host's addresses, kept current: ``addresses`` (a frozenset of 16-byte keys),
    ``fileno()`` to watch for readability, ``update()`` when it is readable."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_ROUTE)
        self.dump_sock = None            # its own socket: the namespace stays the watch's
        try:
            self.sock.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR))
            self.sock.setblocking(False)
            self.dump_sock = _dump_socket()
            self.seq = 1
            self.addresses = dump(self.dump_sock, self.seq)
        except BaseException:
            self.close()
            raise
        self.updates = 0                 # dumps after the first

    def fileno(self):
        return self.sock.fileno()

    def update(self, force=False):
        """Drain the notices; if there were any (or force), dump again. True when the set
        changed."""
        heard = force
        for _ in range(MAX_NOTICES):
            try:
                if not self.sock.recv(65536):
                    break
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno != errno.ENOBUFS:     # ENOBUFS: notices were lost; dump anyway
                    raise
            heard = True
        if not heard:
            return False
        self.seq = self.seq % 0xFFFFFFFF + 1
        new = dump(self.dump_sock, self.seq)
        self.updates += 1
        if new == self.addresses:
            return False
        self.addresses = new
        return True

    def close(self):
        self.sock.close()
        if self.dump_sock is not None:
            self.dump_sock.close()
