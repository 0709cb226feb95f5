"""SOCKS5 messages (RFC 1928, RFC 1929) and the wire constants the tunnel shares with them.

Sans-I/O: encoders return bytes, parsers take a buffer and return ``(value, consumed)`` or
``None`` when more bytes are needed, and raise ``HandshakeError`` (a ``ValueError``) with a
short ``reason`` for input that can never become valid. docs/tunnel.md has the format.
"""
import ipaddress
import socket
import struct

from relay.proto.errors import E_TRUNCATED, FrameError, HandshakeError, frame_error  # noqa: F401
from relay.proto.wire import (  # noqa: F401  (the protocol's names, re-exported)
    ATYP_DOMAIN, ATYP_IPV4, ATYP_IPV6, CMD_BIND, CMD_CONNECT, CMD_UDP_ASSOCIATE, CMD_UDP_TUN,
    CMD_UDP_TUN_MUX, METHOD_HMAC, METHOD_NOAUTH, METHOD_NONE_ACCEPTABLE, METHOD_USERPASS,
    REP_ATYP_UNSUPPORTED, REP_CMD_UNSUPPORTED, REP_CONN_REFUSED, REP_FAILURE,
    REP_HOST_UNREACHABLE, REP_NET_UNREACHABLE, REP_NOT_ALLOWED, REP_SUCCEEDED, USERPASS_VER, VER,
)


# ---------------------------------------------------------------------------- addresses

def encode_addr(host, port):
    """ATYP ADDR PORT for host (IPv4/IPv6 literal, or a domain name) and port."""
    if not isinstance(port, int) or isinstance(port, bool):
        raise TypeError(f"port must be an int, not {type(port).__name__}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range 0-65535: {port}")
    if isinstance(host, bytes):
        host = host.decode("latin-1")
    if not isinstance(host, str):
        raise TypeError(f"host must be str, not {type(host).__name__}")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None and ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip is None:
        name = host.encode("latin-1", "strict") if host.isascii() else host.encode("idna")
        if not 1 <= len(name) <= 255:
            raise ValueError(f"domain name must be 1-255 bytes, not {len(name)}")
        return bytes((ATYP_DOMAIN, len(name))) + name + struct.pack("!H", port)
    if ip.version == 4:
        return bytes((ATYP_IPV4,)) + ip.packed + struct.pack("!H", port)
    return bytes((ATYP_IPV6,)) + ip.packed + struct.pack("!H", port)


def parse_addr(buf, pos, error):
    """(atyp, host, port, end) of ATYP ADDR PORT at buf[pos:], None if incomplete."""
    n = len(buf)
    if n < pos + 1:
        return None
    atyp = buf[pos]
    if atyp == ATYP_IPV4:
        end = pos + 1 + 4 + 2
        if n < end:
            return None
        host = socket.inet_ntop(socket.AF_INET, bytes(buf[pos + 1:pos + 5]))
    elif atyp == ATYP_IPV6:
        end = pos + 1 + 16 + 2
        if n < end:
            return None
        host = socket.inet_ntop(socket.AF_INET6, bytes(buf[pos + 1:pos + 17]))
    elif atyp == ATYP_DOMAIN:
        if n < pos + 2:
            return None
        ln = buf[pos + 1]
        if ln == 0:
            raise error("empty-domain", "domain of length 0")
        end = pos + 2 + ln + 2
        if n < end:
            return None
        host = bytes(buf[pos + 2:pos + 2 + ln]).decode("latin-1")
    else:
        raise error("bad-atyp", f"unknown address type 0x{atyp:02x}")
    port = (buf[end - 2] << 8) | buf[end - 1]
    return atyp, host, port, end


# ------------------------------------------------------- SOCKS5 UDP request header (RFC 1928 s7)

def udp_header(host, port, frag=0):
    """RSV(2)=0 FRAG ATYP ADDR PORT for a SOCKS5 UDP relay datagram."""
    return struct.pack("!HB", 0, frag) + encode_addr(host, port)


def parse_udp_header(packet):
    """(frag, atyp, host, port, header_len) of a SOCKS5 UDP relay datagram.

    The 2 RSV bytes are ignored (RFC 1928 wants 0; some clients send garbage)."""
    r = None
    if len(packet) >= 4:
        r = parse_addr(packet, 3, frame_error)
    if r is None:
        raise FrameError(E_TRUNCATED, f"SOCKS5 UDP header truncated ({len(packet)} bytes)")
    atyp, host, port, end = r
    return packet[2], atyp, host, port, end


def udp_header_counted(packet, count):
    """parse_udp_header for a data path: (atyp, host, port, header_len), or None after
    counting why the datagram is dropped (malformed header: drop_malformed; a fragment,
    which relay refuses: frames_bad). ``count`` is the caller's counter function."""
    try:
        frag, atyp, host, port, hl = parse_udp_header(packet)
    except FrameError:
        count("drop_malformed")
        return None
    if frag:
        count("frames_bad")
        return None
    return atyp, host, port, hl


# ---------------------------------------------------------------------------- handshakes

def greeting(methods):
    methods = bytes(methods)
    if not 1 <= len(methods) <= 255:
        raise ValueError("1-255 methods")
    return bytes((VER, len(methods))) + methods


def parse_greeting(buf):
    """((methods...), consumed) of VER NMETHODS METHODS, None if incomplete."""
    if len(buf) < 2:
        return None
    if buf[0] != VER:
        raise HandshakeError("bad-version", f"SOCKS version {buf[0]}, expected 5")
    n = buf[1]
    if n == 0:
        raise HandshakeError("no-methods", "greeting lists no methods",
                             bytes((VER, METHOD_NONE_ACCEPTABLE)))
    if len(buf) < 2 + n:
        return None
    return tuple(buf[2:2 + n]), 2 + n


def parse_method_choice(buf):
    """(method, 2) of the server's VER METHOD, None if incomplete."""
    if len(buf) < 2:
        return None
    if buf[0] != VER:
        raise HandshakeError("bad-version", f"SOCKS version {buf[0]}, expected 5")
    return buf[1], 2


def userpass_request(user, password):
    u = user.encode() if isinstance(user, str) else bytes(user)
    p = password.encode() if isinstance(password, str) else bytes(password)
    if len(u) > 255 or len(p) > 255:
        raise ValueError("user and password must be at most 255 bytes each")
    return bytes((USERPASS_VER, len(u))) + u + bytes((len(p),)) + p


def parse_userpass_request(buf):
    """((user_bytes, password_bytes), consumed) per RFC 1929, None if incomplete."""
    if len(buf) < 2:
        return None
    if buf[0] != USERPASS_VER:
        raise HandshakeError("bad-version", f"username/password version {buf[0]}, expected 1",
                             bytes((USERPASS_VER, 1)))
    ulen = buf[1]
    if len(buf) < 2 + ulen + 1:
        return None
    plen = buf[2 + ulen]
    end = 3 + ulen + plen
    if len(buf) < end:
        return None
    return (bytes(buf[2:2 + ulen]), bytes(buf[3 + ulen:end])), end


def parse_status(buf, ver):
    """(status, 2) of a VER STATUS sub-negotiation answer."""
    if len(buf) < 2:
        return None
    if buf[0] != ver:
        raise HandshakeError("bad-version", f"sub-negotiation version {buf[0]}, expected {ver}")
    return buf[1], 2


def request(cmd, host="0.0.0.0", port=0):
    return bytes((VER, cmd, 0)) + encode_addr(host, port)


def _parse_cmd_msg(buf, what):
    if len(buf) < 4:
        return None
    if buf[0] != VER:
        raise HandshakeError("bad-version", f"SOCKS version {buf[0]}, expected 5")
    r = parse_addr(buf, 3, lambda reason, msg: HandshakeError(
        reason, f"{what}: {msg}",
        request_reply(REP_ATYP_UNSUPPORTED) if what == "request" else b""))
    if r is None:
        return None
    atyp, host, port, end = r
    return (buf[1], atyp, host, port), end


def parse_request(buf):
    """((cmd, atyp, host, port), consumed) of VER CMD RSV ATYP ADDR PORT, None if incomplete.
    The RSV byte is ignored, as gost and most servers do."""
    return _parse_cmd_msg(buf, "request")


def request_reply(rep, host="0.0.0.0", port=0):
    return bytes((VER, rep, 0)) + encode_addr(host, port)


def parse_reply(buf):
    """((rep, atyp, host, port), consumed) of VER REP RSV ATYP ADDR PORT."""
    return _parse_cmd_msg(buf, "reply")
