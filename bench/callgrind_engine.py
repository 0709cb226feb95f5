"""Forward N datagrams of F flows through an in-process forward Engine on loopback, for a
repeatable count of the engine's user-space instructions (hardware counters are not
available here):

    valgrind --tool=callgrind --toggle-collect='__pyx_pw_5relay_8datapath_6engine_6Engine_*run' \\
        .venv/bin/python bench/callgrind_engine.py [TREE] [N] [F] [HEADER]

TREE: the checkout whose relay is imported (default: this one), to compare two builds.
HEADER: a disguise header kind the engine adds to every datagram (--header-out; default
none).
Normalise by the calls of _count_sent (callgrind_annotate), which scale with the datagrams
the collected run() calls handled."""
import os
import socket
import sys

tree = sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, tree)
from relay.datapath.engine import Engine  # noqa: E402

N = int(sys.argv[2]) if len(sys.argv) > 2 else 20000
F = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
HEADER = sys.argv[4] if len(sys.argv) > 4 and sys.argv[4] != "none" else None
sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sink.bind(("127.0.0.1", 0))
sink.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
ls = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ls.bind(("127.0.0.1", 0))
ls.setblocking(False)
ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 24)
eng = Engine(ls.fileno(), "forward", to=sink.getsockname(), listen_family=socket.AF_INET,
             max_associations=4096, mark=0, **({"header_out": HEADER} if HEADER else {}))
clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(F)]
for c in clients:
    c.bind(("127.0.0.1", 0))
dst = ls.getsockname()
sent = 0
while sent < N:                     # bounded: N datagrams, 256 per engine turn
    k = min(256, N - sent)
    for i in range(k):
        clients[(sent + i) % F].sendto(b"x" * 64, dst)
    sent += k
    eng.run(1)
for _ in range(20):
    eng.run(1)
print("relayed", eng.counters()["up_datagrams"], "of", N)
for c in clients:
    c.close()
eng.close()
