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
import hashlib
import hmac
import ipaddress
import os
import socket
import struct

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

    def __init__(self, reason, message, reply=b""):
        super().__init__(message)
        self.reason = reason
        self.reply = reply


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

    Accepted methods: METHOD_HMAC when a secret is set; else METHOD_USERPASS when user is
    set; else METHOD_NOAUTH. ``commands`` limits the accepted CMD values."""

    MAX_BUFFER = 1024

    def __init__(self, *, secret=None, user=None, password=None,
                 commands=(CMD_UDP_TUN, CMD_UDP_TUN_MUX), nonce=None):
        self.secret = secret
        self.user = None if user is None else _key(user)
        self.password = b"" if password is None else _key(password)
        self.commands = frozenset(commands)
        self.nonce = nonce if nonce is not None else os.urandom(NONCE_LEN)
        if secret:
            self.method = METHOD_HMAC
        elif user is not None:
            self.method = METHOD_USERPASS
        else:
            self.method = METHOD_NOAUTH
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
        if self.method not in methods:
            raise HandshakeError("no-acceptable-method",
                                 f"client offers methods {list(methods)}, server needs {self.method}",
                                 bytes((VER, METHOD_NONE_ACCEPTABLE)))
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
            raise HandshakeError("refused", f"server answered the request with code {rep}")
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
