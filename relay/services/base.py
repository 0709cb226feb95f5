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


class Service:
    """One listener in one worker.

    ``__init__(cfg, ctx)`` opens and binds all sockets (so errors surface at start and
    privileges can be dropped afterwards); ``run()`` blocks, moving datagrams, until
    ``ctx.stop`` is set (it must notice within about 200 ms); ``close()`` releases
    everything. ``run()`` must never raise on bad traffic: it counts and drops.
    """

    def run(self):
        raise NotImplementedError

    def close(self):
        raise NotImplementedError
