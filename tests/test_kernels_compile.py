"""Every Triton kernel compiles for sm_80 and sm_90 (A100, H100/H200) with Triton's own ptxas, and its resources
and SASS are what the kernels' design relies on.

The interpreter checks what the kernels compute, not that they lower to GPU code (tl.dot shapes, layouts,
register allocation, bitcasts); this compiles them ahead of time for both targets without a GPU, in a
subprocess because the test session runs Triton in interpreter mode. For the attention kernels it compiles the
pinned tiles of every head dim's space (tests and quick runs launch those); ``tests/aot_compile_kernels.py
--all`` compiles every tile choice the autotuner may pick (the table in docs/gpu_check.md).
"""
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LINE = re.compile(r"^(?P<label>.+) sm_(?P<arch>\d+): regs (?P<regs>\d+) local (?P<local>\d+) smem (?P<smem>\d+) "
                  r"ctas/sm (?P<ctas>\d+) sass (?P<sass>.*)$")


def _compile(arch, tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path)}  # really compile
    cmd = [sys.executable, os.path.join(ROOT, "tests", "aot_compile_kernels.py"), str(arch)]
    run = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr.lower():
        pytest.skip("this Triton build cannot compile for CUDA (no ptxas)")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    if any("no cuobjdump" in x for x in lines):
        pytest.skip("no cuobjdump in this Triton build to read resources and SASS")
    parsed = [LINE.match(x) for x in lines]
    assert all(parsed), [x for x, m in zip(lines, parsed) if not m]
    return [{**m.groupdict(), "sass": dict(kv.split(":") for kv in m["sass"].split())} for m in parsed]


@pytest.mark.parametrize("arch", [80, 90])
def test_kernels_compile_and_use_the_fast_paths(arch, tmp_path):
    variants = _compile(arch, tmp_path)
    # 5 head-dim tilings x (non-causal, block-causal) x 3 attention kernels, rope (2 dims x fwd/transpose),
    # gather, scatter, 3 EMA dtype pairs.
    assert len(variants) == 30 + 4 + 1 + 1 + 3, [v["label"] for v in variants]
    for v in variants:
        n = {op: int(c) for op, c in v["sass"].items()}
        if v["label"].startswith("attn"):
            own_rows = int(re.search(r"tiles=(\d+)x", v["label"])[1])
            # The pinned tiles, what tests and quick runs launch, follow the spaces' rule on Hopper (no spills, at
            # least 2 CTAs per SM) and fit an A100's shared memory.
            if arch == 90:
                assert int(v["local"]) == 0 and int(v["ctas"]) >= 2, v
            assert int(v["ctas"]) >= 1, v
            # The dots on the tensor cores' fast path: wgmma (HGMMA) on Hopper for 64-row tiles, mma.sync (HMMA)
            # on Ampere. A kernel that falls back to FMA loops still compiles; this is what catches it.
            if arch == 80 or own_rows >= 64:
                assert n["HGMMA" if arch == 90 else "HMMA"] > 0, v
        elif v["label"].startswith("rope"):
            # The row and its pair partners come from whole-row 16-byte loads, never 2-byte partner loads.
            assert n["LDG.E.U16"] == 0 and n["LDG.E.128"] > 0 and n["STG.E.128"] > 0, v
        elif v["label"].startswith(("gather", "ema")):  # bandwidth-bound: 16 bytes per thread per access
            assert n["LDG.E.128"] > 0 and n["STG.E.128"] > 0, v
