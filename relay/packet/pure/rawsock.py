"""Pure-Python RawSender: the same API and errors as the relay.packet._rawsock extension.

Python has no sendmmsg(), so each datagram (each fragment, with ``mtu``) goes out with
its own sendmsg() of two buffers (headers, payload) as soon as it is checked; what
callers can observe — what is sent, the errors and their ``.sent`` — is the same as
with the batched extension.
"""
import errno
import os
import select
import socket
import struct
import time

from relay.errors import PacketTooBig
from relay.net.sockopt import SO_MARK
from relay.packet.pure.fast import IPV6_MIN_MTU, check_mtu, fragment_headers

DEFAULT_TTL = 64
DEFAULT_BATCH = 64
MAX_BATCH = 1024
MAX_RETRIES = 50
MAX_IPV4_UDP_PAYLOAD = 65507
MAX_IPV6_UDP_PAYLOAD = 65527
IPV4_UDP_HDR_LEN = 28
IPV6_UDP_HDR_LEN = 48

_IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
_IPV6_RECVERR = getattr(socket, "IPV6_RECVERR", 25)
_MSG_ERRQUEUE = getattr(socket, "MSG_ERRQUEUE", 0x2000)
_EE = struct.Struct("=IBBBBII")     # struct sock_extended_err

_V4 = struct.Struct("!BBHHHBBH4s4s")
_V6 = struct.Struct("!IHBB16s16s")
_UDP = struct.Struct("!HHHH")


def _sum16(data, odd_shift=False):
    """One's complement sum of data as big-endian 16-bit words, modulo 0xffff.

    2**16 == 1 (mod 0xffff), so the sum of the words is congruent to the whole
    buffer read as one big integer."""
    v = int.from_bytes(data, "big")
    if odd_shift:
        v <<= 8      # odd length: the last byte is the high byte of a padded word
    return v % 0xffff


def _finish(s):
    """Checksum from a sum mod 0xffff of data that is not all zero."""
    if s == 0:
        s = 0xffff      # a non-zero sum folds to 0xffff, never to 0
    return ~s & 0xffff


def _udp_checksum(pseudo_and_udp, payload, plen):
    c = _finish((_sum16(pseudo_and_udp) + _sum16(payload, plen & 1)) % 0xffff)
    return 0xffff if c == 0 else c


def _headers(is_v6, src_ip, sport, dst_ip, dport, payload, plen, ttl):
    """IPv4 (20 B) or IPv6 (40 B) header + UDP header (8 B), checksums included."""
    udp_len = 8 + plen
    udp = _UDP.pack(sport, dport, udp_len, 0)
    if is_v6:
        pseudo = src_ip + dst_ip + struct.pack("!II", udp_len, 17)
        ip = _V6.pack(6 << 28, udp_len, 17, ttl, src_ip, dst_ip)
    else:
        pseudo = src_ip + dst_ip + struct.pack("!BBH", 0, 17, udp_len)
        ip = _V4.pack(0x45, 0, 20 + udp_len, 0, 0x4000, ttl, 17, 0, src_ip, dst_ip)
        ip = _V4.pack(0x45, 0, 20 + udp_len, 0, 0x4000, ttl, 17, _finish(_sum16(ip)),
                      src_ip, dst_ip)
    csum = _udp_checksum(pseudo + udp, payload, plen)
    return ip + _UDP.pack(sport, dport, udp_len, csum)


def _validate_addr(addr):
    if isinstance(addr, tuple) and len(addr) >= 2:
        port = addr[1]
        if not isinstance(port, int) or isinstance(port, bool):
            raise TypeError(f"port must be an int, not {type(port).__name__}")
        if port < 0 or port > 65535:
            raise ValueError(f"port out of range 0-65535: {port}")
        if len(addr) >= 4:
            for what, v, hi in (("flowinfo", addr[2], 0xfffff),
                                ("scope_id", addr[3], 0xffffffff)):
                if not isinstance(v, int):
                    raise TypeError(f"{what} must be an int, not {type(v).__name__}")
                if v < 0 or v > hi:
                    raise ValueError(f"{what} out of range 0-{hi}: {v}")


def _parse_addr(addr):
    """(family, packed ip, port, scope_id) of a (host, port[, flowinfo, scope_id])."""
    _validate_addr(addr)
    if not isinstance(addr, tuple) or len(addr) < 2:
        raise TypeError(f"address must be a (host, port) tuple, not {addr!r}")
    host = addr[0]
    if isinstance(host, str):
        text = host.encode("ascii", "replace").decode("ascii")
    elif isinstance(host, bytes):
        text = host.decode("ascii", "replace")
    else:
        raise TypeError(f"host must be str, not {type(host).__name__}")
    port = addr[1]
    for fam in (socket.AF_INET, socket.AF_INET6):
        try:
            ip = socket.inet_pton(fam, text)
        except (OSError, ValueError):
            continue
        scope = addr[3] if fam == socket.AF_INET6 and len(addr) >= 4 else 0
        return fam, ip, port, scope
    raise ValueError(f"not an IPv4 or IPv6 address literal: {host!r}")


def _next_ident(ident):
    """The identification after ident (a 32-bit counter whose low 16 bits, the IPv4
    field, are never 0: a raw IPv4 socket would replace 0 in each fragment)."""
    ident = (ident + 1) & 0xFFFFFFFF
    return ident + 1 if ident & 0xFFFF == 0 else ident


def fragments_need_ipv6_mtu(size, mtu):
    return ValueError(f"an IPv6 packet of {size} bytes needs fragments, and mtu {mtu} is "
                      f"below the IPv6 minimum of {IPV6_MIN_MTU}")


def too_big_error(size, plen, mtu, sender_mtu, sent):
    """PacketTooBig for a packet of size bytes (plen of them after its headers) the
    kernel refused; mtu is the one it reported (0: unknown), sender_mtu the sender's
    when the packet was a fragment."""
    mtu_text = f"the interface MTU ({mtu} bytes)" if mtu else "the interface MTU"
    if sender_mtu:
        text = (f"fragment of {size} bytes is larger than {mtu_text}; the sender's mtu of "
                f"{sender_mtu} is too large for this route")
    else:
        text = (f"packet of {size} bytes (UDP payload {plen}) is larger than {mtu_text}; "
                "raw packets are not fragmented")
    return PacketTooBig(text, size=size, limit="interface MTU", sent=sent)


class RawSender:
    """Send spoofed UDP datagrams (any source address and port) from raw sockets.

    RawSender(*, mark=None, ttl=64, batch=64, mtu=None)

    ``send(src, dst, payload)`` sends one datagram; ``send_many(items)`` sends an
    iterable of ``(src, dst, payload)`` and returns how many went out. Addresses are
    ``(host, port)`` tuples with IP literals (IPv6 may add flowinfo, scope_id); both
    of one datagram must be of the same family. Packets carry the given TTL, DF set,
    and the kernel picks the IPv4 identification. Needs CAP_NET_RAW; ``mark``
    (SO_MARK) needs CAP_NET_ADMIN.

    ``mtu`` (an int >= 68, or None: never fragment): a datagram whose packet would be
    larger goes out as fragments of at most mtu bytes (see ``build_udp_fragments``),
    with an identification from a per-sender counter (random start, never 0). IPv6
    fragments need mtu >= 1280: an IPv6 datagram that would need them at a smaller
    mtu raises ValueError.

    Errors: ``PacketTooBig`` (limit "IPv4 maximum", "IPv6 maximum" or "interface
    MTU"), ValueError/TypeError for bad input, OSError for the rest; in send_many
    each carries ``.sent``, the number of datagrams that went out before the
    failing one (none after it goes; a datagram counts once all its fragments went).
    """

    def __init__(self, *, mark=None, ttl=DEFAULT_TTL, batch=DEFAULT_BATCH, mtu=None):
        if mark is not None:
            if not isinstance(mark, int):
                raise TypeError(f"mark must be an int or None, not {type(mark).__name__}")
            if mark < 0 or mark > 0xffffffff:
                raise ValueError(f"mark out of range 0-0xffffffff: {mark}")
        if not isinstance(ttl, int):
            raise TypeError(f"ttl must be an int, not {type(ttl).__name__}")
        if ttl < 1 or ttl > 255:
            raise ValueError(f"ttl out of range 1-255: {ttl}")
        if not isinstance(batch, int):
            raise TypeError(f"batch must be an int, not {type(batch).__name__}")
        if batch < 1 or batch > MAX_BATCH:
            raise ValueError(f"batch out of range 1-{MAX_BATCH}: {batch}")
        if mtu is not None:
            mtu = check_mtu(mtu, False)
        if getattr(self, "_busy", False):
            raise RuntimeError("RawSender is in use by another thread")
        self._teardown()
        self._mark = None if mark is None else int(mark)
        self._ttl = int(ttl)
        self._batch = int(batch)
        self._mtu = mtu
        self._ident = int.from_bytes(os.urandom(4), "little")
        self._socks = {}
        self._busy = False
        self._sent = 0
        self._closed = False

    def _teardown(self):
        for s in getattr(self, "_socks", {}).values():
            s.close()
        self._socks = {}
        self._closed = True

    def __del__(self):
        try:
            self._teardown()
        except Exception:
            pass

    # -- public API -------------------------------------------------------------

    @property
    def closed(self):
        return self._closed

    @property
    def ttl(self):
        return self._ttl

    @property
    def mark(self):
        return self._mark

    @property
    def batch(self):
        return self._batch

    @property
    def mtu(self):
        return self._mtu

    def close(self):
        """Close the raw sockets; further sends raise ValueError. Idempotent."""
        if self._busy:
            raise RuntimeError("cannot close a RawSender while it is sending")
        self._teardown()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        state = "closed" if self._closed else f"ttl={self._ttl} batch={self._batch}"
        if self._mark is not None:
            state += f" mark={self._mark:#x}"
        if self._mtu and not self._closed:
            state += f" mtu={self._mtu}"
        return f"<RawSender {state}>"

    def send(self, src, dst, payload):
        """Send one spoofed UDP datagram from src to dst ((host, port) tuples)."""
        self._enter()
        try:
            self._sent = 0
            try:
                self._send_one(src, dst, payload)
            except BaseException as e:
                self._recover(e)
                raise
        finally:
            self._busy = False

    def send_many(self, items):
        """Send every (src, dst, payload) of items; returns the count sent."""
        self._enter()
        try:
            self._sent = 0
            try:
                for item in items:
                    if type(item) is tuple and len(item) == 3:
                        src, dst, payload = item
                    else:
                        try:
                            src, dst, payload = item
                        except (TypeError, ValueError):
                            raise TypeError("send_many items must be (src, dst, payload) "
                                            f"triples, not {type(item).__name__}") from None
                    self._send_one(src, dst, payload)
            except BaseException as e:
                self._recover(e)
                raise
            return self._sent
        finally:
            self._busy = False

    # -- internals --------------------------------------------------------------

    def _enter(self):
        if self._closed:
            raise ValueError("send on a closed RawSender")
        if self._busy:
            raise RuntimeError("RawSender is in use by another thread")
        self._busy = True

    def _recover(self, exc):
        try:
            exc.sent = self._sent
        except (AttributeError, TypeError):
            pass

    def _send_one(self, src, dst, payload):
        sfam, sip, sport, _ = _parse_addr(src)
        dfam, dip, dport, scope = _parse_addr(dst)
        if sfam != dfam:
            raise ValueError(f"source {src!r} and destination {dst!r} are not of the "
                             "same address family")
        is_v6 = dfam == socket.AF_INET6
        try:
            view = memoryview(payload)
        except TypeError:
            raise TypeError(f"payload must be a bytes-like object, not "
                            f"{type(payload).__name__}") from None
        with view:
            if not view.c_contiguous:
                raise TypeError(f"payload {type(payload).__name__} is not a C-contiguous buffer")
            if view.format != "B" or view.ndim != 1:
                view = view.cast("B")
            plen = view.nbytes
            if is_v6 and plen > MAX_IPV6_UDP_PAYLOAD:
                raise PacketTooBig(
                    f"UDP payload of {plen} bytes is over the IPv6 maximum of "
                    f"{MAX_IPV6_UDP_PAYLOAD} bytes", size=plen + IPV6_UDP_HDR_LEN,
                    limit="IPv6 maximum", sent=self._sent)
            if not is_v6 and plen > MAX_IPV4_UDP_PAYLOAD:
                raise PacketTooBig(
                    f"UDP payload of {plen} bytes is over the IPv4 maximum of "
                    f"{MAX_IPV4_UDP_PAYLOAD} bytes", size=plen + IPV4_UDP_HDR_LEN,
                    limit="IPv4 maximum", sent=self._sent)
            size = (IPV6_UDP_HDR_LEN if is_v6 else IPV4_UDP_HDR_LEN) + plen
            frag = self._mtu is not None and size > self._mtu
            if frag and is_v6 and self._mtu < IPV6_MIN_MTU:
                raise fragments_need_ipv6_mtu(size, self._mtu)
            sock = self._socks.get(dfam) or self._open(dfam)
            hdr = _headers(is_v6, sip, sport, dip, dport, view, plen, self._ttl)
            host = socket.inet_ntop(dfam, dip)
            addr = (host, 0, 0, scope) if is_v6 else (host, 0)
            if not frag:
                self._sendmsg(sock, [hdr, view], addr, size, plen)
            else:
                self._ident = _next_ident(self._ident)
                for fhdr, a, b in fragment_headers(is_v6, sip, dip, hdr[-8:], plen, self._mtu,
                                             self._ident, self._ttl):
                    self._sendmsg(sock, [fhdr, view[a:b]], addr, len(fhdr) + b - a, b - a,
                                  self._mtu)
        self._sent += 1

    def _sendmsg(self, sock, buffers, addr, size, plen, sender_mtu=0):
        retries = 0
        while True:
            try:
                sock.sendmsg(buffers, [], 0, addr)
                return
            except InterruptedError:
                continue
            except OSError as e:
                err = e.errno
                if err in (errno.EAGAIN, errno.ENOBUFS) and retries < MAX_RETRIES:
                    _wait_retry(sock, err, retries)
                    retries += 1
                    continue
                if err == errno.EMSGSIZE:
                    self._too_big_mtu(sock, size, plen, sender_mtu)
                exc = OSError(err, f"sending on the raw socket: {e.strerror}"
                              + (f" (after {retries} retries)" if retries else ""))
                exc.sent = self._sent
                raise exc from None

    def _too_big_mtu(self, sock, size, plen, sender_mtu):
        mtu = 0
        while True:
            try:
                _, anc, _, _ = sock.recvmsg(8, 512, _MSG_ERRQUEUE | socket.MSG_DONTWAIT)
            except OSError:
                break
            for _level, _type, data in anc:
                if len(data) >= _EE.size:
                    ee_errno, _, _, _, _, ee_info, _ = _EE.unpack_from(data)
                    if ee_errno == errno.EMSGSIZE:
                        mtu = ee_info
        raise too_big_error(size, plen, mtu, sender_mtu, self._sent) from None

    def _open(self, fam):
        try:
            sock = socket.socket(fam, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC, socket.IPPROTO_RAW)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EACCES):
                raise PermissionError(
                    e.errno, "raw sockets need CAP_NET_RAW (run as root or grant the "
                    f"capability): {e.strerror}") from None
            raise OSError(e.errno, f"socket(SOCK_RAW): {e.strerror}") from None
        try:
            try:
                if fam == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_RECVERR, 1)
                else:
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
                    sock.setsockopt(socket.IPPROTO_IP, _IP_RECVERR, 1)
            except OSError as e:
                raise OSError(e.errno, f"setsockopt on the raw socket: {e.strerror}") from None
            if self._mark is not None:
                try:
                    sock.setsockopt(socket.SOL_SOCKET, SO_MARK, struct.pack("=I", self._mark))
                except OSError as e:
                    if e.errno in (errno.EPERM, errno.EACCES):
                        raise PermissionError(
                            e.errno, f"SO_MARK needs CAP_NET_ADMIN: {e.strerror}") from None
                    raise OSError(e.errno, f"setsockopt(SO_MARK): {e.strerror}") from None
        except BaseException:
            sock.close()
            raise
        self._socks[fam] = sock
        return sock


def _wait_retry(sock, err, retries):
    """Short pause before retrying a send that failed with EAGAIN or ENOBUFS."""
    ms = 0 if retries == 0 else (1 << (retries - 1) if retries < 5 else 10)
    if err == errno.ENOBUFS:
        if ms:
            time.sleep(ms / 1000)
        return
    p = select.poll()
    p.register(sock, select.POLLOUT)
    p.poll(ms or 1)
