"""relay/proto/wire.py is the one definition of the wire constants; the build writes
relay/includes/wire.h from it, relay/includes/wire.pxd declares them for Cython."""
import ast
import os
import re

import pytest

from relay.proto import wire, wire_header
from tests.support import REPO

PXD = os.path.join(REPO, "relay", "includes", "wire.pxd")


def test_every_constant_is_declared_for_cython():
    with open(PXD) as f:
        declared = dict(re.findall(r'^\s+(\w+) "RELAY_(\w+)"$', f.read(), re.M))
    names = [name for name, _ in wire_header.constants()]
    assert names and sorted(declared) == sorted(names)
    assert all(k == v for k, v in declared.items())


def test_header_written_from_the_module():
    consts = wire_header.constants()
    assert consts == [(k, getattr(wire, k)) for k, _ in consts]
    text = wire_header.render(consts)
    assert "#define RELAY_MAX_PAYLOAD 65527\n" in text
    assert "#define RELAY_CMD_UDP_TUN_MUX 250\n" in text
    header = os.path.join(REPO, "relay", "includes", "wire.h")
    if os.path.exists(header):         # written by the build; a stale one would mislead C
        with open(header) as f:
            assert f.read() == text


def test_header_rewritten_only_when_changed(tmp_path):
    out = tmp_path / "wire.h"
    wire_header.write(str(out))
    first = out.stat().st_mtime_ns
    os.utime(out, ns=(first - 10**9, first - 10**9))
    wire_header.write(str(out))
    assert out.stat().st_mtime_ns == first - 10**9
    out.write_text("stale")
    wire_header.write(str(out))
    assert out.read_text() == wire_header.render(wire_header.constants())


@pytest.mark.parametrize("line", ["X = 'a'", "X = 1.5", "X, Y = 1, 2", "X = 1 + 1"])
def test_only_integer_lines(tmp_path, line):
    src = tmp_path / "wire.py"
    src.write_text(f"A = 1\n{line}\n")
    with pytest.raises(ValueError, match="only NAME = integer"):
        wire_header.constants(str(src))


def test_protocol_modules_use_the_one_definition():
    from relay.proto import errors, frame, socks5
    assert frame.MAX_PAYLOAD is wire.MAX_PAYLOAD and frame.MAX_FRAME_HEADER == 266
    assert errors.E_BAD_ATYP == wire.E_BAD_ATYP and socks5.CMD_UDP_TUN == wire.CMD_UDP_TUN
    # the frame header bound is what its fields add up to
    assert wire.MAX_FRAME_HEADER == 2 + 1 + 1 + 1 + 255 + 2 + 4
    # no other relay module assigns these names
    names = {n for n, _ in wire_header.constants()}
    for dirpath, _, files in os.walk(os.path.join(REPO, "relay")):
        for fn in files:
            if fn.endswith(".py") and fn not in ("wire.py",):
                path = os.path.join(dirpath, fn)
                with open(path) as f:
                    tree = ast.parse(f.read(), path)
                for node in tree.body:
                    if isinstance(node, ast.Assign):
                        for t in node.targets:
                            assert not (isinstance(t, ast.Name) and t.id in names), (path, t.id)


@pytest.mark.usefixtures("impl")
def test_codec_reports_the_wire_codes(core):
    from relay.proto.errors import FrameError
    t = core
    bad = bytes([0, 1, 0, 9]) + bytes(8)            # ATYP 9
    with pytest.raises(FrameError) as e:
        t.parse_frames(bad, final=True)
    assert e.value.code == wire.E_BAD_ATYP
    big = bytes([0xff, 0xff, 0, 1]) + bytes(8)      # RSV above MAX_PAYLOAD
    with pytest.raises(FrameError) as e:
        t.parse_frames(big, final=True)
    assert e.value.code == wire.E_TOO_BIG
