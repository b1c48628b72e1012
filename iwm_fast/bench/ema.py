"""EMA target update: the fused multi-tensor kernel vs torch._foreach_lerp_ and I-JEPA's per-parameter loop.

Parameters are the real encoders' (ViT-H/14 in the quick set, 389 tensors, 632M parameters; ViT-B/16 too in the
full run), as modules the way the engine passes them; the CPU run uses a 2-block ViT-tiny. Bytes counted per
parameter: read target + read online + write target (12 for fp32, 10 for fp32 target / bf16 online). The copy
reference moves the same bytes with one ``copy_`` in the same run.

Providers: ``iwm_fast`` (``ema_update_`` on the two modules: its plan looked up and checked, then the launch),
``iwm_fast(tensor m)`` (a momentum tensor on the device, as the engine passes it), ``iwm_fast_kernel_only`` (the
plan's launch alone: the kernel's own time), ``foreach_lerp_`` and ``ijepa_loop``. Rows: ``ms``, ``GB/s``,
``fraction_of_copy``, speedups, and for ours ``host_us_per_call``: the host time of one call in a loop of 200
without syncs (the CPU time a training step spends on the update, which the device timer does not show; the
baselines' hundreds of launches per call would fill the launch queue and time the GPU instead).
"""

import torch

from . import harness


def encoder(size, patch_size, device, depth=None):
    """A ViT encoder of the given size, made on the meta device and then materialized on ``device``."""
    from ..models.choices import VIT_SIZES
    from ..models.vit import VisionTransformer

    s = VIT_SIZES[size]
    with torch.device("meta"):
        model = VisionTransformer(img_size=224, patch_size=patch_size, embed_dim=s.embed_dim,
                                  depth=depth or s.depth, num_heads=s.num_heads, mlp_ratio=s.mlp_ratio)
    return model.to_empty(device=device).requires_grad_(False)


def _sets(device, quick):
    if torch.device(device).type != "cuda":
        return [("vit-tiny-2blocks", ("tiny", 16, 2))]
    sets = [("vit-h14", ("huge", 14, None)), ("vit-b16", ("base", 16, None))]
    return sets[:1] if quick else sets


def _pair(spec, device, t_dtype, o_dtype):
    g = torch.Generator(device=device).manual_seed(0)
    target, online = encoder(*spec[:2], device, spec[2]), encoder(*spec[:2], device, spec[2])
    for module, dtype in ((target, t_dtype), (online, o_dtype)):
        module.to(dtype)
        for p in module.parameters():
            p.normal_(generator=g)
    return target, online


def _providers(target, online, m, device):
    from ..ops import ema_plan
    from ..ops.ema import ema_update_

    ema_update_(target, online, m)  # builds the plan
    work = ema_plan._MODULE_PLANS[(id(target), id(online), "auto")].work
    targets, onlines = list(target.parameters()), list(online.parameters())
    m_tensor = torch.tensor(m, device=device)

    def ijepa_loop():  # written out, not ema_update_(backend="loop"): the baselines must not pay our checks
        for q, k in zip(onlines, targets):
            k.mul_(m).add_((1 - m) * q.detach())

    found = {"iwm_fast": lambda: ema_update_(target, online, m),
             "iwm_fast(tensor m)": lambda: ema_update_(target, online, m_tensor),
             "iwm_fast_kernel_only": lambda: work.run(None, m), "ijepa_loop": ijepa_loop}
    if targets[0].dtype == onlines[0].dtype:  # _foreach_lerp_ needs matching dtypes
        found["foreach_lerp_"] = lambda: torch._foreach_lerp_(targets, onlines, 1 - m)
    return found


def _set_rows(set_name, spec, device, t_dtype, o_dtype, meta):
    target, online = _pair(spec, device, t_dtype, o_dtype)
    n_params = sum(p.numel() for p in target.parameters())
    bytes_moved = n_params * (2 * t_dtype.itemsize + o_dtype.itemsize)
    dtype = "fp32" if t_dtype == o_dtype else "fp32+bf16"
    shape = f"{set_name}:{len(list(target.parameters()))}tensors:{n_params / 1e6:.1f}M"
    src = torch.empty(bytes_moved // 2 // 4, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    copy_gbs = harness.rate(bytes_moved, harness.time_warm_ms(lambda: dst.copy_(src), device), 1e9)
    src = dst = None  # freed before the EMA is timed
    yield harness.row("ema", "copy", shape, dtype, "GB/s", copy_gbs, meta)
    times = {}
    for prov, fn in _providers(target, online, 0.996, device).items():
        times[prov] = t = harness.time_warm_ms(fn, device)
        gbs = harness.rate(bytes_moved, t, 1e9)
        yield harness.row("ema", prov, shape, dtype, "ms", t, meta)
        yield harness.row("ema", prov, shape, dtype, "GB/s", gbs, meta)
        yield harness.row("ema", prov, shape, dtype, "fraction_of_copy", tuple(g / copy_gbs[0] for g in gbs), meta)
        if prov.startswith("iwm_fast"):  # the baselines' hundreds of launches would fill the launch queue
            yield harness.row("ema", prov, shape, dtype, "host_us_per_call", harness.host_us_per_call(fn, device),
                              meta)
    for base in ("foreach_lerp_", "ijepa_loop"):
        if base in times:  # speedup of iwm_fast over the baseline; p20/p80 pair the fast quantiles together
            yield harness.row("ema", "iwm_fast", shape, dtype, f"speedup_vs_{base}",
                              tuple(b / a for a, b in zip(times["iwm_fast"], times[base])), meta)


def run(device, quick):
    dev = torch.device(device)
    harness.warn_if_interpreting(dev)
    meta = harness.metadata(device)
    configs = [(torch.float32, torch.float32)] + ([] if quick else [(torch.float32, torch.bfloat16)])
    for set_name, spec in _sets(device, quick):
        for t_dtype, o_dtype in configs:
            yield from _set_rows(set_name, spec, dev, t_dtype, o_dtype, meta)
            if dev.type == "cuda":
                torch.cuda.empty_cache()


def main(argv=None):
    return harness.bench_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
