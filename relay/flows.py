"""`relay flows` and per-client counters: limits, client groups, rows and their table.

The data path keeps datagrams and bytes each way, birth and last use on every flow
(relay/datapath/flows.pxd; relay/datapath/pure/flows.py for the pure cores). On request
the thread that runs a listener takes a bounded snapshot between two batches: its top N
flows by a sort key (at most FLOWS_MAX), or its flows summed per client address (at most
CLIENTS_MAX addresses). Workers answer the supervisor, which merges, sorts and cuts again.

Client groups (``--client-group lan=192.168.1.0/24``, ``[global] client_groups``) count
datagrams and bytes per configured CIDR group in the shared stats slots, so `relay stats`
and ``/metrics`` show who uses the link with a bounded number of series: at most
MAX_CLIENT_GROUPS groups plus "other".
"""
import ipaddress
import socket

SORTS = ("bytes", "age", "idle")         # relay/datapath/flows.pxd SORT_* in this order
FLOWS_MAX = 1000          # rows one listener of one worker returns at most
CLIENTS_MAX = 4096        # client addresses one snapshot sums at most (the rest: one row)
MAX_CLIENT_GROUPS = 16
GROUP_FIELDS = ("datagrams_out", "bytes_out", "datagrams_in", "bytes_in")
GROUP_WORDS = (MAX_CLIENT_GROUPS + 1) * len(GROUP_FIELDS)   # per stats slot, after the counters
OTHER = "other"
ROW_FIELDS = ("client", "destination", "datagrams_out", "bytes_out", "datagrams_in",
              "bytes_in", "age", "idle")


def compile_groups(groups):
    """((name, (network, ...)), ...) -> the data path's prefix list: (group index,
    family, address bytes, prefix length) per network, group indexes in config order."""
    out = []
    for gid, (_, nets) in enumerate(groups or ()):
        for net in nets:
            family = socket.AF_INET if net.version == 4 else socket.AF_INET6
            out.append((gid, family, net.network_address.packed, net.prefixlen))
    return out


def check_group_words(groups, stats_words):
    """Client groups need the group words of a stats slot after the counters."""
    from relay.stats import N_COUNTERS
    if groups and (stats_words is None or len(stats_words) < N_COUNTERS + GROUP_WORDS):
        raise ValueError(f"client groups need a stats slot of {N_COUNTERS + GROUP_WORDS} "
                         "uint64 (relay.stats.StatsRegion)")


def group_names(groups):
    return [name for name, _ in groups or ()] + [OTHER]


def group_counters(groups, words):
    """{group: {field: count}} from a slot's group words (groups with any traffic)."""
    out = {}
    n = len(GROUP_FIELDS)
    for gid, name in enumerate(group_names(groups)):
        values = words[gid * n:(gid + 1) * n]
        if any(values):
            out[name] = dict(zip(GROUP_FIELDS, values))
    return out


def parse_request(text):
    """The control request ``flows {"top": N, "sort": S, "by_client": B}`` -> its
    arguments, validated (ValueError names what is wrong)."""
    import json
    args = json.loads(text) if text.strip() else {}
    if not isinstance(args, dict):
        raise ValueError("flows: arguments must be a JSON object")
    top = args.get("top", FLOWS_MAX)
    if isinstance(top, bool) or not isinstance(top, int) or not 1 <= top <= FLOWS_MAX:
        raise ValueError(f"flows: top must be 1-{FLOWS_MAX}")
    sort = args.get("sort", "bytes")
    if sort not in SORTS:
        raise ValueError(f"flows: sort must be one of {', '.join(SORTS)}")
    return {"top": top, "sort": sort, "by_client": bool(args.get("by_client", False))}


def row_value(row, sort):
    """A data-path row's sort value (relay/datapath/flows.pxd _sort_value)."""
    return row[3] + row[5] if sort == 0 else row[6] if sort == 1 else row[7]


def balanced_rows(kids, names, n, sort, by_client, cap):
    """The rows of several upstream cores (a BalancedUpstream's children): each flow row
    with its child's name appended, the top n over all of them."""
    rows = []
    for kid, name in zip(kids, names):
        got = kid.snapshot(n, sort, by_client, cap)
        rows.extend(got if by_client else [r + (name,) for r in got])
    rows.sort(key=lambda r: row_value(r, sort), reverse=True)
    return rows[:n] if not by_client else rows


def _addr(a):
    if a is None:
        return None
    host, port = a
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def row_dict(row, by_client):
    """A data-path row tuple as the JSON object of one flow (or one client)."""
    d = dict(zip(ROW_FIELDS, row))
    if by_client:
        d.pop("destination")
        d["flows"] = row[8]
        d["client"] = row[0] if row[0] is not None else OTHER
    else:
        d["client"] = _addr(row[0])
        d["destination"] = _addr(row[1])
        if len(row) > 8:                # through one of several upstreams: its name
            d["upstream"] = row[8]
    return d


def sort_key(sort):
    if sort == "bytes":
        return lambda r: r["bytes_out"] + r["bytes_in"]
    return lambda r: r[sort]


def merge_clients(rows):
    """Rows of one client from several listeners or workers summed into one."""
    merged = {}
    for r in rows:
        m = merged.get(r["client"])
        if m is None:
            merged[r["client"]] = dict(r)
            continue
        for k in ("datagrams_out", "bytes_out", "datagrams_in", "bytes_in", "flows"):
            m[k] += r[k]
        m["age"] = max(m["age"], r["age"])
        m["idle"] = min(m["idle"], r["idle"])
        m.pop("listener", None)
        m.pop("worker", None)
    return list(merged.values())


def human(n):
    for unit in ("", "K", "M", "G", "T"):
        if n < 1000 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000.0


def duration(s):
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def flows_table(data):
    """The answer of a `flows` request as text, like `conntrack -L`: one line a flow (or
    a client), the widest columns sized to their contents."""
    by_client = data.get("by_client", False)
    rows = data.get("flows", [])
    if by_client:
        head = ("CLIENT", "FLOWS", "DGRAMS>", "BYTES>", "DGRAMS<", "BYTES<", "AGE", "IDLE")
        cells = [(r["client"], str(r["flows"]), human(r["datagrams_out"]), human(r["bytes_out"]),
                  human(r["datagrams_in"]), human(r["bytes_in"]), duration(r["age"]),
                  duration(r["idle"])) for r in rows]
    else:
        head = ("LISTENER", "W", "CLIENT", "DESTINATION", "UPSTREAM", "DGRAMS>", "BYTES>",
                "DGRAMS<", "BYTES<", "AGE", "IDLE")
        cells = [(r["listener"], str(r["worker"]), r["client"], r["destination"] or "-",
                  r["upstream"], human(r["datagrams_out"]), human(r["bytes_out"]),
                  human(r["datagrams_in"]), human(r["bytes_in"]), duration(r["age"]),
                  duration(r["idle"])) for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(head)]
    lines = ["  ".join(v.ljust(w) for v, w in zip(head, widths)).rstrip()]
    for c in cells:
        lines.append("  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip())
    total, shown = data.get("total", len(rows)), len(rows)
    what = "clients" if by_client else "flows"
    tail = f"{shown} {what}" + (f" shown of {total} (--top, --sort)" if total > shown else "")
    if data.get("errors"):
        tail += "; " + "; ".join(data["errors"])
    lines.append(tail)
    return "\n".join(lines) + "\n"


def parse_group(text):
    """``NAME=CIDR[,CIDR...]`` (the --client-group option) -> (name, [cidr, ...])."""
    name, sep, nets = text.partition("=")
    if not sep or not name or not nets:
        raise ValueError(f"expected NAME=CIDR[,CIDR...], got {text!r}")
    return name, [n.strip() for n in nets.split(",") if n.strip()]


def network(text):
    """One CIDR (a host address is its /32 or /128); ValueError with the reason."""
    return ipaddress.ip_network(text, strict=False)


# ---- the command ---------------------------------------------------------------------

def add_cli(subparsers):
    """Register ``relay flows`` on an argparse subparsers object."""
    from relay.config import GlobalConfig
    DEFAULT_CONTROL = GlobalConfig.control_socket
    p = subparsers.add_parser(
        "flows",
        help="list the live flows (associations) of a running relay, like conntrack -L",
        description="List the live flows of a running relay through its control socket: "
                    "client, original destination (redir: the latest one of the client's full-"
                    "cone association), upstream, datagrams and bytes each way (> from the "
                    "client, < to it, as received by the relay), age, idle time, listener and "
                    "worker. Each listener's own thread copies its top flows between two "
                    f"batches (at most {FLOWS_MAX} per listener and worker), so reading never "
                    "races the data path.",
        epilog="examples: relay flows --top 20 --sort bytes;  relay flows --by-client --watch")
    p.add_argument("--top", type=_top_arg, default=FLOWS_MAX, metavar="N",
                   help=f"show the N largest by --sort (1-{FLOWS_MAX}; default {FLOWS_MAX})")
    p.add_argument("--sort", choices=SORTS, default="bytes",
                   help="largest first: bytes (both ways), age (oldest first), idle (longest "
                        "idle first)")
    p.add_argument("--by-client", action="store_true",
                   help="one line per client address: its flows' datagrams and bytes summed "
                        f"(at most {CLIENTS_MAX} addresses per listener and worker, the rest "
                        "in one line 'other')")
    p.add_argument("--control", default=DEFAULT_CONTROL, metavar="PATH",
                   help=f"the running relay's control socket (default: {DEFAULT_CONTROL})")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--watch", nargs="?", const=1.0, type=_seconds_arg, metavar="SECONDS",
                     help="refresh in place every SECONDS (default 1) until Ctrl-C")
    p.set_defaults(func=run_cli)
    return p


def _top_arg(text):
    import argparse
    try:
        n = int(text)
    except ValueError:
        n = 0
    if not 1 <= n <= FLOWS_MAX:
        raise argparse.ArgumentTypeError(f"expected 1-{FLOWS_MAX}, got {text!r}")
    return n


def _seconds_arg(text):
    from relay.cli import _positive_seconds
    return _positive_seconds(text)


def request(args):
    import json
    return "flows " + json.dumps({"top": args.top, "sort": args.sort, "by_client": args.by_client})


def run_cli(args, query=None, sleep=None, out=None, rounds=None):
    """`relay flows`: print once, as JSON, or refresh in place (``rounds`` bounds --watch
    for tests)."""
    import json
    import sys
    import time
    if query is None:
        from relay.supervisor import query
    sleep = sleep or time.sleep
    out = out or sys.stdout
    n = 0
    try:
        while True:
            try:
                text = query(args.control, request(args))
                data = json.loads(text)
            except (RuntimeError, OSError, ValueError) as e:
                print(f"relay flows: error: {e}", file=sys.stderr)
                return 1
            if "error" in data:
                print(f"relay flows: error: {data['error']}", file=sys.stderr)
                return 1
            if args.json:
                out.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
                return 0
            if args.watch is None:
                out.write(flows_table(data))
                return 0
            clear = "\x1b[H\x1b[2J" if out.isatty() else ""
            out.write(f"{clear}relay flows every {args.watch:g} s ({time.strftime('%H:%M:%S')}), "
                      "Ctrl-C ends\n" + flows_table(data) + ("" if clear else "\n"))
            out.flush()
            n += 1
            if rounds is not None and n >= rounds:
                return 0
            sleep(args.watch)
    except KeyboardInterrupt:
        return 0
