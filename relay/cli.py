"""The `relay` command line.

Every data-path subcommand builds the same configuration a TOML file would give
(`relay run -c FILE`), so the command line and the file are validated by one piece of code
and fail with the same messages.
"""
import argparse
import json
import logging
import os
import sys
import textwrap
import time

DEFAULT_CONTROL = "/run/relay/relay.sock"
LOG_FORMAT = "%(asctime)s relay[%(process)d] %(levelname)s %(message)s"


class Formatter(argparse.RawDescriptionHelpFormatter):
    """Shows each option's default, unless there is none or the help already names it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if ("default" not in text and action.default not in (None, False, argparse.SUPPRESS)
                and action.option_strings):
            text += " (default: %(default)s)"
        return text


def _runtime_options(p):
    g = p.add_argument_group("processes and monitoring")
    g.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes, each with its own SO_REUSEPORT socket "
                        f"(default: the number of CPUs, {os.cpu_count()})")
    g.add_argument("--pin", action="store_true", help="pin worker i to CPU i")
    g.add_argument("--control", default=DEFAULT_CONTROL, metavar="PATH",
                   help="control socket that `relay stats` reads; '' for none")
    g.add_argument("--metrics", default=None, metavar="HOST:PORT",
                   help="serve Prometheus metrics over HTTP at /metrics")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="log level (logs go to stderr)")
    g.add_argument("--user", dest="run_as", default=None, metavar="USER",
                   help="once their sockets are open, workers switch to this user keeping only "
                        "the capabilities their listeners need (docs/systemd.md; default: "
                        "nobody when started as root; 'root' keeps root)")
    from relay.config import GlobalConfig
    g.add_argument("--tcp-keepalive", type=float, default=None, metavar="SECONDS",
                   help="every long-lived TCP connection (tunnel, SOCKS5) probes a silent peer "
                        "after this idle time (keepalive every 10 s at most, 3 probes) and "
                        "TCP_USER_TIMEOUT drops it when the probes or its unacknowledged data "
                        "go unanswered as long; 0: off (default: "
                        f"{GlobalConfig.tcp_keepalive:g})")
    g.add_argument("--client-group", action="append", default=[], metavar="NAME=CIDR[,CIDR]",
                   help="count datagrams and bytes of the clients in these networks as group "
                        "NAME in `relay stats` and /metrics (repeat for more groups, at most "
                        "16; the rest count as 'other')")
    g.add_argument("--tcp-fastopen", choices=["on", "off"], default=None,
                   help="TCP Fast Open on tunnel and SOCKS5 connections: TCP_FASTOPEN_CONNECT "
                        "on the client's, TCP_FASTOPEN on the servers' listen sockets, where "
                        "net.ipv4.tcp_fastopen allows the side (1: client, 2: server) (default: "
                        f"{'on' if GlobalConfig.tcp_fastopen else 'off'})")
    g.add_argument("--tcp-congestion", default=None, metavar="NAME",
                   help="TCP congestion control of tunnel and SOCKS5 connections (e.g. bbr; "
                        "one of /proc/sys/net/ipv4/tcp_available_congestion_control; "
                        "default: the kernel's)")


# Options that become listener keys: dest -> config key (most are the same name).
_KEY = {"username": "user"}
_LISTS = ("allow", "deny", "reject")    # repeatable, comma-separated
_LISTENER_DESTS = set()             # every option that _opt made


def _opt(g, mode, flag, help, *, key=None, **kw):
    """An option whose default lives in relay.config (shown in --help, never duplicated
    here): argparse leaves it None when not given and the configuration fills it in."""
    from relay.config import mode_defaults
    dest = flag.lstrip("-").replace("-", "_")
    _LISTENER_DESTS.add(dest)
    default = mode_defaults(mode).get(_KEY.get(dest, dest))
    if kw.get("action") == "store_true" or default is None or default is False or \
            default in ((), ""):
        shown = ""
    else:
        shown = f" (default: {default})"
    g.add_argument(flag, default=None, help=help.replace("%", "%%") + shown, **kw)


def _flow_options(p, mode):
    g = p.add_argument_group("flows")
    _opt(g, mode, "--timeout", "idle time after which an association (flow) is closed; "
         "traffic in either direction refreshes it", type=float, metavar="SECONDS")
    from relay.config import DEFAULT_PORT_TIMEOUTS, format_port_timeouts
    _opt(g, mode, "--timeout-port", "idle timeouts by destination port, e.g. "
         "53=10,123=10,443=30,27000-27100=300 (the port of a flow's first datagram; at most 7 "
         "different values); 'none': every flow has --timeout (default: "
         f"{format_port_timeouts(DEFAULT_PORT_TIMEOUTS)}, at most --timeout)", metavar="SPEC")
    _opt(g, mode, "--max-associations", "associations (flows) per worker at most; at the cap "
         "the least recently used one is evicted for a new one (the flows of an --upstream "
         "or of tunnel-client: at most 65536)", type=int, metavar="N")
    _opt(g, mode, "--mark", "SO_MARK on every upstream and reply socket, so the relay's own "
         "traffic is never captured again (0: none; a mark needs CAP_NET_ADMIN)", type=int)
    _opt(g, mode, "--batch", "datagrams per recvmmsg/sendmmsg call", type=int, metavar="N")
    _opt(g, mode, "--name", "listener name in stats, metrics and logs (default: the mode)")
    _opt(g, mode, "--bind-interface", "the upstream side (direct sockets, tunnel and SOCKS5 "
         "connections, a server's per-flow sockets) leaves through this interface only "
         "(SO_BINDTODEVICE)", metavar="IF")
    _opt(g, mode, "--source", "the upstream side leaves from this address of this host (bound "
         "before connect or send), one per family: 192.0.2.1,2001:db8::1", metavar="ADDR[,ADDR]")


def _offload_option(g, mode):
    _opt(g, mode, "--offload", "UDP segmentation offload. auto: where the kernel has it "
         "(Linux 5.10+), datagrams that arrive coalesced (UDP_GRO) stay one buffer and each "
         "run of one flow's equal-size datagrams leaves as one UDP_SEGMENT send; a path that "
         "refuses such a send gets its datagrams one by one (offload_fallback counts it). "
         "on: that or refuse to start. off: one datagram per message both ways (a link that "
         "misbehaves under GSO)", choices=["auto", "on", "off"])


def _upstream_options(p, mode):
    g = p.add_argument_group("upstream")
    if mode != "tun":
        _offload_option(g, mode)
    _opt(g, mode, "--upstream", "send through tunnel://HOST:PORT (relay tunnel-server), "
         "gost://[USER:PASS@]HOST:PORT (a gost server's UDP-over-TCP tunnel, one TCP connection "
         "per flow) or socks5://[USER:PASS@]HOST:PORT (SOCKS5 UDP ASSOCIATE) instead of "
         "directly; USER and PASS are percent-encoded; repeat for several upstreams (at most "
         "16, 'direct' may be one of them; see --balance)", metavar="URL", action="append")
    _balance_option(g, mode, "--upstream")
    _opt(g, mode, "--secret", "with --upstream tunnel:// only: the tunnel server's secret "
         "(proved with an HMAC, never sent); visible in `ps`: prefer --secret-file or "
         "RELAY_SECRET")
    _opt(g, mode, "--secret-file", "with --upstream tunnel:// only: read the secret from this "
         "file (mode 600)", metavar="FILE")
    _opt(g, mode, "--connections", "with --upstream tunnel:// only: TCP connections the flows "
         "are spread over (default: 1)", type=int, metavar="N")


def _header_options(p, mode):
    from relay.proto.disguise import KINDS, SIZES
    kinds = ", ".join(f"{k} ({SIZES[k]} bytes)" for k in KINDS)
    g = p.add_argument_group("disguise (between two relays: docs/disguise.md)")
    _opt(g, mode, "--header-out", "put a KIND header (v2ray's layouts: " + kinds + ") in front "
         "of every datagram sent to --to and take it off the replies (replies without a "
         "valid one: dropped, drop_bad_header); the relay at --to runs --header-in KIND; "
         "direct upstream only", metavar="KIND")
    _opt(g, mode, "--header-in", "datagrams from clients must start with a KIND header: "
         "it is taken off (without a valid one: dropped, drop_bad_header) and put in front "
         "of every reply; the clients are relays running --header-out KIND",
         metavar="KIND")
def _balance_option(g, mode, several):
    from relay.config import BALANCE_MODES
    _opt(g, mode, "--balance", f"with several {several}: failover (every new flow through the "
         "first healthy one) or hash (a client's flows through one, by a consistent hash of its "
         "address); a flow whose upstream goes down moves to the next healthy one",
         choices=BALANCE_MODES)


def _secret_options(g, mode, help):
    _opt(g, mode, "--secret", help + "; visible in `ps`: prefer --secret-file or the "
         "RELAY_SECRET environment variable")
    _opt(g, mode, "--secret-file", "read the secret from this file (its owner only may read "
         "it: mode 600)", metavar="FILE")


def _login_options(g, mode, help):
    _opt(g, mode, "--username", help)
    _opt(g, mode, "--password", "password that goes with --username; visible in `ps`: prefer "
         "--password-file or the RELAY_PASSWORD environment variable")
    _opt(g, mode, "--password-file", "read the password from this file (mode 600)",
         metavar="FILE")


def _acl_options(g, mode, what):
    _opt(g, mode, "--allow", "destinations to allow (repeat or comma-separate)",
         action="append", metavar="CIDR")
    _opt(g, mode, "--deny", "destinations to deny (repeat or comma-separate)",
         action="append", metavar="CIDR")
    _opt(g, mode, "--allow-host", "let clients reach this host's own addresses (every "
         "address of every interface, denied by default, kept current; an --allow of one "
         "address as /32 or /128 lets that one through)", action="store_true")
    _opt(g, mode, "--insecure", f"allow a non-loopback listen address without {what} (an "
         "open relay)", action="store_true")


# Which environment variable stands for which key when its options are not given.
_ENV = {"secret": ("RELAY_SECRET", ("secret", "secret_file")),
        "password": ("RELAY_PASSWORD", ("password", "password_file"))}


def _listener_from_args(args, mode):
    """The [[listener]] table the options amount to: only what was given, so every default
    comes from relay.config, and the command line and a TOML file build the same object."""
    from relay.config import MODE_KEYS
    lc = {"name": args.name or mode, "mode": mode}
    for dest in sorted(_LISTENER_DESTS):
        key, value = _KEY.get(dest, dest), getattr(args, dest, None)
        if value is None or key not in MODE_KEYS[mode] or key in ("name", "mode"):
            continue
        if key in _LISTS:
            value = [x for v in value for x in v.replace(" ", ",").split(",") if x]
        elif key in ("upstream", "server") and len(value) == 1:
            value = value[0]                # repeated: a list, as in TOML
        lc[key] = value
    for key, (env, options) in _ENV.items():
        if key in MODE_KEYS[mode] and not any(k in lc for k in options) and os.environ.get(env):
            if key == "password" and "user" not in lc:
                continue            # a password goes with a username
            ups = lc.get("upstream", "")
            if mode in ("forward", "redir", "tun") and not any(
                    str(u).startswith("tunnel://") for u in (ups if isinstance(ups, list) else [ups])):
                continue            # a secret only goes with a tunnel:// upstream
            lc[key] = os.environ[env]
    return lc


def _global_from_args(args):
    g = {"pin": args.pin, "log_level": args.log_level, "control_socket": args.control}
    if args.workers is not None:
        g["workers"] = args.workers
    if args.metrics:
        g["metrics"] = args.metrics
    if args.run_as:
        g["user"] = args.run_as
    if args.tcp_keepalive is not None:
        g["tcp_keepalive"] = args.tcp_keepalive
    if args.tcp_fastopen is not None:
        g["tcp_fastopen"] = args.tcp_fastopen == "on"
    if args.tcp_congestion is not None:
        g["tcp_congestion"] = args.tcp_congestion
    if args.client_group:
        from relay.flows import parse_group
        groups = {}
        for text in args.client_group:
            try:
                name, nets = parse_group(text)
            except ValueError as e:
                print(f"relay {args.mode}: error: --client-group: {e}", file=sys.stderr)
                raise SystemExit(2)
            groups.setdefault(name, []).extend(nets)
        g["client_groups"] = groups
    return g


def _setup_logging(level):
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT, stream=sys.stderr)


def serve(config, *, config_path=None, loader=None):
    """Run a configuration under the supervisor until SIGTERM/SIGINT."""
    from relay.supervisor import StartError, Supervisor
    _setup_logging(config.global_.log_level)
    try:
        return Supervisor(config, config_path=config_path, loader=loader).run()
    except (StartError, OSError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror and not e.filename else e
        logging.getLogger("relay").error("cannot start: %s", why)
        return 1


def _cmd_mode(args):
    from relay.config import ConfigError, parse_config
    try:
        config = parse_config({"global": _global_from_args(args),
                               "listener": [_listener_from_args(args, args.mode)]},
                              source="command line")
    except ConfigError as e:
        print(f"relay {args.mode}: error: {e}", file=sys.stderr)
        return 2
    return serve(config)


def _cmd_run(args):
    from relay.config import ConfigError, load_config
    try:
        config = load_config(args.config)
    except ConfigError as e:
        print(f"relay run: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"relay run: error: {args.config}: {e.strerror}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: OK, {len(config.listeners)} listener(s)")
        return 0
    return serve(config, config_path=args.config, loader=load_config)


def _cmd_stats(args):
    from relay.supervisor import query
    if args.watch is not None:
        return _watch_stats(args, query)
    try:
        text = query(args.control, "metrics" if args.prometheus else "stats")
    except (RuntimeError, OSError) as e:
        print(f"relay stats: error: {e}", file=sys.stderr)
        return 1
    if args.json or args.prometheus:
        print(text, end="" if text.endswith("\n") else "\n")
        return 0
    data = json.loads(text)
    print(stats_table(data) + upstreams_table(data), end="")
    return 0


def stats_table(data, rates=None):
    """The counters of a `stats` answer as text: a column per listener and the total;
    with ``rates`` ({listener or "total": {counter: per second}}) each cell is a rate,
    except the gauges (open associations, sockets, connections), which stay values.
    Counters that are zero everywhere are left out when rates are shown."""
    from relay.stats import COUNTERS, GAUGES
    names = sorted(data["listeners"])
    cols = names + ["total"]
    src = dict(data["listeners"], total=data["total"])

    def cell(col, key):
        if rates is None or key in GAUGES:
            return str(src[col][key])
        return f"{rates[col][key]:,.0f}/s"

    keys = [k for k in COUNTERS if rates is None or k in GAUGES
            or any(src[c][k] for c in cols)]
    width = max([len(k) for k in keys] + [8])
    widths = [max(12, len(n)) for n in names] + [14]
    out = [" " * width + "  " + "  ".join(n.rjust(w) for n, w in zip(cols, widths))]
    for key in keys:
        out.append(key.ljust(width) + "  " + "  ".join(cell(c, key).rjust(w)
                                                        for c, w in zip(cols, widths)))
    if data.get("clients"):
        out.append(clients_table(data["clients"]["total"], rates and rates.get("clients")))
    return "\n".join(out) + "\n"


def clients_table(groups, rates=None):
    """The client groups' counters (all listeners) as text: a line per group; with
    ``rates`` ({group: {field: per second}}) per second."""
    from relay.flows import GROUP_FIELDS
    head = ["client group", "datagrams>", "bytes>", "datagrams<", "bytes<"]
    rows = [[g] + [f"{rates[g][k]:,.0f}/s" if rates else str(c[k]) for k in GROUP_FIELDS]
            for g, c in sorted(groups.items())]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    return "\n" + "\n".join(r[0].ljust(widths[0]) + "".join("  " + v.rjust(w) for v, w in
                                                           zip(r[1:], widths[1:]))
                            for r in [head] + rows)
def upstreams_table(data):
    """The `upstreams` section of a `stats` answer (listeners with several upstreams) as
    text: per listener, each upstream's URL (no password), health and flows; "" if none."""
    out = []
    for name, ups in sorted(data.get("upstreams", {}).items()):
        out.append(f"upstreams of {name}:")
        for up in ups:
            out.append(f"  {up['url']:<40} {'healthy' if up['healthy'] else 'DOWN':<8} "
                       f"{up['flows']} flows")
    return "\n".join(out) + "\n" if out else ""


def stats_rates(before, after, seconds):
    """Per-second rates between two `stats` answers (a restarted counter counts from 0)."""
    out = {}
    for col, new in dict(after["listeners"], total=after["total"]).items():
        old = before["total"] if col == "total" else before["listeners"].get(col, {})
        out[col] = {k: max(0, v - old.get(k, 0)) / seconds if seconds > 0 else 0.0
                    for k, v in new.items()}
    if after.get("clients"):
        before_groups = (before.get("clients") or {}).get("total", {})
        out["clients"] = {g: {k: max(0, v - before_groups.get(g, {}).get(k, 0)) / seconds
                              if seconds > 0 else 0.0 for k, v in c.items()}
                          for g, c in after["clients"]["total"].items()}
    return out


def _positive_seconds(text):
    try:
        v = float(text)
    except ValueError:
        v = 0.0
    if not 0.1 <= v <= 3600:
        raise argparse.ArgumentTypeError(f"expected seconds between 0.1 and 3600, got {text!r}")
    return v


def _watch_stats(args, query, clock=time.monotonic, sleep=time.sleep, out=None, rounds=None):
    """`relay stats --watch [SECONDS]`: rates per second refreshed in place until Ctrl-C
    (``rounds`` bounds it for tests)."""
    out = out or sys.stdout
    interval = args.watch
    prev = prev_t = None
    n = 0
    try:
        while rounds is None or n < rounds:
            try:
                data, now = json.loads(query(args.control, "stats")), clock()
            except (RuntimeError, OSError, ValueError) as e:
                print(f"relay stats: error: {e}", file=sys.stderr)
                return 1
            if prev is not None:
                rates = stats_rates(prev, data, now - prev_t)
                clear = "\x1b[H\x1b[2J" if out.isatty() else ""
                out.write(f"{clear}relay stats every {interval:g} s "
                          f"({time.strftime('%H:%M:%S')}), Ctrl-C ends\n"
                          + stats_table(data, rates) + upstreams_table(data)
                          + ("" if clear else "\n"))
                out.flush()
                n += 1
            prev, prev_t = data, now
            sleep(interval)
    except KeyboardInterrupt:
        pass
    return 0


def _mode_parser(sub, mode, help, description):
    p = sub.add_parser(mode, formatter_class=Formatter, help=help,
                       description=textwrap.fill(" ".join(description.split()), width=88))
    p.set_defaults(func=_cmd_mode, mode=mode)
    return p


def _add_forward(sub):
    p = _mode_parser(sub, "forward", "UDP port forwarding: LISTEN -> TO, one upstream socket per "
                     "client", "Forward UDP datagrams arriving at --listen to --to. Each client "
                     "address gets its own upstream socket (association); replies return to the "
                     "client from the address it sent to.")
    _opt(p, "forward", "--listen", "address to listen on; [::]:PORT listens on IPv6 and IPv4",
         required=True, metavar="HOST:PORT")
    _opt(p, "forward", "--to", "destination", required=True, metavar="HOST:PORT")
    _flow_options(p, "forward")
    _upstream_options(p, "forward")
    _header_options(p, "forward")
    _runtime_options(p)


def _add_redir(sub):
    p = _mode_parser(sub, "redir", "transparent proxy for TPROXY'd UDP, replies spoofed as the "
                     "remote", "Receive TPROXY'd UDP (see `relay rules`), send each datagram to "
                     "its original destination, and send every reply back to the client with the "
                     "remote's own address as source (full cone: any remote that answers an "
                     "association's socket is delivered).")
    _opt(p, "redir", "--listen", "TPROXY target address; [::]:PORT takes IPv4 and IPv6",
         required=True, metavar="HOST:PORT")
    _opt(p, "redir", "--reply", "raw: headers built by relay, sent on a raw socket, no "
         "descriptor per remote (replies larger than the MTU to the client go as IP fragments "
         "built by relay); transparent: sockets bound to each remote (bounded LRU). Raw "
         "replies that cannot be fragmented go the transparent way", choices=["raw", "transparent"])
    _opt(p, "redir", "--transparent-cache", "transparent reply sockets kept open per worker "
         "(LRU)", type=int, metavar="N")
    _opt(p, "redir", "--transparent-idle", "idle time after which a transparent reply socket "
         "is closed", type=float, metavar="SECONDS")
    _opt(p, "redir", "--reject", "original destination ports not relayed: each datagram to one "
         "is answered with an ICMP/ICMPv6 port unreachable from its destination, so the client "
         "gives up at once (443: QUIC falls back to TCP); ports and LOW-HIGH ranges, repeat or "
         "comma-separate (443,8443,5000-5010); errors rate-limited to 1000/s, burst 50; needs "
         "a raw socket (CAP_NET_RAW) in either reply mode", action="append", metavar="PORTS")
    _flow_options(p, "redir")
    _upstream_options(p, "redir")
    _runtime_options(p)


def _add_tun(sub):
    p = _mode_parser(sub, "tun", "UDP from a TUN device: no TPROXY needed, replies as the remote",
                     "Create (or attach to) a TUN device and relay every UDP datagram routed into "
                     "it (see `relay rules tun`) to its IP destination: one upstream socket per "
                     "client address and port, full cone, replies written back into the device "
                     "as packets from the remote that sent them. IP fragments are reassembled, "
                     "ICMP errors of upstream sockets are passed on, everything that is not UDP "
                     "is dropped and counted (docs/tun.md).")
    g = p.add_argument_group("device")
    _opt(g, "tun", "--dev", "the TUN device (created if missing; one queue per worker)",
         metavar="NAME")
    _opt(g, "tun", "--address", "addresses with prefix lengths given to the device at start, "
         "comma-separated (e.g. 198.18.0.1/30,fd00::1/126); default: none",
         metavar="CIDR,...")
    _opt(g, "tun", "--mtu", "MTU of the device (1280-65535); replies larger go as IP "
         "fragments; default: the device's (1500 for a new one)", type=int, metavar="N")
    _opt(g, "tun", "--offload", "auto: the virtio-net header with UDP segmentation offload "
         "where the kernel has it (Linux 6.2+), runs of datagrams as one read and one write; "
         "on: that or fail; off: one packet per read and write", choices=["auto", "on", "off"])
    _flow_options(p, "tun")
    _upstream_options(p, "tun")
    _runtime_options(p)


def _add_tunnel_server(sub):
    m = "tunnel-server"
    p = _mode_parser(sub, m, "UDP-over-TCP tunnel server (gost-compatible framing)",
                     "Accept tunnel clients (relay tunnel-client, gost's UDP-over-TCP) and send "
                     "their datagrams from a UDP socket per flow; replies go back framed. "
                     "Destinations in loopback, link-local, private and other special ranges, "
                     "and this host's own addresses, are refused unless --allow'ed "
                     "(docs/tunnel.md).")
    _opt(p, m, "--listen", "TCP address to listen on", required=True, metavar="HOST:PORT")
    g = p.add_argument_group("clients")
    _secret_options(g, m, "shared secret clients must prove (HMAC-SHA256 challenge); a "
                    "non-loopback address needs it or --username/--password, unless --insecure")
    _login_options(g, m, "username for clients that cannot prove a secret, such as gost clients "
                   "(RFC 1929; sent in clear, unlike --secret); with --secret as well, relay "
                   "clients prove the secret and gost clients log in")
    _acl_options(g, m, "--secret or --username/--password")
    _flow_options(p, m)
    _runtime_options(p)


def _add_tunnel_client(sub):
    m = "tunnel-client"
    p = _mode_parser(sub, m, "UDP-over-TCP tunnel client",
                     "Receive UDP on --listen and carry every datagram to --to through a relay "
                     "tunnel-server; each client address is its own flow, multiplexed over "
                     "--connections TCP connections that reconnect with backoff. With --gost the "
                     "server is a gost server instead: every flow gets its own TCP connection "
                     "(CMD 0xF3), opened when the flow starts and closed when it idles out "
                     "(docs/tunnel.md).")
    _opt(p, m, "--server", "the tunnel server; repeat for several (at most 16, see --balance)",
         required=True, metavar="HOST:PORT", action="append")
    _opt(p, m, "--listen", "UDP address to listen on", required=True, metavar="HOST:PORT")
    _opt(p, m, "--to", "destination of every datagram, as seen from the server", required=True,
         metavar="HOST:PORT")
    g = p.add_argument_group("server")
    _secret_options(g, m, "shared secret of a relay tunnel-server (not with --gost)")
    _opt(g, m, "--connections", "TCP connections to spread flows over (default: 1; refused with "
         "--gost, which opens one connection per flow)", type=int, metavar="N")
    _opt(g, m, "--gost", "the server is a gost server (gost -L socks5://...): gost's UDP tunnel, "
         "one TCP connection per flow; empty datagrams cannot be carried and are dropped "
         "(counted in drop_malformed)", action="store_true")
    _login_options(g, m, "with --gost: username for the server (RFC 1929)")
    _balance_option(g, m, "--server")
    _flow_options(p, m)
    _offload_option(p.add_argument_group("listen side"), m)
    _runtime_options(p)


def _add_socks5(sub):
    m = "socks5"
    p = _mode_parser(sub, m, "SOCKS5 server with UDP ASSOCIATE (and CONNECT)",
                     "A SOCKS5 server (RFC 1928, username/password per RFC 1929): UDP ASSOCIATE "
                     "relays datagrams in C, one relay socket per association; CONNECT relays "
                     "TCP so ordinary clients work. Fragmented datagrams (FRAG != 0) are dropped "
                     "and counted. Destinations in loopback, link-local, private and other "
                     "special ranges, and this host's own addresses, are refused unless "
                     "--allow'ed (docs/tunnel.md).")
    _opt(p, m, "--listen", "TCP address to listen on", required=True, metavar="HOST:PORT")
    g = p.add_argument_group("clients")
    _login_options(g, m, "username clients must give (RFC 1929)")
    _acl_options(g, m, "--username/--password")
    _opt(g, m, "--strict-udp", "refuse UDP ASSOCIATE requests that announce port 0 (REP 2); "
         "without it such an association belongs to the first address and port its client's "
         "host sends from", action="store_true")
    _flow_options(p, m)
    _runtime_options(p)


def build_parser():
    p = argparse.ArgumentParser(
        prog="relay", formatter_class=Formatter,
        description="UDP redirection for Linux routers: port forwarding, TPROXY transparent proxy "
                    "with spoofed replies, UDP over TCP tunnel, SOCKS5 UDP.",
        epilog="Run `relay COMMAND --help` for the options of each command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_forward(sub)
    _add_redir(sub)
    _add_tun(sub)

    run = sub.add_parser("run", formatter_class=Formatter,
                         help="run every listener of a TOML configuration file",
                         description="Run any number of listeners of any mode from one TOML file "
                                     "(see docs/config.md). SIGHUP reloads the file and keeps the "
                                     "listeners that did not change.")
    run.add_argument("-c", "--config", required=True, metavar="FILE", help="TOML configuration")
    run.add_argument("--check", action="store_true", help="validate the file and exit")
    run.set_defaults(func=_cmd_run)

    st = sub.add_parser("stats", formatter_class=Formatter,
                        help="print the counters of a running relay",
                        description="Read the counters of a running relay through its control "
                                    "socket: datagrams and bytes each way, associations, drops "
                                    "by reason.")
    st.add_argument("--control", default=DEFAULT_CONTROL, metavar="PATH",
                    help="the relay's control socket")
    fmt = st.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--prometheus", action="store_true", help="print Prometheus text format")
    fmt.add_argument("--watch", nargs="?", const=1.0, type=_positive_seconds, metavar="SECONDS",
                     help="rates per second, refreshed in place every SECONDS (default 1) "
                          "until Ctrl-C; open associations and connections as values")
    st.set_defaults(func=_cmd_stats)

    from relay import doctor, flows, rules
    flows.add_cli(sub)
    rules.add_cli(sub)
    doctor.add_cli(sub)
    _add_tunnel_server(sub)
    _add_tunnel_client(sub)
    _add_socks5(sub)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args)
    except BrokenPipeError:        # output piped into `head` and the like
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
