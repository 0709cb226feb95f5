"""One runtime for every mode: the command line and TOML build the same listener, every mode
runs supervised with workers that keep only the capabilities they need, secrets come from
files, a second relay cannot join a port, the supervisor deletes nothing that is not its own,
and drops are logged with their reason."""
import dataclasses
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from relay import cli, config, privileges
from relay.droplog import DropLog
from tests.namespaces import wait_until
from tests.relayproc import REPO, RelayProcess, free_tcp_port, free_udp_port, relay_env

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="workers drop from root to nobody: needs root")


def from_cli(*argv):
    """The Config that `relay ARGV` would run."""
    args = cli.build_parser().parse_args(list(argv))
    return config.parse_config({"global": cli._global_from_args(args),
                                "listener": [cli._listener_from_args(args, args.mode)]},
                               source="command line", resolve=False)


def from_toml(text, tmp_path):
    p = tmp_path / "relay.toml"
    p.write_text(textwrap.dedent(text))
    return config.load_config(str(p), resolve=False)


# --- the same listener both ways --------------------------------------------------------

CASES = {
    "forward": (["forward", "--listen", "[::]:5353", "--to", "198.51.100.2:53"],
                'mode = "forward"\nlisten = "[::]:5353"\nto = "198.51.100.2:53"'),
    "forward-all": (["forward", "--listen", "127.0.0.1:7000", "--to", "198.51.100.2:53",
                     "--timeout", "5", "--max-associations", "100", "--mark", "7", "--batch", "8",
                     "--offload", "off", "--upstream", "tunnel://198.51.100.9:8443", "--secret", "s",
                     "--connections", "3", "--name", "dns"],
                    'name = "dns"\nmode = "forward"\nlisten = "127.0.0.1:7000"\n'
                    'to = "198.51.100.2:53"\ntimeout = 5\nmax_associations = 100\nmark = 7\n'
                    'batch = 8\noffload = "off"\nupstream = "tunnel://198.51.100.9:8443"\n'
                    'secret = "s"\nconnections = 3'),
    "redir": (["redir", "--listen", "[::]:7000", "--reply", "transparent",
               "--transparent-cache", "9", "--transparent-idle", "3"],
              'mode = "redir"\nlisten = "[::]:7000"\nreply = "transparent"\n'
              'transparent_cache = 9\ntransparent_idle = 3'),
    "tunnel-server": (["tunnel-server", "--listen", "[::]:8443", "--secret", "s", "--username",
                       "u", "--password", "p", "--allow", "198.51.100.0/24,2001:db8::/32",
                       "--deny", "198.51.100.7/32"],
                      'mode = "tunnel-server"\nlisten = "[::]:8443"\nsecret = "s"\nuser = "u"\n'
                      'password = "p"\nallow = ["198.51.100.0/24", "2001:db8::/32"]\n'
                      'deny = ["198.51.100.7/32"]'),
    "tunnel-client": (["tunnel-client", "--listen", "127.0.0.1:5000", "--server",
                       "198.51.100.1:8443", "--to", "198.51.100.2:53", "--connections", "2",
                       "--secret", "s", "--offload", "off"],
                      'mode = "tunnel-client"\nlisten = "127.0.0.1:5000"\n'
                      'server = "198.51.100.1:8443"\nto = "198.51.100.2:53"\nconnections = 2\n'
                      'secret = "s"\noffload = "off"'),
    "tunnel-client-gost": (["tunnel-client", "--listen", "127.0.0.1:5000", "--server",
                            "198.51.100.1:8443", "--to", "198.51.100.2:53", "--gost",
                            "--username", "u", "--password", "p"],
                           'mode = "tunnel-client"\nlisten = "127.0.0.1:5000"\n'
                           'server = "198.51.100.1:8443"\nto = "198.51.100.2:53"\ngost = true\n'
                           'user = "u"\npassword = "p"'),
    "socks5": (["socks5", "--listen", "127.0.0.1:1080", "--insecure"],
               'mode = "socks5"\nlisten = "127.0.0.1:1080"\ninsecure = true'),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_command_line_and_toml_build_the_same_listener(case, tmp_path):
    argv, toml = CASES[case]
    a = from_cli(*argv).listeners[0]
    named = toml if "name =" in toml else f'name = "{argv[0]}"\n{toml}'
    b = from_toml(f'[[listener]]\n{named}\n', tmp_path).listeners[0]
    for f in dataclasses.fields(config.ListenerConfig):
        assert getattr(a, f.name) == getattr(b, f.name), f.name
    assert a == b


@pytest.mark.parametrize("mode", config.MODES)
def test_defaults_are_defined_once(mode):
    """What --help shows, what the parser fills in and what listener() builds all come from
    relay.config.mode_defaults."""
    d = config.mode_defaults(mode)
    built = config.listener(mode, listen=("127.0.0.1", 1))
    for key, value in d.items():
        if key != "name":
            assert getattr(built, key) == value, key
    out = " ".join(subprocess.run([sys.executable, "-m", "relay", mode, "--help"],
                                  capture_output=True, text=True, env=relay_env(), cwd=REPO,
                                  timeout=30).stdout.split())
    assert f"(default: {d['batch']})" in out and f"(default: {d['timeout']})" in out
    assert f"(default: {d['max_associations']})" in out
    for option in ("--workers", "--pin", "--control", "--metrics", "--user", "--log-level"):
        assert option in out


def test_servers_that_face_the_internet_mark_nothing_by_default():
    assert config.mode_defaults("tunnel-server")["mark"] == 0
    assert config.mode_defaults("socks5")["mark"] == 0
    assert config.mode_defaults("forward")["mark"] == 255
    assert from_cli("tunnel-server", "--listen", "127.0.0.1:8443").listeners[0].mark == 0


# --- secrets out of the command line ----------------------------------------------------

def secret_file(tmp_path, text, mode=0o600, name="secret"):
    p = tmp_path / name
    p.write_text(text)
    os.chmod(p, mode)
    return str(p)


def test_secret_file_is_read_without_its_line_break(tmp_path):
    path = secret_file(tmp_path, "s3 cret\n")
    assert config.read_secret_file(path) == "s3 cret"
    lc = from_cli("tunnel-server", "--listen", "[::]:8443", "--secret-file", path).listeners[0]
    assert lc.secret == "s3 cret"
    toml = from_toml(f'[[listener]]\nname = "t"\nmode = "tunnel-server"\nlisten = "[::]:8443"\n'
                     f'secret_file = "{path}"\nuser = "u"\n'
                     f'password_file = "{secret_file(tmp_path, "pw", name="pw")}"\n', tmp_path)
    assert (toml.listeners[0].secret, toml.listeners[0].password) == ("s3 cret", "pw")


@pytest.mark.parametrize("mode,reason", [(0o640, "other users"), (0o604, "other users"),
                                         (0o620, "other users")])
def test_secret_file_others_may_read_is_refused(tmp_path, mode, reason):
    path = secret_file(tmp_path, "x", mode)
    with pytest.raises(config.ConfigError) as e:
        from_toml(f'[[listener]]\nname = "t"\nmode = "tunnel-server"\nlisten = "[::]:8443"\n'
                  f'secret_file = "{path}"\n', tmp_path)
    assert e.value.key == "listener[0].secret_file" and reason in e.value.reason
    assert f"chmod 600 {path}" in str(e.value)


def test_secret_file_problems_name_the_key(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    for path, reason in ((str(d), "not a regular file"), (str(tmp_path / "none"), "cannot read"),
                         (secret_file(tmp_path, "", name="empty"), "is empty")):
        with pytest.raises(config.ConfigError, match=reason):
            from_cli("tunnel-server", "--listen", "[::]:8443", "--secret-file", path)
    with pytest.raises(config.ConfigError, match="give secret or secret_file, not both"):
        from_cli("tunnel-server", "--listen", "[::]:8443", "--secret", "a",
                 "--secret-file", secret_file(tmp_path, "b"))


def test_secret_and_password_from_the_environment(monkeypatch):
    monkeypatch.setenv("RELAY_SECRET", "from-env")
    monkeypatch.setenv("RELAY_PASSWORD", "pw-env")
    lc = from_cli("tunnel-server", "--listen", "[::]:8443", "--username", "u").listeners[0]
    assert (lc.secret, lc.user, lc.password) == ("from-env", "u", "pw-env")
    # an option given wins over the environment
    lc = from_cli("tunnel-server", "--listen", "[::]:8443", "--secret", "opt").listeners[0]
    assert lc.secret == "opt" and lc.password is None
    # a mode that takes no secret ignores it
    assert not hasattr(from_cli("forward", "--listen", "[::]:1", "--to", "192.0.2.1:1")
                       .listeners[0], "secret_file")


# --- capabilities per mode ----------------------------------------------------------------

CAP = {"ADMIN": privileges.CAP_NET_ADMIN, "RAW": privileges.CAP_NET_RAW,
       "BIND": privileges.CAP_NET_BIND_SERVICE}


def mask(*names):
    m = 0
    for n in names:
        m |= 1 << CAP[n]
    return m


def test_needed_capabilities_follow_the_listeners():
    def caps(mode, **kw):
        return privileges.needed_capabilities([config.listener(mode, **kw)])
    lo = ("127.0.0.1", 5000)
    assert caps("forward", listen=lo) == (CAP["ADMIN"],)
    assert caps("forward", listen=lo, mark=0) == ()
    assert caps("forward", listen=("127.0.0.1", 53), mark=0) == (CAP["BIND"],)
    assert caps("redir", listen=lo) == tuple(sorted(CAP.values()))
    assert caps("redir", listen=lo, reply="transparent") == tuple(sorted((CAP["ADMIN"],
                                                                           CAP["BIND"])))
    assert caps("tunnel-server", listen=lo) == ()
    assert caps("socks5", listen=lo) == ()
    assert caps("tunnel-client", listen=lo) == (CAP["ADMIN"],)


@needs_root
@pytest.mark.parametrize("args,expect", [
    (["forward", "--to", "127.0.0.1:9"], mask("ADMIN")),
    (["forward", "--to", "127.0.0.1:9", "--mark", "0"], 0),
    (["redir"], mask("ADMIN", "RAW", "BIND")),
    (["redir", "--reply", "transparent"], mask("ADMIN", "BIND")),
    (["tunnel-server"], 0),
    (["tunnel-client", "--server", "127.0.0.1:9", "--to", "127.0.0.1:9"], mask("ADMIN")),
    (["socks5"], 0),
], ids=["forward", "forward-nomark", "redir-raw", "redir-transparent", "tunnel-server",
        "tunnel-client", "socks5"])
def test_running_workers_keep_only_what_their_mode_needs(args, expect):
    import psutil
    tcp = args[0] in ("tunnel-server", "socks5")
    port = free_tcp_port() if tcp else free_udp_port()
    with RelayProcess([args[0], "--listen", f"127.0.0.1:{port}", *args[1:]]) as relay:
        relay.wait_ready()
        pids = relay.worker_pids()
        assert pids
        for pid in pids:
            assert psutil.Process(pid).uids().effective != 0
            assert privileges.effective_capabilities(pid) == expect
        assert relay.stats() is not None          # `relay stats` reads every mode


# --- what the supervisor refuses -------------------------------------------------------------

@needs_root
@pytest.mark.parametrize("mode", ["forward", "socks5"])
def test_a_second_relay_on_the_same_port_is_refused(mode):
    tcp = mode == "socks5"
    port = free_tcp_port() if tcp else free_udp_port()
    extra = ["--to", "127.0.0.1:9"] if mode == "forward" else ["--insecure"]
    with RelayProcess([mode, "--listen", f"127.0.0.1:{port}", *extra]) as first:
        first.wait_ready()
        for listen in (f"127.0.0.1:{port}", f"0.0.0.0:{port}", f"[::]:{port}"):
            second = subprocess.run([sys.executable, "-m", "relay", mode, "--listen", listen,
                                     *extra, "--control", "", "--workers", "1"],
                                    capture_output=True, text=True, env=relay_env(), timeout=30)
            assert second.returncode != 0
            assert "already in use by another process" in second.stderr, second.stderr
        assert first.proc.poll() is None and first.stats() is not None


@needs_root
def test_workers_die_with_their_supervisor():
    import psutil
    port = free_udp_port()
    with RelayProcess(["forward", "--listen", f"127.0.0.1:{port}", "--to", "127.0.0.1:9"],
                      workers=2) as relay:
        relay.wait_ready()
        pids = relay.worker_pids()
        os.kill(relay._main_pid(), signal.SIGKILL)
        wait_until(lambda: not any(psutil.pid_exists(p) and
                                   psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                                   for p in pids), 10, what="workers gone")
    # nothing holds the port any more: a new relay may take it
    from relay.net import sockopt
    wait_until(lambda: _free(sockopt, port), 5, what="port free")


def _free(sockopt, port):
    try:
        sockopt.check_port_free(("127.0.0.1", port), "udp")
        return True
    except OSError:
        return False


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_control_path_that_is_not_a_socket_is_refused_and_kept(tmp_path, kind):
    path = tmp_path / "relay.sock"
    if kind == "dir":
        path.mkdir()
    else:
        path.write_text("not mine")
    r = subprocess.run([sys.executable, "-m", "relay", "forward", "--listen",
                        f"127.0.0.1:{free_udp_port()}", "--to", "127.0.0.1:9", "--workers", "1",
                        "--control", str(path)], capture_output=True, text=True,
                       env=relay_env(), timeout=30)
    assert r.returncode == 1
    assert f"control socket path {path} is" in r.stderr
    assert path.exists() and (path.is_dir() if kind == "dir" else path.read_text() == "not mine")


# --- drops say why ---------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_drop_log_warns_first_time_then_at_most_once_per_interval(caplog):
    clock = Clock()
    d = DropLog(logging.getLogger("relay.test"), interval=60, clock=clock)
    zero = dict.fromkeys(("drop_denied", "drop_permission"), 0)
    with caplog.at_level(logging.WARNING, "relay.test"):
        d.check({"dns": zero})
        assert caplog.records == []
        d.check({"dns": {**zero, "drop_denied": 3}})
        assert len(caplog.records) == 1
        msg = caplog.records[0].getMessage()
        assert "listener dns: 3 datagrams dropped (drop_denied)" in msg and "--allow" in msg
        clock.t = 30
        d.check({"dns": {**zero, "drop_denied": 10}})
        assert len(caplog.records) == 1                   # rate-limited
        clock.t = 61
        d.check({"dns": {**zero, "drop_denied": 12}})
        assert len(caplog.records) == 2
        assert "9 datagrams dropped in the last 61s (drop_denied)" in caplog.records[1].getMessage()
        # another reason and another listener have their own first warning
        d.check({"dns": {**zero, "drop_denied": 12, "drop_permission": 1},
                 "ntp": {**zero, "drop_denied": 1}})
        assert len(caplog.records) == 4
        assert any("CAP_NET_BIND_SERVICE" in r.getMessage() for r in caplog.records)


@needs_root
def test_a_denied_destination_is_logged_by_the_tunnel_server():
    """A new user who forgets --allow sees why nothing arrives: the server names the reason."""
    tport, uport = free_tcp_port(), free_udp_port()
    with RelayProcess(["tunnel-server", "--listen", f"127.0.0.1:{tport}"]) as server:
        server.wait_ready()
        with RelayProcess(["tunnel-client", "--listen", f"127.0.0.1:{uport}", "--server",
                           f"127.0.0.1:{tport}", "--to", "127.0.0.1:9", "--mark", "0"]) as client:
            client.wait_ready()
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            with s:
                def denied():
                    s.sendto(b"x", ("127.0.0.1", uport))
                    return server.stats()["drop_denied"] > 0
                wait_until(denied, 10, interval=0.2, what="drop_denied")
            wait_until(lambda: "(drop_denied)" in server.log(), 10, what="drop_denied logged")
            assert "--allow" in server.log()


@needs_root
@pytest.mark.parametrize("mode", ["tunnel-server", "socks5"])
def test_tcp_listeners_get_a_reuseport_socket_per_worker(mode):
    import psutil
    port = free_tcp_port()
    with RelayProcess([mode, "--listen", f"127.0.0.1:{port}"], workers=2) as relay:
        relay.wait_ready()
        pids = relay.worker_pids()
        assert len(pids) == 2
        for pid in pids:
            listening = [c for c in tcp_sockets(pid)
                         if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
            assert len(listening) == 1, pid
        # and the supervisor holds none of them: it only supervises
        assert not [c for c in tcp_sockets(relay._main_pid())
                    if c.laddr and c.laddr.port == port]


def tcp_sockets(pid):
    import psutil
    p = psutil.Process(pid)
    return (p.net_connections if hasattr(p, "net_connections") else p.connections)(kind="tcp")


EXTENSIONS = ("relay.packet._fast", "relay.packet._rawsock", "relay.datapath.engine",
              "relay.datapath.tunnel")


@pytest.mark.parametrize("name", EXTENSIONS)
def test_every_built_extension_imports(name):
    """A built extension that fails to import would make the tests that fall back to the pure
    twin pass silently: a compiled file that exists must import."""
    import glob
    import importlib
    built = glob.glob(os.path.join(REPO, *name.split(".")) + ".*.so")
    if not built:
        pytest.skip(f"{name} is not built here (python setup.py build_ext --inplace)")
    importlib.import_module(name)


# --- the control socket's "config" request --------------------------------------------------

@needs_root
def test_config_request_lists_listeners_without_secrets():
    """What `relay doctor` reads: the supervisor, each worker's listeners and the
    capabilities they need, every listener's settings - no secret, no password."""
    from relay.supervisor import query
    relay = RelayProcess(["socks5", "--listen", f"127.0.0.1:{free_tcp_port()}", "--username",
                          "alice", "--password", "hunter2-secret", "--max-associations", 100])
    try:
        relay.wait_ready()
        text = query(relay.control, "config")
        doc = json.loads(text)
        assert "hunter2" not in text and "password" not in doc["listeners"][0]
        lc = doc["listeners"][0]
        assert (lc["mode"], lc["user"], lc["max_associations"], lc["mark"]) == \
            ("socks5", "alice", 100, 0)
        assert doc["pid"] == relay._main_pid()
        assert [w["pid"] for w in doc["workers"]] == relay.worker_pids()
        assert doc["workers"][0]["listeners"] == ["socks5"]
        assert doc["workers"][0]["capabilities"] == []
    finally:
        relay.close()
    relay = RelayProcess(["forward", "--listen", f"127.0.0.1:{free_udp_port()}", "--to",
                          "127.0.0.1:9", "--upstream", f"tunnel://127.0.0.1:{free_tcp_port()}",
                          "--secret", "s3cret-value"])
    try:
        relay.wait_ready()
        text = query(relay.control, "config")
        assert "s3cret" not in text
        lc = json.loads(text)["listeners"][0]
        assert lc["upstream"].startswith("tunnel://127.0.0.1:") and "secret" not in lc
        assert json.loads(text)["workers"][0]["capabilities"] == ["CAP_NET_ADMIN"]  # mark 255
    finally:
        relay.close()
