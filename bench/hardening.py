"""python -m bench.hardening: each attack of the hardening issue, applied to a running relay,
and what held (bench/README.md "Hardening" has the figures and the command).

Loopback only (127.0.0.0/8 sources stand for the attacker and the legitimate client), every
load bounded in count and time, every process stopped at the end. Figures are counts and
latencies of the legitimate client during the attack, the worker's CPU share, supervisor
threads, log lines; the relay's own counters say what it refused or evicted.

    python -m bench.hardening [--only NAME[,NAME]] [--json FILE]
"""
import argparse
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from relay import proto  # noqa: E402
from relay.supervisor import query  # noqa: E402


# --------------------------------------------------------------------------- plumbing

def free_port(kind=socket.SOCK_STREAM):
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values, q):
    if not values:
        return float("nan")
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q / 100 * (len(v) - 1))))]


class Relay:
    """`relay MODE ARGS` with a control socket in a private directory; stopped on close."""

    def __init__(self, args, prefix=(), workers=1, log_level="info"):
        self.dir = tempfile.mkdtemp(prefix="relay-bench-")
        self.control = os.path.join(self.dir, "control.sock")
        self.log_path = os.path.join(self.dir, "stderr.log")
        self._log = open(self.log_path, "w+")
        env = dict(os.environ, PYTHONPATH=ROOT)
        argv = [*prefix, sys.executable, "-m", "relay", *map(str, args), "--control",
                self.control, "--workers", str(workers), "--log-level", log_level]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=self._log,
                                     stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay {args[0]} exited: {self.log()[-2000:]}")
            try:
                self.stats()
                break
            except (OSError, RuntimeError, ValueError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"relay {args[0]} did not start: {self.log()[-2000:]}")
                time.sleep(0.1)

    def stats(self):
        return json.loads(query(self.control))["total"]

    def log(self):
        self._log.flush()
        with open(self.log_path) as f:
            return f.read()

    def workers(self):
        return [psutil.Process(c.pid) for c in psutil.Process(self.proc.pid).children()]

    def threads(self):
        return psutil.Process(self.proc.pid).num_threads()

    def close(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)
                self.proc.wait(5)
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Echo:
    """A UDP echo server on 127.0.0.1 in a thread (bounded: stops on close)."""

    def __init__(self):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.addr = self.sock.getsockname()
        self.stop = False
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self):
        while not self.stop:
            try:
                d, a = self.sock.recvfrom(65535)
                self.sock.sendto(d, a)
            except socket.timeout:
                pass
            except OSError:
                return

    def close(self):
        self.stop = True
        self.t.join(2)
        self.sock.close()


def cpu_seconds(procs):
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def udp_rtt(dst, src_ip="127.0.0.1", payload=b"legit", timeout=2.0):
    """One round trip from a fresh socket: seconds, or None when nothing came back."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((src_ip, 0))
        s.settimeout(timeout)
        t0 = time.perf_counter()
        s.sendto(payload, dst)
        try:
            d, _ = s.recvfrom(65535)
        except socket.timeout:
            return None
        return time.perf_counter() - t0 if d == payload else None


def tunnel_rtt(addr, echo, tag=b"legit", timeout=3.0):
    """Connect, handshake (mux, no secret) and one framed round trip: seconds or None."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection(addr, timeout=timeout) as s:
            s.settimeout(timeout)
            hs = proto.ClientHandshake(cmd=proto.CMD_UDP_TUN_MUX)
            s.sendall(hs.start())
            while not hs.done:
                d = s.recv(4096)
                if not d:
                    return None
                out = hs.feed(d)
                if out:
                    s.sendall(out)
            s.sendall(proto.encode_frame(*echo.addr, tag, flow=1))
            buf = bytearray(hs.leftover)
            while True:
                frames, used = proto.parse_frames(bytes(buf), mux=True)
                if frames:
                    return time.perf_counter() - t0 if frames[0].data == tag else None
                d = s.recv(65536)
                if not d:
                    return None
                buf += d
    except OSError:
        return None


def socks5_rtt(addr, echo, tag=b"legit", timeout=3.0):
    """SOCKS5 greeting, UDP ASSOCIATE and one datagram through the relay: seconds or None."""
    t0 = time.perf_counter()
    try:
        with socket.create_connection(addr, timeout=timeout) as ctl, \
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            ctl.settimeout(timeout)
            u.settimeout(timeout)
            u.bind(("127.0.0.1", 0))
            ctl.sendall(b"\x05\x01\x00")
            if ctl.recv(2) != b"\x05\x00":
                return None
            ctl.sendall(b"\x05\x03\x00\x01" + socket.inet_aton("127.0.0.1") +
                        struct.pack("!H", u.getsockname()[1]))
            rep = b""
            while len(rep) < 10:
                d = ctl.recv(10 - len(rep))
                if not d:
                    return None
                rep += d
            if rep[1] != 0:
                return None
            relay = (socket.inet_ntoa(rep[4:8]), struct.unpack("!H", rep[8:10])[0])
            u.sendto(proto.udp_header(*echo.addr) + tag, relay)
            got, _ = u.recvfrom(65535)
            return time.perf_counter() - t0 if got.endswith(tag) else None
    except OSError:
        return None


def ms(v):
    return None if v is None else round(v * 1000, 2)


def summary(rtts):
    ok = [r for r in rtts if r is not None]
    return {"served": f"{len(ok)}/{len(rtts)}", "p50_ms": ms(pct(ok, 50)) if ok else None,
            "p99_ms": ms(pct(ok, 99)) if ok else None}


# --------------------------------------------------------------------------- scenarios

def idle_from(addr, n, sources):
    out = []
    for i in range(n):
        s = socket.socket()
        s.bind((sources[i % len(sources)], 0))
        s.settimeout(3)
        try:
            s.connect(addr)
        except OSError:
            s.close()
            continue
        out.append(s)
    return out


SERVED = {"tunnel-server": tunnel_rtt, "socks5": socks5_rtt}


def s_descriptors(mode):
    """64 descriptors, 80 idle connections from 80 addresses: worker CPU, log lines, and a
    client served once they close (the issue saw 99 % CPU and ~36,000 lines/s)."""
    echo = Echo()
    port = free_port()
    addr = ("127.0.0.1", port)
    try:
        with Relay([mode, "--listen", f"127.0.0.1:{port}", "--allow", "127.0.0.0/8"],
                   prefix=("prlimit", "--nofile=64:64", "--")) as r:
            before = SERVED[mode](addr, echo)
            procs = r.workers()
            idle = idle_from(addr, 80, [f"127.0.0.{10 + i}" for i in range(80)])
            try:
                time.sleep(0.5)
                lines0 = len(r.log().splitlines())
                cpu0, t0 = cpu_seconds(procs), time.monotonic()
                time.sleep(3.0)
                span = time.monotonic() - t0
                cpu = (cpu_seconds(procs) - cpu0) / span
                lines = (len(r.log().splitlines()) - lines0) / span
                rejected = r.stats().get("conn_rejected", 0)
            finally:
                for s in idle:
                    s.close()
            t1 = time.monotonic()
            after = None
            while after is None and time.monotonic() - t1 < 10:
                after = SERVED[mode](addr, echo)
            return {"load": "nofile 64, 80 idle connections from 80 addresses, 3 s",
                    "worker_cpu": f"{cpu:.1%}", "log_lines_per_s": round(lines, 1),
                    "conn_rejected": rejected, "served_before": before is not None,
                    "served_after_s": round(time.monotonic() - t1, 2) if after else None}
    finally:
        echo.close()


class Holder:
    """count idle connections from one source, what the server closes opened again."""

    def __init__(self, addr, count, source="127.0.0.2"):
        self.addr, self.count, self.source = addr, count, source
        self.socks = {}
        self.poll = select.poll()
        self.reopened = 0
        self.refill()

    def refill(self):
        for fd, _ev in self.poll.poll(0):
            self.poll.unregister(fd)
            self.socks.pop(fd).close()
            self.reopened += 1
        while len(self.socks) < self.count:
            s = socket.socket()
            s.bind((self.source, 0))
            s.setblocking(False)
            s.connect_ex(self.addr)
            self.socks[s.fileno()] = s
            self.poll.register(s, select.POLLIN | select.POLLHUP | select.POLLERR)

    def close(self):
        for s in self.socks.values():
            s.close()
        self.socks.clear()


def s_handshake_slots(mode, count):
    """One address holds `count` idle connections (refilled every 0.5 s); a client from
    another address connects, handshakes and relays one datagram 10 times."""
    echo = Echo()
    port = free_port()
    addr = ("127.0.0.1", port)
    try:
        with Relay([mode, "--listen", f"127.0.0.1:{port}", "--allow", "127.0.0.0/8"]) as r:
            base = [SERVED[mode](addr, echo) for _ in range(10)]
            holder = Holder(addr, count)
            rtts = []
            try:
                for _ in range(10):
                    time.sleep(0.5)
                    holder.refill()
                    rtts.append(SERVED[mode](addr, echo))
            finally:
                holder.close()
            return {"load": f"{count} idle connections from 127.0.0.2, refilled every 0.5 s",
                    "client": summary(rtts), "client_unloaded": summary(base),
                    "conn_rejected": r.stats().get("conn_rejected", 0),
                    "attacker_reconnects": holder.reopened}
    finally:
        echo.close()


def s_metrics(n=500):
    """n half-sent HTTP requests to /metrics from one address: supervisor threads and RSS,
    and a scrape from another address during the attack."""
    port = free_port()
    echo = Echo()
    try:
        with Relay(["forward", "--listen", f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
                    "--to", f"127.0.0.1:{echo.addr[1]}", "--mark", "0",
                    "--metrics", f"127.0.0.1:{port}"]) as r:
            sup = psutil.Process(r.proc.pid)
            threads0, rss0 = sup.num_threads(), sup.memory_info().rss
            half = []
            for _ in range(n):
                s = socket.socket()
                s.bind(("127.0.0.2", 0))
                s.settimeout(3)
                try:
                    s.connect(("127.0.0.1", port))
                    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
                except OSError:
                    s.close()
                    continue
                half.append(s)
            time.sleep(0.5)
            threads1, rss1 = sup.num_threads(), sup.memory_info().rss
            scrapes = []
            for _ in range(10):
                t0 = time.perf_counter()
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=3) as c:
                        c.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
                        got = b""
                        while True:
                            d = c.recv(65536)
                            if not d:
                                break
                            got += d
                    scrapes.append(time.perf_counter() - t0 if b" 200 " in got[:20] else None)
                except OSError:
                    scrapes.append(None)
            for s in half:
                s.close()
            time.sleep(0.5)
            tracebacks = r.log().count("Traceback")
            return {"load": f"{n} half-sent requests from 127.0.0.2",
                    "threads": f"{threads0} -> {threads1}",
                    "rss_delta_kib": (rss1 - rss0) // 1024, "scrape": summary(scrapes),
                    "tracebacks": tracebacks}
    finally:
        echo.close()


def s_upstream_table(kind, cap, ports):
    """relay forward --upstream KIND with --max-associations cap: one client refreshes
    `ports` source ports (a fresh socket each, one datagram each), then a client from another
    address does 10 round trips (the issue saw every other client locked out)."""
    echo = Echo()
    sport, fport = free_port(), free_port(socket.SOCK_DGRAM)
    server = (["tunnel-server", "--insecure"] if kind == "gost" else
              ["tunnel-server", "--secret", "bench-secret"] if kind == "tunnel" else
              ["socks5"])
    url = {"tunnel": f"tunnel://127.0.0.1:{sport}", "gost": f"gost://127.0.0.1:{sport}",
           "socks5": f"socks5://127.0.0.1:{sport}"}[kind]
    up_args = ["--secret", "bench-secret"] if kind == "tunnel" else []
    try:
        with Relay(server + ["--listen", f"127.0.0.1:{sport}", "--allow", "127.0.0.0/8"]), \
                Relay(["forward", "--listen", f"127.0.0.1:{fport}", "--to",
                       f"127.0.0.1:{echo.addr[1]}", "--mark", "0", "--upstream", url,
                       "--max-associations", str(cap), *up_args]) as fwd:
            dst = ("127.0.0.1", fport)
            base = summary([udp_rtt(dst, "127.0.0.2") for _ in range(10)])
            t0 = time.monotonic()
            for i in range(ports):
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a:
                    a.bind(("127.0.0.3", 0))
                    a.sendto(b"attack %d" % i, dst)
                if i % 64 == 63:
                    time.sleep(0.01)        # bounded: a few hundred datagrams a second
            rate = ports / (time.monotonic() - t0)
            time.sleep(0.5)
            rtts = [udp_rtt(("127.0.0.1", fport), "127.0.0.2", b"legit %d" % i)
                    for i in range(10)]
            st = fwd.stats()
            return {"load": f"one address refreshing {ports} source ports at "
                            f"~{rate:.0f}/s, cap {cap}",
                    "client": summary(rtts), "client_unloaded": base,
                    "assoc_evicted": st["assoc_evicted"], "assoc_open": st["assoc_open"],
                    "drop_table_full": st["drop_table_full"],
                    "assoc_refused": st["assoc_refused"], "queue_drops": st["queue_drops"]}
    finally:
        echo.close()


SCENARIOS = {
    "upstream-tunnel": lambda: s_upstream_table("tunnel", 1024, 4096),
    "upstream-gost": lambda: s_upstream_table("gost", 256, 1024),
    "upstream-socks5": lambda: s_upstream_table("socks5", 256, 1024),
    "descriptors-tunnel": lambda: s_descriptors("tunnel-server"),
    "descriptors-socks5": lambda: s_descriptors("socks5"),
    "slots-tunnel-300": lambda: s_handshake_slots("tunnel-server", 300),
    "slots-socks5-300": lambda: s_handshake_slots("socks5", 300),
    "slots-socks5-1100": lambda: s_handshake_slots("socks5", 1100),
    "metrics-500": s_metrics,
}


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m bench.hardening", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated scenario names: "
                    + ", ".join(SCENARIOS))
    ap.add_argument("--json", help="also write the results to this file")
    a = ap.parse_args(argv)
    names = [n for n in a.only.split(",") if n] or list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenario {unknown[0]!r}")
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    results = {}
    for n in names:
        t0 = time.monotonic()
        try:
            results[n] = SCENARIOS[n]()
        except Exception as e:          # one broken scenario must not hide the others
            results[n] = {"error": f"{type(e).__name__}: {e}"}
        results[n]["seconds"] = round(time.monotonic() - t0, 1)
        print(f"{n}: {json.dumps(results[n])}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
