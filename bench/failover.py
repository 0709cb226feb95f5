"""Failover time of several upstreams: kill -> the first echo through the other upstream.

forward in rtr with two upstreams in srv (one on each of srv's addresses), one client in
cli sending a numbered datagram every 5 ms; the upstream its flow uses fails, and the time
from the failure to the first echo of a datagram sent after it is the failover time. Ways
to fail: the server killed (SIGKILL), or its path made to drop everything (an nft rule in
srv: no FIN, no RST; the background check notices). Run as root:

    python bench/failover.py [--rounds N] [--only tunnel-kill,tunnel-blackhole,gost-kill,socks5-kill]

About 4 s a scenario and round.
"""
import argparse
import os
import select
import signal
import socket
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.namespaces import RTR4_CLI, SRV4, SRV4_B, Topology, start_echo  # noqa: E402
from tests.relayproc import RelayProcess, wait_until  # noqa: E402
from tests.support import ALLOW  # noqa: E402

SCENARIOS = ("tunnel-kill", "tunnel-blackhole", "gost-kill", "socks5-kill")
PERIOD = 0.005


def server(topo, kind, host, port):
    args = {"tunnel": ["tunnel-server", "--secret", "s3cret"],
            "gost": ["tunnel-server", "--insecure"],
            "socks5": ["socks5", "--username", "u", "--password", "p"]}[kind]
    return RelayProcess([*args, "--listen", f"{host}:{port}", "--allow", ALLOW], ns=topo.srv,
                        log_level="warning").wait_ready()


def url(kind, host, port):
    return f"{kind}://{'u:p@' if kind == 'socks5' else ''}{host}:{port}"


def one(topo, scenario, port):
    kind, how = scenario.split("-")
    servers = [server(topo, kind, h, port) for h in (SRV4, SRV4_B)]
    args = ["forward", "--listen", f"0.0.0.0:{port}", "--to", f"{SRV4}:5000",
            "--upstream", url(kind, SRV4, port), "--upstream", url(kind, SRV4_B, port)]
    if kind == "tunnel":
        args += ["--secret", "s3cret"]
    relay = RelayProcess(args, ns=topo.rtr, log_level="error").wait_ready()
    s = topo.cli.socket(socket.AF_INET)
    try:
        s.settimeout(2)
        s.connect((RTR4_CLI, port))
        wait_until(lambda: _echo(s, (RTR4_CLI, port)), 10, what="first echo")
        s.setblocking(False)
        n, t_fail, first = 0, None, None
        start = time.monotonic()
        while time.monotonic() - start < 8.0 and first is None:
            if t_fail is None and time.monotonic() - start > 0.3:
                if how == "kill":
                    os.killpg(servers[0].proc.pid, signal.SIGKILL)
                else:
                    for rule in ("add table inet fo",
                                 "add chain inet fo in { type filter hook input priority 0 ; }",
                                 f"add rule inet fo in ip daddr {SRV4} tcp dport {port} drop"):
                        topo.srv.run("nft", rule)
                t_fail, fail_seq = time.monotonic(), n
            s.send(b"%d" % n)
            n += 1
            end = time.monotonic() + PERIOD
            while (left := end - time.monotonic()) > 0:
                if select.select([s], [], [], left)[0]:
                    seq = int(s.recv(64))
                    if t_fail is not None and seq >= fail_seq and first is None:
                        first = time.monotonic() - t_fail
        return first
    finally:
        s.close()
        relay.close()
        for srv in servers:
            srv.close()
        if how == "blackhole":
            topo.srv.run("nft", "delete table inet fo", check=False)


def _echo(s, dst):
    try:
        s.send(b"warm")
        return s.recv(64) == b"warm"
    except OSError:
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--only", default=",".join(SCENARIOS))
    a = ap.parse_args()
    with Topology() as topo:
        start_echo(topo.srv, f"{SRV4}:5000")
        port = 9100
        for scenario in a.only.split(","):
            times = []
            for _ in range(a.rounds):
                port += 1
                t = one(topo, scenario, port)
                times.append(t)
            ok = [t for t in times if t is not None]
            shown = ", ".join("none in 8 s" if t is None else f"{t * 1000:.0f}" for t in times)
            med = f"median {statistics.median(ok) * 1000:.0f} ms" if ok else "no echo"
            print(f"{scenario:18} {med:>18}   (ms: {shown})", flush=True)


if __name__ == "__main__":
    main()
