"""The tunnel server's per-flow sockets: a full table evicts the least recently used flow,
a connection at its share of a full table evicts its own, idle flows expire from the LRU
tail, and no flow socket takes a descriptor of the reserve (docs/tunnel.md "Limits and
timeouts").

Servers run on loopback (a thread of this process, so /proc/self/fd counts their sockets)
with raw tunnel clients; the expiry and descriptor tests drive the core directly."""
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from relay import _select, proto
from relay import stats as _stats
from tests.support import REPO, Echo, cfg, raw_client, read_frames
from tests.namespaces import wait_until

pytest.importorskip("relay.datapath.tunnel")
pytestmark = pytest.mark.usefixtures("impl")     # every test: compiled, then pure

CAP = 8
I = _stats.INDEX.__getitem__


def nfds():
    return len(os.listdir("/proc/self/fd"))


def ask(s, echo, flow, data=None):
    """One datagram on ``flow`` of connection ``s`` and its echo."""
    data = data or b"flow %d" % flow
    s.sendall(proto.encode_frame(*echo.addr, data, flow=flow))
    frames = read_frames(s, 1)
    assert [(f.flow, f.data) for f in frames] == [(flow, data)]


@pytest.fixture(params=["ipv4", "ipv6"])
def host(request):
    return "::1" if request.param == "ipv6" else "127.0.0.1"


@pytest.fixture
def server(running, host):
    return running(cfg("tunnel-server", listen=(host, 0), max_associations=CAP,
                       allow=[host + ("/128" if ":" in host else "/32")]))


@pytest.fixture
def lecho(host):
    e = Echo(host)
    yield e
    e.close()


def test_full_table_evicts_the_least_recently_used_flow(server, lecho):
    """One connection cycling through five times the table's flows does not lock out the
    next connection: the oldest flows are evicted (their sockets closed), never refused."""
    base = nfds()
    a, _ = raw_client(server)
    for flow in range(1, 5 * CAP + 1):
        ask(a, lecho, flow)
    st = server.stats()
    assert st["assoc_evicted"] == 4 * CAP and st["assoc_open"] == CAP
    assert st["drop_table_full"] == 0
    assert nfds() <= base + 2 + CAP           # A's two ends and at most CAP flow sockets
    b, _ = raw_client(server)
    ask(b, lecho, 1, b"the next client")
    st = server.stats()
    assert st["assoc_evicted"] == 4 * CAP + 1 and st["assoc_open"] == CAP
    assert st["drop_table_full"] == 0
    # the evicted flows of A start again as new ones
    ask(a, lecho, 1, b"again")
    a.close()
    b.close()
    wait_until(lambda: server.stats()["assoc_open"] == 0 and server.svc.core.connections == 0,
               5, what="connections and flows closed")
    assert server.svc.core.flows_open == 0
    wait_until(lambda: nfds() == base, 5, what="every flow socket closed")


def test_a_connection_at_its_share_evicts_its_own_flows(server, lecho):
    """With two connections each has half of a full table: A, which filled it, recycles its
    own flows while B's flow stays open however many new flows A opens."""
    a, _ = raw_client(server)
    for flow in range(1, CAP + 1):
        ask(a, lecho, flow)
    b, _ = raw_client(server)
    ask(b, lecho, 7, b"b's flow")             # under its share: A's oldest flow goes
    assert server.stats()["assoc_evicted"] == 1
    for flow in range(100, 100 + 3 * CAP):
        ask(a, lecho, flow)
    st = server.stats()
    assert st["assoc_open"] == CAP and st["assoc_evicted"] == 1 + 3 * CAP
    created = st["assoc_created"]
    ask(b, lecho, 7, b"b's flow again")       # the same flow: no new socket
    assert server.stats()["assoc_created"] == created
    a.close()
    b.close()


def test_a_datagram_queued_for_an_evicted_flow_leaves_from_its_own_socket(running, host,
                                                                           lecho):
    """Table of one flow: two frames in one write, flows 1 then 2. Flow 1's datagram is sent
    before its socket is closed for flow 2 (whose new socket may get the same number): its
    echo, arriving at a closed socket, is lost, and never comes back framed as flow 2."""
    server = running(cfg("tunnel-server", listen=(host, 0), max_associations=1,
                         allow=[host + ("/128" if ":" in host else "/32")]))
    a, _ = raw_client(server)
    a.sendall(proto.encode_frame(*lecho.addr, b"one", flow=1) +
              proto.encode_frame(*lecho.addr, b"two", flow=2))
    frames = read_frames(a, 1)
    assert [(f.flow, f.data) for f in frames] == [(2, b"two")]
    st = server.stats()
    assert st["up_datagrams"] == 2 and st["assoc_evicted"] == 1 and st["drop_send_error"] == 0
    a.close()


def socketpair_conn(core, mux=True):
    ours, theirs = socket.socketpair()
    ours.settimeout(3)
    core.stats[I("conn_open")] += 1     # as the service counts it
    assert core.add_conn(theirs.detach(), mux) >= 0
    return ours


def pump(core, until, what, timeout=5.0):
    """Run the core's loop (this thread) until ``until()``, bounded in time."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        core.poll(20)


def core_ask(core, s, echo, flow):
    s.sendall(proto.encode_frame(*echo.addr, b"x%d" % flow, flow=flow))
    got = []

    def echoed():
        s.setblocking(False)
        try:
            chunk = s.recv(70000)
        except BlockingIOError:
            chunk = b""
        finally:
            s.setblocking(True)
        got.append(chunk)
        frames, _used = proto.parse_frames(b"".join(got), mux=True)
        return any(f.flow == flow for f in frames)
    pump(core, echoed, f"the echo of flow {flow}")


def test_idle_flows_expire_from_the_lru_tail(echo):
    """Flows 1 and 2 unused for the timeout expire, 3 (used again since) and 4 do not; then
    all do. Only flow sockets that expired are closed."""
    base = nfds()
    core = _select.module("tunnel").TunnelServer([], None, max_flows=CAP, timeout=30.0)
    with_core = nfds()
    try:
        s = socketpair_conn(core)
        for flow in (1, 2, 3):
            core_ask(core, s, echo, flow)
        t_old = time.monotonic()
        time.sleep(0.3)
        t_new = time.monotonic()
        for flow in (3, 4):                    # 3 used again, 4 new: both recent
            core_ask(core, s, echo, flow)
        assert core.flows_open == 4
        core.tick(t_old + 30.0 + 0.05)         # 1 and 2 idle > 30 s then, 3 and 4 not
        assert core.flows_open == 2 and core.stats[I("assoc_expired")] == 2
        assert nfds() == with_core + 2 + 2     # the connection's two ends, flows 3 and 4
        core_ask(core, s, echo, 3)             # still open: no new socket
        assert core.stats[I("assoc_created")] == 4
        core.tick(t_new + 60.0 + 1.0)
        assert core.flows_open == 0 and core.stats[I("assoc_expired")] == 4
        s.close()
    finally:
        core.close_all()
        core.close()
    assert nfds() == base


RESERVE_PROBE = textwrap.dedent('''
    import os, resource, socket, sys, time
    sys.path.insert(0, sys.argv[1])
    from relay import _select, proto, stats
    soft = int(sys.argv[2])
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    core = _select.module("tunnel").TunnelServer([], None, max_flows=4 * soft, timeout=30.0)
    ours, theirs = socket.socketpair()
    core.add_conn(theirs.detach(), True)
    st = core.stats
    refused = stats.INDEX["assoc_refused"]
    for flow in range(1, soft + 1):
        ours.sendall(proto.encode_frame("127.0.0.1", 9, b"x", flow=flow))
        t0 = time.monotonic()
        while st[stats.INDEX["assoc_created"]] + st[refused] < flow and time.monotonic() - t0 < 3:
            core.poll(20)
    ours.close()                   # a descriptor to list the others with, if none was left
    fds = [int(f) for f in os.listdir("/proc/self/fd")]
    print(core.flows_open, st[refused], max(fds))
''')


def test_flow_sockets_leave_the_descriptor_reserve_free():
    """Under a soft limit of 96 descriptors, no flow socket takes one of the top 32: the
    flows past that are refused (assoc_refused), the process keeps its reserve."""
    soft = 96
    out = subprocess.run([sys.executable, "-c", RESERVE_PROBE, REPO, str(soft)],
                         capture_output=True, text=True, timeout=60, env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    flows, refused, top = map(int, out.stdout.split())
    assert refused == soft - flows and flows > 0
    assert top < soft - 32
