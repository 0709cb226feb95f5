"""relay.rules: what the ruleset says, that nft accepts it, and exact apply/remove bookkeeping
inside a network namespace of our own."""
import io
import itertools
import os
import shutil
import socket
import subprocess

import pytest

from relay import rules
from relay.rules import RulesError, RulesOptions, apply, remove
from tests.support_rules import READ_BACK, make_parser, normalized

_counter = itertools.count()


# --- apply/remove in a namespace of our own --------------------------------------------

class Namespace:
    def __init__(self, lo_up=True):
        self.name = f"rlrules{os.getpid()}x{next(_counter)}"
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        if lo_up:
            self.sh("ip", "link", "set", "lo", "up")

    def runner(self, cmd, **kw):
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], **kw)

    def sh(self, *cmd, check=True):
        r = self.runner(list(cmd), capture_output=True, text=True)
        if check and r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
        return r.stdout

    def snapshot(self):
        return {c: self.sh(*c.split()) for c in
                ("nft list ruleset", "ip rule show", "ip -6 rule show",
                 "ip route show table all", "ip -6 route show table all")}

    def close(self):
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


@pytest.fixture
def ns(netns_available):
    if shutil.which("nft") is None:
        pytest.skip("nft (nftables) is not installed")
    n = Namespace()
    try:
        yield n
    finally:
        n.close()


def our_rules(ns, fam):
    return [ln for ln in ns.sh("ip", fam, "rule", "show").splitlines()
            if "fwmark 0x1 lookup 100 proto 82" in ln]


def our_routes(ns, fam):
    return [ln for ln in ns.sh("ip", fam, "route", "show", "table", "all").splitlines()
            if ln.startswith("local default dev lo table 100 proto 82")]


def test_apply_is_idempotent_and_remove_leaves_no_trace(ns):
    before = ns.snapshot()
    opts = RulesOptions(5300, exclude=["203.0.113.0/24", "2001:db8:ff::/48"])
    apply(opts, runner=ns.runner)
    listing = ns.sh("nft", "list", "ruleset")
    assert "table inet relay {" in listing
    assert "tproxy ip to :5300 meta mark set 0x00000001 accept" in listing
    assert "tproxy ip6 to :5300 meta mark set 0x00000001 accept" in listing
    assert "203.0.113.0/24" in listing and "2001:db8:ff::/48" in listing
    assert len(our_rules(ns, "-4")) == 1 and len(our_rules(ns, "-6")) == 1
    assert len(our_routes(ns, "-4")) == 1 and len(our_routes(ns, "-6")) == 1

    once = ns.snapshot()
    apply(opts, runner=ns.runner)
    assert ns.snapshot() == once            # twice leaves one copy of everything

    remove(opts, runner=ns.runner)
    assert ns.snapshot() == before
    remove(opts, runner=ns.runner)          # nothing installed: fine
    assert ns.snapshot() == before


def test_remove_spares_everything_else(ns):
    # Unrelated things that must survive: another nft table, ip rules with another mark,
    # with our mark but another selector, with our table, and a route in our table.
    ns.sh("nft", "add", "table", "inet", "other")
    ns.sh("nft", "add", "chain", "inet", "other", "c",
          "{ type filter hook prerouting priority 0; policy accept; }")
    ns.sh("nft", "add", "rule", "inet", "other", "c", "udp", "dport", "53", "counter")
    ns.sh("nft", "add", "table", "ip", "relay")               # same name, another family
    ns.sh("ip", "rule", "add", "fwmark", "7", "lookup", "200")
    ns.sh("ip", "rule", "add", "from", "10.0.0.0/8", "fwmark", "1", "lookup", "100")
    ns.sh("ip", "-6", "rule", "add", "fwmark", "1", "lookup", "101")
    ns.sh("ip", "route", "add", "unreachable", "203.0.113.0/24", "table", "100")
    before = ns.snapshot()

    opts = RulesOptions(5300)
    apply(opts, runner=ns.runner)
    assert "table inet other" in ns.sh("nft", "list", "ruleset")
    apply(opts, runner=ns.runner)
    remove(opts, runner=ns.runner)
    after = ns.snapshot()
    assert after == before
    assert "table inet other" in after["nft list ruleset"]
    assert "table ip relay" in after["nft list ruleset"]


@pytest.mark.parametrize("name", ["filter", "relay"])
def test_a_table_relay_did_not_create_is_never_touched(ns, name):
    """`--nft-table filter` must not replace or delete a distribution's own table, nor a
    hand-made table that happens to be called relay: only tables carrying relay's mark."""
    ns.sh("nft", "add", "table", "inet", name)
    ns.sh("nft", "add", "chain", "inet", name, "input",
          "{ type filter hook input priority 0; policy accept; }")
    ns.sh("nft", "add", "rule", "inet", name, "input", "tcp", "dport", "22", "accept")
    before = ns.snapshot()
    opts = RulesOptions(5300, nft_table=name)
    for step in (apply, remove):
        with pytest.raises(RulesError, match=f"nft table inet {name} exists and was not "
                                             f"created by relay rules"):
            step(opts, runner=ns.runner)
        assert ns.snapshot() == before
    err = io.StringIO()
    args = make_parser().parse_args(["rules", "remove", "--port", "5300", "--nft-table", name])
    assert rules.run_cli(args, runner=ns.runner, out=io.StringIO(), err=err) == 1
    assert "was not created by relay rules" in err.getvalue()
    assert ns.snapshot() == before


def test_an_equivalent_rule_already_there_is_used_and_kept(ns):
    """Someone set up fwmark 1 -> table 100 by hand: apply adds no duplicate, remove keeps it."""
    ns.sh("ip", "rule", "add", "fwmark", "1", "lookup", "100")
    ns.sh("ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100")
    before = ns.snapshot()
    opts = RulesOptions(5300, ipv6=False)
    apply(opts, runner=ns.runner)
    assert ns.sh("ip", "rule", "show").count("fwmark 0x1 lookup 100") == 1
    remove(opts, runner=ns.runner)
    assert ns.snapshot() == before


def test_reapply_with_other_options_replaces_the_table(ns):
    before = ns.snapshot()
    apply(RulesOptions(5300), runner=ns.runner)
    apply(RulesOptions(5301, exclude=["198.51.100.0/24"]), runner=ns.runner)
    listing = ns.sh("nft", "list", "ruleset")
    assert listing.count("table inet relay {") == 1
    assert ":5301" in listing and ":5300" not in listing and "198.51.100.0/24" in listing
    remove(RulesOptions(5301), runner=ns.runner)
    assert ns.snapshot() == before


class FailOn:
    """Run commands for real, except the one matching ``prefix`` which fails."""

    def __init__(self, ns, prefix):
        self.ns, self.prefix, self.calls = ns, prefix, []

    def __call__(self, cmd, **kw):
        self.calls.append(list(cmd))
        if list(cmd[:len(self.prefix)]) == self.prefix:
            return subprocess.CompletedProcess(cmd, 2, "", "RTNETLINK answers: injected failure")
        return self.ns.runner(cmd, **kw)


@pytest.mark.parametrize("prefix", [
    ["nft", "-f", "-"],
    ["ip", "-4", "rule", "add"],
    ["ip", "-4", "route", "add"],
    ["ip", "-6", "rule", "add"],
    ["ip", "-6", "route", "add"],
])
def test_failed_apply_undoes_its_steps(ns, prefix):
    before = ns.snapshot()
    runner = FailOn(ns, prefix)
    with pytest.raises(RulesError) as e:
        apply(RulesOptions(5300), runner=runner)
    assert " ".join(prefix) in str(e.value)
    assert "injected failure" in str(e.value) and e.value.stderr
    assert ns.snapshot() == before


def test_failed_reapply_restores_the_previous_table(netns_available):
    """A real failure (IPv6 local route on a loopback that is down) after the table was
    replaced: the previous table and rules come back."""
    if shutil.which("nft") is None:
        pytest.skip("nft (nftables) is not installed")
    n = Namespace(lo_up=False)
    try:
        apply(RulesOptions(5300, ipv6=False), runner=n.runner)
        installed = n.snapshot()
        with pytest.raises(RulesError) as e:
            apply(RulesOptions(5301), runner=n.runner)
        assert "ip -6 route add local ::/0 dev lo table 100" in str(e.value)
        assert "not up" in str(e.value)             # the kernel's reason, from stderr
        assert n.snapshot() == installed
        remove(RulesOptions(5300), runner=n.runner)
        assert n.sh("nft", "list", "ruleset") == "" and not our_rules(n, "-4")
    finally:
        n.close()


def test_cli_apply_and_remove(ns):
    before = ns.snapshot()
    parser = make_parser()
    out = io.StringIO()
    args = parser.parse_args(["rules", "apply", "--port", "5300", "--no-ipv6"])
    assert rules.run_cli(args, runner=ns.runner, out=out) == 0
    assert "applied" in out.getvalue()
    assert len(our_rules(ns, "-4")) == 1 and not our_rules(ns, "-6")
    args = parser.parse_args(["rules", "remove", "--port", "5300"])
    assert rules.run_cli(args, runner=ns.runner, out=out) == 0
    assert ns.snapshot() == before
    err = io.StringIO()
    args = parser.parse_args(["rules", "apply", "--port", "5300"])
    assert rules.run_cli(args, runner=FailOn(ns, ["ip", "-6", "rule", "add"]), out=out,
                         err=err) == 1
    assert "injected failure" in err.getvalue()
    assert ns.snapshot() == before


def test_the_rules_redirect_udp(topo):
    """One datagram per family crosses the router and lands on a transparent socket on the
    port; a destination in --exclude and one addressed to the router are left alone."""
    from tests.namespaces import RTR4_CLI, SRV4, SRV4_B, SRV6
    rtr = topo.rtr

    def runner(cmd, **kw):
        return subprocess.run(["ip", "netns", "exec", rtr.name, *cmd], **kw)

    apply(RulesOptions(5300, ifaces=["rtr0"], exclude=[f"{SRV4_B}/32"]), runner=runner)
    socks = []
    try:
        s4 = rtr.socket(socket.AF_INET)
        socks.append(s4)
        s4.setsockopt(socket.SOL_IP, 19, 1)                     # IP_TRANSPARENT
        s4.bind(("0.0.0.0", 5300))
        s6 = rtr.socket(socket.AF_INET6)
        socks.append(s6)
        s6.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s6.setsockopt(socket.IPPROTO_IPV6, 75, 1)               # IPV6_TRANSPARENT
        s6.bind(("::", 5300))
        for s in socks:
            s.settimeout(3)
        c4 = topo.cli.socket(socket.AF_INET)
        c6 = topo.cli.socket(socket.AF_INET6)
        socks += [c4, c6]
        c4.sendto(b"four", (SRV4, 9999))
        assert s4.recvfrom(100)[0] == b"four"
        c6.sendto(b"six", (f"{SRV6}", 9999))
        assert s6.recvfrom(100)[0] == b"six"
        c4.sendto(b"excluded", (SRV4_B, 9999))
        c4.sendto(b"local", (RTR4_CLI, 9999))
        c4.sendto(b"again", (SRV4, 9999))
        assert s4.recvfrom(100)[0] == b"again"      # the two before it were not redirected
    finally:
        for s in socks:
            s.close()
        remove(RulesOptions(5300), runner=runner)


@pytest.mark.parametrize("opts", READ_BACK, ids=range(len(READ_BACK)))
def test_parse_nft_reads_back_what_apply_installed(ns, opts):
    """nft prints the table its own way (sorted interfaces, merged neighbours as ranges,
    single addresses without a prefix length): parse_nft still finds the options."""
    apply(opts, runner=ns.runner)
    try:
        exists, listing = rules.nft_table_exists(ns.runner, opts.nft_table)
        assert exists
        got = rules.parse_nft(listing, nft_table=opts.nft_table, table=opts.table)
        assert normalized(got) == normalized(opts)
    finally:
        remove(opts, runner=ns.runner)
