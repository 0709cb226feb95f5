"""The real command output of docs/router.md: builds the test topology (tests/namespaces.py),
runs rules, doctor, redir, flows and stats in its router namespace, prints what they said.
Root only; everything is removed at the end.  Usage: scripts/root .venv/bin/python scripts/router_demo.py"""
import os
import socket
import subprocess
import sys
import time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.namespaces import SRV4, SRV6, Topology, start_echo  # noqa: E402
from tests.relayproc import relay_env  # noqa: E402

def relay(ns, *args):
    r = subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-m", "relay", *args],
                       capture_output=True, text=True, env=relay_env(), timeout=60)
    return r

out = []
def show(cmd, r):
    text = (r.stdout + r.stderr).rstrip()
    out.append(f"$ {cmd}\n{text}\n")

with Topology() as t:
    start_echo(t.srv, f"{SRV4}:53", f"[{SRV6}]:53", f"{SRV4}:3478", f"[{SRV6}]:3478")
    show("relay rules apply --port 7000 --iface rtr0", relay(t.rtr, "rules", "apply", "--port", "7000", "--iface", "rtr0"))
    ctl = "/tmp/router-demo.sock"
    p = t.rtr.popen([sys.executable, "-m", "relay", "redir", "--listen", "[::]:7000",
                     "--timeout-port", "53=10,3478=300", "--reject", "443",
                     "--client-group", "lan=192.0.2.0/24,2001:db8:1::/64",
                     "--workers", "2", "--control", ctl], env=relay_env(),
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2.5)
    show("relay doctor --iface rtr0", relay(t.rtr, "doctor", "--iface", "rtr0", "--control", ctl))
    # traffic: DNS and a STUN-like flow, v4 and v6; QUIC to 443 rejected
    for fam, srv in ((socket.AF_INET, SRV4), (socket.AF_INET6, SRV6)):
        for port, n, size in ((53, 3, 60), (3478, 20, 900)):
            c = t.cli.socket(fam); c.settimeout(2)
            for i in range(n):
                c.sendto(b"q" * size, (srv, port)); c.recvfrom(2000)
    q = t.cli.socket(socket.AF_INET); q.settimeout(2); q.connect((SRV4, 443))
    q.send(b"quic initial"); 
    try:
        q.recv(100); res = "answered?!"
    except ConnectionRefusedError as e:
        res = f"ConnectionRefusedError: {e}"
    out.append(f"# a QUIC client in the LAN sends to {SRV4}:443 and reads:\n{res}\n")
    time.sleep(0.5)
    show("relay flows", relay(t.rtr, "flows", "--control", ctl))
    show("relay flows --by-client", relay(t.rtr, "flows", "--by-client", "--control", ctl))
    show("relay flows --sort idle --top 2", relay(t.rtr, "flows", "--sort", "idle", "--top", "2", "--control", ctl))
    r = relay(t.rtr, "stats", "--control", ctl)
    keep = [l for l in r.stdout.splitlines() if not l.strip() or l.startswith(" ") or l.split()[1:] != ["0"] * (len(l.split()) - 1)]
    r.stdout = "\n".join(keep)
    show("relay stats   # counters that are 0 left out here", r)
    time.sleep(9)
    show("relay flows   # 10 s later: the DNS flows idled out, the STUN ones stay", relay(t.rtr, "flows", "--control", ctl))
    p.terminate(); p.wait(10)
    show("relay rules remove --port 7000 --iface rtr0", relay(t.rtr, "rules", "remove", "--port", "7000", "--iface", "rtr0"))
print("\n".join(out))
