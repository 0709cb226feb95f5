"""TUN devices: open a queue (TUNSETIFF), turn on the virtio-net header and UDP
segmentation offload where the kernel has them (TUNSETOFFLOAD), and configure addresses,
MTU and link state with `ip` at start (before a worker drops its privileges).

Every ioctl number and flag of the TUN driver is here (linux/if_tun.h, linux/virtio_net.h),
nowhere else. The virtio-net header (10 bytes, little endian on the hosts relay runs on):
flags, gso_type, hdr_len, gso_size, csum_start, csum_offset.
"""
import errno
import fcntl
import ipaddress
import logging
import os
import struct
import subprocess

from relay.net.sockopt import OFFLOAD_MODES

TUN_PATH = "/dev/net/tun"
IFNAMSIZ = 16
TUNSETIFF = 0x400454CA          # _IOW('T', 202, int)
TUNGETFEATURES = 0x800454CF     # _IOR('T', 207, unsigned int)
TUNSETOFFLOAD = 0x400454D0      # _IOW('T', 208, unsigned int)
TUNSETVNETHDRSZ = 0x400454D8    # _IOW('T', 216, int)
IFF_TUN = 0x0001
IFF_MULTI_QUEUE = 0x0100
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_USO4 = 0x20               # Linux 6.2
TUN_F_USO6 = 0x40
VNET_HDR_LEN = 10
VNET_F_NEEDS_CSUM = 1           # the L4 checksum field holds the pseudo-header sum only
VNET_F_DATA_VALID = 2           # the checksum was checked already
GSO_NONE = 0
GSO_UDP_L4 = 5                  # VIRTIO_NET_HDR_GSO_UDP_L4: gso_size payload bytes per segment
GSO_ECN = 0x80
VNET = struct.Struct("<BBHHHH")
TXQUEUELEN = 4096               # packets the kernel queues for the relay (a new TUN has 500)

log = logging.getLogger("relay")


def _ifreq(name, flags):
    raw = name.encode()
    if not raw or len(raw) >= IFNAMSIZ:
        raise ValueError(f"device name {name!r}: 1-{IFNAMSIZ - 1} bytes")
    return struct.pack(f"{IFNAMSIZ}sH22x", raw, flags)


def open_queue(name, *, multi_queue=True, offload="auto"):
    """Open (creating if needed) one queue of TUN device ``name``: IFF_TUN|IFF_NO_PI, with
    IFF_MULTI_QUEUE one queue per caller. ``offload``: "off" (plain packets), "on" (the
    virtio-net header with checksum and UDP segmentation offload, or OSError) or "auto" (on
    where the kernel has USO, else off). Returns (fd, offload_on), fd non-blocking."""
    if offload not in OFFLOAD_MODES:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD_MODES)}, not {offload!r}")
    fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        feats = struct.unpack("I", fcntl.ioctl(fd, TUNGETFEATURES, b"\0" * 4))[0]
        want_vnet = offload != "off" and bool(feats & IFF_VNET_HDR)
        if offload == "on" and not want_vnet:
            raise OSError(errno.EOPNOTSUPP, "this kernel's TUN driver has no IFF_VNET_HDR")
        flags = IFF_TUN | IFF_NO_PI | (IFF_MULTI_QUEUE if multi_queue else 0)
        try:
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags | (IFF_VNET_HDR if want_vnet else 0)))
        except OSError as e:
            if e.errno != errno.EINVAL or not want_vnet or offload == "on":
                raise OSError(e.errno, f"TUNSETIFF {name}: {e.strerror} (an existing device "
                                       f"with other flags, or CAP_NET_ADMIN missing)") from None
            fcntl.ioctl(fd, TUNSETIFF, _ifreq(name, flags))    # a device made without it
            want_vnet = False
        on = False
        if not want_vnet:
            # offloads another opener turned on stay on the device: without the header a
            # packet with its checksum left to do (or a run) could not be told apart
            fcntl.ioctl(fd, TUNSETOFFLOAD, 0)
        else:
            fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_LEN))
            try:
                fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_USO4 | TUN_F_USO6)
                on = True
            except OSError as e:
                if offload == "on":
                    raise OSError(e.errno, f"TUNSETOFFLOAD (UDP segmentation offload needs "
                                           f"Linux 6.2): {e.strerror}") from None
                fcntl.ioctl(fd, TUNSETOFFLOAD, 0)      # header kept, nothing offloaded
        return fd, on
    except BaseException:
        os.close(fd)
        raise


def parse_addresses(text):
    """"198.18.0.1/30,fd00::1/126" -> (ip_interface, ...); ValueError naming the bad one."""
    out = []
    for item in (x.strip() for x in str(text).split(",")):
        if not item:
            continue
        try:
            out.append(ipaddress.ip_interface(item))
        except ValueError:
            raise ValueError(f"{item!r} is not an address with a prefix length "
                             f"(198.18.0.1/30, fd00::1/126)") from None
        if "/" not in item:
            raise ValueError(f"{item!r} needs a prefix length (198.18.0.1/30, fd00::1/126)")
    return tuple(out)


def _ip(*args):
    r = subprocess.run(("ip",) + args, capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        raise OSError(errno.EIO, f"ip {' '.join(args)}: {r.stderr.strip() or r.returncode}")


def configure(name, addresses=(), mtu=None):
    """Give device ``name`` its addresses (kept if there already), MTU and queue length
    (TXQUEUELEN, like a socket's receive buffer) and bring it up."""
    _ip("link", "set", "dev", name, "txqueuelen", str(TXQUEUELEN))
    if mtu:
        _ip("link", "set", "dev", name, "mtu", str(mtu))
    for a in addresses:
        fam = "-6" if a.version == 6 else "-4"
        extra = ("nodad",) if a.version == 6 else ()
        _ip(fam, "addr", "replace", str(a), "dev", name, *extra)
    _ip("link", "set", "dev", name, "up")


def tx_dropped(name):
    """Packets the kernel dropped at the device's full queue (sysfs), or None."""
    try:
        with open(f"/sys/class/net/{name}/statistics/tx_dropped") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def is_up(name):
    """Whether interface ``name`` is administratively up (sysfs flags, IFF_UP)."""
    try:
        with open(f"/sys/class/net/{name}/flags") as f:
            return bool(int(f.read(), 16) & 1)
    except (OSError, ValueError):
        return False


def device_mtu(name):
    """The MTU of interface ``name`` (sysfs), or None."""
    try:
        with open(f"/sys/class/net/{name}/mtu") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def kernel_has_uso():
    """Whether TUNSETOFFLOAD takes UDP segmentation offload here (a probe device that is
    never attached: IFF_TUN without a name registers nothing until TUNSETIFF)."""
    try:
        fd, on = open_queue(f"relayprobe{os.getpid() % 100000}", multi_queue=False,
                            offload="auto")
    except OSError:
        return False
    os.close(fd)
    return on
