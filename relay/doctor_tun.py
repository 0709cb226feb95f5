"""`relay doctor`'s check of a TUN setup (`relay tun` + `relay rules tun`): the device is
there, up and served, UDP is routed into it, the relay's own traffic is kept out of it,
and the router lets its replies through (forwarding on, no strict rp_filter on it).
Registered into relay.doctor's CHECKS when that module loads; reads only, like every
check there."""
from relay import rules_tun
from relay.doctor import _int, bad, check, good


def tun_listeners(f):
    """The `relay tun` listeners of the running relay, else one for ``--dev``."""
    found = [lc for lc in f.listeners if lc["mode"] == "tun"]
    if not found and getattr(f, "tun_dev", None):
        found = [{"name": "--dev", "dev": f.tun_dev, "mark": 255}]
    return found


def _udp_tables(f, version):
    """{table: [ip rule entries]} of the rules sending UDP to a table, relay's or not."""
    fam = "-4" if version == 4 else "-6"
    out = {}
    for e in rules_tun._json(f.runner, ["ip", "-N", "-j", fam, "rule", "show"]):
        if str(e.get("ipproto")) in ("udp", "17", "ipproto-17") and "table" in e:
            out.setdefault(str(e["table"]), []).append(e)
    return out


def _default_dev(f, version, table):
    fam = "-4" if version == 4 else "-6"
    for e in rules_tun._json(f.runner, ["ip", "-N", "-j", fam, "route", "show", "table", table],
                             missing_ok=True):
        if e.get("dst") == "default" and "dev" in e:
            return e["dev"]
    return None


def _check_one(f, lc):
    dev, problems, fixes, fine = lc["dev"], [], [], []
    link = f.links.get(dev)
    if link is None:
        return [f"{dev} does not exist (no relay tun serves it)"], \
            [f"relay tun --dev {dev}, then relay rules tun apply --dev {dev} --iface LAN"], []
    flags = link.get("flags", [])
    if "UP" not in flags or "LOWER_UP" not in flags:
        problems.append(f"{dev} is {'down' if 'UP' not in flags else 'up but not served'} "
                        f"(flags {','.join(flags)})")
        fixes.append(f"start relay tun --dev {dev}" if "UP" in flags else f"ip link set {dev} up")
    into, local = [], False
    for version in (4, 6):
        for table, entries in _udp_tables(f, version).items():
            if _default_dev(f, version, table) == dev:
                into.append(f"IPv{version} table {table} from "
                            f"{', '.join(sorted({e.get('iif', 'all') for e in entries}))}")
                local |= any(e.get("iif") == "lo" for e in entries)
    if not into:
        problems.append(f"no ip rule sends UDP into {dev}")
        fixes.append(f"relay rules tun apply --dev {dev} --iface LAN")
    else:
        fine.append("UDP routed in: " + "; ".join(into))
    if local and lc.get("mark"):
        marks = {int(str(e["fwmark"]), 0) for e in rules_tun._json(
            f.runner, ["ip", "-N", "-j", "-4", "rule", "show"])
            if "fwmark" in e and str(e.get("table")) in ("main", "254")}
        if lc["mark"] not in marks:
            problems.append(f"this host's UDP goes into {dev} but no rule keeps mark "
                            f"{lc['mark']:#x} (the relay's own) out of it: its datagrams loop")
            fixes.append(f"relay rules tun apply --dev {dev} --local --skip-mark {lc['mark']}")
    every = _int(f.read("sys/net/ipv4/conf/all/rp_filter"))
    own = _int(f.read(f"sys/net/ipv4/conf/{dev}/rp_filter"))
    if max(every, own) == 1:
        problems.append(f"strict rp_filter on {dev} (all {every}, {dev} {own}): replies "
                        f"written into it come from remotes routed elsewhere and are dropped")
        fixes.append(f"sysctl -w net.ipv4.conf.{dev}.rp_filter=2")
    off = [k for k, path in (("net.ipv4.ip_forward", "sys/net/ipv4/ip_forward"),
                             ("net.ipv6.conf.all.forwarding", "sys/net/ipv6/conf/all/forwarding"))
           if f.read(path) != "1"]
    if off:
        problems.append(f"{', '.join(off)} = 0: replies written into {dev} are not forwarded "
                        f"to the clients")
        fixes.append("sysctl -w " + " ".join(f"{k}=1" for k in off))
    return problems, fixes, fine


@check("tun")
def check_tun(f):
    listeners = tun_listeners(f)
    if not listeners:
        return good("not checked: no relay tun listener (give --dev to check a device)")
    problems, fixes, fine = [], [], []
    for lc in listeners:
        p, x, ok = _check_one(f, lc)
        problems += p
        fixes += x
        fine += [f"{lc['dev']}: " + "; ".join(ok)] if ok and not p else []
    if problems:
        return bad("; ".join(problems), "; ".join(fixes))
    return good("; ".join(fine))
