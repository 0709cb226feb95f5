"""Reconnect-to-first-reply time through a relay tunnel, with and without TCP Fast Open.

    python bench/tfo.py [--rounds N] [--delay-ms MS] [--json OUT]

In namespaces (bench/topo.py: gen -- mid -- sink; gen is not used): a relay tunnel-server
(--tcp-fastopen on) and a UDP echo in sink, reached from mid over a link that delays
every packet from mid to sink by --delay-ms (default 20), so every round trip over the
tunnel's TCP connection costs that much more. The kernel here has no netem qdisc
(CONFIG_NET_SCH_NETEM is not set), so the link is a delay line of its own: a TUN device
in each namespace and a small process that moves the packets between them, those towards
sink held back for the delay (with netem: `tc qdisc add dev mid1 root netem delay 20ms`
on the veth instead, the same thing). In mid, each round makes a new tunnel client core (TunnelUpstream, the one
forward --upstream tunnel:// and tunnel-client use) and times one datagram from the send
to its echo: a new TCP connection, the handshake and the datagram's own round trip. Rounds
alternate Fast Open on and off (net.ipv4.tcp_fastopen = 3 in both namespaces); the first
one only fetches the server's cookie and is not counted. Reported: the median and the
spread of each, the round trips saved, and the kernel's TCPFastOpenActive count (a SYN
that carried data) as the proof Fast Open was used.
"""
import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

SECRET = "bench"
PORT = 8443
ECHO_PORT = 7
CLIENT = ("192.0.2.2", 40000)
DEADLINE = 5.0              # one round at most

ECHO = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    d, a = s.recvfrom(65535)
    s.sendto(d, a)
"""


# mid dly0 203.0.113.1/30 -- sink dly1 203.0.113.2/30: two TUN devices, one process
# between them (it creates each in its namespace: a TUN device lives where TUNSETIFF ran).
MID_DLY, SINK_DLY = "203.0.113.1", "203.0.113.2"
DELAY_LINE = r"""
import fcntl, heapq, os, select, struct, sys, time
delay = float(sys.argv[1]) / 1000
libc = __import__("ctypes").CDLL(None, use_errno=True)
home = os.open("/proc/self/ns/net", os.O_RDONLY)
fds = []
for ns, dev in ((sys.argv[2], "dly0"), (sys.argv[3], "dly1")):
    target = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    assert libc.setns(target, 0x40000000) == 0
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, 0x400454ca, struct.pack("16sH", dev.encode(), 0x0001 | 0x1000))  # TUN, NO_PI
    fds.append(fd)
    assert libc.setns(home, 0x40000000) == 0
mid, sink = fds
print("ready", flush=True)
held = []                               # (due, seq, packet) for sink
seq = 0


def put(fd, pkt):
    try:
        os.write(fd, pkt)
    except OSError:                     # the other end not up yet: the packet is lost
        pass


while True:
    wait = max(0.0, held[0][0] - time.monotonic()) if held else 1.0
    for fd in select.select(fds, [], [], wait)[0]:
        pkt = os.read(fd, 65536)
        if fd == mid:
            seq += 1
            heapq.heappush(held, (time.monotonic() + delay, seq, pkt))
        else:
            put(mid, pkt)
    now = time.monotonic()
    while held and held[0][0] <= now:
        put(sink, heapq.heappop(held)[2])
"""


def tcp_ext(path="/proc/net/netstat"):
    with open(path) as f:
        lines = [l.split() for l in f if l.startswith("TcpExt:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:])))


def one_round(server, fastopen):
    """Seconds from sending a datagram through a new tunnel connection to its echo."""
    from relay import _select
    from relay.net import sockopt
    sockopt.set_tcp_tuning(fastopen)
    t = _select.module("tunnel")
    up = t.TunnelUpstream(server, secret=SECRET, timeout=10.0)
    got = []
    up.collect_replies(got)
    dst = (server[0], ECHO_PORT)
    try:
        t0 = time.monotonic()
        up.send(CLIENT, dst, b"ping")
        while not got:
            up.tick()
            up.flush()
            select.select([up.fileno()], [], [], 0.001)
            up.process()
            if time.monotonic() - t0 > DEADLINE:
                raise RuntimeError("no echo through the tunnel")
        return time.monotonic() - t0
    finally:
        up.close()


def inner(args):
    """In mid: the rounds; prints JSON."""
    server = (args.server, PORT)
    one_round(server, True)                 # fetches the cookie
    before = tcp_ext()
    times = {"on": [], "off": []}
    for i in range(args.rounds):
        for mode in (("on", "off") if i % 2 == 0 else ("off", "on")):
            times[mode].append(one_round(server, mode == "on"))
    after = tcp_ext()
    print(json.dumps({"times": times, "fastopen_active": after["TCPFastOpenActive"] -
                      before["TCPFastOpenActive"]}))


def outer(args):
    from bench.topo import BenchTopo, unavailable_reason
    why = unavailable_reason()
    if why:
        sys.exit(f"bench/tfo.py: {why}")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = []
    with BenchTopo() as topo:
        try:
            for ns in (topo.mid, topo.sink):
                ns.run("sysctl", "-qw", "net.ipv4.tcp_fastopen=3")
            line = subprocess.Popen([sys.executable, "-c", DELAY_LINE, str(args.delay_ms),
                                     topo.mid.name, topo.sink.name], stdout=subprocess.PIPE,
                                    text=True, start_new_session=True)
            procs.append(line)
            assert line.stdout.readline().strip() == "ready"
            for ns, dev, addr in ((topo.mid, "dly0", MID_DLY), (topo.sink, "dly1", SINK_DLY)):
                ns.run("ip", "addr", "add", f"{addr}/30", "dev", dev)
                ns.run("ip", "link", "set", dev, "up")
            echo = topo.sink.popen([sys.executable, "-c", ECHO, SINK_DLY, ECHO_PORT],
                                   stdout=subprocess.PIPE, text=True)
            procs.append(echo)
            assert echo.stdout.readline().strip() == "ready"
            srv = topo.sink.popen([sys.executable, "-m", "relay", "tunnel-server", "--listen",
                                   f"{SINK_DLY}:{PORT}", "--secret", SECRET, "--allow",
                                   f"{SINK_DLY}/32", "--workers", "1", "--control", "",
                                   "--tcp-fastopen", "on", "--log-level", "error"], env=env)
            procs.append(srv)
            _wait_tcp(topo.mid, SINK_DLY, PORT)
            r = subprocess.run(topo.mid.command([sys.executable, os.path.abspath(__file__),
                                                 "--inner", "--server", SINK_DLY,
                                                 "--rounds", args.rounds]),
                               capture_output=True, text=True, env=env, timeout=120)
            if r.returncode != 0:
                sys.exit(f"bench/tfo.py: the rounds failed:\n{r.stderr}")
            doc = json.loads(r.stdout)
        finally:
            for p in procs:
                p.kill()
                p.wait(5)
    doc["delay_ms"] = args.delay_ms
    report(doc)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


def _wait_tcp(ns, host, port):
    code = (f"import socket,time\nfor _ in range(200):\n try:\n  socket.create_connection("
            f"({host!r},{port}),0.2).close();break\n except OSError:time.sleep(0.05)\n"
            f"else:raise SystemExit(1)")
    ns.run(sys.executable, "-c", code, timeout=30)


def report(doc):
    rtt = doc["delay_ms"] / 1000           # the line delays one direction: one round trip

    def trips(sec):
        return f" = {sec / rtt:.2f} round trips" if rtt else ""
    print(f"reconnect to first reply through a relay tunnel, {doc['delay_ms']:g} ms added to "
          f"each round trip, {len(doc['times']['on'])} rounds each")
    med = {}
    for mode in ("off", "on"):
        t = doc["times"][mode]
        med[mode] = statistics.median(t)
        print(f"  Fast Open {mode:3}: median {med[mode] * 1000:6.1f} ms  (min "
              f"{min(t) * 1000:.1f}, max {max(t) * 1000:.1f}){trips(med[mode])}")
    print(f"  saved: {(med['off'] - med['on']) * 1000:.1f} ms{trips(med['off'] - med['on'])}; "
          f"SYNs with data (TCPFastOpenActive): {doc['fastopen_active']}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--delay-ms", type=float, default=20)
    p.add_argument("--json", default=None)
    p.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--server", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    (inner if args.inner else outer)(args)


if __name__ == "__main__":
    main()
