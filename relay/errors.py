"""Exceptions shared by the extensions and the pure-Python fallback."""


class PacketTooBig(ValueError):
    """A datagram cannot go out as one raw packet.

    ``limit`` names the limit ("IPv4 maximum", "IPv6 maximum" or "interface MTU"),
    ``size`` is the packet size in bytes and ``sent`` how many datagrams of the
    batch went out before this one.
    """

    def __init__(self, message, *, size=0, limit="", sent=0):
        super().__init__(message)
        self.size = size
        self.limit = limit
        self.sent = sent
