"""Health of several upstreams (--upstream repeated), checked in the background.

The data path reads one flag per upstream (relay/datapath/tunnel_balance.pxi,
pure/balance.py); this module sets the flags, off the data path, in one thread per
listener and worker:

- tunnel:// : a TCP connection and the handshake (the secret proved), then closed; and
  besides, its core's own connection: the flag is down the moment that connection is lost
  (a server that stops), and when a check fails (a path that drops everything silently);
- gost:// : a TCP connection and the gost handshake (CMD 0xF3, RFC 1929 when the URL has
  credentials), then closed;
- direct : the route (a UDP socket connected, nothing sent): to forward's --to, or for
  redir to ROUTE_PROBES, an address of each family that only a default route reaches
  (healthy when either family has a route);
- socks5:// : the control connection and a UDP ASSOCIATE that must succeed, then closed;

every HEALTH_INTERVAL seconds, all at the same time, each check given HEALTH_TIMEOUT seconds
(relay/config.py).
The thread also publishes each upstream's health and flows for `relay stats`
(relay.stats.UpstreamRegion) after every check and every PUBLISH_INTERVAL between them.
"""
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from relay import proto as _proto
from relay.config import HEALTH_INTERVAL, HEALTH_TIMEOUT
from relay.net import sockopt

log = logging.getLogger("relay")
ROUTE_PROBES = (("198.18.0.1", 9), ("2001:2::1", 9))    # benchmarking ranges (RFC 2544, 5180)
PUBLISH_INTERVAL = 0.25     # seconds between publications of health and flows (relay stats)


def by_conn(up):
    """Is upstream ``up``'s health also its own connection (a multiplexed tunnel)?"""
    return up.kind == "tunnel"


def route_probe(targets, mark=None):
    """None when the kernel has a route to one of ``targets`` ((host, port), IP literals),
    else why not. Nothing is sent: connect() on a UDP socket only looks the route up."""
    why = "no target"
    for host, port in targets:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        try:
            with socket.socket(fam, socket.SOCK_DGRAM) as s:
                if mark:
                    s.setsockopt(socket.SOL_SOCKET, sockopt.SO_MARK, mark)
                s.connect((host, port))
                return None
        except OSError as e:
            why = f"no route to {host}: {e.strerror or e}"
    return why


def probe(up, timeout=HEALTH_TIMEOUT, secret=None, mark=None, direct_to=None):
    """Check upstream ``up`` (relay.net.addr.Upstream) once: None when healthy, else why not
    (direct: the route to ``direct_to``, or to ROUTE_PROBES)."""
    if up.kind == "direct":
        return route_probe([direct_to] if direct_to else ROUTE_PROBES, mark)
    try:
        infos = socket.getaddrinfo(up.host, up.port, 0, socket.SOCK_STREAM)
    except OSError as e:
        return f"cannot resolve {up.host}: {e}"
    fam, _, _, _, addr = infos[0]
    if up.kind == "socks5":
        hs = _proto.ClientHandshake(cmd=_proto.CMD_UDP_ASSOCIATE,
                                    host="::" if fam == socket.AF_INET6 else "0.0.0.0",
                                    user=up.user, password=up.password)
    else:
        hs = _proto.ClientHandshake(
            cmd=_proto.CMD_UDP_TUN if up.kind == "gost" else _proto.CMD_UDP_TUN_MUX,
            secret=None if up.kind == "gost" else secret, user=up.user, password=up.password)
    try:
        with socket.socket(fam, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            if mark:
                s.setsockopt(socket.SOL_SOCKET, sockopt.SO_MARK, mark)
            s.connect(addr)
            s.sendall(hs.start())
            while not hs.done:
                data = s.recv(4096)
                if not data:
                    return "the server closed the connection during the handshake"
                out = hs.feed(data)
                if out:
                    s.sendall(out)
    except socket.timeout:
        return "timed out"
    except (OSError, ValueError) as e:
        return str(e) or type(e).__name__
    return None


class HealthChecker:
    """The background checks of one balancing core: ``core`` (BalancedUpstream) over
    ``upstreams`` (relay.net.addr.Upstream, in the core's order); ``publish`` a writable
    uint64 memoryview (relay.stats.UpstreamRegion.slot) or None."""

    def __init__(self, core, upstreams, *, secret=None, mark=None, publish=None,
                 interval=HEALTH_INTERVAL, timeout=HEALTH_TIMEOUT, name="upstream",
                 direct_to=None):
        self.core, self.upstreams, self.direct_to = core, list(upstreams), direct_to
        self.secret, self.mark, self.publish = secret, mark, publish
        self.interval, self.timeout = interval, timeout
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"health-{name}")
        self.last = [None] * len(self.upstreams)     # why each was down at the last check
                                                     # (None: healthy; so at the start)

    def start(self):
        self.thread.start()
        return self

    def check_once(self, pool=None):
        """One round: probe the upstreams (at the same time on ``pool``, a thread pool, so
        one that times out delays no other), set the core's flags, publish."""
        whys = list((pool.map if pool is not None else map)(
            lambda up: probe(up, self.timeout, secret=self.secret, mark=self.mark,
                             direct_to=self.direct_to), self.upstreams))
        if self.stop_event.is_set():
            return
        for i, (up, why) in enumerate(zip(self.upstreams, whys)):
            if why is not None and self.last[i] is None:
                log.warning("upstream %s is down: %s", up, why)
            elif why is None and self.last[i] is not None:
                log.warning("upstream %s is healthy again", up)
            self.last[i] = why
            self.core.set_health(i, why is None)
        self.publish_now()

    def publish_now(self):
        if self.publish is None:
            return
        from relay.stats import publish_upstreams
        publish_upstreams(self.publish, self.core.health, self.core.upstream_flows())

    def _run(self):
        next_check = 0.0
        # its threads start from this one, with the capabilities a mark needs
        with ThreadPoolExecutor(len(self.upstreams), thread_name_prefix=self.thread.name) as pool:
            while not self.stop_event.is_set():
                try:
                    if time.monotonic() >= next_check:
                        next_check = time.monotonic() + self.interval
                        self.check_once(pool)
                    else:
                        self.publish_now()
                except Exception:            # a check must never take the listener down
                    log.exception("upstream health check failed; retrying")
                self.stop_event.wait(max(0.0, min(PUBLISH_INTERVAL,
                                                  next_check - time.monotonic())))

    def stop(self):
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(self.timeout + 1.0)
