"""The benchmark's CI smoke variant: ``python -m bench --smoke`` runs every comparison once
with tiny counts and must produce a coherent results.json and a PNG chart. It checks that
nothing is broken, never how fast anything is."""
import pytest

from bench import harness


# --- the arithmetic, without namespaces


def _phase(sent, delivered, elapsed=1.0, first=10.0, last=11.0, replies=0, cpu=0.5):
    return {"sent": {"sent": sent, "elapsed": elapsed, "errors": 0, "replies": replies},
            "sink": {"count": delivered, "bytes": delivered * 64, "first": first, "last": last},
            "cpu": cpu}


def test_metrics_rate_drop_and_cpu():
    scen = harness.Scenario("forward", 1400)
    m = harness.Runner.metrics(scen, _phase(200_000, 150_000, last=12.0),
                               _phase(50_000, 50_000, cpu=0.1))
    assert m["pps"] == pytest.approx(75_000)           # the sink's 2 s window, not the 1 s
    assert m["mbps"] == pytest.approx(75_000 * 1400 * 8 / 1e6)
    assert m["drop"] == pytest.approx(0.25)
    assert m["cpu_us"] == pytest.approx(2.0)
    assert m["offered_pps"] == pytest.approx(200_000)


def test_metrics_echo_counts_round_trips():
    scen = harness.Scenario("redir", 64, kind="echo")
    m = harness.Runner.metrics(scen, _phase(1000, 1000, elapsed=0.5, replies=900),
                               _phase(500, 500, replies=400, cpu=0.002))
    assert m["pps"] == pytest.approx(1800)
    assert m["drop"] == pytest.approx(0.1)
    assert m["cpu_us"] == pytest.approx(5.0)


def test_metrics_refuse_an_empty_run():
    with pytest.raises(harness.MeasureError, match="nothing was delivered"):
        harness.Runner.metrics(harness.Scenario("forward", 64), _phase(1000, 0),
                               _phase(1000, 0))


def test_ratios_use_the_c_limit_of_the_same_scenario():
    def row(impl, scenario, pps, cpu):
        return {"mode": "forward", "scenario": scenario, "impl": impl,
                "pps": harness.summarize([pps]), "cpu_us": harness.summarize([cpu])}
    rows = [row("c-limit", "a", 100.0, 2.0), row("x", "a", 50.0, 3.0),
            row("c-limit", "b", 10.0, 1.0), row("x", "b", 20.0, 0.5)]
    harness.add_ratios(rows)
    assert [r["ratio_rate"] for r in rows] == [1.0, 0.5, 1.0, 2.0]
    assert [r["ratio_cpu"] for r in rows] == [1.0, 1.5, 1.0, 0.5]


def test_summarize_median_min_max():
    s = harness.summarize([3.0, None, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"]) == (2.0, 1.0, 3.0)
    assert harness.summarize([None]) is None


@pytest.mark.parametrize("argv,msg", [
    (["--only", "forward,bogus"], "unknown section"),
    (["--rounds", "0"], "--rounds"),
    (["--quick", "--smoke"], "not allowed"),
    (["--load-cpus", "x"], "--load-cpus"),
])
def test_bad_arguments_are_refused(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        harness.parse_args(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
