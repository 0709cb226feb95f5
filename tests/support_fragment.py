"""What the halves of test_fragment.py share (tests/unit, tests/netns):
the helpers, fixtures and constants that its tests of more than one kind use.
Written by the script that grouped the tests by kind; change them here."""
import random

from relay.packet.pure import fast as pure

MAX4, MAX6 = pure.MAX_IPV4_PAYLOAD, pure.MAX_IPV6_PAYLOAD


def data(n, seed=0):
    return random.Random(n * 7919 + seed).randbytes(n)
