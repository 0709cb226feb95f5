"""`forward` and `redir`: the UDP redirection services (data path in relay.datapath.engine)."""
import socket

from relay.net import sockopt
from relay.services.base import Service


class UdpService(Service):
    def __init__(self, cfg, ctx):
        from relay.datapath.engine import Engine

        self.cfg = cfg
        self.ctx = ctx
        self.socks = []
        redir = cfg.mode == "redir"
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
            self.core = make_core(cfg, ctx)
            self.engine = Engine(
                self.listen.fileno(), cfg.mode, to=cfg.to, raw4_fd=raw4, raw6_fd=raw6,
                reply=cfg.reply, mark=cfg.mark, timeout=cfg.timeout,
                max_associations=cfg.max_associations, transparent_cache=cfg.transparent_cache,
                transparent_idle=cfg.transparent_idle, batch=cfg.batch, stats=ctx.stats,
                upstream_family=up_family, listen_family=self.listen.family, core=self.core,
                gro=cfg.gro, reject=cfg.reject,
            )
        except BaseException:
            self.close()
            raise

    def run(self):
        stop = self.ctx.stop
        engine = self.engine
        while not stop.is_set():
            engine.run(100)

    def close(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()
        core = getattr(self, "core", None)
        if core is not None:
            core.close()
        for s in self.socks:
            s.close()
        self.socks = []


def make_core(cfg, ctx):
    """The upstream core for --upstream tunnel://, gost:// or socks5://, or None for direct."""
    up = cfg.upstream
    if up is None or up.kind == "direct":
        return None
    from relay.datapath.tunnel import Socks5Upstream, TunnelUpstream
    mark = cfg.mark or None
    if up.kind == "tunnel":
        return TunnelUpstream((up.host, up.port), secret=cfg.secret, connections=cfg.connections,
                              mark=mark, stats=ctx.stats, timeout=cfg.timeout, log=ctx.log)
    if up.kind == "gost":
        return TunnelUpstream((up.host, up.port), gost=True, user=up.user, password=up.password,
                              mark=mark, stats=ctx.stats, timeout=cfg.timeout, log=ctx.log)
    if up.kind == "socks5":
        return Socks5Upstream((up.host, up.port), user=up.user, password=up.password, mark=mark,
                              stats=ctx.stats, timeout=cfg.timeout, log=ctx.log)
    raise ValueError(f"unknown upstream kind {up.kind!r}")


def create(cfg, ctx):
    return UdpService(cfg, ctx)
