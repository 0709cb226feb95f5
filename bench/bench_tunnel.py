"""UDP over TCP side by side: relay tunnel-client + tunnel-server vs a socat chain.

    python bench/bench_tunnel.py [--quick] [--rounds N] [--duration S] [--json OUT]
                                 [--stages [--plain-load [--rate PPS]]]

Chain under test (loopback, one process each):

    blast (bench/c/blast.c, sendmmsg) -> UDP -> [A] -> TCP -> [B] -> UDP -> sink (bench/c/sink.c)

    relay:  A = relay tunnel-client --server B --to sink     B = relay tunnel-server
    socat:  A = socat -u UDP-RECV:PORT TCP:B                 B = socat -u TCP-LISTEN:PORT UDP-SENDTO:sink

and, as the yardstick the tunnel should beat, plain UDP forwarding without any TCP leg:

    forward: blast -> relay forward --workers 1 --to sink -> sink

--stages measures each end of the tunnel on its own, as where it is deployed: the two
ends run on two hosts, so the tunnel's capacity is that of its slower end. Load generator
and sink on CPU 0, the stage under test alone on CPU 1:

    client:      blast -> UDP -> tunnel-client -> TCP -> sink --tunnel (counts the frames)
    server:      blast --tunnel (writes frames) -> TCP -> tunnel-server -> UDP -> sink
    forward:     blast -> relay forward -> sink                  (as shipped)
    forward-gro: blast -> relay forward --offload on -> sink (forward: the default, auto,
                 which is the same path on a kernel with UDP GRO and GSO)
    tunnel:      blast -> tunnel-client -> tunnel-server -> sink  (both ends on CPU 1)

The load is bench/c/blast.c --gso (runs of 64 datagrams per send, as the main harness
offers): it saturates every stage, so each rate is that stage's capacity on one core.
Receivers with UDP_GRO (tunnel-client, forward --offload on) take the runs whole; the others get
them as single datagrams. --plain-load sends single datagrams instead (nothing to
coalesce) at --rate (default 250,000/s, below every stage's capacity): the comparison is
then the CPU each stage spends per datagram.
"""
import argparse
import shutil
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.cbuild import compile_c  # noqa: E402
from bench.harness import tree_cpu  # noqa: E402
from bench.loadgen import Blaster, LoadError, Sink  # noqa: E402
from bench.topo import taskset  # noqa: E402

SIZES = (64, 1350)
FLOWS = (1, 64)
IMPLS = ("relay", "socat", "forward")
STAGES = ("forward", "forward-gro", "client", "server", "tunnel")


def pinned(args, cpus):
    """argv that runs on the CPUs ``cpus`` (all CPUs when None)."""
    return taskset(cpus) + [str(a) for a in args]


class Here:
    """The namespace interface bench.loadgen expects, for this (the root) namespace."""

    def popen(self, args, cpus=None, **kw):
        return subprocess.Popen(pinned(args, cpus), start_new_session=True, **kw)


def free_port(kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def stop(proc):
    if proc is not None and proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(3)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(3)


def wait_tcp(port, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise LoadError(f"nothing listens on 127.0.0.1:{port}")


def start_chain(impl, sink_port, cpus=None, control=None):
    """Start the chain (its relay processes on ``cpus``); returns ([procs], entry port):
    UDP for the load generator, except for the "server" stage (the tunnel-server's TCP
    port, written to by ``blast --tunnel``). ``control``: the tunnel-server's control socket
    path, through which its counters are read (none when not given)."""
    tcp_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    env = dict(os.environ, PYTHONPATH=ROOT)
    # one worker each, no control socket: the bench starts several relays at once
    tun = [sys.executable, "-m", "relay"]
    one = ["--workers", "1", "--control", ""]

    def server():
        p = subprocess.Popen(pinned(tun + ["tunnel-server", "--listen", f"127.0.0.1:{tcp_port}",
                                           "--allow", "127.0.0.0/8", "--batch", "64",
                                           "--log-level", "error", "--workers", "1",
                                           "--control", control or ""], cpus),
                             start_new_session=True, env=env, **quiet)
        # the accept probe of wait_tcp is a connection that never handshakes: harmless
        wait_tcp(tcp_port)
        return p

    def client(server_port):
        return subprocess.Popen(pinned(tun + ["tunnel-client", "--server", f"127.0.0.1:{server_port}",
                                              "--listen", f"127.0.0.1:{udp_port}",
                                              "--to", f"127.0.0.1:{sink_port}", "--batch", "64",
                                              "--log-level", "error", *one], cpus),
                                start_new_session=True, env=env, **quiet)

    if impl in ("relay", "tunnel"):
        b = server()
        a = client(tcp_port)
    elif impl == "client":          # sink_port is the TCP port of `sink --tunnel`
        return [client(sink_port)], udp_port
    elif impl == "server":
        return [server()], tcp_port
    elif impl in ("forward", "forward-gro"):
        a = subprocess.Popen(pinned([sys.executable, "-m", "relay", "forward",
                                     "--listen", f"127.0.0.1:{udp_port}",
                                     "--to", f"127.0.0.1:{sink_port}",
                                     "--workers", "1", "--control", "", "--mark", "0",
                                     "--log-level", "error"]
                                    + (["--offload", "on"] if impl == "forward-gro" else []), cpus),
                             start_new_session=True, env=env, **quiet)
        return [a], udp_port
    else:
        b = subprocess.Popen(["socat", "-u", f"TCP-LISTEN:{tcp_port},bind=127.0.0.1,reuseaddr",
                              f"UDP-SENDTO:127.0.0.1:{sink_port}"], start_new_session=True, **quiet)
        wait_tcp_listen(tcp_port)
        a = subprocess.Popen(["socat", "-u", f"UDP-RECV:{udp_port},bind=127.0.0.1,rcvbuf=4194304",
                              f"TCP:127.0.0.1:{tcp_port},nodelay"], start_new_session=True, **quiet)
    return [a, b], udp_port


def proc_net(kind, port, state=None):
    """The IPv4 sockets of /proc/net/``kind`` (tcp, udp) on local ``port`` (in TCP state
    ``state``, as written there: "0A" listening, "01" established), each as
    (bytes in its receive queue, datagrams the kernel dropped at it)."""
    hexport = f"{port:04X}"
    out = []
    with open(f"/proc/net/{kind}") as f:
        for line in f:
            parts = line.split()
            if (len(parts) > 4 and parts[1].endswith(":" + hexport)
                    and (state is None or parts[3] == state)):
                drops = int(parts[12]) if kind == "udp" and len(parts) > 12 else 0
                out.append((int(parts[4].split(":")[1], 16), drops))
    return out


def wait_tcp_listen(port, timeout=10.0):
    """Wait for a listening socket without connecting (socat TCP-LISTEN takes one peer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc_net("tcp", port, "0A"):
            return
        time.sleep(0.05)
    raise LoadError(f"socat did not listen on {port}")


def sink_drops(port):
    """Datagrams the kernel dropped at the UDP sink on 127.0.0.1:``port`` (receive buffer
    full), and the bytes waiting in its receive queue."""
    rows = proc_net("udp", port)
    return sum(d for _q, d in rows), sum(q for q, _d in rows)


def settle_server(sink, tcp_port, udp_port, limit=10.0, quiet=0.3):
    """Wait until the tunnel-server has taken every byte from its connection and the sink
    every datagram from its socket, and the sink's count stood still for ``quiet``: then
    nothing is in flight (bounded by ``limit`` seconds)."""
    deadline = time.monotonic() + limit
    prev, since = None, time.monotonic()
    while time.monotonic() < deadline:
        count = sink.snapshot().get("markers", {}).get("1", {}).get("count", 0)
        queued = (sum(q for q, _d in proc_net("tcp", tcp_port, "01"))
                  + sink_drops(udp_port)[1])
        now = time.monotonic()
        if count != prev or queued:
            prev, since = count, now
        elif now - since >= quiet:
            return
        time.sleep(0.03)
    raise LoadError(f"the server stage did not settle in {limit:.0f} s")


def server_counters(control):
    """The tunnel-server's counters, read through its control socket."""
    from relay.supervisor import query
    try:
        return json.loads(query(control))["total"]
    except (RuntimeError, OSError, ValueError) as e:
        raise LoadError(f"tunnel-server counters: {e}") from None


def total_bytes(snap):
    return sum(m.get("bytes", 0) for m in snap.get("markers", {}).values())


def one_run(impl, size, flows, duration, tools, load_cpus=None, impl_cpus=None, rate=0,
            gso=False):
    blast_bin, sink_bin = tools
    to_tunnel = impl == "client"        # the sink plays the tunnel server
    sink_port = free_port(socket.SOCK_STREAM if to_tunnel else socket.SOCK_DGRAM)
    sink = Sink(Here(), sink_bin, f"127.0.0.1:{sink_port}", max_time=int(duration) + 60,
                cpus=load_cpus, tunnel=to_tunnel).start()
    # the server stage accounts for every datagram: its counters come from its control socket
    ctl_dir = tempfile.mkdtemp(prefix="relay-bench-") if impl == "server" else None
    control = os.path.join(ctl_dir, "control.sock") if ctl_dir else None
    procs, sent = [], 0
    try:
        procs, entry = start_chain(impl, sink_port, impl_cpus, control)
        if impl == "server":            # blast writes frames to the server, for the sink
            command, dst = [blast_bin, "--tunnel", f"127.0.0.1:{entry}"], f"127.0.0.1:{sink_port}"
        else:
            command, dst = [blast_bin], f"127.0.0.1:{entry}"
        # warm-up datagrams (marker 2) prove the chain is up before the measured phase
        deadline = time.monotonic() + 10
        while True:
            warm = Blaster(Here(), command, dst, size=size, flows=flows, cpus=load_cpus,
                           duration=0.2, warmup=0, marker=2, count=flows * 4).start()
            warm.wait_warm()
            warm.go()
            sent += warm.result()["sent"]
            snap = sink.wait_count(2, 1, quiet=0.3, limit=1.0)
            if total_bytes(snap) > 0:
                break
            if time.monotonic() > deadline:
                raise LoadError(f"{impl} chain delivers nothing")
        b = Blaster(Here(), command, dst, size=size, flows=flows, cpus=load_cpus,
                    duration=duration, warmup=0, marker=1, rate=rate,
                    gso=gso and impl != "server").start()
        b.wait_warm()
        before = total_bytes(sink.snapshot())
        cpu0 = tree_cpu(p.pid for p in procs)
        b.go()
        res = b.result()
        sent += res["sent"]
        sink.wait_count(1, res["sent"], quiet=0.3, limit=3.0)
        if control:
            settle_server(sink, entry, sink_port)
        snap = sink.snapshot()
        delivered = total_bytes(snap) - before
        # The rate over the sink's window (first to last datagram of the measured phase):
        # a saturated chain is still delivering its backlog after the generator stopped.
        m = snap.get("markers", {}).get("1", {})
        window = m.get("last", 0) - m.get("first", 0)
        elapsed = max(res["elapsed"] or duration, window)
        out = {"dgrams_per_s": delivered / size / elapsed,
               "mbit_per_s": delivered * 8 / elapsed / 1e6,
               "offered_per_s": res["sent"] / (res["elapsed"] or duration),
               "delivery": delivered / size / res["sent"] if res["sent"] else 0.0}
        if impl != "socat":
            cpu1 = tree_cpu(p.pid for p in procs)     # including the backlog's delivery
            out["cpu"] = (cpu1 - cpu0) / elapsed        # cores busy in the relay processes
            if delivered:
                out["us_per_dgram"] = (cpu1 - cpu0) / (delivered / size) * 1e6
        if control:
            out["accounting"] = server_accounting(sent, snap, sink_drops(sink_port)[0],
                                                  control)
        return out
    finally:
        for p in procs:
            stop(p)
        sink.stop()
        if ctl_dir:
            shutil.rmtree(ctl_dir, ignore_errors=True)


def server_accounting(sent, snap, kernel_drops, control):
    """Where each datagram of a server-stage run went, warm-up included: ``sent`` (by
    blast --tunnel, over TCP: all reach the server), ``delivered`` (counted by the sink),
    ``drops`` by the server (its counters) and by the kernel at the sink's full socket."""
    counters = server_counters(control)
    drops = {k: v for k, v in counters.items() if k.startswith("drop_") or k == "queue_drops"}
    drops["sink_rcvbuf"] = kernel_drops
    return {"sent": sent,
            "delivered": sum(m.get("count", 0) for m in snap.get("markers", {}).values()),
            "server_sent": counters.get("up_datagrams", 0), "drops": drops}


def run(quick=False, rounds=None, duration=None, log=print, stages=False, rate=0, gso=False):
    """Rows of medians; bench/harness.py calls this. RELAY_BENCH_SMOKE=1: one tiny point.
    ``stages``: the pinned per-end comparison (load on CPU 0, relay on CPU 1); ``gso``:
    the load generator sends runs as UDP_SEGMENT buffers."""
    smoke = os.environ.get("RELAY_BENCH_SMOKE") == "1"
    impls = STAGES if stages else IMPLS
    load_cpus, impl_cpus = ({0}, {1}) if stages else (None, None)
    bench = "tunnel-stages" if stages else "tunnel"
    rounds = 1 if smoke else (rounds or (1 if quick else 3))
    duration = 0.3 if smoke else (duration or (1.0 if quick else 2.0))
    sizes, flows_list = ((64,), (1,)) if smoke else (SIZES, FLOWS)
    tools = (compile_c(os.path.join(ROOT, "bench", "c", "blast.c")),
             compile_c(os.path.join(ROOT, "bench", "c", "sink.c")))
    rows = []
    for size in sizes:
        for flows in flows_list:
            results = {impl: [] for impl in impls}
            for rnd in range(rounds):
                k = rnd % len(impls)
                for impl in impls[k:] + impls[:k]:
                    try:
                        results[impl].append(one_run(impl, size, flows, duration, tools,
                                                     load_cpus, impl_cpus, rate, gso))
                    except LoadError as e:
                        log(f"  {impl} size={size} flows={flows}: {e}")
            for impl, rs in results.items():
                if not rs:
                    continue
                row = {"bench": bench, "impl": impl, "size": size, "flows": flows,
                       "rounds": len(rs)}
                for key in ("dgrams_per_s", "mbit_per_s", "offered_per_s", "delivery", "cpu",
                            "us_per_dgram"):
                    if all(key in r for r in rs):
                        row[key] = statistics.median(r[key] for r in rs)
                rows.append(row)
                cpu = f", relay CPU {row['cpu']:.2f} cores" if "cpu" in row else ""
                if "us_per_dgram" in row:
                    cpu += f", {row['us_per_dgram']:.2f} us/dgram"
                log(f"  {impl:7s} size={size:5d} flows={flows:3d}: "
                    f"{row['dgrams_per_s']:>10,.0f} dgrams/s {row['mbit_per_s']:>8,.1f} Mbit/s "
                    f"(offered {row['offered_per_s']:,.0f}/s, delivered {row['delivery']:.0%}{cpu})")
            r = {x["impl"]: x for x in rows
                 if x["bench"] == bench and x["size"] == size and x["flows"] == flows}
            if stages:
                # Full rate: every stage saturates, its rate is its capacity on one core.
                # Paced: every stage keeps up; 1 / (CPU per datagram) is its capacity.
                if rate:
                    cap = {k: 1e6 / v["us_per_dgram"] for k, v in r.items()
                           if v.get("us_per_dgram")}
                else:
                    cap = {k: v["dgrams_per_s"] for k, v in r.items()}
                for impl in ("forward-gro", "client", "server", "tunnel"):
                    if impl in cap and cap.get("forward"):
                        r[impl]["capacity_vs_forward"] = round(cap[impl] / cap["forward"], 2)
                        log(f"  {impl} / forward: {r[impl]['capacity_vs_forward']:.2f}")
                if {"client", "server"} <= cap.keys() and cap.get("forward"):
                    ends = min(cap["client"], cap["server"])
                    row = {"bench": bench, "impl": "two-host tunnel", "size": size,
                           "flows": flows, "capacity_per_core": ends,
                           "capacity_vs_forward": round(ends / cap["forward"], 2)}
                    if cap.get("forward-gro"):
                        row["capacity_vs_forward_gro"] = round(ends / cap["forward-gro"], 2)
                    rows.append(row)
                    log(f"  two-host tunnel (its slower end) / forward: "
                        f"{row['capacity_vs_forward']:.2f}"
                        + (f", / forward --offload on: {row['capacity_vs_forward_gro']:.2f}"
                           if "capacity_vs_forward_gro" in row else ""))
                continue
            for other in ("socat", "forward"):
                if "relay" in r and other in r and r[other]["dgrams_per_s"] > 0:
                    ratio = r["relay"]["dgrams_per_s"] / r[other]["dgrams_per_s"]
                    r["relay"][f"ratio_vs_{other}"] = round(ratio, 2)
                    log(f"  relay tunnel / {other} = {ratio:.2f}")
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round of 1 s per point")
    p.add_argument("--rounds", type=int, default=None, help="rounds per point (default 3)")
    p.add_argument("--duration", type=float, default=None, help="seconds per run (default 2)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the rows as JSON")
    p.add_argument("--stages", action="store_true",
                   help="each end of the tunnel alone on CPU 1 against plain forward on CPU 1 "
                        "(load generator and sink on CPU 0); needs 2 CPUs")
    p.add_argument("--plain-load", action="store_true",
                   help="with --stages: single datagrams at --rate instead of GSO runs at "
                        "full rate; compares CPU per datagram")
    p.add_argument("--rate", type=float, default=None, metavar="PPS",
                   help="offered datagrams/s (default: full rate; --stages --plain-load: "
                        "250000, below every stage's capacity)")
    args = p.parse_args(argv)
    if args.stages and not {0, 1} <= os.sched_getaffinity(0):
        p.error("--stages needs CPUs 0 and 1")
    for tool in ("socat", "gcc", "taskset"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            print(f"bench_tunnel: {tool} is needed", file=sys.stderr)
            return 2
    if args.plain_load and not args.stages:
        p.error("--plain-load goes with --stages")
    gso = args.stages and not args.plain_load
    rate = args.rate if args.rate is not None else (250_000 if args.plain_load else 0)
    if gso and rate:
        p.error("--rate goes with --plain-load (GSO load runs at full rate)")
    rows = run(args.quick, args.rounds, args.duration, stages=args.stages, rate=rate, gso=gso)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
