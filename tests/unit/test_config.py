"""relay.config: typed TOML config; every problem is a ConfigError reading FILE: KEY: REASON."""
import ipaddress
import math
import os
import pathlib

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from relay.net.addr import Upstream
from relay.config import (FILE_KEYS, LISTENER_KEYS, MODE_KEYS, MODES, Config, ConfigError, GlobalConfig,
                          ListenerConfig, load_config, parse_config, parse_listener)
from tests.support import REPO, examples

EXAMPLE = pathlib.Path(REPO) / "examples" / "relay.toml"

# A minimal valid listener per mode.
MINIMAL = {
    "forward": {"name": "f", "mode": "forward", "listen": "127.0.0.1:5353",
                "to": "198.51.100.2:53"},
    "redir": {"name": "r", "mode": "redir", "listen": "0.0.0.0:5300"},
    "tunnel-server": {"name": "ts", "mode": "tunnel-server", "listen": "127.0.0.1:8443"},
    "tunnel-client": {"name": "tc", "mode": "tunnel-client", "listen": "127.0.0.1:5354",
                      "server": "127.0.0.1:8443", "to": "198.51.100.2:53"},
    "socks5": {"name": "s", "mode": "socks5", "listen": "127.0.0.1:1080"},
    "tun": {"name": "t", "mode": "tun"},
}


def one(base_mode, **extra):
    return {"listener": [dict(MINIMAL[base_mode], **extra)]}


def err(doc, source="relay.toml", **kw):
    with pytest.raises(ConfigError) as e:
        parse_config(doc, source, **kw)
    return str(e.value)


# --- valid documents --------------------------------------------------------------------

def test_example_file_loads():
    cfg = load_config(EXAMPLE)
    assert isinstance(cfg, Config)
    assert cfg.global_.workers == 2 and cfg.global_.metrics == ("127.0.0.1", 9477)
    by = cfg.listeners_by_name()
    assert set(m.mode for m in cfg.listeners) == set(MODES)
    assert by["dns"].listen == ("::", 5353) and by["dns"].to == ("198.51.100.2", 53)
    assert by["tproxy"].workers == 1 and by["tproxy"].reply == "raw"
    assert by["tproxy6-socks"].upstream == Upstream("socks5", "127.0.0.1", 1080, "alice", "s3cr@t")
    assert by["game"].upstream.kind == "tunnel" and by["game"].connections == 2
    assert by["tunnel-in"].allow == (ipaddress.ip_network("198.51.100.0/24"),
                                     ipaddress.ip_network("2001:db8::/32"))
    assert by["tunnel-out"].server == ("203.0.113.10", 8443)
    assert by["gost-out"].gost and (by["gost-out"].user, by["gost-out"].password) == \
        ("alice", "s3cr@t")
    assert not by["tunnel-out"].gost
    assert by["game-gost"].upstream == Upstream("gost", "203.0.113.10", 8444, "alice", "s3cr@t")
    assert [u.kind for u in by["game-multi"].upstreams] == ["tunnel", "socks5"]
    assert by["game-multi"].balance == "hash"
    assert by["socks"].user == "alice" and by["socks"].password == "s3cr@t"
    assert (by["tun"].dev, by["tun"].mtu, by["tun"].offload, by["tun"].listen) == \
        ("relay0", 1500, "auto", None)


def test_minimal_listener_of_every_mode_and_defaults():
    for mode, table in MINIMAL.items():
        cfg = parse_config({"listener": [table]})
        lst = cfg.listeners[0]
        assert lst.mode == mode
        # the servers that face the internet mark nothing by default (no CAP_NET_ADMIN)
        mark = 0 if mode in ("tunnel-server", "socks5") else 255
        assert (lst.reply, lst.mark, lst.timeout, lst.max_associations, lst.transparent_cache,
                lst.transparent_idle, lst.batch, lst.connections, lst.insecure, lst.workers,
                lst.upstream, lst.allow, lst.deny) == \
            ("raw", mark, 60.0, 65536, 1024, 30.0, 64, 1, False, None, None, (), ())
    g = parse_config(one("redir")).global_
    assert g == GlobalConfig()
    assert g.workers == max(1, os.cpu_count() or 1) and g.pin is False
    assert g.log_level == "info" and g.control_socket == "/run/relay/relay.sock"
    assert g.metrics is None and g.user is None


def test_empty_control_socket_means_none():
    assert parse_config({"global": {"control_socket": ""}, **one("redir")}).global_ \
        .control_socket is None
    assert parse_config({"global": {"control_socket": "/tmp/r.sock"}, **one("redir")}).global_ \
        .control_socket == "/tmp/r.sock"


def test_toml_text_and_dict_agree():
    text = """
[global]
workers = 3
log_level = "DEBUG"

[[listener]]
name = "dns"
mode = "forward"
listen = "[::]:5353"
to = "198.51.100.2:53"
timeout = 5            # an integer for a float key is fine
"""
    cfg = parse_config(text)
    assert cfg.global_.workers == 3 and cfg.global_.log_level == "debug"
    lst = cfg.listeners[0]
    assert lst.timeout == 5.0 and isinstance(lst.timeout, float)
    assert parse_config(text.encode()) == cfg
    assert parse_config({"global": {"workers": 3, "log_level": "debug"},
                         "listener": [{"name": "dns", "mode": "forward", "listen": "[::]:5353",
                                       "to": "198.51.100.2:53", "timeout": 5.0}]}) == cfg


def test_direct_upstream_is_none_and_hostnames_resolve_once():
    cfg = parse_config(one("forward", upstream="direct", to="localhost:53"))
    lst = cfg.listeners[0]
    assert lst.upstream is None
    assert ipaddress.ip_address(lst.to[0]).is_loopback and lst.to[1] == 53
    msg = err(one("forward", to="localhost:53"), resolve=False)
    assert msg == ("relay.toml: listener[0].to: host names are not accepted here, "
                   "use an IP address: 'localhost'")


def test_loopback_and_insecure_servers():
    parse_config(one("tunnel-server"))                                # loopback: no secret needed
    parse_config(one("tunnel-server", listen="0.0.0.0:8443", secret="k"))
    parse_config(one("tunnel-server", listen="0.0.0.0:8443", insecure=True))
    parse_config(one("socks5", listen="[::]:1080", user="u", password="p"))
    parse_config(one("socks5", listen="[::]:1080", insecure=True))
    parse_config(one("tunnel-server", listen="0.0.0.0:8443", user="u", password="p"))
    assert err(one("tunnel-server", listen="0.0.0.0:8443")).startswith(
        "relay.toml: listener[0].secret: required (or user and password) when listening on a "
        "non-loopback address")
    assert err(one("tunnel-server", listen="0.0.0.0:8443", user="u")).startswith(
        "relay.toml: listener[0].password: user and password go together")
    assert err(one("socks5", listen="192.0.2.1:1080")).startswith(
        "relay.toml: listener[0].user: user and password required")


def test_tunnel_upstream_options():
    lst = parse_config(one("redir", upstream="tunnel://127.0.0.1:8443", secret="k",
                           connections=4)).listeners[0]
    assert lst.upstream == Upstream("tunnel", "127.0.0.1", 8443) and lst.connections == 4
    assert err(one("forward", secret="k")) == (
        "relay.toml: listener[0].secret: only applies with a tunnel:// upstream "
        "(upstream is direct)")
    assert "only applies with a tunnel:// upstream (upstream is socks5://127.0.0.1:1080)" in \
        err(one("forward", upstream="socks5://127.0.0.1:1080", connections=2))


def test_gost_options():
    lst = parse_config(one("tunnel-client", gost=True, user="u", password="p")).listeners[0]
    assert lst.gost and lst.user == "u" and lst.connections == 1
    lst = parse_config(one("redir", upstream="gost://u:p%20w@127.0.0.1:8443")).listeners[0]
    assert lst.upstream == Upstream("gost", "127.0.0.1", 8443, "u", "p w")
    assert err(one("tunnel-client", gost=True, secret="k")).startswith(
        "relay.toml: listener[0].secret: does not apply with gost = true: a gost server does "
        "not know relay's secret proof")
    assert err(one("tunnel-client", gost=True, connections=2)).startswith(
        "relay.toml: listener[0].connections: does not apply with gost = true")
    assert err(one("tunnel-client", user="u", password="p")).startswith(
        "relay.toml: listener[0].user: only applies with gost = true")
    assert err(one("tunnel-client", gost=True, password="p")) == \
        "relay.toml: listener[0].user: user and password go together: both or neither"
    assert err(one("tunnel-client", gost="yes")) == \
        'relay.toml: listener[0].gost: expected true or false, got string "yes"'
    assert err(one("forward", upstream="gost://u:hunter2@127.0.0.1:8443", secret="k")).startswith(
        "relay.toml: listener[0].secret: does not apply with a gost:// upstream")
    assert err(one("redir", upstream="gost://127.0.0.1:8443", connections=3)).startswith(
        "relay.toml: listener[0].connections: does not apply with a gost:// upstream")
    assert "only for: tunnel-client" in err(one("forward", gost=True))
    msg = err(one("forward", upstream="gost://u:hunter2@127.0.0.1:99999"))
    assert msg.startswith("relay.toml: listener[0].upstream:") and "hunter2" not in msg


# --- errors: file, key, reason -----------------------------------------------------------

def test_brief_examples_exactly():
    doc = {"listener": [MINIMAL["forward"], dict(MINIMAL["redir"], listen="1.2.3.4:70000")]}
    assert err(doc) == "relay.toml: listener[1].listen: port out of range 1-65535: 70000"
    msg = err(one("forward", tmeout=60))
    assert msg.startswith('relay.toml: listener[0].tmeout: unknown key, did you mean "timeout"?')
    assert "(known: name, mode, listen, to," in msg
    assert err(one("forward", timeout="60s")) == \
        'relay.toml: listener[0].timeout: expected a number, got string "60s"'


INT_KEYS = [("forward", "mark"), ("forward", "max_associations"), ("redir", "transparent_cache"),
            ("forward", "batch"), ("tunnel-client", "connections"), ("forward", "workers")]
FLOAT_KEYS = [("forward", "timeout"), ("redir", "transparent_idle")]
STR_KEYS = [("forward", "to"), ("tunnel-client", "server"), ("forward", "upstream"),
            ("redir", "reply"), ("tunnel-server", "secret"), ("forward", "name"),
            ("forward", "mode"), ("forward", "listen")]


@pytest.mark.parametrize("mode, key", INT_KEYS)
@pytest.mark.parametrize("bad, described", [
    (True, "boolean true"), (1.0, "float 1.0"), ("8", 'string "8"'), ([1], "array"),
    ({"a": 1}, "table"),
])
def test_integer_keys_refuse_other_types(mode, key, bad, described):
    assert err(one(mode, **{key: bad})) == \
        f"relay.toml: listener[0].{key}: expected an integer, got {described}"


@pytest.mark.parametrize("mode, key", FLOAT_KEYS)
@pytest.mark.parametrize("bad, reason", [
    (False, "expected a number, got boolean false"), ("1", 'expected a number, got string "1"'),
    ([1.0], "expected a number, got array"), (math.nan, "must be a finite number"),
    (math.inf, "must be a finite number"), (0, "out of range (must be > 0"),
    (-1.5, "out of range (must be > 0"), (1e9, "out of range"),
])
def test_float_keys(mode, key, bad, reason):
    assert err(one(mode, **{key: bad})).startswith(f"relay.toml: listener[0].{key}: {reason}")
    assert getattr(parse_config(one(mode, **{key: 2})).listeners[0], key) == 2.0


@pytest.mark.parametrize("mode, key", STR_KEYS)
@pytest.mark.parametrize("bad, described", [(5, "integer 5"), (True, "boolean true"),
                                            (["x"], "array"), (1.5, "float 1.5")])
def test_string_keys_refuse_other_types(mode, key, bad, described):
    if key in ("upstream", "server") and isinstance(bad, list):    # several: each checked
        assert err(one(mode, **{key: [5, "direct"]})) == \
            f"relay.toml: listener[0].{key}[0]: expected a string, got integer 5"
        return
    assert err(one(mode, **{key: bad})) == \
        f"relay.toml: listener[0].{key}: expected a string, got {described}"


@pytest.mark.parametrize("mode, key", [("tunnel-server", "insecure"), ("socks5", "insecure")])
def test_bool_keys(mode, key):
    assert err(one(mode, **{key: 1})) == \
        f"relay.toml: listener[0].{key}: expected true or false, got integer 1"
    assert err(one(mode, **{key: "true"})).endswith('got string "true"')


@pytest.mark.parametrize("mode, key, value, reason", [
    ("forward", "mark", -1, "out of range 0-4294967295: -1"),
    ("forward", "mark", 2 ** 32, "out of range 0-4294967295"),
    ("forward", "max_associations", 0, "out of range 1-16777216: 0"),
    ("redir", "transparent_cache", 0, "out of range 1-"),
    ("forward", "batch", 0, "out of range 1-1024: 0"),
    ("forward", "batch", 1025, "out of range 1-1024: 1025"),
    ("tunnel-client", "connections", 0, "out of range 1-256: 0"),
    ("forward", "workers", 0, "out of range 1-1024: 0"),
    ("redir", "reply", "spoof", 'unknown reply mode "spoof" (known: raw, transparent)'),
    ("redir", "reply", "transparnt", 'did you mean "transparent"?'),
    ("forward", "mode", "fwd", 'unknown mode "fwd", did you mean "forward"?'),
    ("forward", "mode", "", "must not be empty"),
    ("forward", "name", "a b", '"a b": use 1-64 letters'),
    ("forward", "name", "x" * 65, "use 1-64 letters"),
    ("forward", "listen", "2001:db8::1:53", "IPv6 addresses must be in brackets"),
    ("forward", "listen", ":53", "empty host"),
    ("forward", "listen", "1.2.3.4:0", "port out of range 1-65535: 0"),
    ("forward", "listen", "1.2.3.4", 'missing port (HOST:PORT): "1.2.3.4"'),
    ("forward", "listen", "localhost:53", "host names are not accepted here"),
    ("forward", "to", "198.51.100.2:99999", "port out of range 1-65535: 99999"),
    ("forward", "to", "not a host:53", "not an IP address or host name: 'not a host'"),
    ("forward", "to", "a\x00b:1", "must not contain NUL"),
    ("tunnel-client", "server", "[2001:db8::1]", "missing port"),
    ("forward", "upstream", "http://1.2.3.4:80", "unknown scheme 'http'"),
    ("forward", "upstream", "socks5://u@127.0.0.1:1", "user without password"),
    ("tunnel-server", "secret", "", "must not be empty"),
    ("socks5", "user", "u" * 256, "at most 255 bytes (RFC 1929), got 256"),
    ("tunnel-server", "allow", "198.51.100.0/24", "expected an array of CIDR strings, got string"),
    ("tunnel-server", "allow", ["300.0.0.0/8"], "not an IPv4 or IPv6 address"),
    ("socks5", "deny", [5], "expected a string, got integer 5"),
])
def test_bad_values(mode, key, value, reason):
    msg = err(one(mode, **{key: value}))
    assert msg.startswith(f"relay.toml: listener[0].{key}")
    assert reason in msg


def test_cidr_list_errors_name_the_item():
    assert err(one("socks5", deny=["10.0.0.0/8", "10.0.0.0/99"])).startswith(
        "relay.toml: listener[0].deny[1]: CIDR '10.0.0.0/99': prefix length out of range")


@pytest.mark.parametrize("key, value, reason", [
    ("workers", 0, "out of range 1-1024: 0"),
    ("workers", True, "expected an integer, got boolean true"),
    ("pin", "yes", 'expected true or false, got string "yes"'),
    ("log_level", "verbose", 'unknown log level "verbose"'),
    ("log_level", "warn", 'did you mean "warning"?'),
    ("control_socket", 5, "expected a string, got integer 5"),
    ("control_socket", "/" + "x" * 200, "path too long for a unix socket"),
    ("metrics", "localhost:9000", "host names are not accepted here"),
    ("metrics", 9000, "expected a string, got integer 9000"),
    ("user", 0, "expected a string, got integer 0"),
    ("wrkers", 2, 'unknown key, did you mean "workers"?'),
])
def test_global_errors(key, value, reason):
    msg = err({"global": {key: value}, **one("redir")})
    assert msg.startswith(f"relay.toml: global.{key}: ")
    assert reason in msg


@pytest.mark.parametrize("doc, key, reason", [
    ({"listener": []}, "listener", "at least one [[listener]] is required"),
    ({"global": {}}, "listener", "at least one [[listener]] is required"),
    ({"listener": {"name": "x"}}, "listener", "write [[listener]], not [listener]"),
    ({"listener": "x"}, "listener", "expected an array of tables"),
    ({"listener": [5]}, "listener[0]", "expected a table ([[listener]]), got integer 5"),
    ({"global": [1], "listener": [MINIMAL["redir"]]}, "global", "expected a table ([global])"),
    ({"globl": {}, "listener": [MINIMAL["redir"]]}, "globl", 'did you mean "global"?'),
    ({"listeners": []}, "listeners", 'unknown key, did you mean "listener"?'),
    ({1: 2}, "(top level)", "keys must be strings"),
])
def test_document_structure_errors(doc, key, reason):
    msg = err(doc)
    assert msg.startswith(f"relay.toml: {key}: ")
    assert reason in msg


@pytest.mark.parametrize("mode", MODES)
def test_required_keys(mode):
    for key in ("name", "mode") + (() if mode == "tun" else ("listen",)):
        table = dict(MINIMAL[mode])
        del table[key]
        assert err({"listener": [table]}) == f"relay.toml: listener[0].{key}: missing required key"
    for key in {"forward": ["to"], "tunnel-client": ["server", "to"]}.get(mode, []):
        table = dict(MINIMAL[mode])
        del table[key]
        assert err({"listener": [table]}) == \
            f'relay.toml: listener[0].{key}: missing required key for mode "{mode}"'


@pytest.mark.parametrize("mode", MODES)
def test_keys_of_other_modes_are_refused(mode):
    samples = {"to": "198.51.100.2:53", "server": "127.0.0.1:1", "upstream": "direct",
               "reply": "raw", "transparent_cache": 5, "transparent_idle": 5.0, "secret": "k",
               "user": "u", "password": "p", "allow": [], "deny": [], "connections": 1,
               "insecure": False}
    for key, value in samples.items():
        if key in MODE_KEYS[mode]:
            continue
        msg = err(one(mode, **{key: value}))
        assert msg.startswith(f'relay.toml: listener[0].{key}: not allowed for mode "{mode}" '
                              f'(only for: ')


def test_redir_forbids_to_and_reply_is_only_for_redir():
    assert err(one("redir", to="198.51.100.2:53")) == \
        ('relay.toml: listener[0].to: not allowed for mode "redir" '
         '(only for: forward, tunnel-client)')
    assert err(one("forward", reply="raw")) == \
        'relay.toml: listener[0].reply: not allowed for mode "forward" (only for: redir)'


def test_user_and_password_go_together():
    assert err(one("socks5", user="u")) == \
        "relay.toml: listener[0].password: user and password go together: both or neither"
    assert err(one("socks5", password="p")) == \
        "relay.toml: listener[0].user: user and password go together: both or neither"


def test_duplicate_names_and_listen_addresses():
    a = MINIMAL["forward"]
    assert err({"listener": [a, dict(a, listen="127.0.0.1:1")]}) == \
        'relay.toml: listener[1].name: duplicate name "f" (also listener[0])'
    assert err({"listener": [a, dict(a, name="g")]}) == (
        'relay.toml: listener[1].listen: 127.0.0.1:5353 is already used by listener[0] "f" '
        '(forward, 127.0.0.1:5353)')
    # Same UDP address, another UDP mode: still a collision.
    assert "already used" in err({"listener": [a, dict(MINIMAL["redir"], listen=a["listen"])]})
    # [::] takes IPv4 too.
    assert "already used" in err({"listener": [
        dict(MINIMAL["redir"], listen="0.0.0.0:5300"), dict(MINIMAL["redir"], name="r6",
                                                            listen="[::]:5300")]})
    # TCP and UDP on one address, or another port, or another address: fine.
    parse_config({"listener": [a, dict(MINIMAL["socks5"], listen=a["listen"])]})
    parse_config({"listener": [a, dict(a, name="g", listen="127.0.0.1:5354")]})
    parse_config({"listener": [a, dict(a, name="g", listen="127.0.0.2:5353")]})


def test_toml_syntax_errors_name_the_line():
    text = '[global]\nworkers = 2\n\n[[listener]]\nname = "x\n'
    msg = err(text)
    assert msg.startswith("relay.toml: line 5, column ") and "TOML syntax error" in msg
    msg = err('[global]\nworkers = 2\nworkers = 3\n')
    assert msg.startswith("relay.toml: line 3, column ")
    assert err("x = " + "[" * 3000 + "]" * 3000).startswith("relay.toml: syntax: TOML syntax error")
    assert err("x = " + "1" * 5000).startswith("relay.toml: syntax: TOML syntax error")
    assert err(b"\xff\xfe").startswith("relay.toml: not valid UTF-8")
    assert err(42) == "relay.toml: expected a TOML document (a table), got integer 42"


def test_load_config_names_the_file(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text('[[listener]]\nname = "a"\nmode = "forward"\nlisten = "[::]:53"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f'{p}: listener[0].to: missing required key for mode "forward"'
    assert e.value.source == str(p) and e.value.key == "listener[0].to"
    assert isinstance(e.value, ValueError)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path / "missing.toml")
    assert str(e.value) == f"{tmp_path / 'missing.toml'}: cannot read: No such file or directory"


def test_parse_listener_for_subcommands():
    lst = parse_listener({"name": "cli", "mode": "forward", "listen": "[::]:5353",
                          "to": "198.51.100.2:53", "batch": 32})
    assert isinstance(lst, ListenerConfig) and lst.batch == 32
    with pytest.raises(ConfigError) as e:
        parse_listener({"name": "cli", "mode": "forward", "listen": "[::]:5353"},
                       source="relay forward")
    assert str(e.value) == 'relay forward: listener[0].to: missing required key for mode "forward"'


# --- reload -----------------------------------------------------------------------------

def test_equality_and_diff_for_reload():
    base = {"global": {"workers": 2}, "listener": [
        MINIMAL["forward"], MINIMAL["redir"], dict(MINIMAL["socks5"], workers=1)]}
    old = parse_config(base)
    same = parse_config(base)
    assert old == same and hash(old) == hash(same)
    assert old.listeners_by_name().keys() == {"f", "r", "s"}
    d = old.diff(same)
    assert (d.added, d.removed, d.changed) == ((), (), ()) and set(d.unchanged) == {"f", "r", "s"}

    new = parse_config({"global": {"workers": 2}, "listener": [
        dict(MINIMAL["forward"], timeout=10), MINIMAL["tunnel-client"],
        dict(MINIMAL["socks5"], workers=1)]})
    d = old.diff(new)
    assert d.added == ("tc",) and d.removed == ("r",) and d.changed == ("f",)
    assert d.unchanged == ("s",)

    # Listeners inheriting global.workers change with it; one with its own count does not.
    more = parse_config(dict(base, **{"global": {"workers": 3}}))
    d = old.diff(more)
    assert set(d.changed) == {"f", "r"} and d.unchanged == ("s",)


# --- fuzz: nothing but ConfigError ---------------------------------------------------------

def check_only_config_error(doc):
    try:
        cfg = parse_config(doc, "fuzz.toml", resolve=False)
    except ConfigError as e:
        assert str(e).startswith("fuzz.toml: ")
        return None
    assert isinstance(cfg, Config) and cfg.listeners
    return cfg


EXAMPLE_TEXT = EXAMPLE.read_text()


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_fuzz_random_text(text):
    check_only_config_error(text)


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_mutated_example(data):
    text = EXAMPLE_TEXT
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(text)))
        cut = data.draw(st.integers(0, 8))
        ins = data.draw(st.text(alphabet=st.sampled_from(list('[]{}"=.,:#\n 0123456789-abcxtf')),
                                max_size=6))
        text = text[:pos] + ins + text[pos + cut:]
    check_only_config_error(text)


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(allow_nan=True),
    st.text(max_size=20),
    st.sampled_from(["127.0.0.1:1", "[::]:53", "0.0.0.0:0", "1.2.3.4:70000", "a:1",
                     "tunnel://127.0.0.1:1", "socks5://u:p@[::1]:9", "direct", "raw",
                     "transparent", "10.0.0.0/8", "redir", "forward", "socks5"]),
)
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6)
listener_tables = st.builds(
    lambda base, extra: {**base, **extra},
    st.sampled_from(list(MINIMAL.values())),
    st.dictionaries(st.sampled_from(LISTENER_KEYS + ("tmeout", "bogus")), values, max_size=4))
documents = st.one_of(
    st.dictionaries(st.text(max_size=10), values, max_size=3),
    st.fixed_dictionaries(
        {"listener": st.one_of(st.lists(listener_tables, max_size=3), values)},
        optional={"global": st.one_of(
            st.dictionaries(st.sampled_from(["workers", "pin", "log_level", "control_socket",
                                             "metrics", "user", "x"]), values, max_size=3),
            values)}),
)


@settings(max_examples=examples(500), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_fuzz_random_dicts(doc):
    check_only_config_error(doc)


@settings(max_examples=examples(200), deadline=None)
@given(st.lists(listener_tables, min_size=1, max_size=3))
def test_fuzz_valid_results_are_well_typed(tables):
    cfg = check_only_config_error({"listener": tables})
    if cfg is None:
        return
    for lst in cfg.listeners:
        assert lst.mode in MODES
        if lst.mode == "tun":
            assert lst.listen is None and isinstance(lst.dev, str)
        else:
            assert isinstance(lst.listen, tuple) and 1 <= lst.listen[1] <= 65535
            ipaddress.ip_address(lst.listen[0])
        assert isinstance(lst.timeout, float) and lst.timeout > 0
        assert type(lst.batch) is int and type(lst.mark) is int
        for key in LISTENER_KEYS:
            if key in FILE_KEYS:        # names a file; the field it fills is checked itself
                continue
            assert key in MODE_KEYS[lst.mode] or \
                getattr(lst, key) == getattr(parse_config(
                    {"listener": [MINIMAL[lst.mode]]}).listeners[0], key) or key == "name"


def test_tun_keys_are_checked_naming_the_key():
    tun = MINIMAL["tun"]
    lst = parse_config(one("tun", address="198.18.0.1/30,fd00::1/126", mtu=9000,
                           offload="off")).listeners[0]
    assert (lst.address, lst.mtu, lst.offload, lst.listen) == \
        ("198.18.0.1/30,fd00::1/126", 9000, "off", None)
    assert err(one("tun", dev="a-name-far-too-long")).startswith(
        "relay.toml: listener[0].dev: \"a-name-far-too-long\": a device name is 1-15")
    assert "listener[0].address: '198.18.0.1' needs a prefix length" in \
        err(one("tun", address="198.18.0.1"))
    assert "listener[0].address: 'nonsense' is not an address" in err(one("tun", address="nonsense"))
    assert err(one("tun", mtu=1000)).startswith("relay.toml: listener[0].mtu:")
    assert err(one("tun", offload="maybe")).startswith("relay.toml: listener[0].offload:")
    assert err(one("tun", listen="127.0.0.1:1")) == \
        'relay.toml: listener[0].listen: not allowed for mode "tun" (only for: forward, ' \
        'redir, tunnel-server, tunnel-client, socks5)'
    two = {"listener": [tun, dict(tun, name="u")]}
    assert err(two) == 'relay.toml: listener[1].dev: device relay0 is already used by ' \
                       'listener[0] "t"'
    assert err(one("tun", secret="x")).startswith(
        "relay.toml: listener[0].secret: only applies with a tunnel:// upstream")
# --- several upstreams (--upstream repeated, --balance) -----------------------------------

TWO = ["tunnel://127.0.0.1:8443", "socks5://u:p@[::1]:1080"]


def test_several_upstreams_list_and_single_string():
    lst = parse_config(one("forward", upstream=TWO, secret="k", balance="HASH")).listeners[0]
    assert lst.upstreams == (Upstream("tunnel", "127.0.0.1", 8443),
                             Upstream("socks5", "::1", 1080, "u", "p"))
    assert lst.upstream == lst.upstreams[0] and lst.all_upstreams() == lst.upstreams
    assert lst.balance == "hash" and lst.secret == "k"
    assert lst.summary()["upstreams"] == ["tunnel://127.0.0.1:8443", "socks5://u:***@[::1]:1080"]
    for value in ("tunnel://127.0.0.1:8443", ["tunnel://127.0.0.1:8443"]):
        lst = parse_config(one("redir", upstream=value)).listeners[0]
        assert lst.upstreams == () and lst.all_upstreams() == (lst.upstream,)
        assert lst.balance == "failover"
    assert parse_config(one("forward")).listeners[0].all_upstreams() == ()
    lst = parse_config(one("forward", upstream=["tunnel://127.0.0.1:8443", "direct"],
                           secret="k")).listeners[0]
    assert [u.kind for u in lst.upstreams] == ["tunnel", "direct"]
    assert lst.summary()["upstreams"] == ["tunnel://127.0.0.1:8443", "direct"]
    # secret and connections go with the tunnel:// one of a mix with gost://
    parse_config(one("forward", upstream=["gost://127.0.0.1:1", "tunnel://127.0.0.1:2"],
                     secret="k", connections=2))


@pytest.mark.parametrize("value,extra,key,reason", [
    (["tunnel://127.0.0.1:1", "tunnel://127.0.0.1"], {}, "upstream[1]", "missing port"),
    (["tunnel://127.0.0.1:1", 5], {}, "upstream[1]", "expected a string"),
    (["direct", "tunnel://127.0.0.1:1", "direct"], {}, "upstream[2]", "direct is given twice"),
    (["socks5://127.0.0.1:1", "socks5://127.0.0.1:1"], {}, "upstream[1]", "is given twice"),
    ([], {}, "upstream", "expected 1-16 values, got 0"),
    ([f"tunnel://127.0.0.1:{p}" for p in range(1, 18)], {}, "upstream", "got 17"),
    ("tunnel://127.0.0.1:1", {"balance": "hash"}, "balance", "only applies with several"),
    (TWO, {"balance": "random"}, "balance", "balance mode"),
    (["gost://127.0.0.1:1", "socks5://127.0.0.1:2"], {"secret": "k"}, "secret",
     "does not apply with a gost:// upstream"),
])
def test_several_upstreams_refused_naming_key(value, extra, key, reason):
    msg = err(one("forward", upstream=value, **extra))
    assert msg.startswith(f"relay.toml: listener[0].{key}: ") and reason in msg, msg


def test_upstream_repeated_on_the_command_line():
    from relay import cli
    args = cli.build_parser().parse_args(
        ["forward", "--listen", "127.0.0.1:7000", "--to", "198.51.100.2:53",
         "--upstream", TWO[0], "--upstream", TWO[1], "--balance", "hash", "--secret", "k"])
    lc = cli._listener_from_args(args, "forward")
    assert lc["upstream"] == TWO and lc["balance"] == "hash"
    lst = parse_config({"listener": [lc]}).listeners[0]
    assert [str(u) for u in lst.upstreams] == ["tunnel://127.0.0.1:8443", "socks5://u:***@[::1]:1080"]
    args = cli.build_parser().parse_args(
        ["forward", "--listen", "127.0.0.1:7000", "--to", "198.51.100.2:53", "--upstream", TWO[0]])
    assert cli._listener_from_args(args, "forward")["upstream"] == TWO[0]


def test_tunnel_client_several_servers():
    lst = parse_config(one("tunnel-client", server=["127.0.0.1:8443", "[::1]:8443"],
                           balance="hash", secret="k")).listeners[0]
    assert lst.server == ("127.0.0.1", 8443) and lst.servers == (("127.0.0.1", 8443), ("::1", 8443))
    assert [str(u) for u in lst.balanced_upstreams()] == ["tunnel://127.0.0.1:8443",
                                                          "tunnel://[::1]:8443"]
    assert lst.summary()["servers"] == ["127.0.0.1:8443", "[::1]:8443"]
    lst = parse_config(one("tunnel-client", server=["127.0.0.1:1", "127.0.0.1:2"], gost=True,
                           user="u", password="p")).listeners[0]
    assert [(u.kind, u.user, u.password) for u in lst.balanced_upstreams()] == [("gost", "u", "p")] * 2
    assert parse_config(one("tunnel-client", server=["127.0.0.1:1"])).listeners[0].servers == ()
    assert err(one("tunnel-client", server=["127.0.0.1:1", "127.0.0.1:1"])).startswith(
        "relay.toml: listener[0].server[1]: 127.0.0.1:1 is given twice")
    assert err(one("tunnel-client", server=["127.0.0.1:1", "127.0.0.1"])).startswith(
        "relay.toml: listener[0].server[1]: missing port")
    assert err(one("tunnel-client", balance="hash")).startswith(
        "relay.toml: listener[0].balance: only applies with several upstreams (server = [")
