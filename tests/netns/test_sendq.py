"""relay/datapath/sendq.pxd: queued datagrams go out with sendmmsg, runs coalesced into GSO.

The .pxd has inline C only, so the test compiles a small probe module against it (Cython
and a C compiler are what `pip install -e .` needs anyway). Checks: runs of equal-size
datagrams to one address become one message (a shorter one may end it), anything else
starts a new message; every datagram arrives intact, in order, counted; a route whose MTU
refuses the segment size gets the datagrams one by one and the queue stops coalescing
that size; a full socket buffer is counted, never silent.
"""
import socket

import pytest

from tests.namespaces import SRV4, SRV6
from tests.support_sendq import drain
from tests.support_sendq import probe  # noqa: F401 (fixtures)


@pytest.mark.netns
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_route_that_refuses_the_segment_size_gets_them_one_by_one(topo, probe, family):
    """Across a 1500-byte MTU veth, 3000-byte segments cannot be GSO (EINVAL): those
    datagrams go out one by one (fragmented by IP as usual), and the queue learns not to
    coalesce that size again; 1000-byte runs still go as GSO."""
    dst = SRV4 if family == socket.AF_INET else SRV6
    with topo.srv.enter():
        r = socket.socket(family, socket.SOCK_DGRAM)
    r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 23)
    r.bind((dst, 5000))
    r.settimeout(0.5)
    s = topo.rtr.socket(family)
    big = [(bytes([i]) * 3000, (dst, 5000)) for i in range(20)]
    small = [(bytes([i]) * 1000, (dst, 5000)) for i in range(20)]
    flushes, st, gso_max = probe.send(s.fileno(), big + small, cap=64)
    assert gso_max == 2999
    assert flushes == [2]
    assert st == {"up_datagrams": 40, "up_bytes": 80000, "offload_fallback": 1}
    assert drain(r) == [p for p, _ in big + small]
