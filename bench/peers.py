"""The implementations the benchmark compares ("peers"), each started in the middle namespace.

Every peer is a class with ``unavailable(mode) -> reason | None`` (a class method: is the
binary installed, does the mode make sense), ``start(listen, target)`` and ``stop()``;
``pids()`` gives the processes whose CPU time (children included) is charged to it.
``listen`` is a ``(host, port)`` pair; ``target`` is ``(host, port)`` for ``forward`` and
``None`` for ``redir`` (the destination is each datagram's original destination, TPROXY).

    c-limit          bench/c/fwd_mmsg.c: recvmmsg/sendmmsg, batch 64, per-client upstream
    c-limit-gso      the same with --gso: UDP_GRO in, each run out as one UDP_SEGMENT message
    kernel           no user space: nftables DNAT + SNAT in mid, forwarding on (forward only)
    relay-*          the project's own ``relay forward`` / ``relay redir``
    python-loop      a plain socket loop (selectors), one upstream socket per client
    asyncio-uvloop   a DatagramProtocol relay on uvloop, one endpoint per client
    socat            UDP4-LISTEN,fork: one child process (and upstream socket) per client
    v2ray-dokodemo   v2ray dokodemo-door inbound (udp; followRedirect + tproxy for redir)
    ss-tunnel        ss-tunnel -> ss-server (UDP relay, AEAD on the loopback hop)
    ss-redir         ss-redir (TPROXY) -> ss-server

The two Python relays live in this module: ``python -m bench.peers python-loop|asyncio-uvloop
--listen HOST:PORT (--to HOST:PORT | --tproxy)``.
"""
import argparse
import functools
import json
import os
import re
import selectors
import shutil
import socket
import struct
import subprocess
import sys
import time

from bench.loadgen import stop_group
from bench.topo import udp_bound

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARK = 255                   # SO_MARK of upstream traffic, as `relay redir` uses by default
RCVBUF = 4 << 20             # receive buffer the peers that can set one ask for
SS_CIPHER = "aes-128-gcm"    # the cheapest AEAD cipher on x86 (AES-NI)
SS_PORT = 8388

IP_TRANSPARENT = 19
IP_RECVORIGDSTADDR = 20
SO_MARK = 36


class PeerError(RuntimeError):
    pass


def hostport(addr):
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Peer:
    """Base class. Subclasses set ``name``, ``modes`` and implement ``_commands``."""

    name = "?"
    modes = ("forward", "redir")
    note = ""

    def __init__(self, ns, workdir, mode, tools=None):
        if mode not in ("forward", "redir", "tun"):
            raise ValueError(f"mode must be forward, redir or tun, not {mode!r}")
        self.ns, self.workdir, self.mode = ns, workdir, mode
        self.tools = tools or {}
        self.procs = []
        self.logs = []
        self.cpus = None        # CPUs the implementation may run on (None: any)

    @classmethod
    def unavailable(cls, mode):
        if mode not in cls.modes:
            return f"{cls.name} has no {mode} mode"
        return None

    # --- what subclasses provide
    def _commands(self, listen, target):
        """List of argv lists to start, in order (e.g. a server before its client)."""
        raise NotImplementedError

    def _ports(self, listen):
        """(port, sockets) pairs that must be bound before the peer counts as started."""
        return [(listen[1], 1)]

    # --- common machinery
    def start(self, listen, target):
        if (target is None) != (self.mode in ("redir", "tun")):
            raise ValueError("forward needs a target; redir and tun take none")
        try:
            for i, argv in enumerate(self._commands(listen, target)):
                log = open(os.path.join(self.workdir, f"{self.name}.{i}.log"), "w+")
                self.logs.append(log)
                self.procs.append(self.ns.popen(argv, cpus=self.cpus, stdin=subprocess.DEVNULL,
                                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
            for port, sockets in self._ports(listen):
                self._wait_bound(port, sockets)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_bound(self, port, sockets, timeout=20.0):
        deadline = time.monotonic() + timeout
        while True:
            for p in self.procs:
                if p.poll() is not None:
                    raise PeerError(f"{self.name} exited ({p.returncode}) at start: "
                                    f"{self.log_tail()}")
            if udp_bound(self.procs[-1].pid, port) >= sockets:
                return
            if time.monotonic() > deadline:
                raise PeerError(f"{self.name} did not bind UDP port {port} within "
                                f"{timeout:.0f}s: {self.log_tail()}")
            time.sleep(0.02)

    def log_tail(self, n=400):
        if not self.logs:
            return getattr(self, "_last_tail", "(no output)")
        out = []
        for log in self.logs:
            try:
                log.flush()
                log.seek(0)
                out.append(log.read()[-n:].strip())
            except (OSError, ValueError):
                pass
        return " | ".join(x for x in out if x) or "(no output)"

    def pids(self):
        return [p.pid for p in self.procs if p.poll() is None]

    def stop(self):
        """Stop every process (SIGTERM to its process group, SIGKILL after 5 s). Returns
        the processes that had exited on their own with an error (crashes); those that
        ignored SIGTERM are listed in ``self.slow_stop``."""
        self.slow_stop = [p for p in reversed(self.procs) if stop_group(p)]
        dead = [p for p in self.procs if p not in self.slow_stop
                and p.returncode not in (0, -15, 143, None)]
        self._last_tail = self.log_tail()
        self.procs = []
        for log in self.logs:
            log.close()
        self.logs = []
        return dead


# ---------------------------------------------------------------------------------------

class CLimit(Peer):
    name = "c-limit"
    note = "bench/c/fwd_mmsg.c, recvmmsg/sendmmsg batch 64 (redir: full cone)"

    def _commands(self, listen, target):
        binary = self.tools.get("fwd_mmsg")
        if not binary:
            raise PeerError("fwd_mmsg was not compiled")
        args = [binary, "--listen", hostport(listen), "--batch", 64, "--rcvbuf", RCVBUF]
        if target is None:
            # full cone, like relay redir: one unconnected socket per client
            args += ["--tproxy", "--full-cone", "--mark", MARK]
        else:
            args += ["--to", hostport(target)]
        return [args]


class CLimitGso(CLimit):
    name = "c-limit-gso"
    note = ("bench/c/fwd_mmsg.c --gso: UDP_GRO on receive, each run one UDP_SEGMENT "
            "message (redir: full cone)")

    def _commands(self, listen, target):
        return [super()._commands(listen, target)[0] + ["--gso"]]


class _Routed(Peer):
    """No process of its own: the kernel of ``mid`` moves the datagrams, with IPv4
    forwarding on in ``mid`` while this peer runs and off again after it (and the nftables
    table of ``ruleset``, if any). No CPU per datagram: its work is softirq time on
    whatever CPU a packet arrives on."""

    has_cpu = False
    TABLE = None

    def ruleset_for(self, listen, target):
        return None

    def start(self, listen, target):
        self.slow_stop = []
        rules = self.ruleset_for(listen, target)
        if rules:
            r = subprocess.run(self.ns.command(["nft", "-f", "-"]), input=rules,
                               capture_output=True, text=True, timeout=30)
            if r.returncode != 0:
                raise PeerError(f"{self.name}: nft rules failed: {r.stderr.strip()}")
        self._installed = True
        self.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        return self

    def stop(self):
        from bench import topo
        if getattr(self, "_installed", False):
            self.ns.run("sysctl", "-qw", "net.ipv4.ip_forward=0", check=False)
            if self.TABLE:
                self.ns.run("nft", "delete", "table", "ip", self.TABLE, check=False)
                # NAT bindings live in conntrack entries: drop them, or a later peer's
                # flow that reuses a source port would still be rewritten.
                topo.flush_conntrack(self.ns)
            self._installed = False
        self.slow_stop = []
        self._last_tail = f"({self.name}: no process)"
        return []

    def pids(self):
        return []


class Kernel(_Routed):
    """The kernel's own port forward: nftables DNAT of the listen address to the target,
    SNAT to mid's address towards it, conntrack for the replies."""

    name = "kernel"
    modes = ("forward",)
    note = "nftables DNAT + SNAT in mid, ip_forward on (no process: no CPU figure)"
    TABLE = "relaybench_kernel"

    @classmethod
    def unavailable(cls, mode):
        if mode == "redir":
            return ("the kernel has no full-cone UDP relay to the original destination "
                    "(TPROXY needs a socket): no kernel equivalent of redir")
        if shutil.which("nft") is None:
            return "nft is not installed"
        return None

    @staticmethod
    def ruleset(table, listen, target, snat_to):
        """The nftables ruleset of a kernel port forward from listen to target."""
        (lhost, lport), (thost, tport) = listen, target
        return (
            f"table ip {table} {{\n"
            " chain pre {\n"
            "  type nat hook prerouting priority dstnat; policy accept;\n"
            f"  ip daddr {lhost} udp dport {lport} dnat to {thost}:{tport}\n"
            " }\n"
            " chain post {\n"
            "  type nat hook postrouting priority srcnat; policy accept;\n"
            f"  ip daddr {thost} udp dport {tport} snat to {snat_to}\n"
            " }\n"
            "}\n")

    def ruleset_for(self, listen, target):
        from bench import topo
        if target is None:
            raise ValueError("kernel forwarding needs a target (forward only)")
        return self.ruleset(self.TABLE, listen, target, topo.MID4_SINK)


class Direct(_Routed):
    """No relay at all: the client talks to the sink itself, routed by mid (the latency
    bench's baseline)."""

    name = "direct"
    note = "no relay: routed by mid's kernel (ip_forward on for this row only)"


class PythonLoop(Peer):
    name = "python-loop"
    note = "selectors + one upstream socket per client"

    def _commands(self, listen, target):
        args = [sys.executable, "-m", "bench.peers", "python-loop", "--listen", hostport(listen)]
        args += ["--tproxy"] if target is None else ["--to", hostport(target)]
        return [args]


class AsyncioUvloop(Peer):
    name = "asyncio-uvloop"
    modes = ("forward",)
    note = "DatagramProtocol, one endpoint per client"

    @classmethod
    def unavailable(cls, mode):
        if mode == "redir":
            return ("asyncio datagram endpoints cannot read IP_ORIGDSTADDR "
                    "(no ancillary data), so no TPROXY relay")
        try:
            import uvloop  # noqa: F401
        except ImportError:
            return "uvloop is not installed"
        return None

    def _commands(self, listen, target):
        return [[sys.executable, "-m", "bench.peers", "asyncio-uvloop",
                 "--listen", hostport(listen), "--to", hostport(target)]]


class Socat(Peer):
    name = "socat"
    modes = ("forward",)
    note = "UDP4-LISTEN,fork: a child process per client"

    @classmethod
    def unavailable(cls, mode):
        if mode == "redir":
            return "socat cannot read a TPROXY'd datagram's original destination"
        if shutil.which("socat") is None:
            return "socat is not installed"
        return None

    def _commands(self, listen, target):
        # UDP-LISTEN,fork hands each new client to a child process whose socket is
        # connected to that client, with its own upstream socket: per-client associations,
        # like every other peer. (UDP-RECVFROM,fork would fork per datagram.)
        host, port = listen
        return [["socat", "-T", "60",
                 f"UDP4-LISTEN:{port},bind={host},fork,reuseaddr,rcvbuf={RCVBUF}",
                 f"UDP4:{hostport(target)},rcvbuf={RCVBUF}"]]


class V2rayDokodemo(Peer):
    name = "v2ray-dokodemo"
    note = "dokodemo-door (udp) -> freedom"

    @classmethod
    def unavailable(cls, mode):
        if shutil.which("v2ray") is None:
            return "v2ray is not installed"
        return None

    def _commands(self, listen, target):
        host, port = listen
        inbound = {"listen": host, "port": port, "protocol": "dokodemo-door", "tag": "in"}
        if target is None:
            inbound["settings"] = {"network": "udp", "followRedirect": True}
            inbound["streamSettings"] = {"sockopt": {"tproxy": "tproxy"}}
        else:
            inbound["settings"] = {"address": target[0], "port": target[1], "network": "udp"}
        config = {
            "log": {"loglevel": "warning", "access": "none"},
            "inbounds": [inbound],
            "outbounds": [{"protocol": "freedom", "settings": {},
                           "streamSettings": {"sockopt": {"mark": MARK}}}],
        }
        path = os.path.join(self.workdir, f"v2ray-{self.mode}.json")
        with open(path, "w") as f:
            json.dump(config, f, indent=1)
        return [["v2ray", "-config", path]]


class _Shadowsocks(Peer):
    modes = ()
    note = f"client -> ss-server on loopback, {SS_CIPHER}"

    @classmethod
    def unavailable(cls, mode):
        if mode not in cls.modes:
            return f"{cls.name} has no {mode} mode"
        for b in (cls.binary, "ss-server"):
            if shutil.which(b) is None:
                return f"{b} is not installed (shadowsocks-libev)"
        return None

    def _ports(self, listen):
        return [(SS_PORT, 1), (listen[1], 1)]

    def _commands(self, listen, target):
        common = ["-k", "relaybench", "-m", SS_CIPHER, "-U", "-t", "60"]
        server = ["ss-server", "-s", "127.0.0.1", "-p", SS_PORT] + common
        host, port = listen
        client = [self.binary, "-s", "127.0.0.1", "-p", SS_PORT, "-b", host, "-l", port] + common
        if target is not None:
            client += ["-L", hostport(target)]
        return [server, client]


class SsTunnel(_Shadowsocks):
    name = "ss-tunnel"
    binary = "ss-tunnel"
    modes = ("forward",)


class SsRedir(_Shadowsocks):
    name = "ss-redir"
    binary = "ss-redir"
    modes = ("redir",)


# ---------------------------------------------------------------------------------------
# relay itself

@functools.lru_cache(maxsize=None)
def relay_help(mode):
    """(help text, None) when ``relay <mode> --help`` works, else (None, reason)."""
    try:
        r = subprocess.run([sys.executable, "-m", "relay.cli", mode, "--help"], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None, f"`python -m relay.cli {mode} --help` timed out"
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["no output"])[-1]
        return None, f"`python -m relay.cli {mode} --help` failed: {last}"
    return r.stdout, None


def relay_offload_flags(mode="forward"):
    """(flags that turn the bulk path on, flags that turn it off), or None when
    ``relay <mode> --help`` shows no such option. The bulk path (UDP_GRO in, runs as
    UDP_SEGMENT sends out) is ``--offload on|off`` (default auto: on where the kernel has
    it); a relay from before that option had ``--gro`` (off unless given)."""
    text, _ = relay_help(mode)
    opts = set(re.findall(r"--[a-z][a-z0-9-]*", text or ""))
    if "--offload" in opts:
        return ["--offload", "on"], ["--offload", "off"]
    if "--gro" not in opts:
        return None
    return ["--gro"], []


class Relay(Peer):
    """``relay forward`` / ``relay redir`` with a reply mode, a worker count and, for the
    bulk rows, the bulk path (GRO/GSO) on or off."""

    def __init__(self, ns, workdir, mode, tools=None, workers=1, reply="raw", offload=None):
        super().__init__(ns, workdir, mode, tools)
        self.workers, self.reply, self.offload = workers, reply, offload

    @classmethod
    def variant(cls, name, **opts):
        """A Relay subclass with fixed options (name is the row label)."""
        modes = ("redir",) if "reply" in opts else ("forward",)
        note = [f"{opts.get('workers', 1)} worker(s)"]
        if "reply" in opts:
            note.append(f"--reply {opts['reply']}")
        if opts.get("offload") is not None:
            note.append(f"bulk path {'on' if opts['offload'] else 'off'}")
        return type(f"Relay_{name}", (cls,), {
            "name": name, "modes": modes, "opts": opts, "note": ", ".join(note),
            "__init__": functools.partialmethod(cls.__init__, **opts),
        })

    @classmethod
    def unavailable(cls, mode):
        base = super().unavailable(mode)
        if base:
            return base
        _, reason = relay_help(mode)
        if reason:
            return reason
        offload = getattr(cls, "opts", {}).get("offload")
        if offload is not None and relay_offload_flags(mode) is None:
            return f"`relay {mode} --help` shows no bulk-path (--offload) option"
        return None

    def _ports(self, listen):
        return [(listen[1], self.workers)]      # one SO_REUSEPORT socket per worker

    def _commands(self, listen, target):
        args = [sys.executable, "-m", "relay.cli", self.mode, "--listen", hostport(listen)]
        if target is not None:
            args += ["--to", hostport(target)]
        else:
            args += ["--reply", self.reply]
        args += ["--workers", self.workers]
        text, _ = relay_help(self.mode)
        if "--control" in text:
            # A control socket of its own: never the system-wide default path.
            args += ["--control", os.path.join(self.workdir, f"{self.name}.sock")]
        if "--log-level" in text:
            args += ["--log-level", "warning"]
        if self.offload is not None:
            on, off = relay_offload_flags(self.mode)
            args += on if self.offload else off
        return [args]


def anchors(mode):
    """The limits every row is compared with: C, C with GRO/GSO, the kernel (forward). The
    C limits read no TUN: tun rows are compared with redir's (harness.add_ratios)."""
    if mode == "tun":
        return []
    return [CLimit, CLimitGso, Kernel]


class RelayTun(Relay):
    """``relay tun`` on the bench's TUN device (bench/topo.py tun_route), offload on or off;
    started once the device has a queue attached (carrier)."""

    modes = ("tun",)

    @classmethod
    def variant(cls, name, **opts):
        note = f"{opts.get('workers', 1)} worker(s), --offload {opts['offload']}"
        return type(f"RelayTun_{name}", (cls,), {
            "name": name, "opts": opts, "note": note,
            "__init__": functools.partialmethod(cls.__init__, **opts)})

    @classmethod
    def unavailable(cls, mode):
        return Peer.unavailable.__func__(cls, mode) or relay_help("tun")[1]

    def _ports(self, listen):
        return []

    def _commands(self, listen, target):
        from bench.topo import TUN_DEV
        args = [sys.executable, "-m", "relay.cli", "tun", "--dev", TUN_DEV, "--offload",
                self.offload, "--workers", self.workers,
                "--control", os.path.join(self.workdir, f"{self.name}.sock"),
                "--log-level", "warning"]
        return [args]

    def start(self, listen, target):
        from bench.topo import TUN_DEV
        super().start(listen, target)
        deadline = time.monotonic() + 20
        while "LOWER_UP" not in self.ns.run("ip", "link", "show", TUN_DEV).stdout:
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                tail = self.log_tail()
                self.stop()
                raise PeerError(f"{self.name} did not attach to {TUN_DEV}: {tail}")
            time.sleep(0.02)
        return self


def relay_peers(mode, nworkers):
    """The relay rows of a mode: 1 worker and N workers with the defaults (and both reply
    ways for redir), and 1 worker with --offload off (tun: offload off and on)."""
    if mode == "tun":
        return [RelayTun.variant("relay-tun-plain-1w", workers=1, offload="off"),
                RelayTun.variant("relay-tun-offload-1w", workers=1, offload="on"),
                RelayTun.variant("relay-tun-offload-Nw", workers=nworkers, offload="on")]
    if mode == "forward":
        return [Relay.variant("relay-1w", workers=1),
                Relay.variant("relay-Nw", workers=nworkers),
                Relay.variant("relay-nooffload-1w", workers=1, offload=False)]
    out = []
    for reply in ("raw", "transparent"):
        out.append(Relay.variant(f"relay-{reply}-1w", workers=1, reply=reply))
        out.append(Relay.variant(f"relay-{reply}-Nw", workers=nworkers, reply=reply))
    out.append(Relay.variant("relay-raw-nooffload-1w", workers=1, reply="raw", offload=False))
    return out


def offload_peers(mode):
    """relay with the bulk path (GRO in, GSO out) off and on, 1 worker (tun: --offload)."""
    if mode == "tun":
        return relay_peers("tun", 1)[:2]
    extra = {"reply": "raw"} if mode == "redir" else {}
    return [Relay.variant("relay-bulk-off", workers=1, offload=False, **extra),
            Relay.variant("relay-bulk-on", workers=1, offload=True, **extra)]


def third_party(mode):
    """Everything users run instead of relay, in row order (unavailable ones included)."""
    if mode == "forward":
        return [PythonLoop, AsyncioUvloop, Socat, V2rayDokodemo, SsTunnel]
    if mode == "tun":
        return []          # no TUN-based relay (tun2socks, hev-socks5-tunnel) installed here
    return [PythonLoop, AsyncioUvloop, Socat, V2rayDokodemo, SsRedir]


# ---------------------------------------------------------------------------------------
# The two Python relays (run in the middle namespace as `python -m bench.peers ...`).

def _parse_addr(text):
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def _origdst(ancdata):
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_RECVORIGDSTADDR and len(data) >= 8:
            port, = struct.unpack_from("!H", data, 2)
            return socket.inet_ntoa(data[4:8]), port
    return None


def python_loop(listen, target, tproxy):
    """A plain relay: selectors over the listen socket and one socket per client."""
    lsock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
    if tproxy:
        lsock.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        lsock.setsockopt(socket.IPPROTO_IP, IP_RECVORIGDSTADDR, 1)
    lsock.bind(listen)
    lsock.setblocking(False)
    sel = selectors.EpollSelector()
    sel.register(lsock, selectors.EVENT_READ, None)
    assoc = {}

    def upstream(client, dst):
        up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        up.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
        up.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        up.connect(dst)
        up.setblocking(False)
        a = [up, client, dst, None]
        sel.register(up, selectors.EVENT_READ, a)
        return a

    def reply_socket(a):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IP, IP_TRANSPARENT, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
        s.bind(a[2])
        s.setblocking(False)
        a[3] = s
        return s

    while True:
        for key, _ in sel.select():
            a = key.data
            if a is None:
                for _ in range(64):
                    try:
                        if tproxy:
                            data, anc, _flags, client = lsock.recvmsg(65535, 256)
                            dst = _origdst(anc)
                            if dst is None:
                                continue
                        else:
                            data, client = lsock.recvfrom(65535)
                            dst = target
                    except BlockingIOError:
                        break
                    k = (client, dst)
                    a = assoc.get(k)
                    if a is None:
                        a = assoc[k] = upstream(client, dst)
                    try:
                        a[0].send(data)
                    except OSError:
                        pass
            else:
                out = (a[3] or reply_socket(a)) if tproxy else lsock
                for _ in range(64):
                    try:
                        data = a[0].recv(65535)
                    except BlockingIOError:
                        break
                    except OSError:      # ICMP error from an earlier datagram
                        continue
                    try:
                        out.sendto(data, a[1])
                    except OSError:
                        pass


def asyncio_uvloop(listen, target):
    """A DatagramProtocol relay on uvloop: one connected endpoint per client."""
    import asyncio

    import uvloop

    class Upstream(asyncio.DatagramProtocol):
        def __init__(self, front, client):
            self.front, self.client = front, client

        def datagram_received(self, data, addr):
            self.front.transport.sendto(data, self.client)

        def error_received(self, exc):
            pass

    class Front(asyncio.DatagramProtocol):
        def __init__(self, loop):
            self.loop = loop
            self.assoc = {}

        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, client):
            a = self.assoc.get(client)
            if a is None:
                a = self.assoc[client] = [None, [data]]
                self.loop.create_task(self.open(client, a))
            elif a[0] is None:
                if len(a[1]) < 1024:
                    a[1].append(data)
            else:
                a[0].sendto(data)

        async def open(self, client, a):
            t, _ = await self.loop.create_datagram_endpoint(
                lambda: Upstream(self, client), remote_addr=target)
            for d in a[1]:
                t.sendto(d)
            a[0], a[1] = t, None

    async def serve():
        loop = asyncio.get_running_loop()
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)
        s.bind(listen)
        await loop.create_datagram_endpoint(lambda: Front(loop), sock=s)
        await asyncio.Event().wait()

    uvloop.install()
    asyncio.run(serve())


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.peers",
                                description="Reference Python UDP relays for the benchmark")
    p.add_argument("impl", choices=["python-loop", "asyncio-uvloop"])
    p.add_argument("--listen", required=True, help="HOST:PORT")
    p.add_argument("--to", help="HOST:PORT (forward)")
    p.add_argument("--tproxy", action="store_true",
                   help="receive TPROXY'd datagrams, forward to the original destination")
    a = p.parse_args(argv)
    if bool(a.to) == a.tproxy:
        p.error("give exactly one of --to and --tproxy")
    listen = _parse_addr(a.listen)
    target = _parse_addr(a.to) if a.to else None
    try:
        if a.impl == "python-loop":
            python_loop(listen, target, a.tproxy)
        else:
            if a.tproxy:
                p.error("asyncio-uvloop has no --tproxy mode")
            asyncio_uvloop(listen, target)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
