"""What the halves of test_batch.py share (tests/unit, tests/netns):
the helpers, fixtures and constants that its tests of more than one kind use.
Written by the script that grouped the tests by kind; change them here."""
import select
import socket
import time

import pytest

SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32

LOOP = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}
FAMILIES = [pytest.param(socket.AF_INET, id="v4"), pytest.param(socket.AF_INET6, id="v6")]


def _native():
    try:
        from relay.packet import _fast
    except ImportError as e:
        pytest.skip(f"relay.packet._fast is not built: {e}")
    if not hasattr(_fast, "BatchSocket"):
        pytest.skip("relay.packet._fast was built without _batch.pxi")
    return _fast.BatchSocket


def _pure():
    from relay.packet.pure.batch import BatchSocket
    return BatchSocket


@pytest.fixture(params=["native", "pure"])
def B(request):
    return _native() if request.param == "native" else _pure()


# -- helpers --------------------------------------------------------------------------

def big_buffers(s, size=8 << 20):
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            s.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            s.setsockopt(socket.SOL_SOCKET, plain, size)


def udp(family, host=None, port=0, big=True):
    s = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    if big:
        big_buffers(s)
    s.bind((host or LOOP[family], port))
    return s


def addr2(sock):
    """(host, port) of a bound socket, as BatchSocket.source() reports it."""
    return sock.getsockname()[:2]


def wait_readable(fd, timeout):
    return bool(select.select([fd], [], [], max(0.0, timeout))[0])


def drain(b, want, timeout=5.0, segments=False):
    """recv() until `want` datagrams (or GRO segments) arrived or the time is up.
    Returns [(payload bytes, source, origdst, truncated, segment_size)]."""
    got = []
    deadline = time.monotonic() + timeout
    count = 0
    while count < want and time.monotonic() < deadline:
        n = b.recv()
        if n == 0:
            wait_readable(b.fileno(), min(0.2, deadline - time.monotonic()))
            continue
        for i in range(n):
            if segments:
                for seg in b.segments(i):
                    got.append((bytes(seg), b.source(i), b.origdst(i), b.truncated(i),
                                b.segment_size(i)))
                    count += 1
            else:
                got.append((bytes(b.data(i)), b.source(i), b.origdst(i), b.truncated(i),
                            b.segment_size(i)))
                count += 1
    return got


def plain_drain(sock, want, timeout=5.0):
    """recvfrom() on a plain socket until `want` datagrams arrived or the time is up."""
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < want and time.monotonic() < deadline:
        if wait_readable(sock.fileno(), min(0.2, deadline - time.monotonic())):
            data, src = sock.recvfrom(65536)
            out.append((data, src[:2]))
    return out


def quiet(sock, wait=0.1):
    """True when nothing more arrives on sock within `wait` seconds."""
    return not wait_readable(sock.fileno(), wait)


def payload(tag, seq, size=None):
    head = f"{tag}:{seq}:".encode()
    size = (seq * 37) % 1400 if size is None else size
    return head + bytes((seq + k) & 0xFF for k in range(max(0, size - len(head))))
