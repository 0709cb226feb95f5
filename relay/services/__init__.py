"""The services: one module per mode, each opening its sockets and driving its data path.

A worker process creates one service per configured listener with
``create_service(cfg, ctx)`` and runs each in its own thread; the Cython loops release
the GIL, so services of one worker do not hold each other up.
"""
import importlib

MODULES = {
    "forward": "relay.services.redirect",
    "redir": "relay.services.redirect",
    "tunnel-server": "relay.services.tunnel_server",
    "tunnel-client": "relay.services.tunnel_client",
    "socks5": "relay.services.socks5_server",
    "tun": "relay.services.tun",
}


def create_service(cfg, ctx):
    """Open the sockets of listener ``cfg`` for worker ``ctx`` and return its service."""
    return importlib.import_module(MODULES[cfg.mode]).create(cfg, ctx)
