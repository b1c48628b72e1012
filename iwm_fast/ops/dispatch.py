"""The one policy every op uses to choose between its Triton kernel and its PyTorch path.

``auto``: the Triton kernel on CUDA, PyTorch elsewhere. ``triton``: the kernel always; on the CPU it runs under
the Triton interpreter, which needs ``TRITON_INTERPRET=1`` set before triton is imported (the test suite).
Whether triton is installed is looked up once, at import: ``torch.compile(fullgraph=True)`` on torch 2.11
cannot trace ``importlib.util.find_spec`` inside an op.
"""
import importlib.util
import logging
import os

log = logging.getLogger("iwm_fast")

TRITON_AVAILABLE = importlib.util.find_spec("triton") is not None
_warned = set()


def interpreter_on():
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_backend(op, backend, allowed):
    if backend not in allowed:
        raise ValueError(f"{op}: unknown backend {backend!r}; choose one of {', '.join(allowed)}")


def _fallback_once(op):
    if op not in _warned:
        _warned.add(op)
        log.warning("%s: triton is not installed; using the PyTorch path (pip install triton for the fused kernel)",
                    op)


def use_triton(op, backend, device, supported=True):
    """True when ``op`` should run its Triton kernel for inputs on ``device``.

    ``supported`` says whether the kernel takes these inputs (dtype, head dim, ...): ``auto`` then falls back to
    PyTorch; an explicit ``triton`` is the caller's to have checked."""
    if backend == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError(f"{op}: backend='triton' needs the triton package (pip install triton)")
        if device.type != "cuda" and not interpreter_on():
            raise ValueError(f"{op}: backend='triton' on {device.type} tensors needs the Triton interpreter "
                               "(TRITON_INTERPRET=1 before triton is imported); use backend='auto'")
        return True
    if backend != "auto" or device.type != "cuda" or not supported:
        return False
    if not TRITON_AVAILABLE:
        _fallback_once(op)
        return False
    return True
