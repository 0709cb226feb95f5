"""`relay redir` end to end: TPROXY rules from `relay rules apply`, client -- router -- server."""
import socket
import subprocess
import sys

import pytest

from tests.namespaces import CLI4, CLI6, SRV4, SRV4_B, SRV6, SRV6_B, start_echo, wait_until
from tests.relayproc import RelayProcess, relay_env, udp_roundtrip

pytestmark = pytest.mark.netns

PORT = 7000
FAMILIES = {4: (socket.AF_INET, SRV4, SRV4_B), 6: (socket.AF_INET6, SRV6, SRV6_B)}

# Answers every datagram from its own socket, then a second time from another address and
# port (a different remote replying to the same association: full cone).
CONE_SERVER = r"""
import selectors, socket, sys
pairs = []
for spec in sys.argv[1:]:
    a, b = spec.split(",")
    ha, pa = a.rsplit(":", 1); hb, pb = b.rsplit(":", 1)
    fam = socket.AF_INET6 if ":" in ha else socket.AF_INET
    sa = socket.socket(fam, socket.SOCK_DGRAM); sa.bind((ha.strip("[]"), int(pa)))
    sb = socket.socket(fam, socket.SOCK_DGRAM); sb.bind((hb.strip("[]"), int(pb)))
    pairs.append((sa, sb))
sel = selectors.DefaultSelector()
for sa, sb in pairs:
    sel.register(sa, selectors.EVENT_READ, sb)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        data, peer = key.fileobj.recvfrom(65535)
        key.fileobj.sendto(data, peer)
        key.data.sendto(b"cone:" + data, peer)
"""


def rules(topo, action):
    return subprocess.run(
        ["ip", "netns", "exec", topo.rtr.name, sys.executable, "-m", "relay", "rules", action,
         "--port", str(PORT), "--iface", "rtr0"],
        capture_output=True, text=True, env=relay_env(), timeout=30)


def snapshot(topo):
    """Ruleset, policy rules and routes of the router. Routes the kernel adds by itself
    (proto kernel: link-local ones appear a moment after a link comes up) are left out."""
    out = []
    for cmd in (["nft", "list", "ruleset"], ["ip", "rule"], ["ip", "-6", "rule"],
                ["ip", "route", "show", "table", "all"], ["ip", "-6", "route", "show", "table", "all"]):
        text = topo.rtr.run(*cmd).stdout
        out.append("\n".join(l for l in text.splitlines() if "proto kernel" not in l))
    return out


@pytest.fixture
def router(topo):
    r = rules(topo, "apply")
    assert r.returncode == 0, r.stderr
    yield topo


def start_redir(topo, reply, *extra, workers=1):
    return RelayProcess(["redir", "--listen", f"[::]:{PORT}", "--reply", reply, *extra],
                        ns=topo.rtr, workers=workers).wait_ready()


@pytest.mark.parametrize("reply", ["raw", "transparent"])
@pytest.mark.parametrize("fam", [4, 6])
def test_echo_every_size_from_the_servers_own_address(router, fam, reply):
    topo = router
    family, srv, _ = FAMILIES[fam]
    start_echo(topo.srv, f"{SRV4}:5000", f"[{SRV6}]:5000")
    with start_redir(topo, reply) as relay:
        c = topo.cli.socket(family)
        for size in (0, 1, 1472, 3000):
            payload = bytes((i * 7 + size) & 0xff for i in range(size))
            data, src = udp_roundtrip(c, (srv, 5000), payload)
            assert data == payload, f"size {size}"
            assert src == (srv, 5000), f"size {size}: reply came from {src}"
        st = relay.settled_stats(lambda st: st["up_datagrams"] == 4 == st["down_datagrams"])
        assert st["assoc_created"] == 1
        if reply == "raw":
            # replies whose packet exceeds the 1500-byte MTU (3000 bytes; 1472 over IPv6,
            # 48 bytes of headers) went out as fragments written by relay
            assert (st["reply_fragmented"], st["reply_fallback"]) == (1 if fam == 4 else 2, 0)
        assert relay.proc.poll() is None


@pytest.mark.parametrize("reply", ["raw", "transparent"])
@pytest.mark.parametrize("fam", [4, 6])
def test_full_cone_second_remote_is_delivered_as_itself(router, fam, reply):
    topo = router
    family, srv, srv_b = FAMILIES[fam]
    fmt = (lambda h, p: f"[{h}]:{p}") if fam == 6 else (lambda h, p: f"{h}:{p}")
    p = topo.srv.python(CONE_SERVER, f"{fmt(srv, 5000)},{fmt(srv_b, 5001)}", text=True)
    assert p.stdout.readline().strip() == "ready"
    with start_redir(topo, reply):
        c = topo.cli.socket(family)
        c.settimeout(3)
        c.sendto(b"ping", (srv, 5000))
        got = {c.recvfrom(100)[0:2][1][:2]: None for _ in range(2)}
        assert set(got) == {(srv, 5000), (srv_b, 5001)}


def test_both_families_share_one_listener_and_count_flows(router):
    topo = router
    start_echo(topo.srv, f"{SRV4}:5000", f"[{SRV6}]:5000")
    with start_redir(topo, "raw") as relay:
        c4 = topo.cli.socket(socket.AF_INET)
        c6 = topo.cli.socket(socket.AF_INET6)
        for i in range(20):
            assert udp_roundtrip(c4, (SRV4, 5000), b"v4-%d" % i)[0] == b"v4-%d" % i
            assert udp_roundtrip(c6, (SRV6, 5000), b"v6-%d" % i)[0] == b"v6-%d" % i
        st = relay.settled_stats(lambda st: st["up_datagrams"] == 40 == st["down_datagrams"])
        assert st["assoc_created"] == 2 and st["assoc_open"] == 2
        assert st["drop_send_error"] == 0 and st["drop_no_route"] == 0


def test_raw_replies_open_no_descriptor_per_remote(router):
    """Replies from 40 different remote ports: the raw path opens no socket per remote."""
    import psutil
    topo = router
    specs = [f"{SRV4}:{5100 + i}" for i in range(40)]
    start_echo(topo.srv, *specs)
    with start_redir(topo, "raw") as relay:
        c = topo.cli.socket(socket.AF_INET)
        udp_roundtrip(c, (SRV4, 5100), b"warm")
        worker = psutil.Process(relay.worker_pids()[0])
        before = worker.num_fds()
        for i in range(40):
            data, src = udp_roundtrip(c, (SRV4, 5100 + i), b"x")
            assert src == (SRV4, 5100 + i)
        assert worker.num_fds() == before
        assert relay.stats()["transparent_open"] == 0


def test_rules_remove_leaves_no_trace(topo):
    before = snapshot(topo)
    r = rules(topo, "apply")
    assert r.returncode == 0, r.stderr
    applied = snapshot(topo)
    assert applied != before
    assert "tproxy" in applied[0]
    r = rules(topo, "remove")
    assert r.returncode == 0, r.stderr
    assert snapshot(topo) == before


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("size", [200, 3000])
def test_bursts_to_interleaved_destinations_stay_apart(router, fam, size):
    """One client, two servers, datagrams of one size alternating between them and in
    runs: runs to one destination leave the router as one GSO send (3000-byte segments
    exceed the 1500-byte MTU, so the kernel refuses those and they go one by one), and
    no datagram ever reaches the other destination. Every reply comes back from the
    server it went to, and the counters balance."""
    from relay import BatchSocket
    topo = router
    family, srv, srv_b = FAMILIES[fam]
    fmt = (lambda h: f"[{h}]") if fam == 6 else (lambda h: h)
    start_echo(topo.srv, f"{fmt(srv)}:5000", f"{fmt(srv_b)}:5000")
    with start_redir(topo, "raw") as relay:
        c = topo.cli.socket(family)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        c.settimeout(3)
        assert udp_roundtrip(c, (srv, 5000), b"warm")[0] == b"warm"
        items = []
        for burst in range(4):
            for k in range(6):                       # a run of 6 to one, then 1 to the other
                items.append((b"A%02d%02d" % (burst, k) + bytes(size - 5), (srv, 5000)))
            items.append((b"B%02d00" % burst + bytes(size - 5), (srv_b, 5000)))
        got = []
        for start in range(0, len(items), 7):        # one sendmmsg per burst
            chunk = items[start:start + 7]
            with BatchSocket(c.fileno(), batch=64) as b:
                assert b.send(chunk) == len(chunk)
            for _ in chunk:
                data, src = c.recvfrom(65535)
                got.append((data, src[:2]))
        assert sorted(got) == sorted(items)          # each came back from where it went
        relay.settled_stats(lambda st: st["up_datagrams"] == len(items) + 1
                            and st["up_bytes"] == 4 + sum(len(p) for p, _ in items)
                            and st["drop_send_error"] == 0 and st["drop_too_big"] == 0)


@pytest.mark.parametrize("reply", ["raw", "transparent"])
@pytest.mark.parametrize("fam", [4, 6])
def test_replies_from_a_low_port_reach_the_client_as_the_default_user(router, fam, reply):
    """A DNS server answers from port 53: a transparent reply socket must bind the remote's
    port below 1024, which the workers (nobody) may only with CAP_NET_BIND_SERVICE. The
    answers over the MTU (EDNS: 2,020 bytes) take the same way out of the raw mode."""
    import psutil
    topo = router
    family, srv, _ = FAMILIES[fam]
    start_echo(topo.srv, f"{SRV4}:53", f"[{SRV6}]:53")
    with start_redir(topo, reply) as relay:
        for pid in relay.worker_pids():
            assert psutil.Process(pid).uids().effective != 0
        c = topo.cli.socket(family)
        for size in (40, 512, 1232, 2020, 4096):
            payload = bytes((i * 3 + size) & 0xff for i in range(size))
            data, src = udp_roundtrip(c, (srv, 53), payload)
            assert data == payload and src == (srv, 53)
        st = relay.settled_stats(lambda s: s["down_datagrams"] == 5)
        assert st["up_datagrams"] == 5
        assert {k: v for k, v in st.items() if k.startswith("drop_") and v} == {}


@pytest.mark.parametrize("fam", [4, 6])
def test_associations_expire_by_their_destination_port(router, fam):
    """--timeout-port: the association whose first datagram went to the short port closes
    after its 0.5 s; the one to another port keeps --timeout (60 s)."""
    topo = router
    family, srv, _ = FAMILIES[fam]
    start_echo(topo.srv, f"{SRV4}:5000", f"[{SRV6}]:5000", f"{SRV4}:5001", f"[{SRV6}]:5001")
    with start_redir(topo, "raw", "--timeout", "60", "--timeout-port", "5001=0.5") as relay:
        short, other = topo.cli.socket(family), topo.cli.socket(family)
        assert udp_roundtrip(short, (srv, 5001), b"dns-like")[0] == b"dns-like"
        assert udp_roundtrip(other, (srv, 5000), b"game-like")[0] == b"game-like"
        st = relay.settled_stats(lambda st: st["assoc_expired"] == 1, timeout=10)
        assert st["assoc_open"] == 1
        # the long one is the one left: its next datagram needs no new association
        assert udp_roundtrip(other, (srv, 5000), b"again")[0] == b"again"
        assert relay.stats()["assoc_created"] == 2
