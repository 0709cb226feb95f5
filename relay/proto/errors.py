"""The errors of the wire protocols: both ValueError, each with a short ``reason``."""

# Frame error codes: the values are in relay.proto.wire (the C codec returns the same).
from relay.proto.wire import E_BAD_ATYP, E_EMPTY_DOMAIN, E_FRAGMENTED, E_TOO_BIG, E_TRUNCATED
FRAME_ERRORS = {
    E_TRUNCATED: "truncated",
    E_TOO_BIG: "too-big",
    E_BAD_ATYP: "bad-atyp",
    E_EMPTY_DOMAIN: "empty-domain",
    E_FRAGMENTED: "fragmented",
}


class FrameError(ValueError):
    """A tunnel frame that can never be valid; ``reason`` is one of FRAME_ERRORS."""

    def __init__(self, code, message):
        super().__init__(message)
        self.code = code
        self.reason = FRAME_ERRORS[code]


def frame_error(reason, message):
    code = {v: k for k, v in FRAME_ERRORS.items()}[reason]
    return FrameError(code, message)


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
