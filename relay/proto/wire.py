"""The numbers on the wire, defined once.

SOCKS5 (RFC 1928, RFC 1929), gost's UDP-over-TCP command, relay's multiplexed extension and
the tunnel frame's limits and error codes. The Python protocols (relay.proto) import them
from here; the C data path reads the same values from ``relay/includes/wire.h``, which the
build (setup.py) writes from this file, so the two can never disagree. Keep this module
plain ``NAME = integer`` lines: the build reads it without importing relay.
"""

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
USERPASS_VER = 1            # RFC 1929

# A frame's payload may be at most the largest UDP payload (IPv6, no jumbograms).
MAX_PAYLOAD = 65527
# RSV(2) FRAG(1) ATYP(1) LEN(1) DOMAIN(255) PORT(2) FLOW(4)
MAX_FRAME_HEADER = 266

# Frame error codes (relay.proto.errors names them; the C codec returns them negated).
E_TRUNCATED = 1
E_TOO_BIG = 2
E_BAD_ATYP = 3
E_EMPTY_DOMAIN = 4
E_FRAGMENTED = 5
