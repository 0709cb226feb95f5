"""Memory of a relay: idle, with many associations, and what --max-associations costs at
start (``python -m bench.memory``).

In the bench's namespaces (bench/topo.py: gen -- mid -- sink), for each point N a fresh
relay with one worker runs in ``mid`` and is sampled idle; a client in ``gen`` opens N flows
(one UDP socket each, from two addresses so that 100k source ports exist, one datagram
per flow, paced), the relay's association count is read, the client closes its sockets
again (the kernel counters below are machine-wide) and the relay, which keeps its
associations, is sampled again:

    rss              psutil RSS of the supervisor and of each worker (``relay`` forks one
                     worker process per --workers); fds: their open descriptors
    relay_socket_mem ``ss -m`` in mid summed over the relay's own sockets (skmem r + t + f
                     + w + o: the memory charged to each socket now)
    socket_mem       /proc/net/sockstat: UDP + TCP "mem" pages x the page size (the same
                     kind of memory, machine-wide: noisy on a shared machine)
    slab             /proc/slabinfo: bytes in the caches a socket is made of (UDP, UDPv6,
                     TCP, sock_inode_cache, filp, dentry, eventpoll_epi, eventpoll_pwq);
                     machine-wide, so run it on a quiet machine

for these relays (a fresh one for each):

    forward              relay forward --to the sink
    redir-raw            relay redir --reply raw (TPROXY rules in mid)
    redir-transparent    relay redir --reply transparent
    forward-tunnel       relay forward --upstream tunnel://  (relay tunnel-server in sink)
    forward-socks5       relay forward --upstream socks5://  (relay socks5 in sink)

``bytes_per_assoc`` = (RSS + relay_socket_mem at N - the same relay idle) / N;
``slab_per_assoc`` the kernel's part of each association beside it. An --upstream holds at
most 65536 flows per worker (relay's own cap), so its large point is 65536, not 100,000.

``prealloc`` rows: a worker's RSS right after start with --max-associations 1024, 65536
and 1,048,576 (what the tables preallocate).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

from bench import loadgen, peers, topo
from bench.cbuild import compile_c

ROOT = peers.ROOT
SINK_PORT = 9000
LISTEN = {"forward": 7000, "redir": 7001}
TUNNEL_PORT = 8443
SOCKS_PORT = 1080
SECRET = "relaybench-memory"
GEN4_B = "192.0.2.3"              # the client's second address (64k ports each)
UPSTREAM_CAP = 65536
ALLOW = f"{topo.SINK4}/32"        # the sink: the servers. own address (denied by default)
SLAB_CACHES = ("UDP", "UDPv6", "TCP", "TCPv6", "sock_inode_cache", "filp", "dentry",
               "eventpoll_epi", "eventpoll_pwq")
SCENARIOS = ("forward", "redir-raw", "redir-transparent", "forward-tunnel", "forward-socks5")
PREALLOC = (1024, 65536, 1 << 20)
FD_LIMIT = 1 << 20
CLIENT_GONE = 2.0                 # seconds for closed client sockets to leave the slab
FD_MARGIN = 1024                  # descriptors a relay needs besides its associations


# ---------------------------------------------------------------------------------------
# Reading memory

def parse_sockstat(text):
    """{"UDP": {"inuse": n, "mem": pages}, ...} from /proc/net/sockstat."""
    out = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        words = rest.split()
        vals = {}
        for k, v in zip(words[::2], words[1::2]):
            try:
                vals[k] = int(v)
            except ValueError:
                pass
        if vals:
            out[name.strip()] = vals
    return out


_SKMEM_KEYS = ("r", "t", "f", "w", "o")      # rmem, wmem alloc, forward alloc, queued, optmem


def parse_ss(text, pids):
    """(sockets, bytes) of the sockets of processes pids in ``ss -H -a -n -m -p`` output:
    the sum of each socket's skmem r + t + f + w + o (memory charged to it now)."""
    import re
    pids = {int(p) for p in pids}
    sockets = total = 0
    owned = False
    for line in text.splitlines():
        if not line.startswith(("\t", " ")):
            owned = any(int(p) in pids for p in re.findall(r"pid=(\d+)", line))
        m = re.search(r"skmem:\(([^)]*)\)", line)
        if m and owned:
            sockets += 1
            for item in m.group(1).split(","):
                k = item.rstrip("0123456789")
                if k in _SKMEM_KEYS and item[len(k):].isdigit():
                    total += int(item[len(k):])
            owned = False
    return sockets, total


def socket_mem_bytes(sockstat, page=4096):
    """Bytes of socket buffers of UDP and TCP (sockstat's "mem" is in pages)."""
    return sum(sockstat.get(p, {}).get("mem", 0) for p in ("UDP", "TCP")) * page


def parse_slabinfo(text, caches=SLAB_CACHES):
    """{cache: bytes} (active objects x object size) of the named caches."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 3 and parts[0] in caches:
            try:
                out[parts[0]] = int(parts[1]) * int(parts[3])
            except ValueError:
                pass
    return out


def per_assoc(idle, at, n):
    """The per-association figures between an idle and a loaded sample of n associations."""
    if n <= 0:
        return {}
    rss = at["rss_total"] - idle["rss_total"]
    sock = at["relay_socket_mem"] - idle["relay_socket_mem"]
    stat = at["socket_mem"] - idle["socket_mem"]
    slab = at["slab_total"] - idle["slab_total"]
    return {"rss_per_assoc": rss / n, "socket_mem_per_assoc": sock / n,
            "sockstat_mem_per_assoc": stat / n,
            "bytes_per_assoc": (rss + sock) / n, "slab_per_assoc": slab / n,
            "with_slab_per_assoc": (rss + sock + slab) / n}


def rss_tree(pid):
    """{"supervisor": rss or None, "workers": [rss, ...]} of a relay's process tree."""
    import psutil
    try:
        root = psutil.Process(pid)
        kids = root.children(recursive=True)
        if not kids:
            return {"supervisor": None, "workers": [root.memory_info().rss]}
        return {"supervisor": root.memory_info().rss,
                "workers": [k.memory_info().rss for k in kids]}
    except psutil.NoSuchProcess:
        return {"supervisor": None, "workers": []}


def fds_tree(pid):
    """Open file descriptors of a process and its descendants (a relay's sockets)."""
    import psutil
    n = 0
    try:
        procs = [psutil.Process(pid)] + psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            n += len(os.listdir(f"/proc/{p.pid}/fd"))
        except OSError:
            pass
    return n


def tree_pids(pid):
    import psutil
    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def sample(ns, pid):
    tree = rss_tree(pid)
    fds = fds_tree(pid)
    ss = ns.run("ss", "-H", "-a", "-n", "-m", "-p", "-u", "-t", check=False, timeout=120)
    nsock, sock_bytes = parse_ss(ss.stdout, tree_pids(pid))
    st = parse_sockstat(ns.run("cat", "/proc/net/sockstat").stdout)
    try:
        with open("/proc/slabinfo") as f:
            slab = parse_slabinfo(f.read())
    except OSError:
        slab = {}
    return {"rss": tree, "rss_total": (tree["supervisor"] or 0) + sum(tree["workers"]),
            "fds": fds, "relay_sockets": nsock, "relay_socket_mem": sock_bytes,
            "sockstat": st, "socket_mem": socket_mem_bytes(st, resource.getpagesize()),
            "slab": slab, "slab_total": sum(slab.values())}


# ---------------------------------------------------------------------------------------
# The client that opens flows (python -m bench.memory open-flows, run in gen)

def open_flows_main(argv):
    p = argparse.ArgumentParser(prog="python -m bench.memory open-flows")
    p.add_argument("--dst", required=True)
    p.add_argument("--src", required=True, help="comma-separated source addresses")
    p.add_argument("--rate", type=float, default=20000.0, help="new flows per second")
    a = p.parse_args(argv)
    import socket
    host, _, port = a.dst.rpartition(":")
    dst = (host.strip("[]"), int(port))
    srcs = a.src.split(",")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    socks = []
    print("ready", flush=True)
    for line in sys.stdin:          # "N": open flows until N are open; "quit": close all
        line = line.strip()
        if line == "quit":
            break
        want = int(line)
        t0, errors, start = time.monotonic(), 0, len(socks)
        while len(socks) < want:
            src = srcs[len(socks) % len(srcs)]
            s = socket.socket(socket.AF_INET6 if ":" in src else socket.AF_INET,
                              socket.SOCK_DGRAM)
            try:
                s.bind((src, 0))
                s.sendto(b"\x00m", dst)
            except OSError:
                errors += 1
                s.close()
                if errors > 1000:
                    break
                continue
            socks.append(s)
            if (len(socks) - start) % 500 == 0:
                ahead = (len(socks) - start) / a.rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        print(json.dumps({"open": len(socks), "errors": errors}), flush=True)
    for s in socks:
        s.close()
    return 0


def split_flows(n, per_proc):
    """How many flows each opener process holds for n flows in all (each holds one
    socket per flow, so at most per_proc under its fd limit)."""
    if n <= 0:
        return []
    k = -(-n // per_proc)
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


class FlowOpener:
    """Opener processes in gen (python -m bench.memory open-flows), each holding at most
    per_proc flows open; open(n) brings the total to n."""

    def __init__(self, gen, dst, srcs, rate, per_proc):
        self.gen, self.dst, self.srcs, self.rate = gen, dst, srcs, rate
        self.per_proc = per_proc
        self.procs = []                 # [proc, lines, flows held]

    def _spawn(self):
        proc = self.gen.popen([sys.executable, "-m", "bench.memory", "open-flows", "--dst",
                               f"{self.dst[0]}:{self.dst[1]}", "--src", ",".join(self.srcs),
                               "--rate", self.rate], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=ROOT)
        lines = loadgen._Lines(proc.stdout)
        self.procs.append([proc, lines, 0])
        if (lines.get(20) or "").strip() != "ready":
            raise loadgen.LoadError("the flow opener did not start")

    def open(self, n, timeout):
        shares = split_flows(n, self.per_proc)
        while len(self.procs) < len(shares):
            self._spawn()
        total, errors = 0, 0
        for entry, want in zip(self.procs, shares + [0] * len(self.procs)):
            want = max(want, entry[2])      # never fewer than a process already holds
            entry[0].stdin.write(f"{want}\n")
            entry[0].stdin.flush()
            line = entry[1].get(timeout)
            if not line:
                raise loadgen.LoadError(f"a flow opener did not open {want} flows in "
                                        f"{timeout:.0f}s")
            got = json.loads(line)
            entry[2] = got["open"]
            total += got["open"]
            errors += got["errors"]
        return {"open": total, "errors": errors}

    def close(self):
        for proc, _, _ in self.procs:
            try:
                proc.stdin.write("quit\n")
                proc.stdin.flush()
            except (OSError, ValueError):
                pass
            loadgen.stop_group(proc)
        self.procs = []


# ---------------------------------------------------------------------------------------
# Relays

def relay_command(scenario, control, max_assoc, timeout=3600):
    """argv of the relay under test and of the server it needs in the sink namespace."""
    py = [sys.executable, "-m", "relay.cli"]
    common = ["--workers", "1", "--control", control, "--log-level", "warning",
              "--max-associations", str(max_assoc), "--timeout", str(timeout)]
    sink = f"{topo.SINK4}:{SINK_PORT}"
    server = None
    if scenario.startswith("redir"):
        reply = scenario.split("-", 1)[1]
        relay = py + ["redir", "--listen", f"0.0.0.0:{LISTEN['redir']}", "--reply", reply]
    else:
        relay = py + ["forward", "--listen", f"{topo.MID4_GEN}:{LISTEN['forward']}",
                      "--to", sink]
        if scenario == "forward-tunnel":
            relay += ["--upstream", f"tunnel://{topo.SINK4}:{TUNNEL_PORT}", "--secret", SECRET]
            server = py + ["tunnel-server", "--listen", f"{topo.SINK4}:{TUNNEL_PORT}",
                           "--secret", SECRET, "--allow", ALLOW, "--log-level", "warning",
                           "--max-associations", str(max_assoc), "--timeout", str(timeout),
                           "--control", control + ".server"]
        elif scenario == "forward-socks5":
            relay += ["--upstream", f"socks5://{topo.SINK4}:{SOCKS_PORT}"]
            server = py + ["socks5", "--listen", f"{topo.SINK4}:{SOCKS_PORT}", "--insecure",
                           "--allow", ALLOW, "--log-level", "warning",
                           "--max-associations", str(max_assoc), "--timeout", str(timeout),
                           "--control", control + ".server"]
        elif scenario != "forward":
            raise ValueError(f"unknown scenario {scenario!r}")
    return relay + common, server


def points_of(scenario, points, fd_limit=FD_LIMIT):
    """The association counts measured for a scenario: an --upstream holds at most 65536
    flows (relay's cap) and no socket per flow; the others one socket per association, so
    at most the fd limit less a margin."""
    if scenario in ("forward-tunnel", "forward-socks5"):
        cap = UPSTREAM_CAP
    else:
        cap = fd_limit - FD_MARGIN
    return sorted({min(n, cap) for n in points})


def assoc_open(control):
    r = subprocess.run([sys.executable, "-m", "relay.cli", "stats", "--control", control,
                        "--json"], capture_output=True, text=True, timeout=20, cwd=ROOT)
    if r.returncode != 0:
        return None
    data = json.loads(r.stdout)
    return sum(v.get("assoc_open", 0) for v in data.get("listeners", {}).values())


def _start(ns, argv, log, port, sockets=1, kind="udp"):
    p = ns.popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    deadline = time.monotonic() + 30
    while True:
        if p.poll() is not None:
            log.flush()
            log.seek(0)
            raise peers.PeerError(f"{argv[3]} exited ({p.returncode}): {log.read()[-400:]}")
        if kind == "udp" and topo.udp_bound(p.pid, port) >= sockets:
            return p
        if kind == "tcp" and _tcp_listening(p.pid, port):
            return p
        if time.monotonic() > deadline:
            loadgen.stop_group(p)
            raise peers.PeerError(f"{argv[3]} did not bind port {port}")
        time.sleep(0.05)


def _tcp_listening(pid, port):
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                for line in f.readlines()[1:]:
                    parts = line.split()
                    if (len(parts) > 3 and parts[3] == "0A"
                            and int(parts[1].rsplit(":", 1)[1], 16) == port):
                        return True
        except OSError:
            pass
    return False


def settle(control, want, limit, quiet=1.0):
    """Wait until the relay holds ``want`` associations (or the count stops moving)."""
    deadline = time.monotonic() + limit
    prev, since = None, time.monotonic()
    while True:
        n = assoc_open(control)
        now = time.monotonic()
        if n is not None and n >= want:
            return n
        if n != prev:
            prev, since = n, now
        elif now - since > quiet or now > deadline:
            return n
        time.sleep(0.2)


def measure_scenario(bt, scenario, points, workdir, rate, fd_limit, log=print):
    """One row: for each point a fresh relay (and server), sampled idle, then with n flows
    opened and the client's sockets closed again (the slab and socket counters are
    machine-wide: the client's own sockets must not count; the relay keeps its
    associations, nothing expires within --timeout 3600)."""
    row = {"section": "memory", "scenario": scenario, "points": [], "fd_limit": fd_limit}
    pts = points_of(scenario, points, fd_limit)
    if pts != sorted(set(points)):
        row["capped"] = (f"asked {sorted(set(points))}, measured {pts}: "
                         + ("an --upstream holds at most 65536 flows per worker"
                            if scenario.startswith("forward-")
                            else f"one socket per association under a {fd_limit} fd limit"))
    if scenario.startswith("redir"):
        bt.tproxy(SINK_PORT, LISTEN["redir"])
    sink = None
    try:
        sink = loadgen.Sink(bt.sink, compile_c(os.path.join(ROOT, "bench/c/sink.c")),
                            f"{topo.SINK4}:{SINK_PORT}").start()
        for n in pts:
            point = _one_point(bt, scenario, n, max(pts) + 1024, workdir, rate, fd_limit)
            row["points"].append(point)
            row.setdefault("idle", point["idle"])
            s, i = point["sample"], point["idle"]
            log(f"   {scenario:18s} {point['associations']:7d} assoc  RSS "
                f"{s['rss_total'] / 2**20:7.1f} MiB (idle {i['rss_total'] / 2**20:.1f})  "
                f"socket mem "
                f"{(s['relay_socket_mem'] - i['relay_socket_mem']) / 2**20:+6.1f} MiB  slab "
                f"{(s['slab_total'] - i['slab_total']) / 2**20:+6.1f} MiB  "
                f"{point.get('bytes_per_assoc', 0):7.0f} B/assoc")
        row.update(status="ok", reason=None)
    except (peers.PeerError, loadgen.LoadError, topo.TopoError, OSError, ValueError,
            subprocess.SubprocessError) as e:
        row.update(status="error", reason=f"{type(e).__name__}: {e}")
        log(f"   {scenario}: ERROR {e}")
    finally:
        if sink:
            sink.stop()
        if scenario.startswith("redir"):
            bt.untproxy()
    return row


def _one_point(bt, scenario, n, max_assoc, workdir, rate, fd_limit):
    control = os.path.join(workdir, f"mem-{scenario}.sock")
    relay_argv, server_argv = relay_command(scenario, control, max_assoc)
    procs, logs, opener = [], [], None
    try:
        if server_argv:
            logs.append(open(os.path.join(workdir, f"mem-{scenario}.server.log"), "w+"))
            port = TUNNEL_PORT if "tunnel" in scenario else SOCKS_PORT
            procs.append(_start(bt.sink, server_argv, logs[-1], port, kind="tcp"))
        logs.append(open(os.path.join(workdir, f"mem-{scenario}.log"), "w+"))
        port = LISTEN["redir" if scenario.startswith("redir") else "forward"]
        relay = _start(bt.mid, relay_argv, logs[-1], port)
        procs.append(relay)
        time.sleep(1.0)
        idle = sample(bt.mid, relay.pid)
        dst = ((topo.SINK4, SINK_PORT) if scenario.startswith("redir")
               else (topo.MID4_GEN, LISTEN["forward"]))
        opener = FlowOpener(bt.gen, dst, [topo.GEN4, GEN4_B], rate,
                            per_proc=max(100, min(50000, fd_limit - FD_MARGIN)))
        got = opener.open(n, timeout=n / rate + 60)
        held = settle(control, n, limit=n / rate + 30)
        with_client = sample(bt.mid, relay.pid)
        opener.close()
        opener = None
        time.sleep(CLIENT_GONE)         # the client's sockets are freed (RCU) ...
        s = sample(bt.mid, relay.pid)
        after = assoc_open(control)     # ... and the relay still holds its associations
        assoc = min(held or 0, after if after is not None else held or 0)
        point = {"flows": n, "flows_open": got["open"], "associations": assoc,
                 "opener_errors": got["errors"], "idle": idle, "sample": s,
                 "with_client": with_client}
        if assoc < got["open"]:
            point["short"] = (f"{got['open']} flows open, the relay holds {assoc} "
                              f"(see bench/out/memory/mem-{scenario}*.log)")
        point.update(per_assoc(idle, s, assoc))
        return point
    finally:
        if opener:
            opener.close()
        for p in reversed(procs):
            loadgen.stop_group(p)
        for f in logs:
            f.close()


def measure_prealloc(bt, sizes, workdir, log=print):
    rows = []
    for n in sizes:
        control = os.path.join(workdir, f"mem-prealloc-{n}.sock")
        argv, _ = relay_command("forward", control, n)
        row = {"section": "memory", "scenario": "prealloc", "max_associations": n}
        with open(os.path.join(workdir, f"mem-prealloc-{n}.log"), "w+") as log_f:
            p = None
            try:
                p = _start(bt.mid, argv, log_f, LISTEN["forward"])
                time.sleep(1.0)
                s = sample(bt.mid, p.pid)
                row.update(status="ok", reason=None, rss=s["rss"],
                           worker_rss=max(s["rss"]["workers"] or [0]))
                log(f"   prealloc --max-associations {n:8d}: worker RSS "
                    f"{row['worker_rss'] / 2**20:7.1f} MiB")
            except (peers.PeerError, OSError) as e:
                row.update(status="error", reason=f"{type(e).__name__}: {e}")
            finally:
                if p is not None:
                    loadgen.stop_group(p)
        rows.append(row)
    base = next((r for r in rows if r["status"] == "ok"), None)
    for r in rows:
        if base and r["status"] == "ok":
            r["extra_over_smallest"] = r["worker_rss"] - base["worker_rss"]
            r["extra_per_slot"] = (r["extra_over_smallest"]
                                   / max(1, r["max_associations"] - base["max_associations"]))
    return rows


def raise_fd_limit(want):
    """Raise RLIMIT_NOFILE (soft and hard) to want if allowed (root with
    CAP_SYS_RESOURCE), else the soft limit to the hard one; every process started below
    inherits it. Returns the limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        return want
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
        return want
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard


def run(quick=False, rounds=None, duration=None, log=print, scenarios=SCENARIOS,
        points=None, prealloc=PREALLOC, rate=20000.0):
    smoke = os.environ.get("RELAY_BENCH_SMOKE") == "1"
    if points is None:
        points = (200, 1000) if smoke else (1000, 10000) if quick else (10000, 100000)
    reason = topo.unavailable_reason()
    if reason:
        raise RuntimeError(f"cannot run the memory bench: {reason}")
    fd_limit = raise_fd_limit(FD_LIMIT)
    topo.cleanup_stale()
    workdir = os.path.join(ROOT, "bench", "out", "memory")
    os.makedirs(workdir, exist_ok=True)
    rows = []
    bt = topo.BenchTopo()
    try:
        bt.gen.run("ip", "addr", "add", f"{GEN4_B}/24", "dev", "gen0")
        bt.gen.run("sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
        for scen in scenarios:
            rows.append(measure_scenario(bt, scen, points, workdir, rate, fd_limit, log))
        rows += measure_prealloc(bt, prealloc, workdir, log)
    finally:
        bt.close()
    return rows


def table(rows):
    out = [f"{'scenario':18s} {'assoc':>7s} {'RSS MiB':>8s} {'sockmem MiB':>11s} "
           f"{'slab MiB':>8s} {'B/assoc':>8s} {'+slab B/assoc':>13s} {'relay fds':>9s}",
           "-" * 90]
    for r in rows:
        if r["scenario"] == "prealloc":
            continue
        if r["status"] != "ok":
            out.append(f"{r['scenario']:18s} {r['status']}: {r['reason']}")
            continue
        if r.get("capped"):
            out.append(f"{r['scenario']:18s} note: {r['capped']}")
        i = r["idle"]
        out.append(f"{r['scenario']:18s} {'idle':>7s} {i['rss_total'] / 2**20:8.1f} "
                   f"{i['relay_socket_mem'] / 2**20:11.2f} {'-':>8s} {'-':>8s} {'-':>13s} "
                   f"{i.get('fds', 0):9d}")
        for p in r["points"]:
            s, i = p["sample"], p.get("idle", i)
            if p.get("short"):
                out.append(f"{'':18s} note: {p['short']}")
            out.append(f"{'':18s} {p['associations']:7d} {s['rss_total'] / 2**20:8.1f} "
                       f"{s['relay_socket_mem'] / 2**20:11.2f} "
                       f"{(s['slab_total'] - i['slab_total']) / 2**20:8.1f} "
                       f"{p.get('bytes_per_assoc', 0):8.0f} "
                       f"{p.get('with_slab_per_assoc', 0):13.0f} {s.get('fds', 0):9d}")
    pre = [r for r in rows if r["scenario"] == "prealloc"]
    if pre:
        out.append("")
        out.append("--max-associations   worker RSS at start   over the smallest")
        for r in pre:
            if r["status"] != "ok":
                out.append(f"{r['max_associations']:>18d}   {r['status']}: {r['reason']}")
            else:
                out.append(f"{r['max_associations']:>18d}   {r['worker_rss'] / 2**20:13.1f} MiB"
                           f"   {r.get('extra_over_smallest', 0) / 2**20:9.1f} MiB")
    out.append("RSS = supervisor + worker; sockmem = ss -m of the relay's sockets; "
               "slab = socket caches in /proc/slabinfo (machine-wide) over idle, the client's "
               "sockets closed (with an --upstream it includes the server's sockets in sink: "
               "see relay fds); each point a fresh relay; "
               "B/assoc = (RSS + sockmem - idle) / associations")
    return "\n".join(out)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["open-flows"]:
        return open_flows_main(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__.split("\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="1,000 and 10,000 associations")
    g.add_argument("--smoke", action="store_true", help="200 and 1,000 associations")
    p.add_argument("--points", default=None,
                   help="comma-separated association counts (default 10000,100000)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma-separated, of {', '.join(SCENARIOS)}")
    p.add_argument("--prealloc", default=",".join(map(str, PREALLOC)),
                   help="--max-associations values of the start-cost rows ('' for none)")
    p.add_argument("--rate", type=float, default=20000.0, help="new flows per second")
    p.add_argument("--json", default=None, help="write the rows here")
    a = p.parse_args(argv)
    scen = tuple(s for s in a.scenarios.split(",") if s)
    bad = set(scen) - set(SCENARIOS)
    if bad or not scen:
        p.error(f"--scenarios: choose from {', '.join(SCENARIOS)}")
    try:
        points = tuple(int(x) for x in a.points.split(",")) if a.points else None
        prealloc = tuple(int(x) for x in a.prealloc.split(",") if x)
    except ValueError:
        p.error("--points and --prealloc take comma-separated integers")
    if points and not all(1 <= n <= 1_000_000 for n in points):
        p.error("--points must be 1-1000000")
    if not all(1 <= n <= 1 << 24 for n in prealloc):
        p.error("--prealloc values must be 1-16777216")
    if not 100 <= a.rate <= 1e6:
        p.error("--rate must be 100-1000000")
    if a.smoke:
        os.environ["RELAY_BENCH_SMOKE"] = "1"
    rows = run(quick=a.quick, scenarios=scen, points=points, prealloc=prealloc, rate=a.rate)
    from bench.latency import emit
    return emit(rows, table(rows), a.json)


if __name__ == "__main__":
    sys.exit(main())
