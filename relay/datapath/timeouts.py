"""Idle timeouts per destination port, as the data path holds them: timeout classes.

A listener has its default timeout (``--timeout``) and per-port ones (``--timeout-port
53=10,443=30``). The tables keep one LRU list per distinct timeout (relay/datapath/table.pxd
TCLASSES, the pure twins the same way), so expiry stays O(1) per datagram whatever the mix.
Used by the C engine and cores and by their pure twins alike.
"""

MAX_CLASSES = 8              # relay/datapath/table.pxd TCLASSES: class 0 + 7 per-port timeouts


def timeout_classes(default, port_timeouts):
    """([seconds of class 0, 1, ...], [(first port, last port, class), ...]).

    ``port_timeouts``: (first, last, seconds) ranges, not overlapping (the config checks).
    A port timeout equal to the default shares class 0."""
    values = [float(default)]
    ranges = []
    for lo, hi, seconds in port_timeouts:
        seconds = float(seconds)
        if seconds not in values:
            values.append(seconds)
        ranges.append((int(lo), int(hi), values.index(seconds)))
    if len(values) > MAX_CLASSES:
        raise ValueError(f"at most {MAX_CLASSES - 1} distinct per-port timeouts besides the "
                         f"default, got {len(values) - 1}")
    return values, ranges


def port_class_map(ranges):
    """A 65536-byte map port -> class (bytes), or None when every port is class 0."""
    if not any(c for _, _, c in ranges):
        return None
    out = bytearray(65536)
    for lo, hi, c in ranges:
        out[lo:hi + 1] = bytes([c]) * (hi - lo + 1)
    return bytes(out)
