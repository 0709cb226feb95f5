"""``relay doctor``: check what a forward or TPROXY setup needs, say what is wrong and how
to fix it.

The facts are gathered once (``Facts``: the running relay's configuration through its
control socket, the nft table ``relay rules`` installed, the interfaces); every check is a
small function of them returning ``(name, ok, message, fix)``, where ``fix`` is the command
that repairs the problem. Nothing here changes the system: it runs ``nft list``, ``nft -c``
(check mode: the kernel parses the ruleset, nothing is committed), ``ip ... show``, reads
/proc (``proc``, injectable for tests) and probes options with getsockopt on throwaway
sockets.
"""
import dataclasses
import json
import os
import resource
import shlex
import socket
import subprocess
import sys
from functools import cached_property
from typing import NamedTuple

from relay import rules
from relay.net import sockopt
from relay.net.addr import parse_hostport
from relay.config import GlobalConfig, mode_defaults
from relay.privileges import CAP_NET_ADMIN, NAMES, effective_capabilities
from relay.rules import RulesError, RulesOptions

__all__ = ["Check", "Facts", "CHECKS", "run_checks", "add_cli", "run_cli"]

DEFAULT_CONTROL = GlobalConfig.control_socket
PROBE_TABLE = "relay_doctor_probe"      # the table `nft -c` parses (check mode: never created)
# Descriptors a worker needs besides one per association and transparent reply socket: the
# data path keeps 32 free (FD_RESERVE, relay/datapath/limits.pxd), plus listen, raw, epoll, control.
FD_SPARE = 64
CAP_NUMBERS = {name: number for number, name in NAMES.items()}
AS_ROOT = "run relay doctor as root (sudo relay doctor ...)"


class Check(NamedTuple):
    name: str
    ok: bool
    message: str
    fix: str = ""


def good(message):
    return True, message, ""


def bad(message, fix):
    return False, message, fix


def _families(host):
    """The families a listener on host takes: '::' both (dual stack), else its own."""
    if host == "::":
        return {4, 6}
    return {6} if ":" in host else {4}


def _fams(fams):
    return " and ".join(f"IPv{v}" for v in sorted(fams))


def _iface_match(pattern, name):
    return name.startswith(pattern[:-1]) if pattern.endswith("*") else name == pattern


def _bridged(link):
    info = (link or {}).get("linkinfo", {})
    return "bridge" in (info.get("info_kind"), info.get("info_slave_kind"))


def _int(text, default=0):
    try:
        return int(text)
    except (TypeError, ValueError):
        return default


def _nft_error(stderr):
    lines = [ln.split("Error: ", 1)[1] for ln in (stderr or "").splitlines() if "Error: " in ln]
    return lines[0] if lines else (stderr or "").strip()[:200]


class Facts:
    """What the checks look at, each gathered once, on first use."""

    def __init__(self, *, port=None, ifaces=(), control=DEFAULT_CONTROL, nft_table="relay",
                 runner=subprocess.run, proc="/proc", tun_dev=None):
        self.port_given = port
        self.tun_dev = tun_dev          # relay tun's device to check without a running relay
        self.ifaces = tuple(ifaces)
        self.control = control
        self.nft_table = nft_table
        self.runner = runner
        self.proc = proc

    def run(self, cmd, input=None):
        return self.runner(cmd, input=input, capture_output=True, text=True)

    def read(self, path):
        """A file under the proc root, stripped; None when it does not exist."""
        try:
            with open(os.path.join(self.proc, path)) as f:
                return f.read().strip()
        except (FileNotFoundError, NotADirectoryError):
            return None

    # ---- the running relay ---------------------------------------------------------

    @cached_property
    def relay(self):
        """The relay's configuration (control request "config"), or None."""
        from relay.supervisor import query
        self.relay_error = "no control socket given"
        try:
            doc = json.loads(query(self.control, "config")) if self.control else {}
        except (RuntimeError, OSError, ValueError) as e:
            doc = {"error": str(e)}
        if "error" in doc:              # down, or a relay from before the "config" request
            self.relay_error = doc["error"]
        return doc if "pid" in doc else None

    @property
    def listeners(self):
        return self.relay["listeners"] if self.relay else []

    @property
    def redirs(self):
        return [lc for lc in self.listeners if lc["mode"] == "redir"]

    @staticmethod
    def listen_of(lc):
        return parse_hostport(lc["listen"])

    # ---- the rules -------------------------------------------------------------------

    @cached_property
    def installed(self):
        """RulesOptions of the installed nft table, its routing table the one the IPv4
        fwmark rule names; None when there is none (rules_error says why, if known)."""
        opts = self.listed
        if opts is None:
            return None
        try:
            return dataclasses.replace(opts, table=self.tables.get(4, opts.table))
        except (RulesError, OSError):        # the ip-rule check reports it
            return opts

    @cached_property
    def listed(self):
        """RulesOptions as the nft table says (routing table: the default)."""
        self.rules_error = ""
        try:
            exists, listing = rules.nft_table_exists(self.runner, self.nft_table)
            return rules.parse_nft(listing, nft_table=self.nft_table) if exists else None
        except RulesError as e:
            self.rules_error = str(e)
        except FileNotFoundError:
            self.rules_error = "nft is not installed"
        return None

    @cached_property
    def tables(self):
        """{family: the routing table an `ip rule fwmark MARK` sends the rules' mark to}."""
        out, opts = {}, self.listed
        for version in ((4, 6) if opts.ipv6 else (4,)):
            found = rules.find_rules(self.runner, opts, version, tagged=False, any_table=True)
            if found:
                out[version] = _int(found[0].get("table"), opts.table)
        return out

    @cached_property
    def port(self):
        if self.port_given:
            return self.port_given
        ports = sorted({self.listen_of(lc)[1] for lc in self.redirs})
        if self.installed and (self.installed.port in ports or not ports):
            return self.installed.port
        return ports[0] if ports else None

    @cached_property
    def tproxy(self):
        """Is this a TPROXY setup (else a forward one, which needs no rules)?"""
        if self.relay is not None:
            return bool(self.redirs) or bool(self.port_given and self.installed)
        return self.port is not None

    @cached_property
    def families(self):
        """The families the setup carries: the rules', else the redir listeners', else
        both when the host has IPv6."""
        if self.installed:
            return {4, 6} if self.installed.ipv6 else {4}
        return self.listener_families(self.port) or ({4, 6} if sockopt.ipv6_available() else {4})

    def listener_families(self, port):
        """The families the redir listeners on port take together."""
        return set().union(*(_families(self.listen_of(lc)[0]) for lc in self.redirs
                             if self.listen_of(lc)[1] == port))

    def wanted(self, **changes):
        """The RulesOptions the setup needs: the installed ones (or the defaults) with the
        port, families and interfaces of the setup, then ``changes``."""
        base = self.installed or RulesOptions(self.port or 1)
        kw = {"port": self.port or base.port}
        if base.ifaces or not self.installed:
            kw["ifaces"] = base.ifaces + tuple(i for i in self.ifaces if i not in base.ifaces)
        fams = self.listener_families(kw["port"])
        if fams:
            kw["ipv6"] = 6 in fams
        elif not self.installed:
            kw["ipv6"] = sockopt.ipv6_available()
        kw.update(changes)
        if not kw.get("ipv6", base.ipv6):
            kw["exclude"] = [n for n in base.exclude if n.version == 4]
        return dataclasses.replace(base, **kw)

    def rules_fix(self, **changes):
        return shlex.join(["relay", "rules", "apply", *rules.cli_args(self.wanted(**changes))])

    # ---- interfaces --------------------------------------------------------------------

    @cached_property
    def links(self):
        """{name: `ip -j -d link show` entry} of this network namespace."""
        r = self.run(["ip", "-j", "-d", "link", "show"])
        if r.returncode != 0:
            raise OSError(f"ip link show failed: {r.stderr.strip()}")
        return {link["ifname"]: link for link in json.loads(r.stdout or "[]")}

    @cached_property
    def scope(self):
        """The interfaces clients come in on: --iface, and those the rules act on (every
        one but lo when the rules name none)."""
        pats = self.installed.ifaces if self.installed else ()
        names = [n for n in self.links if n != "lo" and
                 (any(_iface_match(p, n) for p in pats) if pats else not self.ifaces)]
        return sorted(set(names) | set(self.ifaces))

    def udp_bound(self, port):
        """Is any UDP socket of this namespace bound to port (/proc/net/udp, udp6)?"""
        for table in ("net/udp", "net/udp6"):
            for line in (self.read(table) or "").splitlines()[1:]:
                fields = line.split()
                if len(fields) > 1 and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
        return False


# ---- the checks, in the order they are printed ------------------------------------------

def _not_applicable(f, needs):
    """Why a check that needs a TPROXY setup ("tproxy") or installed rules too ("rules")
    does not apply, or None when it does."""
    if not f.tproxy:
        return "not needed: no redir listener (a forward setup needs no TPROXY)" if f.relay \
            else "not checked: no relay and no rules to check"
    if needs == "rules" and f.installed is None:
        return "not checked: no rules installed"
    return None


CHECKS = []


def check(name, needs=None):
    """Register fn(facts) -> (ok, message, fix) as the check ``name``. ``needs``: "tproxy"
    (only a TPROXY setup is checked) or "rules" (installed rules too); otherwise the check
    says why it does not apply. What it cannot read becomes its problem, not a crash."""
    def register(fn):
        def run(facts):
            try:
                why = needs and _not_applicable(facts, needs)
                return Check(name, *(good(why) if why else fn(facts)))
            except FileNotFoundError as e:
                return Check(name, False, f"could not check: {e.filename}: not found",
                             "install iproute2 and nftables")
            except (OSError, RulesError, ValueError) as e:
                return Check(name, False, f"could not check: {e}", AS_ROOT)
        run.name = name
        CHECKS.append(run)
        return run
    return register


@check("kernel.tproxy")
def check_kernel_tproxy(f):
    probe = dataclasses.replace(f.wanted(), nft_table=PROBE_TABLE)
    r = f.run(["nft", "-c", "-f", "-"], input=rules.render_nft(probe))
    if r.returncode == 0:
        return good(f"the kernel takes the TPROXY ruleset (nft -c: tproxy, fib, sets; "
                    f"{_fams({4, 6} if probe.ipv6 else {4})})")
    err = _nft_error(r.stderr)
    if "not permitted" in err:
        return bad(f"nft -c: {err}", AS_ROOT)
    return bad(f"the kernel refuses the TPROXY ruleset (nft -c): {err}",
               "modprobe -a nft_tproxy nf_tproxy_ipv4 nf_tproxy_ipv6 nft_fib_inet "
               "(OpenWrt: opkg install kmod-nft-tproxy)")


def _options_check(options, what, fix):
    """getsockopt each (family, level, option, name) on a throwaway socket: does the
    kernel know it? (Families this host lacks are not probed.)"""
    unknown, off = [], set()
    for family, level, option, name in options:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                try:
                    s.getsockopt(level, option)
                except OSError as e:
                    unknown.append(f"{name} ({e.strerror})")
        except OSError:
            off.add(family)
    if unknown:
        return bad(f"the kernel does not know {', '.join(unknown)}: {what}", fix)
    note = " (IPv6 is off here: IPv6 options not probed)" if socket.AF_INET6 in off else ""
    return good(f"the kernel knows {', '.join(o[3] for o in options)}{note}")


@check("kernel.sockets")
def check_kernel_sockets(f):
    v4, v6 = (socket.AF_INET, socket.IPPROTO_IP), (socket.AF_INET6, socket.IPPROTO_IPV6)
    return _options_check(
        [(*v4, sockopt.IP_TRANSPARENT, "IP_TRANSPARENT"),
         (*v6, sockopt.IPV6_TRANSPARENT, "IPV6_TRANSPARENT"),
         (*v4, sockopt.IP_RECVORIGDSTADDR, "IP_RECVORIGDSTADDR"),
         (*v6, sockopt.IPV6_RECVORIGDSTADDR, "IPV6_RECVORIGDSTADDR")],
        "relay redir cannot receive TPROXY'd datagrams and their original destination",
        "a newer kernel (IPV6_TRANSPARENT and IPV6_RECVORIGDSTADDR came in Linux 2.6.37)")


@check("kernel.offload")
def check_kernel_offload(f):
    udp = (socket.AF_INET, sockopt.SOL_UDP)
    return _options_check(
        [(*udp, sockopt.UDP_SEGMENT, "UDP_SEGMENT"), (*udp, sockopt.UDP_GRO, "UDP_GRO")],
        "runs of datagrams cannot leave as one segmentation-offload send (--offload auto "
        "stays off, --offload on is refused)",
        "Linux 5.0 or later (UDP_SEGMENT came in 4.18, UDP_GRO in 5.0)")


@check("relay")
def check_relay(f):
    if f.relay is not None:
        desc = ", ".join(f"{lc['name']} ({lc['mode']} {lc['listen']})" for lc in f.listeners)
        if f.port_given and all(f.listen_of(lc)[1] != f.port for lc in f.listeners):
            return bad(f"the relay at {f.control} has no listener on port {f.port} "
                       f"(it has {desc or 'none'})", f"relay redir --listen '[::]:{f.port}'")
        return good(f"relay pid {f.relay['pid']} answers at {f.control}: "
                    f"{len(f.relay['workers'])} worker(s), {desc}")
    if f.port is None:
        return bad(f"{f.relay_error}, and no rules are installed: nothing to check",
                   "relay doctor --control PATH (the running relay's --control) or "
                   "relay doctor --port PORT")
    if f.udp_bound(f.port):
        return good(f"a UDP socket is bound to port {f.port}, but {f.relay_error}: its "
                    f"settings are not checked (give --control)")
    return bad(f"nothing listens on UDP port {f.port}, and {f.relay_error}",
               f"relay redir --listen '[::]:{f.port}'")


@check("rules", needs="tproxy")
def check_rules(f):
    t = f"nft table inet {f.nft_table}"
    if f.installed is None:
        if "not permitted" in f.rules_error:
            return bad(f"cannot read {t}: {f.rules_error}", AS_ROOT)
        if "was not created by relay rules" in f.rules_error:
            return bad(f.rules_error, f.rules_fix(nft_table="relay_tproxy"))
        if f.rules_error:
            return bad(f.rules_error, f.rules_fix())
        return bad(f"{t} is not installed: nothing sends UDP to port {f.port}", f.rules_fix())
    o = f.installed
    ifaces = ", ".join(o.ifaces) if o.ifaces else "every interface but lo"
    return good(f"{t}: UDP from {ifaces} to port {o.port} ({_fams(f.families)}), mark "
                f"{o.mark:#x}, skip mark {o.skip_mark:#x}")


@check("rules.listener", needs="rules")
def check_rules_listener(f):
    if f.relay is None:
        return good(f"not checked: no relay answers at {f.control} (its listeners are unknown)")
    o = f.installed
    here = [lc for lc in f.redirs if f.listen_of(lc)[1] == o.port]
    if not here:
        ports = ", ".join(lc["listen"] for lc in f.redirs) or "none"
        return bad(f"the rules send UDP to port {o.port}, but no redir listener is there (redir "
                   f"listeners: {ports}): redirected datagrams reach no socket", f.rules_fix())
    fams = f.listener_families(o.port)
    listen = ", ".join(lc["listen"] for lc in here)
    if 4 not in fams:
        return bad(f"the rules redirect IPv4 to port {o.port}, but {listen} takes IPv6 only: "
                   f"IPv4 datagrams are dropped", f"relay redir --listen '[::]:{o.port}'")
    if f.families - fams:
        return bad(f"the rules redirect IPv6 to port {o.port}, but {listen} takes IPv4 only: "
                   f"IPv6 datagrams are dropped (or have the relay listen on [::]:{o.port})",
                   f.rules_fix(ipv6=False))
    if fams - f.families:
        return bad(f"{listen} takes IPv6 too, but the rules redirect IPv4 only (--no-ipv6): "
                   f"IPv6 UDP passes unredirected", f.rules_fix(ipv6=True))
    return good(f"the rules send {_fams(fams)} UDP to port {o.port}, where {listen} listens")


@check("rules.iface", needs="rules")
def check_rules_iface(f):
    absent = [i for i in f.ifaces if i not in f.links]
    if absent:
        return bad(f"no interface {', '.join(absent)} here (interfaces: "
                   f"{', '.join(n for n in f.links if n != 'lo')})", "ip link show")
    pats = f.installed.ifaces
    if not pats:
        return good(f"the rules act on every interface but lo ({', '.join(f.scope)})")
    outside = [i for i in f.ifaces if not any(_iface_match(p, i) for p in pats)]
    if outside:
        return bad(f"the rules act only on UDP from {', '.join(pats)}, not from "
                   f"{', '.join(outside)}", f.rules_fix())
    if not f.scope:
        return bad(f"the rules act only on UDP from {', '.join(pats)}, and no such interface "
                   f"exists here: nothing is redirected (IFACE below: where clients come in)",
                   f.rules_fix(ifaces=("IFACE",)))
    return good(f"the rules act on {', '.join(pats)} (here: {', '.join(f.scope)})")


def _ip_cmds(opts, versions, kind):
    return "; ".join(shlex.join(c) for c in rules.render_ip(dataclasses.replace(opts, ipv6=True))
                     if int(c[1][1]) in versions and c[2] == kind)


@check("ip-rule", needs="rules")
def check_ip_rule(f):
    o = f.installed
    tables = f.tables
    missing = sorted(f.families - set(tables))
    if missing:
        which = " and ".join(f"`ip -{v} rule`" for v in missing)
        return bad(f"no {which} sends fwmark {o.mark:#x} to a routing table: the marked "
                   f"datagrams are forwarded instead of delivered to the relay",
                   _ip_cmds(o, missing, "rule"))
    shown = ", ".join(f"IPv{v} table {t}" for v, t in sorted(tables.items()))
    return good(f"fwmark {o.mark:#x} is looked up in a table of its own ({shown})")


@check("local-route", needs="rules")
def check_local_route(f):
    o = f.installed
    tables = f.tables
    missing, fixes = [], []
    for v in sorted(f.families):
        opts = dataclasses.replace(o, table=tables.get(v, o.table))
        if not rules.find_routes(f.runner, opts, v, tagged=False):
            missing.append(f"IPv{v} in table {opts.table}")
            fixes.append(_ip_cmds(opts, [v], "route"))
    if missing:
        lo_down = "UP" not in f.links.get("lo", {}).get("flags", ["UP"])
        fix = "; ".join((["ip link set lo up"] if lo_down else []) + fixes)
        return bad(f"no `local default dev lo` route {' and '.join(missing)}: marked datagrams "
                   f"are not delivered locally" + (" (lo is down)" if lo_down else ""), fix)
    shown = ", ".join(f"IPv{v} table {tables.get(v, o.table)}" for v in sorted(f.families))
    return good(f"local default route dev lo ({shown})")


@check("rp_filter", needs="tproxy")
def check_rp_filter(f):
    every = _int(f.read("sys/net/ipv4/conf/all/rp_filter"))
    values = {i: _int(f.read(f"sys/net/ipv4/conf/{i}/rp_filter")) for i in f.scope}
    strict = [i for i, v in values.items() if max(every, v) == 1]
    shown = ", ".join(f"{i} {v}" for i, v in values.items())
    if strict:
        keys = (["all"] if every == 1 else []) + [i for i in strict if values[i] == 1]
        return bad(f"strict reverse-path filtering on {', '.join(strict)} (rp_filter: all "
                   f"{every}, {shown}): redirected datagrams whose source is not routed back "
                   f"out the interface they came in on are dropped after TPROXY; TPROXY "
                   f"setups use loose mode (2)",
                   "sysctl -w " + " ".join(f"net.ipv4.conf.{k.replace('.', '/')}.rp_filter=2"
                                           for k in keys))
    return good(f"no strict rp_filter (all {every}, {shown or 'no interface'})")


@check("br_netfilter", needs="tproxy")
def check_br_netfilter(f):
    keys = {4: "bridge-nf-call-iptables", 6: "bridge-nf-call-ip6tables"}
    values = {keys[v]: f.read(f"sys/net/bridge/{keys[v]}") for v in sorted(f.families)}
    if all(v is None for v in values.values()):
        return good("br_netfilter is not loaded")
    bridged = [i for i in f.scope if _bridged(f.links.get(i))]
    if not bridged:
        return good(f"no bridged interface among {', '.join(f.scope) or 'the interfaces'}")
    on = [k for k, v in values.items() if v == "1"]
    if on:
        return bad(f"{', '.join(bridged)} bridged and {' and '.join(on)} = 1: datagrams entering "
                   f"a bridge pass the IP hooks in bridge context and TPROXY'd ones never reach "
                   f"the relay's socket", "sysctl -w " + " ".join(f"net.bridge.{k}=0" for k in on))
    return good(f"{', '.join(bridged)} bridged, {' and '.join(values)} = 0")


@check("mark-loop", needs="rules")
def check_mark_loop(f):
    if f.relay is None:
        return good(f"not checked: no relay answers at {f.control} (its --mark is unknown)")
    o = f.installed
    for lc in f.redirs:
        mark, what = lc["mark"], f"listener {lc['name']} (redir {lc['listen']})"
        if mark == o.mark:
            return bad(f"{what} marks its upstream traffic {mark:#x}, the mark the rules give "
                       f"redirected datagrams: the ip rule routes the relay's own datagrams to "
                       f"the local table, they never leave",
                       f"restart it with --mark {o.skip_mark} (the rules' skip mark)")
        if mark != o.skip_mark:
            said = f"marks its upstream traffic {mark:#x}" if mark else "does not mark its traffic"
            fix = f.rules_fix(skip_mark=mark) if mark else \
                f"restart it with --mark {o.skip_mark} (the rules' skip mark)"
            return bad(f"{what} {said}, but the rules skip mark {o.skip_mark:#x}: its datagrams "
                       f"are redirected again when they come back in through the router (a "
                       f"veth, a tunnel)", fix)
    return good(f"every redir listener marks its traffic {o.skip_mark:#x}, the rules' skip mark")


@check("capabilities")
def check_capabilities(f):
    problems, fixes, checked = [], [], []
    if not effective_capabilities("self", proc=f.proc) & (1 << CAP_NET_ADMIN):
        problems, fixes = ["relay doctor runs without CAP_NET_ADMIN (it cannot read nft)"], \
            [AS_ROOT]
    for w in (f.relay or {}).get("workers", []):
        if w["pid"]:
            caps = effective_capabilities(w["pid"], proc=f.proc)
            lack = [c for c in w["capabilities"] if not caps & (1 << CAP_NUMBERS[c])]
            who = f"worker {w['index']} (pid {w['pid']})"
            if lack:
                problems.append(f"{who} lacks {', '.join(lack)}, which its listeners need")
            checked.append(f"{who}: {', '.join(w['capabilities']) or 'none'}")
    if len(problems) > len(fixes):
        fixes.append("restart the relay as root, or with these capabilities (docs/systemd.md)")
    if problems:
        return bad("; ".join(problems), "; ".join(fixes))
    return good("this process has CAP_NET_ADMIN" + (
        f"; the workers have what their listeners need ({'; '.join(checked)})" if checked else ""))


def _fds_needed(listeners):
    return FD_SPARE + sum(lc["max_associations"] + (lc["transparent_cache"]
                                                    if lc["mode"] == "redir" else 0)
                          for lc in listeners)


def _soft_nofile(f, pid):
    for line in (f.read(f"{pid}/limits") or "").splitlines():
        if line.startswith("Max open files"):
            soft = line.split()[3]
            return None if soft == "unlimited" else int(soft)
    raise OSError(f"no 'Max open files' in {f.proc}/{pid}/limits")


@check("fd-limit")
def check_fd_limit(f):
    by_name = {lc["name"]: lc for lc in f.listeners}
    rows = []                               # (who, soft limit, descriptors needed)
    for w in (f.relay or {}).get("workers", []):
        if w["pid"]:
            rows.append((f"worker {w['index']} (pid {w['pid']})", _soft_nofile(f, w["pid"]),
                         _fds_needed([by_name[n] for n in w["listeners"] if n in by_name])))
    need, who = max((r[2] for r in rows), default=None), "a relay started from here"
    if need is None:                        # nothing running: a redir with the defaults
        need, who = _fds_needed([{**mode_defaults("redir"), "mode": "redir"}]), \
            "a redir with the default --max-associations started from here"
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    rows.append((f"this process ({who})",
                 None if soft == resource.RLIM_INFINITY else soft, need))
    short = [r for r in rows if r[1] is not None and r[1] < r[2]]
    shown = "; ".join(f"{who}: {'unlimited' if lim is None else lim} for {n} needed"
                      for who, lim, n in rows)
    if short:
        need = max(r[2] for r in short)
        nr_open = _int(f.read("sys/fs/nr_open"), need)
        fix = (f"sysctl -w fs.nr_open={need}; " if nr_open < need else "") + \
            f"ulimit -n {need}, then start the relay (systemd: LimitNOFILE={need}; or a " \
            f"lower --max-associations)"
        return bad(f"descriptor limit below --max-associations + {FD_SPARE} (one descriptor "
                   f"per association; beyond the limit new flows are refused, assoc_refused): "
                   f"{shown}", fix)
    return good(shown)


@check("forwarding", needs="tproxy")
def check_forwarding(f):
    keys = {4: ("net.ipv4.ip_forward", "sys/net/ipv4/ip_forward"),
            6: ("net.ipv6.conf.all.forwarding", "sys/net/ipv6/conf/all/forwarding")}
    off = [v for v in sorted(f.families) if f.read(keys[v][1]) != "1"]
    if off:
        return bad(f"{_fams(off)} forwarding is off ({', '.join(keys[v][0] for v in off)} = 0): "
                   f"the router forwards nothing the rules leave alone (other protocols, "
                   f"excluded and local ranges)",
                   "sysctl -w " + " ".join(f"{keys[v][0]}=1" for v in off))
    return good(f"{_fams(f.families)} forwarding on")


from relay import doctor_tun  # noqa: E402,F401  (registers the "tun" check)


def run_checks(facts):
    return [run(facts) for run in CHECKS]


# ---- command line ------------------------------------------------------------------------

def format_text(checks):
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        line = f"{'ok' if c.ok else 'FAIL':4}  {c.name.ljust(width)}  {c.message}"
        lines.append(line + (f"; fix: {c.fix}" if not c.ok and c.fix else ""))
    failed = [c.name for c in checks if not c.ok]
    lines.append(f"relay doctor: {len(failed)} problem(s): {', '.join(failed)}" if failed else
                 f"relay doctor: all {len(checks)} checks ok")
    return "\n".join(lines) + "\n"


def run_cli(args, runner=subprocess.run, proc="/proc", out=None, err=None):
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        ifaces = rules.split_values(args.iface)
        if ifaces:
            RulesOptions(1, ifaces=ifaces)          # the same names relay rules takes
        RulesOptions(1, nft_table=args.nft_table)
    except (ValueError, TypeError) as e:
        print(f"relay doctor: {e}", file=err)
        return 2
    facts = Facts(port=args.port, ifaces=ifaces, control=args.control,
                  nft_table=args.nft_table, runner=runner, proc=proc,
                  tun_dev=getattr(args, "dev", None))
    checks = run_checks(facts)
    if args.json:
        json.dump({"ok": all(c.ok for c in checks), "port": facts.port,
                   "interfaces": facts.__dict__.get("scope"),      # if it could be read
                   "checks": [c._asdict() for c in checks]}, out, indent=2)
        out.write("\n")
    else:
        out.write(format_text(checks))
    return 0 if all(c.ok for c in checks) else 1


def add_cli(subparsers):
    """Register ``relay doctor`` on an argparse subparsers object."""
    p = subparsers.add_parser(
        "doctor",
        help="check a forward / TPROXY setup: what is wrong and the command that fixes it",
        description="Check what a forward or TPROXY setup needs and print one line per check: "
                    "ok, or the problem and the command that fixes it. Reads only (nft list, "
                    "nft -c, ip ... show, /proc, getsockopt); changes nothing. Exit status: 0 "
                    "all ok, 1 a problem, 2 a usage error.",
        epilog="example: relay doctor --iface br-lan   (the running relay's listeners are "
               "read through its control socket)")
    p.add_argument("--port", type=rules.port_arg, default=None,
                   help="the TPROXY port to check (default: the running relay's redir "
                        "listener, else the installed rules' port)")
    p.add_argument("--iface", action="append", default=[], metavar="IFACE",
                   help="interface the clients come in on; repeatable or comma-separated "
                        "(default: the interfaces the rules act on)")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--dev", default=None, metavar="NAME",
                   help="a TUN device to check (default: the running relay's relay tun "
                        "listeners)")
    p.add_argument("--control", default=DEFAULT_CONTROL, metavar="PATH",
                   help=f"the running relay's control socket (default: {DEFAULT_CONTROL})")
    p.add_argument("--nft-table", default="relay", metavar="NAME",
                   help="name of the nftables table relay rules installed (default: relay)")
    p.set_defaults(func=run_cli)
    return p
