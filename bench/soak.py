"""Soak: forward + redir + tunnel together, at a steady rate, for a configurable time.

    python -m bench.soak [--duration 600] [--rate 1000] [--flows 50] [--interval 10] [--json OUT]

Topology (network namespaces made here and removed at the end): client -- router -- server.
The router runs one `relay run -c` with three listeners: `forward` to the server's echo,
`redir` (TPROXY'd, raw replies) and `forward` through a `tunnel-server` on the server. The
client sends RATE datagrams/s to each of the streams (forward v4, redir v4, redir v6,
tunnel), spread over FLOWS source sockets each, with sequence numbers; every reply is
matched. Every INTERVAL seconds it samples the relay's RSS and open descriptors (supervisor
and workers) and the counters. The report: datagrams sent, received, lost per stream, and
RSS / descriptors over time. Traffic stays inside the namespaces; everything is bounded by
--duration.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tests.namespaces import (  # noqa: E402
    RTR4_CLI, SRV4, SRV6, Topology, start_echo, unavailable_reason, wait_until,
)
from tests.relayproc import RelayProcess, relay_env  # noqa: E402

CONFIG = """
[global]
workers = 2
control_socket = "{control}"

[[listener]]
name = "forward"
mode = "forward"
listen = "[::]:6000"
to = "{srv4}:5000"

[[listener]]
name = "redir"
mode = "redir"
listen = "[::]:7000"

[[listener]]
name = "tunnel"
mode = "forward"
listen = "[::]:6001"
to = "[{srv6}]:5000"
upstream = "tunnel://{srv4}:8443"
secret = "soak"
"""

# Runs in the client namespace: steady sends to each stream, replies matched by sequence.
CLIENT = r"""
import json, selectors, socket, struct, sys, time
streams = json.loads(sys.argv[1]); rate = float(sys.argv[2]); flows = int(sys.argv[3])
duration = float(sys.argv[4]); interval = float(sys.argv[5])
sel = selectors.DefaultSelector()
state = {}
for name, (host, port) in streams.items():
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks = []
    for _ in range(flows):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.setblocking(False)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sel.register(s, selectors.EVENT_READ, name)
        socks.append(s)
    state[name] = {"dst": (host, port), "socks": socks, "sent": 0, "recv": 0, "dup": 0,
                   "seen": bytearray(), "i": 0}
payload = b"s" * 100
start = time.monotonic(); next_report = start + interval; tick = 0.005
end = start + duration
while True:
    now = time.monotonic()
    if now >= end + 2.0:
        break
    if now < end:
        due = int((now - start) * rate)
        for name, st in state.items():
            while st["sent"] < due:
                seq = st["sent"]
                s = st["socks"][seq % flows]
                try:
                    s.sendto(struct.pack("!Q", seq) + payload, st["dst"])
                except (BlockingIOError, OSError):
                    pass
                st["sent"] += 1
    for key, _ in sel.select(tick):
        st = state[key.data]
        while True:
            try:
                data = key.fileobj.recv(2048)
            except (BlockingIOError, OSError):
                break
            if len(data) < 8:
                continue
            seq = struct.unpack("!Q", data[:8])[0]
            seen = st["seen"]
            if seq >= len(seen) * 8:
                seen.extend(bytes(max(1024, seq // 8 + 1 - len(seen))))
            if seen[seq >> 3] & (1 << (seq & 7)):
                st["dup"] += 1
            else:
                seen[seq >> 3] |= 1 << (seq & 7)
                st["recv"] += 1
    if now >= next_report:
        next_report += interval
        print(json.dumps({"t": round(now - start, 1), "streams": {n: {k: st[k] for k in ("sent", "recv", "dup")} for n, st in state.items()}}), flush=True)
print(json.dumps({"final": True, "streams": {n: {k: st[k] for k in ("sent", "recv", "dup")} for n, st in state.items()}}), flush=True)
"""


def tree(pid):
    try:
        p = psutil.Process(pid)
        return [p] + p.children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def sample(relay):
    procs = tree(relay._main_pid())
    rss = fds = 0
    for p in procs:
        try:
            rss += p.memory_info().rss
            fds += p.num_fds()
        except psutil.NoSuchProcess:
            pass
    return {"rss_mib": round(rss / 2**20, 1), "fds": fds, "procs": len(procs)}


def warm_up(t, streams):
    """One answered exchange per stream first, so neighbour discovery (IPv6 takes a moment
    on fresh veths) is not counted as loss of the steady state."""
    import socket
    for name, (host, port) in streams.items():
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = t.cli.socket(fam)
        s.settimeout(0.2)

        def answered():
            s.sendto(b"warm-up", (host, port))
            try:
                return s.recv(100) == b"warm-up"
            except socket.timeout:
                return False
        wait_until(answered, 10, what=f"the {name} stream to answer")
        s.close()


def run(duration, rate, flows, interval):
    reason = unavailable_reason()
    if reason:
        raise SystemExit(f"soak: {reason}")
    tmp = tempfile.mkdtemp(prefix="relay-soak-")
    control = os.path.join(tmp, "control.sock")
    cfg = os.path.join(tmp, "soak.toml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(control=control, srv4=SRV4, srv6=SRV6))
    samples = []
    with Topology() as t:
        r = subprocess.run(["ip", "netns", "exec", t.rtr.name, sys.executable, "-m", "relay",
                            "rules", "apply", "--port", "7000", "--iface", "rtr0"],
                           capture_output=True, text=True, env=relay_env(), timeout=30)
        if r.returncode:
            raise SystemExit(f"soak: rules: {r.stderr}")
        start_echo(t.srv, f"{SRV4}:5000", f"[{SRV6}]:5000")
        t.srv.popen([sys.executable, "-m", "relay", "tunnel-server", "--listen", "[::]:8443",
                     "--secret", "soak", "--allow",       # the echo is on srv's own addresses
                     f"198.51.100.0/24,2001:db8::/32,{SRV4}/32,{SRV6}/128",
                     "--workers", "1", "--control", ""],
                    env=relay_env())
        relay = RelayProcess(["run", "-c", cfg], ns=t.rtr)
        relay.control = control
        with relay:
            relay.wait_ready()
            streams = {"forward": [RTR4_CLI, 6000], "redir-v4": [SRV4, 5000],
                       "redir-v6": [SRV6, 5000], "tunnel": [RTR4_CLI, 6001]}
            warm_up(t, streams)
            client = t.cli.python(CLIENT, json.dumps(streams), str(rate), str(flows),
                                  str(duration), str(interval), text=True)
            final = None
            t0 = time.monotonic()
            for line in client.stdout:
                doc = json.loads(line)
                if doc.get("final"):
                    final = doc["streams"]
                    break
                s = sample(relay)
                s.update(t=doc["t"], streams=doc["streams"])
                samples.append(s)
                lost = {n: v["sent"] - v["recv"] for n, v in doc["streams"].items()}
                print(f"t={doc['t']:7.1f}s rss={s['rss_mib']:6.1f} MiB fds={s['fds']:4d} "
                      f"in-flight/lost so far={lost}", flush=True)
            client.wait(timeout=30)
            if final is None:
                raise SystemExit(f"soak: the client failed: {client.stderr.read()}")
            counters = relay.stats()
            end = sample(relay)
    report = {
        "command": " ".join(["python -m bench.soak", f"--duration {duration}", f"--rate {rate}",
                             f"--flows {flows}", f"--interval {interval}"]),
        "duration_s": duration, "rate_per_stream": rate, "flows_per_stream": flows,
        "streams": {n: {**v, "lost": v["sent"] - v["recv"],
                        "loss_pct": round(100.0 * (v["sent"] - v["recv"]) / max(1, v["sent"]), 4)}
                    for n, v in final.items()},
        "rss_mib": {"first": samples[0]["rss_mib"] if samples else end["rss_mib"],
                    "max": max([s["rss_mib"] for s in samples] + [end["rss_mib"]]),
                    "last": end["rss_mib"]},
        "fds": {"first": samples[0]["fds"] if samples else end["fds"],
                "max": max([s["fds"] for s in samples] + [end["fds"]]), "last": end["fds"]},
        "samples": samples,
        "counters": counters,
        "elapsed_s": round(time.monotonic() - t0, 1),
    }
    return report


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=600.0, help="seconds of traffic (default 600)")
    p.add_argument("--rate", type=float, default=1000.0,
                   help="datagrams/s sent to each of the 4 streams (default 1000)")
    p.add_argument("--flows", type=int, default=50, help="client sockets per stream (default 50)")
    p.add_argument("--interval", type=float, default=10.0, help="seconds between samples (default 10)")
    p.add_argument("--json", default=None, help="write the report here")
    a = p.parse_args(argv)
    if not (0 < a.duration <= 24 * 3600 and 0 < a.rate <= 20000 and 1 <= a.flows <= 1000):
        p.error("duration 0-86400 s, rate 0-20000/s, flows 1-1000")
    rep = run(a.duration, a.rate, a.flows, a.interval)
    print("\nstream      sent        received    lost   loss %")
    for n, v in rep["streams"].items():
        print(f"{n:10s} {v['sent']:10d} {v['recv']:12d} {v['lost']:7d} {v['loss_pct']:8.4f}")
    print(f"RSS MiB first/max/last: {rep['rss_mib']['first']}/{rep['rss_mib']['max']}/"
          f"{rep['rss_mib']['last']}   fds first/max/last: {rep['fds']['first']}/"
          f"{rep['fds']['max']}/{rep['fds']['last']}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rep, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
