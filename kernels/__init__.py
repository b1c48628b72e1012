"""Triton kernels of iwm-fast, imported as ``iwm_fast.kernels``.

Each module holds ``@triton.jit`` kernels and the host functions that check inputs and launch them.
Importing this package does not import triton; the kernel modules do.
"""
