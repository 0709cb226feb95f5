"""`relay rules tun`: the commands it renders and the options it refuses (no system
changed; tests/netns/test_rules_tun.py applies and removes them in a namespace)."""
import io

import pytest

from relay import cli, rules_tun
from relay.rules_tun import TunRulesOptions


def test_print_renders_device_routes_throws_and_rules():
    args = cli.build_parser().parse_args(
        ["rules", "tun", "print", "--dev", "tun9", "--iface", "br-lan,wlan0", "--local",
         "--exclude", "203.0.113.0/24,2001:db8:5::/48", "--skip-mark", "7", "--table", "120"])
    out = io.StringIO()
    assert args.func(args, out=out) == 0
    text = out.getvalue()
    assert text.startswith("ip tuntap add dev tun9 mode tun multi_queue\n")
    for line in ("ip -4 route add default dev tun9 table 120 proto 82",
                 "ip -4 route add throw 10.0.0.0/8 table 120 proto 82",
                 "ip -4 route add throw 203.0.113.0/24 table 120 proto 82",
                 "ip -6 route add throw 2001:db8:5::/48 table 120 proto 82",
                 "ip -6 route add throw fc00::/7 table 120 proto 82",
                 "ip -4 rule add priority 9000 fwmark 7 lookup main protocol 82",
                 "ip -4 rule add priority 9001 iif br-lan ipproto udp lookup 120 protocol 82",
                 "ip -4 rule add priority 9002 iif wlan0 ipproto udp lookup 120 protocol 82",
                 "ip -6 rule add priority 9003 iif lo ipproto udp lookup 120 protocol 82"):
        assert line + "\n" in text, line


def test_without_local_no_mark_rule_and_no_ipv6_when_asked():
    text = rules_tun.render_shell(TunRulesOptions(ifaces=("eth1",), ipv6=False), device=False)
    assert "fwmark" not in text and "iif lo" not in text and " -6 " not in text
    assert "ip -4 rule add priority 9001 iif eth1 ipproto udp lookup 110 protocol 82\n" in text


@pytest.mark.parametrize("kw, words", [
    ({}, "nothing to send into the device"),
    ({"ifaces": ("eth*",)}, "name each interface"),
    ({"ifaces": ("relay0",)}, "the TUN device itself"),
    ({"ifaces": ("lo",)}, "interface 'lo'"),
    ({"ifaces": ("eth0",), "dev": "a/b"}, "device name"),
    ({"ifaces": ("eth0",), "table": 254}, "'main' table"),
    ({"ifaces": ("eth0",), "exclude": ("10.0.0.0/40",)}, "prefix length"),
    ({"ifaces": ("eth0",), "priority": 0}, "priority out of range"),
])
def test_bad_options_refused(kw, words):
    with pytest.raises((ValueError, TypeError), match=words):
        TunRulesOptions(**kw)


def test_cli_needs_an_action_and_reports_bad_options():
    err = io.StringIO()
    args = cli.build_parser().parse_args(["rules", "tun", "--iface", "eth0"])
    assert args.func(args, err=err) == 2 and "give print, apply or remove" in err.getvalue()
    args = cli.build_parser().parse_args(["rules", "tun", "apply"])
    assert args.func(args, err=err) == 2 and "--iface" in err.getvalue()
