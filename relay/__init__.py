"""relay: UDP redirection for Linux routers with a Cython data path.

Public packet API (compiled extension or pure-Python fallback, same names and errors):
    inet_checksum, checksum_update, build_udp, build_udp_into, build_udp_fragments, parse_udp,
    BatchSocket, RawSender, PacketTooBig

``relay.EXTENSIONS`` maps each module name to True when its compiled extension is in
use; set RELAY_PURE_PYTHON=1 to force the pure-Python fallback. The extensions are
loaded on first use, so ``import relay.config`` stays light.
"""
from relay.errors import PacketTooBig

__version__ = "0.1.0"

_FROM = {
    "inet_checksum": "_fast",
    "checksum_update": "_fast",
    "build_udp": "_fast",
    "build_udp_into": "_fast",
    "build_udp_fragments": "_fast",
    "parse_udp": "_fast",
    "BatchSocket": "_fast",
    "RawSender": "_rawsock",
}

__all__ = sorted(_FROM) + ["PacketTooBig", "EXTENSIONS"]


def __getattr__(name):
    if name not in _FROM and name != "EXTENSIONS":
        # Submodules (relay.sockopt, ...) are found by the import system after this.
        raise AttributeError(f"module 'relay' has no attribute {name!r}")
    import importlib
    _select = importlib.import_module("relay._select")
    if name == "EXTENSIONS":
        return {mod: _select.load(mod)[1] for mod in ("_fast", "_rawsock")}
    if name in _FROM:
        value = getattr(_select.load(_FROM[name])[0], name)
        globals()[name] = value
        return value
