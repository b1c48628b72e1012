"""iwm-fast: a custom-kernel training engine for Image World Models (IWM) and I-JEPA."""
import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _map_source_kernels():
    # An installed wheel ships the Triton kernels as iwm_fast/kernels. A source checkout keeps them in the
    # top-level kernels/ folder, which must never be importable as a top-level ``kernels`` module
    # (another package owns that name), so it is mapped onto iwm_fast.kernels here.
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isdir(_os.path.join(here, "kernels")) or "iwm_fast.kernels" in _sys.modules:
        return
    src = _os.path.join(_os.path.dirname(here), "kernels")
    init = _os.path.join(src, "__init__.py")
    if not _os.path.isfile(init):
        return
    spec = _ilu.spec_from_file_location("iwm_fast.kernels", init, submodule_search_locations=[src])
    module = _ilu.module_from_spec(spec)
    _sys.modules["iwm_fast.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module


_map_source_kernels()
