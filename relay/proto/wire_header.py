"""Write relay/includes/wire.h from relay/proto/wire.py (run by setup.py before Cython).

Standalone on purpose: the build runs it from a source tree where relay cannot be imported
yet (its extensions are not built). Every ``NAME = integer`` line of wire.py becomes
``#define RELAY_NAME value``; relay/datapath/wire.pxd declares them for Cython.
"""
import ast
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "wire.py")
HEADER = os.path.join(os.path.dirname(HERE), "includes", "wire.h")


def constants(path=SOURCE):
    """[(name, value)] of the module-level integer assignments of wire.py, in order."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = []
    for node in tree.body:
        if isinstance(node, ast.Assign):
            if (len(node.targets) != 1 or not isinstance(node.targets[0], ast.Name)
                    or not isinstance(node.value, ast.Constant)
                    or type(node.value.value) is not int):
                raise ValueError(f"{path}:{node.lineno}: only NAME = integer lines belong here")
            out.append((node.targets[0].id, node.value.value))
    return out


def render(consts):
    lines = ["/* Generated from relay/proto/wire.py by relay/proto/wire_header.py: do not edit. */",
             "#ifndef RELAY_WIRE_H", "#define RELAY_WIRE_H"]
    lines += [f"#define RELAY_{name} {value}" for name, value in consts]
    lines += ["#endif", ""]
    return "\n".join(lines)


def write(header=HEADER):
    """Write the header if its text changed (an unchanged one keeps its time: no rebuild)."""
    text = render(constants())
    try:
        with open(header, encoding="utf-8") as f:
            if f.read() == text:
                return header
    except FileNotFoundError:
        pass
    with open(header, "w", encoding="utf-8") as f:
        f.write(text)
    return header


if __name__ == "__main__":
    print(write(sys.argv[1] if len(sys.argv) > 1 else HEADER))
