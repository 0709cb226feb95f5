"""Per-flow and per-client-group counters of the pure cores (twin of relay/datapath/flows.pxd)."""
import heapq
import ipaddress

from relay import stats as _stats
from relay.flows import GROUP_FIELDS, check_group_words


class FlowStat:
    """What a table entry of the compiled cores carries for `relay flows`."""
    __slots__ = ("born", "dst", "group", "dg_out", "by_out", "dg_in", "by_in")

    def __init__(self, now, group):
        self.born, self.dst, self.group = now, None, group
        self.dg_out = self.by_out = self.dg_in = self.by_in = 0


class Groups:
    """Client groups (relay.flows.compile_groups) and their counters in the stats slot."""

    def __init__(self, compiled, stats):
        compiled = list(compiled or ())
        check_group_words(compiled, stats if compiled else None)
        self.stats = stats if compiled else None
        self.nets = [(gid, ipaddress.ip_network((bytes(addr), plen)))
                     for gid, _family, addr, plen in compiled]
        self.other = len({gid for gid, _ in self.nets})

    def of(self, host):
        if self.stats is None:
            return 0
        ip = ipaddress.ip_address(host)
        best, gid = -1, self.other
        for g, net in self.nets:
            if net.version == ip.version and ip in net and net.prefixlen > best:
                best, gid = net.prefixlen, g
        return gid

    def new(self, now, client):
        return FlowStat(now, self.of(client[0]))

    def count_out(self, st, dst, nbytes):
        st.dst = dst
        st.dg_out += 1
        st.by_out += nbytes
        self._add(st.group, 0, nbytes)

    def count_in(self, st, nbytes):
        st.dg_in += 1
        st.by_in += nbytes
        self._add(st.group, 2, nbytes)

    def _add(self, group, field, nbytes):
        if self.stats is not None:
            base = _stats.N_COUNTERS + group * len(GROUP_FIELDS) + field
            self.stats[base] += 1
            self.stats[base + 1] += nbytes


def _value(sort, st, last, now):
    if sort == 1:
        return now - st.born
    if sort == 2:
        return now - last
    return st.by_out + st.by_in


def flow_rows(items, sort, n, now):
    """items: (client key, last use, FlowStat) -> the top n rows like flows.pxd table_rows."""
    top = heapq.nlargest(n, items, key=lambda it: _value(sort, it[2], it[1], now))
    return [(key, st.dst, st.dg_out, st.by_out, st.dg_in, st.by_in,
             round(now - st.born, 3), round(now - last, 3)) for key, last, st in top]


def client_rows(items, sort, n, cap, now):
    """The flows summed per client host, as flows.pxd table_clients (at most cap hosts;
    the flows of any beyond them in one row whose client is None)."""
    agg, other = {}, None
    for key, last, st in items:
        host = key[0]
        a = agg.get(host)
        if a is None:
            if len(agg) < cap:
                a = agg[host] = [FlowStat(st.born, 0), last, 0]
            else:
                if other is None:
                    other = [FlowStat(now, 0), 0.0, 0]
                a = other
        s = a[0]
        s.dg_out += st.dg_out
        s.by_out += st.by_out
        s.dg_in += st.dg_in
        s.by_in += st.by_in
        s.born = min(s.born, st.born)
        a[1] = max(a[1], last)
        a[2] += 1
    top = heapq.nlargest(n, agg.items(), key=lambda it: _value(sort, it[1][0], it[1][1], now))
    rows = [(host, None, s.dg_out, s.by_out, s.dg_in, s.by_in, round(now - s.born, 3),
             round(now - last, 3), count) for host, (s, last, count) in top]
    if other is not None:
        s, last, count = other
        rows.append((None, None, s.dg_out, s.by_out, s.dg_in, s.by_in, round(now - s.born, 3),
                     round(now - last, 3), count))
    return rows
