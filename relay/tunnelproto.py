"""UDP-over-TCP tunnel and SOCKS5 wire formats: the pure-Python reference.

Everything here is sans-I/O: encoders return bytes, parsers take a buffer and return
``(value, consumed)`` or ``None`` when more bytes are needed, and raise ``FrameError`` /
``HandshakeError`` (both ``ValueError``) with a short machine-readable ``reason`` for
input that can never become valid. ``relay._tunnel`` implements the frame codec in C and
is cross-checked against this module by the tests; the handshakes run in Python in both
cases (once per connection, never per datagram). The format is described in
docs/tunnel.md.

Frame (after the handshake), gost compatible::

    RSV(2, big-endian payload length) FRAG(1)=0 ATYP(1) ADDR PORT(2) [FLOW(4)] DATA

``FLOW`` is present only on multiplexed connections (request CMD 0xFA, our extension);
plain gost connections (CMD 0xF3) carry one flow and no FLOW field. RSV = 0 means a
zero-length datagram.
"""
import collections
import errno as _errno_mod
import hashlib
import hmac
import ipaddress
import logging as _logging
import os
import socket
import struct
import threading
import time as _time

VER = 5
# Methods (RFC 1928 section 3); 0xC5 is ours, from the private range 0x80-0xFE.
METHOD_NOAUTH = 0x00
METHOD_USERPASS = 0x02
METHOD_HMAC = 0xC5
METHOD_NONE_ACCEPTABLE = 0xFF
# Commands: RFC 1928 plus gost's UDP-over-TCP (0xF3) and our multiplexed variant (0xFA).
CMD_CONNECT = 0x01
CMD_BIND = 0x02
CMD_UDP_ASSOCIATE = 0x03
CMD_UDP_TUN = 0xF3
CMD_UDP_TUN_MUX = 0xFA
# Address types.
ATYP_IPV4 = 1
ATYP_DOMAIN = 3
ATYP_IPV6 = 4
# Reply codes.
REP_SUCCEEDED = 0
REP_FAILURE = 1
REP_NOT_ALLOWED = 2
REP_NET_UNREACHABLE = 3
REP_HOST_UNREACHABLE = 4
REP_CONN_REFUSED = 5
REP_CMD_UNSUPPORTED = 7
REP_ATYP_UNSUPPORTED = 8

USERPASS_VER = 1
HMAC_VER = 1
NONCE_LEN = 32
CLIENT_NONCE_LEN = 16
MAC_LEN = 32
AUTH_LABEL_CLIENT = b"relay-tunnel-auth-v1 client"
AUTH_LABEL_SERVER = b"relay-tunnel-auth-v1 server"

# A frame's payload may be at most the largest UDP payload (IPv6, no jumbograms).
MAX_PAYLOAD = 65527
MAX_FRAME_HEADER = 2 + 1 + 1 + 1 + 255 + 2 + 4

# Frame error reasons (the C codec uses the same codes, see relay/_tunnel.pxd).
E_TRUNCATED, E_TOO_BIG, E_BAD_ATYP, E_EMPTY_DOMAIN, E_FRAGMENTED = 1, 2, 3, 4, 5
FRAME_ERRORS = {
    E_TRUNCATED: "truncated",
    E_TOO_BIG: "too-big",
    E_BAD_ATYP: "bad-atyp",
    E_EMPTY_DOMAIN: "empty-domain",
    E_FRAGMENTED: "fragmented",
}

Frame = collections.namedtuple("Frame", "flow atyp host port data")


class FrameError(ValueError):
    """A tunnel frame that can never be valid; ``reason`` is one of FRAME_ERRORS."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.reason = FRAME_ERRORS[code]


class HandshakeError(ValueError):
    """A SOCKS5 / tunnel handshake message that can never be valid, or a refusal.

    ``reason`` is a short word (bad-version, no-methods, no-acceptable-method, bad-atyp,
    empty-domain, auth-failed, bad-command, bad-reserved, refused, too-long); ``reply``
    holds the bytes to send to the peer before closing (may be empty).
    """

    def __init__(self, reason, message, reply=b"", rep=None):
        super().__init__(message)
        self.reason = reason
        self.reply = reply
        self.rep = rep          # the server's REP code when it refused the request


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


def _parse_addr(buf, pos, error):
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


# ---------------------------------------------------------------------------- frames

def frame_header(host, port, length, flow=None):
    """The header of a frame carrying ``length`` payload bytes (flow: multiplexed)."""
    if not 0 <= length <= MAX_PAYLOAD:
        raise ValueError(f"payload length {length} outside 0-{MAX_PAYLOAD}")
    head = struct.pack("!HB", length, 0) + encode_addr(host, port)
    if flow is not None:
        if not 0 <= flow <= 0xFFFFFFFF:
            raise ValueError(f"flow id out of range 0-4294967295: {flow}")
        head += struct.pack("!I", flow)
    return head


def encode_frame(host, port, data, flow=None):
    """One frame: header + data. ``flow`` is given on multiplexed connections only."""
    data = bytes(data)
    return frame_header(host, port, len(data), flow) + data


def _frame_error(reason, message):
    code = {v: k for k, v in FRAME_ERRORS.items()}[reason]
    return FrameError(code, message)


def parse_frame(buf, pos=0, *, mux=False, max_payload=MAX_PAYLOAD):
    """(Frame, end) of the frame at buf[pos:], or None if it is not complete yet.

    Checks in wire order: RSV above max_payload (too-big), FRAG != 0 (fragmented),
    ATYP (bad-atyp), domain length 0 (empty-domain); then completeness."""
    n = len(buf)
    if n - pos < 4:
        return None
    length = (buf[pos] << 8) | buf[pos + 1]
    if length > max_payload:
        raise FrameError(E_TOO_BIG, f"frame length {length} exceeds {max_payload}")
    if buf[pos + 2] != 0:
        raise FrameError(E_FRAGMENTED, f"FRAG must be 0, got {buf[pos + 2]}")
    addr = _parse_addr(buf, pos + 3, _frame_error)
    if addr is None:
        return None
    atyp, host, port, end = addr
    flow = None
    if mux:
        if n < end + 4:
            return None
        flow = struct.unpack_from("!I", buf, end)[0]
        end += 4
    if n < end + length:
        return None
    return Frame(flow, atyp, host, port, bytes(buf[end:end + length])), end + length


def parse_frames(buf, *, mux=False, final=False, max_payload=MAX_PAYLOAD):
    """Parse every complete frame of buf: ([Frame...], consumed).

    With final=True the stream has ended, so leftover bytes are a truncated frame.
    Raises FrameError for the first frame that can never be valid."""
    frames = []
    pos = 0
    while pos < len(buf):
        r = parse_frame(buf, pos, mux=mux, max_payload=max_payload)
        if r is None:
            if final:
                raise FrameError(E_TRUNCATED,
                                 f"truncated frame: {len(buf) - pos} bytes left at end of stream")
            break
        frame, pos = r
        frames.append(frame)
    return frames, pos


# ------------------------------------------------------- SOCKS5 UDP request header (RFC 1928 s7)

def udp_header(host, port, frag=0):
    """RSV(2)=0 FRAG ATYP ADDR PORT for a SOCKS5 UDP relay datagram."""
    return struct.pack("!HB", 0, frag) + encode_addr(host, port)


def parse_udp_header(packet):
    """(frag, atyp, host, port, header_len) of a SOCKS5 UDP relay datagram.

    The 2 RSV bytes are ignored (RFC 1928 wants 0; some clients send garbage)."""
    r = None
    if len(packet) >= 4:
        r = _parse_addr(packet, 3, _frame_error)
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
    r = _parse_addr(buf, 3, lambda reason, msg: HandshakeError(
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


# ------------------------------------------------------------------- secret proof (0xC5)

def _key(secret):
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def client_proof(secret, server_nonce, client_nonce):
    return hmac.new(_key(secret), AUTH_LABEL_CLIENT + server_nonce + client_nonce,
                    hashlib.sha256).digest()


def server_proof(secret, server_nonce, client_nonce):
    return hmac.new(_key(secret), AUTH_LABEL_SERVER + server_nonce + client_nonce,
                    hashlib.sha256).digest()


def parse_challenge(buf):
    """(server_nonce, consumed) of VER(1) NONCE(32)."""
    if len(buf) < 1 + NONCE_LEN:
        if len(buf) >= 1 and buf[0] != HMAC_VER:
            raise HandshakeError("bad-version", f"challenge version {buf[0]}, expected 1")
        return None
    if buf[0] != HMAC_VER:
        raise HandshakeError("bad-version", f"challenge version {buf[0]}, expected 1")
    return bytes(buf[1:1 + NONCE_LEN]), 1 + NONCE_LEN


def parse_proof(buf):
    """((client_nonce, mac), consumed) of VER(1) CNONCE(16) MAC(32)."""
    if len(buf) >= 1 and buf[0] != HMAC_VER:
        raise HandshakeError("bad-version", f"proof version {buf[0]}, expected 1",
                             bytes((HMAC_VER, 1)))
    end = 1 + CLIENT_NONCE_LEN + MAC_LEN
    if len(buf) < end:
        return None
    return (bytes(buf[1:1 + CLIENT_NONCE_LEN]), bytes(buf[1 + CLIENT_NONCE_LEN:end])), end


def parse_proof_result(buf):
    """((status, server_mac or None), consumed) of VER STATUS [MAC(32) when STATUS=0]."""
    if len(buf) < 2:
        return None
    if buf[0] != HMAC_VER:
        raise HandshakeError("bad-version", f"proof result version {buf[0]}, expected 1")
    if buf[1] != 0:
        return (buf[1], None), 2
    if len(buf) < 2 + MAC_LEN:
        return None
    return (0, bytes(buf[2:2 + MAC_LEN])), 2 + MAC_LEN


class ServerHandshake:
    """Server side of the SOCKS5 / tunnel handshake, sans-I/O.

    ``feed(data)`` returns bytes to send. When the request has been read, ``request`` is
    ``(cmd, atyp, host, port)``; the caller answers with ``reply(rep, host, port)``, which
    also returns the bytes after the request that the peer already sent (``leftover``).
    Errors raise HandshakeError whose ``reply`` should be sent before closing.

    Accepted methods: METHOD_HMAC when a secret is set, METHOD_USERPASS when user is set
    (both may be: a client gets the first of them that it offers, HMAC preferred); with
    neither, METHOD_NOAUTH. ``commands`` limits the accepted CMD values."""

    MAX_BUFFER = 1024

    def __init__(self, *, secret=None, user=None, password=None,
                 commands=(CMD_UDP_TUN, CMD_UDP_TUN_MUX), nonce=None):
        self.secret = secret
        self.user = None if user is None else _key(user)
        self.password = b"" if password is None else _key(password)
        self.commands = frozenset(commands)
        self.nonce = nonce if nonce is not None else os.urandom(NONCE_LEN)
        self.methods = [m for m, on in ((METHOD_HMAC, bool(secret)),
                                        (METHOD_USERPASS, user is not None)) if on]
        if not self.methods:
            self.methods = [METHOD_NOAUTH]
        self.method = self.methods[0]
        self.state = "greeting"
        self.buf = b""
        self.request = None
        self.leftover = b""

    def feed(self, data):
        self.buf += data
        if len(self.buf) > self.MAX_BUFFER and self.state != "request-read":
            raise HandshakeError("too-long", "handshake message too long")
        out = b""
        while True:
            try:
                step = getattr(self, "_" + self.state.replace("-", "_"))()
            except HandshakeError as e:
                e.reply = out + e.reply      # answers already due go out before the refusal
                raise
            if step is None:
                return out
            out += step

    def _take(self, r):
        value, used = r
        self.buf = self.buf[used:]
        return value

    def _greeting(self):
        r = parse_greeting(self.buf)
        if r is None:
            return None
        methods = self._take(r)
        usable = [m for m in self.methods if m in methods]
        if not usable:
            raise HandshakeError("no-acceptable-method",
                                 f"client offers methods {list(methods)}, server needs one of "
                                 f"{self.methods}", bytes((VER, METHOD_NONE_ACCEPTABLE)))
        self.method = usable[0]
        if self.method == METHOD_HMAC:
            self.state = "proof"
            return bytes((VER, METHOD_HMAC, HMAC_VER)) + self.nonce
        self.state = "userpass" if self.method == METHOD_USERPASS else "request"
        return bytes((VER, self.method))

    def _userpass(self):
        r = parse_userpass_request(self.buf)
        if r is None:
            return None
        user, password = self._take(r)
        ok = hmac.compare_digest(user, self.user) & hmac.compare_digest(password, self.password)
        if not ok:
            raise HandshakeError("auth-failed", "wrong username or password",
                                 bytes((USERPASS_VER, 1)))
        self.state = "request"
        return bytes((USERPASS_VER, 0))

    def _proof(self):
        r = parse_proof(self.buf)
        if r is None:
            return None
        cnonce, mac = self._take(r)
        if not hmac.compare_digest(mac, client_proof(self.secret, self.nonce, cnonce)):
            raise HandshakeError("auth-failed", "wrong secret proof", bytes((HMAC_VER, 1)))
        self.state = "request"
        return bytes((HMAC_VER, 0)) + server_proof(self.secret, self.nonce, cnonce)

    def _request(self):
        r = parse_request(self.buf)
        if r is None:
            return None
        self.request = self._take(r)
        if self.request[0] not in self.commands:
            raise HandshakeError("bad-command", f"command 0x{self.request[0]:02x} not supported",
                                 request_reply(REP_CMD_UNSUPPORTED))
        self.state = "request-read"
        return None

    def _request_read(self):
        return None

    @property
    def done(self):
        return self.state == "request-read"

    def reply(self, rep=REP_SUCCEEDED, host="0.0.0.0", port=0):
        """The reply to the request; take ``leftover`` afterwards."""
        self.leftover, self.buf = self.buf, b""
        self.state = "replied"
        return request_reply(rep, host, port)


class ClientHandshake:
    """Client side, sans-I/O: ``start()`` gives the greeting; ``feed(data)`` gives what to
    send next; ``done`` once the reply arrived, then ``bound`` is (host, port) from the
    reply and ``leftover`` the bytes that followed it. Refusals raise HandshakeError."""

    MAX_BUFFER = 1024

    def __init__(self, *, cmd=CMD_UDP_TUN_MUX, host="0.0.0.0", port=0, secret=None,
                 user=None, password=None, client_nonce=None):
        self.cmd, self.host, self.port = cmd, host, port
        self.secret, self.user, self.password = secret, user, password
        self.cnonce = client_nonce if client_nonce is not None else os.urandom(CLIENT_NONCE_LEN)
        self.state = "method"
        self.buf = b""
        self.bound = None
        self.leftover = b""
        self.expected_server_mac = None

    def start(self):
        if self.secret:
            return greeting([METHOD_HMAC])
        if self.user is not None:
            return greeting([METHOD_USERPASS])
        return greeting([METHOD_NOAUTH])

    @property
    def done(self):
        return self.state == "done"

    def feed(self, data):
        self.buf += data
        if len(self.buf) > self.MAX_BUFFER and self.state != "done":
            raise HandshakeError("too-long", "handshake message too long")
        out = b""
        while self.state != "done":
            step = getattr(self, "_" + self.state)()
            if step is None:
                break
            out += step
        return out

    def _take(self, r):
        value, used = r
        self.buf = self.buf[used:]
        return value

    def _method(self):
        r = parse_method_choice(self.buf)
        if r is None:
            return None
        m = self._take(r)
        want = METHOD_HMAC if self.secret else (METHOD_USERPASS if self.user is not None
                                                else METHOD_NOAUTH)
        if m != want:
            raise HandshakeError("no-acceptable-method",
                                 f"server chose method 0x{m:02x}, we offered 0x{want:02x}")
        if m == METHOD_HMAC:
            self.state = "challenge"
            return b""
        if m == METHOD_USERPASS:
            self.state = "userpass"
            return userpass_request(self.user, self.password or "")
        self.state = "reply"
        return request(self.cmd, self.host, self.port)

    def _challenge(self):
        r = parse_challenge(self.buf)
        if r is None:
            return None
        nonce = self._take(r)
        self.expected_server_mac = server_proof(self.secret, nonce, self.cnonce)
        self.state = "proof_result"
        return bytes((HMAC_VER,)) + self.cnonce + client_proof(self.secret, nonce, self.cnonce)

    def _proof_result(self):
        r = parse_proof_result(self.buf)
        if r is None:
            return None
        status, mac = self._take(r)
        if status != 0:
            raise HandshakeError("auth-failed", "server refused the secret proof")
        if not hmac.compare_digest(mac, self.expected_server_mac):
            raise HandshakeError("auth-failed", "server does not know the secret")
        self.state = "reply"
        return request(self.cmd, self.host, self.port)

    def _userpass(self):
        r = parse_status(self.buf, USERPASS_VER)
        if r is None:
            return None
        if self._take(r) != 0:
            raise HandshakeError("auth-failed", "server refused username/password")
        self.state = "reply"
        return request(self.cmd, self.host, self.port)

    def _reply(self):
        r = parse_reply(self.buf)
        if r is None:
            return None
        rep, _atyp, host, port = self._take(r)
        if rep != REP_SUCCEEDED:
            what = " (command not supported)" if rep == REP_CMD_UNSUPPORTED else ""
            raise HandshakeError("refused", f"server answered the request with code {rep}{what}",
                                 rep=rep)
        self.bound = (host, port)
        self.leftover, self.buf = self.buf, b""
        self.state = "done"
        return None


# ---------------------------------------------------------------------------- access list

# Destinations refused unless --allow'ed: every range that is not globally routable
# unicast (RFC 6890 special-purpose registries): unspecified, loopback, private, shared
# (CGN), link-local, documentation, benchmarking, multicast, reserved, unique-local.
DEFAULT_DENY = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
    "2002::/16", "3fff::/20", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
))
ALLOW, DENY = 0, 1
# Priority at equal prefix length: an explicit --deny beats --allow beats the defaults.
_PRIO_USER_DENY, _PRIO_USER_ALLOW, _PRIO_DEFAULT = 0, 1, 2


def parse_cidrs(spec):
    """Networks from 'a/b,c/d' or an iterable of strings/networks; ValueError naming the bad one."""
    if spec is None:
        return []
    if isinstance(spec, str):
        spec = [s for s in spec.replace(" ", ",").split(",") if s]
    out = []
    for item in spec:
        if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            out.append(item)
            continue
        try:
            out.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError as e:
            raise ValueError(f"bad CIDR {item!r}: {e}") from None
    return out


class AccessList:
    """Destination access list: the longest matching prefix decides; at equal length an
    explicit deny beats an explicit allow beats a default deny; no match allows.
    IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry."""

    def __init__(self, allow=(), deny=(), defaults=True):
        rules = []
        for net in parse_cidrs(deny):
            rules.append((net, DENY, _PRIO_USER_DENY))
        for net in parse_cidrs(allow):
            rules.append((net, ALLOW, _PRIO_USER_ALLOW))
        if defaults:
            for net in DEFAULT_DENY:
                rules.append((net, DENY, _PRIO_DEFAULT))
        rules.sort(key=lambda r: (-r[0].prefixlen, r[2]))
        self.rules = rules

    def allowed(self, host):
        ip = ipaddress.ip_address(host)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for net, action, _prio in self.rules:
            if net.version == ip.version and ip in net:
                return action == ALLOW
        return True

    def table(self):
        """[(family 4|6, prefixlen, action, 16-byte network)] in match order, for the C side."""
        return [(net.version, net.prefixlen, action,
                 net.network_address.packed.ljust(16, b"\0"))
                for net, action, _prio in self.rules]


# ---------------------------------------------------------------------- tunnel client options

# gost mode of the tunnel client: one TCP connection per flow, CMD 0xF3, frames without
# flow id. Its per-flow buffers are allocated when the flow starts and freed when it ends.
GOST_QUEUE_LIMIT = 192 * 1024              # per flow: three maximal datagrams
GOST_RX_CAP = MAX_PAYLOAD + MAX_FRAME_HEADER   # per flow: one maximal frame
MUX_QUEUE_LIMIT = 1 << 20                  # per connection of the multiplexed tunnel


REP7_HINT = ("tunnel server %s:%s answered REP 7 (command not supported): it does not speak "
             "relay's multiplexed tunnel (CMD 0xFA); to use a gost server, give the upstream "
             "as gost://HOST:PORT (forward/redir --upstream) or run tunnel-client with --gost")


def check_client_options(gost, secret, connections, user, password):
    """The option rules of a tunnel client (both cores): ValueError naming the option."""
    if (user is None) != (password is None):
        raise ValueError("user and password go together: both or neither")
    if gost:
        if secret:
            raise ValueError("secret does not apply to a gost server: gost does not know "
                             "relay's secret proof (method 0xC5); use user and password")
        if connections != 1:
            raise ValueError("connections does not apply in gost mode: gost carries one "
                             "flow per TCP connection")
    elif user is not None:
        raise ValueError("user and password apply in gost mode only (a relay tunnel-server "
                         "proves clients with its secret)")


class LogLimiter:
    """At most ``burst`` lines per ``window`` seconds at the caller's level; the rest go to
    debug, so a flood of failures never floods the log."""

    def __init__(self, log, burst=5, window=10.0):
        self.log, self.burst, self.window = log, burst, window
        self.start, self.n = -window, 0

    def __call__(self, level, msg, *args):
        now = _time.monotonic()
        if now - self.start >= self.window:
            self.start, self.n = now, 0
        self.n += 1
        if self.n <= self.burst:
            self.log.log(level, msg, *args)
            if self.n == self.burst:
                self.log.log(level, "(more of these in the next %gs are logged at debug "
                                    "level)", self.window)
        else:
            self.log.debug(msg, *args)


# ---------------------------------------------------------------------------- name resolution
# Destinations given as a domain name (ATYP 3) on the tunnel server and the SOCKS5 UDP
# relay. The data path never waits for a lookup: a bounded cache answers at once, a miss
# goes to a few resolver threads (getaddrinfo), and the datagrams waiting for the name are
# parked in bounded queues until the answer wakes the loop through an eventfd. The threads
# only see names and return addresses; they never touch the loop's structures.

DNS_TTL_OK = 60.0           # seconds an answer is reused
DNS_TTL_FAIL = 10.0         # seconds a failure is remembered
DNS_GIVE_UP = 15.0          # a lookup not answered by then has failed
DNS_MAX_NAMES = 1024        # cache entries (the C cache: 256 sets of 4)
DNS_INFLIGHT = 32           # names being resolved at once
DNS_THREADS = 4             # resolver threads, i.e. getaddrinfo calls at once
DNS_PARK_PER_NAME = 16      # datagrams waiting for one name
DNS_PARK_MAX = 256          # datagrams waiting for any name
DNS_PARK_BYTES = 1 << 20    # their payload bytes

_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


def host_name_text(raw):
    """The host name of an ATYP 3 address as text, or None when it cannot be one (letters,
    digits, '-', '_' and dots, labels of 1-63 bytes, at most 253 bytes)."""
    raw = bytes(raw)
    name = raw[:-1] if raw.endswith(b".") else raw
    if not 1 <= len(name) <= 253 or not set(name) <= _NAME_CHARS:
        return None
    if any(not 1 <= len(label) <= 63 for label in name.split(b".")):
        return None
    return raw.decode("ascii")


def resolve_name(name):
    """IP addresses (text) of host name ``name`` in getaddrinfo's order; OSError if none.
    Names under ``.invalid`` fail at once without asking anyone (RFC 6761)."""
    low = name.lower().rstrip(".")
    if low == "invalid" or low.endswith(".invalid"):
        raise OSError(_errno_mod.EHOSTUNREACH, "reserved name (.invalid, RFC 6761)")
    out = []
    for fam, _type, _proto, _canon, sa in socket.getaddrinfo(name, None, 0, socket.SOCK_DGRAM):
        if fam in (socket.AF_INET, socket.AF_INET6):
            ip = sa[0].split("%", 1)[0]
            if ip not in out:
                out.append(ip)
    if not out:
        raise OSError(_errno_mod.EHOSTUNREACH, "no IPv4 or IPv6 address")
    return out


def _packed_addrs(ips):
    """[(4 | 6, packed)] of IP address texts, IPv4-mapped IPv6 as IPv4, bad ones left out."""
    out = []
    for ip in ips:
        try:
            a = ipaddress.ip_address(ip.split("%", 1)[0] if isinstance(ip, str) else ip)
        except ValueError:
            continue
        if a.version == 6 and a.ipv4_mapped is not None:
            a = a.ipv4_mapped
        out.append((a.version, a.packed))
    return out


class ResolverPool:
    """Resolver threads (started on the first lookup, at most ``threads``) working through
    a bounded queue of names. ``submit(token, raw_name)`` queues a lookup; each answer is
    appended to a list and signalled on ``fileno()``, the read end of a non-blocking pipe
    (os.eventfd is Python 3.10+); the loop takes them with ``results()`` as
    ``[(token, [(4 | 6, packed address)...], error text or None)]``.
    ``resolve(name) -> [ip text...]`` is injectable (tests); the default is getaddrinfo."""

    def __init__(self, resolve=None, threads=DNS_THREADS, max_queue=2 * DNS_INFLIGHT):
        self.resolve = resolve or resolve_name
        self.nthreads, self.max_queue = threads, max_queue
        self.fd, self._wake = os.pipe()         # both close-on-exec (PEP 446)
        os.set_blocking(self.fd, False)
        os.set_blocking(self._wake, False)
        self._cv = threading.Condition()
        self._jobs = collections.deque()
        self._done = collections.deque()
        self._threads = []
        self._idle = 0
        self._closed = False

    def fileno(self):
        return self.fd

    def submit(self, token, raw):
        """Queue a lookup of ``raw`` (the name's bytes): None, or why it is refused now."""
        name = host_name_text(raw)
        if name is None:
            return "not a host name"
        with self._cv:
            if self._closed:
                return "resolver closed"
            if len(self._jobs) >= self.max_queue:
                return "too many lookups waiting"
            self._jobs.append((token, name))
            if len(self._jobs) > self._idle and len(self._threads) < self.nthreads:
                t = threading.Thread(target=self._work, name="relay-resolver", daemon=True)
                self._threads.append(t)
                t.start()
            self._cv.notify()
        return None

    def _work(self):
        while True:
            with self._cv:
                self._idle += 1
                while not self._jobs and not self._closed:
                    self._cv.wait()
                self._idle -= 1
                if self._closed:
                    return
                token, name = self._jobs.popleft()
            try:
                addrs, err = _packed_addrs(self.resolve(name)), None
                if not addrs:
                    err = "no IPv4 or IPv6 address"
            except (OSError, UnicodeError, ValueError) as e:
                addrs, err = [], (e.strerror if isinstance(e, OSError) and e.strerror
                                  else str(e)) or type(e).__name__
            with self._cv:
                if self._closed:
                    return
                self._done.append((token, addrs, err))
                try:
                    os.write(self._wake, b"\0")
                except BlockingIOError:     # pipe full: a wake-up is pending already
                    pass

    def results(self):
        try:
            while len(os.read(self.fd, 4096)) == 4096:   # bounded by the pipe's capacity
                pass
        except OSError:                      # BlockingIOError: drained
            pass
        out = []
        while self._done:
            out.append(self._done.popleft())
        return out

    def close(self):
        with self._cv:
            if self._closed:
                return
            self._closed = True
            self._cv.notify_all()
            os.close(self.fd)
            os.close(self._wake)


class _Name:
    __slots__ = ("key", "state", "seq", "expires", "used", "addrs", "parked", "nbytes")


class Resolver:
    """Pure twin of relay._tunnel.NameCache: the bounded cache, the parked datagrams and a
    ResolverPool. ``lookup`` gives the entry of a name (state "ok", "fail" or "pending");
    ``park`` keeps a datagram for a pending one; ``drain()`` / ``expire(now)`` return
    ``[(entry, [(owner, port, data)...])]`` whose datagrams can now go (or be dropped)."""

    def __init__(self, count, log, resolve=None):
        self.pool = ResolverPool(resolve)
        self.count, self.log = count, log
        self.say = LogLimiter(log)
        self.names = {}
        self.inflight = self.nparked = self.park_bytes = self.seq = 0

    def fileno(self):
        return self.pool.fileno()

    @property
    def parked(self):
        return self.nparked

    def lookup(self, raw, now):
        """The entry of name ``raw`` (bytes), a pending new one on a miss; None when there
        is no room to resolve it now."""
        key = bytes(raw).lower()
        e = self.names.get(key)
        if e is not None and (e.state == "pending" or now < e.expires):
            e.used = now
            return e
        if e is None and len(self.names) >= DNS_MAX_NAMES:
            old = [x for x in self.names.values() if x.state != "pending"]
            if not old:
                return None
            del self.names[min(old, key=lambda x: x.used).key]
        if self.inflight >= DNS_INFLIGHT:
            return None
        if e is None:
            e = self.names[key] = _Name()
            e.key = key
        self.seq += 1
        e.state, e.seq, e.expires, e.used = "pending", self.seq, now + DNS_GIVE_UP, now
        e.addrs, e.parked, e.nbytes = [], [], 0
        self.inflight += 1
        why = self.pool.submit((key, e.seq), key)
        if why is not None:
            self._settle(e, [], why, now)
        return e

    def park(self, e, owner, port, data):
        if (len(e.parked) >= DNS_PARK_PER_NAME or self.nparked >= DNS_PARK_MAX
                or self.park_bytes + len(data) > DNS_PARK_BYTES):
            self.count("queue_drops")
            return
        e.parked.append((owner, port, bytes(data)))
        e.nbytes += len(data)
        self.nparked += 1
        self.park_bytes += len(data)

    def _settle(self, e, addrs, err, now):
        self.inflight -= 1
        e.addrs = addrs
        e.state = "ok" if addrs else "fail"
        e.expires = now + (DNS_TTL_OK if addrs else DNS_TTL_FAIL)
        if not addrs:
            self.say(_logging.INFO, "cannot resolve %r: %s", e.key.decode("latin-1"), err)
        parked, e.parked = e.parked, []
        self.nparked -= len(parked)
        self.park_bytes -= e.nbytes
        e.nbytes = 0
        return e, parked

    def drain(self, now):
        out = []
        for (key, seq), addrs, err in self.pool.results():
            e = self.names.get(key)
            if e is not None and e.state == "pending" and e.seq == seq:
                out.append(self._settle(e, addrs, err, now))
        return out

    def expire(self, now):
        if not self.inflight:
            return []
        return [self._settle(e, [], "no answer in time", now) for e in list(self.names.values())
                if e.state == "pending" and now > e.expires]

    @staticmethod
    def pick(e, family):
        """(host, version) of e for a socket of ``family`` (AF_INET6: dual stack, the first
        address getaddrinfo gave, IPv4 mapped); None when it has no address of that kind."""
        if family == socket.AF_INET:
            for ver, packed in e.addrs:
                if ver == 4:
                    return socket.inet_ntop(socket.AF_INET, packed), 4
            return None
        ver, packed = e.addrs[0]
        if ver == 4:
            return "::ffff:" + socket.inet_ntop(socket.AF_INET, packed), 4
        return socket.inet_ntop(socket.AF_INET6, packed), 6

    def close(self):
        self.pool.close()


# =========================================================================== data path
# Pure-Python fallback of relay._tunnel's cores, same Python API and counters; used when
# the extension is missing or RELAY_PURE_PYTHON=1. One Python call per datagram: a
# reference for behaviour, not for speed.

import errno as _errno  # noqa: E402
import select as _select  # noqa: E402

from relay import stats as _stats  # noqa: E402

_C = _stats.INDEX
_log = _logging.getLogger("relay.tunnel")
RX_CAP = 135168
SO_MARK = 36
_EPOLLIN, _EPOLLOUT = _select.EPOLLIN, _select.EPOLLOUT
_BACKOFF_MIN, _BACKOFF_MAX, _CONNECT_TIMEOUT = 0.05, 2.0, 5.0


def _stats_view(stats):
    if stats is None:
        stats = memoryview(bytearray(8 * _stats.N_COUNTERS)).cast("Q")
    if not isinstance(stats, memoryview):
        stats = memoryview(stats)
    if stats.format != "Q":
        stats = stats.cast("B").cast("Q")
    if len(stats) < _stats.N_COUNTERS:
        raise ValueError(f"stats needs {_stats.N_COUNTERS} uint64 counters, got {len(stats)}")
    return stats


def _unmap(addr):
    """(host, port) with an IPv4-mapped IPv6 host turned into IPv4."""
    host = addr[0]
    if host.startswith("::ffff:") and "." in host:
        host = host[7:]
    return (host, addr[1])


def _send_error_counter(e):
    if e in (_errno.EAGAIN, _errno.ENOBUFS):
        return "drop_buffer_full"
    if e == _errno.EMSGSIZE:
        return "drop_too_big"
    if e in (_errno.ENETUNREACH, _errno.EHOSTUNREACH, _errno.EADDRNOTAVAIL):
        return "drop_no_route"
    return "drop_send_error"


class Acl:
    """Matcher over AccessList.table(), like relay._tunnel.Acl."""

    def __init__(self, table=()):
        self.rules = [(fam, plen, action, int.from_bytes(net[:4 if fam == 4 else 16], "big"))
                      for fam, plen, action, net in table]

    def allowed(self, host):
        ip = ipaddress.ip_address(host)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        fam, bits = (4, 32) if ip.version == 4 else (6, 128)
        value = int(ip)
        for rfam, plen, action, net in self.rules:
            if rfam != fam:
                continue
            if plen == 0 or (value ^ net) >> (bits - plen) == 0:
                return action == ALLOW
        return True


class _Poller:
    def __init__(self, stats, log):
        self.ep = _select.epoll()
        self._stats = _stats_view(stats)
        self.log = log or _log
        self.now = _time.monotonic()
        self._reg = {}              # fd -> (kind, idx); kind None: handed to Python
        self.dns = None             # Resolver, for services that relay to host names

    @property
    def stats(self):
        return self._stats

    def _count(self, name, n=1):
        self._stats[_C[name]] += n

    def _sent(self, way, data, sock, to, counted=None):
        """sendto, counted before the call (which lets other threads run) and undone on
        failure, so a reader never sees a delivered datagram that is not counted yet."""
        n = len(data) if counted is None else counted
        self._count(way + "_datagrams")
        self._count(way + "_bytes", n)
        try:
            sock.sendto(data, to)
        except OSError as e:
            self._count(way + "_datagrams", -1)
            self._count(way + "_bytes", -n)
            self._count(_send_error_counter(e.errno))

    def fileno(self):
        return self.ep.fileno()

    def watch(self, fd, token, read=True, write=False, modify=False):
        ev = (_EPOLLIN if read else 0) | (_EPOLLOUT if write else 0)
        (self.ep.modify if modify else self.ep.register)(fd, ev)
        self._reg[fd] = (None, token)

    def unwatch(self, fd):
        try:
            self.ep.unregister(fd)
        except (OSError, ValueError):
            pass
        self._reg.pop(fd, None)

    def _add(self, fd, kind, idx, ev=_EPOLLIN):
        self.ep.register(fd, ev)
        self._reg[fd] = (kind, idx)

    def _del(self, fd):
        self.unwatch(fd)

    def poll(self, timeout_ms=100):
        try:
            events = self.ep.poll(timeout_ms / 1000.0 if timeout_ms >= 0 else -1, 64)
        except InterruptedError:
            return []
        self.now = _time.monotonic()
        py = []
        for fd, ev in events:
            reg = self._reg.get(fd)
            if reg is None:
                continue
            if reg[0] is None:
                py.append((reg[1], ev))
            elif reg[0] == "dns":
                self._dns_ready(self.dns.drain(self.now))
            else:
                self.on_event(reg[0], reg[1], ev)
        return py

    def on_event(self, kind, idx, ev):
        pass

    # -- destinations given as host names (tunnel server, SOCKS5 relay)
    def init_dns(self, resolve=None):
        self.dns = Resolver(self._count, self.log, resolve)
        self._add(self.dns.fileno(), "dns", 0)

    def _name_dst(self, owner, name, port, data, family):
        """(host, port) for a datagram to host name ``name`` (bytes), or None when it was
        parked until the name is resolved, or dropped (counted)."""
        e = self.dns.lookup(name, self.now)
        if e is None:
            self._count("queue_drops")
            return None
        if e.state == "pending":
            self.dns.park(e, owner, port, data)
            return None
        picked = Resolver.pick(e, family) if e.state == "ok" else None
        if picked is None:
            self._count("drop_no_route")
            return None
        return picked[0], port

    def _dns_ready(self, settled):
        for e, parked in settled:
            for owner, port, data in parked:
                if e.state == "ok":
                    self._dns_send(owner, e, port, data)
                else:
                    self._count("drop_no_route")

    def _dns_send(self, owner, e, port, data):
        pass

    def close(self):
        if self.dns is not None:
            self.dns.close()
        self.ep.close()


class _SConn:
    __slots__ = ("sock", "mux", "rx", "tx", "want_out", "stall_since", "flows", "slot")


class _SFlow:
    __slots__ = ("sock", "conn", "id", "last", "last_dst")


class TunnelServer(_Poller):
    """Pure fallback of relay._tunnel.TunnelServer."""

    def __init__(self, acl_table=(), stats=None, *, max_conns=1024, max_flows=4096,
                 timeout=60.0, tx_limit=1 << 20, batch=32, mark=None, stall_timeout=5.0,
                 log=None, resolve=None):
        if not 1 <= batch <= 256:
            raise ValueError(f"batch must be 1-256, got {batch}")
        super().__init__(stats, log)
        self.acl = acl_table if isinstance(acl_table, Acl) else Acl(acl_table)
        self.max_conns, self.max_flows, self.batch = max_conns, max_flows, batch
        self.timeout, self.tx_limit, self.stall_timeout = timeout, tx_limit, stall_timeout
        self.mark = mark
        self.conns = {}
        self.flows = {}             # flow fd -> _SFlow
        self.next_tick = 0.0
        self._slot = 0
        self.init_dns(resolve)

    @property
    def connections(self):
        return len(self.conns)

    @property
    def flows_open(self):
        return len(self.flows)

    def add_conn(self, fd, mux, leftover=b""):
        if len(self.conns) >= self.max_conns:
            return -1
        c = _SConn()
        c.sock = socket.socket(fileno=fd)
        c.sock.setblocking(False)
        c.mux, c.rx, c.tx = mux, bytearray(leftover), bytearray()
        c.want_out, c.stall_since, c.flows = False, 0.0, {}
        self._slot += 1
        c.slot = self._slot
        self.conns[c.slot] = c
        self._add(fd, "conn", c.slot)
        if c.rx:
            self._frames(c)
        return c.slot

    def close_all(self):
        for c in list(self.conns.values()):
            self._close(c, None, None)

    def _close(self, c, why, counter):
        if self.conns.pop(c.slot, None) is None:
            return
        for f in list(c.flows.values()):
            self._release(f, None)
        self._del(c.sock.fileno())
        c.sock.close()
        self._count("conn_open", -1)
        if counter:
            self._count(counter)
        if why:
            self.log.warning("tunnel connection closed: %s", why)

    def _release(self, f, counter):
        c = f.conn
        c.flows.pop(f.id, None)
        self.flows.pop(f.sock.fileno(), None)
        self._del(f.sock.fileno())
        f.sock.close()
        f.sock = None
        self._count("assoc_open", -1)
        if counter:
            self._count(counter)

    def _flow(self, c, fid):
        f = c.flows.get(fid)
        if f is not None:
            return f
        if len(self.flows) >= self.max_flows:
            self._count("drop_table_full")
            return None
        try:
            s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            if self.mark:
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            s.setblocking(False)
        except OSError:
            self._count("assoc_refused")
            return None
        f = _SFlow()
        f.sock, f.conn, f.id, f.last, f.last_dst = s, c, fid, self.now, None
        c.flows[fid] = f
        self.flows[s.fileno()] = f
        self._add(s.fileno(), "flow", s.fileno())
        self._count("assoc_created")
        self._count("assoc_open")
        return f

    def on_event(self, kind, idx, ev):
        if kind == "conn":
            c = self.conns.get(idx)
            if c is None:
                return
            if ev & _EPOLLOUT:
                self._write(c)
                if c.slot not in self.conns:
                    return
            if ev & ~_EPOLLOUT:
                self._read(c)
        else:
            f = self.flows.get(idx)
            if f is not None:
                self._flow_read(f)

    def _read(self, c):
        try:
            data = c.sock.recv(RX_CAP - len(c.rx))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            if c.rx:
                self._close(c, f"truncated frame: stream ended with {len(c.rx)} bytes of an "
                               f"incomplete frame", "frames_bad")
            else:
                self._close(c, None, None)
            return
        c.rx += data
        self._frames(c)

    def _frames(self, c):
        try:
            frames, used = parse_frames(c.rx, mux=c.mux)
        except FrameError as e:
            frames, used, err = None, 0, e
        else:
            err = None
        if frames is None:
            # deliver what precedes the bad frame, like the C loop, then close
            good = []
            pos = 0
            while True:
                try:
                    r = parse_frame(c.rx, pos, mux=c.mux)
                except FrameError:
                    break
                if r is None:
                    break
                good.append(r[0])
                pos = r[1]
            self._send_frames(c, good)
            self._close(c, f"bad frame: {err}", "frames_bad")
            return
        del c.rx[:used]
        self._send_frames(c, frames)

    def _send_frames(self, c, frames):
        for fr in frames:
            f = self._flow(c, fr.flow if c.mux else 0)
            if f is None:
                continue
            f.last = self.now
            if fr.atyp == ATYP_DOMAIN:
                dst = self._name_dst(f, fr.host.encode("latin-1"), fr.port, fr.data,
                                     socket.AF_INET6)
                if dst is None:
                    continue
            else:
                dst = ("::ffff:" + fr.host if fr.atyp == ATYP_IPV4 else fr.host, fr.port)
            self._send_up(f, dst, fr.data)

    def _send_up(self, f, dst, data):
        if dst != f.last_dst:
            if not self.acl.allowed(dst[0]):
                self._count("drop_denied")
                return
            f.last_dst = dst
        self._sent("up", data, f.sock, dst)

    def _dns_send(self, f, e, port, data):
        if f.sock is None:              # the flow ended while its name was resolved
            self._count("drop_no_route")
            return
        self._send_up(f, (Resolver.pick(e, socket.AF_INET6)[0], port), data)

    def _flow_read(self, f):
        c = f.conn
        got = False
        for _ in range(self.batch):
            try:
                data, src = f.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            got = True
            if not data and not c.mux:
                self._count("drop_malformed")
                continue
            frame = encode_frame(*_unmap(src), data, flow=f.id if c.mux else None)
            if self.tx_limit - len(c.tx) < len(frame):
                self._count("drop_buffer_full")
                if not c.stall_since:
                    c.stall_since = self.now
                continue
            c.tx += frame
            self._count("down_datagrams")
            self._count("down_bytes", len(data))
        if got:
            f.last = self.now
            if not c.want_out:
                self._write(c)

    def _write(self, c):
        if c.tx:
            try:
                n = c.sock.send(c.tx)
            except (BlockingIOError, InterruptedError):
                n = 0
            except OSError:
                return self._close(c, None, None)
            if n:
                del c.tx[:n]
                c.stall_since = 0.0
        want = bool(c.tx)
        if want != c.want_out:
            c.want_out = want
            self.ep.modify(c.sock.fileno(), _EPOLLIN | (_EPOLLOUT if want else 0))

    def tick(self, now=0):
        now = now or _time.monotonic()
        self.now = now
        if now < self.next_tick:
            return
        self.next_tick = now + 0.5
        for f in [f for f in self.flows.values() if now - f.last > self.timeout]:
            self._release(f, "assoc_expired")
        self._dns_ready(self.dns.expire(now))
        for c in [c for c in self.conns.values()
                  if c.stall_since and now - c.stall_since > self.stall_timeout]:
            self._close(c, f"peer has not read for {self.stall_timeout:g}s with its send "
                           f"buffer full", "conn_rejected")


def _resolve(server, socktype=socket.SOCK_STREAM):
    infos = socket.getaddrinfo(server[0], server[1], 0, socktype)
    return infos[0][0], infos[0][4]


class _UpstreamBase:
    def __init__(self, stats, log):
        self.ep = _select.epoll()
        self._stats = _stats_view(stats)
        self.log = log or _log
        self.now = _time.monotonic()
        self.reply = None           # callable(client, src, data)

    @property
    def stats(self):
        return self._stats

    def _count(self, name, n=1):
        self._stats[_C[name]] += n

    def fileno(self):
        return self.ep.fileno()

    def collect_replies(self, into):
        self.reply = lambda client, src, data: into.append((client, src, data))

    def _deliver(self, client, src, data):
        self._count("down_datagrams")
        self._count("down_bytes", len(data))
        if self.reply is not None:
            self.reply(client, src, data)

    def close(self):
        self.ep.close()


class _CConn:
    __slots__ = ("sock", "state", "next_try", "backoff", "deadline", "rx", "queue", "out",
                 "hs", "ever_up", "client", "index")


class TunnelUpstream(_UpstreamBase):
    """Pure fallback of relay._tunnel.TunnelUpstream: Python API send/flush/process/tick.

    Multiplexed (CMD 0xFA): flows spread over ``connections`` connections, frames carry
    flow ids. ``gost=True``: one connection per flow opened when the flow starts (CMD
    0xF3, RFC 1929 ``user``/``password`` if given), gost's frames, closed when it idles
    out. ``queue_limit`` bounds what waits per connection (per flow in gost mode)."""

    def __init__(self, server, secret=None, connections=1, mark=None, stats=None,
                 queue_limit=None, timeout=60.0, max_flows=4096, log=None, gost=False,
                 user=None, password=None):
        if not 1 <= connections <= 64:
            raise ValueError(f"connections must be 1-64, got {connections}")
        if not 1 <= max_flows <= 65536:
            raise ValueError(f"max_flows must be 1-65536, got {max_flows}")
        check_client_options(gost, secret, connections, user, password)
        if queue_limit is None:
            queue_limit = GOST_QUEUE_LIMIT if gost else MUX_QUEUE_LIMIT
        if queue_limit < MAX_PAYLOAD + MAX_FRAME_HEADER:
            raise ValueError(f"queue_limit must be at least {MAX_PAYLOAD + MAX_FRAME_HEADER}")
        super().__init__(stats, log)
        self.server = tuple(server)
        self.family, self.addr = _resolve(self.server)
        self.secret, self.mark, self.timeout = secret, mark, timeout
        self.gost, self.mux, self.user, self.password = gost, not gost, user, password
        self.rx_cap = GOST_RX_CAP if gost else RX_CAP
        self.queue_limit, self.max_flows = queue_limit, max_flows
        self.say = LogLimiter(self.log)
        self.rep7_logged = False
        self.flows = {}             # client -> [id, conn, last]
        self.by_id = {}             # id -> client (multiplexed)
        self.byfd = {}              # fd -> conn
        self.gens = [0] * max_flows
        self.free = list(range(max_flows - 1, -1, -1))
        self.next_conn = 0
        self.next_expiry = 0.0
        self.conns = [] if gost else [self._new_conn(i) for i in range(connections)]
        self.tick(_time.monotonic())

    @staticmethod
    def _new_conn(index, client=None):
        c = _CConn()
        c.sock, c.state, c.next_try, c.backoff = None, "down", 0.0, _BACKOFF_MIN
        c.deadline, c.rx, c.hs, c.ever_up = 0.0, bytearray(), None, False
        c.queue = []                # whole frames not written yet
        c.out = bytearray()         # the frame being written (partly sent)
        c.client, c.index = client, index
        return c

    def _all_conns(self):
        return [fl[1] for fl in self.flows.values()] if self.gost else self.conns

    @property
    def connected(self):
        return sum(1 for c in self._all_conns() if c.state == "up")

    @property
    def flows_open(self):
        return len(self.flows)

    def _queued(self, c):
        return sum(map(len, c.queue)) + len(c.out)

    def send(self, client, dst, data):
        data = bytes(data)
        if len(data) > MAX_PAYLOAD:
            self._count("drop_too_big")
            return
        if self.gost and not data:
            # gost reads RSV = 0 as "length unknown": an empty datagram cannot be framed
            self._count("drop_malformed")
            return
        client = tuple(client[:2])
        fl = self.flows.get(client)
        if fl is None:
            if not self.free:
                self._count("drop_table_full")
                return
            slot = self.free.pop()
            self.gens[slot] = (self.gens[slot] + 1) & 0xFFFF
            fid = (self.gens[slot] << 16) | slot
            if self.gost:
                conn = self._new_conn(slot, client)
            else:
                conn = self.conns[self.next_conn]
                self.next_conn = (self.next_conn + 1) % len(self.conns)
            fl = self.flows[client] = [fid, conn, self.now]
            self.by_id[fid] = client
            self._count("assoc_created")
            self._count("assoc_open")
            if self.gost:
                self._connect(conn)
        fl[2] = self.now
        c = fl[1]
        frame = encode_frame(dst[0], dst[1], data, flow=fl[0] if self.mux else None)
        if self.queue_limit - self._queued(c) < len(frame):
            self._count("drop_buffer_full" if c.state == "up" else "queue_drops")
            return
        c.queue.append(frame)
        self._count("up_datagrams")
        self._count("up_bytes", len(data))

    def flush(self):
        for c in self._all_conns():
            if c.state == "up" and c.queue:
                self._write(c)

    def _write(self, c):
        if c.queue:
            c.out += b"".join(c.queue)
            c.queue = []
        if c.out:
            try:
                n = c.sock.send(c.out)
                del c.out[:n]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as e:
                return self._down(c, str(e))
        self.ep.modify(c.sock.fileno(), _EPOLLIN | (_EPOLLOUT if c.out else 0))

    def _what(self, c):
        if self.gost:
            return f"gost connection of flow {c.client[0]}:{c.client[1]}"
        return f"tunnel connection {c.index}"

    def _close_sock(self, c):
        if c.sock is not None:
            self.byfd.pop(c.sock.fileno(), None)
            try:
                self.ep.unregister(c.sock.fileno())
            except (OSError, ValueError):
                pass
            c.sock.close()
            c.sock = None
        if c.state == "up":
            self._count("conn_open", -1)

    def _down(self, c, why):
        was_up = c.state == "up"
        self._close_sock(c)
        if was_up:
            self.say(_logging.WARNING, "%s to %s:%s lost (%s); reconnecting", self._what(c),
                     self.server[0], self.server[1], why)
        elif why:
            self.say(_logging.INFO, "%s to %s:%s failed (%s); retry in %.2fs", self._what(c),
                     self.server[0], self.server[1], why, c.backoff)
        c.state, c.hs, c.rx = "down", None, bytearray()
        c.next_try = self.now + c.backoff
        c.backoff = min(c.backoff * 2, _BACKOFF_MAX)
        if c.out:
            # out holds whole frames after the partly sent one: find where that one ends
            self._count("queue_drops")
            rest = bytes(c.out)
            c.out = bytearray()
            # frames in out were joined from whole frames; the first is the cut one
            pos = 0
            frames = []
            while pos < len(rest):
                try:
                    r = parse_frame(rest, pos, mux=self.mux)
                except FrameError:
                    r = None
                if r is None:
                    break
                frames.append(rest[pos:r[1]])
                pos = r[1]
            c.queue = frames[1:] + c.queue if frames else c.queue

    def _connect(self, c):
        s = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.mark:
                s.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            err = s.connect_ex(self.addr)
        except OSError as e:
            s.close()
            return self._down(c, str(e))
        if err not in (0, _errno.EINPROGRESS):
            s.close()
            return self._down(c, os.strerror(err))
        c.sock, c.state, c.deadline = s, "connecting", self.now + _CONNECT_TIMEOUT
        self.byfd[s.fileno()] = c
        self.ep.register(s.fileno(), _EPOLLIN | _EPOLLOUT)

    def process(self):
        self.now = _time.monotonic()
        for fd, ev in self.ep.poll(0, 64):
            c = self.byfd.get(fd)
            if c is None or c.sock is None or c.sock.fileno() != fd:
                continue
            if c.state in ("connecting", "handshake"):
                self._handshake(c, ev)
                continue
            if ev & _EPOLLOUT:
                self._write(c)
            if c.state == "up" and ev & ~_EPOLLOUT:
                self._read(c)

    def _handshake(self, c, ev):
        if c.state == "connecting":
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err or ev & (_select.EPOLLERR | _select.EPOLLHUP):
                return self._down(c, os.strerror(err) if err else "connection failed")
            c.hs = ClientHandshake(cmd=CMD_UDP_TUN if self.gost else CMD_UDP_TUN_MUX,
                                   secret=self.secret, user=self.user, password=self.password)
            c.state = "handshake"
            self.ep.modify(c.sock.fileno(), _EPOLLIN)
            try:
                c.sock.send(c.hs.start())
            except OSError as e:
                self._down(c, str(e))
            return
        try:
            data = c.sock.recv(4096)
            if not data:
                return self._down(c, "server closed the connection during the handshake")
            out = c.hs.feed(data)
            if out:
                c.sock.send(out)
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ValueError) as e:
            self._count("conn_rejected")
            if self.mux and getattr(e, "rep", None) == REP_CMD_UNSUPPORTED:
                if not self.rep7_logged:
                    self.rep7_logged = True
                    self.log.error(REP7_HINT, *self.server[:2])
                return self._down(c, None)
            return self._down(c, f"handshake: {e}")
        if not c.hs.done:
            return
        c.state, c.backoff = "up", _BACKOFF_MIN
        self._count("conn_open")
        if c.ever_up:
            self._count("conn_reconnects")
            self.say(_logging.WARNING, "%s to %s:%s re-established", self._what(c),
                     *self.server[:2])
        c.ever_up = True
        c.rx = bytearray(c.hs.leftover)
        c.hs = None
        if c.rx:
            self._frames(c)
        if c.state == "up":
            self._write(c)

    def _read(self, c):
        try:
            data = c.sock.recv(self.rx_cap - len(c.rx))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self._down(c, str(e))
        if not data:
            return self._down(c, "server closed the connection")
        c.rx += data
        self._frames(c)

    def _frames(self, c):
        try:
            frames, used = parse_frames(c.rx, mux=self.mux)
        except FrameError as e:
            self._count("frames_bad")
            return self._down(c, f"bad frame from server: {e}")
        del c.rx[:used]
        for fr in frames:
            client = c.client if self.gost else self.by_id.get(fr.flow)
            if client is None or fr.atyp == ATYP_DOMAIN:
                self._count("drop_no_route")
                continue
            self.flows[client][2] = self.now
            self._deliver(client, (fr.host, fr.port), fr.data)

    def tick(self, now=0):
        now = now or _time.monotonic()
        self.now = now
        for c in self._all_conns():
            if c.state == "down" and now >= c.next_try:
                self._connect(c)
            elif c.state in ("connecting", "handshake") and now > c.deadline:
                self._down(c, "timed out")
        if now >= self.next_expiry:
            self.next_expiry = now + 1.0
            for client, fl in list(self.flows.items()):
                if now - fl[2] > self.timeout:
                    del self.flows[client]
                    del self.by_id[fl[0]]
                    self.free.append(fl[0] & 0xFFFF)
                    if self.gost:
                        self._close_sock(fl[1])
                    self._count("assoc_open", -1)
                    self._count("assoc_expired")

    def close(self):
        for c in self._all_conns():
            self._close_sock(c)
            c.state = "down"
        super().close()


class _Assoc:
    __slots__ = ("client", "tcp", "udp", "state", "relay", "queue", "qbytes", "last",
                 "deadline", "hs")


class Socks5Upstream(_UpstreamBase):
    """Pure fallback of relay._tunnel.Socks5Upstream (one association per client flow)."""

    def __init__(self, server, user=None, password=None, mark=None, stats=None, timeout=60.0,
                 max_flows=1024, queue_limit=65536 + 1024, batch=32, log=None):
        super().__init__(stats, log)
        self.server = tuple(server)
        self.family, self.addr = _resolve(self.server)
        self.user, self.password, self.mark, self.timeout = user, password, mark, timeout
        self.max_flows, self.queue_limit, self.batch = max_flows, max(queue_limit, 65600), batch
        self.assocs = {}            # client -> _Assoc
        self.byfd = {}              # fd -> _Assoc
        self.next_expiry = 0.0
        self.pending = []           # (sock, datagram, relay) to send on flush

    @property
    def flows_open(self):
        return len(self.assocs)

    def _open(self, client):
        if len(self.assocs) >= self.max_flows:
            self._count("drop_table_full")
            return None
        a = _Assoc()
        a.client, a.state, a.relay, a.queue, a.qbytes = client, "connecting", None, [], 0
        a.last, a.deadline, a.hs, a.tcp, a.udp = self.now, self.now + _CONNECT_TIMEOUT, None, None, None
        self.assocs[client] = a
        self._count("assoc_created")
        self._count("assoc_open")
        try:
            a.udp = socket.socket(self.family, socket.SOCK_DGRAM)
            a.udp.setblocking(False)
            if self.mark:
                a.udp.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            a.udp.bind(("::" if self.family == socket.AF_INET6 else "0.0.0.0", 0))
            a.tcp = socket.socket(self.family, socket.SOCK_STREAM)
            a.tcp.setblocking(False)
            a.tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.mark:
                a.tcp.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            err = a.tcp.connect_ex(self.addr)
            if err not in (0, _errno.EINPROGRESS):
                raise OSError(err, os.strerror(err))
            self.ep.register(a.tcp.fileno(), _EPOLLIN | _EPOLLOUT)
            self.ep.register(a.udp.fileno(), _EPOLLIN)
            self.byfd[a.tcp.fileno()] = a
            self.byfd[a.udp.fileno()] = a
        except OSError as e:
            self.log.warning("SOCKS5 association via %s:%s failed: %s", *self.server[:2], e)
            self._close(a, "assoc_refused")
            return None
        return a

    def _close(self, a, counter):
        if self.assocs.pop(a.client, None) is None:
            return
        for s in (a.tcp, a.udp):
            if s is not None:
                self.byfd.pop(s.fileno(), None)
                try:
                    self.ep.unregister(s.fileno())
                except (OSError, ValueError):
                    pass
                s.close()
        if a.state == "up":
            self._count("conn_open", -1)
        self._count("assoc_open", -1)
        if counter:
            self._count(counter)

    def send(self, client, dst, data):
        data = bytes(data)
        if len(data) > MAX_PAYLOAD:
            self._count("drop_too_big")
            return
        client = tuple(client[:2])
        a = self.assocs.get(client) or self._open(client)
        if a is None:
            return
        a.last = self.now
        dgram = udp_header(dst[0], dst[1]) + data
        if a.state != "up":
            if self.queue_limit - a.qbytes < len(dgram) + 4:
                self._count("queue_drops")
                return
            a.queue.append((dgram, len(data)))
            a.qbytes += len(dgram) + 4
            return
        self.pending.append((a.udp, dgram, a.relay))
        self._count("up_datagrams")
        self._count("up_bytes", len(data))

    def flush(self):
        for sock, dgram, relay in self.pending:
            try:
                sock.sendto(dgram, relay)
            except OSError as e:
                self._count(_send_error_counter(e.errno))
        self.pending = []

    def process(self):
        self.now = _time.monotonic()
        for fd, ev in self.ep.poll(0, 64):
            a = self.byfd.get(fd)
            if a is None or a.client not in self.assocs:
                continue
            if a.udp is not None and fd == a.udp.fileno():
                self._recv(a)
            elif a.state != "up":
                self._handshake(a, ev)
            else:
                try:
                    data = a.tcp.recv(512)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._close(a, None)

    def _handshake(self, a, ev):
        if a.state == "connecting":
            err = a.tcp.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err or ev & (_select.EPOLLERR | _select.EPOLLHUP):
                self.log.warning("SOCKS5 server %s:%s: %s", *self.server[:2],
                                 os.strerror(err) if err else "connection failed")
                return self._close(a, "assoc_refused")
            a.hs = ClientHandshake(cmd=CMD_UDP_ASSOCIATE,
                                   host="::" if self.family == socket.AF_INET6 else "0.0.0.0",
                                   user=self.user, password=self.password)
            a.state = "handshake"
            self.ep.modify(a.tcp.fileno(), _EPOLLIN)
            try:
                a.tcp.send(a.hs.start())
            except OSError:
                self._close(a, "assoc_refused")
            return
        try:
            data = a.tcp.recv(4096)
            if not data:
                raise OSError("SOCKS5 server closed the connection during the handshake")
            out = a.hs.feed(data)
            if out:
                a.tcp.send(out)
            if not a.hs.done:
                return
            host, port = a.hs.bound
            if host in ("0.0.0.0", "::"):
                host = self.addr[0]
            fam, relay = _resolve((host, port), socket.SOCK_DGRAM)
            if fam != self.family:
                raise OSError(f"relay address {host} is not of the server's family")
        except (BlockingIOError, InterruptedError):
            return
        except (OSError, ValueError) as e:
            self.log.warning("SOCKS5 UDP ASSOCIATE via %s:%s failed: %s", *self.server[:2], e)
            self._count("conn_rejected")
            return self._close(a, "assoc_refused")
        a.relay, a.state, a.hs = relay[:2], "up", None
        self._count("conn_open")
        for dgram, n in a.queue:
            try:
                a.udp.sendto(dgram, a.relay)
                self._count("up_datagrams")
                self._count("up_bytes", n)
            except OSError:
                self._count("drop_send_error")
        a.queue, a.qbytes = [], 0

    def _recv(self, a):
        for _ in range(self.batch):
            try:
                data, src = a.udp.recvfrom(65536 + 262)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            a.last = self.now
            if a.state != "up" or tuple(src[:2]) != tuple(a.relay[:2]):
                self._count("drop_malformed")
                continue
            h = udp_header_counted(data, self._count)
            if h is None:
                continue
            atyp, host, port, hl = h
            if atyp == ATYP_DOMAIN:
                self._count("drop_no_route")
                continue
            self._deliver(a.client, (host, port), data[hl:])

    def tick(self, now=0):
        now = now or _time.monotonic()
        self.now = now
        if now < self.next_expiry:
            return
        self.next_expiry = now + 0.5
        for a in list(self.assocs.values()):
            if a.state != "up" and now > a.deadline:
                self.log.warning("SOCKS5 association via %s:%s timed out", *self.server[:2])
                self._close(a, "assoc_refused")
            elif now - a.last > self.timeout:
                self._close(a, "assoc_expired")

    def close(self):
        for a in list(self.assocs.values()):
            self._close(a, None)
        super().close()


class UdpFrontend(_Poller):
    """Pure fallback of relay._tunnel.UdpFrontend: a UDP socket in front of an upstream."""

    def __init__(self, fd, to, upstream, batch=32, stats=None, log=None):
        super().__init__(upstream.stats if stats is None else stats, log)
        self.sock = socket.socket(fileno=os.dup(fd))
        self.sock.setblocking(False)
        self.to, self.up, self.batch = tuple(to), upstream, batch
        upstream.reply = self._reply
        self._add(self.sock.fileno(), "listen", 0)
        self._add(upstream.fileno(), "upstream", 0)

    def _reply(self, client, src, data):
        try:
            self.sock.sendto(data, client)
        except OSError as e:
            self._count(_send_error_counter(e.errno))

    def on_event(self, kind, idx, ev):
        if kind == "upstream":
            self.up.process()
            return
        for _ in range(self.batch):
            try:
                data, src = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                continue
            self.up.send(src[:2], self.to, data)
        self.up.flush()

    def tick(self, now=0):
        self.up.tick(now or _time.monotonic())

    def close(self):
        self.sock.close()
        super().close()


class Socks5Relay(_Poller):
    """Pure fallback of relay._tunnel.Socks5Relay (UDP ASSOCIATE data path)."""

    def __init__(self, acl_table=(), stats=None, *, max_assoc=1024, batch=32, log=None,
                 resolve=None):
        super().__init__(stats, log)
        self.acl = acl_table if isinstance(acl_table, Acl) else Acl(acl_table)
        self.max_assoc, self.batch = max_assoc, batch
        self.assocs = {}            # idx -> [sock, client, port_known]
        self._idx = 0
        self.init_dns(resolve)

    @property
    def associations(self):
        return len(self.assocs)

    def add(self, fd, client):
        if len(self.assocs) >= self.max_assoc:
            return -1
        self._idx += 1
        sock = socket.socket(fileno=os.dup(fd))
        sock.setblocking(False)
        self.assocs[self._idx] = [sock, tuple(client[:2]), client[1] != 0]
        self._add(sock.fileno(), "udp", self._idx)
        self._count("assoc_created")
        self._count("assoc_open")
        return self._idx

    def remove(self, idx):
        a = self.assocs.pop(idx, None)
        if a is not None:
            self._del(a[0].fileno())
            a[0].close()
            self._count("assoc_open", -1)

    def tick(self, now=0):
        """Give up lookups that take too long. Call about once a second."""
        self.now = now or _time.monotonic()
        self._dns_ready(self.dns.expire(self.now))

    def on_event(self, kind, idx, ev):
        a = self.assocs.get(idx)
        if a is None:
            return
        sock = a[0]
        for _ in range(self.batch):
            try:
                data, src = sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            src = tuple(src[:2])
            if src[0] == a[1][0] and (not a[2] or src == a[1]):
                if not a[2]:
                    a[1], a[2] = src, True
                h = udp_header_counted(data, self._count)
                if h is None:
                    continue
                atyp, host, port, hl = h
                if atyp == ATYP_DOMAIN:
                    dst = self._name_dst(idx, host.encode("latin-1"), port, data[hl:],
                                         sock.family)
                    if dst is None:
                        continue
                    host = dst[0]
                elif atyp == ATYP_IPV6 and sock.family == socket.AF_INET:
                    self._count("drop_no_route")
                    continue
                elif atyp == ATYP_IPV4 and sock.family == socket.AF_INET6:
                    host = "::ffff:" + host
                self._send_up(sock, host, port, data[hl:])
            else:
                if not a[2]:
                    self._count("drop_no_route")
                    continue
                self._sent("down", udp_header(*_unmap(src)) + data, sock, a[1], len(data))

    def _send_up(self, sock, host, port, data):
        if not self.acl.allowed(host):
            self._count("drop_denied")
            return
        self._sent("up", data, sock, (host, port))

    def _dns_send(self, idx, e, port, data):
        a = self.assocs.get(idx)
        picked = None if a is None else Resolver.pick(e, a[0].family)
        if picked is None:              # association gone, or no address of its family
            self._count("drop_no_route")
            return
        self._send_up(a[0], picked[0], port, data)

    def close(self):
        for idx in list(self.assocs):
            self.remove(idx)
        super().close()
