"""Added round-trip latency through forward and redir (``python -m bench`` section
``latency``; alone: ``python -m bench.latency``).

In the bench's namespaces (bench/topo.py) ``bench/c/pingpong.c`` in ``gen`` sends paced
datagrams, each with a sequence number and its CLOCK_MONOTONIC send time, to an echo
(``bench/c/sink.c --echo``) in ``sink``, and records the round-trip time of each echo:

    direct           no relay: the client talks to the sink itself, routed by mid's kernel
                     (IPv4 forwarding on in mid for this row only, off again after it)
    c-limit          bench/c/fwd_mmsg.c (redir: --tproxy --full-cone)
    relay-1w         relay forward, 1 worker (redir: relay-raw-1w and relay-transparent-1w, the two reply ways)
    v2ray-dokodemo   v2ray dokodemo-door (where installed)
    ss-tunnel        ss-tunnel -> ss-server (forward) / ss-redir -> ss-server (redir)

at 1,000 datagrams/s (one in flight at a time in practice) and 50,000 datagrams/s (up to
64 in flight, echoes matched by sequence number). Implementations alternate round by round
(A B C A B C); each row pools the samples of its rounds and reports p50/p90/p99/p99.9/max
(nearest rank, as pingpong.c does), the per-round p99 [min-max], and what the relay adds:
``added_*_us`` = the row's percentile - direct's of the same mode and rate, and
``p99_vs_c_limit_us`` = the row's p99 - c-limit's p99 (issue 18's target: <= 20 us).
"""
import argparse
import array
import json
import os
import subprocess
import sys

from bench import loadgen, peers, topo
from bench.cbuild import compile_c

ROOT = peers.ROOT
C_DIR = os.path.join(ROOT, "bench", "c")
SINK_PORT = 9000
QUANTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99), ("p999", 0.999))
RATES = (1000, 50000)
INFLIGHT = 64
TIMEOUT_MS = 200


Direct = peers.Direct


def implementations(mode):
    if mode == "forward":
        relays = [peers.Relay.variant("relay-1w", workers=1)]
    else:                   # both reply ways: raw packets, or a transparent socket per source
        relays = [peers.Relay.variant("relay-raw-1w", workers=1, reply="raw"),
                  peers.Relay.variant("relay-transparent-1w", workers=1, reply="transparent")]
    ss = peers.SsTunnel if mode == "forward" else peers.SsRedir
    return [Direct, peers.CLimit] + relays + [peers.V2rayDokodemo, ss]


# ---------------------------------------------------------------------------------------
# Percentiles (the same definition as pingpong.c)

def percentile(sorted_values, q):
    """Nearest rank: the value at index ceil(q * n) - 1 of the sorted values (None when
    there are none)."""
    n = len(sorted_values)
    if not n:
        return None
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"quantile {q} not in [0, 1]")
    want = q * n
    k = int(want)
    if k < want:
        k += 1
    return sorted_values[min(max(k, 1), n) - 1]


def summarize_samples(samples_ns):
    """p50/p90/p99/p999/max/min/mean in us of round-trip samples in ns."""
    s = sorted(samples_ns)
    out = {"samples": len(s)}
    if not s:
        return out
    for key, q in QUANTILES:
        out[key + "_us"] = percentile(s, q) / 1000.0
    out.update(min_us=s[0] / 1000.0, max_us=s[-1] / 1000.0,
               mean_us=sum(s) / len(s) / 1000.0)
    return out


def read_dump(path):
    """The uint32 ns samples pingpong --dump wrote."""
    a = array.array("I")
    with open(path, "rb") as f:
        data = f.read()
    if len(data) % a.itemsize:
        raise ValueError(f"{path}: {len(data)} bytes is not a whole number of samples")
    a.frombytes(data)
    return a


def pingpong_command(binary, dst, rate, duration, size=64, inflight=INFLIGHT,
                     timeout_ms=TIMEOUT_MS, warmup=10, dump=None):
    args = [binary, "--dst", f"{dst[0]}:{dst[1]}", "--size", size, "--rate", rate,
            "--duration", duration, "--count", int(rate * duration) + 1,
            "--inflight", inflight, "--timeout-ms", timeout_ms, "--warmup", warmup]
    if dump:
        args += ["--dump", dump]
    return [str(a) for a in args]


def plan(quick, smoke, duration):
    """(rate, seconds) of each measured point."""
    if duration:
        return [(r, duration) for r in RATES]
    if smoke:
        return [(1000, 0.1), (50000, 0.05)]
    if quick:
        return [(1000, 1.0), (50000, 0.3)]
    return [(1000, 3.0), (50000, 1.0)]


# ---------------------------------------------------------------------------------------

def add_deltas(rows):
    """added_*_us against direct, p99_vs_c_limit_us against c-limit (same mode and rate)."""
    ref = {}
    for r in rows:
        if r.get("status") == "ok" and r["impl"] in ("direct", "c-limit"):
            ref[(r["mode"], r["rate"], r["impl"])] = r
    for r in rows:
        if r.get("status") != "ok":
            continue
        d = ref.get((r["mode"], r["rate"], "direct"))
        for key, _ in QUANTILES:
            k = key + "_us"
            r["added_" + k] = (r[k] - d[k]) if d and k in d and k in r else None
        c = ref.get((r["mode"], r["rate"], "c-limit"))
        r["p99_vs_c_limit_us"] = (r["p99_us"] - c["p99_us"]
                                  if c and "p99_us" in c and "p99_us" in r else None)
    return rows


def make_row(mode, rate, cls, res):
    row = {"section": "latency", "mode": mode, "rate": rate, "impl": cls.name,
           "note": getattr(cls, "note", "")}
    if "status" in res:
        row.update(status=res["status"], reason=res["reason"])
        return row
    runs = res["runs"]
    samples = array.array("I")
    for s in res["samples"]:
        samples.extend(s)
    row.update(summarize_samples(samples))
    p99s = [x["p99_us"] for x in runs if x.get("samples")]
    row["p99_rounds_us"] = ({"median": sorted(p99s)[len(p99s) // 2], "min": min(p99s),
                             "max": max(p99s)} if p99s else None)
    row["sent"] = sum(x["sent"] for x in runs)
    row["lost"] = sum(x["lost"] for x in runs)
    row["late"] = sum(x["late"] for x in runs)
    row["achieved_rate"] = (sorted(x["rate"] for x in runs)[len(runs) // 2] if runs else None)
    row["rounds"] = runs
    if res["errors"]:
        row.update(status="error", reason="; ".join(res["errors"])[:2000])
    elif not row.get("samples"):
        row.update(status="error", reason="no echo came back")
    else:
        row.update(status="ok", reason=None)
    return row


def _one_point(runner, tools, mode, peer_cls, rate, seconds, workdir, rnd):
    dst = (topo.SINK4, SINK_PORT) if (mode == "redir" or peer_cls is Direct) else \
        (topo.MID4_GEN, 7000)
    dump = os.path.join(workdir, f"lat-{mode}-{peer_cls.name}-{rate}-{rnd}.bin")
    cmd = pingpong_command(tools["pingpong"], dst, rate, seconds, dump=dump)
    r = subprocess.run(runner.topo.gen.command(cmd, runner.load_cpus), capture_output=True,
                       text=True, timeout=seconds + 30)
    if r.returncode != 0:
        raise loadgen.LoadError(f"pingpong failed ({r.returncode}): {r.stderr.strip()[-300:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    samples = read_dump(dump)
    os.unlink(dump)
    return out, samples


def cpus_from_env(var, default):
    """A CPU set from a comma-separated environment variable that python -m bench sets
    for its sections ('' = none); default when it is not set."""
    text = os.environ.get(var)
    if text is None:
        return default
    return {int(c) for c in text.split(",") if c.strip()} or None


def run(quick=False, rounds=None, duration=None, log=print, modes=("forward", "redir"),
        load_cpus="default", impl_cpus=None, impls=None):
    """Rows of the latency section; bench/harness.py calls this. RELAY_BENCH_SMOKE=1:
    tiny counts, one round."""
    from bench.harness import Runner, build_tools
    smoke = os.environ.get("RELAY_BENCH_SMOKE") == "1"
    rounds = rounds or (1 if smoke or quick else 3)
    points = plan(quick, smoke, duration)
    if smoke and impls is None:
        # CI: every code path once; the third-party relays run the same path as c-limit
        impls = {"c-limit", "relay-1w", "relay-raw-1w"}
    if load_cpus == "default":
        load_cpus = cpus_from_env("RELAY_BENCH_LOAD_CPUS",
                                  {0} if (os.cpu_count() or 1) > 1 else None)
    if impl_cpus is None:
        impl_cpus = cpus_from_env("RELAY_BENCH_IMPL_CPUS", None)
    reason = topo.unavailable_reason()
    if reason:
        raise RuntimeError(f"cannot run the latency bench: {reason}")
    topo.cleanup_stale()
    tools = build_tools()
    tools["pingpong"] = str(compile_c(os.path.join(C_DIR, "pingpong.c")))
    workdir = os.path.join(ROOT, "bench", "out", "latency")
    os.makedirs(workdir, exist_ok=True)
    runner = Runner(None, tools, workdir, 1, load_cpus, log=log, impl_cpus=impl_cpus)
    rows = []
    runner.topo = topo.BenchTopo()
    try:
        for mode in modes:
            classes = [c for c in implementations(mode) if not impls or c.name in impls
                       or c is Direct]
            res = {}
            for cls in classes:
                why = cls.unavailable(mode)
                for rate, _ in points:
                    res[cls.name, rate] = ({"status": "not available", "reason": why} if why
                                           else {"runs": [], "samples": [], "errors": []})
            live = [c for c in classes if "runs" in res[c.name, points[0][0]]]
            try:
                for rnd in range(1, rounds + 1):
                    for cls in live:
                        _peer_round(runner, tools, mode, cls, points, res, workdir, rnd, log)
            finally:
                part = [make_row(mode, rate, cls, res[cls.name, rate])
                        for rate, _ in points for cls in classes]
                for r in part:
                    r["impl_cpus"] = sorted(impl_cpus) if impl_cpus else None
                    r["load_cpus"] = sorted(load_cpus) if load_cpus else None
                rows += add_deltas(part)
    finally:
        if runner.tproxy_on:
            runner.ensure_tproxy(False)
        runner.topo.close()
    return rows


def _peer_round(runner, tools, mode, cls, points, res, workdir, rnd, log):
    from bench.harness import MEASURE_ERRORS
    sink = peer = None
    try:
        if cls is Direct:
            runner.ensure_tproxy(False)
            peer = Direct(runner.topo.mid, workdir, mode).start(None, None)
        else:
            peer = runner.start_peer(cls, mode)
        sink = loadgen.Sink(runner.topo.sink, tools["sink"], f"{topo.SINK4}:{SINK_PORT}",
                            echo=True, cpus=runner.load_cpus).start()
        for rate, seconds in points:
            r = res[cls.name, rate]
            try:
                out, samples = _one_point(runner, tools, mode, cls, rate, seconds, workdir, rnd)
            except MEASURE_ERRORS + (subprocess.TimeoutExpired,) as e:
                r["errors"].append(f"round {rnd}: {e}")
                log(f"   {rnd} {mode} {cls.name:16s} {rate:6d}/s ERROR {e}")
                continue
            r["runs"].append(out)
            r["samples"].append(samples)
            log(f"   {rnd} {mode:7s} {cls.name:16s} {rate:6d}/s  p50 {out['p50_us']:8.1f} us  "
                f"p99 {out['p99_us']:8.1f} us  p99.9 {out['p999_us']:8.1f} us  "
                f"lost {out['lost']}")
    except MEASURE_ERRORS as e:
        for rate, _ in points:
            res[cls.name, rate]["errors"].append(f"round {rnd}: {cls.name} did not start: {e}")
        log(f"   {rnd} {mode} {cls.name} did not start: {e}")
    finally:
        if sink is not None:
            sink.stop()
        if peer is not None:
            peer.stop()


def table(rows):
    head = ("mode", "rate/s", "implementation", "p50 us", "p99 us [rounds min-max]",
            "p99.9 us", "max us", "+p50", "+p99", "+p99.9", "p99 - C", "lost", "sent/s")
    lines = []

    def f(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    for r in rows:
        if r["status"] != "ok":
            lines.append((r["mode"], str(r["rate"]), r["impl"], f"{r['status']}: {r['reason']}"))
            continue
        pr = r.get("p99_rounds_us") or {}
        lines.append((r["mode"], str(r["rate"]), r["impl"], f(r.get("p50_us")),
                      f"{f(r.get('p99_us'))} [{f(pr.get('min'))}-{f(pr.get('max'))}]",
                      f(r.get("p999_us")), f(r.get("max_us")), f(r.get("added_p50_us")),
                      f(r.get("added_p99_us")), f(r.get("added_p999_us")),
                      f(r.get("p99_vs_c_limit_us")), f"{r['lost']}/{r['sent']}",
                      f(r.get("achieved_rate"), ".0f")))
    full = [head] + [l for l in lines if len(l) == len(head)]
    widths = [max(len(x[i]) for x in full) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
           "  ".join("-" * w for w in widths)]
    for l in lines:
        if len(l) == len(head):
            out.append("  ".join(c.ljust(w) for c, w in zip(l, widths)).rstrip())
        else:
            out.append("  ".join(c.ljust(w) for c, w in zip(l[:3], widths)) + "  " + l[3])
    out.append("round trips through the relay to bench/c/sink.c --echo; percentiles of the "
               "pooled rounds (nearest rank); +pXX = minus direct's (no relay); "
               "p99 - C = minus c-limit's p99; sent/s below the rate: the 64-datagram window "
               "was full (round trips too long for the rate)")
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.latency", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true",
                   help="short points (1 s at 1k/s, 0.3 s at 50k/s), 1 round")
    g.add_argument("--smoke", action="store_true", help="tiny counts, 1 round")
    p.add_argument("--rounds", type=int, default=None,
                   help="rounds (default 3; --quick, --smoke 1)")
    p.add_argument("--duration", type=float, default=None,
                   help="seconds of every point (default: 3 s at 1k/s, 1 s at 50k/s)")
    p.add_argument("--modes", default="forward,redir", help="forward,redir (default both)")
    p.add_argument("--impls", default="", help="comma-separated names to keep (direct always runs)")
    p.add_argument("--load-cpus", default=None, help="CPUs of pingpong and the echo (default 0)")
    p.add_argument("--impl-cpus", default=None, help="CPUs of the implementation (default: any)")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    if a.rounds is not None and not 1 <= a.rounds <= 50:
        p.error("--rounds must be 1-50")
    if a.duration is not None and not 0 < a.duration <= 60:
        p.error("--duration must be in (0, 60]")
    modes = tuple(m for m in a.modes.split(",") if m)
    if not modes or set(modes) - {"forward", "redir"}:
        p.error("--modes takes forward and/or redir")

    def cpus(text, flag):
        if text is None:
            return "default" if flag == "--load-cpus" else None
        try:
            return {int(c) for c in text.split(",") if c.strip()} or None
        except ValueError:
            p.error(f"{flag} must be a comma-separated list of CPU numbers")

    if a.smoke:
        os.environ["RELAY_BENCH_SMOKE"] = "1"
    rows = run(quick=a.quick, rounds=a.rounds, duration=a.duration, modes=modes,
               load_cpus=cpus(a.load_cpus, "--load-cpus"),
               impl_cpus=cpus(a.impl_cpus, "--impl-cpus"),
               impls={s for s in a.impls.split(",") if s} or None)
    return emit(rows, table(rows), a.json)


def emit(rows, text, json_path=None):
    """Print a script's table, write its rows to json_path; exit status 1 on an error row."""
    print(text)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"rows": rows}, f, indent=1, default=str)
    return 1 if any(r["status"] == "error" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
