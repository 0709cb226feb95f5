"""Build the Cython extensions. Configuration lives in pyproject.toml."""
import os

from Cython.Build import cythonize
from setuptools import Extension, setup

CFLAGS = ["-O3", "-fno-strict-aliasing", "-Wno-unused-function"]
if os.environ.get("RELAY_DEBUG_BUILD"):
    CFLAGS = ["-O0", "-g"]

MODULES = ["_fast", "_rawsock", "_engine", "_tunnel"]

# RELAY_MODULES=_fast,_rawsock builds only those (handy while one module is being edited).
only = [m for m in os.environ.get("RELAY_MODULES", "").split(",") if m]

extensions = [
    Extension(f"relay.{name}", [f"relay/{name}.pyx"], extra_compile_args=CFLAGS,
              include_dirs=["relay/includes"])
    for name in MODULES
    if os.path.exists(f"relay/{name}.pyx") and (not only or name in only)
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={"language_level": "3", "embedsignature": True},
        annotate=bool(os.environ.get("RELAY_ANNOTATE")),
    )
)
