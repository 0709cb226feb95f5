"""UDP segmentation offload of forward, redir and tunnel-client (``offload``): which kernels
"auto" takes it on, "on" refused at start where the kernel lacks it, the old ``gro`` key
refused with what replaced it, and the engine with offload on and off, on loopback: a run of
one flow's equal-size datagrams leaves as one GSO send or as single datagrams."""
import socket
import struct

import pytest

from relay import cli, config
from relay.net import sockopt
from tests.unit.test_runtime import from_cli, from_toml

_engine = pytest.importorskip("relay.datapath.engine", reason="relay.datapath.engine is not built")


# --- which kernels, which modes


@pytest.mark.parametrize("release,want", [("6.18.0-1-amd64", (6, 18)), ("5.10.0", (5, 10)),
                                          ("4.19.94-ti-r42", (4, 19)), ("weird", (0, 0))])
def test_kernel_version_parses_a_release(release, want):
    assert sockopt.kernel_version(release) == want


@pytest.mark.parametrize("release,missing,want", [
    ("6.1.0", (), True), ("5.10.0", (), True), ("5.4.0", (), False), ("4.19.0", (), False),
    ("6.1.0", ("UDP_GRO",), False), ("6.1.0", ("UDP_SEGMENT", "UDP_GRO"), False)])
def test_auto_takes_offload_from_5_10_where_the_kernel_has_both(monkeypatch, release, missing,
                                                                  want):
    monkeypatch.setattr(sockopt, "udp_offload_missing", lambda: missing)
    assert sockopt.udp_offload("auto", release) is want
    assert sockopt.udp_offload("off", release) is False


def test_on_is_on_or_says_what_the_kernel_lacks(monkeypatch):
    monkeypatch.setattr(sockopt, "udp_offload_missing", lambda: ())
    assert sockopt.udp_offload("on", "4.19.0") is True       # asked for: the version is not checked
    monkeypatch.setattr(sockopt, "udp_offload_missing", lambda: ("UDP_GRO",))
    with pytest.raises(OSError, match="no UDP_GRO .*UDP_GRO in 5.0"):
        sockopt.udp_offload("on")
    with pytest.raises(ValueError, match="auto, on, off"):
        sockopt.udp_offload("yes")


def test_this_kernel_is_probed_for_real():
    have = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name, probe in (("UDP_SEGMENT", lambda: s.getsockopt(sockopt.SOL_UDP, sockopt.UDP_SEGMENT)),
                            ("UDP_GRO", lambda: s.setsockopt(sockopt.SOL_UDP, sockopt.UDP_GRO, 1))):
            try:
                probe()
            except OSError:
                have.append(name)
    assert sockopt.udp_offload_missing() == tuple(have)


# --- configuration


@pytest.mark.parametrize("mode,argv", [
    ("forward", ["forward", "--listen", "127.0.0.1:7000", "--to", "198.51.100.2:53"]),
    ("redir", ["redir", "--listen", "[::]:7000"]),
    ("tunnel-client", ["tunnel-client", "--listen", "127.0.0.1:5000", "--server",
                       "198.51.100.1:8443", "--to", "198.51.100.2:53", "--secret", "s"])])
def test_offload_defaults_to_auto_and_takes_each_mode(mode, argv):
    assert from_cli(*argv).listeners[0].offload == "auto"
    assert from_cli(*argv, "--offload", "off").listeners[0].offload == "off"
    assert config.mode_defaults(mode)["offload"] == "auto"


def test_help_explains_the_choices_and_the_default(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["forward", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--offload {auto,on,off}" in text
    assert "offload_fallback counts it" in text and "(default: auto)" in text


def _refused(line, tmp_path):
    """The error of a forward listener with one more line."""
    with pytest.raises(config.ConfigError) as e:
        from_toml("[[listener]]\nname = \"f\"\nmode = \"forward\"\n"
                  "listen = \"127.0.0.1:7000\"\nto = \"198.51.100.2:53\"\n" + line + "\n",
                  tmp_path)
    return str(e.value)


def test_on_is_refused_at_start_where_the_kernel_lacks_it(monkeypatch, tmp_path):
    monkeypatch.setattr(sockopt, "udp_offload_missing", lambda: ("UDP_SEGMENT",))
    msg = _refused('offload = "on"', tmp_path)
    assert "relay.toml" in msg and "listener[0].offload" in msg and "no UDP_SEGMENT" in msg
    # auto and off start on such a kernel (auto then sends one datagram per message)
    for value in ("auto", "off"):
        cfg = from_cli("forward", "--listen", "127.0.0.1:7000", "--to", "198.51.100.2:53",
                       "--offload", value)
        assert cfg.listeners[0].offload == value


def test_the_old_gro_key_says_what_replaced_it(tmp_path):
    msg = _refused("gro = true", tmp_path)
    assert "listener[0].gro" in msg and 'offload = "auto"' in msg


def test_offload_is_not_a_key_of_the_servers(tmp_path):
    with pytest.raises(config.ConfigError, match="not allowed for mode \"socks5\""):
        from_toml('''
            [[listener]]
            name = "s"
            mode = "socks5"
            listen = "127.0.0.1:1080"
            insecure = true
            offload = "off"
            ''', tmp_path)


# --- the engine, on loopback

FAMILIES = {"ipv4": (socket.AF_INET, "127.0.0.1"), "ipv6": (socket.AF_INET6, "::1")}


def _udp(family, host):
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    s.bind((host, 0))
    s.settimeout(0.5)
    return s


def _recv_messages(sock, expect_bytes):
    """(length, GSO segment size or 0) of each message until expect_bytes have come; the
    socket has UDP_GRO on, so a GSO send over loopback arrives as one message."""
    out, got = [], 0
    while got < expect_bytes:
        data, anc, _, _ = sock.recvmsg(65535, socket.CMSG_SPACE(4))
        seg = 0
        for level, kind, value in anc:
            if level == sockopt.SOL_UDP and kind == sockopt.UDP_GRO:
                seg = struct.unpack("i", value[:4])[0]
        out.append((len(data), seg))
        got += len(data)
    return out


@pytest.fixture
def need_offload():
    missing = sockopt.udp_offload_missing()
    if missing:
        pytest.skip(f"this kernel has no {', '.join(missing)}")


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("offload", [True, False], ids=["on", "off"])
def test_a_run_leaves_as_one_gso_send_only_with_offload(need_offload, fam, offload):
    family, host = FAMILIES[fam]
    listen, up, client = _udp(family, host), _udp(family, host), _udp(family, host)
    listen.setblocking(False)
    up.setsockopt(sockopt.SOL_UDP, sockopt.UDP_GRO, 1)
    eng = _engine.Engine(listen.fileno(), "forward", to=up.getsockname()[:2],
                         listen_family=family, gro=offload, gso=offload)
    try:
        client.connect(listen.getsockname()[:2])
        client.send(b"warm")
        eng.run(10)
        assert up.recvfrom(100)[0] == b"warm"
        payloads = [bytes([i]) * 500 for i in range(16)]
        for p in payloads:
            client.send(p)
        for _ in range(3):
            eng.run(10)
        msgs = _recv_messages(up, 16 * 500)
        if offload:
            assert msgs == [(16 * 500, 500)]            # one message, 500-byte segments
        else:
            assert msgs == [(500, 0)] * 16              # sixteen datagrams
        st = eng.counters()
        assert st["up_datagrams"] == 17 and st["up_bytes"] == 4 + 16 * 500
        assert st["offload_fallback"] == 0
    finally:
        eng.close()
        for s in (listen, up, client):
            s.close()
