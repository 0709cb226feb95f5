"""`tun`: UDP routed into a TUN device, relayed to its IP destination (data path: relay
._select's "tun" part, TunRelay), replies written back as packets from each remote.

Each worker opens its own queue of the device (IFF_MULTI_QUEUE), so the kernel spreads
flows over the workers; worker 0 gives the device its addresses and MTU and brings it up,
before the worker drops its privileges. Offload (the virtio-net header with UDP
segmentation offload) is chosen at start — ``offload = "auto"`` takes it where the kernel
has it — and logged."""
import os
import socket
import time

from relay import _select
from relay.net import sockopt, tundev
from relay.services.base import Requests, Service
from relay.services.redirect import make_core
from relay.stats import INDEX

DROP_RCVBUF = INDEX["drop_rcvbuf"]


class TunService(Service):
    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.fd = -1
        self.relay = self.core = None
        self.requests = Requests()
        mod, native = _select.load("tun")
        if native and cfg.upstream is not None and not _select.load("tunnel")[1]:
            mod = _select.pure_module("tun")    # the C loop drives compiled cores only
        try:
            self.fd, on = tundev.open_queue(cfg.dev, multi_queue=True, offload=cfg.offload)
            if ctx.index == 0:
                try:
                    tundev.configure(cfg.dev, tundev.parse_addresses(cfg.address or ""),
                                     cfg.mtu)
                except OSError as e:
                    # a restarted worker has dropped its privileges: `ip` cannot run, the
                    # device keeps what the first start gave it
                    if not tundev.is_up(cfg.dev):
                        raise
                    ctx.log.warning("tun %s: left as it is (%s)", cfg.dev, e)
                ctx.log.info("tun %s: %s path (offload %s), mtu %s", cfg.dev,
                             "offload" if on else "plain", cfg.offload,
                             cfg.mtu or tundev.device_mtu(cfg.dev))
            mtu = cfg.mtu or tundev.device_mtu(cfg.dev) or 1500
            self.core = make_core(cfg, ctx)
            self.relay = mod.TunRelay(
                self.fd, vnet=on, mtu=max(1280, mtu), mark=cfg.mark, timeout=cfg.timeout,
                port_timeouts=cfg.port_timeouts(), max_associations=cfg.max_associations,
                batch=cfg.batch, stats=ctx.stats, log=ctx.log, core=self.core,
                upstream_family=socket.AF_INET6 if sockopt.ipv6_available() else socket.AF_INET,
                client_groups=ctx.groups, outbound=cfg.outbound() or None)
            self.offload = on
        except BaseException:
            self.close()
            raise

    def run(self):
        stop, relay = self.ctx.stop, self.relay
        # the device's full-queue drops (one count for all queues): worker 0 reports them
        # in drop_rcvbuf, as the engine reports its listen socket's
        dropped0 = tundev.tx_dropped(self.cfg.dev) if self.ctx.index == 0 else None
        slot = self.ctx.stats if dropped0 is not None else None
        base = slot[DROP_RCVBUF] if slot is not None else 0
        next_read = time.monotonic() + 1.0
        requests = self.requests
        while not stop.is_set():
            relay.run(100)
            requests.serve()
            if slot is not None and time.monotonic() >= next_read:
                next_read = time.monotonic() + 1.0
                now = tundev.tx_dropped(self.cfg.dev)
                if now is not None and now >= dropped0:
                    slot[DROP_RCVBUF] = base + now - dropped0

    def flow_source(self):
        return self.relay

    def close(self):
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        if self.core is not None:
            self.core.close()
            self.core = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def create(cfg, ctx):
    return TunService(cfg, ctx)
