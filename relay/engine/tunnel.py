"""`relay tunnel-server` and `relay tunnel-client`: UDP over TCP (docs/tunnel.md).

The server accepts TCP connections, runs the SOCKS5-style handshake in Python (once per
connection) and hands the connection to ``relay._tunnel.TunnelServer``, whose C loop
moves frames and datagrams (``relay.tunnelproto`` holds a pure-Python fallback of every
core, used when the extension is missing or RELAY_PURE_PYTHON=1). The client is ``relay._tunnel.TunnelUpstream`` (the same core
the engine uses for ``--upstream tunnel://`` and ``gost://``) driven by the engine's forward
loop (``relay._engine.Engine`` with the core as its upstream; the pure fallback puts
``relay.tunnelproto.UdpFrontend`` in front instead); with ``--gost`` it speaks to a gost
server (CMD 0xF3, one TCP connection per flow).
"""
import argparse
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time

from relay import sockopt
from relay import stats as _stats
from relay import tunnelproto as proto
from relay.engine.base import Service, WorkerContext

log = logging.getLogger("relay.tunnel")

HANDSHAKE_TIMEOUT = 10.0
MAX_PENDING = 256            # connections still in their handshake
ACCEPT_BURST = 64
_I = _stats.INDEX


def _core():
    """relay._tunnel, or the pure-Python fallback in relay.tunnelproto when the extension
    is missing or RELAY_PURE_PYTHON=1 (same classes, same counters, much slower)."""
    from relay import _select
    if not _select.pure_forced():
        try:
            from relay import _tunnel
            return _tunnel
        except ImportError:
            log.warning("relay._tunnel is not built: the tunnel runs in pure Python (slow)")
    return proto


def _get(cfg, name, default=None):
    value = getattr(cfg, name, default)
    return default if value is None else value


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def check_exposure(cfg, what=None):
    """Refuse an open relay: a non-loopback listen address needs credentials (a secret
    for tunnel-server, user/password for socks5) unless insecure is set (the
    configuration parser checks this too)."""
    if what is None:
        what = "user" if cfg.mode == "socks5" else "secret"
    host = cfg.listen[0]
    if is_loopback(host) or _get(cfg, "insecure", False):
        return
    if what == "secret" and not (_get(cfg, "secret") or _get(cfg, "user")):
        raise ValueError(f"refusing to listen on {host} without --secret or --user/--password "
                         f"(an open relay); pass --insecure to do it anyway")
    if what == "user" and not _get(cfg, "user"):
        raise ValueError(f"refusing to listen on {host} without --user/--password (an open "
                         f"relay); pass --insecure to do it anyway")


def usable_mark(mark):
    """The SO_MARK to use, or None when it is 0 or cannot be set here (not root)."""
    if not mark:
        return None
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, 36, mark)   # SO_MARK
        return mark
    except OSError as e:
        log.warning("SO_MARK %d unavailable (%s); sockets stay unmarked", mark, e)
        return None
    finally:
        probe.close()


def tcp_listen(addr, reuseport=False, backlog=512):
    host, port = addr[0], addr[1]
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if fam == socket.AF_INET6 and host not in ("::",):
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind((host, port))
        s.listen(backlog)
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


def udp_listen(addr, reuseport=False):
    host, port = addr[0], addr[1]
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, socket.SOCK_DGRAM)
    try:
        if reuseport:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if fam == socket.AF_INET6 and host not in ("::",):
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                s.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
            except OSError:
                pass
        if sockopt.is_wildcard(host):
            sockopt.set_pktinfo(s)      # replies leave from the address each client asked
        s.bind((host, port))
        s.setblocking(False)
    except BaseException:
        s.close()
        raise
    return s


class _Pending:
    __slots__ = ("sock", "hs", "deadline", "peer")

    def __init__(self, sock, hs, deadline, peer):
        self.sock, self.hs, self.deadline, self.peer = sock, hs, deadline, peer


class TunnelServerService(Service):
    """One tunnel-server listener in one worker."""

    def __init__(self, cfg, ctx):
        check_exposure(cfg, "secret")
        self.cfg, self.ctx = cfg, ctx
        self.secret = _get(cfg, "secret")
        self.user, self.password = _get(cfg, "user"), _get(cfg, "password")
        self.st = ctx.stats
        acl = proto.AccessList(allow=_get(cfg, "allow", ()), deny=_get(cfg, "deny", ()))
        self.lsock = tcp_listen(cfg.listen, reuseport=ctx.reuseport)
        self.core = _core().TunnelServer(
            acl.table(), ctx.stats,
            max_flows=min(int(_get(cfg, "max_associations", 4096)), 1 << 20),
            timeout=float(_get(cfg, "timeout", 60.0)),
            batch=min(int(_get(cfg, "batch", 32)), 256),
            mark=usable_mark(_get(cfg, "mark", 0)),
            stall_timeout=float(_get(cfg, "stall_timeout", 5.0)),
            log=log)
        self.core.watch(self.lsock.fileno(), 0)
        self.pending = {}
        self._token = 0
        self.address = self.lsock.getsockname()

    def _count(self, name, n=1):
        self.st[_I[name]] += n

    def run(self):
        stop = self.ctx.stop
        while not stop.is_set():
            try:
                for token, _events in self.core.poll(100):
                    if token == 0:
                        self._accept()
                    else:
                        self._handshake(token)
                now = time.monotonic()
                self.core.tick(now)
                for token in [t for t, p in self.pending.items() if now > p.deadline]:
                    self._reject(token, "handshake timed out")
            except Exception:            # never let one bad event stop the listener
                log.exception("tunnel-server %s: unexpected error; continuing", self.address)
                time.sleep(0.01)

    def _accept(self):
        for _ in range(ACCEPT_BURST):
            try:
                sock, peer = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:        # EMFILE and friends: try again on the next round
                log.warning("accept: %s", e)
                return
            self._count("conn_accepted")
            self._count("conn_open")
            if len(self.pending) >= MAX_PENDING:
                sock.close()
                self._count("conn_open", -1)
                self._count("conn_rejected")
                log.warning("too many connections in their handshake; refused %s", peer[0])
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._token = self._token % 0x7FFFFFFF + 1
            hs = proto.ServerHandshake(secret=self.secret, user=self.user,
                                       password=self.password)
            self.pending[self._token] = _Pending(sock, hs, time.monotonic() + HANDSHAKE_TIMEOUT,
                                                 peer)
            self.core.watch(sock.fileno(), self._token)

    def _reject(self, token, why, reply=b""):
        p = self.pending.pop(token)
        self.core.unwatch(p.sock.fileno())
        if reply:
            try:
                p.sock.send(reply)
            except OSError:
                pass
        p.sock.close()
        self._count("conn_open", -1)
        self._count("conn_rejected")
        log.warning("tunnel client %s refused: %s", p.peer[0], why)

    def _handshake(self, token):
        p = self.pending.get(token)
        if p is None:
            return
        try:
            data = p.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            return self._reject(token, str(e))
        if not data:
            return self._reject(token, "closed during the handshake")
        try:
            out = p.hs.feed(data)
        except proto.HandshakeError as e:
            return self._reject(token, f"{e.reason}: {e}", e.reply)
        try:
            if out:
                p.sock.send(out)
            if not p.hs.done:
                return
            cmd = p.hs.request[0]
            host, port = p.sock.getsockname()[:2]
            p.sock.send(p.hs.reply(proto.REP_SUCCEEDED, host, port))
        except OSError as e:
            return self._reject(token, str(e))
        del self.pending[token]
        self.core.unwatch(p.sock.fileno())
        fd = p.sock.detach()
        slot = self.core.add_conn(fd, cmd == proto.CMD_UDP_TUN_MUX, p.hs.leftover)
        if slot < 0:
            os.close(fd)
            self._count("conn_open", -1)
            self._count("conn_rejected")
            log.warning("tunnel client %s refused: connection table full", p.peer[0])

    def close(self):
        for token in list(self.pending):
            p = self.pending.pop(token)
            p.sock.close()
            self._count("conn_open", -1)
        self.core.close_all()
        self.core.close()
        self.lsock.close()


class TunnelClientService(Service):
    """One tunnel-client listener: UDP in, frames over TCP to the tunnel server (a relay
    tunnel-server, multiplexed; or a gost server with gost set, one connection per flow)."""

    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        t = _core()
        timeout = float(_get(cfg, "timeout", 60.0))
        max_flows = min(int(_get(cfg, "max_associations", 4096)), 65536)
        self.upstream = t.TunnelUpstream(
            cfg.server, secret=_get(cfg, "secret"),
            connections=int(_get(cfg, "connections", 1)),
            mark=usable_mark(_get(cfg, "mark", 0)), stats=ctx.stats,
            timeout=timeout, max_flows=max_flows,
            queue_limit=_get(cfg, "queue_limit"), log=log,
            gost=bool(_get(cfg, "gost", False)), user=_get(cfg, "user"),
            password=_get(cfg, "password"))
        self.usock = udp_listen(cfg.listen, reuseport=ctx.reuseport)
        self.address = self.usock.getsockname()
        self.engine = self.frontend = None
        batch = min(int(_get(cfg, "batch", 32)), 256)
        if t is not proto:
            # The engine's forward loop with the tunnel as its upstream core: recvmmsg
            # batches, UDP_GRO on the listen socket (coalesced receives are handed to the
            # core as the datagrams they were), replies sendmmsg'd from the listen socket
            # (on a wildcard address, each from the address its client sent to).
            from relay._engine import Engine
            self.engine = Engine(self.usock.fileno(), "forward", to=tuple(cfg.to),
                                 batch=batch, stats=ctx.stats, core=self.upstream, gro=True,
                                 listen_family=self.usock.family, timeout=timeout,
                                 max_associations=max_flows)
        else:
            self.frontend = t.UdpFrontend(self.usock.fileno(), cfg.to, self.upstream,
                                          batch=batch, log=log, max_flows=max_flows,
                                          timeout=timeout)

    def run(self):
        stop = self.ctx.stop
        while not stop.is_set():
            try:
                if self.engine is not None:
                    self.engine.run(50)
                else:
                    self.frontend.poll(50)
                    self.frontend.tick(time.monotonic())
            except Exception:            # never let one bad event stop the listener
                log.exception("tunnel-client %s: unexpected error; continuing", self.address)
                time.sleep(0.01)

    def close(self):
        if self.engine is not None:
            self.engine.close()
        if self.frontend is not None:
            self.frontend.close()
        self.upstream.close()
        self.usock.close()


def create(cfg, ctx):
    if cfg.mode == "tunnel-server":
        return TunnelServerService(cfg, ctx)
    if cfg.mode == "tunnel-client":
        return TunnelClientService(cfg, ctx)
    raise ValueError(f"relay.engine.tunnel does not run mode {cfg.mode!r}")


# ----------------------------------------------------------------------------- CLI

class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default unless there is none (same rule as relay.cli)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and action.default not in (None, False, [], argparse.SUPPRESS)
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def _wrap(text):
    import textwrap
    return textwrap.fill(" ".join(text.split()), width=88)


def _common(p):
    p.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="idle time after which a flow is closed")
    p.add_argument("--max-associations", type=int, default=4096, metavar="N",
                   help="flows (per-flow UDP sockets) at most")
    p.add_argument("--mark", type=int, default=0, help="SO_MARK on the sockets (0: none)")
    p.add_argument("--batch", type=int, default=32, metavar="N",
                   help="datagrams per recvmmsg/sendmmsg call")
    p.add_argument("--name", default=None, help="listener name in logs and stats")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="log level (stderr)")


def add_cli(subparsers):
    """Register `tunnel-server` and `tunnel-client` on an argparse subparsers object."""
    s = subparsers.add_parser(
        "tunnel-server", formatter_class=_Formatter,
        help="UDP-over-TCP tunnel server (gost-compatible framing)",
        description=_wrap("Accept tunnel clients (relay tunnel-client, gost's UDP-over-TCP) and "
                          "send their datagrams from a UDP socket per flow; replies go back "
                          "framed. Destinations in loopback, link-local, private and other "
                          "special ranges are refused unless --allow'ed (docs/tunnel.md)."))
    s.add_argument("--listen", required=True, metavar="HOST:PORT", help="TCP address to listen on")
    s.add_argument("--secret", default=None,
                   help="shared secret clients must prove (HMAC-SHA256 challenge); a "
                        "non-loopback address needs it or --user/--password, unless --insecure")
    s.add_argument("--user", default=None,
                   help="username for clients that cannot prove a secret, such as gost clients "
                        "(RFC 1929; sent in clear, unlike --secret); with --secret as well, "
                        "relay clients prove the secret and gost clients log in")
    s.add_argument("--password", default=None, help="password that goes with --user")
    s.add_argument("--allow", action="append", default=[], metavar="CIDR",
                   help="destinations to allow (repeat or comma-separate)")
    s.add_argument("--deny", action="append", default=[], metavar="CIDR",
                   help="destinations to deny (repeat or comma-separate)")
    s.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback listen address without --secret or "
                        "--user/--password (open relay)")
    _common(s)
    s.set_defaults(func=_run_cli, mode="tunnel-server")

    c = subparsers.add_parser(
        "tunnel-client", formatter_class=_Formatter,
        help="UDP-over-TCP tunnel client",
        description=_wrap("Receive UDP on --listen and carry every datagram to --to through a "
                          "relay tunnel-server; each client address is its own flow, "
                          "multiplexed over --connections TCP connections that reconnect with "
                          "backoff. With --gost the server is a gost server instead: every "
                          "flow gets its own TCP connection (CMD 0xF3), opened when the flow "
                          "starts and closed when it idles out (docs/tunnel.md)."))
    c.add_argument("--server", required=True, metavar="HOST:PORT", help="the tunnel server")
    c.add_argument("--listen", required=True, metavar="HOST:PORT", help="UDP address to listen on")
    c.add_argument("--to", required=True, metavar="HOST:PORT",
                   help="destination of every datagram, as seen from the server")
    c.add_argument("--secret", default=None,
                   help="shared secret of a relay tunnel-server (not with --gost)")
    c.add_argument("--connections", type=int, default=None, metavar="N",
                   help="TCP connections to spread flows over (default: 1; refused with "
                        "--gost, which opens one connection per flow)")
    c.add_argument("--gost", action="store_true",
                   help="the server is a gost server (gost -L socks5://...): gost's UDP "
                        "tunnel, one TCP connection per flow; empty datagrams cannot be "
                        "carried and are dropped (counted in drop_malformed)")
    c.add_argument("--user", default=None,
                   help="with --gost: username for the server (RFC 1929)")
    c.add_argument("--password", default=None, help="with --gost: password for the server")
    _common(c)
    c.set_defaults(func=_run_cli, mode="tunnel-client")


def _split_cidrs(values):
    out = []
    for v in values or ():
        out.extend(x for x in v.replace(" ", ",").split(",") if x)
    return out


def config_from_args(args):
    """A validated ListenerConfig (relay.config) from parsed tunnel/socks5 arguments."""
    from relay.config import parse_config
    lc = {"name": args.name or args.mode, "mode": args.mode, "listen": args.listen,
          "timeout": args.timeout, "max_associations": args.max_associations,
          "mark": args.mark, "batch": args.batch}
    for key in ("secret", "user", "password", "server", "to"):
        if getattr(args, key, None) is not None:
            lc[key] = getattr(args, key)
    if getattr(args, "connections", None) is not None and args.mode == "tunnel-client":
        lc["connections"] = args.connections
    if getattr(args, "gost", False):
        lc["gost"] = True
    if getattr(args, "insecure", False):
        lc["insecure"] = True
    for key in ("allow", "deny"):
        cidrs = _split_cidrs(getattr(args, key, None))
        if cidrs:
            lc[key] = cidrs
    config = parse_config({"global": {"workers": 1}, "listener": [lc]}, source="command line")
    return config.listeners[0]


def run_in_process(cfg, *, ready=None):
    """Run one listener in this process until SIGINT/SIGTERM; returns an exit code."""
    region = _stats.StatsRegion(1)
    ctx = WorkerContext(index=0, stats=region.slot(0), reuseport=False)
    from relay.engine import create_service
    service = create_service(cfg, ctx)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: ctx.stop.set())
    log.info("%s listening on %s", cfg.mode, service.address)
    if ready:
        ready(service)
    try:
        service.run()
    finally:
        service.close()
        log.info("%s stopped: %s", cfg.mode,
                 {k: v for k, v in region.read(0).items() if v})
    return 0


def _run_cli(args):
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s relay[%(process)d] %(levelname)s %(message)s",
                        stream=sys.stderr)
    try:
        cfg = config_from_args(args)
    except ValueError as e:
        print(f"relay {args.mode}: error: {e}", file=sys.stderr)
        return 2
    try:
        return run_in_process(cfg)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"relay {args.mode}: error: {e}", file=sys.stderr)
        return 1


def main(argv=None):
    """`python -m relay.engine.tunnel tunnel-server|tunnel-client|socks5 ...`"""
    p = argparse.ArgumentParser(prog="relay")
    sub = p.add_subparsers(dest="command", required=True)
    add_cli(sub)
    from relay.engine import socks5
    socks5.add_cli(sub)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
