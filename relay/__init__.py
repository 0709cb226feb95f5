"""relay: UDP redirection for Linux routers with a Cython data path.

The packet library (relay.packet, re-exported here; compiled extension or pure-Python
twin, same names and errors): inet_checksum, checksum_update, build_udp, build_udp_into,
build_udp_fragments, build_icmp_unreachable, parse_udp, BatchSocket, RawSender, PacketTooBig.

``relay.EXTENSIONS`` maps each part with a pure twin (relay._select.PARTS) to True when
its compiled extension is in use; set RELAY_PURE_PYTHON=1 to force the pure-Python twins.
The extensions are loaded on first use, so ``import relay.config`` stays light.
"""
from relay.errors import PacketTooBig

__version__ = "0.1.0"

__all__ = ["BatchSocket", "EXTENSIONS", "PacketTooBig", "RawSender", "build_icmp_unreachable",
           "build_udp", "build_udp_fragments", "build_udp_into", "checksum_update", "inet_checksum",
           "parse_udp"]


def __getattr__(name):
    """The packet library's names (relay.packet), and EXTENSIONS: {part: compiled?}."""
    import importlib
    if name == "EXTENSIONS":
        _select = importlib.import_module("relay._select")
        return {part: _select.load(part)[1] for part in _select.PARTS}
    packet = importlib.import_module("relay.packet")
    if name not in packet.NAMES:
        # Submodules (relay.net, relay.config, ...) are found by the import system after this.
        raise AttributeError(f"module 'relay' has no attribute {name!r}")
    value = getattr(packet, name)
    globals()[name] = value
    return value
