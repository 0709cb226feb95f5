"""Micro benchmarks of the packet API: the extension, the pure-Python fallback, scapy.

    python -m pytest bench/bench_packet.py --benchmark-only

One group per operation and size, so each table compares the three implementations on
the same input: inet_checksum over 20 B, 1400 B and 64 KiB; build_udp (IPv4) with a
20 B, 1400 B and 65507 B payload; parse_udp of those packets. scapy does the same work
with ``checksum()`` from scapy.utils, ``raw(IP(src, dst)/UDP(sport, dport)/payload)``
and ``IP(packet)`` with its payload taken out.
"""
import os

import pytest
from scapy.all import IP, UDP, raw
from scapy.utils import checksum as scapy_checksum

from relay.packet.pure import fast as pure

try:
    from relay.packet import _fast as native
    NATIVE_MISSING = None
except ImportError as exc:
    native = None
    NATIVE_MISSING = f"relay.packet._fast extension is not built ({exc})"

SRC, DST = ("192.0.2.1", 40000), ("198.51.100.2", 53)
CHECKSUM_SIZES = [20, 1400, 65536]
BUILD_SIZES = [20, 1400, 65507]
IMPLS = ["native", "pure", "scapy"]


def _module(impl):
    if impl == "native":
        if native is None:
            pytest.skip(NATIVE_MISSING)
        return native
    return pure


def _scapy_build(src, dst, payload):
    return raw(IP(src=src[0], dst=dst[0]) / UDP(sport=src[1], dport=dst[1]) / payload)


def _scapy_parse(packet):
    p = IP(packet)
    u = p[UDP]
    return (p.src, u.sport), (p.dst, u.dport), bytes(u.payload)


@pytest.mark.parametrize("size", CHECKSUM_SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_inet_checksum(benchmark, impl, size):
    benchmark.group = f"inet_checksum {size} B"
    data = os.urandom(size)
    fn = scapy_checksum if impl == "scapy" else _module(impl).inet_checksum
    assert benchmark(fn, data) == pure.inet_checksum(data)


@pytest.mark.parametrize("size", BUILD_SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_build_udp(benchmark, impl, size):
    benchmark.group = f"build_udp IPv4 {size} B payload"
    payload = os.urandom(size)
    if impl == "scapy":
        pkt = benchmark(_scapy_build, SRC, DST, payload)
    else:
        pkt = benchmark(_module(impl).build_udp, SRC, DST, payload)
    # scapy sets DF=0 and ident=1 by default: compare what both must agree on
    assert pure.parse_udp(pkt) == (SRC, DST, payload)


@pytest.mark.parametrize("size", BUILD_SIZES)
def test_build_udp_into(benchmark, size):
    """The allocation-free variant (extension only): the floor of a Python-level call."""
    if native is None:
        pytest.skip(NATIVE_MISSING)
    benchmark.group = f"build_udp IPv4 {size} B payload"
    payload = os.urandom(size)
    buf = bytearray(65536)
    n = benchmark(native.build_udp_into, buf, 0, SRC, DST, payload)
    assert bytes(buf[:n]) == native.build_udp(SRC, DST, payload)


@pytest.mark.parametrize("size", BUILD_SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_parse_udp(benchmark, impl, size):
    benchmark.group = f"parse_udp IPv4 {size} B payload"
    payload = os.urandom(size)
    packet = pure.build_udp(SRC, DST, payload)
    fn = _scapy_parse if impl == "scapy" else _module(impl).parse_udp
    assert benchmark(fn, packet) == (SRC, DST, payload)
