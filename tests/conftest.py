import os

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
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on CPU tensors under the Triton "
                                       "interpreter; skipped where TRITON_INTERPRET != 1 (a GPU machine)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") == "1":
        return
    import pytest

    skip = pytest.mark.skip(reason="needs the Triton interpreter (TRITON_INTERPRET=1)")
    for item in items:
        if "interpreter" in item.keywords:
            item.add_marker(skip)
