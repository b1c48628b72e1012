"""Compile the Triton kernels ahead of time for CUDA targets, without a GPU, and report each variant's resources.

    python tests/aot_compile_kernels.py 80 90                  # pinned attention tiles + the other kernels
    python tests/aot_compile_kernels.py 80 90 --all --jobs 2 --table docs/kernels_aot.md   # every tile choice

One line per compiled variant: registers per thread, local memory (spills) and shared memory in bytes, CTAs per
SM that registers, shared memory and threads allow, and counts read off its SASS when Triton's cuobjdump is
there: tensor-core instructions (HGMMA: Hopper's wgmma; HMMA: mma.sync), 16-byte global loads and stores
(LDG.E.128, STG.E.128) and 2-byte global loads (LDG.E.U16).

Attention: head dims 24, 32, 64, 80 as 64 + 16 and 80 padded to 128, non-causal and block-causal, bf16; by
default the pinned tiles of each head dim's space (kernels/attention_tiles.py: what tests and quick runs use),
with ``--all`` every candidate of the space (what the autotuner may compile on a GPU, and what was pruned).
The launch is specialized as a typical one is (pointers 16-byte aligned; unit strides the constant 1) for the
gather kernel; the attention kernels tell the compiler their alignment themselves (ALIGN). Must run with
TRITON_INTERPRET unset or 0: under the interpreter the kernels are not JIT functions.
"""
import argparse
import concurrent.futures
import inspect
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import iwm_fast  # noqa: E402,F401  (maps kernels/ to iwm_fast.kernels)
from iwm_fast.kernels import attention as A  # noqa: E402
from iwm_fast.kernels import attention_tiles as T  # noqa: E402
from iwm_fast.kernels import ema as E  # noqa: E402
from iwm_fast.kernels import gather as G  # noqa: E402
from iwm_fast.kernels import rope as R  # noqa: E402

# Per SM: registers, shared memory (a CTA may take 1 KB less, and the system reserves 1 KB per CTA), warps, CTAs.
SM = {80: dict(regs=65536, smem=167936, smem_cta=166912, warps=64, ctas=32),
      90: dict(regs=65536, smem=233472, smem_cta=232448, warps=64, ctas=32)}
HEAD_DIMS = (("24", 24, True), ("32", 32, True), ("64", 64, True), ("80 as 64+16", 80, True),
             ("80 padded", 80, False))
KERNEL_FNS = {"fwd": "_attn_fwd_kernel", "dq": "_attn_bwd_dq_kernel", "dkdv": "_attn_bwd_dkdv_kernel"}
SASS_OPS = ("HGMMA", "HMMA", "LDG.E.128", "STG.E.128", "LDG.E.U16")


def attention_variants(every_tile, dtype="bf16"):
    """(label, jit function, argument kinds, constexprs, warps, stages) for each attention kernel variant."""
    kinds = {n: f"*{dtype}" for n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV")}
    kinds.update(LSE="*fp32", DELTA="*fp32", KL="*i32", sm_scale="fp32")
    for head_label, head_dim, split in HEAD_DIMS:
        block_d, block_d2, split = T.head_dim_tiles(head_dim, split)
        width = T.space_width(block_d + (block_d2 if split else 0))
        for causal in (False, True):
            for kernel, fn_name in KERNEL_FNS.items():
                choices = T.CANDIDATES[kernel][width] if every_tile else [T.PINNED[width][kernel]]
                for own, streamed, warps, stages in choices:
                    names = T.BLOCK_NAMES[kernel]
                    consts = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_D2=block_d2, SPLIT=split, HAS_KL=True,
                                  PRECISION="ieee", ALIGN=8, CAUSAL=causal, TAIL16=True,
                                  **{names[0]: own, names[1]: streamed})
                    label = (f"attn {kernel} {dtype} D={head_label}{' causal' if causal else ''} "
                             f"tiles={own}x{streamed}x{warps}x{stages}")
                    yield label, getattr(A, fn_name).fn, kinds, consts, warps, stages


# Arguments a typical launch specializes as divisible by 16, per kernel (see the module docstring).
ALIGNED_ARGS = {
    "_gather_fwd_kernel": ("x_ptr", "idx_ptr", "pos_ptr", "out_ptr", "D", "sxb", "sxn", "spb", "spn"),
    "_scatter_add_rows_kernel": ("src_ptr", "perm_ptr", "offsets_ptr", "dst_ptr", "D"),
    "_rope_kernel": ("X1", "Y1", "X2", "Y2"),
}


def other_variants():
    rope_kinds = dict(X1="*bf16", Y1="*bf16", X2="*bf16", Y2="*bf16", POS="*fp32", AXIS="*i32", INV_FREQ="*fp32")
    for head_dim in (64, 88):  # V-JEPA 2's ViT-L and ViT-g heads: q and k in one launch, forward and transpose
        for transpose in (False, True):
            consts = dict(HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim),
                          BLOCK_N=R.block_rows(head_dim), TRANSPOSE=transpose, TWO=True, ALIGN=8,
                          stride_x1d=1, stride_y1d=1, stride_x2d=1, stride_y2d=1)
            yield (f"rope q+k bf16 D={head_dim}{' transpose' if transpose else ''}", R._rope_kernel, rope_kinds,
                   consts, 4, 2)
    yield ("gather bf16 +pos", G._gather_fwd_kernel, dict(x_ptr="*bf16", idx_ptr="*i64", pos_ptr="*bf16",
                                                           out_ptr="*bf16"),
           dict(HAS_POS=True, CHECK=False, BLOCK_K=16, BLOCK_D=256, sxd=1, spd=1, sik=1), 4, 2)
    yield ("scatter bf16->fp32", G._scatter_add_rows_kernel,
           dict(src_ptr="*bf16", perm_ptr="*i64", offsets_ptr="*i64", dst_ptr="*fp32"),
           dict(ACC=tl.float32, BLOCK_R=16, BLOCK_D=256), 8, 2)  # the launch for D = 768
    for t_dtype, o_dtype in ((tl.float32, tl.float32), (tl.float32, tl.bfloat16), (tl.bfloat16, tl.bfloat16)):
        yield (f"ema {t_dtype}<-{o_dtype}", E._ema_kernel,
               dict(t_addr_ptr="*i64", o_addr_ptr="*i64", numel_ptr="*i64", tid_ptr="*i64", cidx_ptr="*i64",
                    mom_ptr="*fp32", mom="fp32", one_minus_mom="fp32"),
               dict(T_DTYPE=t_dtype, O_DTYPE=o_dtype, MOM_FROM_PTR=True, ALIGNED=True, CHUNK=E.CHUNK, BLOCK=E.BLOCK),
               8, 2)


def signature(jit_fn, kinds, constexprs):
    """Every parameter's type: the given kinds, constexpr for constexprs, i32 for the remaining sizes/strides."""
    return {name: "constexpr" if name in constexprs else kinds.get(name, "i32")
            for name in inspect.signature(jit_fn.fn).parameters}


def _tool(name):
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) else None


def resources(cubin):
    """{regs, local, static_smem} from the cubin's resource usage, and SASS op counts ({} without cuobjdump)."""
    tool = _tool("cuobjdump")
    if tool is None:
        return {}, {}
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    res = {"regs": int(fields["REG"]), "local": int(fields["LOCAL"]) + int(fields["STACK"]),
           "static_smem": int(fields["SHARED"])}
    counts = {op: len(re.findall(r"\b" + re.escape(op) + r"\b", sass)) for op in SASS_OPS}
    return res, counts


def ctas_per_sm(arch, regs, warps, smem):
    """CTAs that fit one SM at once: the least of what registers (256 per warp at a time), shared memory and
    warps allow (0 when one CTA's shared memory is over the limit)."""
    sm = SM[arch]
    if smem > sm["smem_cta"]:
        return 0
    regs_per_warp = -(-regs * 32 // 256) * 256
    by_regs = (sm["regs"] // regs_per_warp) // warps
    by_smem = sm["smem"] // (smem + 1024)
    return min(by_regs, by_smem, sm["warps"] // warps, sm["ctas"])


def compile_one(task):
    """Compile one variant for one arch; returns the variant's facts (a dict), never raises."""
    label, jit_fn, kinds, consts, warps, stages, arch = task
    names = list(inspect.signature(jit_fn.fn).parameters)
    attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in ALIGNED_ARGS.get(jit_fn.__name__, ())}
    out = {"label": label, "arch": arch, "warps": warps}
    try:
        src = ASTSource(fn=jit_fn, signature=signature(jit_fn, kinds, consts), constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": warps, "num_stages": stages})
    except Exception as exc:  # a configuration the compiler rejects is a finding, not a crash of the sweep
        return {**out, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:200]}"}
    cubin = compiled.asm.get("cubin") or b""
    if not cubin:
        return {**out, "error": "no cubin produced"}
    res, sass = resources(cubin)
    out.update(res, sass=sass, smem=compiled.metadata.shared + res.get("static_smem", 0))
    if res:
        out["ctas"] = ctas_per_sm(arch, res["regs"], warps, out["smem"])
    return out


_TASKS = []


def _compile_task(index):
    return compile_one(_TASKS[index])


def describe(r):
    if "error" in r:
        return f"{r['label']} sm_{r['arch']}: FAILED {r['error']}"
    facts = (f"regs {r['regs']} local {r['local']} smem {r['smem']} ctas/sm {r['ctas']}" if "regs" in r
             else f"smem {r['smem']} (no cuobjdump: resources unknown)")
    sass = " ".join(f"{op}:{n}" for op, n in r["sass"].items()) if r.get("sass") else "unknown"
    return f"{r['label']} sm_{r['arch']}: {facts} sass {sass}"


def _table_key(label):
    """((kernel, head-dim tiling, tiles), causal) of an attention label 'attn KERNEL DTYPE D=... [causal] tiles=...'."""
    words = label.split()
    causal = "causal" in words
    head = " ".join(w for w in words[3:-1] if w != "causal")
    return (words[1], head, words[-1]), causal


TABLE_HEADER = [
    "# Attention kernels compiled ahead of time: resources of every tile choice", "",
    "Made by `python tests/aot_compile_kernels.py 80 90 --all --jobs 2 --table docs/kernels_aot.md` (Triton's own "
    "ptxas, no GPU; bf16, key lengths on, 16-row tails on). Each cell: registers per thread / local memory bytes per "
    "thread (spills) / shared memory KB / CTAs per SM (the least of what registers, shared memory and warps allow; "
    "0: over the CTA's shared-memory limit). A space (kernels/attention_tiles.py) keeps the candidates that spill on "
    "no head dim of the space and fit at least 2 CTAs per SM on sm_90; the last column says which it kept, and why "
    "it left out the others.", ""]


def _verdict(kernel, head_label, tiles_label):
    """'yes', 'yes (pinned)' or 'pruned: why', from kernels/attention_tiles.py, for a table row."""
    head_dim = int(head_label.removeprefix("D=").split()[0])
    block_d, block_d2, split = T.head_dim_tiles(head_dim, "padded" not in head_label)
    width = T.space_width(block_d + (block_d2 if split else 0))
    tiles = tuple(int(x) for x in tiles_label.removeprefix("tiles=").split("x"))
    why = T.PRUNED.get((kernel, width, tiles))
    if why:
        return f"pruned: {why}"
    return "yes (pinned)" if T.PINNED[width][kernel] == tiles else "yes"


def write_table(path, results):
    """Markdown: one row per (kernel, head dim, tiles); per arch and mode 'regs/local/smem KB/CTAs'."""
    cells, order = {}, []
    for r in results:
        if not r["label"].startswith("attn"):
            continue
        key, causal = _table_key(r["label"])
        if key not in cells:
            order.append(key)
        text = ("error" if "error" in r else
                f"{r['regs']}/{r['local']}/{r['smem'] / 1024:.0f}/{r['ctas']}" if "regs" in r else "?")
        cells.setdefault(key, {})[(r["arch"], causal)] = text
    archs = sorted({r["arch"] for r in results})
    cols = [(a, c) for a in archs for c in (False, True)]
    head = "| kernel | head dim | tiles (rows x streamed x warps x stages) | " + " | ".join(
        f"sm_{a}{' causal' if c else ''}" for a, c in cols) + " | in the space |"
    lines = TABLE_HEADER + [head, "|" + "---|" * (4 + len(cols))]
    for key in order:
        kernel, dim, tiles = key
        lines.append(f"| {kernel} | {dim.removeprefix('D=')} | {tiles.removeprefix('tiles=')} | "
                     + " | ".join(cells[key].get(c, "") for c in cols) + f" | {_verdict(kernel, dim, tiles)} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("archs", nargs="+", type=int, choices=sorted(SM))
    p.add_argument("--all", action="store_true", help="every tile choice of each space, not just the pinned ones")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    p.add_argument("--table", default=None, help="write the attention variants as a markdown table here")
    a = p.parse_args(argv)
    variants = [*attention_variants(a.all), *other_variants()]
    _TASKS[:] = [(*v, arch) for arch in a.archs for v in variants]
    if a.jobs > 1:  # forked workers inherit the task list (JIT functions do not pickle)
        context = multiprocessing.get_context("fork")
        with concurrent.futures.ProcessPoolExecutor(a.jobs, mp_context=context) as pool:
            results = list(pool.map(_compile_task, range(len(_TASKS))))
    else:
        results = [compile_one(t) for t in _TASKS]
    for r in results:
        print(describe(r), flush=True)
    if a.table:
        write_table(a.table, results)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
