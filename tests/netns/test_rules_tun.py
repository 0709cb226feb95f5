"""`relay rules tun apply|remove` in a router namespace: the policy routing into the TUN
device, taken away again without a trace (the rules' code runs here, its `ip` commands in
the namespace)."""
import subprocess

import pytest

from relay import rules_tun
from tests.relayproc import RelayProcess

pytestmark = pytest.mark.netns


def runner_in(ns):
    def run(cmd, **kw):
        return subprocess.run(["ip", "netns", "exec", ns.name, *cmd], **kw)
    return run


def rules(topo, action, **kw):
    opts = rules_tun.TunRulesOptions(dev="relay0", ifaces=("rtr0",), **kw)
    getattr(rules_tun, action)(opts, runner=runner_in(topo.rtr))


def _snapshot(topo):
    out = []
    for cmd in (["ip", "rule"], ["ip", "-6", "rule"], ["ip", "route", "show", "table", "all"],
                ["ip", "-6", "route", "show", "table", "all"], ["ip", "-o", "link"]):
        text = topo.rtr.run(*cmd).stdout
        out.append("\n".join(l for l in text.splitlines() if "proto kernel" not in l
                             and "fe80::" not in l))
    return out


def test_rules_apply_and_remove_leave_no_trace(topo):
    before = _snapshot(topo)
    extra = dict(local=True, exclude=("203.0.113.0/24",))
    for _ in range(2):                                  # twice: one copy
        rules(topo, "apply", **extra)
    listed = topo.rtr.run("ip", "rule").stdout
    assert listed.count("ipproto udp lookup 110") == 2 and "iif lo" in listed
    assert "fwmark 0xff lookup main" in listed
    routes = topo.rtr.run("ip", "route", "show", "table", "110").stdout
    assert "default dev relay0" in routes and "throw 203.0.113.0/24" in routes
    assert "throw 10.0.0.0/8" in routes
    rules(topo, "remove", **extra)
    assert _snapshot(topo) == before
    # a device relay tun made itself is left to it: remove takes only the routing
    with RelayProcess(["tun", "--dev", "relay0"], ns=topo.rtr).wait_ready():
        rules(topo, "apply")
        rules(topo, "remove")
        assert "relay0" in topo.rtr.run("ip", "-o", "link").stdout
    assert _snapshot(topo) == before


def test_apply_undoes_itself_when_a_step_fails(topo):
    before = _snapshot(topo)
    run = runner_in(topo.rtr)

    def failing(cmd, **kw):             # the last rule apply adds (IPv6, iif lo) fails
        if cmd[:4] == ["ip", "-6", "rule", "add"] and "lo" in cmd:
            return subprocess.CompletedProcess(cmd, 2, "", "RTNETLINK answers: injected")
        return run(cmd, **kw)
    opts = rules_tun.TunRulesOptions(dev="relay0", ifaces=("rtr0",), local=True)
    with pytest.raises(rules_tun.RulesError, match="injected"):
        rules_tun.apply(opts, runner=failing)
    assert _snapshot(topo) == before
