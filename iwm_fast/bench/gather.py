"""Masked gather (+ fused pos add): achieved GB/s of iwm_fast vs torch.gather, against a device-to-device copy.

Forward bytes, counted as DRAM must move them: each gathered row of x read once (none for an expanded mask
token, one row served from cache), the output written once, the indices read once, and the positional table
[N, D] once in all (0.65 MB for ViT-H/14 at bf16: it stays in L2 across the batch, so counting it per row
would credit the kernel with bytes it never moves). Backward bytes: read the [R, K, D] gradient, write the
[B, N, D] input gradient. The copy reference moves the same number of bytes (read + write) in one ``copy_`` in
the same run. Index checks are off while timing, as in training, so the numbers are the kernels'.
"""

import torch

from . import harness


def _cases(device, quick):
    """(name, B, N, D, K, M, with_pos, expanded_x, dtype)."""
    if torch.device(device).type != "cuda":
        return [("tiny-ctx", 2, 16, 32, 8, 1, False, False, torch.float32),
                ("tiny-maskpos", 2, 16, 32, 4, 2, True, True, torch.float32)]
    quick_cases = [("vith14-ctx-K128", 128, 256, 1280, 128, 1, True, False, torch.bfloat16),
                   ("vith14-tgt-M4K40", 128, 256, 1280, 40, 4, False, False, torch.bfloat16),
                   ("vith14-pred-maskpos", 128, 256, 384, 40, 4, True, True, torch.bfloat16)]
    more = [("vith14-ctx-K64", 128, 256, 1280, 64, 1, True, False, torch.bfloat16),
            ("vith14-ctx-K200", 128, 256, 1280, 200, 1, True, False, torch.bfloat16),
            ("vitb16-ctx-K100", 128, 196, 768, 100, 1, True, False, torch.bfloat16),
            ("vith14-ctx-K128-fp32", 128, 256, 1280, 128, 1, True, False, torch.float32)]
    return quick_cases if quick else quick_cases + more


def _torch_reference(x, masks, pos):
    # I-JEPA's apply_masks (index repeated over D, one gather per mask, then cat) plus a separate pos add
    outs = []
    for m in masks:
        i = m.unsqueeze(-1).repeat(1, 1, x.size(-1))
        o = torch.gather(x, 1, i)
        if pos is not None:
            o = o + torch.gather(pos[None].expand(x.shape[0], -1, -1), 1, i)
        outs.append(o)
    return torch.cat(outs, 0)


def _bandwidth_rows(kernel, providers, nbytes, copy_gbs, shape, dtype, device, meta):
    """ms, GB/s and the fraction of the same run's copy bandwidth, for each provider's function."""
    for prov, fn in providers.items():
        t = harness.time_warm_ms(fn, device)
        gbs = harness.rate(nbytes, t, 1e9)
        yield harness.row(kernel, prov, shape, dtype, "ms", t, meta)
        yield harness.row(kernel, prov, shape, dtype, "GB/s", gbs, meta)
        yield harness.row(kernel, prov, shape, dtype, "fraction_of_copy", tuple(a / copy_gbs[0] for a in gbs), meta)


def traffic_bytes(B, N, D, K, M, with_pos, expanded, element_size):
    """(forward, backward) bytes DRAM must move, as the module docstring counts them."""
    out_elems = M * B * K * D
    x_read = 0 if expanded else out_elems
    pos_read = N * D if with_pos else 0
    forward = (x_read + out_elems + pos_read) * element_size + M * B * K * 8
    backward = (out_elems + B * N * D) * element_size
    return forward, backward


def _case_rows(case, dev, meta):
    from ..ops import gather as G

    name, B, N, D, K, M, with_pos, expanded, dtype = case
    g = torch.Generator(device=dev).manual_seed(0)
    if expanded:
        x = torch.randn(1, 1, D, device=dev, dtype=dtype, generator=g).expand(B, N, D)
    else:
        x = torch.randn(B, N, D, device=dev, dtype=dtype, generator=g)
    pos = torch.randn(N, D, device=dev, dtype=dtype, generator=g) if with_pos else None
    masks = [torch.randint(0, N, (B, K), device=dev, generator=g) for _ in range(M)]
    es = x.element_size()
    fwd_bytes, bwd_bytes = traffic_bytes(B, N, D, K, M, with_pos, expanded, es)
    shape = f"{name}:B{B}N{N}D{D}K{K}M{M}"
    copy_src = torch.empty(fwd_bytes // 2 // es, device=dev, dtype=dtype)
    copy_dst = torch.empty_like(copy_src)
    t_copy = harness.time_warm_ms(lambda: copy_dst.copy_(copy_src), dev)
    copy_gbs = harness.rate(2 * copy_src.numel() * es, t_copy, 1e9)
    yield harness.row("gather_fwd", "copy", shape, dtype, "GB/s", copy_gbs, meta)
    fwd = {"iwm_fast": lambda: G.apply_masks(x, masks, pos=pos),
           "torch.gather": lambda: _torch_reference(x, masks, pos)}
    yield from _bandwidth_rows("gather_fwd", fwd, fwd_bytes, copy_gbs, shape, dtype, dev, meta)
    if expanded:
        return
    idx = torch.stack(masks).reshape(M * B, K)
    grad = torch.randn(M * B, K, D, device=dev, dtype=dtype, generator=g)

    def torch_bwd():
        i = idx[..., None].expand(-1, -1, D)
        z = torch.zeros(M * B, N, D, device=dev, dtype=dtype).scatter_add_(1, i, grad)
        return z.view(M, B, N, D).sum(0)

    triton = dev.type == "cuda"  # the backward op of what "auto" runs forward
    bwd = {"iwm_fast": lambda: G._scatter_op(grad, idx, B, N, True, dtype, triton), "torch.scatter_add": torch_bwd}
    yield from _bandwidth_rows("gather_bwd", bwd, bwd_bytes, copy_gbs, shape, dtype, dev, meta)


def run(device, quick):
    dev = torch.device(device)
    harness.warn_if_interpreting(dev)
    from ..ops import gather as G

    meta = harness.metadata(device)
    old_mode = G.get_index_check()
    G.set_index_check("off")
    try:
        for case in _cases(device, quick):
            yield from _case_rows(case, dev, meta)
    finally:
        G.set_index_check(old_mode)


def main(argv=None):
    return harness.bench_main(run, __doc__.splitlines()[0], argv)


if __name__ == "__main__":
    main()
