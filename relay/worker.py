"""A worker process: runs one data-path service per listener, each in its own thread.

The supervisor forks workers and talks to each over a socketpair with one JSON line per
message: the worker answers ``{"ready": true}`` or ``{"error": "..."}`` after opening its
sockets, and accepts ``{"config": <pickled-config hex>}`` to reload (services whose listener
is unchanged keep running on the same sockets, so they lose nothing).
"""
import json
import logging
import os
import pickle
import signal
import socket
import sys
import threading

from relay.net import sockopt
from relay.services import create_service
from relay.services.base import WorkerContext

log = logging.getLogger("relay")


class RunningService:
    def __init__(self, cfg, service, ctx):
        self.cfg = cfg
        self.service = service
        self.ctx = ctx
        self.thread = threading.Thread(target=self._run, name=f"svc-{cfg.name}", daemon=True)
        self.failed = None

    def _run(self):
        try:
            self.service.run()
        except BaseException as e:  # a data-path bug must not go unnoticed
            self.failed = e
            log.exception("worker %d: listener %s stopped: %s", self.ctx.index, self.cfg.name, e)
            os.kill(os.getpid(), signal.SIGTERM)

    def stop(self, timeout=5.0):
        self.ctx.stop.set()
        self.thread.join(timeout)
        self.service.close()


class Worker:
    def __init__(self, index, config, stats, slots, chan):
        self.index = index
        self.config = config
        self.stats = stats
        self.slots = slots          # listener name -> base slot (slot = base + worker index)
        self.chan = chan
        self.services = {}
        self.stopping = threading.Event()

    def _start(self, lc):
        from relay.flows import compile_groups
        slot = self.slots[lc.name] + self.index
        ctx = WorkerContext(index=self.index, stats=self.stats.slot(slot),
                            upstreams=self.stats.upstreams.slot(slot),
                            groups=compile_groups(self.config.global_.client_groups))
        svc = create_service(lc, ctx)
        rs = RunningService(lc, svc, ctx)
        self.services[lc.name] = rs
        return rs

    def mine(self, config):
        """The listeners this worker runs (a listener may ask for fewer workers)."""
        return {lc.name: lc for lc in config.listeners if lc.runs_on(self.index)}

    def open_all(self):
        """Open every listener's sockets; threads start later (see start_all)."""
        opened = []
        sockopt.set_tcp_keepalive(self.config.global_.tcp_keepalive)
        sockopt.set_tcp_tuning(self.config.global_.tcp_fastopen, self.config.global_.tcp_congestion)
        try:
            for lc in self.mine(self.config).values():
                opened.append(self._start(lc))
        except BaseException:
            for rs in opened:
                rs.service.close()
            self.services.clear()
            raise

    def start_all(self):
        for rs in self.services.values():
            rs.thread.start()

    def reload(self, config, slots):
        """Apply a new configuration: keep unchanged listeners, restart changed ones."""
        self.slots = slots
        sockopt.set_tcp_keepalive(config.global_.tcp_keepalive)     # new connections
        sockopt.set_tcp_tuning(config.global_.tcp_fastopen, config.global_.tcp_congestion)
        new = self.mine(config)
        for name in list(self.services):
            if name not in new or new[name] != self.services[name].cfg:
                self.services.pop(name).stop()
        errors = []
        for name, lc in new.items():
            if name not in self.services:
                try:
                    self._start(lc).thread.start()
                except Exception as e:
                    errors.append(f"{name}: {e}")
        self.config = config
        return errors

    def send(self, msg):
        try:
            self.chan.sendall((json.dumps(msg) + "\n").encode())
        except OSError:
            pass

    def serve(self):
        buf = b""
        self.chan.settimeout(0.5)
        while not self.stopping.is_set():
            try:
                data = self.chan.recv(1 << 20)
            except socket.timeout:
                continue
            except OSError:
                break
            if not data:
                break       # the supervisor is gone: stop
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if "config" in msg:
                    config = pickle.loads(bytes.fromhex(msg["config"]))
                    errors = self.reload(config, msg["slots"])
                    self.send({"reloaded": True, "errors": errors, "id": msg.get("id")})
                elif "flows" in msg:
                    self.send(dict(self.flows(**msg["flows"]), id=msg.get("id")))
        self.shutdown()

    def flows(self, top, sort, by_client):
        """`relay flows` of this worker: each listener's snapshot (relay/flows.py), taken
        by the listener's own thread between batches."""
        from relay.flows import merge_clients, sort_key
        rows, total, errors = [], 0, []
        for name, rs in list(self.services.items()):
            try:
                r, n = rs.service.flows(top, sort, by_client)
            except Exception as e:      # a listener busy or stopping: say so, answer the rest
                errors.append(f"worker {self.index} {name}: {e}")
                continue
            rows.extend(r)
            total += n
        if by_client:
            rows = merge_clients(rows)
        rows.sort(key=sort_key(sort), reverse=True)      # what goes to the supervisor: top rows
        return {"flows": rows[:top], "total": total, "errors": errors}

    def shutdown(self):
        for rs in self.services.values():
            rs.ctx.stop.set()
        for rs in self.services.values():
            rs.stop()
        self.services.clear()


def worker_main(index, config, stats, slots, chan, pin=False, supervisor_pid=None):
    """Entry point in the forked child. Never returns."""
    code = 0
    try:
        _die_with_parent(supervisor_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if pin:
            _pin(index)
        w = Worker(index, config, stats, slots, chan)

        def on_term(signum, frame):
            w.stopping.set()
        signal.signal(signal.SIGTERM, on_term)
        try:
            w.open_all()
        except Exception as e:
            w.send({"error": str(e)})
            os._exit(3)
        # Before any thread exists: capabilities are per thread, new threads inherit them.
        from relay.privileges import default_user, drop_privileges, needed_capabilities
        user = config.global_.user if config.global_.user is not None else default_user()
        try:
            drop_privileges(user, needed_capabilities(w.mine(config).values(), config.global_))
        except Exception as e:
            w.send({"error": f"dropping privileges to {user}: {e}"})
            os._exit(3)
        _die_with_parent(supervisor_pid)     # a change of user clears the setting
        w.start_all()
        w.send({"ready": True})
        w.serve()
    except BaseException:
        logging.getLogger("relay").exception("worker %d failed", index)
        code = 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


PR_SET_PDEATHSIG = 1


def _die_with_parent(parent):
    """A worker never outlives its supervisor (killed with SIGKILL, say): it would go on
    holding its SO_REUSEPORT sockets, unsupervised, and keep a new relay off the port."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:      # the supervisor died before the prctl
        os._exit(1)


def _pin(index):
    import psutil
    cpus = sorted(psutil.Process().cpu_affinity() or range(os.cpu_count() or 1))
    psutil.Process().cpu_affinity([cpus[index % len(cpus)]])
