"""The benchmark's anchors and latency tools: c-limit-gso (bench/c/fwd_mmsg.c --gso), the
kernel's forwarding, the ratio columns, and bench/c/pingpong.c with bench/latency.py's
percentiles. On loopback only; checks that every datagram is accounted for and that the
arithmetic is right, never how fast anything is."""
import array
import json
import shutil
import signal
import socket
import subprocess
import time

import pytest

from bench import harness, latency, peers
from bench.cbuild import compile_c

ROOT = peers.ROOT
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="the bench tools need gcc")


@pytest.fixture(scope="module")
def tools():
    return {n: compile_c(f"{ROOT}/bench/c/{n}.c")
            for n in ("blast", "sink", "fwd_mmsg", "pingpong")}


def _free_port(host):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _hp(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class _Proc:
    def __init__(self, args, **kw):
        self.p = subprocess.Popen([str(a) for a in args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)

    def stop(self):
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            out, err = self.p.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, err = self.p.communicate()
        return out, err


def _sink(tools, host, echo=False):
    port = _free_port(host)
    s = _Proc([tools["sink"], "--listen", _hp(host, port), "--max-time", 30]
              + (["--echo"] if echo else []))
    assert s.p.stdout.readline().strip() == "ready"
    return s, port


def _start_forwarder(tools, host, sport):
    """fwd_mmsg --gso on a free port, once its listen socket is bound. It prints nothing
    when ready, so the port is probed; the bound is generous (CI runs two test runs beside
    each other on 2 cores) and a forwarder that exited (its port taken between the probe
    and its bind) is started again on another port, its error kept for the message."""
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    errors = []
    for _ in range(3):
        fport = _free_port(host)
        fwd = _Proc([tools["fwd_mmsg"], "--listen", _hp(host, fport), "--to", _hp(host, sport),
                     "--gso"])
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline and fwd.p.poll() is None:
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                try:
                    s.bind((host, fport))
                except OSError:
                    return fwd, fport
            time.sleep(0.02)
        errors.append(fwd.stop()[1].strip() or "still not bound after 30 s")
    raise AssertionError(f"fwd_mmsg never bound on {host}: {errors}")


# --- c-limit-gso: every segment arrives, both ways


@needs_gcc
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("gso_load", [True, False], ids=["gso-load", "plain-load"])
def test_gso_forwarder_moves_every_segment_both_ways(tools, host, gso_load):
    sink, sport = _sink(tools, host, echo=True)
    try:
        fwd, fport = _start_forwarder(tools, host, sport)
    except BaseException:
        sink.stop()
        raise
    try:
        args = [tools["blast"], "--dst", _hp(host, fport), "--size", 300, "--flows", 2,
                "--batch", 4, "--count", 2048, "--duration", 5, "--rate", 20000,
                "--warmup", 1, "--echo"]
        r = subprocess.run([str(a) for a in args + (["--gso"] if gso_load else [])],
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        sent = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        sout, _ = sink.stop()           # no echo after this one ...
        time.sleep(0.5)                 # ... and the forwarder has sent the last back
        _, ferr = fwd.stop()
    counters = json.loads(ferr.strip().splitlines()[-1])
    report = json.loads(sout.strip().splitlines()[-1])
    n = sent["sent"]
    assert n >= 2048
    assert report["markers"]["1"]["count"] == n           # every segment reached the sink
    assert report["markers"]["1"]["bytes"] == n * 300
    assert counters["up"] == n + 2                        # + the 2 warm-up datagrams
    assert counters["drop_up"] == counters["drop_down"] == 0
    assert counters["down"] == report["echoed"]           # every echo went back
    assert counters["associations"] == 2


@needs_gcc
def test_gso_forwarder_refuses_nothing_it_knows(tools):
    r = subprocess.run([tools["fwd_mmsg"], "--listen", "127.0.0.1:1", "--gso", "--bogus"],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 2 and "unknown option --bogus" in r.stderr


# --- peers and ratio columns


def test_anchors_lead_every_scenario():
    names = [c.name for c in harness.implementations(harness.Scenario("forward", 64), 2)]
    assert names[:4] == ["c-limit", "c-limit-gso", "kernel", "relay-1w"]
    bulk = [c.name for c in harness.implementations(harness.Scenario("redir", 1400,
                                                                     kind="bulk"), 2)]
    assert bulk == ["c-limit", "c-limit-gso", "kernel", "relay-bulk-off", "relay-bulk-on"]


def test_c_limit_gso_command_line():
    p = peers.CLimitGso(None, "/tmp", "redir", {"fwd_mmsg": "/x/fwd_mmsg"})
    argv = p._commands(("0.0.0.0", 7001), None)[0]
    assert argv[0] == "/x/fwd_mmsg" and argv[-1] == "--gso"
    assert "--full-cone" in argv and "--tproxy" in argv
    f = peers.CLimitGso(None, "/tmp", "forward", {"fwd_mmsg": "/x/fwd_mmsg"})
    assert f._commands(("192.0.2.1", 7000), ("198.51.100.2", 9000))[0][-3:] == \
        ["--to", "198.51.100.2:9000", "--gso"]


def test_kernel_anchor_rules_and_modes():
    text = peers.Kernel.ruleset("t", ("192.0.2.1", 7000), ("198.51.100.2", 9000),
                                "198.51.100.1")
    assert "ip daddr 192.0.2.1 udp dport 7000 dnat to 198.51.100.2:9000" in text
    assert "ip daddr 198.51.100.2 udp dport 9000 snat to 198.51.100.1" in text
    assert "priority dstnat" in text and "priority srcnat" in text
    assert "no kernel equivalent of redir" in peers.Kernel.unavailable("redir")
    assert peers.Kernel.has_cpu is False


def _row(impl, scenario, pps, cpu):
    return {"mode": "forward", "scenario": scenario, "impl": impl, "status": "ok",
            "pps": harness.summarize([pps]),
            "cpu_us": harness.summarize([cpu]) if cpu is not None else None}


def test_ratios_to_every_anchor():
    rows = [_row("c-limit", "a", 100.0, 2.0), _row("c-limit-gso", "a", 400.0, 1.0),
            _row("kernel", "a", 500.0, None), _row("x", "a", 200.0, 1.5),
            _row("c-limit", "b", 10.0, 1.0), _row("x", "b", 20.0, 0.5)]
    harness.add_ratios(rows)
    x = rows[3]
    assert (x["ratio_rate"], x["ratio_cpu"]) == (2.0, 0.75)
    assert (x["ratio_rate_gso"], x["ratio_cpu_gso"]) == (0.5, 1.5)
    assert x["ratio_rate_kernel"] == 0.4 and "ratio_cpu_kernel" not in x
    assert rows[2]["ratio_cpu"] is None and rows[2]["ratio_rate_kernel"] == 1.0
    # scenario b has no GSO or kernel row: no ratio, not a wrong one
    assert rows[5]["ratio_rate"] == 2.0
    assert rows[5]["ratio_rate_gso"] is None and rows[5]["ratio_rate_kernel"] is None


def test_table_has_the_anchor_columns():
    rows = [_row("c-limit", "a", 100.0, 2.0), _row("c-limit-gso", "a", 400.0, 1.0),
            _row("kernel", "a", 500.0, None), _row("x", "a", 200.0, 1.5)]
    for r in rows:
        for k in ("offered_pps", "mbps", "drop", "cpu_drop"):
            r[k] = None
    harness.add_ratios(rows)
    text = harness.table(rows)
    head = text.splitlines()[0].split()
    assert "C-GSO" in head and "kernel" in head
    x = [line for line in text.splitlines() if line.startswith("forward  a") and " x " in line]
    assert x and x[0].split()[-5:] == ["2.00", "0.75", "0.50", "1.50", "0.40"]
    kernel = [line for line in text.splitlines() if " kernel " in line][0]
    assert kernel.split()[-5:] == ["5.00", "-", "1.25", "-", "1.00"]


# --- latency: percentiles, rows, and pingpong.c itself


@pytest.mark.parametrize("values,q,want", [
    ([5], 0.5, 5), ([1, 2, 3, 4], 0.5, 2), ([1, 2, 3, 4], 0.75, 3), ([1, 2, 3, 4], 0.76, 4),
    (list(range(1, 1001)), 0.99, 990), (list(range(1, 1001)), 0.999, 999),
    (list(range(1, 1001)), 1.0, 1000), ([3, 7], 0.0, 3)])
def test_percentile_is_nearest_rank(values, q, want):
    assert latency.percentile(values, q) == want


def test_percentile_edges():
    assert latency.percentile([], 0.5) is None
    with pytest.raises(ValueError):
        latency.percentile([1], 1.5)
    s = latency.summarize_samples([3000, 1000, 2000])
    assert s == {"samples": 3, "p50_us": 2.0, "p90_us": 3.0, "p99_us": 3.0, "p999_us": 3.0,
                 "min_us": 1.0, "max_us": 3.0, "mean_us": 2.0}


def test_rows_pool_rounds_and_subtract_direct_and_c_limit():
    def res(*rounds):
        return {"runs": [{"sent": len(r), "lost": 0, "late": 0, "rate": 1000.0,
                          "samples": len(r), "p99_us": max(r) / 1000} for r in rounds],
                "samples": [array.array("I", r) for r in rounds], "errors": []}
    rows = [latency.make_row("forward", 1000, latency.Direct, res([10_000] * 10)),
            latency.make_row("forward", 1000, peers.CLimit, res([20_000] * 5, [30_000] * 5)),
            latency.make_row("forward", 1000, peers.SsTunnel,
                             {"status": "not available", "reason": "no"})]
    latency.add_deltas(rows)
    d, c, ss = rows
    assert d["added_p99_us"] == 0 and d["samples"] == 10
    assert c["samples"] == 10 and c["p50_us"] == 20.0 and c["p99_us"] == 30.0
    assert c["added_p50_us"] == 10.0 and c["added_p99_us"] == 20.0
    assert c["p99_vs_c_limit_us"] == 0.0
    assert c["p99_rounds_us"]["min"] == 20.0 and c["p99_rounds_us"]["max"] == 30.0
    assert ss["status"] == "not available" and "added_p99_us" not in ss
    assert "not available: no" in latency.table(rows)


def test_a_row_without_echoes_is_an_error():
    r = latency.make_row("redir", 50000, peers.CLimit,
                         {"runs": [{"sent": 5, "lost": 5, "late": 0, "rate": 1.0,
                                    "samples": 0}], "samples": [array.array("I")],
                          "errors": []})
    assert r["status"] == "error" and "no echo" in r["reason"]


def test_cpus_come_from_the_bench_run(monkeypatch):
    monkeypatch.delenv("RELAY_BENCH_IMPL_CPUS", raising=False)
    assert latency.cpus_from_env("RELAY_BENCH_IMPL_CPUS", {7}) == {7}
    monkeypatch.setenv("RELAY_BENCH_IMPL_CPUS", "1,0")
    assert latency.cpus_from_env("RELAY_BENCH_IMPL_CPUS", None) == {0, 1}
    monkeypatch.setenv("RELAY_BENCH_IMPL_CPUS", "")
    assert latency.cpus_from_env("RELAY_BENCH_IMPL_CPUS", {0}) is None


def test_pingpong_command_and_plan():
    argv = latency.pingpong_command("/pp", ("198.51.100.2", 9000), 50000, 0.5, dump="/d")
    assert argv[:3] == ["/pp", "--dst", "198.51.100.2:9000"]
    assert argv[argv.index("--count") + 1] == "25001"
    assert argv[argv.index("--inflight") + 1] == "64" and argv[-2:] == ["--dump", "/d"]
    assert latency.plan(False, False, None) == [(1000, 3.0), (50000, 1.0)]
    assert latency.plan(False, True, None)[0][0] == 1000
    assert latency.plan(True, False, 0.2) == [(1000, 0.2), (50000, 0.2)]


@needs_gcc
@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
@pytest.mark.parametrize("rate", [1000, 50000])
def test_pingpong_matches_every_echo_and_its_percentiles_match_python(tools, tmp_path, host,
                                                                      rate):
    sink, port = _sink(tools, host, echo=True)
    dump = tmp_path / "rtt.bin"
    try:
        # a long timeout: a loaded machine's stall must not turn an echo into a late one
        r = subprocess.run(latency.pingpong_command(str(tools["pingpong"]), (host, port),
                                                    rate, 0.1, dump=str(dump),
                                                    timeout_ms=5000),
                           capture_output=True, text=True, timeout=30)
    finally:
        sout, _ = sink.stop()
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    echo = json.loads(sout.strip().splitlines()[-1])
    n = rate // 10 + 1
    assert out["sent"] <= n and out["sent"] > 0
    assert out["received"] + out["lost"] + out["send_errors"] == out["sent"]
    assert out["late"] == out["bad"] == out["send_errors"] == 0
    assert echo["markers"]["1"]["count"] == out["sent"]     # the echo saw each one once
    assert echo["markers"]["0"]["count"] == 10               # the warm-up, not recorded
    samples = latency.read_dump(dump)
    assert len(samples) == out["samples"] == out["received"]
    py = latency.summarize_samples(samples)
    for k in ("p50_us", "p90_us", "p99_us", "p999_us", "min_us", "max_us"):
        assert py[k] == pytest.approx(out[k], abs=0.0015), k


@needs_gcc
@pytest.mark.parametrize("argv,msg", [
    (["--dst", "127.0.0.1:9"], None),
    (["--dst", "127.0.0.1:9", "--rate", "0"], "--rate"),
    (["--dst", "127.0.0.1:9", "--size", "8"], "--size"),
    (["--dst", "127.0.0.1:9", "--inflight", "0"], "--inflight"),
    (["--rate", "10"], "--dst is required"),
])
def test_pingpong_refuses_bad_arguments(tools, argv, msg):
    if msg is None:              # a port nobody answers on: every datagram counts as lost
        argv = argv + ["--duration", "0.05", "--rate", "200", "--warmup", "0",
                       "--timeout-ms", "20"]
        r = subprocess.run([str(tools["pingpong"])] + argv, capture_output=True, text=True,
                           timeout=10)
        out = json.loads(r.stdout)
        # lost, or refused at send once the port-unreachable came back
        assert r.returncode == 0 and out["received"] == 0
        assert out["lost"] + out["send_errors"] == out["sent"] > 0
        assert out["p99_us"] == -1
        return
    r = subprocess.run([str(tools["pingpong"])] + argv, capture_output=True, text=True,
                       timeout=10)
    assert r.returncode == 2 and msg in r.stderr
