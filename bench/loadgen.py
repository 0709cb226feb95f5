"""Load generator and sink for the relay benchmark.

Two load generators with one command line and one JSON report:
  * ``bench/c/blast.c`` (the default): sendmmsg in C;
  * this module's ``blast`` command, built on the project's own packet core
    (``relay.BatchSocket``): ``python -m bench.loadgen blast --dst HOST:PORT ...``.
Both open one socket per flow (distinct source ports), send batches round robin over the
flows, at full rate or paced per batch by a token bucket (``--rate``), and always stop
after ``--count`` datagrams or ``--duration`` seconds. The first payload byte is a phase
marker: warm-up datagrams carry 0, measured ones ``--marker``; the sink (``bench/c/sink.c``,
recvmmsg) counts datagrams and bytes per marker, so one sink serves several phases.

``Blaster`` and ``Sink`` below start them inside a namespace and read their reports.
"""
import argparse
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time


class LoadError(RuntimeError):
    pass


def _group_members(pgid):
    """Live (non-zombie) processes of process group pgid."""
    import psutil
    out = []
    for p in psutil.process_iter():
        try:
            if os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p.pid)
        except (OSError, psutil.Error):
            pass
    return out


def stop_group(proc, sig=signal.SIGTERM, wait=5.0):
    """Signal the process group of proc (started with start_new_session, so the group is
    proc and whatever it forked), reap proc, and wait until no member is left: a forked
    child still holding the listen port would block the next implementation's bind.
    Returns True when the group had to be killed (SIGKILL) after ``wait`` seconds."""
    pgid = proc.pid
    if proc.poll() is None or _group_members(pgid):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_members(pgid):
                return False
            time.sleep(0.01)
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)
        deadline = time.monotonic() + 5
        while _group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.01)
        return True
    return False


class _Lines:
    """Reads a process's stdout lines on a thread, so waits can have timeouts."""

    def __init__(self, stream):
        self.q = queue.Queue()
        self.t = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self.t.start()

    def _pump(self, stream):
        for line in stream:
            self.q.put(line)
        self.q.put(None)

    def get(self, timeout):
        try:
            return self.q.get(timeout=timeout)
        except queue.Empty:
            return ""


class Sink:
    """bench/c/sink.c in a namespace: counts per marker, optional echo; ``tunnel``: the
    server end of relay's multiplexed tunnel on a TCP port instead of a UDP sink."""

    def __init__(self, ns, binary, listen, echo=False, max_time=600, cpus=None, tunnel=False):
        self.ns, self.binary, self.listen, self.echo = ns, binary, listen, echo
        self.tunnel = tunnel
        self.cpus = cpus
        self.max_time = max_time
        self.proc = None
        self.last = {}

    def start(self, timeout=5.0):
        args = [self.binary, "--listen", self.listen, "--max-time", self.max_time]
        if self.echo:
            args.append("--echo")
        if self.tunnel:
            args.append("--tunnel")
        self.proc = self.ns.popen(args, cpus=self.cpus, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
        self.lines = _Lines(self.proc.stdout)
        line = self.lines.get(timeout)
        if not line or line.strip() != "ready":
            self.stop()
            raise LoadError(f"sink did not start: {self._stderr()}")
        return self

    def _stderr(self):
        try:
            return (self.proc.stderr.read() or "").strip()[-500:]
        except (OSError, ValueError):
            return ""

    def snapshot(self, timeout=2.0):
        """Current counters: {"markers": {"1": {"count", "bytes", "first", "last"}}, ...}."""
        if self.proc.poll() is not None:
            raise LoadError(f"sink exited ({self.proc.returncode}): {self._stderr()}")
        os.kill(self.proc.pid, signal.SIGUSR1)
        line = self.lines.get(timeout)
        if not line:
            raise LoadError("sink did not report")
        self.last = json.loads(line)
        return self.last

    def count(self, marker):
        return self.last.get("markers", {}).get(str(marker), {}).get("count", 0)

    def wait_count(self, marker, at_least, quiet=0.2, limit=3.0, interval=0.03):
        """Poll until ``marker`` reached ``at_least`` datagrams, or nothing new arrived for
        ``quiet`` seconds, or ``limit`` passed. Returns the last snapshot."""
        deadline = time.monotonic() + limit
        prev, since = -1, time.monotonic()
        while True:
            self.snapshot()
            c = self.count(marker)
            now = time.monotonic()
            if c >= at_least or now > deadline:
                return self.last
            if c != prev:
                prev, since = c, now
            elif now - since > quiet:
                return self.last
            time.sleep(interval)

    def stop(self):
        if self.proc is None:
            return self.last
        stop_group(self.proc)
        if hasattr(self, "lines"):
            while True:
                line = self.lines.get(0.5)
                if not line:
                    break
                try:
                    self.last = json.loads(line)
                except ValueError:
                    pass
        for f in (self.proc.stdout, self.proc.stderr):
            f and f.close()
        self.proc = None
        return self.last


class Blaster:
    """One load generator run in a namespace. ``start()``; ``wait_warm()``; ``go()``;
    ``result()``. ``command`` is the argv prefix: the C binary, or
    ``[python, -m, bench.loadgen, blast]``."""

    def __init__(self, ns, command, dst, *, size=64, flows=1, batch=64, duration=1.0,
                 rate=0, warmup=2, marker=1, echo=False, gso=False, count=None, cwd=None,
                 cpus=None):
        self.ns, self.command, self.cwd, self.cpus = ns, list(command), cwd, cpus
        count = count or max(1000, int(duration * 3_000_000))
        self.args = ["--dst", dst, "--size", size, "--flows", flows, "--batch", batch,
                     "--duration", duration, "--rate", rate, "--warmup", warmup,
                     "--marker", marker, "--count", count, "--sync"]
        if echo:
            self.args.append("--echo")
        if gso:
            self.args.append("--gso")
        self.duration = duration
        self.proc = None

    def start(self):
        self.proc = self.ns.popen(self.command + self.args, cpus=self.cpus,
                                  stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  cwd=self.cwd)
        self.lines = _Lines(self.proc.stdout)
        return self

    def wait_warm(self, timeout=15.0):
        """Wait for the end of the warm-up; returns how many warm-up datagrams went out."""
        line = self.lines.get(timeout)
        if not line or not line.startswith("warm"):
            err = self._finish_err()
            raise LoadError(f"load generator failed before the measured phase: {err}")
        return int(line.split()[1])

    def go(self):
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def result(self):
        line = self.lines.get(self.duration + 15)
        if not line:
            err = self._finish_err()
            raise LoadError(f"load generator gave no report: {err}")
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        self.close()
        return json.loads(line)

    def _finish_err(self):
        self.kill()
        try:
            return (self.proc.stderr.read() or "").strip()[-500:]
        except (OSError, ValueError):
            return ""

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            stop_group(self.proc, signal.SIGKILL)

    def close(self):
        self.kill()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f and f.close()
            except OSError:
                pass


# ---------------------------------------------------------------------------------------
# The load generator built on relay.BatchSocket (python -m bench.loadgen blast ...).

def _parse_dst(text):
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT or [V6]:PORT, got {text!r}")
    return host, int(port)


def blast_main(argv):
    p = argparse.ArgumentParser(prog="python -m bench.loadgen blast",
                                description="UDP load generator on relay.BatchSocket "
                                            "(same options and report as bench/c/blast.c)")
    p.add_argument("--dst", required=True)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--flows", type=int, default=1)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--count", type=float, default=1e12)
    p.add_argument("--duration", type=float, default=1.0)
    p.add_argument("--rate", type=float, default=0)
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--marker", type=int, default=1)
    p.add_argument("--sync", action="store_true")
    p.add_argument("--echo", action="store_true")
    p.add_argument("--gso", action="store_true")
    a = p.parse_args(argv)
    if a.echo or a.gso:
        p.error("--echo and --gso are only in the C load generator (bench/c/blast.c)")
    if not 1 <= a.size <= 65507 or not 1 <= a.flows <= 60000 or not 1 <= a.batch <= 1024:
        p.error("--size 1-65507, --flows 1-60000, --batch 1-1024")
    if not 1 <= a.marker <= 255 or not 0 < a.duration <= 600:
        p.error("--marker 1-255, --duration in (0, 600]")

    from relay import BatchSocket

    host, port = _parse_dst(a.dst)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    socks, batches = [], []
    for _ in range(a.flows):
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.connect((host, port))
        socks.append(s)
        batches.append(BatchSocket(s, batch=a.batch))
    warm = b"\0" + b"w" * (a.size - 1)
    warm_sent = 0
    for _ in range(a.warmup):
        for s in socks:
            try:
                s.send(warm)
                warm_sent += 1
            except OSError:
                pass
    if a.sync:
        print(f"warm {warm_sent}", flush=True)
        if not sys.stdin.readline():
            return 3
    payload = bytes([a.marker]) + bytes(97 + i % 26 for i in range(1, a.size))
    items = [(payload, None)] * a.batch
    sent = errors = 0
    first_error = ""
    t0 = time.monotonic()
    deadline = t0 + a.duration
    now = t0
    f = 0
    while sent < a.count:
        if a.rate > 0:
            due = t0 + sent / a.rate
            if due > deadline:
                break
            if due > now:
                time.sleep(due - now)
        chunk = items if a.count - sent >= a.batch else items[:max(1, int(a.count - sent))]
        try:
            sent += batches[f].send(chunk)
        except OSError as e:
            errors += 1
            sent += getattr(e, "sent", 0) or 0
            first_error = first_error or (e.strerror or str(e))
        f = f + 1 if f + 1 < a.flows else 0
        now = time.monotonic()
        if now >= deadline:
            break
    elapsed = time.monotonic() - t0
    for b in batches:
        b.close()
    for s in socks:
        s.close()
    print(json.dumps({"sent": sent, "warm_sent": warm_sent, "elapsed": elapsed,
                      "errors": errors, "first_error": first_error, "replies": 0,
                      "reply_bytes": 0, "size": a.size, "flows": a.flows,
                      "gso_segments": 1}), flush=True)
    return 0


def batchsocket_unavailable():
    """Why the BatchSocket load generator cannot run, or None."""
    try:
        import relay
        relay.BatchSocket
    except Exception as e:  # ImportError, AttributeError, a half-built extension...
        return f"relay.BatchSocket is not importable ({type(e).__name__}: {e})"
    return None


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "blast":
        print("usage: python -m bench.loadgen blast --dst HOST:PORT [options]", file=sys.stderr)
        return 2
    return blast_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
