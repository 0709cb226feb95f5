"""Data-path services, one module per mode.

A worker process creates one service per configured listener with
``create_service(cfg, ctx)`` and runs each in its own thread; the Cython loops release
the GIL, so services of one worker do not hold each other up.
"""
import importlib

MODULES = {
    "forward": "relay.engine.udp",
    "redir": "relay.engine.udp",
    "tunnel-server": "relay.engine.tunnel",
    "tunnel-client": "relay.engine.tunnel",
    "socks5": "relay.engine.socks5",
}


def create_service(cfg, ctx):
    """Open the sockets of listener ``cfg`` for worker ``ctx`` and return its service."""
    return importlib.import_module(MODULES[cfg.mode]).create(cfg, ctx)
