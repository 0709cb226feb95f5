"""Several upstreams behind one listener, in pure Python (twin of
relay.datapath.tunnel.BalancedUpstream, relay/datapath/tunnel_balance.pxi).

A balancing core owns N child cores (TunnelUpstream, Socks5Upstream) and gives each flow
(client address and port) to one of them: ``failover``: the first healthy upstream of the
list; ``hash``: the healthy upstream of highest rendezvous (HRW) score for the client's IP
address, so all flows of a client share one upstream and losing an upstream moves only the
clients it had. A flow whose upstream is down moves to the next healthy one
(``upstream_failover``), and the upstream it left ends it (``forget``); failover mode leaves moved flows where they are when the first
upstream comes back (new flows go to it), hash mode moves them back to their own upstream.
Health is not looked at on the data path beyond one flag per upstream: what
relay.services.health's background checks last said (set_health), and for a multiplexed
tunnel also its own TCP connection (up while its handshake is done).
"""
import collections
import ipaddress
import select as _select
import time as _time

from relay.flows import balanced_rows
from relay.datapath.pure.common import canonical
from relay.datapath.pure.tunnel_upstream import UpstreamBase
from relay.datapath.timeouts import ExpiryLists

BALANCE_MODES = ("failover", "hash")
MAX_UPSTREAMS = 16
_M64 = (1 << 64) - 1


def mix64(x):
    """murmur3's 64-bit finalizer (relay/datapath/table.pxd mix64)."""
    x ^= x >> 33
    x = (x * 0xff51afd7ed558ccd) & _M64
    x ^= x >> 33
    x = (x * 0xc4ceb9fe1a85ec53) & _M64
    x ^= x >> 33
    return x


def upstream_seed(name):
    """The HRW seed of an upstream: FNV-1a (64 bits) of its name (URL without credentials),
    so every worker and every restart ranks the same way."""
    h = 0xcbf29ce484222325
    for b in name.encode():
        h = ((h ^ b) * 0x100000001b3) & _M64
    return h


def client_words(host):
    """(family, high, low): the client IP address as the C side reads its table key (an
    IPv4-mapped IPv6 address as IPv4; 16 bytes, big-endian halves)."""
    ip = ipaddress.ip_address(canonical((host, 0))[0])
    raw = ip.packed.ljust(16, b"\0")
    return (4 if ip.version == 4 else 6, int.from_bytes(raw[:8], "big"),
            int.from_bytes(raw[8:], "big"))


def hrw_score(words, seed):
    fam, hi, lo = words
    return mix64(mix64(mix64(seed ^ fam) ^ hi) ^ lo)


def hrw_order(host, seeds):
    """Upstream indices for client IP ``host``, best first (ties: the lower index)."""
    w = client_words(host)
    return sorted(range(len(seeds)), key=lambda i: (-hrw_score(w, seeds[i]), i))


class BalancedUpstream(UpstreamBase):
    """Routes flows over ``upstreams`` (child cores); see the module text. ``names`` are
    their URLs without credentials (the hash seeds, `relay stats`); upstream i is healthy
    while set_health last said so (healthy until told otherwise) and, ``by_conn[i]`` true
    (a multiplexed TunnelUpstream), its own connection is up. At most ``max_flows`` flows, the
    least recently used forgotten at the cap, idle ones after their timeout (the children's
    cap and timeouts: a child ends its own flows and counts them)."""

    def __init__(self, upstreams, names, balance="failover", by_conn=None, stats=None,
                 log=None, max_flows=4096, timeout=60.0, port_timeouts=()):
        upstreams, names = list(upstreams), [str(n) for n in names]
        if not 1 <= len(upstreams) <= MAX_UPSTREAMS:
            raise ValueError(f"1-{MAX_UPSTREAMS} upstreams, got {len(upstreams)}")
        if len(names) != len(upstreams):
            raise ValueError("one name per upstream")
        if balance not in BALANCE_MODES:
            raise ValueError(f"balance must be one of {', '.join(BALANCE_MODES)}, got {balance!r}")
        if not 1 <= max_flows <= 65536:
            raise ValueError(f"max_flows must be 1-65536, got {max_flows}")
        super().__init__(stats, log)
        self.kids, self.names, self.hashed = upstreams, names, balance == "hash"
        self.seeds = [upstream_seed(n) for n in names]
        self.by_conn = [bool(b) for b in (by_conn or [False] * len(upstreams))]
        self.healthy = [True] * len(upstreams)
        self.probe_ok = [True] * len(upstreams)
        self.nflows = [0] * len(upstreams)
        self.max_flows = max_flows
        self.flows = collections.OrderedDict()   # key -> [upstream, own upstream], LRU first
        self.expiry = ExpiryLists(timeout, port_timeouts)
        self.byfd = {}
        for i, kid in enumerate(upstreams):
            kid.reply = self._from_kid
            self.byfd[kid.fileno()] = i
            self.ep.register(kid.fileno(), _select.EPOLLIN)
        self._conn_health()

    # -- what stats, health checks and `relay flows` read
    @property
    def upstream_names(self):
        """The upstreams' URLs without credentials: flow_upstream's indices name these."""
        return list(self.names)

    @property
    def health(self):
        return list(self.healthy)

    def set_health(self, i, ok):
        """Upstream i's health from a background check."""
        self.probe_ok[i] = bool(ok)
        if not self.by_conn[i]:
            self.healthy[i] = bool(ok)
        self._conn_health()

    def upstream_flows(self):
        """Flows on each upstream now."""
        return list(self.nflows)

    def flow_upstream(self, client):
        """The index of the upstream flow ``client`` (host, port) uses, or None."""
        fl = self.flows.get(canonical(client))
        return None if fl is None else fl[0]

    def order(self, host):
        """The upstreams a new flow of client IP ``host`` would try, first choice first."""
        return hrw_order(host, self.seeds) if self.hashed else list(range(len(self.kids)))

    @property
    def connected(self):
        return sum(getattr(k, "connected", 0) for k in self.kids)

    @property
    def flows_open(self):
        return len(self.flows)

    def snapshot(self, n, sort, by_client=False, clients_cap=4096):
        """relay flows rows of every child (relay.flows.balanced_rows)."""
        return balanced_rows(self.kids, self.names, n, sort, by_client, clients_cap)

    # -- choosing
    def _pick(self, host):
        """(the healthy upstream of best rank, the best one whatever its health)."""
        order = self.order(host)
        for i in order:
            if self.healthy[i]:
                return i, order[0]
        return order[0], order[0]

    def _move(self, client, fl, to):
        self.kids[fl[0]].forget(client)
        self.nflows[fl[0]] -= 1
        self.nflows[to] += 1
        fl[0] = to
        self._count("upstream_failover")

    def send(self, client, dst, data):
        key = canonical(client)
        fl = self.flows.get(key)
        if fl is None:
            if len(self.flows) >= self.max_flows:
                self._forget(next(iter(self.flows)))
            cur, own = self._pick(key[0])
            fl = self.flows[key] = [cur, own]
            self.nflows[cur] += 1
            self.expiry.add(key, dst[1], self.now)
        else:
            self.flows.move_to_end(key)
            self.expiry.touch(key, self.now)
            if not self.healthy[fl[0]]:
                to = self._pick(key[0])[0]
                if to != fl[0] and self.healthy[to]:
                    self._move(client, fl, to)
            elif self.hashed and fl[0] != fl[1] and self.healthy[fl[1]]:
                self._move(client, fl, fl[1])
        self.kids[fl[0]].send(client, dst, data)

    def _forget(self, key):
        fl = self.flows.pop(key)
        self.expiry.remove(key)
        self.nflows[fl[0]] -= 1

    def _from_kid(self, client, src, data):
        key = canonical(client)
        if key in self.flows:
            self.flows.move_to_end(key)
            self.expiry.touch(key, self.now)
        if self.reply is not None:
            self.reply(client, src, data)

    def flush(self):
        for k in self.kids:
            k.flush()

    def _conn_health(self):
        for i, k in enumerate(self.kids):
            if self.by_conn[i]:
                self.healthy[i] = self.probe_ok[i] and k.connected > 0

    def process(self):
        for fd, _ev in self.ep.poll(0, 64):
            i = self.byfd.get(fd)
            if i is not None:
                self.kids[i].process()
        self._conn_health()

    def tick(self, now=0):
        now = now or _time.monotonic()
        self.now = now
        for k in self.kids:
            k.tick(now)
        self._conn_health()
        for key in self.expiry.expired(now):
            self._forget(key)

    def close(self):
        for k in self.kids:
            k.close()
        super().close()

