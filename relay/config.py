"""``relay run -c relay.toml``: the TOML config, typed and validated.

Layout::

    [global]
    workers = 2
    log_level = "info"

    [[listener]]
    name = "dns"
    mode = "forward"
    listen = "[::]:5353"
    to = "198.51.100.2:53"

``load_config(path)`` / ``parse_config(text_or_dict)`` return a frozen ``Config``. Every
problem raises ``ConfigError`` (a ValueError) whose message reads ``FILE: KEY: REASON``,
e.g. ``relay.toml: listener[1].listen: port out of range 1-65535: 70000``. Addresses are
parsed here: ``listen`` is an IP literal, ``to``/``server``/``upstream`` may be host names,
resolved once at load time. docs/config.md lists every key.
"""
import dataclasses
import difflib
import ipaddress
import math
import os
import re
import stat
from dataclasses import dataclass, field, fields
from typing import Optional

from relay.net import sockopt

try:
    import tomllib
except ImportError:                 # Python < 3.11: the same parser as the tomli package
    import tomli as tomllib

from relay.net.addr import (
    Upstream, format_hostport, parse_cidr, parse_hostport, parse_sources, parse_upstream,
)
from relay.proto.disguise import KINDS as HEADER_KINDS

__all__ = [
    "ConfigError", "Config", "GlobalConfig", "ListenerConfig", "ConfigDiff",
    "load_config", "parse_config", "parse_listener", "listener", "mode_defaults",
    "read_secret_file", "format_ports", "MODES", "LOG_LEVELS", "REPLY_MODES", "MODE_KEYS",
]

MODES = ("forward", "redir", "tunnel-server", "tunnel-client", "socks5", "tun")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
REPLY_MODES = ("raw", "transparent")
BALANCE_MODES = ("failover", "hash")     # several upstreams (relay/datapath/pure/balance.py)
MAX_UPSTREAMS = 16                       # upstreams of one listener (tunnel_balance.pxi)
HEALTH_INTERVAL = 1.0       # seconds between background checks of several upstreams
HEALTH_TIMEOUT = 2.0        # seconds one check may take (relay/services/health.py)

MAX_WORKERS = 1024
MAX_BATCH = 1024            # UIO_MAXIOV: the most messages one recvmmsg/sendmmsg takes
MAX_ASSOCIATIONS = 1 << 24
MAX_TRANSPARENT_CACHE = 1 << 20
MAX_CONNECTIONS = 256
MAX_TIMEOUT = 7 * 24 * 3600.0
MAX_UPSTREAM_FLOWS = 1 << 16    # flows of an upstream core (tunnel://, gost://, socks5://):
                                # a tunnel flow id carries its slot in 16 bits
FD_RESERVE = 32             # descriptors the data path keeps free below the soft limit (the
                            # C side: relay/datapath/limits.pxd); a flow socket there is refused
MAX_KEEPALIVE = 32767       # TCP_KEEPIDLE's limit (seconds)
SUN_PATH_MAX = 107          # sockaddr_un.sun_path is 108 bytes with the final NUL
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ConfigError(ValueError):
    """A config problem: ``FILE: KEY: REASON``. ``source``, ``key``, ``reason`` hold the parts."""

    def __init__(self, source, key, reason):
        self.source = source
        self.key = key
        self.reason = reason
        super().__init__(f"{source}: {key}: {reason}" if key else f"{source}: {reason}")


@dataclass(frozen=True)
class GlobalConfig:
    """The ``[global]`` table."""
    workers: int = field(default_factory=lambda: max(1, min(os.cpu_count() or 1, MAX_WORKERS)))
    pin: bool = False
    log_level: str = "info"
    control_socket: Optional[str] = "/run/relay/relay.sock"   # None: no control socket
    metrics: Optional[tuple] = None          # (host, port) serving Prometheus text
    user: Optional[str] = None               # drop privileges to this user after binding
    # Idle seconds before a silent TCP peer is probed (keepalive, then TCP_USER_TIMEOUT:
    # relay/net/sockopt.py tcp_keepalive); 0: off. Every long-lived TCP connection.
    tcp_keepalive: float = 60.0
    # Per-client counters by CIDR group (relay/flows.py): ((name, (network, ...)), ...),
    # at most relay.flows.MAX_CLIENT_GROUPS; clients outside every group count as "other".
    client_groups: tuple = ()
    # TCP Fast Open on the tunnel and SOCKS5 connections (clients: TCP_FASTOPEN_CONNECT,
    # servers' listen sockets: TCP_FASTOPEN) where net.ipv4.tcp_fastopen allows the side.
    tcp_fastopen: bool = True
    # TCP_CONGESTION on those connections (None: the kernel's default).
    tcp_congestion: Optional[str] = None


@dataclass(frozen=True)
class ListenerConfig:
    """One ``[[listener]]``. Addresses are ``(host, port)`` tuples with IP literal hosts;
    ``upstream`` is None for direct; ``allow``/``deny`` are tuples of ipaddress networks."""
    name: str
    mode: str
    listen: Optional[tuple]                  # None: tun (packets come from a device)
    to: Optional[tuple] = None
    server: Optional[tuple] = None
    upstream: Optional[Upstream] = None
    upstreams: tuple = ()                    # every upstream, in order, when several are given
                                             # (then upstream is the first, direct included)
    servers: tuple = ()                      # tunnel-client: every server, when several
    balance: str = "failover"                # several upstreams: failover or hash
    reply: str = "raw"
    mark: int = 255
    timeout: float = 60.0
    timeout_port: Optional[tuple] = None     # ((first, last, seconds), ...); None: the defaults
    max_associations: int = 65536
    transparent_cache: int = 1024
    transparent_idle: float = 30.0
    batch: int = 64
    reject: tuple = ()                       # redir: ports answered with port unreachable
    header_out: Optional[str] = None         # forward: disguise header towards upstream
    header_in: Optional[str] = None          # forward: disguise header expected from clients
    secret: Optional[str] = field(default=None, repr=False)
    user: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    allow: tuple = ()
    deny: tuple = ()
    allow_host: bool = False                 # tunnel-server, socks5: let clients reach this host
    connections: int = 1
    gost: bool = False                       # tunnel-client: speak to a gost server
    insecure: bool = False
    strict_udp: bool = False                 # socks5: refuse UDP ASSOCIATE with port 0
    workers: Optional[int] = None            # None: the global number
    bind_interface: Optional[str] = None     # the upstream side leaves through this interface
    source: tuple = ()                       # ... from these addresses (one per family)

    def outbound(self, upstream=None):
        """The outbound binding of the upstream side (relay.net.sockopt.Outbound): an
        upstream URL's bind= and source= (``upstream``'s, by default the listener's
        upstream) over the listener's own keys."""
        Outbound = sockopt.Outbound
        mine = Outbound.of(self.bind_interface, self.source)
        up = self.upstream if upstream is None else upstream
        if up is None or not (up.bind_interface or up.source):
            return mine
        return Outbound.of(up.bind_interface, up.source).under(mine)
    dev: Optional[str] = None                # tun: the TUN device (created if missing)
    address: Optional[str] = None            # tun: its addresses, "198.18.0.1/30,fd00::1/126"
    mtu: Optional[int] = None                # tun: its MTU (None: the device's, 1500 when new)
    offload: str = "auto"                    # UDP segmentation offload (relay.net.sockopt
                                             # udp_offload; tun: the virtio-net header)

    def port_timeouts(self):
        """The per-destination-port idle timeouts, ((first, last, seconds), ...): the given
        ones, or DEFAULT_PORT_TIMEOUTS, never longer than ``timeout`` then."""
        if self.timeout_port is not None:
            return self.timeout_port
        return tuple((lo, hi, min(sec, self.timeout)) for lo, hi, sec in DEFAULT_PORT_TIMEOUTS)

    def all_upstreams(self):
        """The upstreams in order: () for direct, one, or several (--upstream repeated)."""
        return self.upstreams or ((self.upstream,) if self.upstream is not None else ())

    def balanced_upstreams(self):
        """The upstreams a balancing core spreads flows over (relay.net.addr.Upstream, in
        order): forward/redir's several ``upstream``, tunnel-client's several ``server``
        (tunnel://, or gost:// with its user and password); () with one or none."""
        if self.servers:
            kind = "gost" if self.gost else "tunnel"
            return tuple(Upstream(kind, h, p, self.user if self.gost else None,
                                  self.password if self.gost else None) for h, p in self.servers)
        return self.upstreams

    def effective_workers(self, global_):
        return self.workers if self.workers is not None else global_.workers

    def runs_on(self, index):
        """Does worker ``index`` run this listener (a listener may ask for fewer workers)?"""
        return self.workers is None or index < self.workers

    def summary(self):
        """The settings as JSON-ready values (addresses as HOST:PORT text, the upstream as
        its URL with the password masked), without the secret and the password."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("secret", "password"):
                continue
            if f.name in ("listen", "to", "server") and value is not None:
                value = format_hostport(value)
            elif f.name == "servers":
                value = [format_hostport(a) for a in value]
            elif f.name == "upstream":
                value = "direct" if value is None else str(value)
            elif f.name == "upstreams":
                value = [str(up) for up in value]
            elif f.name == "timeout_port":
                value = format_port_timeouts(self.port_timeouts())
            elif f.name in ("allow", "deny"):
                value = [str(net) for net in value]
            elif f.name == "reject":
                value = format_ports(value)
            elif f.name == "source":
                value = list(value)
            out[f.name] = value
        return out


@dataclass(frozen=True)
class ConfigDiff:
    """What a reload changes, by listener name."""
    added: tuple
    removed: tuple
    changed: tuple
    unchanged: tuple


@dataclass(frozen=True)
class Config:
    global_: GlobalConfig
    listeners: tuple

    def listeners_by_name(self):
        return {lst.name: lst for lst in self.listeners}

    def diff(self, new):
        """Compare with the config ``new`` (a reload): names of added, removed, changed and
        unchanged listeners. A listener whose fields are equal but whose effective worker
        count changed (it inherits ``global.workers``) counts as changed."""
        old_by, new_by = self.listeners_by_name(), new.listeners_by_name()
        added = tuple(n for n in new_by if n not in old_by)
        removed = tuple(n for n in old_by if n not in new_by)
        changed, unchanged = [], []
        for n in new_by:
            if n not in old_by:
                continue
            a, b = old_by[n], new_by[n]
            same = a == b and a.effective_workers(self.global_) == b.effective_workers(new.global_)
            (unchanged if same else changed).append(n)
        return ConfigDiff(added, removed, tuple(changed), tuple(unchanged))


# Defaults that differ by mode (every other default is the ListenerConfig field's). The
# servers that face the internet mark nothing by default: a mark needs CAP_NET_ADMIN, and
# only a router running `relay rules` needs its own traffic marked.
MODE_DEFAULTS = {
    "tunnel-server": {"mark": 0},
    "socks5": {"mark": 0},
    "tun": {"dev": "relay0"},
}
TUN_MTU = (1280, 65535)


# Idle timeouts by destination port unless `timeout_port` says otherwise: DNS and NTP are
# one question and one answer, so their mappings go after 10 s (or `timeout`, if shorter)
# while games and calls keep theirs for `timeout`.
DEFAULT_PORT_TIMEOUTS = ((53, 53, 10.0), (123, 123, 10.0))
MAX_PORT_TIMEOUTS = 7        # distinct per-port values (relay/datapath/timeouts.py MAX_CLASSES - 1)


def format_port_timeouts(spec):
    """((first, last, seconds), ...) as the option's text: 53=10,5000-5010=300."""
    return ",".join(f"{lo}={sec:g}" if lo == hi else f"{lo}-{hi}={sec:g}" for lo, hi, sec in spec)


def mode_defaults(mode):
    """{field: default} of a listener of this mode: the one table of defaults that the
    command line's --help, the TOML parser and listener() all read."""
    out = {f.name: f.default for f in fields(ListenerConfig)
           if f.default is not dataclasses.MISSING}
    out.update(MODE_DEFAULTS.get(mode, {}))
    return out


def listener(mode, **kw):
    """A ListenerConfig of ``mode`` with that mode's defaults for what ``kw`` leaves out
    (not validated: for code and tests that build listeners directly)."""
    values = {**MODE_DEFAULTS.get(mode, {}), "name": mode, **kw}
    return ListenerConfig(mode=mode, **values)


# --- which keys each mode takes -------------------------------------------------------

_COMMON = {"name", "mode", "listen", "mark", "timeout", "timeout_port", "max_associations",
           "batch", "workers", "bind_interface", "source"}
_SECRET = {"secret", "secret_file"}
_LOGIN = {"user", "password", "password_file"}
_TUNNEL_UP = _SECRET | {"connections"}       # with a tunnel:// upstream
MODE_KEYS = {
    "forward": _COMMON | {"to", "upstream", "balance", "offload", "header_out", "header_in"}
    | _TUNNEL_UP,
    "redir": _COMMON | {"upstream", "balance", "reply", "transparent_cache", "transparent_idle",
                        "offload", "reject"} | _TUNNEL_UP,
    "tunnel-server": _COMMON | _SECRET | _LOGIN | {"allow", "deny", "allow_host", "insecure"},
    "tunnel-client": _COMMON | _SECRET | _LOGIN | {"to", "server", "balance", "connections",
                                                   "gost", "offload"},
    "socks5": _COMMON | _LOGIN | {"allow", "deny", "allow_host", "insecure", "strict_udp"},
    "tun": (_COMMON - {"listen"}) | {"upstream", "dev", "address", "mtu", "offload"} | _TUNNEL_UP,
}
# Keys that name a file holding a field's value (kept out of `ps` and of the TOML file).
FILE_KEYS = {"secret_file": "secret", "password_file": "password"}
MODE_REQUIRED = {
    "forward": ("to",),
    "redir": (),
    "tunnel-server": (),
    "tunnel-client": ("server", "to"),
    "socks5": (),
    "tun": (),
}
LISTENER_KEYS = tuple(f.name for f in fields(ListenerConfig)) + tuple(FILE_KEYS)
GLOBAL_KEYS = tuple(f.name for f in fields(GlobalConfig))
TOP_KEYS = ("global", "listener")
# Which sockets a listen address binds: two listeners may not share one, nor two relays.
LISTEN_PROTO = {"forward": "udp", "redir": "udp", "tunnel-client": "udp",
                 "tunnel-server": "tcp", "socks5": "tcp", "tun": None}


# Why a gost server takes neither a secret nor a connection pool (both ends of a gost
# tunnel: tunnel-client with gost = true, forward/redir with a gost:// upstream).
_GOST_REFUSES = {
    "secret": "does not apply with {what}: a gost server does not know relay's secret "
              "proof (method 0xC5); authenticate with {cred} (RFC 1929)",
    "connections": "does not apply with {what}: gost carries one flow per TCP connection, "
                   "opened when the flow starts",
}


# --- value checking -------------------------------------------------------------------

def _describe(value):
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"float {value!r}"
    if isinstance(value, str):
        shown = value if len(value) <= 60 else value[:57] + "..."
        return 'string "' + shown.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, dict):
        return "table"
    if isinstance(value, (list, tuple)):
        return "array"
    if value is None:
        return "nothing"
    name = type(value).__name__
    return {"datetime": "datetime", "date": "date", "time": "time"}.get(name, name)


class _Ctx:
    """Where we are (file and key path) while checking values."""

    def __init__(self, source, resolve):
        self.source = source
        self.resolve = resolve

    def error(self, key, reason):
        return ConfigError(self.source, key, reason)


def _get_int(ctx, key, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ctx.error(key, f"expected an integer, got {_describe(value)}")
    if not low <= value <= high:
        raise ctx.error(key, f"out of range {low}-{high}: {value}")
    return value


def _get_float(ctx, key, value, low, high):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ctx.error(key, f"expected a number, got {_describe(value)}")
    value = float(value)
    if not math.isfinite(value):
        raise ctx.error(key, f"must be a finite number, got {value}")
    if not low < value <= high:
        raise ctx.error(key, f"out of range (must be > {low:g} and <= {high:g}): {value:g}")
    return value


def _get_port_timeouts(ctx, key, value):
    """"53=10,123=10,5000-5010=300" or a table {"53" = 10, "5000-5010" = 300}; "" or
    "none": no per-port timeouts (every flow has `timeout`)."""
    if isinstance(value, str):
        text = value.replace(" ", "")
        if text.lower() in ("", "none"):
            return ()
        items = []
        for part in text.split(","):
            ports, eq, seconds = part.partition("=")
            if not eq or not ports or not seconds:
                raise ctx.error(key, f"expected PORT=SECONDS or FIRST-LAST=SECONDS, got {part!r}")
            try:
                items.append((ports, float(seconds)))
            except ValueError:
                raise ctx.error(key, f"{part!r}: seconds must be a number") from None
    elif isinstance(value, dict):
        items = list(value.items())
    else:
        raise ctx.error(key, f"expected a string like \"53=10,443=30\" or a table, "
                             f"got {_describe(value)}")
    out = []
    for ports, seconds in items:
        lo, dash, hi = str(ports).partition("-")
        try:
            lo, hi = int(lo), int(hi) if dash else int(lo)
        except ValueError:
            raise ctx.error(key, f"{ports!r}: expected a port or FIRST-LAST") from None
        if not 1 <= lo <= hi <= 65535:
            raise ctx.error(key, f"{ports!r}: ports must be 1-65535, first <= last")
        sec = _get_float(ctx, f"{key}.{ports}", seconds, 0, MAX_TIMEOUT)
        out.append((lo, hi, sec))
    out.sort()
    for (a_lo, a_hi, _), (b_lo, b_hi, _) in zip(out, out[1:]):
        if b_lo <= a_hi:
            raise ctx.error(key, f"port ranges overlap: {a_lo}-{a_hi} and {b_lo}-{b_hi}")
    if len({sec for _, _, sec in out}) > MAX_PORT_TIMEOUTS:
        raise ctx.error(key, f"at most {MAX_PORT_TIMEOUTS} different timeouts, got "
                             f"{len({sec for _, _, sec in out})}")
    return tuple(out)


def _get_bool(ctx, key, value):
    if not isinstance(value, bool):
        raise ctx.error(key, f"expected true or false, got {_describe(value)}")
    return value


def _get_str(ctx, key, value, *, nonempty=True):
    if not isinstance(value, str):
        raise ctx.error(key, f"expected a string, got {_describe(value)}")
    if nonempty and not value:
        raise ctx.error(key, "must not be empty")
    if "\x00" in value:
        raise ctx.error(key, "must not contain NUL characters")
    return value


def _get_several(ctx, key, value, parse_one, show=str):
    """One value, or an array of 1 to MAX_UPSTREAMS distinct ones (``upstream``, tunnel-client's
    ``server``): the values parse_one(key of the element, element) made, in order; each is
    refused naming its index (``upstream[1]``)."""
    several = isinstance(value, list)
    if several and not 1 <= len(value) <= MAX_UPSTREAMS:
        raise ctx.error(key, f"expected 1-{MAX_UPSTREAMS} values, got {len(value)}")
    out = []
    for n, item in enumerate(value if several else [value]):
        where = f"{key}[{n}]" if several else key
        got = parse_one(where, item, several and len(value) > 1)
        if any(show(o) == show(got) for o in out):
            raise ctx.error(where, f"{show(got)} is given twice")
        out.append(got)
    return out


def _get_upstreams(ctx, key, value):
    """``upstream``: one URL or several (``direct`` may be one of them): {"upstream": the
    first (None for direct alone), "upstreams": all when several, else ()}."""
    def one(where, text, _several):
        text = _get_str(ctx, where, text)
        try:
            up = parse_upstream(text, resolve=ctx.resolve)
        except ValueError as exc:
            raise ctx.error(where, str(exc)) from None
        if up.bind_interface:
            _get_interface(ctx, where + " (bind=)", up.bind_interface)
        if up.source:
            _get_sources(ctx, where + " (source=)", list(up.source))
        return up
    ups = _get_several(ctx, key, value, one)
    if len(ups) == 1:
        return {"upstream": None if ups[0].kind == "direct" else ups[0]}
    return {"upstream": ups[0], "upstreams": tuple(ups)}


def _get_choice(ctx, key, value, choices, what):
    value = _get_str(ctx, key, value)
    low = value.lower()
    if low in choices:
        return low
    hint = _did_you_mean(low, choices)
    raise ctx.error(key, f"unknown {what} \"{value}\"{hint} (known: {', '.join(choices)})")


def _get_addr(ctx, key, value, *, listen):
    value = _get_str(ctx, key, value)
    try:
        return parse_hostport(value, what="address", resolve=(ctx.resolve and not listen))
    except ValueError as exc:
        raise ctx.error(key, _strip_what(str(exc), value)) from None


def _strip_what(message, value):
    """Drop the "address '...': " prefix of relay.net.addr messages (the key already says which
    address); keep the value at the end when the reason does not quote it already."""
    prefix = f"address {value!r}: "
    if message.startswith(prefix):
        message = message[len(prefix):]
        if "'" not in message and not message.startswith("port out of range"):
            message = f"{message}: \"{value}\""
    return message


def _get_cidrs(ctx, key, value):
    if not isinstance(value, (list, tuple)):
        raise ctx.error(key, f"expected an array of CIDR strings, got {_describe(value)}")
    nets = []
    for i, item in enumerate(value):
        k = f"{key}[{i}]"
        item = _get_str(ctx, k, item)
        try:
            net = parse_cidr(item)
        except ValueError as exc:
            raise ctx.error(k, str(exc)) from None
        if net not in nets:
            nets.append(net)
    return tuple(nets)


def _get_ports(ctx, key, value):
    """A port set: an array of ports (integers) and "LOW-HIGH" ranges (strings), or one
    string of them separated by commas ("443,8443,5000-5010"); a sorted tuple of ints."""
    if isinstance(value, str):
        value = [x for x in value.replace(" ", ",").split(",") if x]
    if not isinstance(value, (list, tuple)):
        raise ctx.error(key, f"expected an array of ports and port ranges, got {_describe(value)}")
    ports = set()
    for i, item in enumerate(value):
        k = f"{key}[{i}]"
        if isinstance(item, str) and "-" in item.strip("-"):
            low, _, high = item.partition("-")
            lo, hi = _port_text(ctx, k, low, item), _port_text(ctx, k, high, item)
            if lo > hi:
                raise ctx.error(k, f"range \"{item}\" runs backwards")
            ports.update(range(lo, hi + 1))
        elif isinstance(item, str):
            ports.add(_port_text(ctx, k, item, item))
        else:
            if isinstance(item, bool) or not isinstance(item, int):
                raise ctx.error(k, f"expected a port or a \"LOW-HIGH\" range, got "
                                   f"{_describe(item)}")
            if not 1 <= item <= 65535:
                raise ctx.error(k, f"port out of range 1-65535: {item}")
            ports.add(item)
    return tuple(sorted(ports))


def _port_text(ctx, key, text, item):
    text = text.strip()
    if not text.isdigit() or not text.isascii():
        raise ctx.error(key, f"not a port or a \"LOW-HIGH\" range: \"{item}\"")
    if not 1 <= int(text) <= 65535:
        raise ctx.error(key, f"port out of range 1-65535: {int(text)}")
    return int(text)


def format_ports(ports):
    """A sorted port tuple as text, runs as ranges: (443, 5000, 5001, 5002) -> "443,5000-5002"."""
    out, i = [], 0
    while i < len(ports):
        j = i
        while j + 1 < len(ports) and ports[j + 1] == ports[j] + 1:
            j += 1
        out.append(str(ports[i]) if i == j else f"{ports[i]}-{ports[j]}")
        i = j + 1
    return ",".join(out)


def _get_credential(ctx, key, value):
    value = _get_str(ctx, key, value)
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > 255:
        raise ctx.error(key, f"at most 255 bytes (RFC 1929), got {size}")
    return value


# Keys of earlier versions, and what replaced them.
RENAMED_KEYS = {"gro": 'now offload = "auto" (the default: on where the kernel has UDP GRO '
                       'and GSO), "on" (gro = true) or "off" (one datagram per message)'}


def _did_you_mean(key, known):
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f", did you mean \"{close[0]}\"?" if close else ""


def _check_keys(ctx, prefix, table, known):
    for key in table:
        if not isinstance(key, str):
            raise ctx.error(prefix or "(top level)", f"keys must be strings, got {_describe(key)}")
        if key not in known:
            path = f"{prefix}.{key}" if prefix else key
            if key in RENAMED_KEYS:
                raise ctx.error(path, f"unknown key: {RENAMED_KEYS[key]}")
            raise ctx.error(path, f"unknown key{_did_you_mean(key, known)} "
                                  f"(known: {', '.join(known)})")


def _is_loopback(host):
    return ipaddress.ip_address(host).is_loopback


# --- sections -------------------------------------------------------------------------

def _parse_global(ctx, table):
    if not isinstance(table, dict):
        raise ctx.error("global", f"expected a table ([global]), got {_describe(table)}")
    _check_keys(ctx, "global", table, GLOBAL_KEYS)
    kw = {}
    g = "global."
    if "workers" in table:
        kw["workers"] = _get_int(ctx, g + "workers", table["workers"], 1, MAX_WORKERS)
    if "pin" in table:
        kw["pin"] = _get_bool(ctx, g + "pin", table["pin"])
    if "log_level" in table:
        kw["log_level"] = _get_choice(ctx, g + "log_level", table["log_level"], LOG_LEVELS,
                                      "log level")
    if "control_socket" in table:
        path = _get_str(ctx, g + "control_socket", table["control_socket"], nonempty=False)
        size = len(path.encode("utf-8", "surrogatepass"))
        if size > SUN_PATH_MAX:
            raise ctx.error(g + "control_socket", f"path too long for a unix socket "
                                                  f"({size} bytes, at most {SUN_PATH_MAX})")
        kw["control_socket"] = path or None     # "": no control socket
    if "metrics" in table:
        kw["metrics"] = _get_addr(ctx, g + "metrics", table["metrics"], listen=True)
    if "user" in table:
        kw["user"] = _get_str(ctx, g + "user", table["user"])
    if "tcp_keepalive" in table:
        value = table["tcp_keepalive"]
        kw["tcp_keepalive"] = 0.0 if value == 0 and not isinstance(value, bool) else \
            _get_float(ctx, g + "tcp_keepalive", value, 0, MAX_KEEPALIVE)
    if "client_groups" in table:
        kw["client_groups"] = _get_client_groups(ctx, g + "client_groups", table["client_groups"])
    if "tcp_fastopen" in table:
        kw["tcp_fastopen"] = _get_bool(ctx, g + "tcp_fastopen", table["tcp_fastopen"])
    if "tcp_congestion" in table:
        key = g + "tcp_congestion"
        kw["tcp_congestion"] = _on_host(ctx, key, sockopt.check_congestion,
                                        _get_str(ctx, key, table["tcp_congestion"]))
    return GlobalConfig(**kw)


def _get_client_groups(ctx, key, value):
    """{name: [CIDR, ...] or "CIDR,CIDR"} -> ((name, (network, ...)), ...)."""
    from relay.flows import MAX_CLIENT_GROUPS, OTHER
    if not isinstance(value, dict):
        raise ctx.error(key, f"expected a table of group name = [CIDR, ...], got {_describe(value)}")
    if len(value) > MAX_CLIENT_GROUPS:
        raise ctx.error(key, f"{len(value)} groups, at most {MAX_CLIENT_GROUPS}")
    groups = []
    for name, nets in value.items():
        k = f"{key}.{name}"
        if not _NAME.match(name) or name == OTHER:
            raise ctx.error(k, f"group names are letters, digits, '_', '.', '-' (and not {OTHER!r})")
        if isinstance(nets, str):
            nets = [n.strip() for n in nets.split(",") if n.strip()]
        nets = _get_cidrs(ctx, k, nets)
        if not nets:
            raise ctx.error(k, "a group needs at least one CIDR")
        groups.append((name, nets))
    return tuple(groups)


def _on_host(ctx, key, check, value):
    """value, once check(value) found this host able to use it (ValueError: refused)."""
    try:
        check(value)
    except ValueError as exc:
        raise ctx.error(key, str(exc)) from None
    return value


def _get_offload(ctx, key, value, mode):
    """auto, on or off; "on" for a UDP listener only where this kernel has UDP GSO and GRO
    (tun's "on" is checked when the device is opened: it needs the TUN driver's offload)."""
    value = _get_choice(ctx, key, value, sockopt.OFFLOAD_MODES, "offload mode")
    if value == "on" and mode != "tun":
        try:
            sockopt.udp_offload("on")
        except OSError as exc:
            raise ctx.error(key, f"\"on\": {exc.strerror}") from None
    return value


def _get_interface(ctx, key, value):
    return _on_host(ctx, key, sockopt.check_interface, _get_str(ctx, key, value))


def _get_sources(ctx, key, value):
    """One source address or two (one per family), each an address of this host."""
    if not isinstance(value, (str, list, tuple)):
        raise ctx.error(key, f"expected an address or an array of two, got {_describe(value)}")
    try:
        sources = parse_sources(value, what="source")
    except (TypeError, ValueError) as exc:
        raise ctx.error(key, str(exc)) from None
    for host in sources:
        _on_host(ctx, key, sockopt.check_source, host)
    return sources


def _parse_listener(ctx, index, table):
    p = f"listener[{index}]"
    if not isinstance(table, dict):
        raise ctx.error(p, f"expected a table ([[listener]]), got {_describe(table)}")
    _check_keys(ctx, p, table, LISTENER_KEYS)
    for key in ("name", "mode", "listen"):
        if key not in table and not (key == "listen" and table.get("mode") == "tun"):
            raise ctx.error(f"{p}.{key}", "missing required key")
    name = _get_str(ctx, f"{p}.name", table["name"])
    if not _NAME.match(name):
        raise ctx.error(f"{p}.name", f"\"{name}\": use 1-64 letters, digits, '_', '.' or '-', "
                                     f"starting with a letter or digit")
    mode = _get_choice(ctx, f"{p}.mode", table["mode"], MODES, "mode")
    allowed = MODE_KEYS[mode]
    for key in ("header_out", "header_in"):
        if mode != "forward" and key in table:
            raise ctx.error(f"{p}.{key}", f"not allowed for mode \"{mode}\": the disguise "
                                          f"header is for a forward listener (only for: "
                                          f"forward)")
    if mode == "forward" and "reject" in table:
        raise ctx.error(f"{p}.reject", "not allowed for mode \"forward\": every datagram of a "
                                       "forward listener is addressed to its own port; reject "
                                       "destination ports in redir (only for: redir)")
    for key in table:
        if key not in allowed:
            where = [m for m in MODES if key in MODE_KEYS[m]]
            raise ctx.error(f"{p}.{key}", f"not allowed for mode \"{mode}\" "
                                          f"(only for: {', '.join(where)})")
    for key in MODE_REQUIRED[mode]:
        if key not in table:
            raise ctx.error(f"{p}.{key}", f"missing required key for mode \"{mode}\"")

    kw = {**MODE_DEFAULTS.get(mode, {}), "name": name, "mode": mode}
    k = lambda key: f"{p}.{key}"  # noqa: E731
    given = {}                  # field -> the key that set it (secret_file sets secret, ...)
    kw["listen"] = (None if mode == "tun" else
                    _get_addr(ctx, k("listen"), table["listen"], listen=True))
    _parse_tun_keys(ctx, k, table, kw)
    if "to" in table:
        kw["to"] = _get_addr(ctx, k("to"), table["to"], listen=False)
    if "server" in table:               # tunnel-client: one, or several (like upstream)
        servers = _get_several(ctx, k("server"), table["server"],
                               lambda where, v, _: _get_addr(ctx, where, v, listen=False),
                               show=format_hostport)
        kw["server"] = servers[0]
        if len(servers) > 1:
            kw["servers"] = tuple(servers)
    if "upstream" in table:
        kw.update(_get_upstreams(ctx, k("upstream"), table["upstream"]))
    if "balance" in table:
        if not kw.get("upstreams") and not kw.get("servers"):
            several = "server" if mode == "tunnel-client" else "upstream"
            raise ctx.error(k("balance"), f"only applies with several upstreams "
                                          f"({several} = [\"...\", \"...\"])")
        kw["balance"] = _get_choice(ctx, k("balance"), table["balance"], BALANCE_MODES,
                                    "balance mode")
    if "bind_interface" in table:
        kw["bind_interface"] = _get_interface(ctx, k("bind_interface"), table["bind_interface"])
    if "source" in table:
        kw["source"] = _get_sources(ctx, k("source"), table["source"])
    if "reply" in table:
        kw["reply"] = _get_choice(ctx, k("reply"), table["reply"], REPLY_MODES, "reply mode")
    if "mark" in table:
        kw["mark"] = _get_int(ctx, k("mark"), table["mark"], 0, 0xFFFFFFFF)
    if "timeout" in table:
        kw["timeout"] = _get_float(ctx, k("timeout"), table["timeout"], 0, MAX_TIMEOUT)
    if "timeout_port" in table:
        kw["timeout_port"] = _get_port_timeouts(ctx, k("timeout_port"), table["timeout_port"])
    if "max_associations" in table:
        kw["max_associations"] = _get_int(ctx, k("max_associations"), table["max_associations"],
                                          1, MAX_ASSOCIATIONS)
    if "transparent_cache" in table:
        kw["transparent_cache"] = _get_int(ctx, k("transparent_cache"),
                                           table["transparent_cache"], 1, MAX_TRANSPARENT_CACHE)
    if "transparent_idle" in table:
        kw["transparent_idle"] = _get_float(ctx, k("transparent_idle"), table["transparent_idle"],
                                            0, MAX_TIMEOUT)
    if "batch" in table:
        kw["batch"] = _get_int(ctx, k("batch"), table["batch"], 1, MAX_BATCH)
    if "offload" in table:
        kw["offload"] = _get_offload(ctx, k("offload"), table["offload"], mode)
    if "reject" in table:
        kw["reject"] = _get_ports(ctx, k("reject"), table["reject"])
    for key in ("header_out", "header_in"):
        if key in table:
            kw[key] = _get_choice(ctx, k(key), table[key], HEADER_KINDS, "header kind")
    if "secret" in table:
        kw["secret"] = _get_str(ctx, k("secret"), table["secret"])
    for key in ("user", "password"):
        if key in table:
            kw[key] = _get_credential(ctx, k(key), table[key])
    for key, target in FILE_KEYS.items():
        if key not in table:
            continue
        if target in table:
            raise ctx.error(k(key), f"give {target} or {key}, not both")
        path = _get_str(ctx, k(key), table[key])
        try:
            value = read_secret_file(path)
        except ValueError as exc:
            raise ctx.error(k(key), str(exc)) from None
        kw[target] = (_get_credential(ctx, k(key), value) if target == "password"
                      else _get_str(ctx, k(key), value))
        given[target] = key
    for key in ("allow", "deny"):
        if key in table:
            kw[key] = _get_cidrs(ctx, k(key), table[key])
    if "connections" in table:
        kw["connections"] = _get_int(ctx, k("connections"), table["connections"],
                                     1, MAX_CONNECTIONS)
    if "gost" in table:
        kw["gost"] = _get_bool(ctx, k("gost"), table["gost"])
    for key in ("insecure", "allow_host"):
        if key in table:
            kw[key] = _get_bool(ctx, k(key), table[key])
    if "strict_udp" in table:
        kw["strict_udp"] = _get_bool(ctx, k("strict_udp"), table["strict_udp"])
    if "workers" in table:
        kw["workers"] = _get_int(ctx, k("workers"), table["workers"], 1, MAX_WORKERS)

    # Rules across keys.
    if ("user" in kw) != ("password" in kw):
        missing = "password" if "user" in kw else "user"
        raise ctx.error(k(missing), "user and password go together: both or neither")
    k_given = lambda key: k(given.get(key, key))  # noqa: E731
    if mode in ("forward", "redir", "tun"):
        up = kw.get("upstream")
        kinds = {u.kind for u in kw.get("upstreams") or (up,) if u is not None}
        for key in ("secret", "connections"):
            if key in kw and "tunnel" not in kinds and "gost" in kinds:
                raise ctx.error(k_given(key), _GOST_REFUSES[key].format(what="a gost:// upstream",
                                                                  cred="USER:PASS@ in the URL"))
            if key in kw and "tunnel" not in kinds:
                raise ctx.error(k_given(key), f"only applies with a tunnel:// upstream "
                                        f"(upstream is {str(up) if up else 'direct'})")
    if mode == "forward" and kw.get("upstream") is not None:
        for key in ("header_out", "header_in"):
            if key in kw:
                raise ctx.error(k(key), f"needs a direct upstream (upstream is "
                                        f"{kw['upstream']}: its datagrams travel inside "
                                        f"frames, with nothing to disguise)")
    if mode == "tunnel-client":
        for key in ("secret", "connections"):
            if kw.get("gost") and key in kw:
                raise ctx.error(k_given(key), _GOST_REFUSES[key].format(what="gost = true",
                                                                  cred="user and password"))
        if "user" in kw and not kw.get("gost"):
            raise ctx.error(k("user"), "only applies with gost = true (a relay tunnel-server "
                                       "proves clients with its secret)")
    if mode in ("tunnel-server", "socks5") and not kw.get("insecure", False):
        host = kw["listen"][0]
        if not _is_loopback(host):
            if mode == "tunnel-server" and "secret" not in kw and "user" not in kw:
                raise ctx.error(k("secret"), f"required (or user and password) when listening "
                                             f"on a non-loopback address "
                                             f"({format_hostport(kw['listen'])}); "
                                             f"set insecure = true to run an open relay")
            if mode == "socks5" and "user" not in kw:
                raise ctx.error(k("user"), f"user and password required when listening on a "
                                           f"non-loopback address "
                                           f"({format_hostport(kw['listen'])}); set insecure = "
                                           f"true to run an open relay")
    return ListenerConfig(**kw)


def _parse_tun_keys(ctx, k, table, kw):
    """dev, address, mtu, offload (mode tun)."""
    if "dev" in table:
        dev = _get_str(ctx, k("dev"), table["dev"])
        if len(dev.encode()) > 15 or not re.match(r"^[A-Za-z0-9_.-]+$", dev):
            raise ctx.error(k("dev"), f"\"{dev}\": a device name is 1-15 letters, digits, "
                                      f"'_', '.' or '-'")
        kw["dev"] = dev
    if "address" in table:
        from relay.net.tundev import parse_addresses
        text = _get_str(ctx, k("address"), table["address"])
        try:
            parse_addresses(text)
        except ValueError as exc:
            raise ctx.error(k("address"), str(exc)) from None
        kw["address"] = text
    if "mtu" in table:
        kw["mtu"] = _get_int(ctx, k("mtu"), table["mtu"], *TUN_MTU)


MAX_SECRET_FILE = 4096


def read_secret_file(path):
    """The secret (or password) kept in the file at ``path``: its text without the final
    line break. Refused (ValueError) unless it is a regular file that only its owner may
    read or write: a secret other local users can read is no secret."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"cannot read {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path} is not a regular file")
        if st.st_mode & 0o077:
            raise ValueError(f"{path} can be read or written by other users (mode "
                             f"{stat.S_IMODE(st.st_mode):04o}): chmod 600 {path}")
        data = os.read(fd, MAX_SECRET_FILE + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SECRET_FILE:
        raise ValueError(f"{path} is larger than {MAX_SECRET_FILE} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text") from None
    if text.endswith("\n"):
        text = text[:-1]
        if text.endswith("\r"):
            text = text[:-1]
    if not text:
        raise ValueError(f"{path} is empty")
    return text


def _overlaps(a, b):
    """Do two listen addresses collide? Equal, or a wildcard [::] beside 0.0.0.0 on one port
    ([::] also takes IPv4 on a dual-stack socket)."""
    if a[1] != b[1]:
        return False
    if a[0] == b[0]:
        return True
    return {a[0], b[0]} == {"::", "0.0.0.0"}


def _build(ctx, doc):
    if not isinstance(doc, dict):
        raise ctx.error("", f"expected a TOML document (a table), got {_describe(doc)}")
    _check_keys(ctx, "", doc, TOP_KEYS)
    global_ = _parse_global(ctx, doc.get("global", {}))
    if "listener" not in doc:
        raise ctx.error("listener", "at least one [[listener]] is required")
    raw = doc["listener"]
    if isinstance(raw, dict):
        raise ctx.error("listener", "expected an array of tables: write [[listener]], "
                                    "not [listener]")
    if not isinstance(raw, (list, tuple)):
        raise ctx.error("listener", f"expected an array of tables ([[listener]]), "
                                    f"got {_describe(raw)}")
    if not raw:
        raise ctx.error("listener", "at least one [[listener]] is required")
    listeners = []
    names = {}
    for i, table in enumerate(raw):
        lst = _parse_listener(ctx, i, table)
        if lst.name in names:
            raise ctx.error(f"listener[{i}].name", f"duplicate name \"{lst.name}\" "
                                                    f"(also listener[{names[lst.name]}])")
        for j, other in enumerate(listeners):
            if lst.mode == other.mode == "tun" and lst.dev == other.dev:
                raise ctx.error(f"listener[{i}].dev", f"device {lst.dev} is already used by "
                                                      f"listener[{j}] \"{other.name}\"")
            if lst.listen is None or other.listen is None:
                continue
            if LISTEN_PROTO[other.mode] == LISTEN_PROTO[lst.mode] and \
                    _overlaps(other.listen, lst.listen):
                raise ctx.error(f"listener[{i}].listen",
                                f"{format_hostport(lst.listen)} is already used by "
                                f"listener[{j}] \"{other.name}\" ({other.mode}, "
                                f"{format_hostport(other.listen)})")
        names[lst.name] = i
        listeners.append(lst)
    return Config(global_, tuple(listeners))


_TOML_POS = re.compile(r"\(at line (\d+), column (\d+)\)|\(at end of document\)")


def parse_config(text_or_dict, source="<string>", *, resolve=True):
    """Parse TOML text (str or bytes) or an already-parsed dict into a Config.

    ``source`` names the file in messages. With ``resolve=False`` host names in ``to``,
    ``server`` and ``upstream`` are refused instead of resolved (no DNS lookups at all).
    """
    ctx = _Ctx(source, resolve)
    doc = text_or_dict
    if isinstance(doc, (bytes, bytearray)):
        try:
            doc = bytes(doc).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ctx.error("", f"not valid UTF-8 (byte {exc.start})") from None
    if isinstance(doc, str):
        try:
            doc = tomllib.loads(doc)
        except RecursionError:
            raise ctx.error("syntax", "TOML syntax error: nesting too deep") from None
        except ValueError as exc:      # TOMLDecodeError, or an integer too long to convert
            msg = str(exc)
            m = _TOML_POS.search(msg)
            reason = _TOML_POS.sub("", msg).strip()
            if m and m.group(1):
                where = f"line {m.group(1)}, column {m.group(2)}"
            elif m:
                where = "end of file"
            else:
                where = "syntax"
            raise ctx.error(where, f"TOML syntax error: {reason}") from None
    return _build(ctx, doc)


def parse_listener(table, source="<command line>", *, resolve=True):
    """Validate one listener given as a dict (what a subcommand's options amount to) the
    same way as a [[listener]] of a file; messages read ``SOURCE: listener[0].KEY: REASON``."""
    return parse_config({"listener": [table]}, source, resolve=resolve).listeners[0]


def load_config(path, *, resolve=True):
    """Read and parse the TOML file at ``path`` (messages name it as given)."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ConfigError(source, "", f"cannot read: {exc.strerror or exc}") from None
    return parse_config(data, source, resolve=resolve)
