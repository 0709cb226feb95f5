"""`relay tunnel-client`: UDP over TCP, the client end (docs/tunnel.md).

UDP in on --listen, every datagram framed over TCP to a relay tunnel-server (multiplexed)
or, with --gost, to a gost server (CMD 0xF3, one TCP connection per flow). The core is
TunnelUpstream (the same one forward and redir use for --upstream tunnel:// and gost://),
driven by the engine's forward loop; the pure twin puts its UdpFrontend in front instead.
With several --server, one TunnelUpstream each behind a BalancedUpstream (--balance), as
forward and redir do with several --upstream (docs/tunnel.md, "Several upstreams").
"""
import logging
import time

from relay import _select
from relay.config import MAX_UPSTREAM_FLOWS
from relay.net import sockopt
from relay.services.base import Requests, Service
from relay.services.redirect import balanced_core, make_health

log = logging.getLogger("relay.tunnel")

QUEUE_LIMIT = None           # bytes a tunnel-client queues while (re)connecting; None: the core's


class TunnelClientService(Service):
    """One tunnel-client listener: UDP in, frames over TCP to the tunnel server (a relay
    tunnel-server, multiplexed; or a gost server with gost set, one connection per flow)."""

    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        t, native = _select.load("tunnel")
        timeout = cfg.timeout
        max_flows = min(cfg.max_associations, MAX_UPSTREAM_FLOWS)
        kids = []
        try:
            for server in cfg.servers or (cfg.server,):    # several: one core each, balanced
                kids.append(t.TunnelUpstream(
                    server, secret=cfg.secret, connections=cfg.connections,
                    mark=sockopt.usable_mark(cfg.mark), stats=ctx.stats, timeout=timeout,
                    max_flows=max_flows, queue_limit=QUEUE_LIMIT, log=log, gost=cfg.gost,
                    user=cfg.user, password=cfg.password, port_timeouts=cfg.port_timeouts(),
                    client_groups=ctx.groups, outbound=cfg.outbound() or None))
            self.upstream = kids[0] if not cfg.servers else \
                balanced_core(t, cfg, ctx, kids, max_flows)
        except BaseException:
            for kid in kids:
                kid.close()
            raise
        self.health = make_health(cfg, ctx, self.upstream)
        self.requests = Requests()
        self.usock = sockopt.udp_listen(cfg.listen, reuseport=ctx.reuseport)
        self.address = self.usock.getsockname()
        self.engine = self.frontend = None
        batch = min(cfg.batch, 256)
        if native:
            # The engine's forward loop with the tunnel as its upstream core: recvmmsg
            # batches, with --offload UDP_GRO on the listen socket (coalesced receives handed to the
            # core as the datagrams they were), replies sendmmsg'd from the listen socket
            # (on a wildcard address, each from the address its client sent to).
            from relay.datapath.engine import Engine
            offload = sockopt.udp_offload(cfg.offload)
            self.engine = Engine(self.usock.fileno(), "forward", to=tuple(cfg.to),
                                 batch=batch, stats=ctx.stats, core=self.upstream, gro=offload,
                                 gso=offload,
                                 listen_family=self.usock.family, timeout=timeout,
                                 max_associations=max_flows)
        else:
            self.frontend = t.UdpFrontend(self.usock.fileno(), cfg.to, self.upstream,
                                          batch=batch, log=log, max_flows=max_flows,
                                          timeout=timeout)

    def run(self):
        stop = self.ctx.stop
        if self.health is not None:
            self.health.start()
        while not stop.is_set():
            try:
                if self.engine is not None:
                    self.engine.run(50)
                else:
                    self.frontend.poll(50)
                    self.frontend.tick(time.monotonic())
                self.requests.serve()
            except Exception:            # never let one bad event stop the listener
                log.exception("tunnel-client %s: unexpected error; continuing", self.address)
                time.sleep(0.01)

    def flow_source(self):
        return self.upstream

    def upstream_label(self):
        kind = "gost" if self.cfg.gost else "tunnel"
        return f"{kind}://{self.cfg.server[0]}:{self.cfg.server[1]}"

    def close(self):
        if self.health is not None:
            self.health.stop()
        if self.engine is not None:
            self.engine.close()
        if self.frontend is not None:
            self.frontend.close()
        self.upstream.close()
        self.usock.close()


def create(cfg, ctx):
    return TunnelClientService(cfg, ctx)
