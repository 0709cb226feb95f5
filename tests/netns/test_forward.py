"""`relay forward` end to end, plus the control plane: timeouts, the cap, workers, stats."""
import os
import signal
import socket
import urllib.request

import pytest

from tests.namespaces import (
    RTR4_ALL, RTR4_CLI, RTR4_MORE, RTR6_ALL, RTR6_CLI, RTR6_MORE, SRV4, SRV6, check_moving_client,
    check_reply_sources, check_runs_alternate, start_echo, wait_until,
)
from tests.relayproc import RelayProcess, udp_roundtrip

pytestmark = pytest.mark.netns


@pytest.fixture
def echo(topo):
    start_echo(topo.srv, f"{SRV4}:5000", f"[{SRV6}]:5000")
    return topo


def start_forward(topo, to, *extra, workers=1, port=6000, host="[::]"):
    return RelayProcess(["forward", "--listen", f"{host}:{port}", "--to", to, *extra],
                        ns=topo.rtr, workers=workers).wait_ready()


@pytest.mark.parametrize("client_fam,target", [
    (socket.AF_INET, f"{SRV4}:5000"), (socket.AF_INET6, f"[{SRV6}]:5000"),
    (socket.AF_INET6, f"{SRV4}:5000"), (socket.AF_INET, f"[{SRV6}]:5000"),
])
def test_echo_every_size_returns_from_the_listen_address(echo, client_fam, target):
    listen = (RTR4_CLI if client_fam == socket.AF_INET else RTR6_CLI, 6000)
    with start_forward(echo, target) as relay:
        c = echo.cli.socket(client_fam)
        # the largest datagram both families can carry (IPv6 carries 65527 bytes, IPv4 65507)
        v6_only = client_fam == socket.AF_INET6 and target.startswith("[")
        sizes = (0, 1, 1472, 3000, 65527 if v6_only else 65507)
        for size in sizes:
            payload = os.urandom(size)
            data, src = udp_roundtrip(c, listen, payload)
            assert data == payload, f"size {size}"
            assert src == listen
        relay.settled_stats(lambda st: st["up_datagrams"] == len(sizes) == st["down_datagrams"]
                            and st["up_bytes"] == sum(sizes) == st["down_bytes"]
                            and st["assoc_created"] == 1)


def test_each_client_gets_its_own_association(echo):
    with start_forward(echo, f"{SRV4}:5000") as relay:
        clients = [echo.cli.socket(socket.AF_INET) for _ in range(30)]
        for rnd in range(3):
            for i, c in enumerate(clients):
                msg = b"%d:%d" % (i, rnd)
                assert udp_roundtrip(c, (RTR4_CLI, 6000), msg)[0] == msg
        relay.settled_stats(lambda st: st["assoc_created"] == 30 and st["assoc_open"] == 30
                            and st["up_datagrams"] == 90 == st["down_datagrams"])


def test_idle_timeout_frees_associations(echo):
    with start_forward(echo, f"{SRV4}:5000", "--timeout", "0.5") as relay:
        for _ in range(5):
            udp_roundtrip(echo.cli.socket(socket.AF_INET), (RTR4_CLI, 6000), b"x")
        assert relay.stats()["assoc_open"] == 5
        wait_until(lambda: relay.stats()["assoc_open"] == 0, 10, what="idle associations to expire")
        assert relay.stats()["assoc_expired"] == 5


def test_traffic_refreshes_the_idle_timer(echo):
    import time
    with start_forward(echo, f"{SRV4}:5000", "--timeout", "1.0") as relay:
        c = echo.cli.socket(socket.AF_INET)
        end = time.monotonic() + 2.5
        while time.monotonic() < end:
            udp_roundtrip(c, (RTR4_CLI, 6000), b"keep")
            time.sleep(0.2)
        st = relay.stats()
        assert st["assoc_created"] == 1 and st["assoc_expired"] == 0


def test_cap_evicts_the_least_recently_used(echo):
    with start_forward(echo, f"{SRV4}:5000", "--max-associations", "3") as relay:
        c = [echo.cli.socket(socket.AF_INET) for _ in range(4)]

        def hit(i):
            assert udp_roundtrip(c[i], (RTR4_CLI, 6000), b"%d" % i)[0] == b"%d" % i

        for i in (0, 1, 2, 3):          # 3 arrives at the cap: 0 (least recent) is evicted
            hit(i)
        for i in (3, 1, 2):             # all still there: nothing created
            hit(i)
        st = relay.stats()
        assert (st["assoc_created"], st["assoc_evicted"], st["assoc_open"]) == (4, 1, 3)
        hit(0)                          # back: evicts 3, now the least recently used
        st = relay.stats()
        assert (st["assoc_created"], st["assoc_evicted"]) == (5, 2)
        hit(1)
        hit(2)
        assert relay.stats()["assoc_created"] == 5
        hit(3)
        assert relay.stats()["assoc_created"] == 6


def test_killed_worker_is_replaced_and_traffic_continues(echo):
    with start_forward(echo, f"{SRV4}:5000", workers=2) as relay:
        pids = relay.worker_pids()
        assert len(pids) == 2
        clients = [echo.cli.socket(socket.AF_INET) for _ in range(10)]
        for c in clients:
            udp_roundtrip(c, (RTR4_CLI, 6000), b"before")
        before = relay.stats()["up_datagrams"]
        os.kill(pids[0], signal.SIGKILL)
        wait_until(lambda: len(relay.worker_pids()) == 2 and relay.worker_pids() != pids, 5,
                   what="a replacement worker")
        for c in clients:
            assert udp_roundtrip(c, (RTR4_CLI, 6000), b"after")[0] == b"after"
        # the dead worker's counts are kept
        relay.settled_stats(lambda st: st["up_datagrams"] == before + 10)
        assert "killed by signal SIGKILL" in relay.log()


def test_too_big_for_the_upstream_family_is_counted(echo):
    with start_forward(echo, f"{SRV4}:5000") as relay:
        c = echo.cli.socket(socket.AF_INET6)
        c.sendto(b"z" * 65527, (RTR6_CLI, 6000))   # fits IPv6, not IPv4
        assert udp_roundtrip(c, (RTR6_CLI, 6000), b"small")[0] == b"small"
        assert relay.stats()["drop_too_big"] == 1


@pytest.mark.serial            # each answer within 0.3 s, or it is counted as refused
def test_descriptor_shortage_refuses_new_flows_and_keeps_old_ones(echo):
    """With a tiny RLIMIT_NOFILE, new flows beyond what fits are refused and counted;
    established flows keep working and nothing crashes."""
    relay = RelayProcess(["forward", "--listen", "[::]:6000", "--to", f"{SRV4}:5000"],
                         ns=echo.rtr, prefix=("prlimit", "--nofile=64:64", "--"))
    with relay:
        relay.wait_ready()
        clients = [echo.cli.socket(socket.AF_INET) for _ in range(60)]
        answered = []
        for c in clients:
            c.settimeout(0.3)
            c.sendto(b"hi", (RTR4_CLI, 6000))
            try:
                answered.append(c.recvfrom(10)[0] == b"hi")
            except socket.timeout:
                answered.append(False)
        st = relay.stats()
        assert 0 < st["assoc_open"] < 60
        assert st["assoc_refused"] == answered.count(False) > 0
        assert answered[:st["assoc_open"]] == [True] * st["assoc_open"]
        for c in clients[:st["assoc_open"]]:            # the established ones still work
            assert udp_roundtrip(c, (RTR4_CLI, 6000), b"again")[0] == b"again"
        assert relay.proc.poll() is None


def test_pin_puts_worker_i_on_cpu_i(echo):
    import psutil
    cpus = sorted(psutil.Process().cpu_affinity())
    if len(cpus) < 2:
        pytest.skip("needs at least 2 CPUs to tell pinned workers apart")
    with start_forward(echo, f"{SRV4}:5000", "--pin", workers=2) as relay:
        affinities = sorted(tuple(psutil.Process(p).cpu_affinity()) for p in relay.worker_pids())
        assert affinities == [(cpus[0],), (cpus[1],)]


def test_unreachable_upstream_is_counted_not_fatal(echo):
    # Nothing listens on port 5999 of the server: ICMP port unreachable comes back. (An
    # error that lands in the middle of a sendmmsg batch is dropped by the kernel, which
    # sends the rest anyway; spaced datagrams let the errors arrive between batches.)
    import time
    with start_forward(echo, f"{SRV4}:5999") as relay:
        c = echo.cli.socket(socket.AF_INET)
        deadline = time.monotonic() + 10
        sent = 0
        while relay.stats()["icmp_errors"] == 0 and time.monotonic() < deadline and sent < 200:
            c.sendto(b"x", (RTR4_CLI, 6000))
            sent += 1
            time.sleep(0.05)
        assert relay.stats()["icmp_errors"] > 0
        assert relay.proc.poll() is None
        relay.settled_stats(lambda st: st["up_datagrams"] + st["drop_send_error"] == sent)


def test_metrics_endpoint_serves_prometheus_text(echo):
    with start_forward(echo, f"{SRV4}:5000", "--metrics", "127.0.0.1:9464") as relay:
        udp_roundtrip(echo.cli.socket(socket.AF_INET), (RTR4_CLI, 6000), b"m")
        relay.settled_stats(lambda st: st["down_datagrams"] == 1)
        with echo.rtr.enter():
            body = urllib.request.urlopen("http://127.0.0.1:9464/metrics", timeout=5).read().decode()
        assert '# TYPE relay_up_datagrams_total counter' in body
        assert 'relay_up_datagrams_total{listener="forward"} 1' in body
        assert 'relay_assoc_open{listener="forward"} 1' in body


def test_workers_run_as_nobody_with_only_the_needed_capabilities(echo):
    import pwd

    import psutil

    from relay.privileges import CAP_NET_ADMIN, effective_capabilities
    nobody = pwd.getpwnam("nobody")
    with start_forward(echo, f"{SRV4}:5000", workers=2) as relay:
        for pid in relay.worker_pids():
            assert psutil.Process(pid).uids().effective == nobody.pw_uid
            # forward marks its upstream sockets (SO_MARK): CAP_NET_ADMIN and nothing else
            assert effective_capabilities(pid) == 1 << CAP_NET_ADMIN
        # new flows still get upstream sockets with SO_MARK (CAP_NET_ADMIN kept)
        for _ in range(5):
            assert udp_roundtrip(echo.cli.socket(socket.AF_INET), (RTR4_CLI, 6000), b"p")[0] == b"p"
        # the supervisor stays root to restart workers
        assert psutil.Process(relay._main_pid()).uids().effective == 0


def test_user_root_keeps_root(echo):
    import psutil
    with start_forward(echo, f"{SRV4}:5000", "--user", "root") as relay:
        assert psutil.Process(relay.worker_pids()[0]).uids().effective == 0


@pytest.mark.parametrize("offload", ["off", "on", None])
def test_bulk_path_gso_in_gro_through(echo, offload):
    """A client sends 40 datagrams as one UDP_SEGMENT send; with offload (on, or auto: the
    default) the relay takes them coalesced and passes them on as one GSO send, with
    --offload off one by one. Either way 40 datagrams arrive, in order."""
    from relay import BatchSocket
    extra = ["--offload", offload] if offload else []
    with start_forward(echo, f"{SRV4}:5000", *extra) as relay:
        c = echo.cli.socket(socket.AF_INET)
        c.connect((RTR4_CLI, 6000))
        c.settimeout(3)
        payloads = [bytes([i]) * 1000 for i in range(40)]
        with BatchSocket(c.fileno(), batch=64) as b:
            assert b.send_gso(b"".join(payloads), 1000) == 40
        got = [c.recv(65535) for _ in range(40)]
        assert got == payloads
        relay.settled_stats(lambda st: st["up_datagrams"] == 40 == st["down_datagrams"])


@pytest.mark.parametrize("upstream", ["tunnel", "socks5"])
def test_gro_through_an_upstream_core_keeps_datagrams_apart(topo, upstream):
    """With offload a coalesced receive holds many datagrams; a tunnel or SOCKS5 upstream
    must carry them as the datagrams they were (one frame each), never as one."""
    from relay import BatchSocket
    from tests.support import upstream_in_srv
    extra = upstream_in_srv(topo, upstream)
    with start_forward(topo, f"{SRV4}:5000", "--offload", "on", *extra) as relay:
        c = topo.cli.socket(socket.AF_INET)
        c.connect((RTR4_CLI, 6000))
        c.settimeout(3)
        assert udp_roundtrip(c, (RTR4_CLI, 6000), b"warm")[0] == b"warm"
        payloads = [bytes([i]) * 700 for i in range(30)] + [b"tail"]
        with BatchSocket(c.fileno(), batch=64) as b:
            assert b.send_gso(b"".join(payloads), 700) == 31
        got = sorted(c.recv(65535) for _ in range(31))
        assert got == sorted(payloads)
        relay.settled_stats(lambda st: st["up_datagrams"] == 32 == st["down_datagrams"]
                            and st["up_bytes"] == 4 + sum(map(len, payloads)))


@pytest.mark.parametrize("size", [64, 1400, 3000])
def test_runs_of_equal_datagrams_arrive_intact_and_in_order(echo, size):
    """A burst of equal-size datagrams, sent one by one from one client, leaves the relay as
    one GSO send (3000-byte segments exceed the 1500-byte MTU towards the server: the
    kernel refuses that, and they go one by one, counted in offload_fallback when the
    relay had read them as one run; tests/netns/test_sendq.py counts that exactly). All
    arrive, in order, counted once; sizes the route takes are never refused."""
    from relay import BatchSocket
    with start_forward(echo, f"{SRV4}:5000") as relay:
        c = echo.cli.socket(socket.AF_INET)
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        c.connect((RTR4_CLI, 6000))
        c.settimeout(3)
        assert udp_roundtrip(c, (RTR4_CLI, 6000), b"warm")[0] == b"warm"
        got, sent = [], []
        for burst in range(3):
            payloads = [bytes([burst, i]) * (size // 2) for i in range(16)] + [b"short"]
            sent += payloads
            with BatchSocket(c.fileno(), batch=64) as b:
                assert b.send(payloads) == len(payloads)
            got += [c.recv(65535) for _ in payloads]
        assert got == sent
        relay.settled_stats(lambda st: st["up_datagrams"] == len(sent) + 1 == st["down_datagrams"]
                            and st["up_bytes"] == 4 + sum(map(len, sent))
                            and st["drop_send_error"] == 0 and st["drop_too_big"] == 0
                            and (size > 1500 or st["offload_fallback"] == 0))


def test_runs_of_replies_to_two_clients_stay_apart(echo):
    """Two clients send bursts of equal-size datagrams at once: their replies reach the
    relay back to back, and each run goes to its own client only (replies to one client
    are coalesced into GSO sends; a run never crosses to the other client)."""
    from relay import BatchSocket
    with start_forward(echo, f"{SRV4}:5000") as relay:
        a, b = (echo.cli.socket(socket.AF_INET) for _ in range(2))
        for c in (a, b):
            c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
            c.connect((RTR4_CLI, 6000))
            c.settimeout(3)
            assert udp_roundtrip(c, (RTR4_CLI, 6000), b"warm")[0] == b"warm"
        for rnd in range(5):
            burst = {c: [b"%s%d-%02d" % (name, rnd, i) + bytes(500) for i in range(12)]
                     for c, name in ((a, b"A"), (b, b"B"))}
            for c in (a, b):
                with BatchSocket(c.fileno(), batch=64) as bs:
                    assert bs.send(burst[c]) == 12
            for c in (a, b):
                assert [c.recv(65535) for _ in range(12)] == burst[c]
        relay.settled_stats(lambda st: st["down_datagrams"] == st["up_datagrams"] == 122)


@pytest.mark.parametrize("host,extra", [("[::]", ("--offload", "off")), ("[::]", ()),
                                        ("0.0.0.0", ())],
                         ids=["dual-stack-no-offload", "dual-stack", "ipv4"])
def test_wildcard_listener_replies_from_the_address_asked(echo, host, extra):
    """A router with three addresses of each family on its client side, the listener on
    the wildcard: whichever address a client asks, the reply comes from that address (the
    route towards the client would pick the first one), for single replies, for a client
    that moves between addresses, and for runs of replies leaving as GSO messages."""
    echo.add_router_addresses()
    v6 = host == "[::]"
    with start_forward(echo, f"{SRV4}:5000", *extra, host=host) as relay:
        check_reply_sources(echo.cli, 6000, RTR4_ALL + (RTR6_ALL if v6 else ()))
        check_moving_client(echo.cli, 6000, RTR4_ALL)
        sent = len(RTR4_ALL) * (1 + 2) + check_runs_alternate(echo.cli, 6000, RTR4_MORE)
        # runs of 1400-byte replies: a 1280-byte MTU on the client side refuses them as GSO
        # (the server side takes them), so they leave one by one, each from its address
        for ns, dev in ((echo.rtr, "rtr0"), (echo.cli, "cli0")):
            ns.run("ip", "link", "set", dev, "mtu", "1280")
        sent += check_runs_alternate(echo.cli, 6000, RTR4_MORE, size=1400, bursts=4)
        if v6:
            check_moving_client(echo.cli, 6000, RTR6_ALL)
            sent += len(RTR6_ALL) * (1 + 2) + check_runs_alternate(echo.cli, 6000, RTR6_MORE)
        relay.settled_stats(lambda st: st["up_datagrams"] == sent == st["down_datagrams"]
                            and st["drop_no_route"] == st["drop_send_error"] == 0)


def test_listener_on_one_address_is_unchanged(echo):
    """A listener bound to one address answers from it without packet info."""
    echo.add_router_addresses()
    with start_forward(echo, f"{SRV4}:5000", host=RTR4_MORE[0]) as relay:
        check_reply_sources(echo.cli, 6000, RTR4_MORE[:1])
        check_runs_alternate(echo.cli, 6000, RTR4_MORE[:1] * 2, bursts=2)
        relay.settled_stats(lambda st: st["down_datagrams"] == 25)


def test_dig_through_a_wildcard_listener(topo):
    """The product check: dig (which ignores answers from another source) against dnsmasq
    in srv, through `relay forward --listen [::]:5353`, asking every router address."""
    import shutil
    import subprocess
    if not (shutil.which("dig") and shutil.which("dnsmasq")):
        pytest.skip("needs dig (bind9-dnsutils) and dnsmasq (dnsmasq-base)")
    topo.add_router_addresses()
    topo.srv.popen(["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
                    "--no-hosts", "--bind-interfaces", f"--listen-address={SRV4}",
                    "--port=53", "--user=root", "--pid-file=",
                    "--address=/relay.test/198.51.100.53"])
    with start_forward(topo, f"{SRV4}:53", port=5353) as relay:
        wait_until(lambda: topo.cli.run("dig", f"@{RTR4_CLI}", "-p", "5353", "+short",
                                        "+tries=1", "+timeout=1", "relay.test", check=False)
                   .stdout.strip() == "198.51.100.53", 10, what="dnsmasq through the relay")
        for server in RTR4_ALL + RTR6_ALL:
            r = topo.cli.run("dig", f"@{server}", "-p", "5353", "+short", "+tries=1",
                             "+timeout=2", "relay.test", check=False)
            assert (r.returncode, r.stdout.strip()) == (0, "198.51.100.53"), \
                f"dig @{server}: {r.stdout} {r.stderr}"
        assert relay.stats()["drop_no_route"] == 0
