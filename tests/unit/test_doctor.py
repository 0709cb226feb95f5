"""`relay doctor`: in the router namespace, each thing a TPROXY setup needs is broken on
purpose -> the doctor names exactly that check, exits 1, and the fix it prints repairs it;
the correct setup (relay rules apply + relay redir) -> every check ok, exit 0. The checks
that read /proc are also run against a fake proc root."""
import io

import pytest

from relay import cli, doctor, rules
from relay.doctor import Facts
from relay.rules import RulesOptions
from tests.support_doctor import PORT


# --- the checks against a fake proc root ---------------------------------------------------

def fake_facts(tmp_path, files, **known):
    """Facts over a proc root made of ``files`` ({path: text}), with ``known`` facts given
    instead of gathered (they are cached properties)."""
    for path, text in files.items():
        p = tmp_path / path
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    f = Facts(proc=str(tmp_path), control="", runner=None)
    f.__dict__.update({"tproxy": True, "families": {4, 6}, "relay": None, "relay_error": "",
                       **known})
    return f


BRIDGED = {"br-lan": {"linkinfo": {"info_kind": "bridge"}},
           "lan1": {"linkinfo": {"info_kind": "veth", "info_slave_kind": "bridge"}},
           "wan": {"linkinfo": {"info_kind": "veth"}}}
BR = "sys/net/bridge/bridge-nf-call-"


@pytest.mark.parametrize("scope, values, ok, words", [
    (["br-lan"], None, True, "br_netfilter is not loaded"),
    (["wan"], ("1", "1"), True, "no bridged interface among wan"),
    (["br-lan"], ("1", "0"), False, "br-lan bridged and bridge-nf-call-iptables = 1"),
    (["lan1", "wan"], ("0", "1"), False, "lan1 bridged and bridge-nf-call-ip6tables = 1"),
    (["br-lan", "lan1"], ("0", "0"), True, "br-lan, lan1 bridged"),
])
def test_br_netfilter_check_on_a_fake_proc(tmp_path, scope, values, ok, words):
    files = {} if values is None else {BR + "iptables": values[0], BR + "ip6tables": values[1]}
    f = fake_facts(tmp_path, files, links=BRIDGED, scope=scope)
    c = doctor.check_br_netfilter(f)
    assert (c.name, c.ok) == ("br_netfilter", ok) and words in c.message, c
    if not ok:
        assert c.fix.startswith("sysctl -w net.bridge.bridge-nf-call-")
        assert c.fix.endswith("=0")


def test_rp_filter_check_names_vlan_interfaces_as_sysctl_does(tmp_path):
    """eth0.10 is sysctl's net.ipv4.conf.eth0/10; the kernel takes max(all, interface)."""
    f = fake_facts(tmp_path, {"sys/net/ipv4/conf/all/rp_filter": "0",
                              "sys/net/ipv4/conf/eth0.10/rp_filter": "1",
                              "sys/net/ipv4/conf/eth1/rp_filter": "0"},
                   scope=["eth0.10", "eth1"])
    c = doctor.check_rp_filter(f)
    assert not c.ok and c.fix == "sysctl -w net.ipv4.conf.eth0/10.rp_filter=2"
    (tmp_path / "sys/net/ipv4/conf/all/rp_filter").write_text("2")     # loose wins
    assert doctor.check_rp_filter(fake_facts(tmp_path, {}, scope=["eth0.10", "eth1"])).ok


def status(caps):
    mask = sum(1 << doctor.CAP_NUMBERS[c] for c in caps)
    return f"Name:\tpython\nCapEff:\t{mask:016x}\n"


def test_worker_capabilities_on_a_fake_proc(tmp_path):
    workers = [{"index": 0, "pid": 4242, "listeners": ["dns"],
                "capabilities": ["CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN", "CAP_NET_RAW"]}]
    files = {"self/status": status(["CAP_NET_ADMIN"]),
             "4242/status": status(["CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN"])}
    f = fake_facts(tmp_path, files, relay={"pid": 4241, "workers": workers, "listeners": []})
    c = doctor.check_capabilities(f)
    assert not c.ok and "worker 0 (pid 4242) lacks CAP_NET_RAW" in c.message
    assert "restart the relay" in c.fix
    (tmp_path / "4242/status").write_text(status(["CAP_NET_BIND_SERVICE", "CAP_NET_ADMIN",
                                                  "CAP_NET_RAW"]))
    assert doctor.check_capabilities(f).ok


def test_worker_fd_limit_on_a_fake_proc(tmp_path):
    listeners = [{"name": "dns", "mode": "redir", "max_associations": 4000,
                  "transparent_cache": 1000}]
    workers = [{"index": 0, "pid": 4242, "listeners": ["dns"], "capabilities": []}]
    limits = "Limit   Soft Limit   Hard Limit   Units\nMax open files  {} 65536 files\n"
    f = fake_facts(tmp_path, {"4242/limits": limits.format(4096), "sys/fs/nr_open": "1048576"},
                   relay={"pid": 1, "workers": workers, "listeners": listeners})
    c = doctor.check_fd_limit(f)
    assert not c.ok and "worker 0 (pid 4242): 4096 for 5064 needed" in c.message, c
    assert c.fix.startswith("ulimit -n 5064, ")
    (tmp_path / "4242/limits").write_text(limits.format("unlimited"))
    c = doctor.check_fd_limit(f)
    assert "worker 0 (pid 4242): unlimited" in c.message


def test_udp_bound_reads_proc_net_udp(tmp_path):
    head = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
    f = fake_facts(tmp_path, {
        "net/udp": head + "  1: 0100007F:0035 00000000:0000 07 00000000:00000000 00:00 0 0\n",
        "net/udp6": head + "  2: 00000000000000000000000000000000:1B58 "
                           "00000000000000000000000000000000:0000 07 0:0 00:00 0 0\n"})
    assert f.udp_bound(53) and f.udp_bound(7000) and not f.udp_bound(7001)


def test_a_check_that_cannot_read_says_so():
    def runner(cmd, **kw):
        raise FileNotFoundError(2, "No such file", cmd[0])
    f = Facts(control="", runner=runner, port=PORT)
    c = doctor.check_kernel_tproxy(f)
    assert not c.ok and c.message == "could not check: nft: not found"


# --- command line ---------------------------------------------------------------------------

@pytest.mark.parametrize("argv, words", [
    (["doctor", "--port", "0"], "port out of range"),
    (["doctor", "--port", "x"], "not a port number"),
    (["doctor", "--bogus"], "unrecognized arguments"),
])
def test_usage_errors_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.parametrize("argv, words", [
    (["doctor", "--iface", 'e"vil'], "interface name"),
    (["doctor", "--iface", "lo"], "interface 'lo'"),
    (["doctor", "--nft-table", "x;y"], "nft table name"),
])
def test_bad_names_exit_2_before_any_check(argv, words):
    parser = cli.build_parser()
    args = parser.parse_args(argv)
    err = io.StringIO()

    def runner(cmd, **kw):
        raise AssertionError(f"ran {cmd}")
    assert doctor.run_cli(args, runner=runner, out=io.StringIO(), err=err) == 2
    assert words in err.getvalue()


def test_fix_commands_are_relay_rules_commands():
    """rules.cli_args is the inverse of the rules command line."""
    o = RulesOptions(5300, mark=0x10, table=7, ifaces=["br-lan", "wg*"], ipv6=False,
                     exclude=["10.0.0.0/8"], skip_mark=9, nft_table="t1")
    parser = argparse_rules()
    args = parser.parse_args(["rules", "apply", *rules.cli_args(o)])
    assert rules.options_from_args(args) == o
    assert rules.cli_args(RulesOptions(5300)) == ["--port", "5300"]


def argparse_rules():
    import argparse
    p = argparse.ArgumentParser(prog="relay")
    rules.add_cli(p.add_subparsers(dest="command"))
    return p
