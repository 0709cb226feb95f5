"""Addresses, ports, CIDR subnets and upstream URLs as the command line and the config write them.

Conventions used everywhere in relay:

* ``HOST:PORT`` with an IPv4 literal (``192.0.2.1:53``) or an IPv6 literal in brackets
  (``[2001:db8::1]:53``, ``[::]:5353``). IPv6 without brackets is refused: ``2001:db8::1:53``
  cannot be split unambiguously.
* Listen addresses are IP literals only. Destinations (``to``, ``server``, upstreams) may be
  host names when the caller asks for ``resolve=True``: the name is resolved once, here, and
  the first address the resolver returns is used from then on.
* Every problem is a ``ValueError`` naming the value and the reason (``TypeError`` when the
  value is not a string at all).
"""
import ipaddress
import re
import socket
import urllib.parse
from dataclasses import dataclass, field
from typing import Optional

__all__ = [
    "parse_hostport", "format_hostport", "family_of", "is_v6", "parse_ip", "parse_cidr",
    "parse_upstream", "Upstream", "UPSTREAM_SCHEMES", "parse_sources",
]

UPSTREAM_SCHEMES = ("direct", "socks5://", "tunnel://", "gost://")
_CREDENTIAL_SCHEMES = ("socks5", "gost")

# RFC 1123 host names: labels of letters, digits and hyphens, not starting or ending with
# a hyphen, at most 63 characters each and 253 in all. A trailing dot is accepted.
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _require_str(text, what):
    if not isinstance(text, str):
        raise TypeError(f"{what}: expected a string, got {type(text).__name__} {text!r}")


def parse_ip(text, *, what="address"):
    """Parse an IP literal and return it in canonical text form ("2001:db8::1", "192.0.2.1")."""
    _require_str(text, what)
    if "%" in text:
        raise ValueError(f"{what} {text!r}: zone indexes (%IFACE) are not supported")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"{what} {text!r}: not an IPv4 or IPv6 address") from None


def _is_hostname(text):
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253:
        return False
    labels = name.split(".")
    # An all-numeric last label would make "1.2.3" or "300.1.1.1" look like a name.
    if labels[-1].isdigit():
        return False
    return all(_LABEL.match(label) for label in labels)


def _parse_port(text, full, what, allow_zero):
    if not text:
        raise ValueError(f"{what} {full!r}: missing port after ':'")
    if not text.isascii() or not text.isdigit() or len(text) > 5:
        raise ValueError(f"{what} {full!r}: port is not a number: {text!r}")
    port = int(text)
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{what} {full!r}: port out of range {low}-65535: {port}")
    return port


def _resolve(host, port, what, full):
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (socket.gaierror, UnicodeError) as exc:
        reason = exc.args[-1] if exc.args else str(exc)
        raise ValueError(f"{what} {full!r}: cannot resolve host {host!r}: {reason}") from None
    for family, _type, _proto, _canon, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            return parse_ip(sockaddr[0].split("%", 1)[0], what=what)
    raise ValueError(f"{what} {full!r}: host {host!r} has no IPv4 or IPv6 address")


def parse_hostport(text, *, what="address", default_port=None, allow_zero=False, resolve=False):
    """Split ``HOST:PORT`` into ``(host, port)`` with ``host`` a canonical IP literal.

    ``default_port`` is used when the text has no port ("192.0.2.1", "[2001:db8::1]").
    Port 0 is accepted only with ``allow_zero=True``. Host names are refused unless
    ``resolve=True``, in which case they are resolved once (first address returned).
    ``what`` names the value in error messages ("listen address", "--to", ...).
    """
    _require_str(text, what)
    full = text
    text = text.strip()
    if not text:
        raise ValueError(f"{what} {full!r}: empty")
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError(f"{what} {full!r}: missing ']' after the IPv6 address")
        host = text[1:end]
        rest = text[end + 1:]
        if not host:
            raise ValueError(f"{what} {full!r}: empty host")
        if ":" not in host:
            raise ValueError(f"{what} {full!r}: brackets are only for IPv6 addresses, "
                             f"write {host}:PORT")
        if "%" in host:
            raise ValueError(f"{what} {full!r}: zone indexes (%IFACE) are not supported")
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{what} {full!r}: not an IPv6 address: {host!r}") from None
        if rest == "":
            port_text = None
        elif rest.startswith(":"):
            port_text = rest[1:]
        else:
            raise ValueError(f"{what} {full!r}: unexpected {rest!r} after ']'")
        host = str(ip)
    else:
        if text.count(":") > 1:
            raise ValueError(f"{what} {full!r}: IPv6 addresses must be in brackets, "
                             f"e.g. [2001:db8::1]:53")
        host, sep, port_text = text.partition(":")
        if not sep:
            port_text = None
        if not host:
            raise ValueError(f"{what} {full!r}: empty host (write 0.0.0.0:PORT or [::]:PORT "
                             f"to listen on every address)")
        try:
            host = str(ipaddress.IPv4Address(host))
        except ValueError:
            if not _is_hostname(host):
                raise ValueError(f"{what} {full!r}: not an IP address or host name: "
                                 f"{host!r}") from None
            if not resolve:
                raise ValueError(f"{what} {full!r}: host names are not accepted here, "
                                 f"use an IP address: {host!r}") from None
            port_text_checked = None
            if port_text is not None:
                port_text_checked = _parse_port(port_text, full, what, allow_zero)
            elif default_port is None:
                raise ValueError(f"{what} {full!r}: missing port (HOST:PORT)")
            port = port_text_checked if port_text_checked is not None else default_port
            return _resolve(host, port, what, full), port
    if port_text is None:
        if default_port is None:
            raise ValueError(f"{what} {full!r}: missing port (HOST:PORT)")
        return host, default_port
    return host, _parse_port(port_text, full, what, allow_zero)


def format_hostport(addr):
    """``(host, port)`` -> "192.0.2.1:53" or "[2001:db8::1]:53"."""
    try:
        host, port = addr
    except (TypeError, ValueError):
        raise TypeError(f"expected a (host, port) pair, got {addr!r}") from None
    if isinstance(port, bool) or not isinstance(port, int):
        raise TypeError(f"port must be an integer, got {port!r}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port out of range 0-65535: {port}")
    _require_str(host, "host")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def family_of(host):
    """socket.AF_INET or socket.AF_INET6 for an IP literal; ValueError for anything else."""
    ip = ipaddress.ip_address(parse_ip(host, what="host"))
    return socket.AF_INET6 if ip.version == 6 else socket.AF_INET


def is_v6(host):
    """True when ``host`` is an IPv6 literal, False for IPv4; ValueError otherwise."""
    return family_of(host) == socket.AF_INET6


def parse_cidr(text, *, what="CIDR"):
    """"198.51.100.0/24" or "2001:db8::/32" (a bare address means /32 or /128) -> ip_network.

    Host bits are cleared ("192.0.2.7/24" -> 192.0.2.0/24).
    """
    if isinstance(text, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return text
    _require_str(text, what)
    value = text.strip()
    if not value:
        raise ValueError(f"{what} {text!r}: empty")
    if "%" in value:
        raise ValueError(f"{what} {text!r}: zone indexes (%IFACE) are not supported")
    addr, sep, plen = value.partition("/")
    if sep and (not plen.isascii() or not plen.isdigit()):
        raise ValueError(f"{what} {text!r}: prefix length is not a number: {plen!r}")
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError as exc:
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            raise ValueError(f"{what} {text!r}: not an IPv4 or IPv6 address: {addr!r}") from None
        if sep:
            raise ValueError(f"{what} {text!r}: prefix length out of range "
                             f"0-{ip.max_prefixlen}: {plen}") from None
        raise ValueError(f"{what} {text!r}: {exc}") from None


@dataclass(frozen=True)
class Upstream:
    """Where a listener sends its traffic.

    ``kind`` is "direct" (plain UDP to the destination), "tunnel" (a relay tunnel-server,
    UDP over TCP, multiplexed), "gost" (a gost server's UDP-over-TCP tunnel, one TCP
    connection per flow) or "socks5" (a SOCKS5 server's UDP ASSOCIATE); ``host``/``port``
    locate the server (None for direct); ``user``/``password`` are the RFC 1929
    credentials of socks5:// and gost://.
    """
    kind: str
    host: Optional[str] = None
    port: Optional[int] = None
    user: Optional[str] = None
    password: Optional[str] = field(default=None, repr=False)
    bind_interface: Optional[str] = None     # ?bind=IF: its connections leave through IF
    source: tuple = ()                       # ?source=ADDR[,ADDR]: one per family

    @property
    def address(self):
        return None if self.host is None else (self.host, self.port)

    def __str__(self):
        if self.kind == "direct":
            return "direct"
        cred = ""
        if self.user is not None:
            cred = urllib.parse.quote(self.user, safe="") + ":***@"
        query = []
        if self.bind_interface:
            query.append(f"bind={self.bind_interface}")
        if self.source:
            query.append("source=" + ",".join(self.source))
        tail = "?" + "&".join(query) if query else ""
        return f"{self.kind}://{cred}{format_hostport((self.host, self.port))}{tail}"


UPSTREAM_QUERY = ("bind", "source")


def parse_sources(value, *, what="source"):
    """Source addresses for outgoing traffic: "192.0.2.1,2001:db8::1" or a list of IP
    literals, at most one per family, neither wildcard nor multicast -> a tuple of
    canonical literals, IPv4 first."""
    if isinstance(value, str):
        value = [x for x in value.replace(" ", ",").split(",") if x]
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{what}: expected one address or two (one per family) separated "
                         f"by a comma, got {value!r}")
    by_family = {}
    for item in value:
        _require_str(item, what)
        ip = ipaddress.ip_address(parse_ip(item, what=what))
        if ip.is_unspecified or ip.is_multicast:
            raise ValueError(f"{what} {item!r}: a source must be one unicast address of this host")
        if ip.version in by_family:
            raise ValueError(f"{what}: two IPv{ip.version} addresses ({by_family[ip.version]}, "
                             f"{ip}); give at most one per family")
        by_family[ip.version] = str(ip)
    return tuple(by_family[v] for v in (4, 6) if v in by_family)


def _upstream_query(query, shown):
    """bind= and source= of an upstream URL's query."""
    out, seen = {}, set()
    for part in query.split("&"):
        key, eq, val = part.partition("=")
        if key not in UPSTREAM_QUERY:
            raise ValueError(f"upstream {shown!r}: unknown query key {key!r} (known: "
                             f"{', '.join(UPSTREAM_QUERY)})")
        if not eq or not val:
            raise ValueError(f"upstream {shown!r}: {key}= needs a value")
        if key in seen:
            raise ValueError(f"upstream {shown!r}: {key}= given twice")
        seen.add(key)
        val = urllib.parse.unquote(val)
        if key == "bind":
            out["bind_interface"] = val
        else:
            out["source"] = parse_sources(val, what=f"upstream {shown!r}: source")
    return out


def _credential(raw, full, part):
    try:
        value = urllib.parse.unquote(raw, errors="strict")
    except UnicodeDecodeError:
        raise ValueError(f"upstream {full!r}: {part} is not valid UTF-8 after "
                         f"percent-decoding") from None
    size = len(value.encode("utf-8"))
    if not 1 <= size <= 255:
        raise ValueError(f"upstream {full!r}: {part} must be 1-255 bytes (RFC 1929), got {size}")
    return value


def parse_upstream(text, *, resolve=False):
    """``direct``, ``tunnel://HOST:PORT``, ``socks5://[USER:PASS@]HOST:PORT`` or
    ``gost://[USER:PASS@]HOST:PORT``, each optionally followed by
    ``?bind=IF&source=ADDR[,ADDR]`` (the interface and source addresses its connections
    leave from) -> Upstream.

    USER and PASS are percent-decoded ("p%40ss" -> "p@ss"). With ``resolve=True`` a host
    name is resolved once; otherwise only IP literals are accepted. Error messages never
    repeat the password.
    """
    _require_str(text, "upstream")
    value = text.strip()
    if value.lower() == "direct":
        return Upstream("direct")
    scheme, sep, rest = value.partition("://")
    scheme = scheme.lower()
    rest, qmark, query = rest.partition("?")
    userinfo, at, hostport = rest.rpartition("@")
    shown = value
    if at:
        hidden = ":***" if ":" in userinfo else ""
        shown = f"{scheme}://{userinfo.partition(':')[0]}{hidden}@{hostport}"
    if not sep or scheme not in ("tunnel", "socks5", "gost"):
        name = scheme if sep else value
        raise ValueError(f"upstream {shown!r}: unknown scheme {name!r} "
                         f"(known: {', '.join(UPSTREAM_SCHEMES)})")
    for bad in ("/", "?", "#"):
        if bad in hostport:
            tail = hostport[hostport.index(bad):]
            raise ValueError(f"upstream {shown!r}: unexpected {tail!r} after the address")
    user = password = None
    if at:
        if scheme not in _CREDENTIAL_SCHEMES:
            raise ValueError(f"upstream {shown!r}: credentials are only for socks5:// and "
                             f"gost:// (a relay tunnel uses the listener's secret)")
        raw_user, colon, raw_pass = userinfo.partition(":")
        if not colon:
            raise ValueError(f"upstream {shown!r}: user without password (write USER:PASS@)")
        user = _credential(raw_user, shown, "user")
        password = _credential(raw_pass, shown, "password")
    if not hostport:
        raise ValueError(f"upstream {shown!r}: missing HOST:PORT")
    host, port = parse_hostport(hostport, what=f"upstream {scheme} server", resolve=resolve)
    extra = _upstream_query(query, shown) if qmark else {}
    return Upstream(scheme, host, port, user, password, **extra)
