"""Build the Cython extensions. Configuration lives in pyproject.toml."""
import os

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# RELAY_OPT=-O1 compiles in well under half the time (CI's builds for the test runs on the
# oldest and newest Python use it); what users build is -O3.
OPT = os.environ.get("RELAY_OPT") or "-O3"
if OPT not in ("-O0", "-O1", "-O2", "-O3", "-Os"):
    raise SystemExit(f"RELAY_OPT must be one of -O0 -O1 -O2 -O3 -Os, not {OPT!r}")
CFLAGS = [OPT, "-fno-strict-aliasing", "-Wno-unused-function"]
if os.environ.get("RELAY_DEBUG_BUILD"):
    CFLAGS = ["-O0", "-g"]

# The extensions: the packet library's two and the data path's two.
MODULES = ["relay.packet._fast", "relay.packet._rawsock", "relay.datapath.engine",
           "relay.datapath.tunnel", "relay.datapath.tun"]

# RELAY_MODULES=engine,tunnel builds only those (handy while one module is being edited).
only = [m for m in os.environ.get("RELAY_MODULES", "").split(",") if m]
# Cython and the C compiler run on every usable CPU (RELAY_BUILD_JOBS=N for N of them).
JOBS = int(os.environ.get("RELAY_BUILD_JOBS") or len(os.sched_getaffinity(0)))

extensions = [
    Extension(name, [name.replace(".", "/") + ".pyx"], extra_compile_args=CFLAGS,
              include_dirs=["relay/includes"])
    for name in MODULES
    if not only or name.rsplit(".", 1)[1].lstrip("_") in [m.lstrip("_") for m in only]
]


def write_wire_header():
    """relay/includes/wire.h from relay/proto/wire.py: the wire constants are defined once."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "wire_header", os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                    "relay", "proto", "wire_header.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.write()


class cython_build_ext(build_ext):
    """Cythonize when the extensions are built, not whenever setup.py runs: making an sdist
    or the metadata runs no Cython, and the sdist lists the .pyx sources, not generated C."""

    def finalize_options(self):
        if self.parallel is None:
            self.parallel = JOBS
        super().finalize_options()

    def run(self):
        from Cython.Build import cythonize
        write_wire_header()
        done = {m.name: m for m in cythonize(
            self.extensions,
            compiler_directives={"language_level": "3", "embedsignature": True},
            annotate=bool(os.environ.get("RELAY_ANNOTATE")),
            nthreads=JOBS if JOBS > 1 else 0,
        )}
        for ext in self.extensions:
            ext.sources = done[ext.name].sources
        super().run()


setup(ext_modules=extensions, cmdclass={"build_ext": cython_build_ext})
