"""Spoofed-datagram send rate: RawSender.send_many against the other ways to do it.

    python bench/bench_rawsend.py [--count N] [--rounds R] [--size B] [--family 4|6]
                                  [--quick] [--smoke] [--json out.json]

Contenders, each sending COUNT identical-size spoofed UDP datagrams from a raw socket:

  c-sendmmsg        bench/c/raw_sendmmsg.c: prebuilt packets, sendmmsg of 64 — the limit
  relay-send_many   relay.packet._rawsock.RawSender.send_many (Cython), headers built per packet
  pure-send_many    the pure-Python fallback (relay.packet.pure.rawsock), fewer datagrams
  python-sendto     a Python loop of socket.sendto over prebuilt packets
  scapy-send        scapy's send() over L3RawSocket, few datagrams (it is slow)

Every run is a fresh process in namespace ``a``, sending over a veth pair to a UDP sink
socket in namespace ``b`` (bound, never read: the kernel drops what does not fit its
buffer). The rate is datagrams sent / the sender's own timed loop; the counters of
``b`` (/proc/net/snmp, snmp6: IP datagrams delivered, UDP checksum errors) give how
many arrived and whether any checksum was bad.
Each run also reports datagrams per CPU-second of the sender (user+sys from getrusage
over the timed loop; on veth the receive side runs in the sender's softirq and is
charged to it too): on a shared machine this is steadier than the wall-clock rate.
Contenders alternate round by round; the table reports medians, the ratio of each
median to the C loop's, and the median of the per-round ratios ("paired"). Counts and
each run's time are bounded (--timeout).
"""
import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench.cbuild import compile_c  # noqa: E402

A_ADDR = {4: "10.77.0.1", 6: "fd00:77::1"}
B_ADDR = {4: "10.77.0.2", 6: "fd00:77::2"}
SPOOF = {4: "198.51.100.7", 6: "2001:db8:77::7"}
SPORT, DPORT = 5353, 9000
BATCH = 64

# Each contender prints "sent N seconds S rate R cpu C" (C: user+sys CPU seconds of the
# timed loop, from getrusage).
_CPU = """import resource
def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime
"""

_RELAY = _CPU + r"""
import os, sys, time
if sys.argv[8] == "pure":
    os.environ["RELAY_PURE_PYTHON"] = "1"
from relay import _select
mod, native = _select.load("rawsock")
if native != (sys.argv[8] == "native"):
    sys.exit(f"wanted the {sys.argv[8]} RawSender, got native={native}")
src, dst = (sys.argv[1], int(sys.argv[2])), (sys.argv[3], int(sys.argv[4]))
size, count, batch = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
payloads = [(i.to_bytes(4, "big") + bytes((i + k) & 255 for k in range(4, size)))[:size]
            for i in range(batch)]
items = [(src, dst, payloads[i % batch]) for i in range(count)]
s = mod.RawSender(batch=batch)
c0, t0 = cpu(), time.perf_counter()
n = s.send_many(items)
t, c = time.perf_counter() - t0, cpu() - c0
print(f"sent {n} seconds {t:.6f} rate {n / t:.1f} cpu {c:.6f}")
"""

_SENDTO = _CPU + r"""
import socket, sys, time
from relay.packet.pure.rawsock import _headers
src, sport, dst, dport = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
size, count, batch = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
pkts = []
for i in range(batch):
    p = (i.to_bytes(4, "big") + bytes((i + k) & 255 for k in range(4, size)))[:size]
    pkts.append(_headers(fam == socket.AF_INET6, socket.inet_pton(fam, src), sport,
                         socket.inet_pton(fam, dst), dport, p, len(p), 64) + p)
seq = (pkts * (count // batch + 1))[:count]
s = socket.socket(fam, socket.SOCK_RAW, socket.IPPROTO_RAW)
if fam == socket.AF_INET:
    s.setsockopt(socket.IPPROTO_IP, socket.IP_HDRINCL, 1)
addr = (dst, 0)
sendto = s.sendto
c0, t0 = cpu(), time.perf_counter()
for p in seq:
    sendto(p, addr)
t, c = time.perf_counter() - t0, cpu() - c0
print(f"sent {count} seconds {t:.6f} rate {count / t:.1f} cpu {c:.6f}")
"""

_SCAPY = _CPU + r"""
import sys, time
from scapy.config import conf
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw
from scapy.sendrecv import send
from scapy.supersocket import L3RawSocket, L3RawSocket6
src, sport, dst, dport = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
size, count, batch = int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
v6 = ":" in dst
conf.L3socket, conf.L3socket6 = L3RawSocket, L3RawSocket6
pkts = []
for i in range(batch):
    p = (i.to_bytes(4, "big") + bytes((i + k) & 255 for k in range(4, size)))[:size]
    ip = IPv6(src=src, dst=dst, hlim=64) if v6 else IP(src=src, dst=dst, ttl=64, flags="DF")
    pkts.append(ip / UDP(sport=sport, dport=dport) / Raw(p))
seq = (pkts * (count // batch + 1))[:count]
sock = (L3RawSocket6 if v6 else L3RawSocket)()
c0, t0 = cpu(), time.perf_counter()
send(seq, verbose=0, socket=sock)
t, c = time.perf_counter() - t0, cpu() - c0
print(f"sent {count} seconds {t:.6f} rate {count / t:.1f} cpu {c:.6f}")
"""

CONTENDERS = ("c-sendmmsg", "relay-send_many", "pure-send_many", "python-sendto", "scapy-send")


def sh(*args, check=True, **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed: {r.stderr.strip()}")
    return r


class Pair:
    """Namespaces a and b joined by a veth pair (MTU 1500, no qdisc), sink in b."""

    def __init__(self):
        tag = f"rlraw{os.getpid()}"
        self.a, self.b = f"{tag}-a", f"{tag}-b"
        self.names = []
        self.sink = None
        try:
            for ns in (self.a, self.b):
                sh("ip", "netns", "add", ns)
                self.names.append(ns)
                self.run(ns, "ip", "link", "set", "lo", "up")
                self.run(ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
                self.run(ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
            self.run(self.a, "ip", "link", "add", "veth-a", "type", "veth", "peer", "name",
                     "veth-b", "netns", self.b)
            for ns, dev, fam in ((self.a, "veth-a", A_ADDR), (self.b, "veth-b", B_ADDR)):
                self.run(ns, "ip", "addr", "add", f"{fam[4]}/24", "dev", dev)
                self.run(ns, "ip", "addr", "add", f"{fam[6]}/64", "dev", dev, "nodad")
                self.run(ns, "ip", "link", "set", dev, "up")
            self.run(self.b, "sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0")
            self.run(self.b, "sysctl", "-qw", "net.ipv4.conf.veth-b.rp_filter=0")
            # Static neighbours: no resolution traffic inside a timed run.
            mac = self.run(self.b, "cat", "/sys/class/net/veth-b/address").stdout.strip()
            self.run(self.a, "ip", "neigh", "replace", B_ADDR[4], "lladdr", mac, "dev",
                     "veth-a", "nud", "permanent")
            self.run(self.a, "ip", "-6", "neigh", "replace", B_ADDR[6], "lladdr", mac, "dev",
                     "veth-a", "nud", "permanent")
            # The sink: bound UDP sockets that nobody reads.
            code = ("import socket, sys\n"
                    "s4 = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                    f"s4.bind(('{B_ADDR[4]}', {DPORT}))\n"
                    "s6 = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
                    f"s6.bind(('{B_ADDR[6]}', {DPORT}))\n"
                    "print('ready', flush=True)\n"
                    "sys.stdin.read()\n")
            self.sink = subprocess.Popen(["ip", "netns", "exec", self.b, sys.executable, "-c",
                                          code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True, start_new_session=True)
            if self.sink.stdout.readline().strip() != "ready":
                raise RuntimeError("the sink did not start")
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout=10.0):
        """Until a probe datagram of each family reaches the sink: datagrams sent
        while the veth link is still coming up would be lost and count as drops."""
        code = ("import socket, sys\n"
                "fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n"
                f"socket.socket(fam, socket.SOCK_DGRAM).sendto(b'probe', (sys.argv[1], {DPORT}))\n")
        for family in (4, 6):
            deadline = time.monotonic() + timeout
            while True:
                before = self.udp_counters(family)[0]
                self.run(self.a, sys.executable, "-c", code, B_ADDR[family])
                time.sleep(0.02)
                if self.udp_counters(family)[0] > before:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"IPv{family} probes do not reach the sink namespace")
                time.sleep(0.1)

    def run(self, ns, *args, **kw):
        return sh("ip", "netns", "exec", ns, *args, **kw)

    def udp_counters(self, family):
        """(arrived, UDP checksum errors) in b: IP datagrams delivered to the transport
        layer (only our traffic reaches b), and UDP datagrams with a bad checksum.
        (Udp InDatagrams would not do: it counts when the application reads.)"""
        if family == 6:
            text = self.run(self.b, "cat", "/proc/net/snmp6").stdout
            kv = dict(line.split()[:2] for line in text.splitlines() if line.strip())
            return int(kv["Ip6InDelivers"]), int(kv["Udp6InCsumErrors"])
        rows = {}
        for line in self.run(self.b, "cat", "/proc/net/snmp").stdout.splitlines():
            proto, _, rest = line.partition(":")
            rows.setdefault(proto, []).append(rest.split())
        ip = dict(zip(*rows["Ip"]))
        udp = dict(zip(*rows["Udp"]))
        return int(ip["InDelivers"]), int(udp["InCsumErrors"])

    def close(self):
        if self.sink is not None and self.sink.poll() is None:
            try:
                os.killpg(self.sink.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.sink.wait(5)
        for ns in self.names:
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            sh("ip", "netns", "del", ns, check=False)
        self.names = []


def available(name):
    """None when the contender can run here, else the reason."""
    if name == "relay-send_many":
        try:
            import relay.packet._rawsock  # noqa: F401
        except ImportError as e:
            return f"relay.packet._rawsock is not built ({e})"
    if name == "scapy-send":
        try:
            import scapy  # noqa: F401
        except ImportError:
            return "scapy is not installed"
    if name == "c-sendmmsg" and shutil.which(os.environ.get("CC", "gcc")) is None:
        return "no C compiler"
    return None


def command(name, family, size, count, exe):
    args = [SPOOF[family], SPORT, B_ADDR[family], DPORT, size, count, BATCH]
    if name == "c-sendmmsg":
        return [exe] + args
    py = [sys.executable, "-c"]
    if name == "relay-send_many":
        return py + [_RELAY] + args + ["native"]
    if name == "pure-send_many":
        return py + [_RELAY] + args + ["pure"]
    if name == "python-sendto":
        return py + [_SENDTO] + args
    if name == "scapy-send":
        return py + [_SCAPY] + args
    raise ValueError(name)


def run_one(pair, name, family, size, count, exe, timeout):
    before = pair.udp_counters(family)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = ["ip", "netns", "exec", pair.a] + [str(c) for c in command(name, family, size,
                                                                      count, exe)]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, cwd=ROOT, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.communicate()
        return {"error": f"did not finish within {timeout}s"}
    if p.returncode != 0:
        return {"error": f"exit {p.returncode}: {(err or out).strip()[-400:]}"}
    fields = out.split()
    sent, secs, rate, cpu = int(fields[1]), float(fields[3]), float(fields[5]), float(fields[7])
    # Let the last datagrams land before reading the sink's counters.
    time.sleep(0.05)
    after = pair.udp_counters(family)
    return {"sent": sent, "seconds": secs, "rate": rate, "cpu": cpu,
            "cpu_rate": sent / cpu if cpu > 0 else None,
            "arrived": after[0] - before[0], "csum_errors": after[1] - before[1]}


def bench(count=200_000, rounds=3, size=64, family=4, scapy_count=2000, pure_count=None,
          timeout=120.0, contenders=CONTENDERS, log=print):
    """Run the comparison; returns a list of row dicts (one per contender)."""
    if pure_count is None:
        pure_count = max(1, count // 4)
    counts = {"scapy-send": min(count, scapy_count), "pure-send_many": min(count, pure_count)}
    reasons = {n: available(n) for n in contenders}
    exe = compile_c(os.path.join(ROOT, "bench", "c", "raw_sendmmsg.c")) \
        if reasons.get("c-sendmmsg") is None and "c-sendmmsg" in contenders else None
    runs = {n: [] for n in contenders}
    pair = Pair()
    try:
        for r in range(rounds):
            order = [n for n in contenders if reasons[n] is None]
            # Alternate, and rotate the order so no contender always goes first.
            order = order[r % len(order):] + order[:r % len(order)] if order else order
            for name in order:
                res = run_one(pair, name, family, size, counts.get(name, count), exe, timeout)
                runs[name].append(res)
                if "error" in res:
                    log(f"  round {r + 1} {name}: {res['error']}")
                else:
                    log(f"  round {r + 1} {name:16s} {res['rate']:>12,.0f} dgram/s"
                        f"  {res['cpu_rate'] or 0:>12,.0f} dgram/CPU-s"
                        f"  arrived {res['arrived']}/{res['sent']}")
    finally:
        pair.close()
    rows = []
    for name in contenders:
        ok = [x for x in runs[name] if "error" not in x]
        row = {"section": "rawsend", "impl": name, "family": f"IPv{family}", "size": size,
               "count": counts.get(name, count), "rounds": len(ok)}
        if reasons[name]:
            row.update(status="not available", reason=reasons[name])
        elif not ok:
            row.update(status="error", reason=runs[name][0]["error"] if runs[name] else "")
        else:
            rates = [x["rate"] for x in ok]
            cpu_rates = [x["cpu_rate"] for x in ok if x["cpu_rate"]]
            row.update(status="ok" if len(ok) == len(runs[name]) else "error",
                       pps_median=statistics.median(rates), pps_min=min(rates),
                       pps_max=max(rates), rates=rates,
                       cpu_pps_median=statistics.median(cpu_rates) if cpu_rates else None,
                       cpu_rates=cpu_rates,
                       arrived=sum(x["arrived"] for x in ok) / sum(x["sent"] for x in ok),
                       csum_errors=sum(x["csum_errors"] for x in ok))
            errs = [x["error"] for x in runs[name] if "error" in x]
            if errs:
                row["reason"] = errs[0]
        rows.append(row)
    c = next((r for r in rows if r["impl"] == "c-sendmmsg" and r.get("pps_median")), None)
    for r in rows:
        r["ratio_to_c"] = (r["pps_median"] / c["pps_median"]) if c and r.get("pps_median") \
            else None
        r["cpu_ratio_to_c"] = (r["cpu_pps_median"] / c["cpu_pps_median"]) \
            if c and c.get("cpu_pps_median") and r.get("cpu_pps_median") else None
        # The same ratio taken within each round, then the median: steadier when the
        # machine's load drifts during the run.
        paired = [x["rate"] / y["rate"] for x, y in zip(runs[r["impl"]], runs["c-sendmmsg"])
                  if "error" not in x and "error" not in y] if c else []
        r["paired_ratio_to_c"] = statistics.median(paired) if paired else None
    return rows


def run(quick=False, rounds=3):
    """Entry point of ``python -m bench``: rows for IPv4 and IPv6 (IPv4 only when quick)."""
    smoke = os.environ.get("RELAY_BENCH_SMOKE") == "1"
    count = 2000 if smoke else 50_000 if quick else 200_000
    rows = []
    for family in ((4,) if quick or smoke else (4, 6)):
        rows += bench(count=count, rounds=1 if smoke else rounds, family=family,
                      scapy_count=200 if smoke else 2000, log=lambda *a: None)
    return rows


def table(rows):
    head = ("contender", "family", "count", "dgram/s (median)", "min-max", "x C loop",
            "x C paired", "dgram/CPU-s", "x C", "arrived", "csum err")
    lines = []
    for r in rows:
        if not r.get("pps_median"):
            lines.append((r["impl"], r["family"], str(r["count"]),
                          f"{r['status']}: {r.get('reason', '')}"[:70], "", "", "", "", "",
                          "", ""))
            continue
        lines.append((r["impl"], r["family"], str(r["count"]), f"{r['pps_median']:,.0f}",
                      f"{r['pps_min']:,.0f}-{r['pps_max']:,.0f}",
                      f"{r['ratio_to_c']:.2f}" if r["ratio_to_c"] is not None else "-",
                      f"{r['paired_ratio_to_c']:.2f}" if r["paired_ratio_to_c"] is not None
                      else "-",
                      f"{r['cpu_pps_median']:,.0f}" if r["cpu_pps_median"] else "-",
                      f"{r['cpu_ratio_to_c']:.2f}" if r["cpu_ratio_to_c"] is not None else "-",
                      f"{r['arrived'] * 100:.1f}%", str(r["csum_errors"])))
    widths = [max(len(x[i]) for x in [head] + lines) for i in range(len(head))]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)),
           "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(l, widths)) for l in lines]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=200_000,
                   help="datagrams per run (default 200000)")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    p.add_argument("--size", type=int, default=64, help="UDP payload bytes (default 64)")
    p.add_argument("--family", type=int, choices=(4, 6), default=4)
    p.add_argument("--scapy-count", type=int, default=2000,
                   help="datagrams per scapy run (default 2000)")
    p.add_argument("--pure-count", type=int, default=None,
                   help="datagrams per pure-Python RawSender run (default count/4)")
    p.add_argument("--only", default=",".join(CONTENDERS),
                   help="comma-separated contenders (default: all)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per run (default 120)")
    p.add_argument("--quick", action="store_true", help="50000 datagrams per run")
    p.add_argument("--smoke", action="store_true", help="tiny counts, one round")
    p.add_argument("--json", help="write the rows to this file")
    a = p.parse_args(argv)
    if a.quick:
        a.count = min(a.count, 50_000)
    if a.smoke:
        a.count, a.rounds, a.scapy_count = 2000, 1, 200
    only = tuple(n.strip() for n in a.only.split(",") if n.strip())
    bad = [n for n in only if n not in CONTENDERS]
    if bad:
        p.error(f"unknown contender(s) {', '.join(bad)}; choose from {', '.join(CONTENDERS)}")
    if not 1 <= a.count <= 10_000_000:
        p.error("--count must be 1-10000000")
    if not 1 <= a.rounds <= 50:
        p.error("--rounds must be 1-50")
    if not 0 <= a.size <= (65507 if a.family == 4 else 65527) or a.size > 1472:
        p.error("--size must be 0-1472 (the veth MTU is 1500)")
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, raw sockets)")
    print(f"raw send: IPv{a.family}, {a.size}-byte payloads, {a.count} datagrams per run, "
          f"{a.rounds} rounds, veth between two namespaces", flush=True)
    t0 = time.monotonic()
    rows = bench(count=a.count, rounds=a.rounds, size=a.size, family=a.family,
                 scapy_count=a.scapy_count, pure_count=a.pure_count, timeout=a.timeout,
                 contenders=only, log=lambda s: print(s, flush=True))
    print()
    print(table(rows))
    print(f"\n({time.monotonic() - t0:.0f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"rows": rows, "config": vars(a)}, f, indent=2)
    return 0 if all(r["status"] in ("ok", "not available") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
