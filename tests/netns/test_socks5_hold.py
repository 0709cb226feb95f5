"""SOCKS5 and tunnel TCP hold against dead peers and slow names: CONNECT names resolved off
the loop (bounded, with a deadline), keepalive and TCP_USER_TIMEOUT on every long-lived TCP
connection, idle expiry of UDP associations, port-0 associations bound to their first
sender, strict_udp."""
import shutil
import socket
import time

import pytest

from relay.net import sockopt
from tests import namespaces as N
from tests.support import cfg, raw_associate

pytestmark = pytest.mark.usefixtures("impl")     # every test: compiled, then pure


# ------------------------------------------------------------------ a peer that vanishes

BLACKHOLE = """table inet blackhole {
    chain in { type filter hook input priority -300; policy accept; meta l4proto tcp drop; }
    chain out { type filter hook output priority -300; policy accept; meta l4proto tcp drop; }
}
"""


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_vanished_client_is_noticed(topo, running, v6):
    """The client's host drops every TCP packet (a NAT that forgot it, a crash): the
    server's keepalive probes go unanswered and the association ends with its control
    connection. Keepalive after 1 s, 3 probes 1 s apart: noticed after about 4 s."""
    if not shutil.which("nft"):
        pytest.skip("nft is not installed")
    sockopt.set_tcp_keepalive(1)
    try:
        host = N.RTR6_CLI if v6 else N.RTR4_CLI
        server = running(cfg("socks5", listen=(host, 0), insecure=True), topo.rtr)
        fam = socket.AF_INET6 if v6 else socket.AF_INET
        with topo.cli.enter():
            ctl, u, _relay = raw_associate(server, family=fam, at=server.address[:2])
        N.wait_until(lambda: server.svc.relay.associations == 1, 5, what="associated")
        topo.cli.run("nft", "-f", "-", input=BLACKHOLE)
        t0 = time.monotonic()
        N.wait_until(lambda: server.svc.relay.associations == 0, 60, what="dead peer noticed")
        took = time.monotonic() - t0
        N.wait_until(lambda: server.stats()["conn_open"] == 0, 5, what="connection closed")
        print(f"dead SOCKS5 client noticed after {took:.1f}s")
        ctl.close()
        u.close()
    finally:
        sockopt.set_tcp_keepalive(60)
