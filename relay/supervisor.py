"""The supervisor: forks the workers, restarts the ones that die, serves statistics.

Signals: SIGTERM / SIGINT stop everything cleanly; SIGHUP reloads the configuration file
(``relay run -c``) and keeps the listeners that did not change.
"""
import dataclasses
import json
import logging
import os
import pickle
import select
import signal
import socket
import stat
import threading
import time

from relay.net import sockopt
from relay import flows as flows_mod
from relay import stats as stats_mod
from relay.config import LISTEN_PROTO
from relay.droplog import DropLog
from relay.worker import worker_main

log = logging.getLogger("relay")

MAX_SLOTS = 4096
RESTART_BACKOFF_MAX = 5.0
DROP_CHECK_INTERVAL = 1.0       # seconds between looks at the drop counters (DropLog)
FLOWS_TIMEOUT = 3.0             # seconds a worker has to answer `relay flows`


class StartError(RuntimeError):
    """The relay could not start (a worker could not open its sockets, ...)."""


def describe_status(status):
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"killed by signal {name}"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"status {status}"


class WorkerHandle:
    def __init__(self, index):
        self.index = index
        self.pid = None
        self.chan = None
        self.started = 0.0
        self.failures = 0
        self.restart_at = None
        self.buf = b""


class Supervisor:
    def __init__(self, config, *, config_path=None, loader=None):
        self.config = config
        self.config_path = config_path
        self.loader = loader
        self.nworkers = max(1, config.global_.workers or os.cpu_count() or 1)
        self.stats = stats_mod.StatsRegion(MAX_SLOTS)
        self.slots = {}
        self.retired = {}           # listener -> counters of workers that died (not gauges)
        self.retired_groups = {}    # listener -> client group words of workers that died
        self.chan_lock = threading.Lock()   # one request/answer on the worker channels at a time
        self.asked = 0                      # requests sent to workers: the id of the last
        self.next_slot = 0
        self._assign_slots(config)
        self.workers = [WorkerHandle(i) for i in range(self.nworkers)]
        self.stopping = False
        self.reload_requested = False
        self.control = None
        self.metrics_server = None
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_w, False)
        os.set_blocking(self.wake_r, False)     # the loop drains it without waiting
        self.drop_log = DropLog(log)
        self.next_drop_check = 0.0

    # ---- slots -----------------------------------------------------------------------

    def _assign_slots(self, config):
        for lc in config.listeners:
            if lc.name not in self.slots:
                if self.next_slot + self.nworkers > MAX_SLOTS:
                    raise StartError(f"too many listeners over the relay's lifetime (max {MAX_SLOTS} slots)")
                self.slots[lc.name] = self.next_slot
                self.next_slot += self.nworkers

    def counters(self):
        """{listener name: summed counters} for the listeners configured now."""
        out = {}
        for lc in self.config.listeners:
            base = self.slots[lc.name]
            out[lc.name] = stats_mod.total([*(self.stats.read(base + i) for i in range(self.nworkers)),
                                            self.retired.get(lc.name, {})])
        return out

    def clients(self):
        """{listener name: {client group: counters}} (relay/flows.py); {} without groups."""
        groups = self.config.global_.client_groups
        if not groups:
            return {}
        out = {}
        for lc in self.config.listeners:
            base = self.slots[lc.name]
            words = list(self.retired_groups.get(lc.name, ()) or [0] * flows_mod.GROUP_WORDS)
            for i in range(self.nworkers):
                words = [a + b for a, b in zip(words, self.stats.read_groups(base + i))]
            out[lc.name] = flows_mod.group_counters(groups, words)
        return out

    def upstream_health(self):
        """{listener name: [{url, healthy, flows}]} for the listeners with several upstreams
        (what their workers published: relay/services/health.py)."""
        out = {}
        for lc in self.config.listeners:
            if lc.balanced_upstreams():
                base = self.slots[lc.name]
                out[lc.name] = stats_mod.upstream_summary(
                    [str(u) for u in lc.balanced_upstreams()],
                    [self.stats.upstreams.read(base + i) for i in range(self.nworkers)])
        return out

    def _retire_slots(self, index):
        """Keep a dead worker's counts (gauges excepted) and clear its slots for the next one."""
        for name, base in self.slots.items():
            counts = self.stats.read(base + index)
            acc = self.retired.setdefault(name, {})
            for k, v in counts.items():
                if k not in stats_mod.GAUGES:
                    acc[k] = acc.get(k, 0) + v
            words = self.retired_groups.get(name) or [0] * flows_mod.GROUP_WORDS
            self.retired_groups[name] = [a + b for a, b in zip(words, self.stats.read_groups(base + index))]
            self.stats.clear(base + index)
            self.stats.upstreams.clear(base + index)

    # ---- listen addresses --------------------------------------------------------------

    @staticmethod
    def _bound(config):
        return {(LISTEN_PROTO[lc.mode], tuple(lc.listen)) for lc in config.listeners
                if lc.listen is not None}

    def _check_ports(self, config, held=()):
        """Refuse listen addresses another process serves (see sockopt.check_port_free);
        ``held`` are the (proto, address) this relay's workers hold already."""
        for proto, addr in sorted(self._bound(config) - set(held)):
            sockopt.check_port_free(addr, proto)

    # ---- workers ---------------------------------------------------------------------

    def _spawn(self, w):
        parent, child = socket.socketpair()
        me = os.getpid()
        pid = os.fork()
        if pid == 0:
            parent.close()
            if self.control:
                self.control.close()
            worker_main(w.index, self.config, self.stats, dict(self.slots), child,
                        pin=self.config.global_.pin, supervisor_pid=me)
        child.close()
        w.pid = pid
        w.chan = parent
        w.buf = b""
        w.started = time.monotonic()
        w.restart_at = None
        return w

    def _read_msg(self, w, timeout, reap=True):
        """One message of worker w. A worker gone: StartError, its status reaped here when
        reap (at start and reload, in the main thread), else left to _reap."""
        deadline = time.monotonic() + timeout
        while b"\n" not in w.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartError(f"worker {w.index} did not answer within {timeout:.0f}s")
            r, _, _ = select.select([w.chan], [], [], left)
            if r:
                data = w.chan.recv(65536)
                if not data:
                    if not reap:
                        raise StartError(f"worker {w.index} is gone")
                    _, status = os.waitpid(w.pid, 0)
                    w.pid = None
                    raise StartError(f"worker {w.index} {describe_status(status)} during start")
                w.buf += data
        line, w.buf = w.buf.split(b"\n", 1)
        return json.loads(line)

    def start(self):
        """Start every worker and wait until each has opened its sockets."""
        try:
            for w in self.workers:
                self._spawn(w)
                msg = self._read_msg(w, 30)
                if "error" in msg:
                    raise StartError(msg["error"])
        except BaseException:
            self._terminate_all()
            raise
        log.info("relay started: %d worker(s), listeners: %s", self.nworkers,
                 ", ".join(f"{lc.name} ({lc.mode})" for lc in self.config.listeners))
        self._fastopen_note()

    def _fastopen_note(self):
        """One line when the kernel leaves Fast Open off for a side this config uses."""
        if not self.config.global_.tcp_fastopen:
            return
        sides = {"client" if lc.mode in ("tunnel-client", "forward", "redir") else "server"
                 for lc in self.config.listeners
                 if lc.mode in ("tunnel-client", "tunnel-server", "socks5") or lc.upstream}
        bits = sockopt.fastopen_bits()
        missing = [s for s in sockopt.fastopen_missing(bits) if s in sides]
        if missing:
            log.info("TCP Fast Open off for the %s side: net.ipv4.tcp_fastopen is %d (1: "
                     "client, 2: server; sysctl -w net.ipv4.tcp_fastopen=3 allows both)",
                     " and ".join(missing), bits)

    def _reap(self):
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for w in self.workers:
                if w.pid == pid:
                    w.pid = None
                    if w.chan:
                        w.chan.close()
                        w.chan = None
                    if self.stopping:
                        break
                    self._retire_slots(w.index)
                    lived = time.monotonic() - w.started
                    w.failures = w.failures + 1 if lived < 5 else 1
                    delay = min(RESTART_BACKOFF_MAX, 0.1 * (2 ** (w.failures - 1))) if w.failures > 1 else 0
                    w.restart_at = time.monotonic() + delay
                    log.warning("worker %d (pid %d) %s; restarting%s", w.index, pid,
                                describe_status(status), f" in {delay:.1f}s" if delay else "")
                    break

    def _restart_due(self):
        now = time.monotonic()
        for w in self.workers:
            if w.pid is None and w.restart_at is not None and now >= w.restart_at:
                try:
                    self._spawn(w)
                    msg = self._read_msg(w, 30)
                    if "error" in msg:
                        log.error("worker %d could not restart: %s", w.index, msg["error"])
                        self._kill(w)
                        w.restart_at = time.monotonic() + RESTART_BACKOFF_MAX
                    else:
                        log.info("worker %d restarted (pid %d)", w.index, w.pid)
                except StartError as e:
                    log.error("%s", e)
                    w.restart_at = time.monotonic() + RESTART_BACKOFF_MAX

    def _kill(self, w, sig=signal.SIGKILL):
        if w.pid:
            try:
                os.kill(w.pid, sig)
            except ProcessLookupError:
                pass

    def _terminate_all(self, grace=5.0):
        self.stopping = True
        for w in self.workers:
            self._kill(w, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for w in self.workers:
            while w.pid:
                try:
                    pid, _ = os.waitpid(w.pid, os.WNOHANG)
                except ChildProcessError:
                    pid = w.pid
                if pid:
                    w.pid = None
                    break
                if time.monotonic() > deadline:
                    self._kill(w)
                    os.waitpid(w.pid, 0)
                    w.pid = None
                    break
                time.sleep(0.02)
            if w.chan:
                w.chan.close()
                w.chan = None

    # ---- reload ----------------------------------------------------------------------

    def reload(self):
        if not self.loader or not self.config_path:
            log.warning("SIGHUP: no configuration file to reload")
            return
        try:
            new = self.loader(self.config_path)
        except Exception as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        if new.global_.workers and new.global_.workers != self.nworkers:
            log.warning("reload: the number of workers cannot change without a restart; keeping %d",
                        self.nworkers)
        if new.global_.client_groups != self.config.global_.client_groups:
            log.warning("reload: client groups cannot change without a restart; keeping them")
            new = dataclasses.replace(new, global_=dataclasses.replace(
                new.global_, client_groups=self.config.global_.client_groups))
        try:
            self._check_ports(new, held=self._bound(self.config))
            self._assign_slots(new)
        except (StartError, OSError) as e:
            log.error("reload refused, keeping the running configuration: %s", e)
            return
        self.config = new
        blob = pickle.dumps(new).hex()
        for w in self.workers:
            if w.chan:
                try:
                    msg = self._ask(w, {"config": blob, "slots": self.slots}, 30)
                    for err in msg.get("errors", []):
                        log.error("reload: worker %d: %s", w.index, err)
                except (OSError, StartError) as e:
                    log.error("reload: worker %d: %s", w.index, e)
        log.info("configuration reloaded from %s", self.config_path)

    def _ask(self, w, msg, timeout, reap=True):
        """Send worker w one message and read its answer (the channel is shared by the
        main thread's reloads and the control thread's `flows`)."""
        with self.chan_lock:
            self.asked += 1
            msg = dict(msg, id=self.asked)
            w.chan.sendall((json.dumps(msg) + "\n").encode())
            deadline = time.monotonic() + timeout
            while True:     # an answer to an earlier request that timed out is dropped
                answer = self._read_msg(w, max(0.0, deadline - time.monotonic()), reap)
                if answer.get("id") == msg["id"]:
                    return answer

    def flows(self, args):
        """The control request ``flows {json}`` (relay/flows.py): every worker's snapshot,
        merged, sorted and cut to args' top."""
        rows, total, errors = [], 0, []
        for w in self.workers:
            if not w.chan:
                continue
            try:
                msg = self._ask(w, {"flows": args}, FLOWS_TIMEOUT, reap=False)
            except (OSError, StartError, ValueError) as e:
                errors.append(f"worker {w.index}: {e}")
                continue
            rows.extend(msg.get("flows", []))
            total += msg.get("total", 0)
            errors.extend(msg.get("errors", []))
        if args["by_client"]:
            rows = flows_mod.merge_clients(rows)
            total = len(rows)
        rows.sort(key=flows_mod.sort_key(args["sort"]), reverse=True)
        return {"flows": rows[:args["top"]], "total": total, "by_client": args["by_client"],
                "sort": args["sort"], "errors": errors}

    # ---- control socket and metrics ----------------------------------------------------

    def _check_control(self, path):
        """Refuse to start when another relay serves this control socket, or when the path
        holds anything but a socket (never delete what is not ours); remove a stale socket."""
        if not path:
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            kind = "a directory" if stat.S_ISDIR(st.st_mode) else "a file that is not a socket"
            raise StartError(f"control socket path {path} is {kind}; remove it or choose "
                             f"another path (--control / control_socket)")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
            raise StartError(f"another relay is already serving the control socket {path}")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)
        finally:
            probe.close()

    def open_control(self, path):
        if not path:
            return
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        self._check_control(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        os.chmod(path, 0o660)
        s.listen(16)
        self.control = s
        self.control_path = path
        threading.Thread(target=self._serve_control, daemon=True, name="control").start()

    def _serve_control(self):
        while not self.stopping:
            try:
                conn, _ = self.control.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(2)
                    req = conn.recv(512).decode(errors="replace").strip() or "stats"
                    verb, _, rest = req.partition(" ")
                    if req == "stats":
                        body = stats_mod.to_json(self.counters(), self.clients(),
                                                 self.upstream_health())
                    elif req == "metrics":
                        body = stats_mod.prometheus(self.counters(), self.clients(),
                                                    self.upstream_health())
                    elif verb == "flows":
                        try:
                            body = json.dumps(self.flows(flows_mod.parse_request(rest)))
                        except ValueError as e:
                            body = json.dumps({"error": str(e)})
                    elif req == "config":
                        body = json.dumps(self.describe())
                    else:
                        body = json.dumps({"error": f"unknown request {req!r}"})
                    conn.sendall(body.encode())
                except OSError:
                    pass

    def describe(self):
        """The running configuration for `relay doctor` (control request "config"): this
        process, each worker with its listeners and the capabilities they need, and every
        listener's settings (ListenerConfig.summary: no secret, no password)."""
        from relay.privileges import NAMES, needed_capabilities
        listeners = self.config.listeners
        workers = []
        for w in self.workers:
            mine = [lc for lc in listeners if lc.runs_on(w.index)]
            workers.append({"index": w.index, "pid": w.pid,
                            "listeners": [lc.name for lc in mine],
                            "capabilities": [NAMES[c] for c in needed_capabilities(
                                mine, self.config.global_)]})
        g = self.config.global_
        return {"pid": os.getpid(), "user": g.user, "control_socket": g.control_socket,
                "workers": workers, "listeners": [lc.summary() for lc in listeners]}

    def open_metrics(self, addr):
        if not addr:
            return
        from relay.metrics import MetricsServer
        self.metrics_server = MetricsServer(
            addr, lambda: stats_mod.prometheus(self.counters(), self.clients(),
                                               self.upstream_health()))

    # ---- main loop -------------------------------------------------------------------

    def _on_signal(self, signum, frame):
        if signum == signal.SIGHUP:
            self.reload_requested = True
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.stopping = True
        try:
            os.write(self.wake_w, b"x")
        except OSError:
            pass

    def run(self):
        """Start, then supervise until SIGTERM/SIGINT. Returns the exit code."""
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        try:
            self._check_control(self.config.global_.control_socket)
            from relay.privileges import raise_nofile_limit
            log.debug("descriptor limit %d", raise_nofile_limit())     # workers inherit it
            self._check_ports(self.config)
            self.start()
            # Only now: a control socket that answers means every worker's sockets are bound.
            self.open_metrics(self.config.global_.metrics)
            self.open_control(self.config.global_.control_socket)
            while not self.stopping:
                try:
                    select.select([self.wake_r], [], [], 0.2)
                except InterruptedError:
                    pass
                try:
                    while os.read(self.wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                self._reap()
                if self.stopping:
                    break
                if self.reload_requested:
                    self.reload_requested = False
                    self.reload()
                self._restart_due()
                now = time.monotonic()
                if now >= self.next_drop_check:
                    self.next_drop_check = now + DROP_CHECK_INTERVAL
                    self.drop_log.check(self.counters())
            log.info("stopping")
            return 0
        finally:
            self._terminate_all()
            if self.metrics_server:
                self.metrics_server.shutdown()
            if self.control:
                self.control.close()
                try:
                    os.unlink(self.control_path)
                except OSError:
                    pass


def query(path, request="stats", timeout=5.0):
    """Ask a running relay's control socket; returns the response text."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise RuntimeError(f"no relay is running with control socket {path} ({e.strerror})") from None
    with s:
        s.sendall(request.encode() + b"\n")
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            d = s.recv(65536)
            if not d:
                break
            chunks.append(d)
    return b"".join(chunks).decode()
