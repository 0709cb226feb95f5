"""What the tunnel, SOCKS5 and upstream tests share: listener configs, services run in a
thread, echo servers, raw tunnel clients, relays started in a namespace. Fixtures built on
these are in conftest.py; test modules import from here, never from each other."""
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import tempfile
import threading
import time

from relay import proto
from relay import stats as _stats
from relay.config import listener
from relay.services.base import WorkerContext
from tests import namespaces as N
from tests.namespaces import SRV4, SRV6, start_echo, wait_until
from tests.relayproc import REPO, relay_env


ALLOW_DOC = ["198.51.100.0/24", "2001:db8::/32"]
# A server in srv that relays to the echo servers on srv's own addresses allows them
# explicitly: the host's own addresses are denied otherwise (a /24 allow does not cover them).
ALLOW_SRV_HOST = [f"{SRV4}/32", f"{SRV6}/128"]

# Property tests: examples(n) is n scaled by RELAY_TEST_EXAMPLES (default 1). CI's runs on
# the oldest and the newest Python set 0.2: they prove the code runs there; the search
# depth comes from the README's full run.
EXAMPLES_SCALE = float(os.environ.get("RELAY_TEST_EXAMPLES") or 1)


def examples(n):
    return max(10, int(n * EXAMPLES_SCALE))


SECRET = "s3cret"


def cfg(mode, **kw):
    """A listener of mode as relay.config builds it (its defaults), unmarked and with
    smaller tables than the defaults unless kw says otherwise."""
    d = dict(mark=0, max_associations=4096, batch=32)
    d.update(kw)
    return listener(mode, **d)


class Running:
    """A service running in a thread of this process, inside namespace ns (or here)."""

    def __init__(self, c, ns=None):
        self.region = _stats.StatsRegion(1)
        self.ctx = WorkerContext(0, self.region.slot(0), reuseport=False)
        self.ns = ns
        if ns is not None:
            with ns.enter():
                self.svc = _create(c, self.ctx)
        else:
            self.svc = _create(c, self.ctx)
        self.error = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            if self.ns is not None:
                with self.ns.enter():
                    self.svc.run()
            else:
                self.svc.run()
        except BaseException as e:          # surfaced by stop()
            self.error = e

    @property
    def address(self):
        return self.svc.address

    def stats(self):
        return self.region.read(0)

    def stop(self):
        self.ctx.stop.set()
        self.thread.join(5)
        self.svc.close()
        if self.error:
            raise self.error


def _create(c, ctx):
    from relay.services import create_service
    return create_service(c, ctx)


def payload(size, seed=0):
    base = bytes((i * 7 + seed) & 0xFF for i in range(256))
    return (base * (size // 256 + 1))[:size]


def roundtrip(sock, addr, data, timeout=2.0, tries=3):
    sock.settimeout(timeout)
    for _ in range(tries):
        sock.sendto(data, addr)
        try:
            while True:
                got, _src = sock.recvfrom(70000)
                if got == data:
                    return got
        except socket.timeout:
            continue
    raise AssertionError(f"no echo of a {len(data)}-byte datagram")


def wait_stat(r, name, at_least=1, timeout=5.0):
    return N.wait_until(lambda: r.stats()[name] >= at_least, timeout, what=f"{name} >= {at_least}")


def tunnel_pair(topo, running, v6, gost=False, **client_kw):
    """tunnel-server in rtr, tunnel-client in cli (gost: the client speaks gost, so the
    server has no secret, hence insecure)."""
    if v6:
        srv_listen, to, cli_listen = (N.RTR6_CLI, 9000), (N.SRV6, 7), ("::1", 5000)
    else:
        srv_listen, to, cli_listen = (N.RTR4_CLI, 9000), (N.SRV4, 7), ("127.0.0.1", 5000)
    auth = dict(insecure=True) if gost else dict(secret=SECRET)
    server = running(cfg("tunnel-server", listen=srv_listen, allow=ALLOW_DOC, **auth), topo.rtr)
    kw = dict(listen=cli_listen, server=srv_listen, to=to,
              **(dict(gost=True) if gost else dict(secret=SECRET)))
    kw.update(client_kw)
    client = running(cfg("tunnel-client", **kw), topo.cli)
    return server, client, cli_listen


def restart_mid_stream(echo_topo, running, server_args, **client_kw):
    """Send a numbered stream through tunnel-client while the tunnel-server process dies and
    comes back: traffic must resume. Returns the client's counters."""
    env = dict(os.environ, PYTHONPATH=REPO)
    cmd = [sys.executable, "-m", "relay", "tunnel-server",
           "--listen", f"{N.RTR4_CLI}:9000", "--allow", ALLOW_DOC[0], "--log-level", "warning",
           "--workers", "1", "--control", "", *server_args]
    proc = echo_topo.rtr.popen(cmd, env=env)
    client = running(cfg("tunnel-client", listen=("127.0.0.1", 5000), server=(N.RTR4_CLI, 9000),
                         to=(N.SRV4, 7), **client_kw), echo_topo.cli)
    sock = echo_topo.cli.socket(socket.AF_INET)
    roundtrip(sock, ("127.0.0.1", 5000), b"before", timeout=1, tries=10)
    got = set()
    stop = threading.Event()

    def receiver():
        sock.settimeout(0.1)
        while not stop.is_set():
            try:
                got.add(int(sock.recv(100).split()[1]))
            except (socket.timeout, ValueError, IndexError):
                pass

    t = threading.Thread(target=receiver, daemon=True)
    t.start()
    try:
        seq = 0
        t0 = time.monotonic()
        restarted_at = None
        while time.monotonic() - t0 < 8:
            sock.sendto(b"seq %d" % seq, ("127.0.0.1", 5000))
            seq += 1
            el = time.monotonic() - t0
            if proc is not None and el > 0.5 and restarted_at is None:
                proc.kill()
                proc.wait(5)
                proc = None
            if proc is None and el > 1.0 and restarted_at is None:
                proc = echo_topo.rtr.popen(cmd, env=env)
                restarted_at = seq
            if restarted_at is not None and any(s > restarted_at for s in got):
                break
            time.sleep(0.01)
        assert restarted_at is not None
        assert any(s > restarted_at for s in got), "no traffic after the restart"
        assert any(s < restarted_at for s in got)
        return client.stats()
    finally:
        stop.set()
        t.join(2)
        sock.close()


class Echo:
    """UDP echo on loopback (127.0.0.1 or ::1) in a thread (bad-input tests run on loopback);
    who=True: it answers each datagram with the address it came from instead."""

    def __init__(self, host="127.0.0.1", who=False):
        self.who = who
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                  socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.settimeout(0.2)
        self.addr = self.sock.getsockname()[:2]
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.run, daemon=True)
        self.t.start()

    def run(self):
        while not self.stop.is_set():
            try:
                d, a = self.sock.recvfrom(70000)
                self.sock.sendto(a[0].encode() if self.who else d, a)
            except OSError:
                pass

    def close(self):
        self.stop.set()
        self.t.join(2)
        self.sock.close()


def ask_source(sock, addr, tries=3):
    """Send to addr a datagram whose answer is the address the server saw it come from
    (an Echo(who=True)); returns that address."""
    sock.settimeout(2)
    for _ in range(tries):
        sock.sendto(b"?", addr)
        try:
            return sock.recvfrom(2048)[0].decode()
        except socket.timeout:
            continue
    raise AssertionError(f"no answer through {addr}")


def own_sockets(pick, kind=socket.SOCK_STREAM):
    """Sockets of this process of kind for which pick(sock) holds, one per socket
    (duplicates of their descriptors: close them)."""
    out, seen = [], set()
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            link = os.readlink(f"/proc/self/fd/{fd}")
            if not link.startswith("socket:") or link in seen:
                continue
            seen.add(link)
            s = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if s.type == kind and pick(s):
                out.append(s)
                continue
        except OSError:
            pass
        s.close()
    return out


def sockets_to(addr):
    """TCP sockets of this process connected to addr (the cores' own connections)."""
    return own_sockets(lambda s: s.getpeername()[:2] == tuple(addr[:2]))


def raw_client(server, cmd=proto.CMD_UDP_TUN_MUX, rcvbuf=None):
    s = socket.socket(socket.AF_INET6 if ":" in server.address[0] else socket.AF_INET,
                      socket.SOCK_STREAM)
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.settimeout(3)
    s.connect(server.address)
    hs = proto.ClientHandshake(cmd=cmd)
    out = hs.start()
    while not hs.done:
        s.sendall(out)
        out = hs.feed(s.recv(4096))
    return s, hs.leftover


def raw_associate(server, user=None, password=None, family=socket.AF_INET, at=None):
    """UDP ASSOCIATE over a control connection to server (or to address at); returns the
    control socket, an unbound UDP socket of family and the relay address (BND)."""
    ctl = socket.create_connection(at or server.address[:2], timeout=3)
    hs = proto.ClientHandshake(cmd=proto.CMD_UDP_ASSOCIATE, user=user, password=password,
                               host="::" if family == socket.AF_INET6 else "0.0.0.0")
    out = hs.start()
    while not hs.done:
        ctl.sendall(out)
        out = hs.feed(ctl.recv(4096))
    u = socket.socket(family, socket.SOCK_DGRAM)
    u.settimeout(2)
    return ctl, u, hs.bound


def read_frames(s, n, mux=True, timeout=3.0, buf=b""):
    """``n`` frames from ``s``, starting with the bytes already read (``buf``)."""
    frames = []
    s.settimeout(timeout)
    got, used = proto.parse_frames(buf, mux=mux)
    frames += got
    buf = buf[used:]
    while len(frames) < n:
        chunk = s.recv(70000)
        if not chunk:
            break
        buf += chunk
        got, used = proto.parse_frames(buf, mux=mux)
        frames += got
        buf = buf[used:]
    return frames


def closed_by_peer(s, timeout=3.0):
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(65536):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


ALLOW = ",".join(ALLOW_DOC + ALLOW_SRV_HOST)      # for servers in srv (or elsewhere)


def serve_in(ns, *args):
    """`relay ARGS` in namespace ns: one worker, no control socket (the path would be shared
    with every other relay on the machine: namespaces do not separate the file system)."""
    p = ns.popen([sys.executable, "-m", "relay", *args, "--workers", "1", "--control", ""],
                 env=relay_env())
    return p


def wait_tcp(ns, addr):
    def up():
        with ns.enter():
            try:
                socket.create_connection(addr, timeout=0.2).close()
                return True
            except OSError:
                return False
    wait_until(up, 10, what=f"TCP {addr}")


def redir_rules(topo, action, port):
    """`relay rules ACTION --port PORT --iface rtr0` in the router (TPROXY to a redir)."""
    return subprocess.run(
        ["ip", "netns", "exec", topo.rtr.name, sys.executable, "-m", "relay", "rules", action,
         "--port", str(port), "--iface", "rtr0"],
        capture_output=True, text=True, env=relay_env(), timeout=30)


def upstream_in_srv(topo, kind):
    """Echo servers and a relay tunnel-server (kind "tunnel") or socks5 server in srv;
    returns the forward options that use it as the upstream."""
    start_echo(topo.srv, f"{SRV4}:5000", f"[{SRV6}]:5000")
    if kind == "tunnel":
        serve_in(topo.srv, "tunnel-server", "--listen", "[::]:8443", "--secret", "s3cret",
                 "--allow", ALLOW)
        wait_tcp(topo.srv, (SRV4, 8443))
        return ["--upstream", f"tunnel://{SRV4}:8443", "--secret", "s3cret"]
    serve_in(topo.srv, "socks5", "--listen", "[::]:1080", "--username", "u", "--password", "p",
             "--allow", ALLOW)
    wait_tcp(topo.srv, (SRV4, 1080))
    return ["--upstream", f"socks5://u:p@{SRV4}:1080"]


def native_rawsender():
    """relay.packet._rawsock.RawSender, or None when the extension is not built."""
    try:
        from relay.packet._rawsock import RawSender
    except ImportError:
        return None
    return RawSender


# Outside the checkout: the tests run as root (through sudo for a user), and root-owned
# files in a user's checkout would outlive their run (the user could not remove them).
PROBES = os.path.join(tempfile.gettempdir(), f"relay-test-probes-{os.getuid()}")


@contextlib.contextmanager
def compiled_probe(directory, name, source):
    """A small Cython module ``name`` compiled in ``directory`` from ``source`` against the
    checkout's .pxd helpers (inline C only, so a probe is how tests reach them); imported
    while the context lasts.

    A compile costs seconds of both cores, and tests running side by side (pytest -n, and
    scripts/test's parts) would each make the same one: the module is kept in
    PROBES (outside the checkout), named by a hash of everything it is made from (the source, every
    .pxd, .pxi and .h in relay/, the interpreter, Cython), made by one process while the
    others wait for it."""
    import fcntl
    import hashlib
    import sysconfig
    import Cython
    setup_py = textwrap.dedent(f'''
        from setuptools import setup, Extension
        from Cython.Build import cythonize
        ext = Extension({name!r}, [{name + ".pyx"!r}],
                        include_dirs=[{os.path.join(REPO, "relay", "includes")!r}, {REPO!r}])
        setup(ext_modules=cythonize([ext], include_path=[{REPO!r}], language_level=3,
                                    quiet=True), script_args=["build_ext", "--inplace", "-q"])
    ''')
    h = hashlib.sha256()
    for part in (source, setup_py, sys.version, sysconfig.get_config_var("EXT_SUFFIX"),
                 Cython.__version__, os.environ.get("CC", ""), os.environ.get("CFLAGS", "")):
        h.update(str(part).encode() + b"\0")
    for root, dirs, files in sorted(os.walk(os.path.join(REPO, "relay"))):
        dirs.sort()
        for f in sorted(files):
            if f.endswith((".pxd", ".pxi", ".h")):
                with open(os.path.join(root, f), "rb") as fh:
                    h.update(f.encode() + b"\0" + fh.read() + b"\0")
    made = os.path.join(PROBES, f"{name}-{h.hexdigest()[:20]}")
    os.makedirs(PROBES, mode=0o700, exist_ok=True)
    st = os.lstat(PROBES)
    assert st.st_uid == os.getuid() and not os.path.islink(PROBES), f"{PROBES} is not ours"
    with open(made + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # one compile; the others wait, then reuse it
        if not os.path.isdir(made):
            d = str(directory)
            with open(os.path.join(d, name + ".pyx"), "w") as f:
                f.write(source)
            with open(os.path.join(d, "setup.py"), "w") as f:
                f.write(setup_py)
            r = subprocess.run([sys.executable, "setup.py"], cwd=d, capture_output=True,
                               text=True, timeout=240)
            assert r.returncode == 0, r.stderr[-3000:]
            staged = made + ".new"
            shutil.rmtree(staged, ignore_errors=True)
            os.makedirs(staged)
            for f in os.listdir(d):
                if f.startswith(name + ".") and f.endswith(".so"):
                    shutil.copy2(os.path.join(d, f), staged)
            os.rename(staged, made)             # whole or not at all
    sys.path.insert(0, made)
    try:
        yield __import__(name)
    finally:
        sys.path.remove(made)


def check_disguise_steps(kind, headers):
    """Consecutive disguise headers of one new sender (relay/proto/disguise.py) follow
    v2ray's counting: srtp and wechat-video numbers +1 each, dtls sequence from 0 with its
    length cycle and one epoch, utp one connection id."""
    from relay.proto import disguise as H
    f = [H.fields(kind, h) for h in headers]
    if kind in ("srtp", "wechat-video"):
        mask = 0xFFFF if kind == "srtp" else 0xFFFFFFFF
        assert [x["number"] for x in f] == [(f[0]["number"] + i) & mask for i in range(len(f))]
    elif kind == "dtls":
        assert [x["sequence"] for x in f] == list(range(len(f)))
        assert len({x["ident"] for x in f}) == 1
        length = H.DTLS_LEN_FIRST
        for x in f:
            assert x["length"] == length
            length = H.dtls_next_length(length)
    elif kind == "utp":
        assert len({x["ident"] for x in f}) == 1
