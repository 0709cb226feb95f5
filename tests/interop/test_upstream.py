"""forward and redir through an upstream: `--upstream tunnel://` (relay tunnel-server),
`--upstream gost://` (gost's UDP tunnel, served here by relay tunnel-server, which speaks it)
and `--upstream socks5://` (relay socks5, and v2ray's socks inbound). Replies keep the real
remote as their source: redir spoofs it exactly as with direct sockets."""
import socket

import pytest

from tests.relayproc import LoopbackEcho, RelayProcess, free_udp_port, udp_roundtrip

pytestmark = pytest.mark.netns


@pytest.mark.interop
def test_forward_through_v2ray_socks_inbound(v2ray):  # noqa: F811
    """`relay forward --upstream socks5://` against v2ray's socks inbound with UDP on
    (everything on loopback; v2ray truncates datagrams above about 2 KiB)."""
    listen = ("127.0.0.1", free_udp_port())
    with LoopbackEcho() as echo:
        with RelayProcess(["forward", "--listen", f"127.0.0.1:{listen[1]}", "--to",
                           f"127.0.0.1:{echo.address[1]}", "--upstream",
                           f"socks5://{v2ray[0]}:{v2ray[1]}"]).wait_ready() as relay:
            clients = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(5)]
            for i, c in enumerate(clients):
                for size in (1, 100, 1400):
                    msg = bytes([i]) * size
                    assert udp_roundtrip(c, listen, msg, timeout=3) == (msg, listen)
            relay.settled_stats(lambda st: st["down_datagrams"] == 15)
