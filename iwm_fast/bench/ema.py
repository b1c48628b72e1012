"""EMA target update: fused multi-tensor kernel vs torch._foreach_lerp_ and I-JEPA's per-parameter loop.

Parameter sets are the real ViT-B/16 and ViT-H/14 encoders' (shapes read from a model built on the meta
device, so nothing giant is allocated twice); the CPU run uses a 2-block ViT-tiny. Bytes counted per
parameter: read target + read online + write target (12 for fp32, 10 for fp32 target / bf16 online). The
copy reference moves the same bytes with one ``copy_`` in the same run.
"""

import torch

from . import harness


def param_shapes(size, patch_size, depth=None):
    """Shapes of the encoder's parameters, from a model on the meta device (no memory allocated)."""
    from ..models.choices import VIT_SIZES
    from ..models.vit import VisionTransformer

    s = VIT_SIZES[size]
    with torch.device("meta"):
        model = VisionTransformer(img_size=224, patch_size=patch_size, embed_dim=s.embed_dim,
                                  depth=depth or s.depth, num_heads=s.num_heads, mlp_ratio=s.mlp_ratio)
    return [tuple(p.shape) for p in model.parameters()]


def _sets(device, quick):
    if torch.device(device).type != "cuda":
        return [("vit-tiny-2blocks", param_shapes("tiny", 16, depth=2))]
    sets = [("vit-b16", param_shapes("base", 16)), ("vit-h14", param_shapes("huge", 14))]
    return sets[:1] if quick else sets


def run(device, quick):
    dev = torch.device(device)
    harness.warn_if_interpreting(dev)
    from ..ops.ema import ema_update_

    meta = harness.metadata(device)
    rows = []
    m = 0.996
    configs = [(torch.float32, torch.float32)] + ([] if quick else [(torch.float32, torch.bfloat16)])
    for set_name, shapes in _sets(device, quick):
        n_params = sum(int(torch.Size(s).numel()) for s in shapes)
        for t_dtype, o_dtype in configs:
            targets = [torch.randn(s, device=dev, dtype=t_dtype) for s in shapes]
            onlines = [torch.randn(s, device=dev, dtype=o_dtype) for s in shapes]
            bytes_moved = n_params * (2 * targets[0].element_size() + onlines[0].element_size())
            dtype = "fp32" if t_dtype == o_dtype else "fp32+bf16"
            shape = f"{set_name}:{len(shapes)}tensors:{n_params / 1e6:.1f}M"

            src = torch.empty(bytes_moved // 2 // 4, device=dev, dtype=torch.float32)
            dst = torch.empty_like(src)
            copy_gbs = harness.rate(bytes_moved, harness.time_warm_ms(lambda: dst.copy_(src), device), 1e9)
            rows.append(harness.row("ema", "copy", shape, dtype, "GB/s", copy_gbs, meta))
            src = dst = None  # freed before the EMA tensors are timed

            m_tensor = torch.tensor(m, device=dev)

            # Written out, not through ema_update_(backend="loop"): the baselines must not pay our input checks.
            def ijepa_loop():
                for q, k in zip(onlines, targets):
                    k.mul_(m).add_((1 - m) * q.detach())

            providers = {"iwm_fast": lambda: ema_update_(targets, onlines, m),
                         "iwm_fast(tensor m)": lambda: ema_update_(targets, onlines, m_tensor),
                         "ijepa_loop": ijepa_loop}
            if t_dtype == o_dtype:  # _foreach_lerp_ needs matching dtypes
                providers["foreach_lerp_"] = lambda: torch._foreach_lerp_(targets, onlines, 1 - m)
            times = {}
            for prov, fn in providers.items():
                t = harness.time_warm_ms(fn, device)
                times[prov] = t
                gbs = harness.rate(bytes_moved, t, 1e9)
                rows.append(harness.row("ema", prov, shape, dtype, "ms", t, meta))
                rows.append(harness.row("ema", prov, shape, dtype, "GB/s", gbs, meta))
                rows.append(harness.row("ema", prov, shape, dtype, "fraction_of_copy",
                                        tuple(g / copy_gbs[0] for g in gbs), meta))
            for base in ("foreach_lerp_", "ijepa_loop"):
                if base in times:
                    # speedup of iwm_fast over the baseline; p20/p80 pair the fast quantiles together
                    sp = tuple(b / a for a, b in zip(times["iwm_fast"], times[base]))
                    rows.append(harness.row("ema", "iwm_fast", shape, dtype, f"speedup_vs_{base}", sp, meta))
            targets = onlines = None  # freed before the next set is allocated
    return rows


def main(argv=None):
    return harness.bench_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
