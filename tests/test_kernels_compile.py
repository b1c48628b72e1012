"""Every Triton kernel compiles for sm_80 and sm_90 (A100, H100/H200) with Triton's own ptxas.

The interpreter checks what the kernels compute, not that they lower to GPU code (tl.dot shapes, layouts,
register allocation, bitcasts); this compiles them ahead of time for both targets without a GPU, in a
subprocess because the test session runs Triton in interpreter mode.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dkdv_kernel", "_attn_bwd_dq_kernel", "_rope_kernel", "_gather_fwd_kernel",
           "_scatter_add_rows_kernel", "_ema_kernel")


@pytest.mark.parametrize("arch", [80, 90])
def test_triton_kernels_compile_for_sm80_and_sm90(arch, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}  # really compile
    cmd = [sys.executable, os.path.join(ROOT, "tests", "aot_compile_kernels.py"), str(arch)]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("this Triton build cannot compile for CUDA (no ptxas)")
    assert run.returncode == 0, run.stderr[-3000:]
    compiled = {line.split()[0] for line in run.stdout.splitlines()}
    assert compiled == set(KERNELS), run.stdout
    lines = run.stdout.strip().splitlines()
    assert len(lines) == 19, run.stdout  # 12 attention variants (3 block-causal), 2 rotary, gather, scatter, 3 EMA
    if any("sass unknown" in x for x in lines):
        pytest.skip("no cuobjdump in this Triton build to read the SASS")
    sass = {x: {k: int(v) for k, v in (kv.split(":") for kv in x.split("sass ")[-1].split())} for x in lines}
    # The attention dots must run on the tensor cores' fast path: wgmma (HGMMA) on Hopper, mma.sync (HMMA) on
    # Ampere. A kernel that falls back to FMA loops still compiles; this is what would catch it.
    want = "HGMMA" if arch == 90 else "HMMA"
    for line, counts in sass.items():
        if line.startswith("_attn"):
            assert counts[want] > 0, line
    # The kernels with bandwidth targets (gather forward, EMA) must move their rows in 16-byte accesses, the
    # widest load and store a thread issues (kernels/ema.py's docstring says when the compiler may use them).
    for line, counts in sass.items():
        if line.startswith(("_gather_fwd", "_ema")):
            assert counts["LDG.E.128"] > 0 and counts["STG.E.128"] > 0, line
