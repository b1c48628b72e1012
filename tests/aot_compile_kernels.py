"""Compile every Triton kernel ahead of time for a CUDA target, without a GPU (run as a script).

Usage: python tests/aot_compile_kernels.py ARCH   (80 or 90); prints one line per compiled kernel variant,
with counts read off its SASS when Triton's cuobjdump is there: tensor-core instructions (HGMMA: Hopper's
wgmma; HMMA: mma.sync) and 16-byte global loads and stores (LDG.E.128, STG.E.128).

The gather kernel is compiled as Triton specializes a typical launch (ViT-B rows of 768 bf16): pointers and
the sizes/strides that are multiples of 16 marked divisible by 16, unit strides as the constant 1. Without
that the compiler cannot prove alignment and emits 2-byte accesses that a real launch would not.
Must run with TRITON_INTERPRET unset or 0: under the interpreter the kernels are not JIT functions.
"""
import inspect
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import iwm_fast  # noqa: F401  (maps kernels/ to iwm_fast.kernels)
from iwm_fast.kernels import attention as A
from iwm_fast.kernels import ema as E
from iwm_fast.kernels import gather as G
from iwm_fast.kernels import rope as R


def attention_variants():
    blocks = {A._attn_fwd_kernel: dict(BLOCK_M=64, BLOCK_N=64), A._attn_bwd_dkdv_kernel: dict(BLOCK_N=64, BLOCK_M=32),
              A._attn_bwd_dq_kernel: dict(BLOCK_M=64, BLOCK_N=32)}
    # D = 80 both as 64 + 16 tiles and padded to 128; D = 24 has one tiling (32); D = 64 block-causal (V-JEPA
    # 2-AC's predictor).
    for dtype, head_dim, split, causal in (("bf16", 80, True, False), ("bf16", 80, False, False),
                                           ("fp16", 24, False, False), ("bf16", 64, False, True)):
        block_d, block_d2, split = A.head_dim_tiles(head_dim, split)
        for kernel, blk in blocks.items():
            consts = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_D2=block_d2, SPLIT=split, HAS_KL=True,
                          PRECISION="ieee", ALIGN=8, CAUSAL=causal, **blk)
            kinds = {n: f"*{dtype}" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
            kinds.update(LSE="*fp32", DELTA="*fp32", KL="*i32", sm_scale="fp32")
            tiles = f"{block_d}+{block_d2}" if split else str(block_d)
            mode = " block-causal" if causal else ""
            yield f"{kernel.fn.__name__} {dtype} D={head_dim} as {tiles}{mode}", kernel.fn, kinds, consts, 4


# Arguments a typical launch specializes as divisible by 16, per kernel (see the module docstring).
ALIGNED_ARGS = {
    "_gather_fwd_kernel": ("x_ptr", "idx_ptr", "pos_ptr", "out_ptr", "D", "sxb", "sxn", "spb", "spn"),
    "_scatter_add_rows_kernel": ("src_ptr", "perm_ptr", "offsets_ptr", "dst_ptr", "D"),
}


def other_variants():
    for transpose in (False, True):  # rotary forward and its transpose (the backward), bf16, head dim 88
        yield (f"_rope_kernel bf16 D=88{' transpose' if transpose else ''}", R._rope_kernel,
               dict(X="*bf16", Y="*bf16", POS="*fp32", AXIS="*i32", INV_FREQ="*fp32"),
               dict(HEAD_DIM=88, BLOCK_D=128, BLOCK_N=R._block_rows(88), TRANSPOSE=transpose), 4)
    yield ("_gather_fwd_kernel bf16 +pos", G._gather_fwd_kernel,
           dict(x_ptr="*bf16", idx_ptr="*i64", pos_ptr="*bf16", out_ptr="*bf16"),
           dict(HAS_POS=True, CHECK=False, BLOCK_K=16, BLOCK_D=256, sxd=1, spd=1, sik=1), 4)
    yield ("_scatter_add_rows_kernel bf16->fp32", G._scatter_add_rows_kernel,
           dict(src_ptr="*bf16", perm_ptr="*i64", offsets_ptr="*i64", dst_ptr="*fp32"),
           dict(ACC=tl.float32, BLOCK_R=16, BLOCK_D=256), 8)  # the launch for D = 768
    for t_dtype, o_dtype in ((tl.float32, tl.float32), (tl.float32, tl.bfloat16), (tl.bfloat16, tl.bfloat16)):
        yield (f"_ema_kernel {t_dtype}<-{o_dtype}", E._ema_kernel,
               dict(t_addr_ptr="*i64", o_addr_ptr="*i64", numel_ptr="*i64", tid_ptr="*i64", cidx_ptr="*i64",
                    mom_ptr="*fp32", mom="fp32", one_minus_mom="fp32"),
               dict(T_DTYPE=t_dtype, O_DTYPE=o_dtype, MOM_FROM_PTR=True, ALIGNED=True, CHUNK=E.CHUNK, BLOCK=E.BLOCK), 8)


def signature(jit_fn, kinds, constexprs):
    """Every parameter's type: the given kinds, constexpr for constexprs, i32 for the remaining sizes/strides."""
    return {name: "constexpr" if name in constexprs else kinds.get(name, "i32")
            for name in inspect.signature(jit_fn.fn).parameters}


def sass_counts(cubin):
    """'HGMMA:n HMMA:m LDG.E.128:p STG.E.128:q' from the SASS of a cubin, or '' without Triton's cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return ""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    counts = {op: len(re.findall(r"\b" + re.escape(op) + r"\b", sass))
              for op in ("HGMMA", "HMMA", "LDG.E.128", "STG.E.128")}
    return " ".join(f"{op}:{n}" for op, n in counts.items())


def main(arch):
    for label, jit_fn, kinds, consts, warps in (*attention_variants(), *other_variants()):
        names = list(inspect.signature(jit_fn.fn).parameters)
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in ALIGNED_ARGS.get(jit_fn.__name__, ())}
        src = ASTSource(fn=jit_fn, signature=signature(jit_fn, kinds, consts), constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps, "num_stages": 2})
        cubin = compiled.asm.get("cubin") or b""
        if not cubin:
            raise SystemExit(f"{label}: no cubin produced")
        print(f"{label} sm_{arch}: cubin {len(cubin)} bytes, {compiled.metadata.shared} bytes of shared memory, "
              f"sass {sass_counts(cubin) or 'unknown'}")


if __name__ == "__main__":
    main(int(sys.argv[1]))
