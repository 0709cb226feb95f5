"""A router with two uplinks: each listener leaves through the interface (--bind-interface)
or from the source address (--source) it names, whatever the main route says; and TCP Fast
Open carries the tunnel handshake in the SYN of a reconnect.

    cli -- rtr ==rtr1 (uplink 1: 198.51.100.1, 2001:db8:2::1; the main route)== srv
               ==rtr2 (uplink 2: 203.0.113.1, 2001:db8:3::1)================ srv

The remotes (198.18.0.1, 2001:db8:9::1, on srv's lo) are routed through uplink 1 (metric
100) and through uplink 2 (metric 200: what a device bound to rtr2 finds); packets from
uplink 2's addresses take uplink 2 (ip rule from ... lookup 202), as multi-WAN routers set
them up. The server answers each datagram with the source address it saw: that is the
uplink it left through. One topology for the module: the tests only start services."""
import socket

import pytest

from tests import namespaces as N
from tests.namespaces import RTR4_CLI, RTR6_CLI, SRV4, SRV6, wait_until
from tests.support import Running, ask_source, cfg, redir_rules

pytestmark = pytest.mark.netns
pytest.importorskip("relay.datapath.engine")

UP1 = {4: N.RTR4_SRV, 6: N.RTR6_SRV}
UP2 = {4: "203.0.113.1", 6: "2001:db8:3::1"}
UP2_SRV = {4: "203.0.113.2", 6: "2001:db8:3::2"}
REMOTE = {4: "198.18.0.1", 6: "2001:db8:9::1"}
NETS = {4: "198.18.0.0/15", 6: "2001:db8:9::/48"}
ALLOW = ["198.18.0.0/15", "2001:db8:9::/48"]
FAM = {4: socket.AF_INET, 6: socket.AF_INET6}
TABLE = 202
REDIR_PORT = 7000

WHO_SERVER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for host in sys.argv[1:]:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        s = socket.socket(fam, kind)
        s.bind((host, 7))
        if kind == socket.SOCK_STREAM:
            s.listen(16)
        sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        try:
            if s.type == socket.SOCK_STREAM:
                c, peer = s.accept()
                c.sendall(peer[0].encode())
                c.close()
            else:
                data, peer = s.recvfrom(65535)
                s.sendto(peer[0].encode(), peer)
        except OSError:
            pass
"""


@pytest.fixture(scope="module")
def wan(netns_available):
    t = N.Topology()
    try:
        r, s = t.rtr, t.srv
        r.run("ip", "link", "add", "rtr2", "type", "veth", "peer", "name", "srv1", "netns", s.name)
        for ns, dev, addrs in ((r, "rtr2", UP2), (s, "srv1", UP2_SRV)):
            for v, a in addrs.items():
                ns.run("ip", "addr", "add", f"{a}/{24 if v == 4 else 64}", "dev", dev,
                       *(["nodad"] if v == 6 else []))
            ns.run("ip", "link", "set", dev, "up")
        for v in (4, 6):
            s.run("ip", "addr", "add", f"{REMOTE[v]}/{32 if v == 4 else 128}", "dev", "lo")
            ip = ["ip", "-6"] if v == 6 else ["ip"]
            r.run(*ip, "route", "add", NETS[v], "via", {4: SRV4, 6: SRV6}[v], "dev", "rtr1",
                  "metric", "100")
            r.run(*ip, "route", "add", NETS[v], "via", UP2_SRV[v], "dev", "rtr2", "metric", "200")
            r.run(*ip, "route", "add", NETS[v], "via", UP2_SRV[v], "dev", "rtr2", "table", TABLE)
            r.run(*ip, "rule", "add", "from", UP2[v], "lookup", TABLE)
        for ns in (r, s):
            for dev in ("all", "default", "rtr1", "rtr2", "srv0", "srv1"):
                ns.run("sysctl", "-qw", f"net.ipv4.conf.{dev}.rp_filter=0", check=False)
            ns.run("sysctl", "-qw", "net.ipv4.tcp_fastopen=3")
        p = s.python(WHO_SERVER, REMOTE[4], REMOTE[6], text=True)
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
        rules = redir_rules(t, "apply", REDIR_PORT)
        assert rules.returncode == 0, rules.stderr
        yield t
    finally:
        t.close()


def ask(ns, family, addr, tries=3):
    """The source address the server saw for a datagram sent from ns to addr."""
    s = ns.socket(family)
    try:
        return ask_source(s, addr, tries)
    finally:
        s.close()


def peers_of(ns, port):
    """Peer addresses of the TCP connections established to port in ns."""
    out = ns.run("ss", "-Htn", "state", "established", f"( sport = :{port} )").stdout
    return sorted({line.split()[-1].rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")
                   for line in out.splitlines() if line.strip()})


BINDINGS = {                  # listener keys -> the uplink each family leaves through
    "main route": ({}, UP1),
    "bind rtr2": (dict(bind_interface="rtr2"), UP2),
    "bind rtr1": (dict(bind_interface="rtr1"), UP1),
    "source": (dict(source=(UP2[4], UP2[6])), UP2),
}


def test_forward_listeners_each_leave_through_their_uplink(wan, running):
    """Four forward listeners side by side, one per binding, both families: the server sees
    each one's uplink address."""
    port = 5300
    listeners = []
    for name, (kw, up) in BINDINGS.items():
        for v in (4, 6):
            listen = (RTR4_CLI if v == 4 else RTR6_CLI, port)
            running(cfg("forward", listen=listen, to=(REMOTE[v], 7), **kw), wan.rtr)
            listeners.append((name, v, listen, up[v]))
            port += 1
    seen = {(name, v): ask(wan.cli, FAM[v], listen) for name, v, listen, _up in listeners}
    assert seen == {(name, v): up for name, v, _listen, up in listeners}


@pytest.mark.parametrize("binding", ["main route", "bind rtr2", "source"])
def test_redir_leaves_through_its_uplink(wan, running, binding):
    kw, up = BINDINGS[binding]
    running(cfg("redir", listen=("::", REDIR_PORT), **kw), wan.rtr)
    for v in (4, 6):
        assert ask(wan.cli, FAM[v], (REMOTE[v], 7)) == up[v]


@pytest.mark.usefixtures("impl")
@pytest.mark.parametrize("v", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("binding", ["main route", "bind rtr2", "source"])
def test_tunnel_upstream_connects_through_its_uplink(wan, running, binding, v):
    """forward --upstream tunnel://...?bind=rtr2 (or ?source=...): the tunnel server in
    srv sees its connection come from that uplink; the datagrams go through."""
    kw, up = BINDINGS[binding]
    query = "&".join(f"{'bind' if k == 'bind_interface' else k}="
                     f"{val if isinstance(val, str) else ','.join(val)}" for k, val in kw.items())
    server = running(cfg("tunnel-server", listen=("::", 8443), secret="s", allow=ALLOW,
                         allow_host=True), wan.srv)
    host = REMOTE[v] if v == 4 else f"[{REMOTE[v]}]"
    url = f"tunnel://{host}:8443" + (f"?{query}" if query else "")
    running(cfg("forward", listen=(RTR4_CLI, 5400), to=(REMOTE[v], 7), upstream=_up(url),
                secret="s"), wan.rtr)
    assert ask(wan.cli, socket.AF_INET, (RTR4_CLI, 5400)) == REMOTE[v]   # the server's own
    assert peers_of(wan.srv, 8443) == [up[v]]
    assert server.stats()["conn_open"] == 1


@pytest.mark.usefixtures("impl")
@pytest.mark.parametrize("v", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("binding", ["main route", "bind rtr2", "source"])
def test_tunnel_server_flows_leave_through_their_uplink(wan, running, binding, v):
    kw, up = BINDINGS[binding]
    running(cfg("tunnel-server", listen=(RTR4_CLI, 9000), secret="s", allow=ALLOW, **kw),
            wan.rtr)
    running(cfg("tunnel-client", listen=("127.0.0.1", 5000), server=(RTR4_CLI, 9000),
                to=(REMOTE[v], 7), secret="s"), wan.cli)
    assert ask(wan.cli, socket.AF_INET, ("127.0.0.1", 5000)) == up[v]


@pytest.mark.usefixtures("impl")
@pytest.mark.parametrize("binding", ["main route", "bind rtr2", "source"])
def test_socks5_server_udp_and_connect_leave_through_their_uplink(wan, running, binding):
    """relay socks5 in the router: its UDP relay sockets (which answer the client through
    rtr0 too: the device and source ride in each datagram's packet info) and its CONNECT
    sockets leave through the uplink the listener names."""
    from relay import proto
    from tests.support import raw_associate
    kw, up = BINDINGS[binding]
    server = running(cfg("socks5", listen=("::", 1080), insecure=True, allow=ALLOW, **kw),
                     wan.rtr)
    for v in (4, 6):
        with wan.cli.enter():
            ctl, u, relay = raw_associate(server, at=(RTR4_CLI, 1080))
            connect = socket.create_connection((RTR4_CLI, 1080), timeout=3)
        try:
            u.sendto(proto.udp_header(REMOTE[v], 7) + b"?", relay)
            got = u.recvfrom(2048)[0]
            assert got[proto.parse_udp_header(got)[4]:].decode() == up[v]
            hs = proto.ClientHandshake(cmd=proto.CMD_CONNECT, host=REMOTE[v], port=7)
            out = hs.start()
            while not hs.done:
                connect.sendall(out)
                out = hs.feed(connect.recv(4096))
            answer = hs.leftover
            while len(answer) < len(up[v]):
                chunk = connect.recv(100)
                if not chunk:
                    break
                answer += chunk
            assert answer.decode() == up[v]
        finally:
            for s in (ctl, u, connect):
                s.close()


# ----------------------------------------------------------------------------- Fast Open

def tcp_ext(ns):
    """TcpExt counters of ns (/proc/net/netstat)."""
    lines = [l.split() for l in ns.run("cat", "/proc/net/netstat").stdout.splitlines()
             if l.startswith("TcpExt:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


FASTOPEN = ("TCPFastOpenActive", "TCPFastOpenPassive")


@pytest.mark.usefixtures("impl")
@pytest.mark.parametrize("fastopen", [True, False], ids=["on", "off"])
def test_reconnect_carries_the_handshake_in_the_syn(wan, running, fastopen):
    """A tunnel client's second connection to a server that gave it a cookie carries its
    first bytes in the SYN (TCPFastOpenActive at the client, TCPFastOpenPassive at the
    server: counted around the second connection only, the first may have found a cookie
    already); with tcp_fastopen = false neither end uses it, although a cookie is cached."""
    from relay.net import sockopt
    saved = dict(sockopt._tcp_tuning)
    try:
        with wan.rtr.enter():
            sockopt.set_tcp_tuning(fastopen)
        port = 8500 + fastopen
        running(cfg("tunnel-server", listen=("::", port), secret="s", allow=ALLOW,
                    allow_host=True), wan.srv)
        for i in range(2):              # the first connection asks for the cookie
            before = (tcp_ext(wan.rtr), tcp_ext(wan.srv))
            client = Running(cfg("forward", listen=(RTR4_CLI, 5500 + i), to=(REMOTE[4], 7),
                                 upstream=_up(f"tunnel://{REMOTE[4]}:{port}"), secret="s"),
                             wan.rtr)
            assert ask(wan.cli, socket.AF_INET, (RTR4_CLI, 5500 + i)) == REMOTE[4]
            client.stop()
            wait_until(lambda: not peers_of(wan.srv, port), 5, what="connection closed")
        after = (tcp_ext(wan.rtr), tcp_ext(wan.srv))
    finally:
        sockopt._tcp_tuning.clear()
        sockopt._tcp_tuning.update(saved)
    got = (after[0]["TCPFastOpenActive"] - before[0]["TCPFastOpenActive"],
           after[1]["TCPFastOpenPassive"] - before[1]["TCPFastOpenPassive"])
    assert got == ((1, 1) if fastopen else (0, 0))


def _up(url):
    from relay.net.addr import parse_upstream
    return parse_upstream(url)


def test_command_line_relay_binds_as_the_unprivileged_user(wan):
    """`relay forward --bind-interface rtr2 --source ...` as a process: its workers run as
    nobody without CAP_NET_RAW on this kernel (5.7 and later: SO_BINDTODEVICE needs none)
    and every association socket they open still leaves through rtr2."""
    from relay.privileges import BINDTODEVICE_FREE, effective_capabilities, kernel_version
    from tests.relayproc import RelayProcess
    if kernel_version() < BINDTODEVICE_FREE:
        pytest.skip("SO_BINDTODEVICE needs CAP_NET_RAW before Linux 5.7")
    with RelayProcess(["forward", "--listen", f"[{RTR6_CLI}]:5600", "--to", f"[{REMOTE[6]}]:7",
                       "--mark", "0", "--bind-interface", "rtr2", "--source", UP2[6]],
                      ns=wan.rtr).wait_ready() as r:
        assert [effective_capabilities(pid) for pid in r.worker_pids()] == [0]
        for _ in range(2):          # two client sockets: two associations opened as nobody
            assert ask(wan.cli, socket.AF_INET6, (RTR6_CLI, 5600)) == UP2[6]


def test_restricted_congestion_control_keeps_cap_net_admin(wan, running):
    """--tcp-congestion NAME that tcp_allowed_congestion_control does not list: the workers
    (nobody) keep CAP_NET_ADMIN, and their tunnel connection, opened after the drop, has it."""
    from relay.net import sockopt
    from relay.privileges import CAP_NET_ADMIN, effective_capabilities
    from tests.relayproc import RelayProcess
    with wan.rtr.enter():
        restricted = [c for c in sockopt.congestion_available()
                      if c not in sockopt.congestion_allowed()]
    if not restricted:
        pytest.skip("every congestion control the kernel has is allowed to anyone")
    cc = restricted[0]
    running(cfg("tunnel-server", listen=(REMOTE[4], 8600), secret="s", allow=ALLOW,
                allow_host=True), wan.srv)
    with RelayProcess(["forward", "--listen", f"{RTR4_CLI}:5700", "--to", f"{REMOTE[4]}:7",
                       "--upstream", f"tunnel://{REMOTE[4]}:8600", "--secret", "s", "--mark",
                       "0", "--tcp-congestion", cc], ns=wan.rtr).wait_ready() as client:
        assert [effective_capabilities(p) for p in client.worker_pids()] == [1 << CAP_NET_ADMIN]
        assert ask(wan.cli, socket.AF_INET, (RTR4_CLI, 5700)) == REMOTE[4]
        info = wan.rtr.run("ss", "-Htni", "state", "established", "( dport = :8600 )").stdout
        assert f" {cc} " in f" {info} ", info
