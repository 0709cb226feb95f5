"""Dropping root in the workers once their sockets are open; the descriptor limit.

A worker keeps exactly the capabilities its listeners still need after start
(``needed_capabilities``), none when they need none:

- CAP_NET_ADMIN: SO_MARK on the sockets opened per flow (any listener with a mark), and
  IP_TRANSPARENT on redir's reply sockets; a --tcp-congestion that
  net.ipv4.tcp_allowed_congestion_control does not list, on TCP connections;
- CAP_NET_RAW: redir's raw sockets, for raw replies and for --reject's ICMP errors (opened
  again when a listener restarts); SO_BINDTODEVICE (--bind-interface) on the sockets
  opened per flow, on kernels before 5.7 (later ones let anyone bind a socket to a device
  once);
- CAP_NET_BIND_SERVICE: redir's transparent replies leave from sockets bound to the
  remote's address and port, which is below 1024 for DNS, NTP and the like; and a listener
  on a port below 1024 that a reload restarts binds it again.

Capabilities are per thread on Linux, so this must run before the worker starts any
thread; threads started afterwards inherit the reduced set.
"""
import ctypes
import os
import pwd
import re
import resource

from relay.net import sockopt

CAP_NET_BIND_SERVICE = 10
CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
NAMES = {CAP_NET_BIND_SERVICE: "CAP_NET_BIND_SERVICE", CAP_NET_ADMIN: "CAP_NET_ADMIN",
         CAP_NET_RAW: "CAP_NET_RAW"}
PRIVILEGED_PORTS = 1024         # ports below need CAP_NET_BIND_SERVICE (net.ipv4.ip_unprivileged_port_start)

_LINUX_CAPABILITY_VERSION_3 = 0x20080522
PR_SET_KEEPCAPS = 8
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4


class _Header(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _Data(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret, what):
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def raise_nofile_limit():
    """Raise the soft RLIMIT_NOFILE to the hard limit and return it. Every association
    holds a descriptor, and a shell or sudo often starts relay at the soft default of
    1024 below a much higher hard limit; what the hard limit allows is relay's to use."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def fd_soft_limit():
    """The soft RLIMIT_NOFILE, an unlimited (or larger) one counted as 1 << 21 (the C data
    path's FD_LIMIT_MAX, relay/datapath/limits.pxd); relay.config.FD_RESERVE below it are
    kept free for the control plane."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY or soft > (1 << 21):
        soft = 1 << 21
    return soft


def default_user():
    """'nobody' when it exists and we are root, else None (nothing to drop)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("nobody")
        return "nobody"
    except KeyError:
        return None


# SO_BINDTODEVICE needs CAP_NET_RAW before Linux 5.7 (commit c427bfec18f2).
BINDTODEVICE_FREE = (5, 7)


def kernel_version(release=None):
    """(major, minor) of the running kernel (or of a release string like "6.1.0-9-amd64")."""
    m = re.match(r"(\d+)\.(\d+)", release or os.uname().release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _uses_tcp(lc):
    return lc.mode in ("tunnel-server", "tunnel-client", "socks5") or lc.upstream is not None


def needed_capabilities(listeners, global_=None, kernel=None):
    """The capabilities the data path of these listeners (relay.config.ListenerConfig)
    needs once running, as a sorted tuple; global_ (relay.config.GlobalConfig) for the
    TCP congestion control, kernel (major, minor) for SO_BINDTODEVICE (default: this one)."""
    caps = set()
    kernel = kernel or kernel_version()
    congestion = global_.tcp_congestion if global_ is not None else None
    restricted = congestion and congestion not in sockopt.congestion_allowed()
    for lc in listeners:
        if lc.mark:
            caps.add(CAP_NET_ADMIN)
        if kernel < BINDTODEVICE_FREE and lc.outbound().device:
            caps.add(CAP_NET_RAW)
        if restricted and _uses_tcp(lc):
            caps.add(CAP_NET_ADMIN)
        if lc.mode == "tun":
            caps.add(CAP_NET_ADMIN)     # a restarted worker attaches its TUN queue again
        if lc.listen is not None and lc.listen[1] < PRIVILEGED_PORTS:
            caps.add(CAP_NET_BIND_SERVICE)
        if lc.mode == "redir":
            # every reply mode may use transparent sockets (the raw mode for what it cannot
            # send itself), bound to remotes on any port
            caps.update((CAP_NET_ADMIN, CAP_NET_BIND_SERVICE))
            if lc.reply == "raw" or lc.reject:
                caps.add(CAP_NET_RAW)
    return tuple(sorted(caps))


def set_capabilities(caps):
    """Make caps the whole effective and permitted set of the calling thread."""
    mask = 0
    for c in caps:
        mask |= 1 << c
    hdr = _Header(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_Data * 2)()
    data[0].effective = data[0].permitted = mask & 0xFFFFFFFF
    data[1].effective = data[1].permitted = mask >> 32
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")


def drop_privileges(user, keep=()):
    """Switch to user (name or uid) and its primary group, keeping only the keep caps.

    ``user`` of None, "" or "root" (uid 0) leaves the process as it is."""
    if user in (None, "", "root", 0):
        return False
    try:
        pw = pwd.getpwuid(user) if isinstance(user, int) else pwd.getpwnam(user)
    except KeyError:
        raise ValueError(f"no such user: {user!r}") from None
    if pw.pw_uid == 0:
        return False
    if os.geteuid() != 0:
        raise PermissionError(f"cannot switch to user {pw.pw_name}: not running as root")
    _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    os.setgroups([])
    os.setgid(pw.pw_gid)
    os.setuid(pw.pw_uid)
    set_capabilities(keep)
    _check(_libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")
    _libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    return True


def effective_capabilities(pid="self", proc="/proc"):
    """The CapEff mask of a process (from /proc, or another proc root), for checks and tests."""
    with open(f"{proc}/{pid}/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    raise RuntimeError("no CapEff line in /proc status")
