"""The destination access list of the tunnel server and the SOCKS5 server."""
import ipaddress

# ---------------------------------------------------------------------------- access list

# Destinations refused unless --allow'ed: every range that is not globally routable
# unicast (RFC 6890 special-purpose registries): unspecified, loopback, private, shared
# (CGN), link-local, documentation, benchmarking, multicast, reserved, unique-local.
DEFAULT_DENY = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32",
    "2002::/16", "3fff::/20", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
))
ALLOW, DENY = 0, 1
# Priority at equal prefix length: an explicit --deny beats --allow beats the defaults.
_PRIO_USER_DENY, _PRIO_USER_ALLOW, _PRIO_DEFAULT = 0, 1, 2


def parse_cidrs(spec):
    """Networks from 'a/b,c/d' or an iterable of strings/networks; ValueError naming the bad one."""
    if spec is None:
        return []
    if isinstance(spec, str):
        spec = [s for s in spec.replace(" ", ",").split(",") if s]
    out = []
    for item in spec:
        if isinstance(item, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            out.append(item)
            continue
        try:
            out.append(ipaddress.ip_network(str(item).strip(), strict=False))
        except ValueError as e:
            raise ValueError(f"bad CIDR {item!r}: {e}") from None
    return out


class AccessList:
    """Destination access list: the longest matching prefix decides; at equal length an
    explicit deny beats an explicit allow beats a default deny; no match allows.
    IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry."""

    def __init__(self, allow=(), deny=(), defaults=True):
        rules = []
        for net in parse_cidrs(deny):
            rules.append((net, DENY, _PRIO_USER_DENY))
        for net in parse_cidrs(allow):
            rules.append((net, ALLOW, _PRIO_USER_ALLOW))
        if defaults:
            for net in DEFAULT_DENY:
                rules.append((net, DENY, _PRIO_DEFAULT))
        rules.sort(key=lambda r: (-r[0].prefixlen, r[2]))
        self.rules = rules

    def allowed(self, host):
        ip = ipaddress.ip_address(host)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        for net, action, _prio in self.rules:
            if net.version == ip.version and ip in net:
                return action == ALLOW
        return True

    def table(self):
        """[(family 4|6, prefixlen, action, 16-byte network)] in match order, for the C side."""
        return [(net.version, net.prefixlen, action,
                 net.network_address.packed.ljust(16, b"\0"))
                for net, action, _prio in self.rules]
