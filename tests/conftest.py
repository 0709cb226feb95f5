import pytest

from tests import netns as _netns


def pytest_collection_modifyitems(items):
    """Every test that builds namespaces does it through the netns_available fixture
    (directly or through topo, slow_lo, ...): mark it `netns` from there, so that
    `-m "not netns"` selects exactly the tests that need no root and no namespace."""
    for item in items:
        if "netns_available" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.netns)


@pytest.fixture(scope="session")
def netns_available():
    reason = _netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    return True


@pytest.fixture
def topo(netns_available):
    """A fresh cli -- rtr -- srv topology, removed after the test whatever happens."""
    t = _netns.Topology()
    try:
        yield t
    finally:
        t.close()
