"""The `relay` command: help, configuration errors, `relay run -c` and SIGHUP reload."""
import os
import json
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.namespaces import wait_until
from tests.relayproc import REPO, LoopbackEcho, RelayProcess, free_udp_port, relay_env, udp_roundtrip

SUBCOMMANDS = ["forward", "redir", "run", "stats", "rules", "tunnel-server", "tunnel-client", "socks5"]


def relay(*args, timeout=30):
    return subprocess.run([sys.executable, "-m", "relay", *args], capture_output=True, text=True,
                          env=relay_env(), timeout=timeout, cwd=REPO)


def test_top_level_help_lists_every_command():
    r = relay("--help")
    assert r.returncode == 0
    for cmd in SUBCOMMANDS:
        assert cmd in r.stdout


@pytest.mark.parametrize("cmd", SUBCOMMANDS)
def test_every_subcommand_explains_its_options(cmd):
    r = relay(cmd, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: relay " + cmd in r.stdout
    assert "--help" in r.stdout


def test_defaults_are_shown_in_help():
    out = " ".join(relay("redir", "--help").stdout.split())    # help text is wrapped
    for text in ("(default: raw)", "(default: 60.0)", "(default: 65536)", "(default: 255)",
                 "(default: 1024)", "(default: 64)"):
        assert text in out


def test_no_command_prints_usage_and_fails():
    r = relay()
    assert r.returncode == 2
    assert "usage: relay" in r.stderr


def write(tmp_path, text, name="relay.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


@pytest.mark.parametrize("body,key,reason", [
    ('[[listener]]\nmode = "forward"\nlisten = "127.0.0.1:7000"\nto = "127.0.0.1:7001"\ntmeout = 5\n',
     "listener[0].tmeout", "unknown key"),
    ('[[listener]]\nmode = "forward"\nlisten = "127.0.0.1:70000"\nto = "127.0.0.1:7001"\n',
     "listener[0].listen", "70000"),
    ('[[listener]]\nmode = "forward"\nlisten = "127.0.0.1:7000"\n', "listener[0].to", ""),
    ('[[listener]]\nmode = "forward"\nlisten = "127.0.0.1:7000"\nto = "127.0.0.1:7001"\ntimeout = "60s"\n',
     "listener[0].timeout", "60s"),
    ('[global]\nworkers = "two"\n', "global.workers", "two"),
    ('[[listener]]\nmode = "teleport"\nlisten = "127.0.0.1:7000"\n', "listener[0].mode", "teleport"),
])
def test_malformed_config_is_refused_naming_file_and_key(tmp_path, body, key, reason):
    path = write(tmp_path, body.replace("[[listener]]\n", '[[listener]]\nname = "t"\n'))
    for args in (["run", "-c", path, "--check"], ["run", "-c", path]):
        r = relay(*args)
        assert r.returncode == 2, r.stdout + r.stderr
        assert path in r.stderr and key in r.stderr and reason in r.stderr, r.stderr


def test_missing_config_file_is_a_clear_error(tmp_path):
    r = relay("run", "-c", str(tmp_path / "nope.toml"))
    assert r.returncode == 2
    assert "nope.toml" in r.stderr


def test_bad_command_line_value_is_refused():
    r = relay("forward", "--listen", "127.0.0.1:7000", "--to", "2001:db8::1:53")
    assert r.returncode == 2
    assert "listener[0].to" in r.stderr and "brackets" in r.stderr


TUNNEL_CLIENT = ["tunnel-client", "--listen", "127.0.0.1:5000", "--server", "127.0.0.1:8443",
                 "--to", "198.51.100.2:53"]
FORWARD = ["forward", "--listen", "127.0.0.1:7000", "--to", "198.51.100.2:53"]


@pytest.mark.parametrize("args,reason", [
    (TUNNEL_CLIENT + ["--gost", "--secret", "s"], "listener[0].secret: does not apply with gost"),
    (TUNNEL_CLIENT + ["--gost", "--connections", "2"],
     "listener[0].connections: does not apply with gost"),
    (TUNNEL_CLIENT + ["--username", "u", "--password", "p"], "listener[0].user: only applies with gost"),
    (TUNNEL_CLIENT + ["--gost", "--username", "u"], "user and password go together"),
    (FORWARD + ["--upstream", "gost://u:hunter2@127.0.0.1:8443", "--secret", "s"],
     "listener[0].secret: does not apply with a gost:// upstream"),
    (FORWARD + ["--upstream", "gost://127.0.0.1:8443", "--connections", "2"],
     "listener[0].connections: does not apply with a gost:// upstream"),
    (FORWARD + ["--upstream", "gost://u@127.0.0.1:8443"], "user without password"),
    (FORWARD + ["--upstream", "gost://u:hunter2@127.0.0.1"], "missing port"),
    (FORWARD + ["--secret", "s"], "listener[0].secret: only applies with a tunnel:// upstream"),
    (FORWARD + ["--upstream", "socks5://127.0.0.1:1080", "--connections", "2"],
     "listener[0].connections: only applies with a tunnel:// upstream"),
])
def test_gost_and_tunnel_option_combinations_refused(args, reason):
    r = relay(*args)
    assert r.returncode == 2 and reason in r.stderr, r.stderr
    assert "hunter2" not in r.stderr                      # passwords are never echoed


def test_help_explains_gost():
    out = " ".join(relay("tunnel-client", "--help").stdout.split())
    for text in ("--gost", "--username", "--password", "one TCP connection per flow",
                 "refused with --gost", "drop_malformed", "(default: 1;"):
        assert text in out
    out = " ".join(relay("redir", "--help").stdout.split())
    assert "gost://[USER:PASS@]HOST:PORT" in out and "tunnel:// only" in out


CONFIG = """
[global]
workers = 1
control_socket = "{control}"
[[listener]]
name = "keep"
mode = "forward"
listen = "127.0.0.1:{p1}"
to = "127.0.0.1:{echo}"
[[listener]]
name = "change"
mode = "forward"
listen = "127.0.0.1:{p2}"
to = "127.0.0.1:{echo}"
timeout = {t2}
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK on upstream sockets needs root")
def test_run_config_and_sighup_reload_keeps_unchanged_listeners(tmp_path):
    echo = LoopbackEcho()
    ep = echo.address[1]
    p1, p2, p3 = free_udp_port(), free_udp_port(), free_udp_port()
    control = str(tmp_path / "ctl.sock")
    cfg = tmp_path / "relay.toml"
    cfg.write_text(CONFIG.format(control=control, p1=p1, p2=p2, echo=ep, t2=60.0))
    r = RelayProcess(["run", "-c", str(cfg)])
    r.control = control
    try:
        r.wait_ready()
        keep = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        change = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        assert udp_roundtrip(keep, ("127.0.0.1", p1), b"a")[0] == b"a"
        assert udp_roundtrip(change, ("127.0.0.1", p2), b"b")[0] == b"b"
        # change one listener, add one: the unchanged one keeps its association
        cfg.write_text(CONFIG.format(control=control, p1=p1, p2=p2, echo=ep, t2=30.0) + textwrap.dedent(f"""
            [[listener]]
            name = "new"
            mode = "forward"
            listen = "127.0.0.1:{p3}"
            to = "127.0.0.1:{ep}"
            """))
        os.kill(r._main_pid(), signal.SIGHUP)
        wait_until(lambda: "configuration reloaded" in r.log(), 10, what="reload")
        assert udp_roundtrip(keep, ("127.0.0.1", p1), b"c")[0] == b"c"
        assert udp_roundtrip(change, ("127.0.0.1", p2), b"d")[0] == b"d"
        assert udp_roundtrip(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), ("127.0.0.1", p3), b"e")[0] == b"e"
        st = r.settled_stats(lambda st: st["down_datagrams"] == 2, listener="keep")
        assert st["assoc_created"] == 1 and st["assoc_open"] == 1     # same socket as before
        # a broken file is refused and the running configuration stays
        cfg.write_text("[[listener]]\nmode = 1\n")
        os.kill(r._main_pid(), signal.SIGHUP)
        wait_until(lambda: "reload refused" in r.log(), 10, what="refused reload")
        assert udp_roundtrip(keep, ("127.0.0.1", p1), b"f")[0] == b"f"
        assert r.proc.poll() is None
    finally:
        r.close()
        echo.close()
    assert r.proc.returncode == 0
    assert not os.path.exists(control)


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK on upstream sockets needs root")
def test_port_in_use_fails_at_start_with_the_reason(tmp_path):
    blocker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    blocker.bind(("127.0.0.1", 0))
    port = blocker.getsockname()[1]
    r = relay("forward", "--listen", f"127.0.0.1:{port}", "--to", "127.0.0.1:9",
              "--control", str(tmp_path / "c.sock"), "--workers", "1")
    assert r.returncode == 1
    assert f"127.0.0.1:{port}" in r.stderr and "in use" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_stats_command_reads_a_running_relay(tmp_path):
    port = free_udp_port()
    with LoopbackEcho() as echo, RelayProcess(["forward", "--listen", f"127.0.0.1:{port}", "--to",
                                               f"127.0.0.1:{echo.address[1]}"]) as r:
        r.wait_ready()
        udp_roundtrip(socket.socket(socket.AF_INET, socket.SOCK_DGRAM), ("127.0.0.1", port), b"s")
        r.settled_stats(lambda st: st["down_datagrams"] == 1)
        out = relay("stats", "--control", r.control)
        assert out.returncode == 0
        assert any(line.split()[:2] == ["up_datagrams", "1"] for line in out.stdout.splitlines())
        js = relay("stats", "--json", "--control", r.control)
        import json
        assert json.loads(js.stdout)["total"]["down_datagrams"] == 1
        prom = relay("stats", "--prometheus", "--control", r.control)
        assert 'relay_down_datagrams_total{listener="forward"} 1' in prom.stdout
        watch = subprocess.Popen([sys.executable, "-m", "relay", "stats", "--watch", "0.2",
                                  "--control", r.control], stdout=subprocess.PIPE, text=True,
                                 env=relay_env())
        try:
            first = watch.stdout.readline()          # a frame needs two answers 0.2 s apart
            assert first.startswith("relay stats every 0.2 s")
            frame = list(iter(watch.stdout.readline, "\n"))     # a blank line ends it
            rows = {ln.split()[0]: ln.split()[1:] for ln in frame[1:]}
            assert rows["up_datagrams"] == ["0/s", "0/s"] and rows["assoc_open"] == ["1", "1"]
        finally:
            watch.send_signal(signal.SIGINT)
            assert watch.wait(10) == 0
    gone = relay("stats", "--control", r.control)
    assert gone.returncode == 1 and "no relay is running" in gone.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_MARK on upstream sockets needs root")
def test_relay_raises_its_descriptor_limit_to_the_hard_limit():
    """Started at a soft limit below the hard one (as sudo starts it: 1024), the supervisor
    and its workers get the hard limit, so associations are not refused at ~1000."""
    def nofile(pid):
        with open(f"/proc/{pid}/limits") as f:
            line = next(ln for ln in f if ln.startswith("Max open files"))
        return tuple(int(x) for x in line.split()[3:5])
    port = free_udp_port()
    with LoopbackEcho() as echo, RelayProcess(
            ["forward", "--listen", f"127.0.0.1:{port}", "--to", f"127.0.0.1:{echo.address[1]}"],
            prefix=("prlimit", "--nofile=256:4096", "--")) as r:
        r.wait_ready()
        pids = [r._main_pid()] + r.worker_pids()
        assert len(pids) == 2
        assert [nofile(p) for p in pids] == [(4096, 4096)] * 2
        assert udp_roundtrip(socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
                             ("127.0.0.1", port), b"fd")[0] == b"fd"


def _answer(up, assoc, name="fwd"):
    from relay.stats import COUNTERS
    st = dict.fromkeys(COUNTERS, 0)
    st.update(up_datagrams=up, assoc_open=assoc)
    return {"listeners": {name: dict(st)}, "total": dict(st)}


def test_stats_rates_and_table():
    from relay import cli
    a, b = _answer(100, 3), _answer(350, 5)
    rates = cli.stats_rates(a, b, 0.5)
    assert rates["total"]["up_datagrams"] == 500 and rates["fwd"]["up_datagrams"] == 500
    text = cli.stats_table(b, rates)
    row = {ln.split()[0]: ln.split()[1:] for ln in text.splitlines()[1:]}
    assert row["up_datagrams"] == ["500/s", "500/s"]
    assert row["assoc_open"] == ["5", "5"]                 # a gauge stays a value
    assert "down_bytes" not in row                         # zero everywhere: left out
    # a restarted relay (counters back to 0) gives 0/s, never a negative rate
    assert cli.stats_rates(b, a, 1.0)["total"]["up_datagrams"] == 0
    plain = cli.stats_table(b)
    assert any(ln.split()[:3] == ["up_datagrams", "350", "350"] for ln in plain.splitlines())


def test_stats_watch_prints_rates_until_interrupted():
    import io
    import types
    from relay import cli
    answers = iter([_answer(0, 1), _answer(10, 1), _answer(30, 2)])
    clock = iter([0.0, 1.0, 2.0])
    out = io.StringIO()
    args = types.SimpleNamespace(watch=1.0, control="x")
    rc = cli._watch_stats(args, lambda path, req: json.dumps(next(answers)),
                          clock=lambda: next(clock), sleep=lambda s: None, out=out, rounds=2)
    assert rc == 0
    frames = [f for f in out.getvalue().split("relay stats every") if f]
    assert len(frames) == 2
    assert "10/s" in frames[0] and "20/s" in frames[1]

    def gone(path, req):
        raise RuntimeError("no relay is running with control socket x")
    assert cli._watch_stats(args, gone, out=io.StringIO(), rounds=1) == 1


@pytest.mark.parametrize("bad", ["0", "-1", "x", "5000"])
def test_stats_watch_interval_is_checked(bad):
    r = relay("stats", "--watch", bad)
    assert r.returncode == 2 and "expected seconds between 0.1 and 3600" in r.stderr
