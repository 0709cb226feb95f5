"""`relay rules tun print|apply|remove --dev DEV`: the policy routing that sends UDP, and
only UDP, into a TUN device served by `relay tun` — no nftables, no TPROXY.

* a routing table of its own (``--table``, default TUN_TABLE) holding ``default dev DEV``
  and ``throw`` routes for what is never sent into the device: loopback, link-local,
  multicast, broadcast and reserved ranges, the private ranges (RFC 1918, RFC 6598, ULA)
  and the ``--exclude`` ranges (a throw sends the lookup on to the next rule: main);
* ``ip rule add iif IFACE ipproto udp lookup TABLE`` for each ``--iface`` (the LAN), and
  with ``--local`` ``ip rule add iif lo ipproto udp lookup TABLE`` (the host's own UDP)
  after ``ip rule add fwmark MARK lookup main`` (the relay's own, marked, sockets: they
  must never loop back into the device);
* the device itself, when it does not exist yet: a persistent multi-queue TUN (``ip tuntap
  add``), marked with the alias OWNER_ALIAS so that remove deletes it only then.

Everything apply adds carries the routing protocol tag relay.rules.RT_PROTO (rules and
routes) or the alias (the device), and remove deletes exactly those. IPv6 the same way
unless --no-ipv6.
"""
import argparse
import ipaddress
import json
import shlex
import subprocess
import sys
from dataclasses import dataclass

from relay.net.addr import parse_cidr
from relay.rules import (RESERVED4, RESERVED6, RT_PROTO, RulesError, _checked, _json, _num,
                         _run, _u32, split_values, _cidr)

TUN_TABLE = 110
TUN_PRIORITY = 9000             # the skip-mark rule; the UDP rules come right after it
OWNER_ALIAS = "managed by relay rules tun"
PRIVATE4 = ("10.0.0.0/8", "100.64.0.0/10", "172.16.0.0/12", "192.168.0.0/16")
PRIVATE6 = ("fc00::/7",)


@dataclass(frozen=True)
class TunRulesOptions:
    dev: str = "relay0"
    ifaces: tuple = ()
    local: bool = False
    exclude: tuple = ()
    ipv6: bool = True
    table: int = TUN_TABLE
    priority: int = TUN_PRIORITY
    skip_mark: int = 255

    def __post_init__(self):
        from relay.rules import RulesOptions
        # the checks RulesOptions makes of the shared fields (interfaces, table, excludes)
        base = RulesOptions(1, table=self.table, ifaces=self.ifaces, ipv6=self.ipv6,
                            exclude=self.exclude, skip_mark=self.skip_mark,
                            mark=1 if self.skip_mark != 1 else 2)
        object.__setattr__(self, "ifaces", base.ifaces)
        object.__setattr__(self, "exclude", base.exclude)
        if not isinstance(self.dev, str) or not 1 <= len(self.dev.encode()) <= 15 or \
                not all(c.isalnum() or c in "_.-" for c in self.dev):
            raise ValueError(f"device name {self.dev!r}: 1-15 letters, digits, '_', '.' or '-'")
        if any(i.endswith("*") for i in self.ifaces):
            raise ValueError("--iface with tun: name each interface (ip rule matches no "
                             "prefix)")
        if self.dev in self.ifaces:
            raise ValueError(f"--iface {self.dev}: the TUN device itself (its replies would "
                             f"go back in)")
        if not self.ifaces and not self.local:
            raise ValueError("nothing to send into the device: give the LAN interfaces "
                             "(--iface) and/or --local (this host's own UDP)")
        if not 1 <= self.priority <= 32000:
            raise ValueError(f"priority out of range 1-32000: {self.priority}")

    def throws(self, version):
        nets = (RESERVED4 + PRIVATE4) if version == 4 else (RESERVED6 + PRIVATE6)
        nets = [ipaddress.ip_network(n) for n in nets]
        nets += [n for n in self.exclude if n.version == version]
        return tuple(ipaddress.collapse_addresses(nets))

    def versions(self):
        return (4, 6) if self.ipv6 else (4,)


def _fam(version):
    return "-4" if version == 4 else "-6"


def route_cmds(opts, version):
    t, p = str(opts.table), str(RT_PROTO)
    cmds = [["ip", _fam(version), "route", "add", "default", "dev", opts.dev, "table", t,
             "proto", p]]
    cmds += [["ip", _fam(version), "route", "add", "throw", str(n), "table", t, "proto", p]
             for n in opts.throws(version)]
    return cmds


def rule_cmds(opts, version):
    t, p = str(opts.table), str(RT_PROTO)
    cmds = []
    if opts.local:
        cmds.append(["ip", _fam(version), "rule", "add", "priority", str(opts.priority),
                     "fwmark", str(opts.skip_mark), "lookup", "main", "protocol", p])
    for i, iface in enumerate(opts.ifaces + (("lo",) if opts.local else ())):
        cmds.append(["ip", _fam(version), "rule", "add", "priority", str(opts.priority + 1 + i),
                     "iif", iface, "ipproto", "udp", "lookup", t, "protocol", p])
    return cmds


def device_cmd(opts):
    return ["ip", "tuntap", "add", "dev", opts.dev, "mode", "tun", "multi_queue"]


def render_shell(opts, device=True):
    cmds = ([device_cmd(opts), ["ip", "link", "set", "dev", opts.dev, "alias", OWNER_ALIAS]]
            if device else [])
    for v in opts.versions():
        cmds += route_cmds(opts, v) + rule_cmds(opts, v)
    return "".join(shlex.join(c) + "\n" for c in cmds)


def _device(runner, dev):
    """The `ip -j link show DEV` entry, or None when there is no such device."""
    r = _run(runner, ["ip", "-j", "link", "show", "dev", dev])
    if r.returncode != 0:
        return None
    try:
        entries = json.loads(r.stdout or "[]")
    except json.JSONDecodeError:
        return None
    return entries[0] if entries else None


def _is_throw(entry):
    return str(entry.get("type", "unicast")) in ("throw", "9")     # RTN_THROW with -N


def _ours(entry):
    return _num(entry.get("protocol", 0)) == RT_PROTO


def find_rules(runner, opts, version):
    """The ip rules of ours (tag, this table or the skip-mark rule at our priority)."""
    entries = _json(runner, ["ip", "-N", "-j", _fam(version), "rule", "show"])
    out = []
    for e in entries:
        if not _ours(e):
            continue
        if str(e.get("table")) == str(opts.table) and str(e.get("ipproto")) in ("udp", "17", "ipproto-17"):
            out.append(e)
        elif e.get("priority") == opts.priority and e.get("table") in ("main", 254, "254"):
            out.append(e)
    return out


def find_routes(runner, opts, version):
    entries = _json(runner, ["ip", "-N", "-j", _fam(version), "route", "show", "table",
                             str(opts.table)], missing_ok=True)
    return [e for e in entries if _ours(e)]


def apply(opts, runner=subprocess.run):
    """Create the device if missing, then add the routes and rules; applying twice leaves
    one copy. On a failure what this call added is taken away again (RulesError)."""
    undo = []
    try:
        if _device(runner, opts.dev) is None:
            _checked(runner, device_cmd(opts))
            undo.append(["ip", "link", "del", "dev", opts.dev])
            _checked(runner, ["ip", "link", "set", "dev", opts.dev, "alias", OWNER_ALIAS])
        _checked(runner, ["ip", "link", "set", "dev", opts.dev, "up"])
        for v in opts.versions():
            have = {(e.get("dst"), _is_throw(e)) for e in find_routes(runner, opts, v)}
            for cmd in route_cmds(opts, v):
                throw = cmd[4] == "throw"
                if ((cmd[5] if throw else "default"), throw) in have:
                    continue
                _checked(runner, cmd)
                undo.append([*cmd[:3], "del", *cmd[4:]])
            prefs = {e.get("priority") for e in find_rules(runner, opts, v)}
            for cmd in rule_cmds(opts, v):
                if int(cmd[5]) in prefs:
                    continue
                _checked(runner, cmd)
                undo.append([*cmd[:3], "del", *cmd[4:]])
    except BaseException:
        for cmd in reversed(undo):
            _run(runner, cmd)
        raise


def remove(opts, runner=subprocess.run):
    """Take away the rules and routes tagged RT_PROTO in this table (and the skip-mark
    rule at this priority), then the device if apply made it. Nothing there: OK."""
    errors = []
    for v in (4, 6):
        try:
            rules, routes = find_rules(runner, opts, v), find_routes(runner, opts, v)
        except RulesError as exc:
            if v == 6 and not opts.ipv6:
                continue
            errors.append(exc)
            continue
        for e in rules:
            cmd = ["ip", _fam(v), "rule", "del", "priority", str(e["priority"]),
                   "protocol", str(RT_PROTO)]
            try:
                _checked(runner, cmd)
            except RulesError as exc:
                errors.append(exc)
        for e in routes:
            cmd = ["ip", _fam(v), "route", "del"] + (["throw"] if _is_throw(e) else []) + \
                [e["dst"], "table", str(opts.table), "proto", str(RT_PROTO)]
            try:
                _checked(runner, cmd)
            except RulesError as exc:
                errors.append(exc)
    dev = _device(runner, opts.dev)
    if dev is not None and dev.get("ifalias") == OWNER_ALIAS:
        try:
            _checked(runner, ["ip", "link", "del", "dev", opts.dev])
        except RulesError as exc:
            errors.append(exc)
    if errors:
        raise errors[0] if len(errors) == 1 else RulesError("; ".join(map(str, errors)))


def options_from_args(args):
    return TunRulesOptions(dev=args.dev, ifaces=split_values(args.iface), local=args.local,
                           exclude=split_values(args.exclude), ipv6=args.ipv6,
                           table=args.table if args.table is not None else TUN_TABLE,
                           priority=args.priority, skip_mark=args.skip_mark)


def run_cli(args, runner=subprocess.run, out=None, err=None):
    out, err = out or sys.stdout, err or sys.stderr
    action = args.tun_action
    if action is None:
        print("relay rules tun: give print, apply or remove", file=err)
        return 2
    try:
        opts = options_from_args(args)
    except (ValueError, TypeError) as exc:
        print(f"relay rules tun: {exc}", file=err)
        return 2
    if action == "print":
        out.write(render_shell(opts))
        return 0
    try:
        (apply if action == "apply" else remove)(opts, runner=runner)
    except RulesError as exc:
        print(f"relay rules tun: {exc}", file=err)
        return 1
    except FileNotFoundError as exc:
        print(f"relay rules tun: {exc.filename or exc}: command not found (install iproute2)",
              file=err)
        return 1
    done = "applied" if action == "apply" else "removed"
    print(f"relay rules tun: {done} (UDP from {', '.join(opts.ifaces + (('this host',) if opts.local else ()))} "
          f"-> table {opts.table} -> {opts.dev})", file=out)
    return 0


def add_arguments(p):
    """The options of `relay rules tun` on the `relay rules` parser (tun_action is its
    second word)."""
    p.add_argument("tun_action", nargs="?", choices=("print", "apply", "remove"),
                   help="with `tun`: print, apply or remove the TUN routing")
    g = p.add_argument_group("tun (relay rules tun print|apply|remove)")
    g.add_argument("--dev", default="relay0",
                   help="the TUN device of `relay tun` (created, persistent, if missing) "
                        "(default: %(default)s)")
    g.add_argument("--local", action="store_true",
                   help="send this host's own UDP into the device too (the relay's, marked "
                        "--skip-mark, excepted)")
    g.add_argument("--priority", type=_u32, default=TUN_PRIORITY,
                   help="ip rule priority of the skip-mark rule; the UDP rules follow it "
                        "(default: %(default)s)")
