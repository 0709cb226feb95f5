"""Destinations given as host names (ATYP 3) on the tunnel server and the SOCKS5 UDP relay.

The cores run in a thread of this process and get datagrams over loopback: the tunnel
server through a socketpair carrying a plain (gost) connection, the SOCKS5 relay through
an association's UDP socket. A test-local resolver function stands in for getaddrinfo
where a positive answer or a slow lookup is needed; `localhost` and `name.invalid` use the
real resolver (neither needs the network). C core and pure fallback alike."""
import socket

import pytest

from tests.support import Running, cfg, wait_stat

_tunnel = pytest.importorskip("relay.datapath.tunnel")
pytestmark = pytest.mark.usefixtures("impl")     # every test: compiled, then pure
socks = pytest.importorskip("socks")


@pytest.mark.parametrize("allow", [[], ["127.0.0.0/8"]], ids=["default", "allowed"])
def test_socks5_pysocks_sends_names(echo, allow):
    """PySocks sends host names (ATYP 3) in its UDP headers: `relay socks5` resolves them;
    `localhost` is denied unless 127.0.0.0/8 is allowed."""
    r = Running(cfg("socks5", listen=("127.0.0.1", 0), allow=allow))
    c = socks.socksocket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        c.set_proxy(socks.SOCKS5, *r.address)
        c.settimeout(3)
        c.sendto(b"x", ("name.invalid", 53))
        wait_stat(r, "drop_no_route")
        if not allow:
            c.sendto(b"denied", ("localhost", echo.addr[1]))
            wait_stat(r, "drop_denied")
            assert r.stats()["up_datagrams"] == 0
            return
        for size in (0, 1, 1400, 65000):
            data = b"n" * size
            c.sendto(data, ("localhost", echo.addr[1]))
            got, src = c.recvfrom(70000)
            assert (got, src[:2]) == (data, echo.addr)
        st = r.stats()
        assert st["up_datagrams"] == 4 and st["down_datagrams"] == 4 and st["drop_denied"] == 0
    finally:
        c.close()
        r.stop()
