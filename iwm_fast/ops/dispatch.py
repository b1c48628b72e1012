"""The one policy every op uses to choose between its compiled implementation and its PyTorch path.

Triton ops (``use_triton``): ``auto`` = the Triton kernel on CUDA, PyTorch elsewhere; ``triton`` = the kernel
always; on the CPU it runs under the Triton interpreter, which needs ``TRITON_INTERPRET=1`` set before triton is
imported (the test suite). Whether triton is installed is looked up once, at import: ``torch.compile(fullgraph=True)``
on torch 2.11 cannot trace ``importlib.util.find_spec`` inside an op.

Ops of the C++/CUDA extension ``iwm_fast._C`` (``use_extension``): ``auto`` = the extension's kernel for the
output's device where it was built with one, PyTorch otherwise; ``cpp`` = its CPU kernels, ``cuda`` = its CUDA
kernels, refused where they are missing. Either way, ``auto`` falling back to PyTorch is said once in the log.
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


def _fallback_once(op, why):
    if op not in _warned:
        _warned.add(op)
        log.warning("%s: %s; using the PyTorch path", op, why)


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
        _fallback_once(op, "triton is not installed (pip install triton for the fused kernel)")
        return False
    return True


EXTENSION_DEVICES = {"cpp": "cpu", "cuda": "cuda"}


def use_extension(op, backend, device, missing):
    """True when ``op`` should run its ``iwm_fast._C`` kernel for outputs on ``device``.

    ``missing(device_type)`` is None where the built extension has a kernel for that device type, else the
    reason it has none (said once when ``auto`` falls back; raised for an explicit ``cpp`` or ``cuda``)."""
    if backend in EXTENSION_DEVICES:
        want = EXTENSION_DEVICES[backend]
        if device.type != want:
            raise ValueError(f"{op}: backend={backend!r} makes its output on {want}, not on {device}; "
                             "use backend='auto' (or 'torch') there")
        why = missing(want)
        if why is not None:
            raise RuntimeError(f"{op}: backend={backend!r} but {why}")
        return True
    if backend != "auto" or device.type not in EXTENSION_DEVICES.values():
        return False
    why = missing(device.type)
    if why is not None:
        _fallback_once(op, why)
        return False
    return True
