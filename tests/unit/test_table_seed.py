"""relay/datapath/table.pxd: every table hashes with its own random seed (table_new, what
the tunnel cores call for their peer-chosen keys): the same keys land in other buckets in
two tables, so nobody outside can aim at one hash chain. The .pxd has inline C only, so the
test compiles a small probe module against it."""
import textwrap

import pytest

from tests.support import compiled_probe

PROBE = textwrap.dedent('''
    # cython: language_level=3
    from libc.string cimport memset
    from relay.datapath.table cimport akey_t, table_t, table_new, table_free, akey_hash

    def buckets(list keys, int cap):
        """The bucket of each key (family, port, 16 address bytes) in a new table."""
        cdef table_t t
        cdef akey_t k
        out = []
        table_new(&t, cap)
        try:
            for fam, port, addr in keys:
                memset(&k, 0, sizeof(akey_t))
                k.family = fam
                k.port = port
                for j in range(16):
                    k.addr[j] = addr[j]
                out.append(akey_hash(&k, t.seed) & t.mask)
            return out
        finally:
            table_free(&t)
''')


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    with compiled_probe(tmp_path_factory.mktemp("table"), "tabprobe", PROBE) as m:
        yield m


def v4_key(i):
    return (2, 40000 + i, bytes([198, 51, 100, i % 256]) + bytes(12))


def v6_key(i):
    return (10, 5353, bytes.fromhex("20010db8") + i.to_bytes(12, "big"))


@pytest.mark.parametrize("make_key", [v4_key, v6_key], ids=["ipv4", "ipv6"])
def test_two_tables_place_the_same_keys_differently(probe, make_key):
    keys = [make_key(i) for i in range(48)]
    placements = [probe.buckets(keys, 64) for _ in range(3)]
    # 48 keys in 128 buckets: equal placements from independent seeds are out of reach
    assert placements[0] != placements[1] != placements[2] != placements[0]
