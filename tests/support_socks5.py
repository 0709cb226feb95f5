"""What the halves of test_socks5.py share (tests/unit, tests/netns, tests/interop):
the helpers, fixtures and constants that its tests of more than one kind use.
Written by the script that grouped the tests by kind; change them here."""
import pytest

from tests.support import Running, cfg


# impl: every test runs against the C cores and the pure-Python fallback (autouse)


@pytest.fixture
def started():
    items = []
    yield items
    for r in reversed(items):
        r.stop()


def socks5(started, ns=None, **kw):
    kw.setdefault("listen", ("127.0.0.1", 0))
    r = Running(cfg("socks5", **kw), ns)
    started.append(r)
    return r
