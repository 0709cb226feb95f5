"""bench/memory.py without load: the parsers of /proc/net/sockstat and /proc/slabinfo, the
per-association arithmetic, the points and command lines, and the flow opener on
loopback (every flow a distinct source port, held open)."""
import json
import socket
import subprocess
import sys

import pytest

from bench import memory

SOCKSTAT = """sockets: used 512
TCP: inuse 5 orphan 0 tw 2 alloc 9 mem 3
UDP: inuse 1003 mem 40
UDPLITE: inuse 0
RAW: inuse 0
FRAG: inuse 0 memory 0
"""

SLABINFO = """slabinfo - version: 2.1
# name            <active_objs> <num_objs> <objsize> <objperslab> <pagesperslab> : tunables
UDP                 1024   1056   1216   26    8 : tunables    0    0    0 : slabdata
sock_inode_cache    2048   2100    832   39    8 : tunables    0    0    0 : slabdata
filp                4096   4200    256   32    2 : tunables    0    0    0 : slabdata
kmalloc-64         99999  99999     64   64    1 : tunables    0    0    0 : slabdata
"""


def test_parse_sockstat():
    st = memory.parse_sockstat(SOCKSTAT)
    assert st["UDP"] == {"inuse": 1003, "mem": 40}
    assert st["TCP"]["mem"] == 3 and st["sockets"]["used"] == 512
    assert st["FRAG"]["memory"] == 0 and "UDPLITE" in st
    assert memory.socket_mem_bytes(st, page=4096) == 43 * 4096
    assert memory.socket_mem_bytes({}, page=4096) == 0


SS = """UNCONN 0      0      192.0.2.1:7000   0.0.0.0:*     users:(("python",pid=11,fd=8))
	 skmem:(r0,rb8388608,t0,tb212992,f4096,w0,o0,bl0,d0)
ESTAB  0      0      198.51.100.1:5000 198.51.100.2:8443 users:(("python",pid=12,fd=9))
	 skmem:(r100,rb131072,t20,tb87040,f1000,w300,o16,bl0,d2)
UNCONN 0      0      192.0.2.1:7001   0.0.0.0:*     users:(("other",pid=99,fd=3))
	 skmem:(r5000,rb8388608,t0,tb212992,f4096,w0,o0,bl0,d0)
UNCONN 0      0      192.0.2.1:7002   0.0.0.0:*
	 skmem:(r7000,rb8388608,t0,tb212992,f4096,w0,o0,bl0,d0)
UNCONN 0 0 192.0.2.1:7003 0.0.0.0:* users:(("python",pid=11,fd=10)) skmem:(r1,rb2,t0,tb3,f4,w0,o0,bl0,d0)
"""


def test_parse_ss_sums_the_relays_own_sockets():
    # r + t + f + w + o of pid 11 and 12's sockets, not the buffer sizes, not pid 99's,
    # not a socket without an owner; skmem on its own line or on the socket's
    assert memory.parse_ss(SS, [11, 12]) == (3, 4096 + (100 + 20 + 1000 + 300 + 16) + 5)
    assert memory.parse_ss(SS, [99]) == (1, 5000 + 4096)
    assert memory.parse_ss(SS, []) == (0, 0)
    assert memory.parse_ss("garbage\n\tskmem:(rx,f)\n", [1]) == (0, 0)


def test_parse_slabinfo_keeps_the_socket_caches():
    slab = memory.parse_slabinfo(SLABINFO)
    assert slab == {"UDP": 1024 * 1216, "sock_inode_cache": 2048 * 832, "filp": 4096 * 256}


def test_fds_and_rss_of_a_process_tree():
    import os
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        tree = memory.rss_tree(os.getpid())
        assert tree["supervisor"] > 0 and len(tree["workers"]) >= 1
        assert memory.fds_tree(os.getpid()) >= len(os.listdir("/proc/self/fd")) - 1
    finally:
        child.kill()
        child.wait()
    assert memory.fds_tree(2**22 + 12345) == 0


def test_parse_the_real_files():
    with open("/proc/net/sockstat") as f:
        st = memory.parse_sockstat(f.read())
    assert "UDP" in st and "mem" in st["UDP"]


def _sample(rss, sock, slab, stat=0):
    return {"rss_total": rss, "relay_socket_mem": sock, "slab_total": slab, "socket_mem": stat}


def test_per_association_figures():
    got = memory.per_assoc(_sample(1000, 100, 10_000, 7), _sample(201_000, 40_100, 510_000, 107),
                           100)
    assert got == {"rss_per_assoc": 2000.0, "socket_mem_per_assoc": 400.0,
                   "sockstat_mem_per_assoc": 1.0,
                   "bytes_per_assoc": 2400.0, "slab_per_assoc": 5000.0,
                   "with_slab_per_assoc": 7400.0}
    assert memory.per_assoc(_sample(1, 1, 1), _sample(2, 2, 2), 0) == {}


def test_points_are_capped_by_design_and_by_the_fd_limit():
    assert memory.points_of("forward", (100000, 10000)) == [10000, 100000]
    assert memory.points_of("forward-tunnel", (10000, 100000)) == [10000, 65536]
    assert memory.points_of("forward-socks5", (100000,)) == [65536]
    assert memory.points_of("redir-raw", (10000, 100000), fd_limit=20000) == [10000, 18976]


@pytest.mark.parametrize("n,per,want", [(0, 10, []), (5, 10, [5]), (10, 10, [10]),
                                         (11, 10, [6, 5]), (100000, 18976, [16667] * 4
                                                                + [16666] * 2)])
def test_split_flows(n, per, want):
    got = memory.split_flows(n, per)
    assert got == want and sum(got) == n and all(x <= per for x in got)


def test_relay_command_lines():
    relay, server = memory.relay_command("redir-transparent", "/c.sock", 5000)
    assert relay[3:8] == ["redir", "--listen", "0.0.0.0:7001", "--reply", "transparent"]
    assert relay[relay.index("--max-associations") + 1] == "5000" and server is None
    relay, server = memory.relay_command("forward-tunnel", "/c.sock", 70000)
    assert f"tunnel://{memory.topo.SINK4}:{memory.TUNNEL_PORT}" in relay
    assert server[3] == "tunnel-server" and memory.SECRET in server
    assert server[server.index("--allow") + 1] == f"{memory.topo.SINK4}/32"
    relay, server = memory.relay_command("forward-socks5", "/c.sock", 1024)
    assert f"socks5://{memory.topo.SINK4}:{memory.SOCKS_PORT}" in relay
    assert server[3] == "socks5" and "--insecure" in server
    assert relay[relay.index("--control") + 1] == "/c.sock"
    assert server[server.index("--control") + 1] == "/c.sock.server"
    with pytest.raises(ValueError):
        memory.relay_command("forward-gost", "/c", 1)


def test_table_reports_points_notes_and_prealloc():
    idle = {"rss_total": 40 << 20, "relay_socket_mem": 0, "socket_mem": 0, "slab_total": 0,
            "fds": 12}
    at = {"rss_total": 50 << 20, "relay_socket_mem": 1 << 20, "socket_mem": 5 << 20,
          "slab_total": 2 << 20, "fds": 1012}
    rows = [{"scenario": "forward", "status": "ok", "idle": idle, "capped": "fd limit",
             "points": [dict(associations=1000, sample=at, short="x", idle=idle,
                             **memory.per_assoc(idle, at, 1000))]},
            {"scenario": "redir-raw", "status": "error", "reason": "boom"},
            {"scenario": "prealloc", "status": "ok", "max_associations": 1024,
             "worker_rss": 20 << 20, "extra_over_smallest": 0}]
    text = memory.table(rows)
    assert "note: fd limit" in text and "note: x" in text
    assert "redir-raw          error: boom" in text
    line = [l for l in text.splitlines() if l.strip().startswith("1000")][0].split()
    assert line[-3:] == [f"{11 * 2**20 / 1000:.0f}", f"{13 * 2**20 / 1000:.0f}", "1012"]
    assert "20.0 MiB" in text


@pytest.mark.parametrize("host,fam", [("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)])
def test_flow_opener_holds_distinct_source_ports(host, fam):
    rx = socket.socket(fam, socket.SOCK_DGRAM)
    rx.bind((host, 0))
    rx.settimeout(5)
    port = rx.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "bench.memory", "open-flows", "--dst",
                          f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
                          "--src", host, "--rate", "5000"],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                         cwd=memory.ROOT)
    try:
        assert p.stdout.readline().strip() == "ready"
        p.stdin.write("150\n")
        p.stdin.flush()
        assert json.loads(p.stdout.readline()) == {"open": 150, "errors": 0}
        p.stdin.write("200\n")              # 50 more, the first 150 still open
        p.stdin.flush()
        assert json.loads(p.stdout.readline()) == {"open": 200, "errors": 0}
        sources = set()
        for _ in range(200):
            data, addr = rx.recvfrom(64)
            assert data == b"\x00m"
            sources.add(addr)
        assert len(sources) == 200
        p.stdin.write("quit\n")
        p.stdin.flush()
        assert p.wait(timeout=10) == 0
    finally:
        if p.poll() is None:
            p.kill()
        rx.close()


def test_bad_arguments_are_refused(capsys):
    for argv, msg in ((["--scenarios", "nope"], "--scenarios"), (["--points", "x"], "integers"),
                      (["--points", "0"], "--points"), (["--rate", "1"], "--rate")):
        with pytest.raises(SystemExit) as e:
            memory.main(argv)
        assert e.value.code == 2
        assert msg in capsys.readouterr().err
