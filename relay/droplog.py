"""Drops say why: a warning names the reason the first time a listener drops for it.

The data path only counts (no logging per datagram, no Python per datagram). The
supervisor hands the summed counters of every listener to ``DropLog.check`` about once a
second; the first increase of a drop counter of a listener is logged at warning level at
once, with what the reason usually means, and later increases of the same counter at most
once per ``interval`` seconds, as the number dropped since the last line. A flood of bad
traffic therefore costs a handful of log lines an hour, not one per datagram.
"""
import logging
import time

# counter -> what it usually means, and what to do about it
REASONS = {
    "drop_permission": "the worker lacks a privilege for the send: a transparent reply from a "
                       "remote port below 1024 needs CAP_NET_BIND_SERVICE, IP_TRANSPARENT and "
                       "SO_MARK need CAP_NET_ADMIN (docs/systemd.md)",
    "drop_denied": "the destination access list refused them: destinations in private, "
                   "loopback and other special ranges need --allow CIDR (allow = [...]), "
                   "this host's own addresses --allow-host or --allow ADDRESS/32",
    "drop_send_error": "the kernel refused the send",
    "drop_no_route": "no route to the destination (or, for redir, no original destination: "
                     "check `relay rules` and `ip rule`)",
    "drop_buffer_full": "a send buffer or queue was full (the next hop or this machine is "
                        "overloaded)",
    "drop_too_big": "too big for any way out",
    "drop_table_full": "no association could be made",
    "drop_malformed": "malformed datagrams or frames",
    "drop_rcvbuf": "the kernel dropped them at a full listen socket: the offered load is more "
                   "than the workers take (more --workers, a larger --batch)",
    "queue_drops": "a bounded queue was full (a tunnel reconnecting, names being resolved)",
    "frames_bad": "malformed tunnel or SOCKS5 frames (or SOCKS5 fragments, which are refused)",
    "drop_foreign_port": "a SOCKS5 association announced port 0 and is bound to the first "
                         "port its host sent from; another port of that host tried to use it "
                         "(another program or user on the client's host, or behind its NAT)",
    "assoc_refused": "new flows refused: file descriptors or memory short (raise the "
                     "descriptor limit, LimitNOFILE= / ulimit -n)",
    "drop_bad_header": "datagrams without the disguise header this listener expects: the "
                       "other relay's --header-out and this one's --header-in (or the reverse "
                       "for replies) must name the same kind, and only the other relay may "
                       "send here",
}
INTERVAL = 60.0


class DropLog:
    def __init__(self, log=None, interval=INTERVAL, clock=time.monotonic):
        self.log = log or logging.getLogger("relay")
        self.interval = interval
        self.clock = clock
        self.state = {}         # (listener, counter) -> [last logged value, last log time]

    def check(self, per_listener):
        """Log what grew since the last call; ``per_listener`` is {name: counters}."""
        now = self.clock()
        for name, counters in per_listener.items():
            for key, why in REASONS.items():
                value = counters.get(key, 0)
                st = self.state.setdefault((name, key), [0, None])
                if value < st[0]:           # the listener was restarted: counts began again
                    st[0] = 0
                if value > st[0] and (st[1] is None or now - st[1] >= self.interval):
                    self._warn(name, key, value - st[0], why, None if st[1] is None else now - st[1])
                    st[0], st[1] = value, now

    def _warn(self, name, key, n, why, since):
        when = "" if since is None else f" in the last {since:.0f}s"
        self.log.warning("listener %s: %d datagram%s dropped%s (%s): %s", name, n,
                         "" if n == 1 else "s", when, key, why)
