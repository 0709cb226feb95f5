"""python -m bench.flows_watch: what `relay flows --watch` costs the data path.

A `relay forward` (one worker) on loopback moves a full-rate load from bench/c/blast.c
(FLOWS flows, 64-byte datagrams) to bench/c/sink.c, in rounds of DURATION seconds: without
a reader, then with a reader asking `flows` (top 1000, and by client) once a second, as
`relay flows --watch` does, alternately. Figures per round: datagrams the sink got per
second, the worker's CPU seconds per million datagrams, and how long each flows request
took. The ratio with/without of the same run is what bench/README.md reports.

    python -m bench.flows_watch [--flows 10000] [--duration 4] [--rounds 3]
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.cbuild import compile_c  # noqa: E402
from relay.supervisor import query  # noqa: E402


def free_port():
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_cpu(relay_pid):
    total = 0.0
    for c in psutil.Process(relay_pid).children():
        t = c.cpu_times()
        total += t.user + t.system
    return total


def sink_counts(sink):
    sink.send_signal(signal.SIGUSR1)
    line = sink.stdout.readline()
    doc = json.loads(line)
    return sum(m["count"] for m in doc["markers"].values())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=int, default=10000)
    ap.add_argument("--duration", type=float, default=4.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    blast, sink_exe = compile_c(os.path.join(ROOT, "bench/c/blast.c")), \
        compile_c(os.path.join(ROOT, "bench/c/sink.c"))
    sport, lport = free_port(), free_port()
    tmp = tempfile.mkdtemp(prefix="relay-bench-flows-")
    control = os.path.join(tmp, "control.sock")
    sink = subprocess.Popen([sink_exe, "--listen", f"127.0.0.1:{sport}", "--max-time", "600"],
                            stdout=subprocess.PIPE, text=True)
    assert sink.stdout.readline().strip() == "ready"
    env = dict(os.environ, PYTHONPATH=ROOT)
    relay = subprocess.Popen([sys.executable, "-m", "relay", "forward", "--listen",
                              f"127.0.0.1:{lport}", "--to", f"127.0.0.1:{sport}", "--workers", "1",
                              "--control", control, "--log-level", "warning", "--user", "root",
                              "--max-associations", str(max(args.flows, 1024))], env=env)
    results = {"without": [], "with": []}
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                query(control, "stats")
                break
            except (RuntimeError, OSError):
                if time.monotonic() > deadline:
                    raise SystemExit("relay did not start")
                time.sleep(0.1)
        for rnd in range(args.rounds):
            for phase in ("without", "with"):
                stop = threading.Event()
                asks = []

                def reader():
                    while not stop.wait(1.0):
                        for req in ('flows {"top": 1000, "sort": "bytes"}',
                                    'flows {"top": 1000, "by_client": true}'):
                            t0 = time.monotonic()
                            doc = json.loads(query(control, req))
                            asks.append((time.monotonic() - t0, doc.get("total")))
                # the flows exist before the reader starts (a warm-up per flow)
                b = subprocess.Popen([blast, "--dst", f"127.0.0.1:{lport}", "--flows",
                                      str(args.flows), "--size", "64", "--warmup", "2",
                                      "--duration", str(args.duration), "--count", "100000000"],
                                     stdout=subprocess.PIPE, text=True)
                time.sleep(0.5)
                n0, c0, t0 = sink_counts(sink), worker_cpu(relay.pid), time.monotonic()
                th = None
                if phase == "with":
                    th = threading.Thread(target=reader, daemon=True)
                    th.start()
                b.wait(args.duration + 30)
                n1, c1, t1 = sink_counts(sink), worker_cpu(relay.pid), time.monotonic()
                stop.set()
                if th:
                    th.join(10)
                got = n1 - n0
                row = {"round": rnd, "rate": got / (t1 - t0),
                       "cpu_per_mdg": (c1 - c0) / got * 1e6 if got else None,
                       "asks": len(asks),
                       "ask_ms_max": round(max(a for a, _ in asks) * 1000, 1) if asks else None,
                       "flows_seen": max((n or 0) for _, n in asks) if asks else None}
                results[phase].append(row)
                print(phase, row, flush=True)
                time.sleep(1.0)
    finally:
        relay.terminate()
        relay.wait(10)
        sink.terminate()
        sink.wait(5)
    w = statistics.median(r["rate"] for r in results["with"])
    wo = statistics.median(r["rate"] for r in results["without"])
    cw = statistics.median(r["cpu_per_mdg"] for r in results["with"])
    cwo = statistics.median(r["cpu_per_mdg"] for r in results["without"])
    print(json.dumps({"flows": args.flows, "rate_without": round(wo), "rate_with": round(w),
                      "rate_ratio": round(w / wo, 3), "cpu_ratio": round(cw / cwo, 3),
                      "ask_ms_max": max(r["ask_ms_max"] or 0 for r in results["with"])}))


if __name__ == "__main__":
    main()
