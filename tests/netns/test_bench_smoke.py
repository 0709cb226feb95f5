"""The benchmark's CI smoke variant: ``python -m bench --smoke`` runs every comparison once
with tiny counts and must produce a coherent results.json and a PNG chart. It checks that
nothing is broken, never how fast anything is."""
import json
import math
import subprocess
import sys

import pytest

from tests.support import REPO


FORWARD = ["c-limit", "c-limit-gso", "kernel", "relay-1w", "relay-Nw", "relay-nooffload-1w",
           "python-loop", "asyncio-uvloop", "socat", "v2ray-dokodemo", "ss-tunnel"]
REDIR = ["c-limit", "c-limit-gso", "kernel", "relay-raw-1w", "relay-raw-Nw", "relay-transparent-1w",
         "relay-transparent-Nw", "relay-raw-nooffload-1w", "python-loop", "asyncio-uvloop",
         "socat", "v2ray-dokodemo", "ss-redir"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# serial: the benchmark loads both cores for half a minute (tests beside it would lose their
# reply windows, and its own peers their start-up deadlines)
pytestmark = pytest.mark.serial


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, netns_available):
    out = tmp_path_factory.mktemp("bench-smoke")
    p = subprocess.Popen([sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = p.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        p.terminate()              # the bench cleans up on SIGTERM
        stdout, stderr = p.communicate(timeout=30)
        pytest.fail(f"python -m bench --smoke took over 150 s: {stdout[-2000:]}")
    r = subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr)
    r.pid = p.pid
    path = out / "results.json"
    assert path.exists(), f"no results.json; stderr: {stderr[-2000:]}"
    return r, out, json.loads(path.read_text())


def _rows(results, mode, scenario="64B 1 flow"):
    return {r["impl"]: r for r in results["rows"]
            if r["mode"] == mode and r["scenario"] == scenario}


def _check_row(row):
    assert row["status"] in ("ok", "not available", "error"), row
    if row["status"] == "not available":
        assert row["reason"] and isinstance(row["reason"], str), row
        assert "pps" not in row
        return
    assert row["status"] == "ok", f"{row['mode']} {row['scenario']} {row['impl']}: {row['reason']}"
    for key in ("pps", "mbps", "drop") + (() if row["impl"] == "kernel" else ("cpu_us",)):
        stat = row[key]
        assert stat is not None, (row["impl"], key)
        assert stat["min"] <= stat["median"] <= stat["max"]
        assert all(math.isfinite(v) for v in stat["values"])
    assert row["pps"]["median"] > 0
    assert 0.0 <= row["drop"]["median"] <= 1.0
    if row["impl"] == "kernel":                         # no process: no CPU figure
        assert row["cpu_us"] is None
        return
    assert row["cpu_us"]["median"] > 0
    assert len(row["rounds"]) == 1                      # --smoke: one round


def test_smoke_exits_cleanly(smoke):
    r, _, results = smoke
    assert r.returncode == 0, f"stdout: {r.stdout[-3000:]}\nstderr: {r.stderr[-3000:]}"
    assert results["errors"] == []
    assert results["meta"]["profile"] == "smoke" and results["meta"]["rounds"] == 1
    assert "c-limit" in r.stdout and "dgram/s" in r.stdout      # the table was printed


@pytest.mark.parametrize("mode,names", [("forward", FORWARD), ("redir", REDIR)])
def test_every_implementation_has_a_row(smoke, mode, names):
    _, _, results = smoke
    rows = _rows(results, mode)
    assert sorted(rows) == sorted(names)
    assert results["implementations"][mode][:len(names)] == names
    for row in rows.values():
        _check_row(row)


def test_every_scenario_row_is_complete(smoke):
    _, _, results = smoke
    kinds = {(r["mode"], r["kind"]) for r in results["rows"]}
    assert {("forward", "oneway"), ("forward", "echo"), ("forward", "bulk"),
            ("redir", "oneway"), ("redir", "echo"), ("redir", "bulk")} <= kinds
    bulk = {(r["mode"], r["impl"]) for r in results["rows"] if r["kind"] == "bulk"}
    assert {(m, i) for m in ("forward", "redir")
            for i in ("c-limit", "relay-bulk-off", "relay-bulk-on")} <= bulk
    assert any(r["flows"] > 1 for r in results["rows"])
    assert any(r["loadgen"] == "relay" for r in results["rows"])
    for row in results["rows"]:
        _check_row(row)


def test_c_limit_moves_datagrams_and_anchors_the_ratios(smoke):
    _, _, results = smoke
    limits = {(r["mode"], r["scenario"]): r for r in results["rows"]
              if r["impl"] == "c-limit" and r["status"] == "ok"}
    assert ("forward", "64B 1 flow") in limits and ("redir", "64B 1 flow") in limits
    for c in limits.values():
        assert c["pps"]["median"] > 0 and c["rounds"][0]["delivered"] > 0
        assert c["ratio_rate"] == pytest.approx(1.0)
    for r in results["rows"]:
        c = limits.get((r["mode"], r["scenario"]))
        if r["status"] == "ok" and c:
            assert r["ratio_rate"] == pytest.approx(r["pps"]["median"] / c["pps"]["median"])
            if r["cpu_us"]:
                assert r["ratio_cpu"] == pytest.approx(r["cpu_us"]["median"]
                                                       / c["cpu_us"]["median"])
            else:
                assert r["ratio_cpu"] is None


def test_gso_and_kernel_anchors(smoke):
    _, _, results = smoke
    rows = {(r["mode"], r["scenario"], r["impl"]): r for r in results["rows"]}
    for mode, scen in (("forward", "64B 1 flow"), ("forward", "1400B 1 flow bulk"),
                       ("redir", "64B 1 flow"), ("redir", "1400B 1 flow bulk")):
        g = rows[mode, scen, "c-limit-gso"]
        assert g["status"] == "ok" and g["ratio_rate_gso"] == pytest.approx(1.0), g
        r = rows[mode, scen, "c-limit"]
        assert r["ratio_rate_gso"] == pytest.approx(r["pps"]["median"] / g["pps"]["median"])
        k = rows[mode, scen, "kernel"]
        if mode == "redir":
            assert k["status"] == "not available" and "no kernel equivalent" in k["reason"]
            assert r["ratio_rate_kernel"] is None
        else:
            assert k["status"] == "ok" and k["ratio_rate_kernel"] == pytest.approx(1.0), k
            assert r["ratio_rate_kernel"] == pytest.approx(r["pps"]["median"]
                                                           / k["pps"]["median"])


def test_other_bench_scripts_are_reported(smoke):
    _, _, results = smoke
    extras = {e["section"]: e for e in results["extras"]}
    assert set(extras) == {"rawsend", "tunnel", "latency"}
    for e in extras.values():
        assert e["status"] in ("ok", "not available"), e
        if e["status"] == "not available":
            assert e["reason"]
        else:
            assert isinstance(e["rows"], list) and e["rows"]


def test_latency_rows(smoke):
    _, _, results = smoke
    lat = {e["section"]: e for e in results["extras"]}["latency"]
    assert lat["status"] == "ok", lat
    rows = {(r["mode"], r["rate"], r["impl"]): r for r in lat["rows"]}
    for mode, relay in (("forward", "relay-1w"), ("redir", "relay-raw-1w")):
        for rate in (1000, 50000):
            for impl in ("direct", "c-limit", relay):
                r = rows[mode, rate, impl]
                assert r["status"] == "ok", r
                assert r["samples"] > 0 and r["sent"] >= r["samples"]
                assert 0 < r["p50_us"] <= r["p99_us"] <= r["p999_us"] <= r["max_us"]
            assert rows[mode, rate, "direct"]["added_p99_us"] == 0
            c = rows[mode, rate, "c-limit"]
            assert rows[mode, rate, relay]["p99_vs_c_limit_us"] == pytest.approx(
                rows[mode, rate, relay]["p99_us"] - c["p99_us"])


def test_chart_is_a_png(smoke):
    _, out, _ = smoke
    data = (out / "chart.png").read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000


def test_no_namespace_left_behind(smoke):
    r, _, _ = smoke
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [line for line in ns.splitlines() if line.startswith(f"rlb{r.pid}x")]
