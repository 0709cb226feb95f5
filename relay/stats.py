"""Shared-memory counters: one slot of N_COUNTERS uint64 per (listener, worker), followed
by the client groups' counters (relay/flows.py GROUP_WORDS uint64).

The supervisor maps one anonymous shared region before it forks workers; a worker's data
path writes its own slot without locks (one writer per slot), and readers sum slots. The
names below match the ``Counter`` enum in ``relay/datapath/stats.pxd`` one for one.
"""
import json
import mmap
import struct

COUNTERS = (
    "up_datagrams", "up_bytes", "down_datagrams", "down_bytes",
    "assoc_open", "assoc_created", "assoc_expired", "assoc_evicted", "assoc_refused",
    "drop_malformed", "drop_buffer_full", "drop_send_error", "drop_table_full",
    "drop_too_big", "drop_no_route", "drop_denied",
    "reply_fallback", "reply_fragmented", "transparent_open",
    "conn_open", "conn_accepted", "conn_rejected", "conn_reconnects", "frames_bad",
    "queue_drops", "icmp_errors", "drop_rcvbuf", "drop_permission",
    "rejected", "reject_ratelimited", "drop_foreign_port",
    "drop_bad_header",
    "drop_not_udp", "frag_reassembled", "frag_timeout", "frag_overlap", "frag_dropped_memory",
    "tun_icmp_sent", "tun_runs_in", "tun_runs_out",
    "upstream_failover", "offload_fallback",
)
N_COUNTERS = len(COUNTERS)
INDEX = {name: i for i, name in enumerate(COUNTERS)}
GAUGES = frozenset({"assoc_open", "transparent_open", "conn_open"})
from relay.flows import GROUP_FIELDS, GROUP_WORDS   # noqa: E402  (after the names above)
# A whole number of 64-byte cache lines: neighbouring slots belong to different workers, and
# a line shared across a boundary would bounce between their cores on every datagram.
SLOT_BYTES = -(-(N_COUNTERS + GROUP_WORDS) * 8 // 64) * 64

HELP = {
    "up_datagrams": "datagrams relayed from clients towards upstream",
    "up_bytes": "payload bytes relayed from clients towards upstream",
    "down_datagrams": "datagrams relayed from upstream back to clients",
    "down_bytes": "payload bytes relayed from upstream back to clients",
    "assoc_open": "associations (client flows) open now",
    "assoc_created": "associations created",
    "assoc_expired": "associations closed after the idle timeout",
    "assoc_evicted": "associations evicted (least recently used) at the cap",
    "assoc_refused": "new flows refused (file descriptors or memory short)",
    "drop_malformed": "datagrams or frames dropped as malformed",
    "drop_buffer_full": "datagrams dropped because a send buffer or queue was full",
    "drop_send_error": "datagrams dropped on a send error",
    "drop_table_full": "datagrams dropped because no association could be made",
    "drop_too_big": "datagrams dropped as too big for any way out",
    "drop_no_route": "datagrams dropped for lack of a route or destination",
    "drop_denied": "datagrams dropped by the destination access list",
    "reply_fallback": "replies sent from a transparent socket because the raw way could not",
    "reply_fragmented": "raw replies larger than the MTU to the client, sent as IP fragments",
    "transparent_open": "transparent reply sockets open now",
    "conn_open": "tunnel or SOCKS5 TCP connections open now",
    "conn_accepted": "tunnel or SOCKS5 TCP connections accepted",
    "conn_rejected": "tunnel or SOCKS5 connections rejected (handshake, auth, limits)",
    "conn_reconnects": "tunnel client reconnections",
    "frames_bad": "tunnel or SOCKS5 frames rejected as malformed",
    "queue_drops": "datagrams dropped from a bounded queue (e.g. while reconnecting)",
    "icmp_errors": "ICMP errors (unreachable, refused) seen on upstream sockets",
    "drop_rcvbuf": "datagrams the kernel dropped because a listen socket's receive buffer was "
                   "full (tun: the device's queue)",
    "drop_permission": "datagrams dropped because the worker lacks a privilege (EACCES, EPERM)",
    "rejected": "datagrams to a rejected port (--reject), answered with an ICMP port unreachable",
    "reject_ratelimited": "ICMP port unreachable errors for rejected datagrams held back by "
                          "the rate limit (1000/s, burst 50)",
    "drop_foreign_port": "SOCKS5 UDP datagrams from a client's host but not from the port "
                         "bound to its association",
    "drop_bad_header": "datagrams dropped because they lack the valid disguise header their "
                       "listener expects (forward --header-in, replies under --header-out)",
    "drop_not_udp": "tun: packets read from the TUN that are not UDP (TCP, ICMP echo, others)",
    "frag_reassembled": "tun: datagrams reassembled from IP fragments read from the TUN",
    "frag_timeout": "tun: datagrams whose fragments did not all arrive within 30 s",
    "frag_overlap": "tun: fragmented datagrams dropped for overlapping fragments (RFC 5722), "
                    "and later fragments of them",
    "frag_dropped_memory": "tun: fragmented datagrams dropped at the reassembly bounds "
                           "(4 MiB, 1024 datagrams, 2048 fragments each per worker)",
    "tun_icmp_sent": "tun: ICMP/ICMPv6 errors written into the TUN for errors on upstream sockets",
    "tun_runs_in": "tun: runs of datagrams read as one packet (UDP segmentation offload)",
    "tun_runs_out": "tun: runs of replies written as one packet (UDP segmentation offload)",
    "upstream_failover": "flows moved from one upstream to another (away from one found "
                         "down; with --balance hash also back to the client's own one)",
    "offload_fallback": "segmentation-offload (GSO) sends the kernel refused (a device "
                        "without checksum offload, a route with a smaller MTU), sent one "
                        "datagram at a time instead",
}
assert set(HELP) == set(COUNTERS)


class StatsRegion:
    """A shared anonymous mapping of ``slots`` counter slots (create before forking)."""

    def __init__(self, slots=256):
        self.slots = slots
        self.mem = mmap.mmap(-1, slots * SLOT_BYTES)
        self.upstreams = UpstreamRegion(slots)     # several upstreams: health, flows

    def slot(self, i):
        """A writable memoryview (uint64 format) of slot i, for the data path."""
        if not 0 <= i < self.slots:
            raise IndexError(f"stats slot {i} out of range 0-{self.slots - 1}")
        return memoryview(self.mem)[i * SLOT_BYTES:(i + 1) * SLOT_BYTES].cast("Q")

    def read(self, i):
        return dict(zip(COUNTERS, struct.unpack_from(f"{N_COUNTERS}Q", self.mem, i * SLOT_BYTES)))

    def read_groups(self, i):
        """Slot i's client group words (relay.flows.group_counters reads them)."""
        return struct.unpack_from(f"{GROUP_WORDS}Q", self.mem, i * SLOT_BYTES + N_COUNTERS * 8)

    def clear(self, i):
        self.mem[i * SLOT_BYTES:(i + 1) * SLOT_BYTES] = bytes(SLOT_BYTES)


def total(dicts):
    out = dict.fromkeys(COUNTERS, 0)
    for d in dicts:
        for k, v in d.items():
            out[k] += v
    return out


def _label(text):
    return text.replace("\\", "\\\\").replace('"', '\\"')


def prometheus(per_listener, clients=None, upstreams=None):
    """Prometheus text exposition of {listener_name: counters}; of ``clients``
    ({listener: {group: group counters}}, relay.flows) when client groups are configured;
    of ``upstreams`` ({listener: [{url, healthy, flows}]}, several upstreams) when given."""
    lines = []
    for name in COUNTERS:
        metric = f"relay_{name}" + ("" if name in GAUGES else "_total")
        lines.append(f"# HELP {metric} {HELP[name]}")
        lines.append(f"# TYPE {metric} {'gauge' if name in GAUGES else 'counter'}")
        for listener, counters in sorted(per_listener.items()):
            lines.append(f'{metric}{{listener="{_label(listener)}"}} {counters[name]}')
    if clients:
        for unit in ("datagrams", "bytes"):
            metric = f"relay_client_{unit}_total"
            lines.append(f"# HELP {metric} {unit} from (out) and to (in) the clients of each "
                         "client group (--client-group)")
            lines.append(f"# TYPE {metric} counter")
            for listener, groups in sorted(clients.items()):
                for group, c in sorted(groups.items()):
                    for way in ("out", "in"):
                        lines.append(f'{metric}{{listener="{_label(listener)}",group="{_label(group)}",'
                                     f'direction="{way}"}} {c[f"{unit}_{way}"]}')
    if upstreams:
        for metric, key, text in (("relay_upstream_healthy", "healthy",
                                   "1 while the upstream is healthy (several upstreams)"),
                                  ("relay_upstream_flows", "flows", "flows on the upstream now")):
            lines.append(f"# HELP {metric} {text}")
            lines.append(f"# TYPE {metric} gauge")
            for listener, ups in sorted(upstreams.items()):
                for up in ups:
                    labels = ",".join(f'{k}="{_label(v)}"' for k, v in
                                      (("listener", listener), ("upstream", up["url"])))
                    lines.append(f"{metric}{{{labels}}} {int(up[key])}")
    return "\n".join(lines) + "\n"


def total_groups(per_listener):
    """{group: counters} summed over listeners."""
    out = {}
    for groups in per_listener.values():
        for group, c in groups.items():
            acc = out.setdefault(group, dict.fromkeys(GROUP_FIELDS, 0))
            for k, v in c.items():
                acc[k] += v
    return out


def to_json(per_listener, clients=None, upstreams=None):
    """The `stats` answer; ``clients``: the client groups' counters (relay.flows), when
    groups are configured; ``upstreams``: {listener: [{url, healthy, flows}]} of the
    listeners with several upstreams (Supervisor.upstream_health), when there are any."""
    out = {"listeners": per_listener, "total": total(per_listener.values())}
    if clients:
        out["clients"] = {"listeners": clients, "total": total_groups(clients)}
    if upstreams:
        out["upstreams"] = upstreams
    return json.dumps(out, indent=2, sort_keys=True)


# ---- several upstreams: health and flows per upstream, for `relay stats` ---------------
MAX_UPSTREAMS = 16                  # relay/datapath/tunnel_balance.pxi MAX_UPSTREAMS
UP_SLOT_BYTES = MAX_UPSTREAMS * 16  # per upstream: state (0 unknown, 1 down, 2 up), flows


class UpstreamRegion:
    """A shared anonymous mapping beside the counters: per (listener, worker) slot, the
    health and flows of each of its upstreams, written by relay.services.health."""

    def __init__(self, slots=256):
        self.slots = slots
        self.mem = mmap.mmap(-1, slots * UP_SLOT_BYTES)

    def slot(self, i):
        if not 0 <= i < self.slots:
            raise IndexError(f"upstream slot {i} out of range 0-{self.slots - 1}")
        return memoryview(self.mem)[i * UP_SLOT_BYTES:(i + 1) * UP_SLOT_BYTES].cast("Q")

    def read(self, i):
        v = struct.unpack_from(f"{2 * MAX_UPSTREAMS}Q", self.mem, i * UP_SLOT_BYTES)
        return [(v[2 * j], v[2 * j + 1]) for j in range(MAX_UPSTREAMS)]

    def clear(self, i):
        self.mem[i * UP_SLOT_BYTES:(i + 1) * UP_SLOT_BYTES] = bytes(UP_SLOT_BYTES)


def publish_upstreams(view, health, flows):
    """Write one worker's view of its upstreams into its slot (UpstreamRegion.slot)."""
    for j, (ok, n) in enumerate(zip(health, flows)):
        view[2 * j + 1] = max(0, n)
        view[2 * j] = 2 if ok else 1


def upstream_summary(names, per_worker):
    """[{url, healthy, flows}] of one listener from its workers' slots (UpstreamRegion.read):
    healthy when every worker that reported says so; flows summed."""
    out = []
    for j, name in enumerate(names):
        states = [w[j][0] for w in per_worker if w[j][0]]
        out.append({"url": name, "healthy": bool(states) and all(s == 2 for s in states),
                    "flows": sum(w[j][1] for w in per_worker)})
    return out
