"""`relay redir --reject PORTS`: a datagram to a rejected original destination port is not
relayed; the client gets an ICMP / ICMPv6 port unreachable from that destination, so its
connected socket fails at once (ECONNREFUSED). End to end through the TPROXY'd router
(cli -- rtr -- srv), both families, both reply modes, with and without an upstream; the
rate limit checked with counters. The configuration and command line parts need no root."""
import dataclasses
import socket

import pytest

from relay.config import ConfigError, format_ports, listener, parse_listener
from relay.privileges import CAP_NET_RAW, needed_capabilities
from tests.support_reject import PORT


# -- configuration, command line, privileges (no namespaces) ----------------------------------

def test_config_parses_ports_and_ranges():
    lc = parse_listener({"name": "r", "mode": "redir", "listen": "[::]:7000",
                         "reject": [443, "8443", "5000-5003", 443]}, resolve=False)
    assert lc.reject == (443, 5000, 5001, 5002, 5003, 8443)
    assert format_ports(lc.reject) == "443,5000-5003,8443"
    assert lc.summary()["reject"] == "443,5000-5003,8443"
    lc = parse_listener({"name": "r", "mode": "redir", "listen": "[::]:7000",
                         "reject": "443, 1-3"}, resolve=False)
    assert lc.reject == (1, 2, 3, 443)
    assert parse_listener({"name": "r", "mode": "redir", "listen": "[::]:7000"},
                          resolve=False).reject == ()


@pytest.mark.parametrize("value, key, reason", [
    ([0], "reject[0]", "port out of range 1-65535: 0"),
    ([443, 70000], "reject[1]", "port out of range 1-65535: 70000"),
    (["10-5"], "reject[0]", "runs backwards"),
    (["44x"], "reject[0]", 'not a port or a "LOW-HIGH" range: "44x"'),
    (["1-70000"], "reject[0]", "port out of range 1-65535: 70000"),
    ([True], "reject[0]", "got boolean true"),
    (443, "reject", "expected an array of ports and port ranges, got integer 443"),
])
def test_config_refuses_bad_ports_naming_file_key_and_reason(value, key, reason):
    with pytest.raises(ConfigError) as info:
        parse_listener({"name": "r", "mode": "redir", "listen": "[::]:7000", "reject": value},
                       source="relay.toml", resolve=False)
    assert str(info.value).startswith(f"relay.toml: listener[0].{key}: ")
    assert reason in str(info.value)


def test_config_refuses_reject_for_forward():
    with pytest.raises(ConfigError) as info:
        parse_listener({"name": "f", "mode": "forward", "listen": "[::]:6000",
                        "to": "192.0.2.1:53", "reject": [443]}, source="relay.toml",
                       resolve=False)
    assert "listener[0].reject: not allowed for mode \"forward\"" in str(info.value)


def test_cli_option_builds_the_same_listener(capsys):
    from relay import cli
    args = cli.build_parser().parse_args(["redir", "--listen", "[::]:7000", "--reject",
                                          "443,8443", "--reject", "5000-5001"])
    table = cli._listener_from_args(args, "redir")
    assert parse_listener(table, resolve=False).reject == (443, 5000, 5001, 8443)
    assert cli.main(["redir", "--listen", "[::]:7000", "--reject", "0", "--control", ""]) == 2
    assert "command line: listener[0].reject[0]: port out of range 1-65535: 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):            # forward has no --reject
        cli.build_parser().parse_args(["forward", "--listen", "[::]:6000", "--to",
                                       "192.0.2.1:53", "--reject", "443"])
    helptext = cli.build_parser()._subparsers._group_actions[0].choices["redir"].format_help()
    assert "--reject PORTS" in helptext


def test_transparent_replies_with_reject_keep_cap_net_raw():
    plain = listener("redir", listen=("::", PORT), reply="transparent")
    assert CAP_NET_RAW not in needed_capabilities([plain])
    assert CAP_NET_RAW in needed_capabilities([dataclasses.replace(plain, reject=(443,))])


def test_engine_refuses_reject_without_a_raw_socket_or_in_forward():
    from relay.datapath.engine import Engine
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with s:
        s.bind(("127.0.0.1", 0))
        with pytest.raises(ValueError, match="reject needs a raw socket"):
            Engine(s.fileno(), "redir", reply="transparent", reject=(443,))
        with pytest.raises(ValueError, match="reject applies to redir only"):
            Engine(s.fileno(), "forward", to=("127.0.0.1", 9), reject=(443,))
        with pytest.raises(ValueError, match="ports are 1-65535"):
            Engine(s.fileno(), "redir", raw4_fd=s.fileno(), reply="transparent", reject=(0,))
