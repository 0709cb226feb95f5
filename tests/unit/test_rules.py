"""relay.rules: what the ruleset says, that nft accepts it, and exact apply/remove bookkeeping
inside a network namespace of our own."""
import io
import ipaddress
import os
import re
import shutil
import subprocess

import pytest

from relay import rules
from relay.rules import (RESERVED4, RESERVED6, RT_PROTO, RulesError, RulesOptions, render_ip,
                         render_nft, render_shell)
from tests.support_rules import OPTION_SETS, READ_BACK, make_parser, normalized

needs_nft = pytest.mark.skipif(shutil.which("nft") is None,
                               reason="nft (nftables) is not installed")


def chain_lines(text):
    """The statement lines of the prerouting chain, in order."""
    body = text.split("chain prerouting {", 1)[1].split("}\n}", 1)[0]
    return [ln.strip() for ln in body.splitlines() if ln.strip()]


def set_elements(text, name):
    m = re.search(r"set %s \{(.*?)\n\t\}" % name, text, re.S)
    assert m, f"set {name} missing"
    el = re.search(r"elements = \{ (.*) \}", m.group(1))
    return [] if not el else [e.strip() for e in el.group(1).split(",")]


# --- options ----------------------------------------------------------------------------

def test_defaults():
    o = RulesOptions(5300)
    assert (o.port, o.mark, o.table, o.ifaces, o.ipv6, o.exclude, o.skip_mark, o.nft_table) == \
        (5300, 1, 100, (), True, (), 255, "relay")


@pytest.mark.parametrize("kw, exc, reason", [
    (dict(port=0), ValueError, "port out of range 1-65535: 0"),
    (dict(port=65536), ValueError, "port out of range"),
    (dict(port=True), TypeError, "port must be an integer"),
    (dict(port="53"), TypeError, "port must be an integer"),
    (dict(port=1, mark=0), ValueError, "mark out of range"),
    (dict(port=1, mark=2 ** 32), ValueError, "mark out of range"),
    (dict(port=1, mark=255), ValueError, "mark and skip mark must differ"),
    (dict(port=1, table=254), ValueError, "'main' table"),
    (dict(port=1, table=255), ValueError, "'local' table"),
    (dict(port=1, nft_table="bad name"), ValueError, "nft table name 'bad name'"),
    (dict(port=1, nft_table="x;flush ruleset"), ValueError, "nft table name"),
    (dict(port=1, ifaces=["eth0", 'e"vil']), ValueError, "interface name 'e\"vil'"),
    (dict(port=1, ifaces=["a" * 16]), ValueError, "interface name"),
    (dict(port=1, ifaces=["lo"]), ValueError, "interface 'lo'"),
    (dict(port=1, exclude=["10.0.0.0/33"]), ValueError, "prefix length out of range"),
    (dict(port=1, exclude=["2001:db8::/32"], ipv6=False), ValueError, "IPv6 redirection off"),
    (dict(port=1, ipv6="yes"), TypeError, "ipv6 must be True or False"),
])
def test_options_refuse_bad_values(kw, exc, reason):
    with pytest.raises(exc, match=re.escape(reason)):
        RulesOptions(**kw)


def test_options_normalize():
    o = RulesOptions(1, ifaces="eth0", exclude=["10.1.2.3/8", "10.0.0.0/8", "192.0.2.1"])
    assert o.ifaces == ("eth0",)
    assert o.exclude == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("192.0.2.1/32"))


# --- rendering --------------------------------------------------------------------------

def test_render_structure_defaults():
    text = render_nft(RulesOptions(5300))
    # Guarded replacement of our own table, and nothing else.
    assert "table inet relay\ndelete table inet relay\ntable inet relay {" in text
    assert len(re.findall(r"^table ", text, re.M)) == 2
    assert "flush ruleset" not in text
    lines = chain_lines(text)
    assert lines[0] == "type filter hook prerouting priority mangle; policy accept;"
    stmts = lines[1:]
    # Every rule says what it is for.
    assert all(re.search(r' comment "[^"]+"$', s) for s in stmts), stmts
    rules_ = [s.split(" comment ")[0] for s in stmts]
    assert rules_[0] == "meta l4proto != udp return"
    assert 'iifname "lo" return' in rules_
    assert "meta mark 0x000000ff return" in rules_
    assert "fib daddr type local return" in rules_
    assert "fib daddr type { broadcast, multicast } return" in rules_
    for r in ("ip daddr @reserved4 return", "ip daddr @exclude4 return",
              "ip6 daddr @reserved6 return", "ip6 daddr @exclude6 return"):
        assert r in rules_
    # The two TPROXY rules come last, after every exemption.
    assert rules_[-2:] == ["meta l4proto udp tproxy ip to :5300 meta mark set 0x00000001 accept",
                           "meta l4proto udp tproxy ip6 to :5300 meta mark set 0x00000001 accept"]
    assert all(r.endswith("return") for r in rules_[:-2])
    assert set_elements(text, "reserved4") == list(RESERVED4)
    assert set_elements(text, "reserved6") == list(RESERVED6)
    assert set_elements(text, "exclude4") == [] and set_elements(text, "exclude6") == []
    # Private ranges are not exempt by default: a router redirects LAN traffic anywhere.
    assert "10.0.0.0/8" not in text and "192.168.0.0/16" not in text


def test_render_with_options():
    o = RulesOptions(40000, mark=0x10, table=77, ifaces=["br-lan", "wg*"], skip_mark=0xabc,
                     exclude=["192.168.0.0/16", "192.168.1.0/24", "2001:db8::/32"],
                     nft_table="tp_udp")
    text = render_nft(o)
    assert "table inet tp_udp {" in text and "delete table inet tp_udp" in text
    rules_ = [s.split(" comment ")[0] for s in chain_lines(text)[1:]]
    assert 'iifname != { "br-lan", "wg*" } return' in rules_
    assert 'iifname "lo" return' not in rules_
    assert "meta mark 0x00000abc return" in rules_
    assert rules_[-1] == "meta l4proto udp tproxy ip6 to :40000 meta mark set 0x00000010 accept"
    assert set_elements(text, "exclude4") == ["192.168.0.0/16"]     # collapsed
    assert set_elements(text, "exclude6") == ["2001:db8::/32"]


def test_render_no_ipv6():
    text = render_nft(RulesOptions(5300, ipv6=False, exclude=["198.51.100.0/24"]))
    assert "ip6" not in text and "reserved6" not in text and "exclude6" not in text
    assert "tproxy ip to :5300" in text
    assert set_elements(text, "exclude4") == ["198.51.100.0/24"]
    assert render_ip(RulesOptions(5300, ipv6=False)) == [
        ["ip", "-4", "rule", "add", "fwmark", "1", "lookup", "100", "protocol", str(RT_PROTO)],
        ["ip", "-4", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", "100",
         "proto", str(RT_PROTO)],
    ]


def test_render_ip():
    cmds = render_ip(RulesOptions(5300, mark=7, table=123))
    assert [c[:4] for c in cmds] == [["ip", "-4", "rule", "add"], ["ip", "-4", "route", "add"],
                                     ["ip", "-6", "rule", "add"], ["ip", "-6", "route", "add"]]
    assert cmds[0][4:8] == ["fwmark", "7", "lookup", "123"]
    assert cmds[1][4:10] == ["local", "0.0.0.0/0", "dev", "lo", "table", "123"]
    assert cmds[3][4:10] == ["local", "::/0", "dev", "lo", "table", "123"]


def test_render_shell_is_a_script():
    out = render_shell(RulesOptions(5300))
    assert out.startswith("nft -f - <<'EOF'\n")
    assert "\nEOF\nip -4 rule add fwmark 1 lookup 100" in out
    assert out.rstrip().endswith("ip -6 route add local ::/0 dev lo table 100 proto 82")


@needs_nft
@pytest.mark.parametrize("opts", OPTION_SETS, ids=range(len(OPTION_SETS)))
def test_nft_accepts_the_ruleset(opts, tmp_path):
    if os.geteuid() != 0:
        pytest.skip("nft -c needs root (CAP_NET_ADMIN)")
    f = tmp_path / "relay.nft"
    f.write_text(render_nft(opts))
    r = subprocess.run(["nft", "-c", "-f", str(f)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@needs_nft
def test_nft_check_catches_a_broken_ruleset(tmp_path):
    """The check above can fail: a corrupted ruleset is refused."""
    if os.geteuid() != 0:
        pytest.skip("nft -c needs root (CAP_NET_ADMIN)")
    f = tmp_path / "bad.nft"
    f.write_text(render_nft(RulesOptions(5300)).replace("tproxy ip to", "tproxy ip too"))
    r = subprocess.run(["nft", "-c", "-f", str(f)], capture_output=True, text=True)
    assert r.returncode != 0


def test_cli_parses_and_prints():
    # --no-ipv6 with an IPv6 exclude is refused by RulesOptions: exit code 2 with the reason.
    args = make_parser().parse_args(
        ["rules", "print", "--port", "5300", "--iface", "eth0", "--iface", "eth1,wg0",
         "--exclude", "10.0.0.0/8,2001:db8::/32", "--no-ipv6"])
    err = io.StringIO()
    assert args.func(args, out=io.StringIO(), err=err) == 2
    assert "IPv6 redirection off" in err.getvalue()

    args = make_parser().parse_args(
        ["rules", "print", "--port", "5300", "--iface", "eth0", "--iface", "eth1,wg0",
         "--exclude", "10.0.0.0/8", "--exclude", "192.0.2.0/24", "--mark", "0x10",
         "--table", "200", "--skip-mark", "99", "--nft-table", "t1"])
    assert args.ipv6 is True
    out = io.StringIO()
    assert args.func(args, out=out) == 0
    text = out.getvalue()
    assert 'iifname != { "eth0", "eth1", "wg0" } return' in text
    assert "tproxy ip to :5300 meta mark set 0x00000010 accept" in text
    assert "meta mark 0x00000063 return" in text
    assert "table inet t1 {" in text
    assert "ip -4 rule add fwmark 16 lookup 200" in text
    assert "ip -6 route add local ::/0 dev lo table 200" in text


def test_cli_refuses_a_missing_port(capsys):
    args = make_parser().parse_args(["rules", "print"])
    assert args.func(args) == 2
    assert "--port is required" in capsys.readouterr().err


@pytest.mark.parametrize("argv, reason", [
    (["rules", "print", "--port", "0"], "port out of range"),
    (["rules", "print", "--port", "x"], "not a port number"),
    (["rules", "print", "--port", "1", "--exclude", "10.0.0.0/40"], "prefix length"),
    (["rules", "print", "--port", "1", "--mark", "-1"], "out of range"),
    (["rules", "show", "--port", "1"], "invalid choice"),
])
def test_cli_refuses_bad_arguments(argv, reason, capsys):
    with pytest.raises(SystemExit) as e:
        make_parser().parse_args(argv)
    assert e.value.code == 2
    assert reason in capsys.readouterr().err


def test_cli_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        make_parser().parse_args(["rules", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for fragment in ("--mark MARK", "(default: 1)", "(default: 100)", "(default: True)",
                     "(default: 255)", "(default: relay)", "(default: none;",
                     "(default: every interface but lo)", "--port PORT", "(required)",
                     "print,apply,remove"):
        assert fragment in help_text, fragment


@pytest.mark.parametrize("opts", READ_BACK, ids=range(len(READ_BACK)))
def test_parse_nft_reads_back_the_rendered_ruleset(opts):
    got = rules.parse_nft(render_nft(opts), nft_table=opts.nft_table, table=opts.table)
    assert normalized(got) == normalized(opts)


@pytest.mark.parametrize("cut, reason", [
    ("tproxy ip to", "lacks the IPv4 TPROXY rule"),
    ("meta mark 0x000000ff return", "lacks the skip mark rule"),
    ("tproxy ip6 to :5300 meta mark set 0x00000001", "the IPv4 and IPv6 TPROXY rules differ"),
])
def test_parse_nft_refuses_a_table_changed_by_hand(cut, reason):
    text = render_nft(RulesOptions(5300))
    if "ip6" in cut:
        text = text.replace(cut, "tproxy ip6 to :5301 meta mark set 0x00000001")
    else:
        text = "\n".join(ln for ln in text.splitlines() if cut not in ln)
    with pytest.raises(RulesError, match=reason):
        rules.parse_nft(text)
