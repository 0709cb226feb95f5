"""bench/bench_tunnel.py's stage tools: `blast --tunnel` writes frames to a tunnel-server,
`sink --tunnel` plays the server end for a tunnel-client and counts the frames. Checks
that every datagram is counted (the stage figures rest on it), never how fast or how many
a saturated stage loses."""
import shutil

import pytest

from bench import bench_tunnel as bt
from bench.cbuild import compile_c

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="the bench tools need gcc")


@pytest.fixture(scope="module")
def tools():
    root = bt.ROOT
    return (compile_c(f"{root}/bench/c/blast.c"), compile_c(f"{root}/bench/c/sink.c"))


@pytest.mark.parametrize("impl", ["client", "server", "tunnel", "forward"])
@pytest.mark.parametrize("size,flows", [(64, 1), (1350, 3)])
def test_every_datagram_of_a_paced_run_is_counted(tools, impl, size, flows):
    r = bt.one_run(impl, size, flows, 0.3, tools, rate=20_000)
    assert r["offered_per_s"] > 0
    assert r["delivery"] == 1.0, r
    assert r["dgrams_per_s"] > 0 and r["us_per_dgram"] > 0


def test_a_full_rate_server_stage_accounts_for_every_datagram(tools):
    # blast --tunnel is paced by TCP: the server takes every frame and sends every datagram
    # or counts it as dropped; the sink receives it or the kernel counts it as dropped at
    # the sink's full socket. How many a busy machine loses is a figure of the benchmark
    # (`delivery`), not of this test.
    r = bt.one_run("server", 512, 2, 0.3, tools)
    a = r["accounting"]
    server_drops = sum(v for k, v in a["drops"].items() if k != "sink_rcvbuf")
    assert a["sent"] > 0 and a["delivered"] > 0, a
    assert a["server_sent"] + server_drops == a["sent"], a
    assert a["delivered"] + a["drops"]["sink_rcvbuf"] == a["server_sent"], a
    assert r["delivery"] <= 1.0 and r["dgrams_per_s"] > 0 and r["us_per_dgram"] > 0, r


@pytest.mark.parametrize("argv,msg", [
    (["--plain-load"], "--plain-load goes with --stages"),
    (["--stages", "--rate", "1000"], "--rate goes with --plain-load"),
])
def test_bad_arguments_are_refused(argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        bt.main(argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err
