"""What the services that face clients share: the open-relay check and the destination
access list with the host's own addresses kept current."""
import ipaddress
import time

from relay import _select
from relay import proto
from relay.net import ifaddr

HOSTS_TOKEN = 0xFFFFFFFF     # poller token of the host-address watch (the others stay < 2**31)
RETRY = 1.0                  # seconds before a failed address dump is tried again


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
    if is_loopback(host) or cfg.insecure:
        return
    if what == "secret" and not (cfg.secret or cfg.user):
        raise ValueError(f"refusing to listen on {host} without --secret or --username/--password "
                         f"(an open relay); pass --insecure to do it anyway")
    if what == "user" and not cfg.user:
        raise ValueError(f"refusing to listen on {host} without --username/--password (an open "
                         f"relay); pass --insecure to do it anyway")


class DestinationAcl:
    """A listener's access list as its data path matches it (``acl``: relay.datapath's Acl,
    compiled or pure, which the service hands to its core and asks for CONNECT), with the
    host's own addresses (relay.net.ifaddr) denied unless cfg.allow_host. The service
    watches ``attach``'s descriptor under HOSTS_TOKEN and calls ``refresh()`` when it is
    readable (an address came or went), and ``tick(now)`` from its loop (a dump that failed
    is tried again). A change reads the addresses again (one netlink dump, in this loop
    between two polls, only when they changed) and builds a new sorted array that takes the
    old one's place in one step: nothing is allocated per datagram."""

    def __init__(self, cfg, log):
        self.log = log
        self.access = proto.AccessList(allow=cfg.allow, deny=cfg.deny, allow_host=cfg.allow_host)
        self.watch = None
        hosts = ()
        if not cfg.allow_host:
            try:
                self.watch = ifaddr.AddressWatch()
            except OSError as e:
                raise ValueError(f"cannot read this host's addresses over netlink ({e}), which "
                                 f"the access list denies; pass --allow-host to do without")
            hosts = self.access.host_keys(self.watch.addresses)
        self.acl = _select.module("tunnel").Acl(self.access.table(), hosts)
        self.retry_at = None
        self.core = None

    def attach(self, core):
        self.core = core
        if self.watch is not None:
            core.watch(self.watch.fileno(), HOSTS_TOKEN)

    def refresh(self, force=False):
        """After the watch became readable (or force: dump whatever the notices say)."""
        if self.watch is None:
            return
        self.retry_at = time.monotonic() + RETRY     # stays set if the dump fails
        changed = self.watch.update(force)
        self.retry_at = None
        if changed:
            self.acl.set_hosts(self.access.host_keys(self.watch.addresses))
            self.log.info("access list: %d host addresses denied (the host's addresses changed)",
                          self.acl.host_count)

    def tick(self, now):
        if self.retry_at is not None and now >= self.retry_at:
            self.refresh(force=True)

    def close(self):
        if self.watch is not None:
            if self.core is not None:
                self.core.unwatch(self.watch.fileno())
            self.watch.close()
