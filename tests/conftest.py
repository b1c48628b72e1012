import os

import pytest
import torch

# Without a GPU, Triton kernels run on the CPU under the interpreter, which must be switched on before triton
# is imported. On a GPU machine the kernels run for real (bf16 included), so the variable is left alone there.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# IWM_FAST_TEST_THREADS=1 when the machine is shared: oversubscribed OpenMP threads spin and slow every test.
torch.set_num_threads(int(os.environ.get("IWM_FAST_TEST_THREADS", max(1, min(2, os.cpu_count() or 1)))))

# Import every Triton kernel module now, while the interpreter is on: @triton.jit decides between a compiled and
# an interpreted kernel when the module is imported, and some tests switch TRITON_INTERPRET off to run the
# engine's PyTorch paths, which must not decide it for the kernel tests that follow.
if os.environ.get("TRITON_INTERPRET") == "1":
    import importlib
    import pkgutil

    import iwm_fast.kernels

    for _m in pkgutil.iter_modules(iwm_fast.kernels.__path__):
        importlib.import_module(f"iwm_fast.kernels.{_m.name}")


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device; skipped without one")
    config.addinivalue_line("markers", "interpreter: needs the Triton interpreter; skipped where a GPU runs the real "
                                       "kernels (TRITON_INTERPRET is not '1')")


def pytest_collection_modifyitems(config, items):
    skips = {"cuda": (not torch.cuda.is_available(), "needs a CUDA device"),
             "interpreter": (os.environ.get("TRITON_INTERPRET") != "1",
                             "needs the Triton interpreter (TRITON_INTERPRET=1); a GPU runs the real kernels")}
    for item in items:
        for marker, (skip, reason) in skips.items():
            if skip and item.get_closest_marker(marker) is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
