"""Start the `relay` command in a namespace (or on the host) and talk to its control socket."""
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

from tests.namespaces import wait_until

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def relay_env():
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    return env


class RelayProcess:
    """`relay ARGS...` with its own control socket; stopped (SIGTERM, then SIGKILL) on close."""

    def __init__(self, args, ns=None, workers=1, prefix=(), log_level="debug"):
        self.dir = tempfile.mkdtemp(prefix="relay-test-")
        self.control = os.path.join(self.dir, "control.sock")
        self.args = [*prefix, sys.executable, "-m", "relay", *map(str, args)]
        if "run" not in args[:1]:
            self.args += ["--control", self.control, "--workers", str(workers), "--log-level", log_level]
        self.stderr_path = os.path.join(self.dir, "stderr.log")
        self.stderr = open(self.stderr_path, "w+")
        popen_kw = dict(stdout=subprocess.DEVNULL, stderr=self.stderr, env=relay_env())
        if ns is not None:
            self.proc = ns.popen(self.args, **popen_kw)
        else:
            self.proc = subprocess.Popen(self.args, start_new_session=True, **popen_kw)

    def log(self):
        self.stderr.flush()
        with open(self.stderr_path) as f:
            return f.read()

    def wait_ready(self, timeout=20):
        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError(f"relay exited with {self.proc.returncode}:\n{self.log()}")
            try:
                self.stats()
                return True
            except OSError:
                return False
        wait_until(ready, timeout, what="relay control socket")
        return self

    def stats(self, listener=None):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        with s:
            s.connect(self.control)
            s.sendall(b"stats\n")
            s.shutdown(socket.SHUT_WR)
            data = b""
            while True:
                d = s.recv(65536)
                if not d:
                    break
                data += d
        doc = json.loads(data)
        return doc["total"] if listener is None else doc["listeners"][listener]

    def settled_stats(self, pred, timeout=5.0, listener=None):
        """Counters once pred(counters) holds. A reply reaches the client a moment before
        the worker has counted it, so tests wait for the counters rather than read once."""
        last = {}

        def check():
            last.update(self.stats(listener))
            return pred(last)
        try:
            wait_until(check, timeout, what="counters")
        except TimeoutError:
            raise AssertionError(f"counters never matched: { {k: v for k, v in last.items() if v} }")
        return dict(last)

    def worker_pids(self):
        import psutil
        return sorted(c.pid for c in psutil.Process(self._main_pid()).children())

    def _main_pid(self):
        import psutil
        p = psutil.Process(self.proc.pid)
        # `ip netns exec` execs the command, so the pid is the relay's own
        for c in [p] + p.children(recursive=True):
            if "relay" in " ".join(c.cmdline()) and c.cmdline()[:1] == [sys.executable]:
                return c.pid
        return p.pid

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)     # the control socket and the log

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def udp_roundtrip(sock, dst, payload, timeout=2.0):
    """Send payload to dst and return (data, source) of the reply."""
    sock.settimeout(timeout)
    sock.sendto(payload, dst)
    data, src = sock.recvfrom(65535)
    return data, src[:2]


class LoopbackEcho:
    """A UDP echo server on 127.0.0.1 in a thread of this process (context manager)."""

    def __init__(self):
        import threading
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.address = self.sock.getsockname()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stop.is_set():
            try:
                d, a = self.sock.recvfrom(65535)
                self.sock.sendto(d, a)
            except (socket.timeout, OSError):
                pass

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def free_port(kind=socket.SOCK_DGRAM, host="127.0.0.1"):
    """A port nothing on host uses now (UDP by default, or kind=socket.SOCK_STREAM)."""
    s = socket.socket(socket.AF_INET, kind)
    s.bind((host, 0))
    port = s.getsockname()[1]
    s.close()
    return port


def free_udp_port(host="127.0.0.1"):
    return free_port(socket.SOCK_DGRAM, host)


def free_tcp_port(host="127.0.0.1"):
    return free_port(socket.SOCK_STREAM, host)
