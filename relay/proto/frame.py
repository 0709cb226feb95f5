"""Tunnel frames (gost compatible, plus relay's multiplexed extension): encode and parse.

Frame (after the handshake)::

    RSV(2, big-endian payload length) FRAG(1)=0 ATYP(1) ADDR PORT(2) [FLOW(4)] DATA

``FLOW`` is present only on multiplexed connections (request CMD 0xFA, our extension);
plain gost connections (CMD 0xF3) carry one flow and no FLOW field. RSV = 0 means a
zero-length datagram. ``relay.datapath.tunnel`` implements the same codec in C; the tests
cross-check the two.
"""
import collections
import struct

from relay.proto.errors import (E_FRAGMENTED, E_TOO_BIG, E_TRUNCATED, FRAME_ERRORS,  # noqa: F401
                                 FrameError, frame_error)
from relay.proto.socks5 import encode_addr, parse_addr

from relay.proto.wire import MAX_FRAME_HEADER, MAX_PAYLOAD  # noqa: F401

Frame = collections.namedtuple("Frame", "flow atyp host port data")



# ---------------------------------------------------------------------------- frames

def frame_header(host, port, length, flow=None):
    """The header of a frame carrying ``length`` payload bytes (flow: multiplexed)."""
    if not 0 <= length <= MAX_PAYLOAD:
        raise ValueError(f"payload length {length} outside 0-{MAX_PAYLOAD}")
    head = struct.pack("!HB", length, 0) + encode_addr(host, port)
    if flow is not None:
        if not 0 <= flow <= 0xFFFFFFFF:
            raise ValueError(f"flow id out of range 0-4294967295: {flow}")
        head += struct.pack("!I", flow)
    return head


def encode_frame(host, port, data, flow=None):
    """One frame: header + data. ``flow`` is given on multiplexed connections only."""
    data = bytes(data)
    return frame_header(host, port, len(data), flow) + data


def parse_frame(buf, pos=0, *, mux=False, max_payload=MAX_PAYLOAD):
    """(Frame, end) of the frame at buf[pos:], or None if it is not complete yet.

    Checks in wire order: RSV above max_payload (too-big), FRAG != 0 (fragmented),
    ATYP (bad-atyp), domain length 0 (empty-domain); then completeness."""
    n = len(buf)
    if n - pos < 4:
        return None
    length = (buf[pos] << 8) | buf[pos + 1]
    if length > max_payload:
        raise FrameError(E_TOO_BIG, f"frame length {length} exceeds {max_payload}")
    if buf[pos + 2] != 0:
        raise FrameError(E_FRAGMENTED, f"FRAG must be 0, got {buf[pos + 2]}")
    addr = parse_addr(buf, pos + 3, frame_error)
    if addr is None:
        return None
    atyp, host, port, end = addr
    flow = None
    if mux:
        if n < end + 4:
            return None
        flow = struct.unpack_from("!I", buf, end)[0]
        end += 4
    if n < end + length:
        return None
    return Frame(flow, atyp, host, port, bytes(buf[end:end + length])), end + length


def parse_frames(buf, *, mux=False, final=False, max_payload=MAX_PAYLOAD):
    """Parse every complete frame of buf: ([Frame...], consumed).

    With final=True the stream has ended, so leftover bytes are a truncated frame.
    Raises FrameError for the first frame that can never be valid."""
    frames = []
    pos = 0
    while pos < len(buf):
        r = parse_frame(buf, pos, mux=mux, max_payload=max_payload)
        if r is None:
            if final:
                raise FrameError(E_TRUNCATED,
                                 f"truncated frame: {len(buf) - pos} bytes left at end of stream")
            break
        frame, pos = r
        frames.append(frame)
    return frames, pos
