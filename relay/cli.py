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
    g.add_argument("--user", default=None,
                   help="once their sockets are open, workers switch to this user keeping only "
                        "CAP_NET_ADMIN and CAP_NET_RAW (default: nobody when started as root; "
                        "'root' keeps root)")


def _flow_options(p):
    g = p.add_argument_group("flows")
    g.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="idle time after which an association is closed (traffic in either "
                        "direction refreshes it)")
    g.add_argument("--max-associations", type=int, default=65536, metavar="N",
                   help="associations per worker; at the cap the least recently used is evicted")
    g.add_argument("--mark", type=int, default=255,
                   help="SO_MARK on every upstream and reply socket, so the relay's own traffic "
                        "is never captured again (0: none)")
    g.add_argument("--batch", type=int, default=64, metavar="N",
                   help="datagrams per recvmmsg/sendmmsg call")
    g.add_argument("--gro", action="store_true",
                   help="bulk path: take coalesced datagrams from the kernel (UDP_GRO) and pass "
                        "each run on as one segmentation-offload send (UDP_SEGMENT)")
    g.add_argument("--upstream", default=None, metavar="URL",
                   help="send through tunnel://HOST:PORT (relay tunnel-server), "
                        "gost://[USER:PASS@]HOST:PORT (a gost server's UDP-over-TCP tunnel, one "
                        "TCP connection per flow) or socks5://[USER:PASS@]HOST:PORT (SOCKS5 UDP "
                        "ASSOCIATE) instead of directly; USER and PASS are percent-encoded")
    g.add_argument("--secret", default=None,
                   help="with --upstream tunnel:// only: the tunnel server's secret (proved "
                        "with an HMAC, never sent)")
    g.add_argument("--connections", type=int, default=None, metavar="N",
                   help="with --upstream tunnel:// only: TCP connections the flows are spread "
                        "over (default: 1)")


def _listener_from_args(args, mode):
    lc = {"name": args.name or mode, "mode": mode, "listen": args.listen,
          "timeout": args.timeout, "max_associations": args.max_associations,
          "mark": args.mark, "batch": args.batch, "gro": args.gro}
    if args.upstream:
        lc["upstream"] = args.upstream
    # given without a tunnel:// upstream, the configuration refuses them, naming the option
    if args.secret is not None:
        lc["secret"] = args.secret
    if args.connections is not None:
        lc["connections"] = args.connections
    if mode == "forward":
        lc["to"] = args.to
    if mode == "redir":
        lc.update(reply=args.reply, transparent_cache=args.transparent_cache,
                  transparent_idle=args.transparent_idle)
    return lc


def _global_from_args(args):
    g = {"pin": args.pin, "log_level": args.log_level, "control_socket": args.control}
    if args.workers is not None:
        g["workers"] = args.workers
    if args.metrics:
        g["metrics"] = args.metrics
    if args.user:
        g["user"] = args.user
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
        logging.getLogger("relay").error("cannot start: %s", e)
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
    try:
        text = query(args.control, "metrics" if args.prometheus else "stats")
    except (RuntimeError, OSError) as e:
        print(f"relay stats: error: {e}", file=sys.stderr)
        return 1
    if args.json or args.prometheus:
        print(text, end="" if text.endswith("\n") else "\n")
        return 0
    data = json.loads(text)
    names = sorted(data["listeners"])
    from relay.stats import COUNTERS
    rows = [(k, [data["listeners"][n][k] for n in names], data["total"][k]) for k in COUNTERS]
    width = max(len(r[0]) for r in rows)
    cols = [max(12, len(n)) for n in names]
    print(" " * width + "  " + "  ".join(n.rjust(c) for n, c in zip(names, cols)) + "  " + "total".rjust(14))
    for key, vals, tot in rows:
        print(key.ljust(width) + "  " + "  ".join(str(v).rjust(c) for v, c in zip(vals, cols))
              + "  " + str(tot).rjust(14))
    return 0


def build_parser():
    p = argparse.ArgumentParser(
        prog="relay", formatter_class=Formatter,
        description="UDP redirection for Linux routers: port forwarding, TPROXY transparent proxy "
                    "with spoofed replies, UDP over TCP tunnel, SOCKS5 UDP.",
        epilog="Run `relay COMMAND --help` for the options of each command.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    f = sub.add_parser("forward", formatter_class=Formatter,
                       help="UDP port forwarding: LISTEN -> TO, one upstream socket per client",
                       description="Forward UDP datagrams arriving at --listen to --to. Each "
                                   "client address gets its own upstream socket (association); "
                                   "replies return to the client from the listen address.")
    f.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="address to listen on; [::]:PORT listens on IPv6 and IPv4")
    f.add_argument("--to", required=True, metavar="HOST:PORT", help="destination")
    f.add_argument("--name", default=None, help="listener name in stats and metrics (default: forward)")
    _flow_options(f)
    _runtime_options(f)
    f.set_defaults(func=_cmd_mode, mode="forward")

    r = sub.add_parser("redir", formatter_class=Formatter,
                       help="transparent proxy for TPROXY'd UDP, replies spoofed as the remote",
                       description="Receive TPROXY'd UDP (see `relay rules`), send each datagram "
                                   "to its original destination, and send every reply back to the "
                                   "client with the remote's own address as source (full cone: "
                                   "any remote that answers an association's socket is delivered).")
    r.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="TPROXY target address; [::]:PORT takes IPv4 and IPv6")
    r.add_argument("--reply", choices=["raw", "transparent"], default="raw",
                   help="raw: headers built by relay, sent on a raw socket, no descriptor per "
                        "remote (replies larger than the MTU to the client go as IP fragments "
                        "built by relay); transparent: sockets bound to each remote (bounded "
                        "LRU). Raw replies that cannot be fragmented go the transparent way")
    r.add_argument("--transparent-cache", type=int, default=1024, metavar="N",
                   help="transparent reply sockets kept open per worker (LRU)")
    r.add_argument("--transparent-idle", type=float, default=30.0, metavar="SECONDS",
                   help="idle time after which a transparent reply socket is closed")
    r.add_argument("--name", default=None, help="listener name in stats and metrics (default: redir)")
    _flow_options(r)
    _runtime_options(r)
    r.set_defaults(func=_cmd_mode, mode="redir")

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
    st.set_defaults(func=_cmd_stats)

    from relay import rules
    rules.add_cli(sub)
    from relay.engine import socks5, tunnel
    tunnel.add_cli(sub)
    socks5.add_cli(sub)
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
