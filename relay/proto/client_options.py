"""What a tunnel client may be asked for, and how much it buffers (both data paths)."""
from relay.proto.frame import MAX_FRAME_HEADER, MAX_PAYLOAD

# ---------------------------------------------------------------------- tunnel client options

# gost mode of the tunnel client: one TCP connection per flow, CMD 0xF3, frames without
# flow id. Its per-flow buffers are allocated when the flow starts and freed when it ends.
GOST_QUEUE_LIMIT = 192 * 1024              # per flow: three maximal datagrams
GOST_RX_CAP = MAX_PAYLOAD + MAX_FRAME_HEADER   # per flow: one maximal frame
MUX_QUEUE_LIMIT = 1 << 20                  # per connection of the multiplexed tunnel


REP7_HINT = ("tunnel server %s:%s answered REP 7 (command not supported): it does not speak "
             "relay's multiplexed tunnel (CMD 0xFA); to use a gost server, give the upstream "
             "as gost://HOST:PORT (forward/redir --upstream) or run tunnel-client with --gost")


def check_client_options(gost, secret, connections, user, password):
    """The option rules of a tunnel client (both cores): ValueError naming the option."""
    if (user is None) != (password is None):
        raise ValueError("user and password go together: both or neither")
    if gost:
        if secret:
            raise ValueError("secret does not apply to a gost server: gost does not know "
                             "relay's secret proof (method 0xC5); use user and password")
        if connections != 1:
            raise ValueError("connections does not apply in gost mode: gost carries one "
                             "flow per TCP connection")
    elif user is not None:
        raise ValueError("user and password apply in gost mode only (a relay tunnel-server "
                         "proves clients with its secret)")
