"""relay/datapath/htab.pxd: the tunnel cores' flow table, seeded per table.

The keys (client and destination addresses, flow ids) are chosen by peers, so each table
hashes with its own seed from os.urandom (htab_new, what the cores call): the same keys
land in different slots in two tables, and nobody outside can aim at one probe chain.
The .pxd has inline C only, so the test compiles a small probe module against it. It
also checks the table itself: puts, finds and backward-shift deletes agree with a dict.
"""
import random
import textwrap

import pytest

from tests.support import compiled_probe

PROBE = textwrap.dedent('''
    # cython: language_level=3
    from libc.stdint cimport uint64_t
    from libc.stdlib cimport free
    from relay.datapath.htab cimport htab_t, htab_new, htab_put, htab_find, htab_del

    def slot_order(list keys, int entries):
        """The values of keys [(k0, k1, k2)] (value = index) in slot order, in a new table."""
        cdef htab_t h
        cdef uint64_t k[3]
        htab_new(&h, entries)
        try:
            for i, key in enumerate(keys):
                k[0], k[1], k[2] = key
                htab_put(&h, k, i)
            return [h.slots[j].val for j in range(h.mask + 1) if h.slots[j].val >= 0]
        finally:
            free(h.slots)

    def replay(list ops, int entries):
        """ops [(op, key, value)], op 'put' / 'del' / 'find' -> the results of the finds
        and the count at the end."""
        cdef htab_t h
        cdef uint64_t k[3]
        out = []
        htab_new(&h, entries)
        try:
            for op, key, val in ops:
                k[0], k[1], k[2] = key
                if op == "put":
                    htab_put(&h, k, val)
                elif op == "del":
                    htab_del(&h, k)
                else:
                    out.append(htab_find(&h, k))
            return out, h.count
        finally:
            free(h.slots)
''')


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    with compiled_probe(tmp_path_factory.mktemp('htab'), 'htprobe', PROBE) as m:
        yield m


def v4_key(i):
    """A flow key as the cores build it: an IPv4 client (198.51.100.x) and port, flow id."""
    return ((0xC6336400 + i % 256) << 16 | (40000 + i), 0, i // 256)


def v6_key(i):
    """An IPv6 client in 2001:db8::/32 and a port."""
    return (0x20010DB8 << 32 | i, i * 7919, 5353)


@pytest.mark.parametrize("make_key", [v4_key, v6_key], ids=["ipv4", "ipv6"])
def test_two_tables_place_the_same_keys_differently(probe, make_key):
    keys = [make_key(i) for i in range(48)]
    orders = [probe.slot_order(keys, 64) for _ in range(3)]
    assert all(sorted(o) == list(range(48)) for o in orders)
    # 48 keys in 128 slots: equal orders from two independent seeds are out of reach
    assert orders[0] != orders[1] and orders[1] != orders[2] and orders[0] != orders[2]


@pytest.mark.parametrize("make_key", [v4_key, v6_key], ids=["ipv4", "ipv6"])
def test_put_find_delete_agree_with_a_dict(probe, make_key):
    rnd = random.Random(7)
    live, ops, expect = {}, [], []
    for step in range(4000):
        key = make_key(rnd.randrange(300))
        r = rnd.random()
        if r < 0.4 and key not in live and len(live) < 256:
            live[key] = step
            ops.append(("put", key, step))
        elif r < 0.7 and key in live:
            del live[key]
            ops.append(("del", key, 0))
        else:
            ops.append(("find", key, 0))
            expect.append(live.get(key, -1))
    found, count = probe.replay(ops, 256)
    assert found == expect and count == len(live)
