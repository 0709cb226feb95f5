"""Compile a benchmark C file once and cache the binary.

    from bench.cbuild import compile_c
    exe = compile_c("bench/c/raw_sendmmsg.c")           # -> bench/out/bin/raw_sendmmsg
    exe = compile_c("bench/c/x.c", extra_flags=["-lm"])  # flags are part of the cache key

The binary is rebuilt when it is missing or older than the source or a header beside it. ``CC`` picks the
compiler (default gcc); the build is -O2 and written atomically, so parallel callers
never run a half-written file.
"""
import hashlib
import os
import shlex
import subprocess
import tempfile

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
BIN_DIR = os.path.join(BENCH_DIR, "out", "bin")


def compile_c(source_path, extra_flags=()):
    """Return the path of the compiled binary of source_path (built if stale)."""
    source_path = os.path.abspath(source_path)
    if not os.path.isfile(source_path):
        raise FileNotFoundError(f"no such C source: {source_path}")
    flags = [str(f) for f in extra_flags]
    cc = os.environ.get("CC", "gcc")
    name = os.path.splitext(os.path.basename(source_path))[0]
    if flags or cc != "gcc":
        key = hashlib.sha1(" ".join([cc] + flags).encode()).hexdigest()[:8]
        name = f"{name}-{key}"
    os.makedirs(BIN_DIR, exist_ok=True)
    exe = os.path.join(BIN_DIR, name)
    # The source and the headers beside it (bench/c/*.h) decide whether it is stale.
    src_dir = os.path.dirname(source_path)
    newest = max([os.path.getmtime(source_path)]
                 + [os.path.getmtime(os.path.join(src_dir, h)) for h in os.listdir(src_dir)
                    if h.endswith(".h")])
    if os.path.exists(exe) and os.path.getmtime(exe) >= newest:
        return exe
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=BIN_DIR)
    os.close(fd)
    cmd = shlex.split(cc) + ["-O2", "-Wall", "-o", tmp, source_path] + flags
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{r.stderr.strip()}")
        os.chmod(tmp, 0o755)
        os.replace(tmp, exe)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return exe
