"""Choose between a compiled extension and its pure-Python fallback."""
import importlib
import os


def pure_forced() -> bool:
    return os.environ.get("RELAY_PURE_PYTHON", "") not in ("", "0")


def load(name: str):
    """Return (module, is_native) for relay.<name>, falling back to relay._pure.<name>."""
    if not pure_forced():
        try:
            return importlib.import_module(f"relay.{name}"), True
        except ImportError:
            pass
    return importlib.import_module(f"relay._pure.{name.lstrip('_')}"), False
