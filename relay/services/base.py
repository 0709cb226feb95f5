"""What every data-path service gets from its worker, and what it must provide."""
import logging
import threading
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class WorkerContext:
    index: int                      # worker number 0..N-1
    stats: memoryview               # this (listener, worker)'s counter slot, format "Q"
    stop: threading.Event = field(default_factory=threading.Event)
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("relay"))
    reuseport: bool = True          # every worker binds its own SO_REUSEPORT listen socket
    upstreams: Optional[memoryview] = None   # several upstreams: their health for `relay stats`
    groups: list = field(default_factory=list)   # client groups (relay.flows.compile_groups)


class Requests:
    """Calls made from another thread (the worker's control thread: `relay flows`) that
    must run in the thread that drives a data path, between two of its batches: the data
    path is never read while it moves datagrams. One request at a time; ``serve()`` is
    one attribute test when nothing is asked."""

    def __init__(self):
        self.lock = threading.Lock()
        self.pending = None

    def ask(self, fn, timeout=2.0):
        """fn() run by the data-path thread; TimeoutError when it does not come round."""
        with self.lock:
            req = [fn, threading.Event(), None, None]
            self.pending = req
            if not req[1].wait(timeout):
                self.pending = None
                raise TimeoutError("the data path did not answer")
            if req[3] is not None:
                raise req[3]
            return req[2]

    def serve(self):
        req = self.pending
        if req is None:
            return
        self.pending = None
        try:
            req[2] = req[0]()
        except Exception as e:
            req[3] = e
        req[1].set()


class Service:
    """One listener in one worker.

    ``__init__(cfg, ctx)`` opens and binds all sockets (so errors surface at start and
    privileges can be dropped afterwards); ``run()`` blocks, moving datagrams, until
    ``ctx.stop`` is set (it must notice within about 200 ms); ``close()`` releases
    everything. ``run()`` must never raise on bad traffic: it counts and drops.
    """

    requests = None                 # a Requests when the service lists its flows

    def run(self):
        raise NotImplementedError

    def close(self):
        raise NotImplementedError

    def flows(self, top, sort, by_client):
        """(rows, flows open) of this listener: relay/flows.py row_dict rows plus listener,
        worker and upstream, the top ``top`` by ``sort`` (or summed per client); a service
        that keeps no flows gives ([], 0)."""
        if self.requests is None:
            return [], 0
        from relay import flows as f
        dp = self.flow_source()

        def take():
            return (dp.snapshot(top, f.SORTS.index(sort), by_client, f.CLIENTS_MAX),
                    dp.flows_open)
        rows, count = self.requests.ask(take)
        out = []
        for row in rows:
            d = f.row_dict(row, by_client)
            if not by_client:
                d.update(listener=self.cfg.name, worker=self.ctx.index)
                d.setdefault("upstream", self.upstream_label())
            out.append(d)
        return out, count

    def flow_source(self):
        """What answers snapshot(n, sort, by_client, cap): the engine, or the upstream core."""
        raise NotImplementedError

    def upstream_label(self):
        up = getattr(self.cfg, "upstream", None)
        return str(up) if up is not None else "direct"
