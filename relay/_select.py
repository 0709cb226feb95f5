"""The one place that chooses between a compiled extension and its pure-Python twin.

Every part with a twin is named here; ``load(part)`` returns ``(module, native)``: the
extension when it is built and RELAY_PURE_PYTHON is not set, else the pure module (same
names, signatures, errors and counters). Nothing else in relay makes this choice.
"""
import importlib
import logging
import os

PARTS = {
    "packet": ("relay.packet._fast", "relay.packet.pure.fast"),       # build/parse/checksum, BatchSocket
    "rawsock": ("relay.packet._rawsock", "relay.packet.pure.rawsock"),  # RawSender
    "tunnel": ("relay.datapath.tunnel", "relay.datapath.pure"),       # tunnel and SOCKS5 cores
    "tun": ("relay.datapath.tun", "relay.datapath.pure.tun"),         # relay tun's data path
}
_warned = set()


def pure_forced() -> bool:
    return os.environ.get("RELAY_PURE_PYTHON", "") not in ("", "0")


def load(part: str):
    """(module, is_native) for one of PARTS."""
    native, pure = PARTS[part]
    if not pure_forced():
        try:
            return importlib.import_module(native), True
        except ImportError:
            if part not in _warned:
                _warned.add(part)
                logging.getLogger("relay").warning(
                    "%s is not built: %s runs in pure Python (slow)", native, part)
    return importlib.import_module(pure), False


def module(part: str):
    """load(part)'s module alone."""
    return load(part)[0]


def pure_module(part: str):
    """The pure twin of part, whatever is built (for a compiled part that cannot drive a
    pure neighbour: relay tun's C loop takes only the compiled upstream cores)."""
    return importlib.import_module(PARTS[part][1])
