"""Network namespaces for end-to-end tests: client -- router -- server over veth pairs.

Addresses come from the documentation ranges (RFC 5737, RFC 3849):

    cli  cli0 192.0.2.2/24      2001:db8:1::2/64   default via the router
    rtr  rtr0 192.0.2.1/24      2001:db8:1::1/64   forwarding on
         rtr1 198.51.100.1/24   2001:db8:2::1/64
    srv  srv0 198.51.100.2/24   2001:db8:2::2/64   default via the router
              198.51.100.3/24   2001:db8:2::3/64   (a second remote, for full-cone tests)

``Topology.add_router_addresses()`` gives rtr0 two more of each family (RTR4_MORE,
RTR6_MORE): a client that asks one of them must get its reply from it, although the
kernel's route towards the client would pick 192.0.2.1 / 2001:db8:1::1 as source.

Every namespace name carries the pid and a counter, so parallel runs never collide, and
``Topology.close()`` deletes the namespaces and kills every process started through it.
``Netns.enter()`` moves the calling thread into the namespace (setns), so a test can open
sockets there directly; they stay in that namespace after the thread moves back.
"""
import contextlib
import ctypes
import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNET = 0x40000000

CLI4, RTR4_CLI, RTR4_SRV, SRV4, SRV4_B = "192.0.2.2", "192.0.2.1", "198.51.100.1", "198.51.100.2", "198.51.100.3"
CLI6, RTR6_CLI, RTR6_SRV, SRV6, SRV6_B = "2001:db8:1::2", "2001:db8:1::1", "2001:db8:2::1", "2001:db8:2::2", "2001:db8:2::3"
RTR4_MORE = ("192.0.2.10", "192.0.2.11")
RTR6_MORE = ("2001:db8:1::10", "2001:db8:1::11")
RTR4_ALL = (RTR4_CLI,) + RTR4_MORE
RTR6_ALL = (RTR6_CLI,) + RTR6_MORE


def unavailable_reason():
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "iproute2 (ip) is not installed"
    name = f"rlprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", name], capture_output=True, text=True)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    return None


def sh(*args, check=True, ns=None, **kw):
    cmd = [str(a) for a in args]
    if ns is not None:
        cmd = ["ip", "netns", "exec", ns] + cmd
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
    return r


class Netns:
    def __init__(self, name, owner):
        self.name = name
        self.owner = owner

    def run(self, *args, check=True, **kw):
        return sh(*args, check=check, ns=self.name, **kw)

    def popen(self, args, **kw):
        """Start a process in this namespace; it is killed when the topology closes."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        p = subprocess.Popen(["ip", "netns", "exec", self.name] + [str(a) for a in args],
                             start_new_session=True, **kw)
        self.owner.procs.append(p)
        return p

    def python(self, code, *args, **kw):
        return self.popen([sys.executable, "-c", code, *args], **kw)

    @contextlib.contextmanager
    def enter(self):
        """Run the body with the calling thread inside this namespace."""
        own = os.open(f"/proc/self/task/{_gettid()}/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield self
            finally:
                _setns(own)
        finally:
            os.close(own)
            os.close(target)

    def socket(self, family, type_=socket.SOCK_DGRAM, proto=0):
        with self.enter():
            return socket.socket(family, type_, proto)


def _gettid():
    return _libc.syscall(186) if os.uname().machine == "x86_64" else threading_get_native_id()


def threading_get_native_id():
    import threading
    return threading.get_native_id()


def _setns(fd):
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"setns: {os.strerror(e)}")


class Topology:
    """cli -- rtr -- srv. Use as a context manager, or call close().

    Built with a few commands, not one per step: the sysctls of each namespace in one
    ``sysctl`` run and its links, addresses and routes in one ``ip -n NAME -batch`` (a
    topology costs about a tenth of what forty ``ip netns exec`` runs cost, and tests
    running side by side build many)."""

    def __init__(self):
        tag = f"rl{os.getpid()}x{next(_counter)}"
        self.procs = []
        self.names = []
        try:
            self.cli, self.rtr, self.srv = self._add(f"{tag}-cli", f"{tag}-rtr", f"{tag}-srv")
            self._wire()
        except BaseException:
            self.close()
            raise

    def _add(self, *names):
        for name in names:
            sh("ip", "netns", "add", name)
            self.names.append(name)
        return [Netns(name, self) for name in names]

    def _wire(self):
        c, r, s = self.cli, self.rtr, self.srv
        # No duplicate address detection (before the veths exist: "default" applies to new
        # devices): addresses are usable at once. Reverse-path filtering would drop the
        # spoofed replies in some setups.
        common = [f"net.ipv6.conf.{key}.accept_dad=0" for key in ("all", "default")]
        c.run("sysctl", "-qw", *common)
        s.run("sysctl", "-qw", *common)
        r.run("sysctl", "-qw", *common, "net.ipv4.ip_forward=1",
              "net.ipv6.conf.all.forwarding=1")
        for ns in (c, r, s):
            ns.run("sysctl", "-qw", "net.ipv4.conf.all.rp_filter=0", check=False)
        batches = {c: [], r: [f"link add rtr0 type veth peer name cli0 netns {c.name}",
                           f"link add rtr1 type veth peer name srv0 netns {s.name}"], s: []}
        for ns, dev, addrs in (
            (c, "cli0", [f"{CLI4}/24", f"{CLI6}/64"]),
            (r, "rtr0", [f"{RTR4_CLI}/24", f"{RTR6_CLI}/64"]),
            (r, "rtr1", [f"{RTR4_SRV}/24", f"{RTR6_SRV}/64"]),
            (s, "srv0", [f"{SRV4}/24", f"{SRV6}/64", f"{SRV4_B}/24", f"{SRV6_B}/64"]),
        ):
            for a in addrs:
                batches[ns].append(f"addr add {a} dev {dev}" + (" nodad" if ":" in a else ""))
            batches[ns].append(f"link set {dev} up")
        # (a batch line takes no -6: the family of "default" comes from the gateway's)
        batches[c] += [f"route add default via {RTR4_CLI}", f"route add default via {RTR6_CLI}"]
        batches[s] += [f"route add default via {RTR4_SRV}", f"route add default via {RTR6_SRV}"]
        for ns in (r, c, s):                # rtr first: it makes the veths of cli and srv
            ip_batch(ns.name, ["link set lo up"] + batches[ns])

    def add_router_addresses(self):
        """RTR4_MORE and RTR6_MORE on rtr0, next to its first addresses."""
        for a in RTR4_MORE:
            self.rtr.run("ip", "addr", "add", f"{a}/24", "dev", "rtr0")
        for a in RTR6_MORE:
            self.rtr.run("ip", "addr", "add", f"{a}/64", "dev", "rtr0", "nodad")
        return self

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
            for f in (p.stdout, p.stderr, p.stdin):
                if f:
                    f.close()
        # Processes still holding a namespace keep it alive: kill them too.
        for pid in _pids_in(self.names):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.names:
            sh("ip", "-force", "-batch", "-", check=False,
               input="".join(f"netns del {name}\n" for name in self.names))
        self.names = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _pids_in(names):
    """The processes whose network namespace is one of the named ones (what ``ip netns
    pids`` finds, for all of them in one pass over /proc)."""
    want = set()
    for name in names:
        try:
            st = os.stat(f"/run/netns/{name}")
        except OSError:
            continue
        want.add((st.st_dev, st.st_ino))
    pids = []
    for entry in os.listdir("/proc") if want else ():
        if entry.isdigit():
            try:
                st = os.stat(f"/proc/{entry}/ns/net")
            except OSError:
                continue                # gone meanwhile, or a kernel thread
            if (st.st_dev, st.st_ino) in want:
                pids.append(int(entry))
    return pids


def ip_batch(ns, lines):
    """The ``ip`` commands ``lines`` (without the leading ``ip``) in namespace ns, one run."""
    sh("ip", "-n", ns, "-batch", "-", input="".join(line + "\n" for line in lines))


def wait_until(pred, timeout=10.0, interval=0.02, what="condition"):
    """Poll pred() until it is truthy; raise TimeoutError naming what was awaited."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


ECHO_SERVER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for spec in sys.argv[1:]:
    host, port = spec.rsplit(":", 1)
    host = host.strip("[]")
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((host, int(port)))
    sel.register(s, selectors.EVENT_READ)
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        s = key.fileobj
        try:
            data, peer = s.recvfrom(65535)
            s.sendto(data, peer)
        except OSError:
            pass
"""


def start_echo(ns, *specs):
    """Start a UDP echo server in ns on each HOST:PORT spec; returns once it is ready."""
    p = ns.python(ECHO_SERVER, *specs, text=True)
    line = p.stdout.readline()
    if line.strip() != "ready":
        raise RuntimeError(f"echo server failed: {p.stderr.read()}")
    return p


def _family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def check_reply_sources(ns, port, hosts, timeout=2.0):
    """Ask each of hosts (a datagram to host:port from its own connected socket in ns) and
    check the echo comes back from exactly the address asked: a connected UDP socket drops
    datagrams from any other source, as resolvers such as dig do."""
    for host in hosts:
        s = ns.socket(_family(host))
        try:
            s.settimeout(timeout)
            s.connect((host, port))
            msg = f"ask {host}".encode()
            s.send(msg)
            try:
                got = s.recv(65535)
            except socket.timeout:
                raise AssertionError(f"no reply from {host} port {port} (a reply from another "
                                     f"source is dropped by the connected socket)") from None
            assert got == msg, host
        finally:
            s.close()


def check_moving_client(ns, port, hosts, rounds=2, timeout=2.0):
    """One client socket asks each of hosts in turn, then again in the reverse order: every
    reply comes from the address that client asked last."""
    s = ns.socket(_family(hosts[0]))
    try:
        s.settimeout(timeout)
        order = list(hosts)
        for rnd in range(rounds):
            for host in order:
                msg = f"{rnd} {host}".encode()
                s.sendto(msg, (host, port))
                got, src = s.recvfrom(65535)
                assert (got, src[:2]) == (msg, (host, port))
            order.reverse()
    finally:
        s.close()


def check_runs_alternate(ns, port, pair, bursts=6, size=600, count=12, timeout=3.0):
    """One client sends bursts of equal-size datagrams (one sendmmsg each, so their echoes
    come back to back and leave the relay as GSO runs), alternately to the two addresses of
    pair; every echo arrives intact, in order, from the address its burst went to. Returns
    how many datagrams went each way."""
    from relay import BatchSocket
    s = ns.socket(_family(pair[0]))
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        s.settimeout(timeout)
        with BatchSocket(s.fileno(), batch=64) as b:
            for i in range(bursts):
                host = pair[i % 2]
                burst = [bytes([i, k]) * (size // 2) for k in range(count)]
                assert b.send([(p, (host, port)) for p in burst]) == count
                got = []
                for _ in burst:
                    data, src = s.recvfrom(65535)
                    got.append((data, src[:2]))
                assert got == [(p, (host, port)) for p in burst], f"burst {i} to {host}"
        return bursts * count
    finally:
        s.close()
