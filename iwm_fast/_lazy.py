"""Package attributes imported on first use.

A package's light modules (its named choices, its config section) are then importable without its heavy ones:
the run config imports ``iwm_fast.models.choices`` without importing torch.
"""
import importlib
import sys


def lazy_exports(package, exports):
    """``(__getattr__, __dir__)`` for ``package``: ``exports`` maps each public name to the submodule that
    defines it; any other submodule is imported when it is first named, as an eager ``__init__`` would have."""
    def __getattr__(name):
        if name in exports:
            value = getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
            setattr(sys.modules[package], name, value)  # bound once, as an eager import would have
            return value
        if name.startswith("__"):
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        try:
            return importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{package}.{name}":
                raise
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__():
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
