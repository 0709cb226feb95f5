"""forward and redir through an upstream: `--upstream tunnel://` (relay tunnel-server),
`--upstream gost://` (gost's UDP tunnel, served here by relay tunnel-server, which speaks it)
and `--upstream socks5://` (relay socks5, and v2ray's socks inbound). Replies keep the real
remote as their source: redir spoofs it exactly as with direct sockets."""
import socket
import subprocess
import sys

import pytest

from tests.namespaces import (RTR4_ALL, RTR4_CLI, RTR4_MORE, RTR6_ALL, SRV4, SRV6,
                              check_moving_client, check_reply_sources, check_runs_alternate,
                              start_echo)
from tests.relayproc import RelayProcess, relay_env, udp_roundtrip
from tests.support import ALLOW, serve_in, upstream_in_srv, wait_tcp  # noqa: F401

pytestmark = pytest.mark.netns

SIZES = (0, 1, 1472, 3000, 65507)
# SOCKS5 UDP puts a 10 (IPv4 address) or 22 (IPv6 address) byte header in front of the data
# in one UDP datagram; to an IPv4 server, the largest it can carry is 65507 - 22 bytes.
SOCKS_SIZES = (0, 1, 1472, 3000, 65485)


@pytest.fixture
def tunnel_server(topo):
    start_echo(topo.srv, f"{SRV4}:5000", f"[{SRV6}]:5000")
    serve_in(topo.srv, "tunnel-server", "--listen", "[::]:8443", "--secret", "s3cret",
             "--allow", ALLOW)
    wait_tcp(topo.srv, (SRV4, 8443))
    return topo


@pytest.fixture
def gost_server(topo):
    """A server speaking gost's UDP tunnel (CMD 0xF3): relay tunnel-server without a secret
    (gost clients have none), hence --insecure."""
    start_echo(topo.srv, f"{SRV4}:5000", f"[{SRV6}]:5000")
    serve_in(topo.srv, "tunnel-server", "--listen", "[::]:8443", "--insecure", "--allow", ALLOW)
    wait_tcp(topo.srv, (SRV4, 8443))
    return topo


@pytest.fixture
def socks_server(topo):
    start_echo(topo.srv, f"{SRV4}:5000", f"[{SRV6}]:5000")
    serve_in(topo.srv, "socks5", "--listen", "[::]:1080", "--username", "u", "--password", "p w",
             "--allow", ALLOW)
    wait_tcp(topo.srv, (SRV4, 1080))
    return topo


def apply_rules(topo):
    r = subprocess.run(["ip", "netns", "exec", topo.rtr.name, sys.executable, "-m", "relay",
                        "rules", "apply", "--port", "7000", "--iface", "rtr0"],
                       capture_output=True, text=True, env=relay_env(), timeout=30)
    assert r.returncode == 0, r.stderr


def check_redir(topo, relay, sizes=SIZES):
    for family, srv in ((socket.AF_INET, SRV4), (socket.AF_INET6, SRV6)):
        c = topo.cli.socket(family)
        for size in sizes:
            payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
            data, src = udp_roundtrip(c, (srv, 5000), payload, timeout=3)
            assert data == payload, f"{family.name} {size}"
            assert src == (srv, 5000), f"{family.name} {size}: reply came from {src}"
    relay.settled_stats(lambda st: st["down_datagrams"] == 2 * len(sizes))


@pytest.mark.parametrize("reply", ["raw", "transparent"])
def test_redir_through_the_tunnel_spoofs_the_real_remote(tunnel_server, reply):
    topo = tunnel_server
    apply_rules(topo)
    with RelayProcess(["redir", "--listen", "[::]:7000", "--reply", reply, "--upstream",
                       f"tunnel://{SRV4}:8443", "--secret", "s3cret"], ns=topo.rtr).wait_ready() as relay:
        check_redir(topo, relay)
        assert relay.stats()["conn_open"] == 1


def test_redir_through_gost_spoofs_the_real_remote(gost_server):
    topo = gost_server
    apply_rules(topo)
    with RelayProcess(["redir", "--listen", "[::]:7000", "--upstream", f"gost://{SRV4}:8443"],
                      ns=topo.rtr).wait_ready() as relay:
        check_redir(topo, relay, SIZES[1:])
        assert relay.stats()["conn_open"] == 2        # one connection per flow (client socket)
        # gost cannot carry an empty datagram: dropped and counted, no flow made for it
        c = topo.cli.socket(socket.AF_INET)
        c.sendto(b"", (SRV4, 5000))
        st = relay.settled_stats(lambda st: st["drop_malformed"] == 1)
        assert st["conn_open"] == 2 and st["assoc_created"] == 2


def test_forward_through_gost_one_connection_per_client(gost_server):
    topo = gost_server
    with RelayProcess(["forward", "--listen", "[::]:6000", "--to", f"[{SRV6}]:5000", "--upstream",
                       f"gost://[{SRV6}]:8443"], ns=topo.rtr).wait_ready() as relay:
        clients = [topo.cli.socket(socket.AF_INET) for _ in range(5)]
        for rnd in range(2):
            for i, c in enumerate(clients):
                msg = b"%d/%d" % (i, rnd)
                assert udp_roundtrip(c, (RTR4_CLI, 6000), msg, timeout=3) == (msg, (RTR4_CLI, 6000))
        st = relay.settled_stats(lambda st: st["down_datagrams"] == 10)
        assert st["conn_open"] == 5 and st["assoc_created"] == 5


def test_redir_through_socks5_spoofs_the_real_remote(socks_server):
    topo = socks_server
    apply_rules(topo)
    with RelayProcess(["redir", "--listen", "[::]:7000", "--upstream",
                       f"socks5://u:p%20w@{SRV4}:1080"], ns=topo.rtr).wait_ready() as relay:
        check_redir(topo, relay, SOCKS_SIZES)


@pytest.mark.parametrize("target", [f"{SRV4}:5000", f"[{SRV6}]:5000"])
def test_forward_through_the_tunnel_many_clients(tunnel_server, target):
    topo = tunnel_server
    with RelayProcess(["forward", "--listen", "[::]:6000", "--to", target, "--upstream",
                       f"tunnel://[{SRV6}]:8443", "--secret", "s3cret", "--connections", "2"],
                      ns=topo.rtr).wait_ready() as relay:
        clients = [topo.cli.socket(socket.AF_INET) for _ in range(20)]
        for rnd in range(3):
            for i, c in enumerate(clients):
                msg = b"%d/%d" % (i, rnd)
                data, src = udp_roundtrip(c, (RTR4_CLI, 6000), msg, timeout=3)
                assert (data, src) == (msg, (RTR4_CLI, 6000))
        relay.settled_stats(lambda st: st["up_datagrams"] == 60 == st["down_datagrams"])


def test_forward_with_a_wrong_secret_carries_nothing(tunnel_server):
    topo = tunnel_server
    with RelayProcess(["forward", "--listen", "[::]:6000", "--to", f"{SRV4}:5000", "--upstream",
                       f"tunnel://{SRV4}:8443", "--secret", "wrong"], ns=topo.rtr).wait_ready() as relay:
        c = topo.cli.socket(socket.AF_INET)
        c.settimeout(0.5)
        c.sendto(b"x", (RTR4_CLI, 6000))
        with pytest.raises(socket.timeout):
            c.recvfrom(10)
        assert relay.stats()["down_datagrams"] == 0
        assert relay.proc.poll() is None


@pytest.mark.parametrize("upstream", ["tunnel", "socks5"])
def test_wildcard_forward_through_an_upstream_replies_from_the_address_asked(topo, upstream):
    """forward on `[::]` with a tunnel or SOCKS5 upstream: replies come back through the
    core without an association entry, and still leave from the address each client
    asked (the engine's bounded client -> local address table)."""
    topo.add_router_addresses()
    extra = upstream_in_srv(topo, upstream)
    with RelayProcess(["forward", "--listen", "[::]:6000", "--to", f"{SRV4}:5000", *extra],
                      ns=topo.rtr).wait_ready() as relay:
        check_reply_sources(topo.cli, 6000, RTR4_ALL + RTR6_ALL, timeout=3)
        check_moving_client(topo.cli, 6000, RTR4_ALL)
        check_moving_client(topo.cli, 6000, RTR6_ALL)
        sent = 6 + 12 + check_runs_alternate(topo.cli, 6000, RTR4_MORE)
        relay.settled_stats(lambda st: st["up_datagrams"] == sent == st["down_datagrams"]
                            and st["drop_no_route"] == st["drop_send_error"] == 0)
