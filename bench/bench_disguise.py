"""forward with and without a UDP disguise header, side by side in one run.

    python bench/bench_disguise.py [--rounds N] [--duration S] [--gso] [--json OUT]

Chain under test (loopback, two relay processes of one worker each):

    blast (bench/c/blast.c) -> relay forward A [--header-out KIND]
                            -> relay forward B [--header-in KIND] -> sink (bench/c/sink.c)

for KIND none (no header), wireguard (4 fixed bytes) and dtls (13 bytes, sequence and
length fields written per datagram), alternating round by round; medians. The sink counts
what B delivers: payloads without headers, so a datagram counts only when A added its
header and B checked and stripped it. --gso: the load comes as UDP_SEGMENT runs and both
relays run --offload on (the header written per segment, one GSO send per run). Reported: the
delivered rate and the relays' CPU per datagram, each as a ratio to "none".
"""
import argparse
import json
import os
import pathlib
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.bench_tunnel import Here, free_port, stop, total_bytes  # noqa: E402
from bench.cbuild import compile_c  # noqa: E402
from bench.harness import tree_cpu  # noqa: E402
from bench.loadgen import Blaster, LoadError, Sink  # noqa: E402

KINDS = ("none", "wireguard", "dtls")
SIZES = (64, 1350)


def start_pair(kind, sink_port, gro):
    """relay A and B; returns ([procs], A's port)."""
    a_port, b_port = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    quiet = dict(stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
                 start_new_session=True, env=dict(os.environ, PYTHONPATH=ROOT))
    common = ["--workers", "1", "--control", "", "--mark", "0", "--log-level", "error"]
    common += ["--offload", "on" if gro else "off"]
    out = [] if kind == "none" else ["--header-out", kind]
    inn = [] if kind == "none" else ["--header-in", kind]
    relay = [sys.executable, "-m", "relay", "forward"]
    b = subprocess.Popen(relay + ["--listen", f"127.0.0.1:{b_port}",
                                  "--to", f"127.0.0.1:{sink_port}", *inn, *common], **quiet)
    a = subprocess.Popen(relay + ["--listen", f"127.0.0.1:{a_port}",
                                  "--to", f"127.0.0.1:{b_port}", *out, *common], **quiet)
    return [a, b], a_port


def one_run(kind, size, duration, tools, gso):
    blast_bin, sink_bin = tools
    sink_port = free_port(socket.SOCK_DGRAM)
    sink = Sink(Here(), sink_bin, f"127.0.0.1:{sink_port}", max_time=int(duration) + 60).start()
    procs = []
    try:
        procs, entry = start_pair(kind, sink_port, gso)
        dst = f"127.0.0.1:{entry}"
        deadline = time.monotonic() + 10
        while True:                     # warm-up (marker 2): the chain is up
            warm = Blaster(Here(), [blast_bin], dst, size=size, flows=1, duration=0.2,
                           warmup=0, marker=2, count=4).start()
            warm.wait_warm()
            warm.go()
            warm.result()
            if total_bytes(sink.wait_count(2, 1, quiet=0.3, limit=1.0)) > 0:
                break
            if time.monotonic() > deadline:
                raise LoadError(f"{kind}: the chain delivers nothing")
        b = Blaster(Here(), [blast_bin], dst, size=size, flows=1, duration=duration, warmup=0,
                    marker=1, gso=gso).start()
        b.wait_warm()
        before = total_bytes(sink.snapshot())
        cpu0 = tree_cpu(p.pid for p in procs)
        b.go()
        res = b.result()
        sink.wait_count(1, res["sent"], quiet=0.3, limit=3.0)
        snap = sink.snapshot()
        cpu1 = tree_cpu(p.pid for p in procs)
        delivered = (total_bytes(snap) - before) / size
        m = snap.get("markers", {}).get("1", {})
        elapsed = max(res["elapsed"] or duration, m.get("last", 0) - m.get("first", 0))
        return {"dgrams_per_s": delivered / elapsed,
                "us_per_dgram": (cpu1 - cpu0) / delivered * 1e6 if delivered else 0.0,
                "delivery": delivered / res["sent"] if res["sent"] else 0.0}
    finally:
        for p in procs:
            stop(p)
        sink.stop()


def run(rounds=3, duration=1.0, gso=False, log=print):
    tools = (compile_c(os.path.join(ROOT, "bench", "c", "blast.c")),
             compile_c(os.path.join(ROOT, "bench", "c", "sink.c")))
    rows = []
    for size in SIZES:
        results = {k: [] for k in KINDS}
        for rnd in range(rounds):
            k = rnd % len(KINDS)
            for kind in KINDS[k:] + KINDS[:k]:
                try:
                    results[kind].append(one_run(kind, size, duration, tools, gso))
                except LoadError as e:
                    log(f"  {kind} size={size}: {e}")
        med = {k: {key: statistics.median(r[key] for r in rs) for key in rs[0]}
               for k, rs in results.items() if rs}
        for kind, row in med.items():
            base = med.get("none")
            row.update(kind=kind, size=size, rounds=len(results[kind]), gso=gso)
            if base and base["dgrams_per_s"] and base["us_per_dgram"]:
                row["rate_vs_none"] = round(row["dgrams_per_s"] / base["dgrams_per_s"], 3)
                row["cpu_vs_none"] = round(row["us_per_dgram"] / base["us_per_dgram"], 3)
            rows.append(row)
            log(f"  {kind:9s} size={size:5d}{' gso' if gso else ''}: "
                f"{row['dgrams_per_s']:>10,.0f} dgrams/s, {row['us_per_dgram']:.2f} us/dgram "
                f"(both relays), delivered {row['delivery']:.0%}"
                + (f"; x none: rate {row['rate_vs_none']:.2f}, CPU {row['cpu_vs_none']:.2f}"
                   if "rate_vs_none" in row else ""))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds per point (default 3)")
    p.add_argument("--duration", type=float, default=1.0, help="seconds per run (default 1)")
    p.add_argument("--gso", action="store_true",
                   help="UDP_SEGMENT runs as the load, --offload on on both relays (else off)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the rows as JSON")
    args = p.parse_args(argv)
    rows = run(args.rounds, args.duration, args.gso)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
