"""The wire protocols, sans-I/O: bytes in, values and bytes out, no sockets, no threads.

``socks5``: SOCKS5 messages and the constants the tunnel shares with them; ``frame``: tunnel
frames; ``handshake``: the server and client handshakes, with the secret proof; ``acl``: the
destination access list; ``client_options``: a tunnel client's option rules and buffers.
The compiled data path (relay.datapath.tunnel) and the pure-Python one (relay.datapath.pure)
both use them; this package re-exports their public names.
"""
from relay.proto.errors import *  # noqa: F401,F403
from relay.proto.socks5 import *  # noqa: F401,F403
from relay.proto.frame import *  # noqa: F401,F403
from relay.proto.handshake import *  # noqa: F401,F403
from relay.proto.acl import *  # noqa: F401,F403
from relay.proto.client_options import *  # noqa: F401,F403
