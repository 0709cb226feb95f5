"""The destination access list of the tunnel server and the SOCKS5 server."""
import ipaddress

from relay.net.ifaddr import key as _host_key

# ---------------------------------------------------------------------------- access list

# Destinations refused unless --allow'ed: every range that is not globally routable
# unicast (the IANA IPv4 and IPv6 special-purpose address registries, RFC 6890) and the
# translation prefixes that lead to IPv4 (NAT64 64:ff9b::/96 and 64:ff9b:1::/48: through
# a NAT64 gateway they reach any IPv4 address, private ones too; 2002::/16, 6to4, embeds
# one): unspecified, "this network", loopback, private, shared (CGN), link-local, IETF
# protocol assignments, documentation, benchmarking, 6to4 relay anycast, multicast,
# reserved, discard-only, TEREDO/ORCHID (2001::/23), SRv6 SIDs, unique-local, site-local.
# IPv4-mapped IPv6 (::ffff:0:0/96) is judged as the IPv4 address it carries.
# docs/tunnel.md lists them; keep the two the same.
DEFAULT_DENY = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16",
    "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "64:ff9b::/96", "64:ff9b:1::/48", "100::/64", "2001::/23",
    "2001:db8::/32", "2002::/16", "3fff::/20", "5f00::/16", "fc00::/7", "fe80::/10",
    "fec0::/10", "ff00::/8",
))
# The host's loopback addresses are denied by the defaults above already: an --allow of
# them (127.0.0.0/8, ::1) is an explicit allow of the host, so they are no host address.
_LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
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
    IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry.

    The host's own addresses (``hosts``: what relay.net.ifaddr reads, replaced by
    ``set_hosts``) are default denies of full length (/32, /128): only an --allow of that
    very address, or ``allow_host``, lets a client reach the host itself."""

    def __init__(self, allow=(), deny=(), defaults=True, allow_host=False, hosts=()):
        self.allow_host = allow_host
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
        # addresses an explicit rule of full length names: that rule decides for them
        self._named = frozenset(_host_key(net.network_address) for net, _a, prio in rules
                                if prio != _PRIO_DEFAULT
                                and net.prefixlen == net.max_prefixlen)
        self.set_hosts(hosts)

    def host_keys(self, hosts):
        """Sorted 16-byte keys (relay.net.ifaddr.key) of the host addresses to deny: none
        with allow_host; not the loopback ones, nor those an explicit rule names."""
        if self.allow_host:
            return []
        out = set()
        for h in hosts:
            k = _host_key(h)
            ip = ipaddress.ip_address(k)
            if ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if k not in self._named and not any(ip in net for net in _LOOPBACK
                                                if net.version == ip.version):
                out.add(k)
        return sorted(out)

    def set_hosts(self, hosts):
        """Replace the host addresses (keys, text or bytes)."""
        self.hosts = frozenset(self.host_keys(hosts))

    def allowed(self, host):
        ip = ipaddress.ip_address(host)
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if _host_key(ip) in self.hosts:
            return False
        for net, action, _prio in self.rules:
            if net.version == ip.version and ip in net:
                return action == ALLOW
        return True

    def table(self):
        """[(family 4|6, prefixlen, action, 16-byte network)] in match order, for the C side."""
        return [(net.version, net.prefixlen, action,
                 net.network_address.packed.ljust(16, b"\0"))
                for net, action, _prio in self.rules]
