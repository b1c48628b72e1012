"""Compile the Triton attention kernels ahead of time for a CUDA target, without a GPU (run as a script).

Usage: python tests/aot_compile_kernels.py ARCH DTYPE HEAD_DIM   (e.g. 90 bf16 80); prints one line per kernel.
Must run with TRITON_INTERPRET unset or 0: under the interpreter the kernels are not JIT functions.
"""
import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import iwm_fast  # noqa: F401  (maps kernels/ to iwm_fast.kernels)
from iwm_fast.kernels import attention as A

POINTERS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
KERNELS = {
    "fwd": (A._attn_fwd_kernel, dict(BLOCK_M=64, BLOCK_N=64)),
    "bwd_dkdv": (A._attn_bwd_dkdv_kernel, dict(BLOCK_N=64, BLOCK_M=32)),
    "bwd_dq": (A._attn_bwd_dq_kernel, dict(BLOCK_M=64, BLOCK_N=32)),
}


def signature(jit_fn, constexprs, dtype):
    kinds = {}
    for name in inspect.signature(jit_fn.fn).parameters:
        if name in constexprs:
            kinds[name] = "constexpr"
        elif name in POINTERS:
            kinds[name] = f"*{dtype}"
        elif name in ("LSE", "DELTA"):
            kinds[name] = "*fp32"
        elif name == "KL":
            kinds[name] = "*i32"
        elif name == "sm_scale":
            kinds[name] = "fp32"
        else:
            kinds[name] = "i32"
    return kinds


def main(arch, dtype, head_dim):
    for name, (autotuned, blocks) in KERNELS.items():
        consts = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), HAS_KL=True,
                      PRECISION="ieee", ALIGN=8, **blocks)
        src = ASTSource(fn=autotuned.fn, signature=signature(autotuned.fn, consts, dtype), constexprs=consts)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": 4, "num_stages": 2})
        cubin = compiled.asm.get("cubin") or b""
        print(f"{name} sm_{arch} {dtype} D={head_dim}: cubin {len(cubin)} bytes, "
              f"{compiled.metadata.shared} bytes of shared memory")
        if not cubin:
            raise SystemExit(f"{name}: no cubin produced")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], int(sys.argv[3]))
