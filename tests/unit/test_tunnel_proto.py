"""Tunnel frame codec, SOCKS5 handshakes, secret proof and access list.

The C codec (relay.datapath.tunnel) is cross-checked against the pure reference
(relay.datapath.pure) on hand-made and hypothesis-generated input."""
import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from relay import proto, resolver
from relay.datapath import pure
from tests.support import examples

_tunnel = pytest.importorskip("relay.datapath.tunnel")

IMPLS = {"pure": proto.parse_frames, "c": _tunnel.parse_frames}
FUZZ = settings(max_examples=examples(150), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def outcome(fn, buf, **kw):
    try:
        return "ok", fn(buf, **kw)
    except proto.FrameError as e:
        return "error", e.reason, str(e)


@pytest.fixture(params=sorted(IMPLS))
def parse(request):
    return IMPLS[request.param]


# ----------------------------------------------------------------------------- frames

def gost_frame(host, port, data):
    """A frame as gost's UDPDatagram.WriteTo writes it: RSV = len(data), FRAG 0."""
    ip = ipaddress.ip_address(host)
    atyp = 1 if ip.version == 4 else 4
    return struct.pack("!HBB", len(data), 0, atyp) + ip.packed + struct.pack("!H", port) + data


@pytest.mark.parametrize("host", ["198.51.100.2", "2001:db8::7"])
def test_gost_frames_parse(parse, host):
    buf = gost_frame(host, 53, b"abc") + gost_frame(host, 54, b"")
    frames, used = parse(buf)
    assert used == len(buf)
    assert [(f.host, f.port, f.data, f.flow) for f in frames] == [
        (host, 53, b"abc", None), (host, 54, b"", None)]


def test_encoders_agree_and_match_gost():
    for host in ("192.0.2.1", "2001:db8::1", "::ffff:192.0.2.9"):
        for data in (b"", b"x", bytes(range(256)) * 3):
            py = proto.encode_frame(host, 4242, data)
            assert py == _tunnel.encode_frames([(host, 4242, data)])
            plain_host = str(getattr(ipaddress.ip_address(host), "ipv4_mapped", None) or host)
            assert py == gost_frame(plain_host, 4242, data)
            mux = proto.encode_frame(host, 1, data, flow=0xDEADBEEF)
            assert mux == _tunnel.encode_frames([(host, 1, data, 0xDEADBEEF)], mux=True)


def test_zero_length_and_max(parse):
    buf = proto.encode_frame("192.0.2.1", 9, b"", flow=1) + \
        proto.encode_frame("192.0.2.1", 9, b"z" * proto.MAX_PAYLOAD, flow=2)
    frames, used = parse(buf, mux=True)
    assert used == len(buf)
    assert [len(f.data) for f in frames] == [0, proto.MAX_PAYLOAD]
    assert [f.flow for f in frames] == [1, 2]


def test_incremental(parse):
    buf = b"".join(proto.encode_frame("198.51.100.2", 7, bytes([i]) * i, flow=i)
                   for i in range(20))
    got = []
    pending = b""
    for i in range(0, len(buf), 7):
        pending += buf[i:i + 7]
        frames, used = parse(pending, mux=True)
        got += frames
        pending = pending[used:]
    assert pending == b""
    assert [f.data for f in got] == [bytes([i]) * i for i in range(20)]


BAD = [
    ("too-big", struct.pack("!HBB", 65528, 0, 1) + bytes(6)),
    ("fragmented", struct.pack("!HBB", 1, 1, 1) + bytes(7)),
    ("bad-atyp", struct.pack("!HBB", 1, 0, 2) + bytes(7)),
    ("bad-atyp", struct.pack("!HBB", 0, 0, 0)),
    ("empty-domain", struct.pack("!HBBB", 1, 0, 3, 0) + bytes(3)),
]


@pytest.mark.parametrize("reason,buf", BAD, ids=[b[0] for b in BAD])
def test_errors(parse, reason, buf):
    with pytest.raises(proto.FrameError) as e:
        parse(buf)
    assert e.value.reason == reason


def test_truncated_only_at_end_of_stream(parse):
    buf = proto.encode_frame("192.0.2.1", 9, b"hello")[:-1]
    assert parse(buf) == ([], 0)
    with pytest.raises(proto.FrameError) as e:
        parse(buf, final=True)
    assert e.value.reason == "truncated"
    # RSV larger than what follows: waits for more, then truncated at the end
    big = struct.pack("!HBB", 1000, 0, 1) + bytes(6) + b"short"
    assert parse(big) == ([], 0)
    with pytest.raises(proto.FrameError):
        parse(big, final=True)


def test_domain_frames(parse):
    buf = proto.encode_frame("example.org", 53, b"q")
    frames, _ = parse(buf)
    assert (frames[0].atyp, frames[0].host, frames[0].port) == (3, "example.org", 53)


def test_errors_are_value_errors():
    assert issubclass(proto.FrameError, ValueError)
    assert issubclass(proto.HandshakeError, ValueError)
    with pytest.raises(ValueError):
        proto.encode_frame("192.0.2.1", 70000, b"")
    with pytest.raises(TypeError):
        proto.encode_frame(None, 1, b"")
    with pytest.raises(ValueError):
        _tunnel.encode_frames([("192.0.2.1", 1, bytes(proto.MAX_PAYLOAD + 1))])


ips = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
frames_st = st.lists(st.tuples(ips, st.integers(0, 65535), st.binary(max_size=300),
                               st.integers(0, 2**32 - 1)), max_size=8)


@FUZZ
@given(frames_st, st.booleans(), st.integers(0, 400))
def test_fuzz_roundtrip_agree(items, mux, cut):
    buf = b"".join(proto.encode_frame(h, p, d, flow=f if mux else None) for h, p, d, f in items)
    assert buf == _tunnel.encode_frames(items, mux=mux)
    buf = buf[:max(0, len(buf) - cut)]
    for final in (False, True):
        a = outcome(proto.parse_frames, buf, mux=mux, final=final)
        b = outcome(_tunnel.parse_frames, buf, mux=mux, final=final)
        assert a == b


@FUZZ
@given(st.binary(max_size=200), st.booleans(), st.booleans(), st.integers(0, 65535))
def test_fuzz_random_bytes_agree(buf, mux, final, maxp):
    a = outcome(proto.parse_frames, buf, mux=mux, final=final, max_payload=maxp)
    b = outcome(_tunnel.parse_frames, buf, mux=mux, final=final, max_payload=maxp)
    assert a == b
    if a[0] == "error":
        assert a[1] in proto.FRAME_ERRORS.values()


# ----------------------------------------------------------------------------- SOCKS5 UDP header

@pytest.mark.parametrize("host", ["192.0.2.1", "2001:db8::5"])
def test_udp_header(host):
    h = proto.udp_header(host, 53)
    assert h == _tunnel.udp_request_header(host, 53)
    assert proto.parse_udp_header(h + b"data") == (0, 1 if "." in host else 4, host, 53, len(h))
    with pytest.raises(proto.FrameError):
        proto.parse_udp_header(h[:-1])


# ----------------------------------------------------------------------------- handshakes

def run_handshake(server, client, extra=b""):
    out = client.start()
    while not client.done:
        back = server.feed(out)
        if server.done and server.state == "request-read":
            back += server.reply(0, "192.0.2.1", 1080) + extra
        out = client.feed(back)
    return client


@pytest.mark.parametrize("kind", ["noauth", "secret", "userpass"])
def test_handshake_ok(kind):
    kw = {"noauth": {}, "secret": {"secret": "s3cret"},
          "userpass": {"user": "u", "password": "p"}}[kind]
    server = proto.ServerHandshake(commands=(proto.CMD_UDP_TUN_MUX, proto.CMD_UDP_ASSOCIATE), **kw)
    client = proto.ClientHandshake(cmd=proto.CMD_UDP_TUN_MUX, **kw)
    frame = proto.encode_frame("192.0.2.9", 1, b"early", flow=3)
    run_handshake(server, client, frame)
    assert client.bound == ("192.0.2.1", 1080)
    assert client.leftover == frame
    assert server.request[0] == proto.CMD_UDP_TUN_MUX


@pytest.mark.parametrize("client_kw,method", [
    ({"secret": "s3cret"}, proto.METHOD_HMAC),              # relay clients prove the secret
    ({"user": "u", "password": "p"}, proto.METHOD_USERPASS),  # gost clients log in
])
def test_server_with_secret_and_password_takes_either(client_kw, method):
    server = proto.ServerHandshake(secret="s3cret", user="u", password="p")
    client = proto.ClientHandshake(cmd=proto.CMD_UDP_TUN, **client_kw)
    run_handshake(server, client)
    assert server.method == method and server.request[0] == proto.CMD_UDP_TUN


def test_server_with_secret_and_password_refuses_the_rest():
    server = proto.ServerHandshake(secret="s3cret", user="u", password="p")
    with pytest.raises(proto.HandshakeError) as e:
        server.feed(proto.ClientHandshake().start())          # no auth offered
    assert e.value.reason == "no-acceptable-method"
    server = proto.ServerHandshake(secret="s3cret", user="u", password="p")
    client = proto.ClientHandshake(user="u", password="wrong")
    with pytest.raises(proto.HandshakeError) as e:
        server.feed(client.feed(server.feed(client.start())))
    assert e.value.reason == "auth-failed"


def test_secret_never_in_clear_and_wrong_secret_refused():
    server = proto.ServerHandshake(secret="right")
    client = proto.ClientHandshake(secret="right")
    sent = client.start()
    reply = server.feed(sent)
    proof = client.feed(reply)
    assert b"right" not in sent + proof
    server = proto.ServerHandshake(secret="right")
    client = proto.ClientHandshake(secret="wrong")
    reply = server.feed(client.start())
    with pytest.raises(proto.HandshakeError) as e:
        server.feed(client.feed(reply))
    assert e.value.reason == "auth-failed"
    assert e.value.reply == bytes((1, 1))


def test_client_detects_fake_server():
    client = proto.ClientHandshake(secret="right")
    client.start()
    # a server that does not know the secret cannot produce the server proof
    client.feed(bytes((5, proto.METHOD_HMAC, 1)) + bytes(32))
    with pytest.raises(proto.HandshakeError):
        client.feed(bytes((1, 0)) + bytes(32))


@pytest.mark.parametrize("data,reason", [
    (b"\x04\x01\x00", "bad-version"),
    (b"\x05\x00", "no-methods"),
    (b"\x05\x01\x02", "no-acceptable-method"),
    (b"\x05\x01\x00\x05\xf3\x00\x02", "bad-atyp"),
    (b"\x05\x01\x00\x05\x01\x00\x01" + bytes(6), "bad-command"),
    (b"\x05\x01\x00\x05\xf3\x00\x03\x00\x00\x00", "empty-domain"),
])
def test_server_handshake_errors(data, reason):
    with pytest.raises(proto.HandshakeError) as e:
        proto.ServerHandshake().feed(data)
    assert e.value.reason == reason


def test_gost_client_plain_request_accepted():
    # gost's connectUDP: no-auth, then NewRequest(CmdUDPTun, nil) = IPv4 0.0.0.0:0
    s = proto.ServerHandshake()
    assert s.feed(b"\x05\x01\x00") == b"\x05\x00"
    s.feed(b"\x05\xf3\x00\x01" + bytes(6))
    assert s.done and s.request[0] == proto.CMD_UDP_TUN


def test_refusal_carries_the_rep_code():
    c = proto.ClientHandshake(cmd=proto.CMD_UDP_TUN_MUX)
    c.start()
    assert c.feed(b"\x05\x00") == proto.request(proto.CMD_UDP_TUN_MUX)
    with pytest.raises(proto.HandshakeError) as e:
        c.feed(proto.request_reply(proto.REP_CMD_UNSUPPORTED))
    assert e.value.reason == "refused" and e.value.rep == proto.REP_CMD_UNSUPPORTED
    assert "command not supported" in str(e.value)


def test_gost_client_request_with_userpass():
    # what the tunnel client sends to a gost server: RFC 1929, then CMD 0xF3 for 0.0.0.0:0
    c = proto.ClientHandshake(cmd=proto.CMD_UDP_TUN, user="gu", password="pw")
    assert c.start() == b"\x05\x01\x02"
    assert c.feed(b"\x05\x02") == b"\x01\x02gu\x02pw"
    assert c.feed(b"\x01\x00") == b"\x05\xf3\x00\x01" + bytes(6)
    c.feed(proto.request_reply(0, "192.0.2.1", 1080) + b"tail")
    assert c.done and c.bound == ("192.0.2.1", 1080) and c.leftover == b"tail"
    c = proto.ClientHandshake(cmd=proto.CMD_UDP_TUN, user="gu", password="bad")
    c.start()
    c.feed(b"\x05\x02")
    with pytest.raises(proto.HandshakeError) as e:
        c.feed(b"\x01\x01")
    assert e.value.reason == "auth-failed"


GREETING_REQUEST = proto.greeting([proto.METHOD_NOAUTH]) + proto.request(proto.CMD_UDP_TUN_MUX)


@pytest.mark.parametrize("size", [0, 1200, proto.MAX_PAYLOAD])
@pytest.mark.parametrize("host", ["192.0.2.9", "2001:db8::9", "x" * 255])
def test_pipelined_frame_kept(size, host):
    """Greeting, request and a frame (up to a maximal one) in one write: the frame is kept."""
    frame = proto.encode_frame(host, 53, b"p" * size, flow=7)
    s = proto.ServerHandshake()
    assert s.feed(GREETING_REQUEST + frame) == bytes((proto.VER, proto.METHOD_NOAUTH))
    assert s.done
    s.reply()
    assert s.leftover == frame
    c = proto.ClientHandshake()
    c.start()
    c.feed(b"\x05\x00")
    c.feed(proto.request_reply(0, "192.0.2.1", 1080) + frame)
    assert c.done and c.leftover == frame


def test_largest_legal_handshake_pipelined():
    """The largest greeting, login and request, then a maximal frame, in one write."""
    s = proto.ServerHandshake(user="u" * 255, password="p" * 255)
    frame = proto.encode_frame("x" * 255, 53, bytes(proto.MAX_PAYLOAD), flow=1)
    msgs = (proto.greeting(range(1, 256)) + proto.userpass_request("u" * 255, "p" * 255) +
            proto.request(proto.CMD_UDP_TUN_MUX, "y" * 255, 1))
    assert len(msgs) == proto.MAX_HANDSHAKE
    s.feed(msgs + frame)
    assert s.done and s.request[2] == "y" * 255
    s.reply()
    assert s.leftover == frame


def test_more_than_one_frame_after_the_request_refused():
    s = proto.ServerHandshake()
    s.feed(GREETING_REQUEST + bytes(proto.MAX_LEFTOVER))
    assert s.done
    with pytest.raises(proto.HandshakeError) as e:
        s.feed(b"x")
    assert e.value.reason == "too-long"
    with pytest.raises(proto.HandshakeError) as e:
        proto.ServerHandshake().feed(GREETING_REQUEST + bytes(proto.MAX_LEFTOVER + 1))
    assert e.value.reason == "too-long"
    c = proto.ClientHandshake()
    c.start()
    c.feed(b"\x05\x00")
    with pytest.raises(proto.HandshakeError) as e:
        c.feed(proto.request_reply(0) + bytes(proto.MAX_LEFTOVER + 1))
    assert e.value.reason == "too-long"


@pytest.mark.parametrize("side", ["server", "client"])
def test_growing_garbage_refused(side):
    """Bytes that keep coming, 4 KiB at a time, are refused once past the bound: one write
    never buffers more than the messages and one frame."""
    if side == "server":
        hs = proto.ServerHandshake()
        hs.feed(GREETING_REQUEST)
    else:
        hs = proto.ClientHandshake()
        hs.start()
        hs.feed(b"\x05\x00" + proto.request_reply(0))
    fed = 0
    with pytest.raises(proto.HandshakeError) as e:
        for _ in range(100):
            hs.feed(bytes(4096))
            fed += 4096
    assert e.value.reason == "too-long"
    assert proto.MAX_LEFTOVER - 4096 < fed <= proto.MAX_LEFTOVER
    with pytest.raises(proto.HandshakeError) as e:
        proto.ServerHandshake().feed(bytes(proto.MAX_HANDSHAKE + proto.MAX_LEFTOVER + 1))
    assert e.value.reason == "too-long"


HS_REASONS = {"bad-version", "no-methods", "no-acceptable-method", "bad-atyp", "empty-domain",
              "auth-failed", "bad-command", "too-long", "refused"}


@FUZZ
@given(st.binary(max_size=64), st.sampled_from([{}, {"secret": "x"}, {"user": "u", "password": "p"}]))
def test_fuzz_server_handshake(data, kw):
    s = proto.ServerHandshake(commands=(proto.CMD_CONNECT, proto.CMD_UDP_ASSOCIATE,
                                        proto.CMD_UDP_TUN), **kw)
    try:
        for i in range(0, len(data), 5):
            s.feed(data[i:i + 5])
    except proto.HandshakeError as e:
        assert e.reason in HS_REASONS


@FUZZ
@given(st.binary(max_size=64), st.sampled_from([{}, {"secret": "x"}, {"user": "u", "password": "p"}]))
def test_fuzz_client_handshake(data, kw):
    c = proto.ClientHandshake(**kw)
    c.start()
    try:
        c.feed(data)
    except proto.HandshakeError as e:
        assert e.reason in HS_REASONS


@FUZZ
@given(st.binary(max_size=40))
def test_fuzz_message_parsers(data):
    for fn in (proto.parse_greeting, proto.parse_request, proto.parse_reply,
               proto.parse_userpass_request, proto.parse_challenge, proto.parse_proof,
               proto.parse_proof_result, proto.parse_method_choice):
        try:
            r = fn(data)
        except proto.HandshakeError as e:
            assert e.reason in HS_REASONS
        else:
            assert r is None or 0 < r[1] <= len(data)
    try:
        proto.parse_udp_header(data)
    except proto.FrameError as e:
        assert e.reason in proto.FRAME_ERRORS.values()


# ----------------------------------------------------------------------------- access list

DENIED_BY_DEFAULT = ["127.0.0.1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.1.1",
                     "100.64.0.1", "0.0.0.0", "224.0.0.1", "255.255.255.255", "240.0.0.1",
                     "192.0.2.1", "198.51.100.2", "203.0.113.9", "198.18.0.1",
                     "::1", "::", "fe80::1", "fc00::1", "fd12::1", "ff02::1", "2001:db8::1",
                     "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:0:0"]
ALLOWED_BY_DEFAULT = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700::1111",
                      "2a00:1450::1", "::ffff:8.8.4.4"]


def test_default_acl():
    acl = proto.AccessList()
    for matcher in (acl, _tunnel.Acl(acl.table()), pure.Acl(acl.table())):
        for ip in DENIED_BY_DEFAULT:
            assert not matcher.allowed(ip), ip
        for ip in ALLOWED_BY_DEFAULT:
            assert matcher.allowed(ip), ip


def test_acl_precedence():
    acl = proto.AccessList(allow="198.51.100.0/24,2001:db8::/32", deny=["198.51.100.3/32"])
    cacl = _tunnel.Acl(acl.table())
    for a in (acl, cacl):
        assert a.allowed("198.51.100.2")
        assert not a.allowed("198.51.100.3")
        assert a.allowed("2001:db8:2::2")
        assert not a.allowed("10.0.0.1")
        assert not a.allowed("192.0.2.1")
    # an explicit deny of a public range
    acl = proto.AccessList(deny="8.8.0.0/16")
    assert not acl.allowed("8.8.8.8") and not _tunnel.Acl(acl.table()).allowed("8.8.8.8")
    with pytest.raises(ValueError, match="bad CIDR"):
        proto.AccessList(allow="300.1.1.0/24")


nets = st.one_of(
    st.tuples(st.ip_addresses(v=4), st.integers(0, 32)),
    st.tuples(st.ip_addresses(v=6), st.integers(0, 128)),
).map(lambda t: ipaddress.ip_network(f"{t[0]}/{t[1]}", strict=False))


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(nets, max_size=4), st.lists(nets, max_size=4),
       st.lists(ips, min_size=1, max_size=10))
def test_fuzz_acl_agree(allow, deny, addrs):
    acl = proto.AccessList(allow=allow, deny=deny)
    cacl = _tunnel.Acl(acl.table())
    pacl = pure.Acl(acl.table())
    for ip in addrs:
        assert acl.allowed(ip) == cacl.allowed(ip) == pacl.allowed(ip), ip
