"""What the halves of test_rules.py share (tests/unit, tests/netns):
the helpers, fixtures and constants that its tests of more than one kind use.
Written by the script that grouped the tests by kind; change them here."""
import argparse

from relay.rules import RulesOptions, add_cli


OPTION_SETS = [
    RulesOptions(5300),
    RulesOptions(5300, ipv6=False),
    RulesOptions(1, mark=0xFFFFFFFF, table=0xFFFFFF00, skip_mark=1, nft_table="Relay_2"),
    RulesOptions(65535, ifaces=["eth0", "wlan*", "br-lan.10"],
                 exclude=["10.0.0.0/8", "10.1.0.0/16", "2001:db8::/32", "192.0.2.7"]),
]


# --- command line -----------------------------------------------------------------------

def make_parser():
    parser = argparse.ArgumentParser(prog="relay")
    add_cli(parser.add_subparsers(dest="command"))
    return parser


# --- reading an installed table back (relay doctor) ------------------------------------

def normalized(o):
    return (o.port, o.mark, o.table, sorted(o.ifaces), o.ipv6, o.exclude_of(4), o.exclude_of(6),
            o.skip_mark, o.nft_table)


READ_BACK = OPTION_SETS + [RulesOptions(5300, exclude=["10.0.1.0/24", "10.0.2.0/24", "192.0.2.7",
                                                       "2001:db8:1::/48", "2001:db8:2::/48"])]
