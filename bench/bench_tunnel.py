"""UDP over TCP side by side: relay tunnel-client + tunnel-server vs a socat chain.

    python bench/bench_tunnel.py [--quick] [--rounds N] [--duration S] [--json OUT]

Chain under test (loopback, one process each):

    blast (bench/c/blast.c, sendmmsg) -> UDP -> [A] -> TCP -> [B] -> UDP -> sink (bench/c/sink.c)

    relay:  A = relay tunnel-client --server B --to sink     B = relay tunnel-server
    socat:  A = socat -u UDP-RECV:PORT TCP:B                 B = socat -u TCP-LISTEN:PORT UDP-SENDTO:sink

and, as the yardstick the tunnel should beat, plain UDP forwarding without any TCP leg:

    forward: blast -> relay forward --workers 1 --to sink -> sink

For 64-byte and 1350-byte payloads with 1 and 64 flows (distinct source ports), rounds
alternate the chains (order rotated each round); each figure is the median over rounds. "dgrams/s" is delivered
payload bytes / payload size / measured seconds: socat does not keep datagram boundaries
(it re-chunks the TCP stream into UDP writes of up to 8 KiB), so bytes are the only fair
count; the relay tunnel delivers exactly the datagrams it carries. "offered" is what the
blaster sent per second (full rate; drops are the difference). Every run is bounded by
--duration plus a few seconds of setup, and every process is stopped by pid.
"""
import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.cbuild import compile_c  # noqa: E402
from bench.loadgen import Blaster, LoadError, Sink  # noqa: E402

SIZES = (64, 1350)
FLOWS = (1, 64)
IMPLS = ("relay", "socat", "forward")


class Here:
    """The namespace interface bench.loadgen expects, for this (the root) namespace."""

    def popen(self, args, cpus=None, **kw):
        return subprocess.Popen([str(a) for a in args], start_new_session=True, **kw)


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


def start_chain(impl, sink_port):
    """Start A and B; returns ([procs], entry UDP port)."""
    tcp_port, udp_port = free_port(), free_port(socket.SOCK_DGRAM)
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    env = dict(os.environ, PYTHONPATH=ROOT)
    if impl == "relay":
        tun = [sys.executable, "-m", "relay.engine.tunnel"]
        b = subprocess.Popen(tun + ["tunnel-server", "--listen", f"127.0.0.1:{tcp_port}",
                                    "--allow", "127.0.0.0/8", "--batch", "64",
                                    "--log-level", "error"],
                             start_new_session=True, env=env, **quiet)
        # the accept probe of wait_tcp is a connection that never handshakes: harmless
        wait_tcp(tcp_port)
        a = subprocess.Popen(tun + ["tunnel-client", "--server", f"127.0.0.1:{tcp_port}",
                                    "--listen", f"127.0.0.1:{udp_port}",
                                    "--to", f"127.0.0.1:{sink_port}", "--batch", "64",
                                    "--log-level", "error"],
                             start_new_session=True, env=env, **quiet)
    elif impl == "forward":
        a = subprocess.Popen([sys.executable, "-m", "relay", "forward",
                              "--listen", f"127.0.0.1:{udp_port}", "--to", f"127.0.0.1:{sink_port}",
                              "--workers", "1", "--control", "", "--mark", "0",
                              "--log-level", "error"], start_new_session=True, env=env, **quiet)
        return [a], udp_port
    else:
        b = subprocess.Popen(["socat", "-u", f"TCP-LISTEN:{tcp_port},bind=127.0.0.1,reuseaddr",
                              f"UDP-SENDTO:127.0.0.1:{sink_port}"], start_new_session=True, **quiet)
        wait_tcp_listen(tcp_port)
        a = subprocess.Popen(["socat", "-u", f"UDP-RECV:{udp_port},bind=127.0.0.1,rcvbuf=4194304",
                              f"TCP:127.0.0.1:{tcp_port},nodelay"], start_new_session=True, **quiet)
    return [a, b], udp_port


def wait_tcp_listen(port, timeout=10.0):
    """Wait for a listening socket without connecting (socat TCP-LISTEN takes one peer)."""
    deadline = time.monotonic() + timeout
    hexport = f"{port:04X}"
    while time.monotonic() < deadline:
        with open("/proc/net/tcp") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 3 and parts[1].endswith(":" + hexport) and parts[3] == "0A":
                    return
        time.sleep(0.05)
    raise LoadError(f"socat did not listen on {port}")


def total_bytes(snap):
    return sum(m.get("bytes", 0) for m in snap.get("markers", {}).values())


def one_run(impl, size, flows, duration, tools):
    blast_bin, sink_bin = tools
    sink_port = free_port(socket.SOCK_DGRAM)
    sink = Sink(Here(), sink_bin, f"127.0.0.1:{sink_port}", max_time=int(duration) + 60).start()
    procs = []
    try:
        procs, entry = start_chain(impl, sink_port)
        # warm-up datagrams (marker 0) prove the chain is up before the measured phase
        deadline = time.monotonic() + 10
        while True:
            warm = Blaster(Here(), [blast_bin], f"127.0.0.1:{entry}", size=size, flows=flows,
                           duration=0.2, warmup=0, marker=2, count=flows * 4).start()
            warm.wait_warm()
            warm.go()
            warm.result()
            snap = sink.wait_count(2, 1, quiet=0.3, limit=1.0)
            if total_bytes(snap) > 0:
                break
            if time.monotonic() > deadline:
                raise LoadError(f"{impl} chain delivers nothing")
        b = Blaster(Here(), [blast_bin], f"127.0.0.1:{entry}", size=size, flows=flows,
                    duration=duration, warmup=0, marker=1).start()
        b.wait_warm()
        before = total_bytes(sink.snapshot())
        b.go()
        res = b.result()
        sink.wait_count(1, res["sent"], quiet=0.3, limit=3.0)
        delivered = total_bytes(sink.snapshot()) - before
        elapsed = res["elapsed"] or duration
        return {"dgrams_per_s": delivered / size / elapsed,
                "mbit_per_s": delivered * 8 / elapsed / 1e6,
                "offered_per_s": res["sent"] / elapsed,
                "delivery": delivered / size / res["sent"] if res["sent"] else 0.0}
    finally:
        for p in procs:
            stop(p)
        sink.stop()


def run(quick=False, rounds=None, duration=None, log=print):
    """Rows of medians; bench/harness.py calls this. RELAY_BENCH_SMOKE=1: one tiny point."""
    smoke = os.environ.get("RELAY_BENCH_SMOKE") == "1"
    rounds = 1 if smoke else (rounds or (1 if quick else 3))
    duration = 0.3 if smoke else (duration or (1.0 if quick else 2.0))
    sizes, flows_list = ((64,), (1,)) if smoke else (SIZES, FLOWS)
    tools = (compile_c(os.path.join(ROOT, "bench", "c", "blast.c")),
             compile_c(os.path.join(ROOT, "bench", "c", "sink.c")))
    rows = []
    for size in sizes:
        for flows in flows_list:
            results = {impl: [] for impl in IMPLS}
            for rnd in range(rounds):
                k = rnd % len(IMPLS)
                for impl in IMPLS[k:] + IMPLS[:k]:
                    try:
                        results[impl].append(one_run(impl, size, flows, duration, tools))
                    except LoadError as e:
                        log(f"  {impl} size={size} flows={flows}: {e}")
            for impl, rs in results.items():
                if not rs:
                    continue
                row = {"bench": "tunnel", "impl": impl, "size": size, "flows": flows,
                       "rounds": len(rs)}
                for key in ("dgrams_per_s", "mbit_per_s", "offered_per_s", "delivery"):
                    row[key] = statistics.median(r[key] for r in rs)
                rows.append(row)
                log(f"  {impl:7s} size={size:5d} flows={flows:3d}: "
                    f"{row['dgrams_per_s']:>10,.0f} dgrams/s {row['mbit_per_s']:>8,.1f} Mbit/s "
                    f"(offered {row['offered_per_s']:,.0f}/s, delivered {row['delivery']:.0%})")
            r = {x["impl"]: x for x in rows if x["size"] == size and x["flows"] == flows}
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
    args = p.parse_args(argv)
    for tool in ("socat", "gcc"):
        if subprocess.run(["which", tool], capture_output=True).returncode:
            print(f"bench_tunnel: {tool} is needed", file=sys.stderr)
            return 2
    rows = run(args.quick, args.rounds, args.duration)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
