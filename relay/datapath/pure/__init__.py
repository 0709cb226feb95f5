"""The data path in pure Python: the twin of relay.datapath.tunnel's cores, with the same
classes, arguments and counters, for where the extension is not built (relay._select
chooses). One Python call per datagram: a reference for behaviour, not for speed."""
from relay.datapath.pure.common import Acl  # noqa: F401
from relay.datapath.pure.direct_upstream import DirectUpstream  # noqa: F401
from relay.datapath.pure.frontend import LocalAddresses, UdpFrontend  # noqa: F401
from relay.datapath.pure.socks5_relay import Socks5Relay  # noqa: F401
from relay.datapath.pure.socks5_upstream import Socks5Upstream  # noqa: F401
from relay.datapath.pure.tunnel_server import TunnelServer  # noqa: F401
from relay.datapath.pure.tunnel_upstream import TunnelUpstream  # noqa: F401
from relay.proto.frame import parse_frames  # noqa: F401
from relay.datapath.pure.balance import BalancedUpstream  # noqa: F401
