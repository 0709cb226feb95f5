"""Build the Cython extensions. Configuration lives in pyproject.toml."""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

CFLAGS = ["-O3", "-fno-strict-aliasing", "-Wno-unused-function"]
if os.environ.get("RELAY_DEBUG_BUILD"):
    CFLAGS = ["-O0", "-g"]

# The extensions: the packet library's two and the data path's two.
MODULES = ["relay.packet._fast", "relay.packet._rawsock", "relay.datapath.engine",
           "relay.datapath.tunnel"]

# RELAY_MODULES=engine,tunnel builds only those (handy while one module is being edited).
only = [m for m in os.environ.get("RELAY_MODULES", "").split(",") if m]

extensions = [
    Extension(name, [name.replace(".", "/") + ".pyx"], extra_compile_args=CFLAGS,
              include_dirs=["relay/includes"])
    for name in MODULES
    if not only or name.rsplit(".", 1)[1].lstrip("_") in [m.lstrip("_") for m in only]
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "embedsignature": True},
        annotate=bool(os.environ.get("RELAY_ANNOTATE")),
    )
)
