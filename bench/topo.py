"""Network namespaces for the benchmark: gen -- mid -- sink over two veth pairs.

    gen   gen0  192.0.2.2/24      default via 192.0.2.1       load generator
    mid   mid0  192.0.2.1/24                                  relay under test
          mid1  198.51.100.1/24
    sink  sink0 198.51.100.2/24   default via 198.51.100.1    sink / echo

IPv4 forwarding stays off in ``mid``: a datagram reaches the sink only if the relay under
test moved it (a TPROXY rule that does not match can never leak traffic through).
``tproxy()`` installs the router side of a transparent proxy in ``mid``: an nftables
``tproxy`` rule, ``ip rule fwmark`` and ``ip route local ... table``. Everything lives in
the namespaces, so deleting them (``close()``) removes every rule, route and socket.
Namespace names carry the pid: ``cleanup_stale()`` removes those of dead bench runs.
"""
import itertools
import json
import os
import re
import shutil
import signal
import subprocess

GEN4 = "192.0.2.2"
MID4_GEN = "192.0.2.1"
MID4_SINK = "198.51.100.1"
SINK4 = "198.51.100.2"

PREFIX = "rlb"
TUN_DEV = "rlbtun0"             # the TUN device of the tun rows, in mid
_counter = itertools.count()
_NAME = re.compile(rf"^{PREFIX}(\d+)x\d+-\w+$")


def taskset(cpus):
    """argv prefix that runs a command on the CPUs ``cpus`` (none: no prefix); taskset
    execs, so the process keeps the pid Popen reports."""
    return ["taskset", "-c", ",".join(map(str, sorted(cpus)))] if cpus else []


class TopoError(RuntimeError):
    pass


def unavailable_reason():
    """Why the bench cannot build namespaces here, or None."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def sh(*args, ns=None, check=True, timeout=30):
    cmd = [str(a) for a in args]
    if ns is not None:
        cmd = ["ip", "netns", "exec", ns] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise TopoError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def _kill_ns_processes(name):
    for pid in sh("ip", "netns", "pids", name, check=False).stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _delete_ns(name):
    _kill_ns_processes(name)
    sh("ip", "netns", "del", name, check=False)


def cleanup_stale():
    """Delete bench namespaces left by runs whose process is gone (e.g. killed -9)."""
    out = sh("ip", "netns", "list", check=False).stdout
    removed = []
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = _NAME.match(name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            _delete_ns(name)
            removed.append(name)
    return removed


class Netns:
    def __init__(self, name):
        self.name = name

    def run(self, *args, check=True, timeout=30):
        return sh(*args, ns=self.name, check=check, timeout=timeout)

    def command(self, args, cpus=None):
        """argv that runs ``args`` inside this namespace, on the CPUs ``cpus`` if given
        (``ip netns exec`` and ``taskset`` exec, so the process keeps the pid Popen reports)."""
        return ["ip", "netns", "exec", self.name] + taskset(cpus) + [str(a) for a in args]

    def popen(self, args, cpus=None, **kw):
        kw.setdefault("start_new_session", True)
        return subprocess.Popen(self.command(args, cpus), **kw)

    def __repr__(self):
        return f"Netns({self.name!r})"


class BenchTopo:
    """gen -- mid -- sink. Use as a context manager or call close()."""

    def __init__(self):
        tag = f"{PREFIX}{os.getpid()}x{next(_counter)}"
        self.names = []
        try:
            self.gen = self._add(f"{tag}-gen")
            self.mid = self._add(f"{tag}-mid")
            self.sink = self._add(f"{tag}-sink")
            self._wire()
        except BaseException:
            self.close()
            raise

    def _add(self, name):
        sh("ip", "netns", "add", name)
        self.names.append(name)
        ns = Netns(name)
        ns.run("ip", "link", "set", "lo", "up")
        ns.run("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", check=False)
        ns.run("sysctl", "-qw", "net.ipv4.conf.default.rp_filter=0", check=False)
        return ns

    def _wire(self):
        g, m, s = self.gen, self.mid, self.sink
        m.run("ip", "link", "add", "mid0", "type", "veth", "peer", "name", "gen0", "netns", g.name)
        m.run("ip", "link", "add", "mid1", "type", "veth", "peer", "name", "sink0", "netns", s.name)
        for ns, dev, addr in ((g, "gen0", GEN4), (m, "mid0", MID4_GEN),
                              (m, "mid1", MID4_SINK), (s, "sink0", SINK4)):
            ns.run("ip", "addr", "add", f"{addr}/24", "dev", dev)
            ns.run("ip", "link", "set", dev, "up")
        g.run("ip", "route", "add", "default", "via", MID4_GEN)
        s.run("ip", "route", "add", "default", "via", MID4_SINK)
        m.run("sysctl", "-qw", "net.ipv4.ip_forward=0")
        # Permanent neighbour entries: the first datagrams of a run never wait for ARP.
        for a, adev, b, bdev, baddr in ((g, "gen0", m, "mid0", MID4_GEN),
                                        (m, "mid0", g, "gen0", GEN4),
                                        (m, "mid1", s, "sink0", SINK4),
                                        (s, "sink0", m, "mid1", MID4_SINK)):
            a.run("ip", "neigh", "replace", baddr, "lladdr", _mac(b, bdev), "dev", adev,
                  "nud", "permanent")

    def tproxy(self, dport, to_port, daddr=SINK4, mark=1, table=100):
        """Send UDP for daddr:dport arriving at mid to the transparent socket on to_port."""
        ruleset = (
            "table ip relaybench {\n"
            " chain pre {\n"
            "  type filter hook prerouting priority mangle; policy accept;\n"
            f"  ip daddr {daddr} udp dport {dport}"
            f" tproxy to :{to_port} meta mark set {mark} accept\n"
            " }\n"
            "}\n")
        r = subprocess.run(self.mid.command(["nft", "-f", "-"]), input=ruleset,
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            raise TopoError(f"nft tproxy rule failed: {r.stderr.strip()}")
        self.mid.run("ip", "rule", "add", "fwmark", mark, "lookup", table)
        self.mid.run("ip", "route", "add", "local", "0.0.0.0/0", "dev", "lo", "table", table)

    def untproxy(self, mark=1, table=100):
        self.mid.run("nft", "delete", "table", "ip", "relaybench", check=False)
        self.mid.run("ip", "rule", "del", "fwmark", mark, "lookup", table, check=False)
        self.mid.run("ip", "route", "flush", "table", table, check=False)

    def tun_route(self, table=110):
        """Route UDP arriving at mid from gen into the TUN device TUN_DEV (what `relay rules
        tun` sets up; persistent here, so the route exists between relay runs) and turn
        forwarding on for the replies written into it. Without a relay attached the device
        has no carrier and drops everything: nothing reaches the sink around the relay."""
        m = self.mid
        m.run("ip", "tuntap", "add", "dev", TUN_DEV, "mode", "tun", "multi_queue")
        m.run("ip", "link", "set", "dev", TUN_DEV, "up")
        m.run("ip", "route", "add", "default", "dev", TUN_DEV, "table", table)
        m.run("ip", "rule", "add", "iif", "mid0", "ipproto", "udp", "lookup", table)
        m.run("sysctl", "-qw", "net.ipv4.ip_forward=1")

    def untun(self, table=110):
        m = self.mid
        m.run("sysctl", "-qw", "net.ipv4.ip_forward=0")
        m.run("ip", "rule", "del", "iif", "mid0", "ipproto", "udp", "lookup", table,
              check=False)
        m.run("ip", "link", "del", "dev", TUN_DEV, check=False)

    def close(self):
        for name in self.names:
            _delete_ns(name)
        self.names = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_FLUSH_CT = """
import socket, struct
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)   # NETLINK_NETFILTER
# nlmsghdr: IPCTNL_MSG_CT_DELETE (2) of NFNL_SUBSYS_CTNETLINK (1), no attributes = flush
msg = struct.pack("=IHHII", 20, (1 << 8) | 2, 0x1 | 0x4, 1, 0) + struct.pack("=BBH", 2, 0, 0)
s.sendto(msg, (0, 0))
s.settimeout(2)
data = s.recv(4096)
err = struct.unpack_from("=i", data, 16)[0] if len(data) >= 20 else 0
raise SystemExit(0 if err in (0, -2) else 1)
"""


def flush_conntrack(ns):
    """Delete every IPv4 conntrack entry of namespace ns (the NAT bindings of the kernel
    anchor), through ctnetlink; True when done."""
    import sys
    r = subprocess.run(ns.command([sys.executable, "-c", _FLUSH_CT]), capture_output=True,
                       text=True, timeout=30)
    return r.returncode == 0


def _mac(ns, dev):
    return json.loads(ns.run("ip", "-j", "link", "show", "dev", dev).stdout)[0]["address"]


def udp_bound(pid, port):
    """Number of UDP sockets bound to ``port`` in the network namespace of process pid."""
    n = 0
    for table in ("udp", "udp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 2 and int(parts[1].rsplit(":", 1)[1], 16) == port:
                n += 1
    return n
