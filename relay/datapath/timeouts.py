"""Idle timeouts per destination port, as the data path holds them: timeout classes.

A listener has its default timeout (``--timeout``) and per-port ones (``--timeout-port
53=10,443=30``). The tables keep one LRU list per distinct timeout (relay/datapath/table.pxd
TCLASSES, the pure twins the same way), so expiry stays O(1) per datagram whatever the mix.
Used by the C engine and cores and by their pure twins alike.
"""

import collections

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


def timeout_for(default, port_timeouts, port):
    """The idle timeout of a flow to destination ``port``: its range's, else the default."""
    for lo, hi, seconds in port_timeouts:
        if lo <= port <= hi:
            return float(seconds)
    return float(default)


def port_class_map(ranges):
    """A 65536-byte map port -> class (bytes), or None when every port is class 0."""
    if not any(c for _, _, c in ranges):
        return None
    out = bytearray(65536)
    for lo, hi, c in ranges:
        out[lo:hi + 1] = bytes([c]) * (hi - lo + 1)
    return bytes(out)


class ExpiryLists:
    """The pure twins' timeout classes: one LRU (key -> last use, least recent first) per
    class, as relay/datapath/table.pxd keeps them, so ``expired`` costs O(expired)."""

    def __init__(self, timeout, port_timeouts=()):
        self.timeouts, ranges = timeout_classes(timeout, port_timeouts)
        if min(self.timeouts) <= 0:
            raise ValueError("timeouts must be positive")
        self.pmap = port_class_map(ranges)
        self.lists = [collections.OrderedDict() for _ in self.timeouts]
        self.where = {}

    def add(self, key, port, now):
        """A new flow, classed by the destination port of its first datagram."""
        c = self.pmap[port] if self.pmap is not None else 0
        self.where[key] = c
        self.lists[c][key] = now

    def touch(self, key, now):
        c = self.where.get(key)
        if c is not None:
            d = self.lists[c]
            d[key] = now
            d.move_to_end(key)

    def remove(self, key):
        c = self.where.pop(key, None)
        if c is not None:
            del self.lists[c][key]

    def timeout_of(self, key):
        return self.timeouts[self.where[key]]

    def expired(self, now):
        """The keys idle for at least their class's timeout."""
        out = []
        for t, d in zip(self.timeouts, self.lists):
            for key, last in d.items():
                if last + t > now:
                    break
                out.append(key)
        return out
