import pytest

from tests import netns as _netns


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
