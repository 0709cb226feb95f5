"""Smoke test of an installed relay (scripts/ci-package.sh runs it in a fresh virtualenv).

    python scripts/smoke_installed.py --import-only
    python scripts/smoke_installed.py --relay VENV/bin/relay --control DIR/relay.sock

Checks that relay and every compiled extension import from this interpreter's
installation (never from a checkout), that relay.EXTENSIONS is all True, and with
--relay: starts `relay forward --workers 1` on loopback in front of a UDP echo, relays one
datagram there and back, reads the counters with `relay stats --json`, and stops it with
SIGTERM. Every wait is bounded; exits non-zero with the reason on any failure.
"""
import argparse
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

EXTENSIONS = ("packet._fast", "packet._rawsock", "datapath.engine", "datapath.tunnel")


def fail(msg):
    print(f"smoke: FAILED: {msg}", file=sys.stderr)
    sys.exit(1)


def check_imports():
    os.environ.pop("RELAY_PURE_PYTHON", None)
    import relay
    prefix = os.path.realpath(sys.prefix)
    if not os.path.realpath(relay.__file__).startswith(prefix + os.sep):
        fail(f"relay comes from {relay.__file__}, not from {prefix}")
    for name in EXTENSIONS:
        mod = importlib.import_module(f"relay.{name}")
        path = os.path.realpath(mod.__file__)
        if not (path.startswith(prefix + os.sep) and path.endswith(".so")):
            fail(f"relay.{name} is {path}, not a compiled extension in {prefix}")
    if not relay.EXTENSIONS or not all(relay.EXTENSIONS.values()):
        fail(f"relay.EXTENSIONS = {relay.EXTENSIONS}")
    print(f"smoke: relay {relay.__version__} from {os.path.dirname(relay.__file__)}, "
          f"extensions {', '.join(EXTENSIONS)} compiled; EXTENSIONS = {relay.EXTENSIONS}")


def free_udp_port():
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def echo_server(stop):
    """A UDP echo on 127.0.0.1 in a thread; returns its port."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.settimeout(0.1)

    def serve():
        with s:
            while not stop.is_set():
                try:
                    data, src = s.recvfrom(65535)
                except socket.timeout:
                    continue
                s.sendto(data, src)
    threading.Thread(target=serve, daemon=True).start()
    return s.getsockname()[1]


def stats(relay_cmd, control):
    r = subprocess.run([relay_cmd, "stats", "--json", "--control", control],
                       capture_output=True, text=True, timeout=10)
    try:
        return json.loads(r.stdout)["total"] if r.returncode == 0 else None
    except (ValueError, KeyError):
        return None


def wait_for(what, pred, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.1)
    fail(f"{what} (waited {timeout:.0f} s)")


def check_forward(relay_cmd, control):
    stop = threading.Event()
    echo_port, port = echo_server(stop), free_udp_port()
    log = open(control + ".log", "w+")
    proc = subprocess.Popen([relay_cmd, "forward", "--listen", f"127.0.0.1:{port}",
                             "--to", f"127.0.0.1:{echo_port}", "--workers", "1",
                             "--control", control], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, start_new_session=True)

    def log_text():
        log.flush()
        log.seek(0)
        return log.read()[-3000:]
    try:
        def ready():
            if proc.poll() is not None:
                fail(f"relay forward exited {proc.returncode}:\n{log_text()}")
            return os.path.exists(control) and stats(relay_cmd, control) is not None
        wait_for("relay forward answers on its control socket", ready, 20)
        c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        c.settimeout(5)
        payload = b"relay smoke test \x00\xff"
        c.sendto(payload, ("127.0.0.1", port))
        try:
            data, src = c.recvfrom(65535)
        except socket.timeout:
            fail(f"no reply through relay forward in 5 s:\n{log_text()}")
        if data != payload or src != ("127.0.0.1", port):
            fail(f"reply {data!r} from {src}, expected {payload!r} from 127.0.0.1:{port}")
        def counted():
            st = stats(relay_cmd, control)
            return st if st and st["up_datagrams"] == st["down_datagrams"] == 1 else None
        counters = wait_for("the counters show the datagram both ways", counted, 5)
        print(f"smoke: relay forward 127.0.0.1:{port} -> echo 127.0.0.1:{echo_port}: "
              f"one datagram there and back; up_datagrams={counters['up_datagrams']}, "
              f"down_datagrams={counters['down_datagrams']}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            rc = proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
            fail(f"relay forward did not stop on SIGTERM within 10 s:\n{log_text()}")
        stop.set()
        log.close()
    if rc != 0:
        fail(f"relay forward exited {rc} on SIGTERM")
    print("smoke: relay forward stopped cleanly on SIGTERM")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--import-only", action="store_true", help="only the import checks")
    g.add_argument("--relay", metavar="PATH", help="the installed `relay` command")
    p.add_argument("--control", metavar="PATH", help="control socket for relay forward")
    args = p.parse_args()
    if args.relay and not args.control:
        p.error("--relay needs --control")
    check_imports()
    if args.relay:
        check_forward(args.relay, args.control)


if __name__ == "__main__":
    main()
