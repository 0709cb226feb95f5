"""`forward` and `redir`: the UDP redirection services (data path in relay.datapath.engine).

With ``--upstream`` the engine hands datagrams to an upstream core (relay._select's
"tunnel" part: TunnelUpstream, Socks5Upstream). When that part runs in pure Python, the
engine cannot drive it: forward then runs the pure UdpFrontend in front of the core, as
tunnel-client does; redir through an upstream needs the compiled cores."""
import socket
import time

from relay import _select
from relay.config import MAX_UPSTREAM_FLOWS
from relay.net import sockopt
from relay.services import health
from relay.services.base import Requests, Service


class UdpService(Service):
    def __init__(self, cfg, ctx):
        self.cfg = cfg
        self.ctx = ctx
        self.socks = []
        self.engine = self.frontend = self.health = None
        self.requests = Requests()
        redir = cfg.mode == "redir"
        t, native = _select.load("tunnel")
        if redir and not native and (cfg.upstreams or cfg.upstream is not None):
            raise RuntimeError("redir through an upstream needs the compiled relay.datapath.tunnel "
                               "(python setup.py build_ext), which is not in use here")
        try:
            self.listen = sockopt.udp_listen(cfg.listen, transparent=redir, reuseport=ctx.reuseport)
            self.socks.append(self.listen)
            raw4 = raw6 = -1
            # raw replies, and the ICMP errors of --reject in either reply mode
            if redir and (cfg.reply == "raw" or cfg.reject):
                r4 = sockopt.raw_socket(socket.AF_INET, cfg.mark)
                self.socks.append(r4)
                raw4 = r4.fileno()
                if sockopt.ipv6_available():
                    r6 = sockopt.raw_socket(socket.AF_INET6, cfg.mark)
                    self.socks.append(r6)
                    raw6 = r6.fileno()
            up_family = socket.AF_INET6 if sockopt.ipv6_available() else socket.AF_INET
            self.core = make_core(cfg, ctx, t)
            self.health = make_health(cfg, ctx, self.core)
            if self.core is not None and not native:
                self.frontend = t.UdpFrontend(self.listen.fileno(), cfg.to, self.core,
                                              batch=min(cfg.batch, 256), log=ctx.log,
                                              max_flows=upstream_flows(cfg), timeout=cfg.timeout)
                return
            from relay.datapath.engine import Engine
            offload = sockopt.udp_offload(cfg.offload)
            self.engine = Engine(
                self.listen.fileno(), cfg.mode, to=cfg.to, raw4_fd=raw4, raw6_fd=raw6,
                reply=cfg.reply, mark=cfg.mark, timeout=cfg.timeout,
                max_associations=cfg.max_associations, transparent_cache=cfg.transparent_cache,
                transparent_idle=cfg.transparent_idle, batch=cfg.batch, stats=ctx.stats,
                upstream_family=up_family, listen_family=self.listen.family, core=self.core,
                gro=offload, gso=offload, port_timeouts=cfg.port_timeouts(), reject=cfg.reject,
                client_groups=ctx.groups, header_out=cfg.header_out, header_in=cfg.header_in,
                outbound=cfg.outbound() or None,
            )
        except BaseException:
            self.close()
            raise

    def run(self):
        stop = self.ctx.stop
        engine, frontend, requests = self.engine, self.frontend, self.requests
        if self.health is not None:
            self.health.start()
        while not stop.is_set():
            if frontend is not None:
                frontend.poll(100)
                frontend.tick(time.monotonic())
            else:
                engine.run(100)
            requests.serve()

    def flow_source(self):
        return self.engine if self.engine is not None else self.core

    def upstream_label(self):
        up = self.cfg.upstream
        return str(up) if up is not None else "direct"

    def close(self):
        if self.health is not None:
            self.health.stop()
        engine = self.engine
        if engine is not None:
            engine.close()
        if self.frontend is not None:
            self.frontend.close()
        core = getattr(self, "core", None)
        if core is not None:
            core.close()
        for s in self.socks:
            s.close()
        self.socks = []


def upstream_flows(cfg):
    """Flows an upstream core holds: --max-associations, at most MAX_UPSTREAM_FLOWS."""
    return min(cfg.max_associations, MAX_UPSTREAM_FLOWS)


def make_core(cfg, ctx, t=None):
    """The upstream core for --upstream tunnel://, gost:// or socks5:// (classes of module t,
    by default relay._select's choice), or None for direct. It holds upstream_flows(cfg)
    flows, evicting the least recently used at the cap, like the engine's associations.
    Several upstreams: a BalancedUpstream over one core each (--balance)."""
    up = cfg.upstream
    if not cfg.upstreams and (up is None or up.kind == "direct"):
        return None
    if t is None:
        t = _select.module("tunnel")
    mark = cfg.mark or None
    common = dict(mark=mark, stats=ctx.stats, timeout=cfg.timeout, log=ctx.log,
                  max_flows=upstream_flows(cfg), port_timeouts=cfg.port_timeouts(),
                  client_groups=ctx.groups)
    if cfg.upstreams:
        kids = []
        try:
            for u in cfg.upstreams:
                kids.append(_one_core(t, cfg, u, common))
            return balanced_core(t, cfg, ctx, kids, upstream_flows(cfg))
        except BaseException:
            for kid in kids:
                kid.close()
            raise
    return _one_core(t, cfg, up, common)


def balanced_core(t, cfg, ctx, kids, max_flows):
    """A BalancedUpstream (of module t) over kids, the cores of cfg.balanced_upstreams()."""
    ups = cfg.balanced_upstreams()
    return t.BalancedUpstream(kids, [str(u) for u in ups], balance=cfg.balance,
                              by_conn=[health.by_conn(u) for u in ups], stats=ctx.stats,
                              log=ctx.log, max_flows=max_flows, timeout=cfg.timeout,
                              port_timeouts=cfg.port_timeouts())


def make_health(cfg, ctx, core):
    """The background health checks of a core over several upstreams (else None), started
    by the service's thread (which holds the capabilities a mark needs, as its own data
    path does: threads started before the worker dropped privileges have none)."""
    if not cfg.balanced_upstreams() or core is None:
        return None
    return health.HealthChecker(core, cfg.balanced_upstreams(), secret=cfg.secret,
                                mark=sockopt.usable_mark(cfg.mark),
                                publish=getattr(ctx, "upstreams", None), name=cfg.name,
                                direct_to=cfg.to if cfg.mode == "forward" else None)


def _one_core(t, cfg, up, common):
    common = dict(common, outbound=cfg.outbound(up) or None)
    if up.kind == "tunnel":
        return t.TunnelUpstream((up.host, up.port), secret=cfg.secret,
                                connections=cfg.connections, **common)
    if up.kind == "gost":
        return t.TunnelUpstream((up.host, up.port), gost=True, user=up.user,
                                password=up.password, **common)
    if up.kind == "socks5":
        return t.Socks5Upstream((up.host, up.port), user=up.user, password=up.password,
                                **common)
    if up.kind == "direct":                     # one of several upstreams
        return t.DirectUpstream(**common)
    raise ValueError(f"unknown upstream kind {up.kind!r}")


def create(cfg, ctx):
    return UdpService(cfg, ctx)
