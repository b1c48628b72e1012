"""Tile choices of the attention kernels (kernels/attention.py): autotune spaces, pinned tiles, switches.

A tile choice is (rows of the program's own tile, rows of the tile it streams over, num_warps, num_stages): for
the forward and dQ kernels (query rows, key rows per step), for dK/dV (key rows, query rows per step). Spaces go
by the head-dim tiles' total width (<= 64, <= 96, <= 128, <= 256); 96 serves the split head dims (80 = 64 + 16,
ViT-H/14; 72; 96 = 64 + 32), which the <= 128 space, built for one 128-wide tile, would give 8-warp tiles sized
for 128 columns. Every entry compiles for sm_80 and sm_90 at every head dim of its space with no spills and
fits at least 2 CTAs per SM, and each space keeps one that fits sm_80's shared memory (the table:
docs/gpu_check.md, made by ``tests/aot_compile_kernels.py --table``).

Switches, read from the environment at each launch:

- ``IWM_FAST_ATTN_TILES``: unset or ``autotune`` (a GPU's default): the autotuner picks within the space;
  ``pinned``: the space's pinned tiles, no tuning (the interpreter's default: it would run every config);
  or tiles per kernel, e.g. ``fwd=64x64x4x3,dq=64x32x4x2,dkdv=64x32x4x2`` (a kernel not named keeps its
  pinned tiles). Pinning is for tests, quick runs and A/B timings: nothing is compiled but the one choice.
- ``IWM_FAST_ATTN_SPLIT_HEAD_DIM=0``: one padded head-dim tile instead of the split.
- ``IWM_FAST_ATTN_TAIL16=0``: the masked tail of the streamed dimension in one full tile instead of 16-row
  tiles (see kernels/attention.py).
"""
import os

import triton

TILES_ENV = "IWM_FAST_ATTN_TILES"
SPLIT_ENV = "IWM_FAST_ATTN_SPLIT_HEAD_DIM"
TAIL_ENV = "IWM_FAST_ATTN_TAIL16"
KERNELS = ("fwd", "dq", "dkdv")
# Meta-parameter names of (own rows, streamed rows) per kernel.
BLOCK_NAMES = {"fwd": ("BLOCK_M", "BLOCK_N"), "dq": ("BLOCK_M", "BLOCK_N"), "dkdv": ("BLOCK_N", "BLOCK_M")}

# Every tile choice compiled ahead of time (tests/aot_compile_kernels.py --all: docs/kernels_aot.md), by space.
FWD_CANDIDATES = {
    64: [(32, 32, 2, 3), (32, 64, 4, 3), (64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 4, 3), (128, 32, 8, 3),
         (128, 64, 4, 3), (128, 64, 8, 2), (128, 128, 8, 2)],
    96: [(32, 32, 4, 2), (64, 32, 4, 2), (64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2),
         (128, 64, 8, 2)],
    128: [(64, 32, 4, 3), (64, 64, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2), (128, 64, 8, 3)],
    256: [(32, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2)],
}
BWD_CANDIDATES = {  # dQ and dK/dV alike
    64: [(32, 32, 2, 3), (64, 32, 4, 3), (64, 64, 4, 2), (128, 32, 8, 3), (128, 64, 8, 2)],
    96: [(32, 32, 4, 2), (64, 32, 4, 2), (64, 32, 4, 3), (64, 64, 4, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
    128: [(32, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 3)],
    256: [(32, 32, 4, 1), (32, 32, 4, 2), (64, 32, 8, 1)],
}
# Left out of the spaces, with what the sm_90 compile of some head dim of the space showed (bf16, causal or not):
# a spill, or registers that fit only one CTA per SM. The <= 256 space (head dims over 128) was not swept.
_ONE_CTA = "1 CTA/SM"
PRUNED = {
    ("fwd", 64, (128, 64, 4, 3)): "spills 64 B (D 64, causal)", ("fwd", 64, (128, 64, 8, 2)): _ONE_CTA,
    ("fwd", 64, (128, 128, 8, 2)): _ONE_CTA, ("dq", 64, (128, 64, 8, 2)): _ONE_CTA,
    ("dkdv", 64, (32, 32, 2, 3)): "spills 48 B (D 64, causal)", ("dkdv", 64, (64, 64, 4, 2)): "spills 256 B",
    ("dkdv", 64, (128, 32, 8, 3)): _ONE_CTA, ("dkdv", 64, (128, 64, 8, 2)): _ONE_CTA,
    ("fwd", 96, (64, 64, 4, 2)): "spills 16 B (causal)", ("fwd", 96, (64, 64, 8, 2)): _ONE_CTA,
    ("fwd", 96, (128, 32, 8, 2)): "1 CTA/SM (causal)", ("fwd", 96, (128, 64, 8, 2)): _ONE_CTA,
    ("dq", 96, (32, 32, 4, 2)): "spills 24 B (causal)", ("dq", 96, (64, 64, 4, 2)): "spills 16 B",
    ("dq", 96, (64, 64, 8, 2)): _ONE_CTA, ("dq", 96, (128, 32, 8, 2)): _ONE_CTA,
    ("dkdv", 96, (32, 32, 4, 2)): "spills 56 B", ("dkdv", 96, (64, 32, 4, 3)): "spills 16 B (causal)",
    ("dkdv", 96, (64, 64, 4, 2)): "spills 184 B", ("dkdv", 96, (64, 64, 8, 2)): "spills 16 B, 1 CTA/SM",
    ("dkdv", 96, (128, 32, 8, 2)): _ONE_CTA,
    ("fwd", 128, (64, 64, 8, 2)): _ONE_CTA, ("fwd", 128, (128, 32, 8, 3)): _ONE_CTA,
    ("fwd", 128, (128, 64, 8, 2)): _ONE_CTA, ("fwd", 128, (128, 64, 8, 3)): _ONE_CTA,
    ("dq", 128, (64, 32, 8, 2)): _ONE_CTA, ("dq", 128, (64, 64, 8, 2)): "spills 96 B (causal), 1 CTA/SM",
    ("dq", 128, (128, 32, 8, 3)): _ONE_CTA, ("dkdv", 128, (64, 32, 8, 2)): "spills 16 B (causal), 1 CTA/SM",
    ("dkdv", 128, (64, 64, 8, 2)): "spills 400 B (causal), 1 CTA/SM", ("dkdv", 128, (128, 32, 8, 3)): _ONE_CTA,
}
CANDIDATES = {"fwd": FWD_CANDIDATES, "dq": BWD_CANDIDATES, "dkdv": BWD_CANDIDATES}
SPACES = {kernel: {width: [c for c in choices if (kernel, width, c) not in PRUNED] for width, choices in by.items()}
          for kernel, by in CANDIDATES.items()}
# The pinned tiles per space: compiled without spills, at least 2 CTAs per SM on sm_90 and fitting sm_80, for
# every head dim of the space; 64-row own tiles where they fit (wgmma on Hopper needs 64 rows per warpgroup).
PINNED = {
    64: {"fwd": (64, 32, 4, 3), "dq": (64, 32, 4, 3), "dkdv": (64, 32, 4, 3)},
    96: {"fwd": (64, 32, 4, 2), "dq": (64, 32, 4, 2), "dkdv": (64, 32, 4, 2)},
    128: {"fwd": (64, 32, 4, 3), "dq": (32, 32, 4, 2), "dkdv": (32, 32, 4, 2)},
    256: {"fwd": (32, 32, 4, 2), "dq": (32, 32, 4, 2), "dkdv": (32, 32, 4, 2)},
}
# The interpreter's one choice: 64-row tiles keep the number of (slow, Python-level) programs low and 32-row
# streamed tiles make 196/197/257-token tests cross several full blocks plus a masked tail.
INTERPRETER = (64, 32, 4, 1)


def interpreting():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def space_width(width):
    """The space serving head-dim tiles ``width`` columns wide in all."""
    return min(k for k in FWD_CANDIDATES if k >= width)


def configs(kernel):
    """Every choice of any of ``kernel``'s spaces, as triton.Configs (the autotuner's list; its early prune keeps
    the launch's space)."""
    names = BLOCK_NAMES[kernel]
    union = sorted({c for space in SPACES[kernel].values() for c in space})
    return [triton.Config({names[0]: a, names[1]: b}, num_warps=w, num_stages=s) for a, b, w, s in union]


def _parse_tiles(text):
    """{kernel: tiles} from 'fwd=64x64x4x3,dq=...'; a ValueError naming the variable on anything else."""
    chosen = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        kernel, _, value = item.partition("=")
        try:
            own, streamed, warps, stages = (int(v) for v in value.split("x"))
        except ValueError:
            own = None
        ok = (own is not None and kernel in KERNELS and warps in (1, 2, 4, 8, 16) and stages >= 1
              and all(n >= 16 and n & (n - 1) == 0 for n in (own, streamed)))
        if not ok:
            raise ValueError(f"{TILES_ENV}={text!r}: expected autotune, pinned, or KERNEL=ROWSxSTREAMEDxWARPSxSTAGES "
                             f"items (KERNEL in {', '.join(KERNELS)}, rows powers of two >= 16), got {item!r}")
        chosen[kernel] = (own, streamed, warps, stages)
    return chosen


def tile_choice(kernel, width):
    """(own rows, streamed rows, warps, stages) to launch with, or None to let the autotuner pick."""
    text = os.environ.get(TILES_ENV, "").strip()
    if text in ("", "autotune") and not interpreting():
        return None
    pinned = INTERPRETER if interpreting() else PINNED[space_width(width)][kernel]
    if text in ("", "autotune", "pinned"):
        return pinned
    return _parse_tiles(text).get(kernel, pinned)


def split_head_dim_enabled():
    return os.environ.get(SPLIT_ENV, "1") != "0"


def tail16_enabled():
    return os.environ.get(TAIL_ENV, "1") != "0"


def head_dim_tiles(d, split=None):
    """(BLOCK_D, BLOCK_D2, SPLIT) covering head dim d: one power-of-two tile (BLOCK_D2 then unused, 16), or a
    power-of-two tile plus a remainder tile when that pads fewer columns. split=None reads the environment."""
    if split is None:
        split = split_head_dim_enabled()
    padded = max(16, triton.next_power_of_2(d))
    if split and d > 16:
        first = padded // 2 if padded > d else padded
        rest = max(16, triton.next_power_of_2(d - first)) if d > first else 0
        if rest and first + rest < padded:
            return first, rest, True
    return padded, 16, False


def prune(kernel):
    """The autotuner's early prune for ``kernel``: this width's space, tiles not far larger than the sequence."""
    own_key, streamed_key = ("N_K_KEY", "N_Q_KEY") if kernel == "dkdv" else ("N_Q_KEY", "N_K_KEY")
    own_name, streamed_name = BLOCK_NAMES[kernel]

    def early_prune(choices, named_args, **kwargs):
        if len(choices) == 1:
            return choices
        width = kwargs["BLOCK_D"] + (kwargs["BLOCK_D2"] if kwargs["SPLIT"] else 0)
        allowed = set(SPACES[kernel][space_width(width)])
        kept = [c for c in choices
                if (c.kwargs[own_name], c.kwargs[streamed_name], c.num_warps, c.num_stages) in allowed]
        n_own, n_streamed = named_args[own_key], named_args[streamed_key]
        small = [c for c in kept
                 if c.kwargs[own_name] <= max(32, n_own) and c.kwargs[streamed_name] <= max(32, n_streamed)]
        return small or kept

    return early_prune
