"""The packet library, usable on its own: RFC 1071/1624 checksums, IPv4/IPv6+UDP packets
built and parsed (with IP fragments), ICMP/ICMPv6 port unreachable errors, ``RawSender``
(spoofed datagrams in sendmmsg batches) and ``BatchSocket`` (recvmmsg/sendmmsg, GSO/GRO, original destinations).

Each name is the compiled extension's (``_fast.pyx``, ``_rawsock.pyx``) or, where it is not
built or RELAY_PURE_PYTHON=1, its pure-Python twin's (``pure/``): relay._select chooses.
Loaded on first use, so importing relay stays light. The C-level packet core that the data
path shares is ``checksum.pxd``, ``headers.pxd`` and ``icmp.pxd``.
"""
from relay.errors import PacketTooBig

NAMES = {
    "inet_checksum": "packet",
    "checksum_update": "packet",
    "build_udp": "packet",
    "build_udp_into": "packet",
    "build_udp_fragments": "packet",
    "build_icmp_unreachable": "packet",
    "parse_udp": "packet",
    "BatchSocket": "packet",
    "RawSender": "rawsock",
}

__all__ = sorted(NAMES) + ["PacketTooBig"]


def __getattr__(name):
    if name not in NAMES:
        raise AttributeError(f"module 'relay.packet' has no attribute {name!r}")
    from relay import _select
    value = getattr(_select.module(NAMES[name]), name)
    globals()[name] = value
    return value
