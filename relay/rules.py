"""The nftables ruleset and the policy routing a router needs for UDP TPROXY to one port.

``relay rules print|apply|remove --port PORT`` renders, installs or removes:

* one nftables table of its own (``table inet relay``) with a prerouting chain that sends
  forwarded UDP to the local port with TPROXY and marks it, skipping local, broadcast,
  multicast, loopback and reserved destinations, the ``--exclude`` ranges and packets that
  already carry the relay's own mark;
* ``ip rule add fwmark MARK lookup TABLE`` and ``ip route add local 0.0.0.0/0 dev lo table
  TABLE`` (and their IPv6 twins), so that marked packets are delivered locally to the
  transparent socket instead of being forwarded.

Bookkeeping: the nft table is replaced as a whole in one atomic ``nft -f`` transaction, and
the ip rules and routes that ``apply`` adds carry the routing protocol tag ``RT_PROTO`` (82),
so ``remove`` deletes exactly those and nothing else, whatever else the system holds.
"""
import argparse
import ipaddress
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass

from relay.net.addr import parse_cidr

__all__ = [
    "RulesOptions", "RulesError", "render_nft", "render_ip", "render_shell", "parse_nft",
    "cli_args", "apply", "remove", "add_cli", "find_rules", "find_routes", "nft_table_exists",
    "RESERVED4", "RESERVED6", "RT_PROTO", "OWNER",
]

# Destinations never redirected: "this network", loopback, link-local, multicast,
# the former class E and the limited broadcast address.
RESERVED4 = ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4",
             "255.255.255.255/32")
# Unspecified, loopback, link-local and multicast.
RESERVED6 = ("::/128", "::1/128", "fe80::/10", "ff00::/8")

# Routing protocol number stamped on the ip rules and routes that apply() adds
# (free in /etc/iproute2/rt_protos), so remove() can tell them from everything else.
RT_PROTO = 82

_RESERVED_TABLES = {0: "unspec", 253: "default", 254: "main", 255: "local"}
_NFT_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,31}$")
_IFACE = re.compile(r"^[A-Za-z0-9_.:@+-]{1,15}\*?$")
_U32 = 0xFFFFFFFF


class RulesError(RuntimeError):
    """A command of apply/remove failed; the message names the command and its stderr."""

    def __init__(self, message, *, cmd=None, stderr=""):
        super().__init__(message)
        self.cmd = cmd
        self.stderr = stderr


def _int_field(name, value, low, high):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} out of range {low}-{high}: {value}")
    return value


def _as_tuple(name, value):
    if isinstance(value, (str, bytes)):
        return (value,)
    try:
        return tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be a list, got {type(value).__name__} {value!r}") from None


@dataclass(frozen=True)
class RulesOptions:
    """What to redirect where. Validated on construction (ValueError/TypeError).

    ``port``: local port of the relay's transparent listener; ``mark``: firewall mark set
    on redirected packets and matched by the ip rule; ``table``: routing table holding the
    ``local`` default routes; ``ifaces``: input interfaces to act on (empty: every one but
    lo; a trailing ``*`` matches a prefix); ``ipv6``: redirect IPv6 too; ``exclude``: more
    destination CIDRs left alone; ``skip_mark``: packets already carrying this mark (the
    relay's own traffic) are left alone; ``nft_table``: name of the nftables table.
    """
    port: int
    mark: int = 1
    table: int = 100
    ifaces: tuple = ()
    ipv6: bool = True
    exclude: tuple = ()
    skip_mark: int = 255
    nft_table: str = "relay"

    def __post_init__(self):
        _int_field("port", self.port, 1, 65535)
        _int_field("mark", self.mark, 1, _U32)
        _int_field("skip mark", self.skip_mark, 1, _U32)
        _int_field("table", self.table, 1, _U32)
        if self.table in _RESERVED_TABLES:
            raise ValueError(f"table {self.table} is the system's {_RESERVED_TABLES[self.table]!r} "
                             f"table; pick a free one (e.g. 100)")
        if self.mark == self.skip_mark:
            raise ValueError(f"mark and skip mark must differ (both {self.mark}): the skip mark "
                             f"exempts the relay's own traffic from redirection")
        if not isinstance(self.ipv6, bool):
            raise TypeError(f"ipv6 must be True or False, got {self.ipv6!r}")
        if not isinstance(self.nft_table, str) or not _NFT_NAME.match(self.nft_table):
            raise ValueError(f"nft table name {self.nft_table!r}: use a letter then up to 31 "
                             f"letters, digits or '_'")
        ifaces = []
        for iface in _as_tuple("ifaces", self.ifaces):
            if not isinstance(iface, str) or not _IFACE.match(iface) or iface in (".", ".."):
                raise ValueError(f"interface name {iface!r}: 1-15 characters of letters, digits "
                                 f"and _.:@+- (a trailing * matches a prefix)")
            if iface == "lo":
                raise ValueError("interface 'lo': locally generated traffic does not pass "
                                 "prerouting, and loopback is never redirected")
            if iface not in ifaces:
                ifaces.append(iface)
        object.__setattr__(self, "ifaces", tuple(ifaces))
        nets = []
        for item in _as_tuple("exclude", self.exclude):
            net = parse_cidr(item, what="exclude")
            if net.version == 6 and not self.ipv6:
                raise ValueError(f"exclude {str(net)!r}: an IPv6 range with IPv6 redirection off")
            if net not in nets:
                nets.append(net)
        object.__setattr__(self, "exclude", tuple(nets))

    def exclude_of(self, version):
        nets = [n for n in self.exclude if n.version == version]
        return tuple(ipaddress.collapse_addresses(nets)) if nets else ()


def _set(name, addr_type, nets, comment):
    lines = [f"\tset {name} {{",
             f"\t\ttype {addr_type}",
             "\t\tflags interval",
             "\t\tauto-merge",
             f"\t\tcomment \"{comment}\""]
    if nets:
        lines.append(f"\t\telements = {{ {', '.join(str(n) for n in nets)} }}")
    lines.append("\t}")
    return lines


def _rule(text, comment):
    return f"\t\t{text} comment \"{comment}\""


# The comment on every table relay creates: apply replaces and remove deletes a table only
# when it carries it, so a table of the same name that relay did not make is never touched.
OWNER = "managed by relay rules"


def render_nft(opts):
    """The nftables ruleset (text for ``nft -f``) of one table holding everything."""
    t = opts.nft_table
    out = [f"# UDP TPROXY to port {opts.port} for relay; generated by `relay rules`.",
           f"# The first two lines make the table exist, so deleting it never fails:",
           f"# the whole table is replaced atomically and nothing outside it is touched.",
           f"table inet {t}",
           f"delete table inet {t}",
           f"table inet {t} {{",
           f'\tcomment "{OWNER}"']
    out += _set("reserved4", "ipv4_addr", RESERVED4, "special IPv4 destinations")
    out += _set("exclude4", "ipv4_addr", opts.exclude_of(4), "IPv4 destinations left alone")
    if opts.ipv6:
        out += _set("reserved6", "ipv6_addr", RESERVED6, "special IPv6 destinations")
        out += _set("exclude6", "ipv6_addr", opts.exclude_of(6), "IPv6 destinations left alone")
    mark = f"0x{opts.mark:08x}"
    out += ["",
            "\tchain prerouting {",
            "\t\ttype filter hook prerouting priority mangle; policy accept;",
            _rule("meta l4proto != udp return", "only UDP is redirected")]
    if opts.ifaces:
        names = ", ".join(f'"{i}"' for i in opts.ifaces)
        out.append(_rule(f"iifname != {{ {names} }} return", "only from the given interfaces"))
    else:
        out.append(_rule('iifname "lo" return', "every interface but loopback"))
    out += [
        _rule(f"meta mark 0x{opts.skip_mark:08x} return", "the relay's own traffic (skip mark)"),
        _rule("fib daddr type local return", "addressed to this host"),
        _rule("fib daddr type { broadcast, multicast } return", "broadcast and multicast"),
        _rule("ip daddr @reserved4 return", "special IPv4 destinations"),
        _rule("ip daddr @exclude4 return", "excluded IPv4 destinations"),
    ]
    if opts.ipv6:
        out += [_rule("ip6 daddr @reserved6 return", "special IPv6 destinations"),
                _rule("ip6 daddr @exclude6 return", "excluded IPv6 destinations")]
    out.append(_rule(f"meta l4proto udp tproxy ip to :{opts.port} meta mark set {mark} accept",
                     f"IPv4 UDP to the relay on port {opts.port}"))
    if opts.ipv6:
        out.append(_rule(f"meta l4proto udp tproxy ip6 to :{opts.port} meta mark set {mark} accept",
                         f"IPv6 UDP to the relay on port {opts.port}"))
    out += ["\t}", "}", ""]
    return "\n".join(out)


def _ip_cmds(opts, version):
    fam = "-4" if version == 4 else "-6"
    dst = "0.0.0.0/0" if version == 4 else "::/0"
    return [["ip", fam, "rule", "add", "fwmark", str(opts.mark), "lookup", str(opts.table),
             "protocol", str(RT_PROTO)],
            ["ip", fam, "route", "add", "local", dst, "dev", "lo", "table", str(opts.table),
             "proto", str(RT_PROTO)]]


def render_ip(opts):
    """The ip commands (argument lists) that deliver marked packets to the local socket."""
    cmds = _ip_cmds(opts, 4)
    if opts.ipv6:
        cmds += _ip_cmds(opts, 6)
    return cmds


def render_shell(opts):
    """nft text and ip commands as one shell script (what ``relay rules print`` shows)."""
    lines = ["nft -f - <<'EOF'", render_nft(opts).rstrip("\n"), "EOF"]
    lines += [shlex.join(cmd) for cmd in render_ip(opts)]
    return "\n".join(lines) + "\n"


# What parse_nft looks for in `nft list table` output: the lines render_nft writes, as nft
# prints them back.
_TPROXY = re.compile(r"tproxy (ip6?) to :(\d+) meta mark set (0x[0-9a-f]+) accept")
_SKIP = re.compile(r"meta mark (0x[0-9a-f]+) return")
_ONLY_IFACES = re.compile(r'iifname != (?:\{ ([^}]*) \}|("[^"]*")) return')


def _listed_set(listing, name):
    """The networks of a named set in an nft listing (nft prints merged neighbours as
    ranges, single addresses without /32 or /128)."""
    m = re.search(r"\tset %s \{(.*?)\n\t\}" % name, listing, re.S)
    el = re.search(r"elements = \{(.*?)\}", m.group(1), re.S) if m else None
    nets = []
    for item in (el.group(1).replace("\n", " ").split(",") if el else ()):
        item = item.strip()
        if "-" in item:
            low, high = (ipaddress.ip_address(x.strip()) for x in item.split("-", 1))
            nets.extend(ipaddress.summarize_address_range(low, high))
        elif item:
            nets.append(parse_cidr(item, what="set element"))
    return nets


def parse_nft(listing, *, nft_table="relay", table=100):
    """The RulesOptions an installed table stands for, read back from ``nft list table``
    output (the routing table is not in it: ``table`` is taken as given). RulesError when
    the listing lacks a line render_nft writes or its TPROXY lines disagree."""
    found = {fam: (int(port), int(mark, 16)) for fam, port, mark in _TPROXY.findall(listing)}
    skip = _SKIP.search(listing)
    if "ip" not in found or not skip:
        missing = "the IPv4 TPROXY rule" if "ip" not in found else "the skip mark rule"
        raise RulesError(f"nft table inet {nft_table} lacks {missing}: it was changed "
                         f"since relay rules applied it")
    if "ip6" in found and found["ip6"] != found["ip"]:
        raise RulesError(f"nft table inet {nft_table}: the IPv4 and IPv6 TPROXY rules differ "
                         f"(port, mark {found['ip']} and {found['ip6']})")
    only = _ONLY_IFACES.search(listing)
    ifaces = re.findall(r'"([^"]*)"', only.group(1) or only.group(2)) if only else ()
    exclude = _listed_set(listing, "exclude4") + _listed_set(listing, "exclude6")
    port, mark = found["ip"]
    try:
        return RulesOptions(port, mark=mark, table=table, ifaces=ifaces, ipv6="ip6" in found,
                            exclude=exclude, skip_mark=int(skip.group(1), 16),
                            nft_table=nft_table)
    except (ValueError, TypeError) as exc:
        raise RulesError(f"nft table inet {nft_table}: {exc}") from None


def cli_args(opts):
    """The ``relay rules`` options that make opts, defaults left out (the inverse of
    options_from_args): ``["--port", "5300", "--iface", "br-lan", ...]``."""
    default = RulesOptions(opts.port)
    args = ["--port", str(opts.port)]
    if opts.ifaces:
        args += ["--iface", ",".join(opts.ifaces)]
    for flag, name in (("--mark", "mark"), ("--table", "table"), ("--skip-mark", "skip_mark"),
                       ("--nft-table", "nft_table")):
        if getattr(opts, name) != getattr(default, name):
            args += [flag, str(getattr(opts, name))]
    if not opts.ipv6:
        args.append("--no-ipv6")
    if opts.exclude:
        args += ["--exclude", ",".join(str(n) for n in opts.exclude)]
    return args


# --- running commands ------------------------------------------------------------------

def _run(runner, cmd, input=None):
    return runner(cmd, input=input, capture_output=True, text=True)


def _checked(runner, cmd, input=None):
    r = _run(runner, cmd, input)
    if r.returncode != 0:
        err = (r.stderr or "").strip()
        raise RulesError(f"{shlex.join(cmd)} failed (exit {r.returncode}): {err}",
                         cmd=cmd, stderr=err)
    return r


def _json(runner, cmd, *, missing_ok=False):
    r = _run(runner, cmd)
    if r.returncode != 0:
        err = (r.stderr or "").strip()
        if missing_ok and "does not exist" in err:   # a routing table nobody created yet
            return []
        raise RulesError(f"{shlex.join(cmd)} failed (exit {r.returncode}): {err}",
                         cmd=cmd, stderr=err)
    text = (r.stdout or "").strip()
    try:
        return json.loads(text) if text else []
    except json.JSONDecodeError as exc:
        raise RulesError(f"{shlex.join(cmd)}: unexpected output ({exc}): {text[:200]!r}",
                         cmd=cmd) from None


def _num(value):
    try:
        return int(str(value), 0)
    except ValueError:
        return None


def _rule_matches(entry, opts, *, tagged, any_table=False):
    """Is this `ip -j rule` entry `from all fwmark MARK lookup TABLE` (with our tag)?
    With any_table, a rule sending the mark to any table counts."""
    if entry.get("src", "all") != "all" or "srclen" in entry:
        return False
    if _num(entry.get("fwmark", -1)) != opts.mark:
        return False
    if "fwmask" in entry and _num(entry["fwmask"]) != _U32:
        return False
    if not any_table and _num(entry.get("table", -1)) != opts.table:
        return False
    extra = set(entry) - {"priority", "src", "fwmark", "fwmask", "table", "protocol"}
    if extra or entry.get("action", "to_tbl") != "to_tbl":
        return False
    is_ours = _num(entry.get("protocol", 0)) == RT_PROTO
    return is_ours if tagged else True


def find_rules(runner, opts, version, *, tagged, any_table=False):
    """The `ip -j rule` entries (IPv4 or IPv6) `from all fwmark MARK lookup TABLE` of opts
    (tagged: only those apply added; any_table: whatever table the mark goes to)."""
    fam = "-4" if version == 4 else "-6"
    entries = _json(runner, ["ip", "-N", "-j", fam, "rule", "show"])
    return [e for e in entries if _rule_matches(e, opts, tagged=tagged, any_table=any_table)]


def find_routes(runner, opts, version, *, tagged):
    """The `local default dev lo` routes (IPv4 or IPv6) in the routing table of opts."""
    fam = "-4" if version == 4 else "-6"
    entries = _json(runner, ["ip", "-N", "-j", fam, "route", "show", "table", str(opts.table)],
                    missing_ok=True)
    found = []
    for e in entries:
        if e.get("dst") != "default" or e.get("dev") != "lo" or _num(e.get("type")) != 2:
            continue
        if tagged and _num(e.get("protocol", 0)) != RT_PROTO:
            continue
        found.append(e)
    return found


def nft_table_exists(runner, name):
    """(exists, listing) of the nft table inet NAME; RulesError when nft itself fails or
    when a table of that name exists that relay did not create (it has no OWNER comment)."""
    cmd = ["nft", "list", "table", "inet", name]
    r = _run(runner, cmd)
    if r.returncode == 0:
        listing = r.stdout or ""
        if f'comment "{OWNER}"' not in listing:
            raise RulesError(f"nft table inet {name} exists and was not created by "
                             f"relay rules: it is left alone; choose another --nft-table",
                             cmd=cmd)
        return True, listing
    err = (r.stderr or "").strip()
    if "No such file or directory" in err:
        return False, ""
    raise RulesError(f"{shlex.join(cmd)} failed (exit {r.returncode}): {err}", cmd=cmd, stderr=err)


def _nft_delete_text(name):
    return f"table inet {name}\ndelete table inet {name}\n"


def apply(opts, runner=subprocess.run):
    """Install the ruleset and the ip rules/routes; applying twice leaves one copy.

    The nft table is replaced atomically. A rule or route is added only when no equivalent
    one exists (one already there, ours or not, is left as it is). If a step fails,
    what this call changed is undone and RulesError names the failing command and its
    stderr. ``runner`` is called like ``subprocess.run(args, input=, capture_output=True,
    text=True)`` (tests pass one that runs inside a network namespace).
    """
    existed, previous = nft_table_exists(runner, opts.nft_table)
    undo = []
    try:
        _checked(runner, ["nft", "-f", "-"], input=render_nft(opts))
        if existed:
            undo.append(["nft", "-f", "-", _nft_delete_text(opts.nft_table) + previous])
        else:
            undo.append(["nft", "-f", "-", _nft_delete_text(opts.nft_table)])
        versions = (4, 6) if opts.ipv6 else (4,)
        for version in versions:
            rule_cmd, route_cmd = _ip_cmds(opts, version)
            if not find_rules(runner, opts, version, tagged=False):
                _checked(runner, rule_cmd)
                undo.append([*rule_cmd[:3], "del", *rule_cmd[4:]])
            if not find_routes(runner, opts, version, tagged=False):
                _checked(runner, route_cmd)
                undo.append([*route_cmd[:3], "del", *route_cmd[4:]])
    except BaseException:
        for cmd in reversed(undo):
            if cmd[:3] == ["nft", "-f", "-"]:
                _run(runner, cmd[:3], input=cmd[3])
            else:
                _run(runner, cmd)
        raise


def remove(opts, runner=subprocess.run):
    """Remove what apply installed: the nft table, and the ip rules/routes tagged RT_PROTO
    with this mark and table (both families). Everything else stays. Nothing installed: OK."""
    errors = []
    exists, _ = nft_table_exists(runner, opts.nft_table)
    if exists:
        try:
            _checked(runner, ["nft", "-f", "-"], input=_nft_delete_text(opts.nft_table))
        except RulesError as exc:
            errors.append(exc)
    for version in (4, 6):
        fam = "-4" if version == 4 else "-6"
        try:
            rules = find_rules(runner, opts, version, tagged=True)
            routes = find_routes(runner, opts, version, tagged=True)
        except RulesError as exc:
            if version == 6 and not opts.ipv6:
                continue        # IPv6 may be disabled here; nothing of ours can be there
            errors.append(exc)
            continue
        for entry in rules:
            cmd = ["ip", fam, "rule", "del", "priority", str(entry["priority"]),
                   "fwmark", str(opts.mark), "lookup", str(opts.table), "protocol", str(RT_PROTO)]
            try:
                _checked(runner, cmd)
            except RulesError as exc:
                errors.append(exc)
        for _entry in routes:
            dst = "0.0.0.0/0" if version == 4 else "::/0"
            cmd = ["ip", fam, "route", "del", "local", dst, "dev", "lo", "table", str(opts.table),
                   "proto", str(RT_PROTO)]
            try:
                _checked(runner, cmd)
            except RulesError as exc:
                errors.append(exc)
    if errors:
        if len(errors) == 1:
            raise errors[0]
        raise RulesError("; ".join(str(e) for e in errors), cmd=errors[0].cmd,
                         stderr=errors[0].stderr)


# --- command line ----------------------------------------------------------------------

def port_arg(text):
    """argparse type of a port number 1-65535."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port out of range 1-65535: {value}")
    return value


def _u32(text):
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 1 <= value <= _U32:
        raise argparse.ArgumentTypeError(f"out of range 1-{_U32}: {value}")
    return value


def _cidr(text):
    try:
        return tuple(parse_cidr(part, what="--exclude") for part in text.split(",") if part)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def split_values(values):
    """Flatten repeated and comma-separated option values."""
    out = []
    for value in values or ():
        if isinstance(value, str):
            out.extend(part for part in value.split(",") if part)
        elif isinstance(value, (tuple, list)):
            out.extend(value)
        else:
            out.append(value)
    return tuple(out)


def options_from_args(args):
    if args.port is None:
        raise ValueError("--port is required (the port of relay redir --listen)")
    return RulesOptions(port=args.port, mark=args.mark,
                        table=RulesOptions.table if args.table is None else args.table,
                        ifaces=split_values(args.iface), ipv6=args.ipv6,
                        exclude=split_values(args.exclude), skip_mark=args.skip_mark,
                        nft_table=args.nft_table)


def run_cli(args, runner=subprocess.run, out=None, err=None):
    out = out or sys.stdout
    err = err or sys.stderr
    if args.action == "tun":
        from relay import rules_tun
        return rules_tun.run_cli(args, runner=runner, out=out, err=err)
    try:
        opts = options_from_args(args)
    except (ValueError, TypeError) as exc:
        print(f"relay rules: {exc}", file=err)
        return 2
    if args.action == "print":
        out.write(render_shell(opts))
        return 0
    try:
        if args.action == "apply":
            apply(opts, runner=runner)
            print(f"relay rules: applied (nft table inet {opts.nft_table}, fwmark {opts.mark} "
                  f"-> table {opts.table}, UDP to port {opts.port})", file=out)
        else:
            remove(opts, runner=runner)
            print(f"relay rules: removed (nft table inet {opts.nft_table}, fwmark {opts.mark} "
                  f"-> table {opts.table})", file=out)
    except RulesError as exc:
        print(f"relay rules: {exc}", file=err)
        return 1
    except FileNotFoundError as exc:
        print(f"relay rules: {exc.filename or exc}: command not found (install nftables "
              f"and iproute2)", file=err)
        return 1
    return 0


def add_cli(subparsers):
    """Register ``relay rules print|apply|remove`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "rules",
        help="print, apply or remove the nftables/ip rules for UDP TPROXY",
        description="The nftables ruleset (one table of its own) and the ip rule / ip route "
                    "lines a router needs to send forwarded UDP to `relay redir` on PORT with "
                    "TPROXY. `print` shows them, `apply` installs them (idempotent), `remove` "
                    "removes exactly what `apply` installed. `relay rules tun print|apply|remove "
                    "--dev DEV` instead: the policy routing that sends UDP into the TUN device "
                    "of `relay tun` (docs/tun.md).",
        epilog="examples: relay rules apply --port 5300 --iface br-lan --exclude 192.0.2.0/24; "
               "relay rules tun apply --dev relay0 --iface br-lan",
    )
    p.add_argument("action", choices=("print", "apply", "remove", "tun"),
                   help="print the rules, apply them, or remove them; tun: the TUN routing")
    from relay import rules_tun
    rules_tun.add_arguments(p)
    p.add_argument("--port", type=port_arg, default=None,
                   help="local port of the transparent listener (relay redir --listen) "
                        "(required) except with tun")
    p.add_argument("--mark", type=_u32, default=1,
                   help="firewall mark set on redirected packets and matched by the ip rule "
                        "(default: %(default)s)")
    p.add_argument("--table", type=_u32, default=None,
                   help="routing table holding the 'local' default routes (default: 100); "
                        "with tun, the one holding the routes into the device (default: 110)")
    p.add_argument("--iface", action="append", default=[], metavar="IFACE",
                   help="act only on UDP entering IFACE; repeatable or comma-separated, "
                        "'eth*' matches a prefix (default: every interface but lo)")
    a = p.add_argument("--ipv6", action=argparse.BooleanOptionalAction, default=True,
                       help="redirect IPv6 too")
    if "%(default)" not in (a.help or ""):
        a.help += " (default: %(default)s)"
    p.add_argument("--exclude", type=_cidr, action="append", default=[], metavar="CIDR",
                   help="leave these destinations alone; repeatable or comma-separated "
                        "(default: none; loopback, link-local, multicast, broadcast and "
                        "reserved ranges always are)")
    p.add_argument("--skip-mark", type=_u32, default=255,
                   help="leave packets carrying this mark alone: the relay's own traffic "
                        "(relay redir --mark) (default: %(default)s)")
    p.add_argument("--nft-table", default="relay",
                   help="name of the nftables table (family inet) (default: %(default)s)")
    p.set_defaults(func=run_cli)
    return p


def main(argv=None):
    parser = argparse.ArgumentParser(prog="relay")
    sub = parser.add_subparsers(dest="command", required=True)
    add_cli(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
