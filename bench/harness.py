"""``python -m bench``: every comparison side by side, in one run, against the C limit.

Throughput rows run in three network namespaces (bench/topo.py): the load generator in
``gen``, the implementation under test in ``mid``, the sink in ``sink``. ``forward`` rows
send to the relay's listen address; ``redir`` rows send to the sink's own address and a
real TPROXY rule in ``mid`` hands the datagrams to the relay. In every round each
implementation is started once and runs the mode's scenarios in turn; each scenario gets
a fresh sink and two phases, each after a short warm-up (2 datagrams per flow, so every
association exists before anything is measured):

1. throughput: the load generator sends at full rate for a fixed time (bounded by count),
   as UDP_SEGMENT buffers unless --no-gso-load (the receiving socket splits them, so every
   implementation sees ordinary datagrams, and the offer is several times what anything
   relays on 2 cores: the drop rate there measures overload, not loss);
   delivered datagrams/s = datagrams at the sink / max(sender's time, the sink's window
   from first to last datagram); drop rate = 1 - received / sent;
2. efficiency: a fixed offered rate below saturation (plain sendmmsg, 4 datagrams per
   call); CPU per datagram = the relay process tree's user+sys time (all threads and
   children, see tree_cpu) over the phase / datagrams delivered; "drop@fixed" says
   whether the implementation kept up with that rate.

The load generator and the sink are pinned to CPU 0 (--load-cpus); the implementation
under test is not pinned (its N-worker rows use every CPU).

Implementations alternate round by round (A B C A B C ...); rows report medians with
min-max, and every row's ratios to the anchors of the same scenario measured in the same
run: the C limit (bench/c/fwd_mmsg.c), the C limit with GRO in and UDP_SEGMENT out
(c-limit-gso, fwd_mmsg --gso) and the kernel's own forwarding (nftables DNAT/SNAT in mid;
forward only, no CPU figure). Rows of other bench scripts (bench/bench_rawsend.py,
bench/bench_tunnel.py, bench/latency.py) are collected when those scripts exist.
Results: DIR/results.json, DIR/chart.png, and the table on stdout.
"""
import argparse
import ast
import datetime
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field

from bench import loadgen, peers, topo
from bench.cbuild import compile_c
from relay.privileges import raise_nofile_limit

ROOT = peers.ROOT
BENCH_DIR = os.path.join(ROOT, "bench")
C_DIR = os.path.join(BENCH_DIR, "c")
LISTEN_PORT = {"forward": 7000, "redir": 7001}
SINK_PORT = 9000
SECTIONS = ("forward", "redir", "tun", "rawsend", "tunnel", "latency")
NET_MODES = ("forward", "redir", "tun")    # the sections measured through the namespaces
EXTRAS = {"rawsend": "bench_rawsend", "tunnel": "bench_tunnel", "latency": "latency"}


# ---------------------------------------------------------------------------------------
# What to run

@dataclass(frozen=True)
class Scenario:
    mode: str                 # forward | redir | tun
    size: int                 # UDP payload bytes
    flows: int = 1            # distinct client source ports
    kind: str = "oneway"      # oneway | echo (round trips) | bulk (GSO load in both
                              # phases; relay with its bulk path off and on)
    loadgen: str = "c"        # c (bench/c/blast.c) | relay (relay.BatchSocket)
    only: tuple = ()          # restrict to these implementations (empty: all of the mode)

    @property
    def label(self):
        text = f"{self.size}B {self.flows} flow{'s' if self.flows > 1 else ''}"
        if self.kind == "echo":
            text += " echo"
        elif self.kind == "bulk":
            text += " bulk"
        if self.loadgen == "relay":
            text += " BatchSocket loadgen"
        return text


@dataclass
class Profile:
    name: str
    rounds: int
    t_rate: float             # seconds of the full-rate phase
    t_cpu: float              # seconds of the fixed-rate phase
    cpu_rate: int             # offered datagrams/s of the fixed-rate phase
    extra_timeout: float      # seconds allowed to each other bench script
    scenarios: list = field(default_factory=list)
    extra_duration: float = None  # phase seconds for the scripts whose run() takes them


def _grid(mode, sizes, flows, only=()):
    return [Scenario(mode, s, f, only=only) for f in flows for s in sizes]


def profile(name):
    fwd_few = ("c-limit", "python-loop")
    if name == "smoke":
        sc = [Scenario("forward", 64),
              Scenario("forward", 64, 20, only=("c-limit",)),
              Scenario("forward", 64, kind="echo", only=fwd_few),
              Scenario("forward", 1400, kind="bulk"),
              Scenario("forward", 64, loadgen="relay", only=("c-limit",)),
              Scenario("redir", 64),
              Scenario("redir", 64, kind="echo", only=("c-limit",)),
              Scenario("redir", 1400, kind="bulk"),
              Scenario("tun", 64),
              Scenario("tun", 1400, kind="bulk")]
        return Profile("smoke", 1, 0.1, 0.1, 5000, 120, sc, extra_duration=0.1)
    if name == "quick":
        sc = (_grid("forward", (64, 1400), (1,))
              + [Scenario("forward", 64, 1000, only=("c-limit", "relay-1w")),
                 Scenario("forward", 1400, kind="bulk")]
              + [Scenario("redir", 64), Scenario("tun", 64)])
        return Profile("quick", 3, 0.3, 0.25, 50000, 60, sc, extra_duration=0.3)
    sc = (_grid("forward", (64, 512, 1400), (1, 1000))
          + [Scenario("forward", 64, kind="echo"),
             Scenario("forward", 1400, kind="bulk"),
             Scenario("forward", 64, loadgen="relay", only=("c-limit",))]
          + _grid("redir", (64, 512, 1400), (1, 1000))
          + [Scenario("redir", 64, kind="echo"),
             Scenario("redir", 1400, kind="bulk")]
          + _grid("tun", (64, 512, 1400), (1, 1000))
          + [Scenario("tun", 64, kind="echo"),
             Scenario("tun", 1400, kind="bulk")])
    return Profile("full", 3, 0.8, 0.6, 50000, 300, sc)


def implementations(scen, nworkers):
    """Peer classes of a scenario, in row order."""
    if scen.kind == "bulk":
        impls = peers.anchors(scen.mode) + peers.offload_peers(scen.mode)
    else:
        impls = (peers.anchors(scen.mode) + peers.relay_peers(scen.mode, nworkers)
                 + peers.third_party(scen.mode))
    if scen.only:
        impls = [c for c in impls if c.name in scen.only]
    return impls


# ---------------------------------------------------------------------------------------
# Building the C tools

def build_tools():
    return {name: str(compile_c(os.path.join(C_DIR, f"{name}.c")))
            for name in ("blast", "sink", "fwd_mmsg")}


# ---------------------------------------------------------------------------------------
# One measurement

class MeasureError(RuntimeError):
    pass


def _runtime_ns(pid):
    """On-CPU time (user+sys, ns resolution) of every thread of pid, from schedstat."""
    total = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def tree_cpu(pids):
    """CPU seconds (user+sys) used so far by the processes, their descendants and the
    children they reaped. Live processes are read from /proc/PID/task/*/schedstat, the
    exact sum that /proc/PID/stat's user+sys rounds to clock ticks (10 ms: too coarse for
    phases of a second); reaped children come from psutil's children_user+children_system."""
    import psutil
    total = 0.0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root] + root.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for p in procs:
            try:
                t = p.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += _runtime_ns(p.pid) / 1e9 + t.children_user + t.children_system
    return total


class Runner:
    def __init__(self, prof, tools, workdir, nworkers, load_cpus=None, log=print,
                 gso_load=True, impl_cpus=None):
        self.gso_load = gso_load        # full-rate phases send UDP_SEGMENT buffers
        self.prof, self.tools, self.workdir = prof, tools, workdir
        self.nworkers, self.log = nworkers, log
        self.load_cpus = load_cpus      # CPUs of the load generator and sink (None: any)
        self.impl_cpus = impl_cpus      # CPUs of the implementation under test (None: any)
        self.topo = None
        self.tproxy_on = False
        self.tun_on = False

    def blaster_command(self, which):
        if which == "relay":
            return [sys.executable, "-m", "bench.loadgen", "blast"]
        return [self.tools["blast"]]

    def ensure_tproxy(self, on):
        if on and not self.tproxy_on:
            self.topo.tproxy(SINK_PORT, LISTEN_PORT["redir"])
        elif not on and self.tproxy_on:
            self.topo.untproxy()
        self.tproxy_on = on

    def ensure_routing(self, mode):
        """What the mode needs in mid: TPROXY rules (redir) or UDP routed into the TUN."""
        self.ensure_tproxy(mode == "redir")
        on = mode == "tun"
        if on and not self.tun_on:
            self.topo.tun_route()
        elif not on and self.tun_on:
            self.topo.untun()
        self.tun_on = on

    def addresses(self, mode):
        """(listen, target, where the load generator sends)."""
        sink = (topo.SINK4, SINK_PORT)
        if mode == "forward":
            listen = (topo.MID4_GEN, LISTEN_PORT["forward"])
            return listen, sink, listen
        if mode == "tun":
            return None, None, sink
        return ("0.0.0.0", LISTEN_PORT["redir"]), None, sink

    def start_peer(self, cls, mode):
        self.ensure_routing(mode)
        listen, target, _ = self.addresses(mode)
        peer = cls(self.topo.mid, self.workdir, mode, self.tools)
        peer.cpus = self.impl_cpus
        return peer.start(listen, target)

    def measure(self, scen, peer):
        """Both phases of one scenario through a running peer; a fresh sink each time."""
        self.ensure_routing(scen.mode)
        _, _, dst = self.addresses(scen.mode)
        sink = loadgen.Sink(self.topo.sink, self.tools["sink"], f"{topo.SINK4}:{SINK_PORT}",
                            echo=scen.kind == "echo", cpus=self.load_cpus).start()
        try:
            rate = self.phase(scen, sink, peer, dst, marker=1, rate=0,
                              duration=self.prof.t_rate)
            cpu = self.phase(scen, sink, peer, dst, marker=2, rate=self.prof.cpu_rate,
                             duration=self.prof.t_cpu)
        finally:
            sink.stop()
        m = self.metrics(scen, rate, cpu)
        if not getattr(peer, "has_cpu", True):
            m["cpu_us"] = None          # no process of its own (the kernel anchor)
        return m

    def use_gso(self, scen, rate):
        if scen.kind == "bulk":
            return True
        return self.gso_load and not rate and scen.kind == "oneway" and scen.loadgen == "c"

    def phase(self, scen, sink, peer, dst, marker, rate, duration):
        if rate:
            batch = 4
        else:
            batch = 64 if scen.flows == 1 else 8
        blaster = loadgen.Blaster(
            self.topo.gen, self.blaster_command(scen.loadgen), f"{dst[0]}:{dst[1]}",
            size=scen.size, flows=scen.flows, batch=batch, duration=duration, rate=rate,
            warmup=2, marker=marker, echo=scen.kind == "echo", gso=self.use_gso(scen, rate),
            cwd=ROOT, cpus=self.load_cpus)
        sink.snapshot()
        warm_before = sink.count(0)
        blaster.start()
        try:
            warm = blaster.wait_warm()
            sink.wait_count(0, warm_before + int(warm * 0.95), quiet=0.3, limit=5.0)
            self._alive(peer)
            cpu0 = tree_cpu(peer.pids())
            blaster.go()
            sent = blaster.result()
            # Done when everything sent has arrived, or when arrivals stop.
            snap = sink.wait_count(marker, sent["sent"], quiet=0.1)
            cpu1 = tree_cpu(peer.pids())
            self._alive(peer)
        finally:
            blaster.kill()
        got = snap.get("markers", {}).get(str(marker), {"count": 0, "bytes": 0, "first": 0,
                                                         "last": 0})
        return {"sent": sent, "sink": got, "cpu": cpu1 - cpu0}

    @staticmethod
    def _alive(peer):
        for p in peer.procs:
            if p.poll() is not None:
                raise MeasureError(f"{peer.name} died ({p.returncode}): {peer.log_tail()}")

    @staticmethod
    def metrics(scen, rate_phase, cpu_phase):
        s = rate_phase["sent"]
        elapsed = max(s["elapsed"], 1e-6)
        if scen.kind == "echo":
            got = s["replies"]
            window = elapsed
        else:
            got = rate_phase["sink"]["count"]
            window = max(rate_phase["sink"]["last"] - rate_phase["sink"]["first"], elapsed)
        if got == 0:
            raise MeasureError("nothing was delivered (is the relay moving datagrams?)")
        pps = got / window
        c = cpu_phase["sent"]
        cpu_got = c["replies"] if scen.kind == "echo" else cpu_phase["sink"]["count"]
        cpu_us = cpu_phase["cpu"] / cpu_got * 1e6 if cpu_got else None
        return {
            "pps": pps,
            "mbps": pps * scen.size * 8 / 1e6,
            "drop": max(0.0, 1.0 - got / s["sent"]) if s["sent"] else None,
            "offered_pps": s["sent"] / elapsed,
            "cpu_us": cpu_us,
            "cpu_offered_pps": c["sent"] / max(c["elapsed"], 1e-6),
            "cpu_drop": max(0.0, 1.0 - cpu_got / c["sent"]) if c["sent"] else None,
            "sent": s["sent"], "delivered": got, "send_errors": s["errors"],
        }


# ---------------------------------------------------------------------------------------
# Rounds, rows, summary

STATS = ("pps", "mbps", "drop", "cpu_us", "offered_pps", "cpu_drop")


def summarize(values):
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "values": values}


def _availability(scen, cls):
    reason = cls.unavailable(scen.mode)
    if scen.loadgen == "relay" and not reason:
        reason = loadgen.batchsocket_unavailable()
    return reason


def run_scenarios(runner, prof, impl_filter=None, sections=(), rows=None):
    """Every scenario of the profile, mode by mode. Each round starts every implementation
    once, in turn (A B C A B C ...), and runs all the mode's scenarios through it.
    Rows are appended to ``rows`` as each mode ends (also when interrupted, with the
    rounds done so far)."""
    rows = [] if rows is None else rows
    for mode in sections:
        scens = [s for s in prof.scenarios if s.mode == mode]
        order, impls_of, results = [], {}, {}
        for scen in scens:
            impls = implementations(scen, runner.nworkers)
            if impl_filter:
                anchors = [a.name for a in peers.anchors(mode)]
                impls = [c for c in impls if c.name in impl_filter or c.name in anchors]
            impls_of[scen] = impls
            for cls in impls:
                if cls.name not in [c.name for c in order]:
                    order.append(cls)
                reason = _availability(scen, cls)
                results[scen, cls.name] = ({"status": "not available", "reason": reason}
                                           if reason else {"rounds": [], "errors": []})
        live = {scen: [c.name for c in impls_of[scen] if "rounds" in results[scen, c.name]]
                for scen in scens}
        for scen in scens:
            runner.log(f"== {mode} {scen.label}: {', '.join(live[scen]) or '(none available)'}")
        try:
            _rounds(runner, prof, mode, scens, order, live, results)
        finally:
            for scen in scens:
                for cls in impls_of[scen]:
                    rows.append(make_row(scen, cls, results[scen, cls.name], runner.nworkers))
            add_ratios(rows)
    return rows


MEASURE_ERRORS = (MeasureError, peers.PeerError, loadgen.LoadError, topo.TopoError, OSError,
                  ValueError, subprocess.SubprocessError)


def _rounds(runner, prof, mode, scens, order, live, results):
    for rnd in range(1, prof.rounds + 1):
        for cls in order:
            todo = [scen for scen in scens if cls.name in live[scen]]
            if todo:
                _peer_round(runner, mode, cls, todo, results, rnd)


def _peer_round(runner, mode, cls, todo, results, rnd):
    """Start cls once and run every scenario of todo through it (a fresh one after a
    failure); errors are recorded in the rows, never raised."""
    peer = None
    try:
        for i, scen in enumerate(todo):
            res = results[scen, cls.name]
            if peer is None:
                try:
                    peer = runner.start_peer(cls, mode)
                except MEASURE_ERRORS as e:
                    for rest in todo[i:]:
                        results[rest, cls.name]["errors"].append(f"round {rnd}: {e}")
                    runner.log(f"   {rnd} {cls.name:21s} did not start: {e}")
                    return
            t0 = time.monotonic()
            try:
                m = runner.measure(scen, peer)
            except MEASURE_ERRORS as e:
                res["errors"].append(f"round {rnd}: {e}")
                runner.log(f"   {rnd} {cls.name:21s} {scen.label:22s} ERROR {e}")
                peer.stop()
                peer = None
                continue
            res["rounds"].append(m)
            cpu = f"{m['cpu_us']:.2f} us" if m["cpu_us"] is not None else "-"
            runner.log(f"   {rnd} {cls.name:21s} {scen.label:22s} {m['pps'] / 1e3:8.1f}k "
                       f"dgram/s  drop {m['drop'] * 100:5.1f}%  CPU/dgram {cpu}  "
                       f"({time.monotonic() - t0:.1f}s)")
    finally:
        if peer is not None:
            dead = peer.stop()
            if dead:
                results[todo[-1], cls.name]["errors"].append(
                    f"round {rnd}: {cls.name} exited with {dead[0].returncode}: "
                    f"{peer.log_tail()}")
            if peer.slow_stop:
                results[todo[-1], cls.name].setdefault("warnings", []).append(
                    f"round {rnd}: {cls.name} did not exit within 5 s of SIGTERM "
                    "(killed)")


def make_row(scen, cls, res, nworkers):
    row = {"mode": scen.mode, "scenario": scen.label, "size": scen.size, "flows": scen.flows,
           "kind": scen.kind, "loadgen": scen.loadgen, "impl": cls.name,
           "note": getattr(cls, "note", "")}
    if cls.name.endswith("-Nw"):
        row["workers"] = nworkers
    elif cls.name.startswith("relay-"):
        row["workers"] = 1
    if scen.kind == "echo":
        row["note"] = (row["note"] + "; " if row["note"] else "") + \
            "rates are round trips/s; CPU per round trip"
    if "status" in res:
        row.update(status=res["status"], reason=res["reason"])
        return row
    if res.get("warnings"):
        row["warnings"] = res["warnings"]
    rounds = res["rounds"]
    for k in STATS:
        row[k] = summarize([r[k] for r in rounds])
    row["rounds"] = rounds
    if res["errors"]:
        row["status"] = "error"
        row["reason"] = "; ".join(res["errors"])[:2000]
    elif not rounds:
        row["status"] = "error"
        row["reason"] = "interrupted before this row was measured"
    else:
        row["status"] = "ok"
        row["reason"] = None
    return row


# Ratio keys of a row: (key suffix, anchor implementation). The plain ratio_rate and
# ratio_cpu are to c-limit; ratio_rate_gso / ratio_cpu_gso to c-limit-gso; ratio_rate_kernel
# to the kernel's forwarding (it has no CPU figure of its own).
ANCHORS = (("", "c-limit"), ("_gso", "c-limit-gso"), ("_kernel", "kernel"))


def _ratio(r, c, key):
    if not c or not r.get(key) or not c.get(key) or c[key]["median"] <= 0:
        return None
    return r[key]["median"] / c[key]["median"]


def add_ratios(rows):
    """Each row against the anchors of its scenario (ANCHORS); tun rows, which the C
    limits cannot serve (they read no TUN), against redir's: the same datagrams, the same
    destinations."""
    for suffix, anchor in ANCHORS:
        limits = {}
        for r in rows:
            if r["impl"] == anchor and r.get("pps"):
                limits[(r["mode"], r["scenario"])] = r
        for r in rows:
            c = limits.get(("redir" if r["mode"] == "tun" else r["mode"], r["scenario"]))
            r["ratio_rate" + suffix] = _ratio(r, c, "pps")
            if anchor != "kernel":
                r["ratio_cpu" + suffix] = _ratio(r, c, "cpu_us")


# ---------------------------------------------------------------------------------------
# Rows of the other bench scripts

_RUN_CODE = """
import importlib, json, sys
m = importlib.import_module(sys.argv[1])
kw = json.loads(sys.argv[2])
rows = m.run(**kw)
print("@@ROWS@@" + json.dumps(list(rows), default=str))
"""


def _script_api(path):
    """('run', its argument names) when the script defines run(quick, rounds, ...);
    ('cli', the options its source mentions) else."""
    with open(path) as f:
        source = f.read()
    tree = ast.parse(source)
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "run":
            return "run", {a.arg for a in node.args.args + node.args.kwonlyargs}
    return "cli", {o for o in ("--quick", "--json", "--rounds", "--duration", "--smoke")
                   if o in source}


def run_extra(section, quick, rounds, timeout, workdir, smoke=False, duration=None):
    """Rows of bench/bench_<section>.py: its run(quick=, rounds=) (and duration= when it
    takes one) called in a child process, or else the script run with --json. rounds None
    leaves the script its own default. The child gets RELAY_BENCH_SMOKE=1 under --smoke
    so it can shrink its counts."""
    module = EXTRAS[section]
    path = os.path.join(BENCH_DIR, module + ".py")
    out = {"section": section, "script": f"bench/{module}.py", "rows": []}
    if not os.path.exists(path):
        out.update(status="not available", reason=f"bench/{module}.py does not exist yet")
        return out
    t0 = time.monotonic()
    try:
        api, opts = _script_api(path)
        if api == "run":
            kw = {"quick": quick}
            if rounds:
                kw["rounds"] = rounds
            if duration and "duration" in opts:
                kw["duration"] = duration
            cmd = [sys.executable, "-c", _RUN_CODE, f"bench.{module}", json.dumps(kw)]
        else:
            if "--json" not in opts:
                out.update(status="not available",
                           reason=f"bench/{module}.py has neither run() nor --json")
                return out
            jpath = os.path.join(workdir, f"{module}.json")
            cmd = [sys.executable, path, "--json", jpath]
            if quick and "--quick" in opts:
                cmd.append("--quick")
            if smoke and "--smoke" in opts:
                cmd.append("--smoke")
            if rounds and "--rounds" in opts:
                cmd += ["--rounds", str(rounds)]
            if duration and "--duration" in opts:
                cmd += ["--duration", str(duration)]
        env = dict(os.environ, RELAY_BENCH_SMOKE="1" if smoke else "0")
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                           env=env)
        if r.returncode != 0:
            tail = (r.stderr.strip() or r.stdout.strip())[-800:]
            out.update(status="error", reason=f"exit {r.returncode}: {tail}")
            return out
        if api == "run":
            line = [x for x in r.stdout.splitlines() if x.startswith("@@ROWS@@")]
            rows = json.loads(line[-1][len("@@ROWS@@"):]) if line else []
        else:
            with open(jpath) as f:
                data = json.load(f)
            rows = data.get("rows", data) if isinstance(data, dict) else data
        if not isinstance(rows, list):
            rows = [rows]
        out.update(status="ok", reason=None, rows=rows)
    except subprocess.TimeoutExpired:
        out.update(status="error", reason=f"did not finish within {timeout:.0f}s")
    except (OSError, ValueError, SyntaxError) as e:
        out.update(status="error", reason=f"{type(e).__name__}: {e}")
    out["seconds"] = round(time.monotonic() - t0, 1)
    return out


# ---------------------------------------------------------------------------------------
# Output

def fmt_rate(v):
    if v is None:
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e3:
        return f"{v / 1e3:.1f}k"
    return f"{v:.0f}"


def fmt_stat(s, f=fmt_rate):
    if not s:
        return "-"
    return f"{f(s['median'])} [{f(s['min'])}-{f(s['max'])}]"


def _med(r, key, f):
    stat = r.get(key)
    return f(stat["median"]) if stat else "-"


def table(rows):
    """Medians (min-max for the rate and the CPU)."""
    head = ("mode", "scenario", "implementation", "dgram/s [min-max]", "offered", "Mbit/s",
            "drop", "CPU us/dgram [min-max]", "drop@fixed", "x C rate", "x C CPU",
            "x C-GSO rate", "x C-GSO CPU", "x kernel")
    lines = []
    for r in rows:
        if r["status"] == "not available":
            lines.append((r["mode"], r["scenario"], r["impl"], f"not available: {r['reason']}"))
            continue
        cells = (r["mode"], r["scenario"], r["impl"], fmt_stat(r.get("pps")),
                 _med(r, "offered_pps", fmt_rate),
                 _med(r, "mbps", lambda v: f"{v:.0f}"),
                 _med(r, "drop", lambda v: f"{v * 100:.1f}%"),
                 fmt_stat(r.get("cpu_us"), lambda v: f"{v:.2f}"),
                 _med(r, "cpu_drop", lambda v: f"{v * 100:.1f}%"),
                 *(_fmt_ratio(r.get(k)) for k in ("ratio_rate", "ratio_cpu", "ratio_rate_gso",
                                                  "ratio_cpu_gso", "ratio_rate_kernel")))
        lines.append(cells)
        if r["status"] == "error":
            lines.append(("", "", "", f"error: {r['reason'][:300]}"))
        for w in r.get("warnings", []):
            lines.append(("", "", "", f"warning: {w}"))
    widths = [max(len(str(x[i])) for x in [head] + [l for l in lines if len(l) == len(head)])
              for i in range(len(head))]
    out = ["  ".join(str(h).ljust(w) for h, w in zip(head, widths))]
    out.append("  ".join("-" * w for w in widths))
    for l in lines:
        if len(l) == len(head):
            out.append("  ".join(str(c).ljust(w) for c, w in zip(l, widths)).rstrip())
        else:
            prefix = "  ".join(str(c).ljust(w) for c, w in zip(l[:3], widths))
            out.append(prefix + "  " + l[3])
    out.append("dgram/s, offered, drop: full-rate phase (offered = load generator rate, "
               "drop = 1 - delivered/sent); CPU and drop@fixed: fixed-rate phase; "
               "x C = ratio to c-limit of the same scenario, x C-GSO to c-limit-gso, "
               "x kernel to the kernel's own forwarding (nftables DNAT/SNAT, no CPU figure)")
    return "\n".join(out)


def _fmt_ratio(v):
    return f"{v:.2f}" if v is not None else "-"


def extras_table(extras):
    out = []
    for e in extras:
        out.append(f"-- {e['section']} ({e['script']}): {e['status']}"
                   + (f": {e['reason']}" if e.get("reason") else ""))
        text = _section_table(e)
        if text:
            out.append(text)
            continue
        for r in e.get("rows", []):
            if isinstance(r, dict):
                out.append("   " + ", ".join(f"{k}={_short(v)}" for k, v in r.items()
                                             if not isinstance(v, (list, dict))))
            else:
                out.append(f"   {r}")
    return "\n".join(out)


def _section_table(extra):
    """The section script's own table of its rows, when it has a table(rows) (latency)."""
    if extra.get("status") != "ok" or not extra.get("rows"):
        return None
    try:
        import importlib
        mod = importlib.import_module(f"bench.{EXTRAS[extra['section']]}")
        return mod.table(extra["rows"]) if callable(getattr(mod, "table", None)) else None
    except Exception:            # a table that cannot be drawn falls back to key=value lines
        return None


def _short(v):
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)[:60]


def machine():
    info = {"python": platform.python_version(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "machine": platform.machine()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import relay
        info["relay_extensions"] = relay.EXTENSIONS
    except Exception as e:  # a half-built tree still gets benchmarked
        info["relay_extensions"] = f"unavailable: {e}"
    return info


# ---------------------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="relay benchmark: forward and redir against the C limit and the "
                    "relays users run instead, plus the raw sender and tunnel benches. "
                    "Writes DIR/results.json and DIR/chart.png and prints a table.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="fewer scenarios, short phases "
                   "(under 2 minutes on 2 cores)")
    g.add_argument("--smoke", action="store_true", help="every code path once with tiny "
                   "counts, 1 round (CI: fails when something is broken, never on speed)")
    p.add_argument("--out", default=os.path.join(BENCH_DIR, "out", "latest"),
                   help="output directory (default: bench/out/latest)")
    p.add_argument("--only", default=",".join(SECTIONS),
                   help=f"comma-separated sections to run, of {', '.join(SECTIONS)} "
                        "(default: all)")
    p.add_argument("--impls", default="",
                   help="comma-separated implementation names to keep (the anchors c-limit, "
                        "c-limit-gso and kernel always run)")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds per scenario (default: 3, 1 with --smoke)")
    p.add_argument("--load-cpus", default="0" if (os.cpu_count() or 1) > 1 else "",
                   help="CPUs the load generator and the sink are pinned to, e.g. 0 or 0,1; "
                        "'' for none (default: 0 when there are 2 CPUs or more)")
    p.add_argument("--impl-cpus", default="",
                   help="CPUs the implementation under test is pinned to, e.g. 1, so its CPU "
                        "time per datagram does not depend on sharing a core with the load "
                        "(default: '' = not pinned; N-worker rows then share those CPUs)")
    p.add_argument("--no-gso-load", dest="gso_load", action="store_false",
                   help="full-rate phases send with sendmmsg only; by default they send "
                        "UDP_SEGMENT buffers, which offers several times more than any "
                        "implementation can relay on 2 cores (the receiving socket "
                        "segments them, so the relay sees ordinary datagrams)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help="N of the relay's N-worker rows (default: number of CPUs)")
    a = p.parse_args(argv)
    a.sections = [s.strip() for s in a.only.split(",") if s.strip()]
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    if a.rounds is not None and not 1 <= a.rounds <= 50:
        p.error("--rounds must be 1-50")
    if a.workers < 1:
        p.error("--workers must be >= 1")
    for opt in ("load_cpus", "impl_cpus"):
        flag = "--" + opt.replace("_", "-")
        try:
            cpus = {int(c) for c in getattr(a, opt).split(",") if c.strip()} or None
        except ValueError:
            p.error(f"{flag} must be a comma-separated list of CPU numbers")
        if cpus and not cpus <= os.sched_getaffinity(0):
            p.error(f"{flag} {sorted(cpus)} not all usable here "
                    f"(usable: {sorted(os.sched_getaffinity(0))})")
        setattr(a, opt, cpus)
    return a


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    prof = profile("smoke" if args.smoke else "quick" if args.quick else "full")
    if args.rounds:
        prof.rounds = args.rounds
    os.makedirs(args.out, exist_ok=True)
    workdir = os.path.join(args.out, "work")
    os.makedirs(workdir, exist_ok=True)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        # Explicitly: a shell starts background jobs with SIGINT ignored.
        signal.signal(sig, _interrupt)
    raise_nofile_limit()
    t_start = time.monotonic()
    results = {
        "meta": {"command": "python -m bench " + " ".join(sys.argv[1:] if argv is None
                                                           else argv),
                 "profile": prof.name, "rounds": prof.rounds,
                 "phase_seconds": {"throughput": prof.t_rate, "cpu": prof.t_cpu},
                 "cpu_offered_pps": prof.cpu_rate, "workers_N": args.workers,
                 "load_cpus": sorted(args.load_cpus) if args.load_cpus else None,
                 "gso_load": args.gso_load,
                 "date": datetime.datetime.now().isoformat(timespec="seconds"),
                 "machine": machine()},
        "implementations": {}, "rows": [], "extras": [], "errors": [],
    }
    fatal = None
    interrupted = False
    runner = None
    impl_filter = {s for s in args.impls.split(",") if s}
    try:
        net_modes = [m for m in NET_MODES if m in args.sections]
        if net_modes:
            reason = topo.unavailable_reason()
            if reason:
                raise RuntimeError(f"cannot run the namespace benchmarks: {reason}")
            topo.cleanup_stale()
            tools = build_tools()
            runner = Runner(prof, tools, workdir, args.workers, args.load_cpus,
                            gso_load=args.gso_load, impl_cpus=args.impl_cpus)
            runner.topo = topo.BenchTopo()
            for m in net_modes:
                names = []
                for scen in prof.scenarios:
                    if scen.mode == m:
                        names += [c.name for c in implementations(scen, args.workers)
                                  if c.name not in names]
                results["implementations"][m] = names
            run_scenarios(runner, prof, impl_filter, net_modes, rows=results["rows"])
        # The scripts that pin (bench/latency.py) take the run's CPUs from the environment.
        for var, cpus in (("RELAY_BENCH_IMPL_CPUS", args.impl_cpus),
                          ("RELAY_BENCH_LOAD_CPUS", args.load_cpus)):
            os.environ[var] = ",".join(map(str, sorted(cpus))) if cpus else ""
        for section in args.sections:
            if section in EXTRAS:
                print(f"== {section}: bench/{EXTRAS[section]}.py", flush=True)
                # --quick leaves the scripts their own quick round count (time budget).
                rounds = None if prof.name == "quick" else prof.rounds
                timeout = prof.extra_timeout
                if section == "latency":
                    timeout = max(timeout, 100 * (rounds or 1))   # ~60 s a round in full
                results["extras"].append(run_extra(section, prof.name != "full", rounds,
                                                   timeout, workdir,
                                                   smoke=prof.name == "smoke",
                                                   duration=prof.extra_duration))
    except KeyboardInterrupt:
        interrupted = True
        results["errors"].append("interrupted")
    except Exception as e:
        traceback.print_exc()
        fatal = f"{type(e).__name__}: {e}"
        results["errors"].append(fatal)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)      # let the clean-up finish
        if runner and runner.topo:
            runner.topo.close()
    results["meta"]["seconds"] = round(time.monotonic() - t_start, 1)
    results["meta"]["interrupted"] = interrupted

    path = os.path.join(args.out, "results.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1, default=str)
    chart_path = os.path.join(args.out, "chart.png")
    try:
        from bench import chart
        chart.render(results, chart_path)
    except Exception as e:
        results["errors"].append(f"chart: {type(e).__name__}: {e}")
        with open(path, "w") as f:
            json.dump(results, f, indent=1, default=str)
    print()
    if results["rows"]:
        print(table(results["rows"]))
    if results["extras"]:
        print(extras_table(results["extras"]))
    print(f"\n{results['meta']['seconds']}s; results: {path}; chart: {chart_path}")
    broken = [r for r in results["rows"] if r["status"] == "error"]
    broken += [e for e in results["extras"] if e["status"] == "error"]
    c_ok = any(r["impl"] == "c-limit" and r.get("pps") for r in results["rows"])
    if results["errors"]:
        print("errors:", *results["errors"], sep="\n  ", file=sys.stderr)
    if broken:
        print(f"{len(broken)} row(s) failed (see 'error' above)", file=sys.stderr)
    if interrupted:
        return 130
    if fatal or broken or (results["rows"] and not c_ok):
        return 1
    return 0
