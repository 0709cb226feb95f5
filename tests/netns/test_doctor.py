"""`relay doctor`: in the router namespace, each thing a TPROXY setup needs is broken on
purpose -> the doctor names exactly that check, exits 1, and the fix it prints repairs it;
the correct setup (relay rules apply + relay redir) -> every check ok, exit 0. The checks
that read /proc are also run against a fake proc root."""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from relay import doctor, rules
from relay.doctor import AS_ROOT
from relay.supervisor import query
from tests.namespaces import wait_until
from tests.relayproc import RelayProcess, relay_env
from tests.support_doctor import PORT

ASSOC = 1024                    # per worker: ASSOC + transparent cache 1024 + 64 = 2112 fds
NOFILE = ("prlimit", "--nofile=8192:8192")  # the same limit whoever runs the tests
NEEDED = 2 * 1024 + doctor.FD_SPARE
ALL = [run.name for run in doctor.CHECKS]


# --- running relay, rules and doctor in the router ------------------------------------

def in_rtr(topo, *args, prefix=NOFILE, env=None):
    return subprocess.run(["ip", "netns", "exec", topo.rtr.name, *prefix, sys.executable, "-m",
                           "relay", *map(str, args)], capture_output=True, text=True,
                          env=env or relay_env(), timeout=60)


def apply_rules(topo, *args, port=PORT, iface="rtr0"):
    r = in_rtr(topo, "rules", "apply", "--port", port, "--iface", iface, *args)
    assert r.returncode == 0, r.stderr


@contextlib.contextmanager
def router(topo, *redir_args, rules=(), rules_port=PORT, iface="rtr0", listen=f"[::]:{PORT}",
           prefix=NOFILE, env=()):
    """`relay rules apply RULES` (none when rules is None), then `relay redir REDIR_ARGS`
    in the router (``env``: VAR=VALUE strings for its environment), stopped at the end."""
    if rules is not None:
        apply_rules(topo, *rules, port=rules_port, iface=iface)
    relay = RelayProcess(["redir", "--listen", listen, "--max-associations", ASSOC,
                          *redir_args], ns=topo.rtr,
                         prefix=("env", *env, *prefix) if env else prefix)
    try:
        yield relay.wait_ready()
    finally:
        relay.close()


class Result:
    def __init__(self, r):
        self.rc, self.stderr = r.returncode, r.stderr
        self.doc = json.loads(r.stdout)
        self.checks = {c["name"]: c for c in self.doc["checks"]}
        self.failed = {c["name"] for c in self.doc["checks"] if not c["ok"]}

    def __getitem__(self, name):
        return self.checks[name]


def run_doctor(topo, relay=None, *args, prefix=NOFILE, env=None):
    control = relay.control if relay else "/nonexistent/relay-doctor-test.sock"
    r = in_rtr(topo, "doctor", "--json", "--control", control, *args, prefix=prefix, env=env)
    assert r.returncode in (0, 1), r.stderr
    res = Result(r)
    assert res.rc == (1 if res.failed else 0) and res.doc["ok"] == (not res.failed)
    assert [c["name"] for c in res.doc["checks"]] == ALL
    return res


@pytest.fixture
def relay_bin(tmp_path):
    """A directory with a `relay` command running this checkout, for the fixes."""
    d = tmp_path / "bin"
    d.mkdir()
    (d / "relay").write_text(f'#!/bin/sh\nexec {sys.executable} -m relay "$@"\n')
    (d / "relay").chmod(0o755)
    return str(d)


def apply_fix(topo, fix, relay_bin):
    env = dict(relay_env(), PATH=relay_bin + os.pathsep + os.environ["PATH"])
    r = subprocess.run(["ip", "netns", "exec", topo.rtr.name, "sh", "-ec", fix],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, f"{fix}: {r.stderr}"


def broken_then_fixed(topo, relay, name, relay_bin, *args):
    """The doctor names exactly `name`; its fix, run as printed, makes every check ok."""
    res = run_doctor(topo, relay, *args)
    assert res.failed == {name}, res.doc
    assert res[name]["fix"]
    apply_fix(topo, res[name]["fix"], relay_bin)
    after = run_doctor(topo, relay, *args)
    assert after.failed == set() and after.rc == 0, after.doc
    return res[name]


@pytest.fixture
def setup(topo):
    """The correct setup: relay rules apply --iface rtr0 and relay redir on [::]:PORT."""
    with router(topo) as relay:
        yield topo, relay


# --- the correct setup ------------------------------------------------------------------

@pytest.mark.parametrize("impl", ["c", "pure"])
def test_a_correct_setup_is_all_ok(topo, impl):
    pure = "1" if impl == "pure" else "0"
    with router(topo, env=[f"RELAY_PURE_PYTHON={pure}"]) as relay:
        denv = dict(relay_env(), RELAY_PURE_PYTHON=pure)
        res = run_doctor(topo, relay, "--iface", "rtr0", env=denv)
        assert res.failed == set() and res.rc == 0, res.doc
        assert res.doc["port"] == PORT and res.doc["interfaces"] == ["rtr0"]
        assert "UDP from rtr0 to port 7000 (IPv4 and IPv6)" in res["rules"]["message"]
        assert "IPv4 table 100, IPv6 table 100" in res["ip-rule"]["message"]
        assert f"{NEEDED} needed" in res["fd-limit"]["message"]
        assert "CAP_NET_RAW" in res["capabilities"]["message"]
        text = in_rtr(topo, "doctor", "--control", relay.control, env=denv)
        assert text.returncode == 0, text.stdout
        lines = text.stdout.splitlines()
        assert [ln.split()[:2] for ln in lines[:-1]] == [["ok", n] for n in ALL]
        assert lines[-1] == f"relay doctor: all {len(ALL)} checks ok"


# --- each thing broken on purpose ---------------------------------------------------------

def test_no_rules_installed(topo, relay_bin):
    with router(topo, rules=None) as relay:
        c = broken_then_fixed(topo, relay, "rules", relay_bin, "--iface", "rtr0")
        assert "nft table inet relay is not installed" in c["message"]
        assert c["fix"] == "relay rules apply --port 7000 --iface rtr0"


def test_rules_for_another_port_than_the_listener(topo, relay_bin):
    with router(topo, rules_port=7001) as relay:
        c = broken_then_fixed(topo, relay, "rules.listener", relay_bin)
        assert "the rules send UDP to port 7001, but no redir listener is there" in c["message"]
        assert c["fix"] == "relay rules apply --port 7000 --iface rtr0"


def test_rules_for_ipv6_with_an_ipv4_listener(topo, relay_bin):
    with router(topo, listen=f"0.0.0.0:{PORT}") as relay:
        res = run_doctor(topo, relay)
        assert res.failed == {"rules.listener"}
        assert "IPv6 datagrams are dropped" in res["rules.listener"]["message"]
        fix = res["rules.listener"]["fix"]
        assert fix == "relay rules apply --port 7000 --iface rtr0 --no-ipv6"
        apply_fix(topo, fix, relay_bin)
        assert run_doctor(topo, relay).failed == set()


@pytest.mark.parametrize("fam", [4, 6])
def test_ip_rule_missing(setup, relay_bin, fam):
    topo, relay = setup
    topo.rtr.run("ip", f"-{fam}", "rule", "del", "fwmark", "1", "lookup", "100")
    c = broken_then_fixed(topo, relay, "ip-rule", relay_bin)
    assert f"no `ip -{fam} rule` sends fwmark 0x1 to a routing table" in c["message"]
    assert c["fix"] == f"ip -{fam} rule add fwmark 1 lookup 100 protocol 82"


@pytest.mark.parametrize("fam, dst", [(4, "0.0.0.0/0"), (6, "::/0")])
def test_local_route_missing(setup, relay_bin, fam, dst):
    topo, relay = setup
    topo.rtr.run("ip", f"-{fam}", "route", "del", "local", dst, "dev", "lo", "table", "100")
    c = broken_then_fixed(topo, relay, "local-route", relay_bin)
    assert f"no `local default dev lo` route IPv{fam} in table 100" in c["message"]
    assert c["fix"] == f"ip -{fam} route add local {dst} dev lo table 100 proto 82"


@pytest.mark.parametrize("key", ["rtr0", "all"])
def test_rp_filter_strict(setup, relay_bin, key):
    topo, relay = setup
    topo.rtr.run("sysctl", "-qw", f"net.ipv4.conf.{key}.rp_filter=1")
    c = broken_then_fixed(topo, relay, "rp_filter", relay_bin)
    assert "strict reverse-path filtering on rtr0" in c["message"]
    assert c["fix"] == f"sysctl -w net.ipv4.conf.{key}.rp_filter=2"


def test_br_netfilter_on_a_bridged_interface(topo, relay_bin):
    if not os.path.exists("/proc/sys/net/bridge/bridge-nf-call-iptables"):
        pytest.skip("br_netfilter is not loaded (modprobe br_netfilter); see the fake proc test")
    r = topo.rtr
    r.run("ip", "link", "add", "br0", "type", "bridge")
    r.run("ip", "link", "add", "brp0", "type", "veth", "peer", "name", "brp1")
    r.run("ip", "link", "set", "brp0", "master", "br0")
    for dev in ("br0", "brp0", "brp1"):
        r.run("ip", "link", "set", dev, "up")
    r.run("sysctl", "-qw", "net.bridge.bridge-nf-call-iptables=1")
    r.run("sysctl", "-qw", "net.bridge.bridge-nf-call-ip6tables=1")
    with router(topo, iface="br0") as relay:
        c = broken_then_fixed(topo, relay, "br_netfilter", relay_bin)
        assert "br0 bridged and bridge-nf-call-iptables and bridge-nf-call-ip6tables = 1" \
            in c["message"]
        assert c["fix"] == ("sysctl -w net.bridge.bridge-nf-call-iptables=0 "
                            "net.bridge.bridge-nf-call-ip6tables=0")


def test_mark_loop_upstream_mark_not_skipped(topo, relay_bin):
    with router(topo, "--mark", 7) as relay:
        c = broken_then_fixed(topo, relay, "mark-loop", relay_bin)
        assert "marks its upstream traffic 0x7, but the rules skip mark 0xff" in c["message"]
        assert c["fix"] == "relay rules apply --port 7000 --iface rtr0 --skip-mark 7"


def test_mark_loop_upstream_mark_is_the_redirect_mark(topo):
    with router(topo, "--mark", 1) as relay:            # the rules' --mark
        res = run_doctor(topo, relay)
        assert res.failed == {"mark-loop"}
        assert "they never leave" in res["mark-loop"]["message"]
        assert res["mark-loop"]["fix"] == "restart it with --mark 255 (the rules' skip mark)"


def test_ipv6_forwarding_off(setup, relay_bin):
    topo, relay = setup
    topo.rtr.run("sysctl", "-qw", "net.ipv6.conf.all.forwarding=0")
    c = broken_then_fixed(topo, relay, "forwarding", relay_bin)
    assert c["message"].startswith("IPv6 forwarding is off")
    assert c["fix"] == "sysctl -w net.ipv6.conf.all.forwarding=1"


def test_fd_limit_of_the_doctor_below_max_associations(setup):
    topo, relay = setup
    res = run_doctor(topo, relay, prefix=("prlimit", "--nofile=1024:1024"))
    assert res.failed == {"fd-limit"}
    msg = res["fd-limit"]["message"]
    assert f"this process (a relay started from here): 1024 for {NEEDED} needed" in msg
    assert f"worker 0 (pid {relay.worker_pids()[0]}): 8192 for {NEEDED} needed" in msg
    assert res["fd-limit"]["fix"].startswith(f"ulimit -n {NEEDED}, then start the relay")


def test_fd_limit_of_the_workers_below_max_associations(topo):
    with router(topo, prefix=("prlimit", "--nofile=1500:1500")) as relay:
        res = run_doctor(topo, relay)
        assert res.failed == {"fd-limit"}
        assert f"worker 0 (pid {relay.worker_pids()[0]}): 1500 for {NEEDED} needed" in \
            res["fd-limit"]["message"]


def test_iface_outside_the_rules(setup, relay_bin):
    topo, relay = setup
    c = broken_then_fixed(topo, relay, "rules.iface", relay_bin, "--iface", "rtr1")
    assert c["message"] == "the rules act only on UDP from rtr0, not from rtr1"
    assert c["fix"] == "relay rules apply --port 7000 --iface rtr0,rtr1"
    res = run_doctor(topo, relay, "--iface", "rtr9")
    assert res.failed == {"rules.iface"} and "no interface rtr9 here" in res["rules.iface"]["message"]


def test_workers_short_of_capabilities_after_a_reload_adds_redir(topo, tmp_path):
    """Workers keep the capabilities of the listeners they started with: a reload that
    adds a redir listener to a forward-only relay leaves them without CAP_NET_RAW."""
    control = tmp_path / "relay.sock"
    conf = tmp_path / "relay.toml"
    forward = (f'[global]\nworkers = 1\ncontrol_socket = "{control}"\n\n[[listener]]\n'
               f'name = "fwd"\nmode = "forward"\nlisten = "127.0.0.1:5353"\n'
               f'to = "127.0.0.1:53"\nmax_associations = {ASSOC}\n')
    conf.write_text(forward)
    apply_rules(topo)
    relay = RelayProcess(["run", "-c", conf], ns=topo.rtr, prefix=NOFILE)
    try:
        relay.control = str(control)
        relay.wait_ready()
        before = run_doctor(topo, relay, "--port", PORT)                     # no redir yet
        assert before.failed == {"relay", "rules.listener"}
        assert before["capabilities"]["ok"]
        conf.write_text(forward + f'\n[[listener]]\nname = "tp"\nmode = "redir"\n'
                                  f'listen = "[::]:{PORT}"\nmax_associations = {ASSOC}\n')
        os.kill(relay._main_pid(), signal.SIGHUP)
        wait_until(lambda: "tp" in query(str(control), "config"), what="the reload")
        res = run_doctor(topo, relay)
        assert res.failed == {"capabilities"}, res.doc
        assert f"worker 0 (pid {relay.worker_pids()[0]}) lacks CAP_NET_BIND_SERVICE, " \
               f"CAP_NET_RAW, which its listeners need" in res["capabilities"]["message"]
        assert res["capabilities"]["fix"].startswith("restart the relay as root")
    finally:
        relay.close()


def test_doctor_without_cap_net_admin(setup):
    topo, relay = setup
    res = run_doctor(topo, relay, prefix=(*NOFILE, "capsh", "--drop=cap_net_admin", "--", "-c",
                                           'exec "$@"', "doctor"))
    assert {"capabilities", "kernel.tproxy", "rules"} <= res.failed
    assert "relay doctor runs without CAP_NET_ADMIN" in res["capabilities"]["message"]
    assert res["capabilities"]["fix"] == AS_ROOT


def test_nothing_running_and_no_rules(topo):
    res = run_doctor(topo)
    assert "relay" in res.failed and res.rc == 1
    assert "no rules are installed: nothing to check" in res["relay"]["message"]
    assert res["rules"]["message"].startswith("not checked")


def test_rules_without_a_running_relay(topo):
    """--port and rules, nothing bound there: the relay check says so; a socket bound to
    the port satisfies it (its settings are not known without a control socket)."""
    apply_rules(topo)
    res = run_doctor(topo, None, "--port", PORT)
    # no relay to read --max-associations from: a redir with the defaults would need more
    assert res.failed == {"relay", "fd-limit"}
    assert "(a redir with the default --max-associations started from here): 8192 for 66624 " \
        "needed" in res["fd-limit"]["message"]
    assert f"nothing listens on UDP port {PORT}" in res["relay"]["message"]
    assert res["relay"]["fix"] == f"relay redir --listen '[::]:{PORT}'"
    with topo.rtr.enter():
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        s.bind(("::", PORT))
        res = run_doctor(topo, None, "--port", PORT)
        assert "relay" not in res.failed, res["relay"]
        assert res["mark-loop"]["message"].startswith("not checked")
    finally:
        s.close()
