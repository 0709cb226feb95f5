"""BatchSocket (recvmmsg/sendmmsg, original destination, GSO/GRO): the extension in
relay.packet._fast and the pure-Python fallback in relay.packet.pure.batch, run through the same tests.

Loopback tests use 127.0.0.1/::1; the backpressure and TPROXY tests run in network
namespaces made for them (a token-bucket qdisc on a namespace's lo, the cli/rtr/srv
topology with an nft tproxy rule in rtr).
"""
import errno
import itertools
import os
import select
import socket
import time
import types

import pytest

from tests import namespaces as netns
from tests.support_batch import (FAMILIES, _native, _pure, addr2, big_buffers, drain, payload,
                                 plain_drain, quiet, udp)
from tests.support_batch import B  # noqa: F401 (fixtures)

IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
IP_RECVERR = 11
IPV6_RECVERR = 25


# -- backpressure: a slow qdisc on the lo of a namespace of our own ----------------------

_ns_counter = itertools.count()


@pytest.fixture
def slow_lo(netns_available):
    """A namespace whose lo is shaped by a token bucket (4 Mbit/s, small queue)."""
    name = f"rlb{os.getpid()}x{next(_ns_counter)}"
    netns.sh("ip", "netns", "add", name)
    try:
        ns = netns.Netns(name, types.SimpleNamespace(procs=[]))
        ns.run("ip", "link", "set", "lo", "up")
        yield ns
    finally:
        netns.sh("ip", "netns", "del", name, check=False)


def _resend_all(b, items, rx, timeout=10.0):
    """Send items, retrying what is left after each early stop; returns the counts."""
    counts = []
    done = 0
    deadline = time.monotonic() + timeout
    while done < len(items) and time.monotonic() < deadline:
        n = b.send(items[done:])
        counts.append(n)
        done += n
        if done < len(items):
            select.select([], [b.fileno()], [], 0.02)
            time.sleep(0.005)
    return counts, done


@pytest.mark.netns
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["EAGAIN", "ENOBUFS"])
def test_send_partial_batches(B, family, mode, slow_lo):
    """sendmmsg hits EAGAIN (send buffer full) or ENOBUFS (qdisc queue full): the count
    returned is exact and the rest goes out on retry, each datagram once, in order."""
    limit = "200kb" if mode == "EAGAIN" else "3kb"
    slow_lo.run("tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "4mbit",
                "burst", "2kb", "limit", limit)
    with slow_lo.enter():
        rx = udp(family)
        tx = socket.socket(family, socket.SOCK_DGRAM)
    with rx, tx:
        if mode == "EAGAIN":
            tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)      # the minimum, ~4.5 kB
        else:
            big_buffers(tx)
            if family == socket.AF_INET6:
                tx.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
            else:
                tx.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        items = [(payload("q", k, 1000), addr2(rx)) for k in range(60)]
        with B(tx, batch=16) as b:
            first = b.send(items)
            assert first < len(items)
            assert b.last_error == getattr(errno, mode)
            # Exactly `first` datagrams went out: once the queue drains, those arrive.
            got = plain_drain(rx, first, timeout=5)
            assert [p for p, _ in got] == [p for p, _ in items[:first]]
            assert quiet(rx, 0.1)
            counts, done = _resend_all(b, items[first:], rx)
            assert done == len(items) - first, counts
            got += plain_drain(rx, len(items) - first, timeout=10)
            assert quiet(rx, 0.1)
    assert [p for p, _ in got] == [p for p, _ in items]


# -- TPROXY: original destinations -----------------------------------------------------

NFT_TPROXY = """
table inet relaytest {
    chain pre {
        type filter hook prerouting priority mangle; policy accept;
        meta nfproto ipv4 udp dport 5000 tproxy ip to :7000 meta mark set 1 accept
        meta nfproto ipv6 udp dport 5000 tproxy ip6 to :7000 meta mark set 1 accept
    }
}
"""


@pytest.mark.netns
def test_origdst_tproxy(topo):
    r = topo.rtr
    impls = [_pure()]
    try:
        impls.insert(0, _native())
    except pytest.skip.Exception:
        pass
    r.run("nft", "-f", "-", input=NFT_TPROXY)
    try:
        r.run("ip", "rule", "add", "fwmark", "1", "lookup", "100")
        r.run("ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
        r.run("ip", "-6", "rule", "add", "fwmark", "1", "lookup", "100")
        r.run("ip", "-6", "route", "add", "local", "::/0", "dev", "lo", "table", "100")
        for impl in impls:
            for family, any_addr, dsts, cli_addr in (
                (socket.AF_INET, "0.0.0.0", [netns.SRV4, netns.SRV4_B], netns.CLI4),
                (socket.AF_INET6, "::", [netns.SRV6, netns.SRV6_B], netns.CLI6),
            ):
                lst = r.socket(family)
                c = topo.cli.socket(family)
                with lst, c:
                    if family == socket.AF_INET6:
                        lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                        lst.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
                    else:
                        lst.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
                    lst.bind((any_addr, 7000))
                    c.bind((cli_addr, 0))
                    with impl(lst, batch=8, recv_origdst=True) as b:
                        sent = []
                        for k in range(6):
                            dst = (dsts[k % 2], 5000)
                            p = f"to {dst} #{k}".encode()
                            c.sendto(p, dst)
                            sent.append((p, (cli_addr, c.getsockname()[1]), dst))
                        got = drain(b, len(sent))
                    assert [(p, src, od) for p, src, od, _, _ in got] == sent, impl
    finally:
        r.run("nft", "delete", "table", "inet", "relaytest", check=False)
        r.run("ip", "rule", "del", "fwmark", "1", "lookup", "100", check=False)
        r.run("ip", "-6", "rule", "del", "fwmark", "1", "lookup", "100", check=False)
