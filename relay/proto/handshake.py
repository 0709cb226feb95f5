"""The handshakes, as state machines fed with bytes: SOCKS5 method choice, RFC 1929
login, relay's secret proof (method 0xC5, HMAC-SHA256 both ways, the secret never sent)
and the request; for the tunnel server and SOCKS5 server (``ServerHandshake``) and the
tunnel client and SOCKS5 upstream (``ClientHandshake``). Sans-I/O."""
import hashlib
import hmac
import os

from relay.proto.socks5 import (
    CMD_UDP_TUN, CMD_UDP_TUN_MUX, HandshakeError, METHOD_HMAC, METHOD_NOAUTH,
    METHOD_NONE_ACCEPTABLE, METHOD_USERPASS, REP_CMD_UNSUPPORTED, REP_SUCCEEDED,
    USERPASS_VER, VER, greeting, parse_greeting, parse_method_choice, parse_reply,
    parse_request, parse_status, parse_userpass_request, request, request_reply,
    userpass_request,
)
from relay.proto.frame import MAX_FRAME_HEADER, MAX_PAYLOAD

HMAC_VER = 1
NONCE_LEN = 32
CLIENT_NONCE_LEN = 16
MAC_LEN = 32
AUTH_LABEL_CLIENT = b"relay-tunnel-auth-v1 client"
AUTH_LABEL_SERVER = b"relay-tunnel-auth-v1 server"

# What a handshake may hold. Its messages: the largest greeting (255 methods), the largest
# authentication (RFC 1929 with 255-byte user and password; the secret proof is smaller)
# and the largest request or reply (a 255-byte name); every other message is smaller.
# After the request (or the reply) the peer may pipeline frames: at most one maximal frame
# is kept (``leftover``), what the receive buffers take; more is refused.
MAX_HANDSHAKE = (2 + 255) + (3 + 255 + 255) + (4 + 1 + 255 + 2)
MAX_LEFTOVER = MAX_PAYLOAD + MAX_FRAME_HEADER


def _refuse_oversize(held, limit):
    if held > limit:
        raise HandshakeError("too-long", f"handshake holds {held} bytes, more than {limit}")


def _check_feed(hs, data):
    """Before buffering ``data``: never more than the messages plus one frame."""
    _refuse_oversize(len(hs.buf) + len(data), MAX_HANDSHAKE + MAX_LEFTOVER)


def _check_held(hs):
    """After parsing: an unfinished handshake holds part of one message; a finished one the
    pipelined bytes, at most one maximal frame."""
    _refuse_oversize(len(hs.buf) + len(hs.leftover), MAX_LEFTOVER if hs.done else MAX_HANDSHAKE)


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

    MAX_HANDSHAKE = MAX_HANDSHAKE
    MAX_LEFTOVER = MAX_LEFTOVER

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
        _check_feed(self, data)
        self.buf += data
        out = b""
        try:
            while True:
                step = getattr(self, "_" + self.state.replace("-", "_"))()
                if step is None:
                    break
                out += step
            _check_held(self)
        except HandshakeError as e:
            e.reply = out + e.reply      # answers already due go out before the refusal
            raise
        return out

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

    MAX_HANDSHAKE = MAX_HANDSHAKE
    MAX_LEFTOVER = MAX_LEFTOVER

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
        _check_feed(self, data)
        self.buf += data
        out = b""
        while self.state != "done":
            step = getattr(self, "_" + self.state)()
            if step is None:
                break
            out += step
        _check_held(self)
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
