"""What users would otherwise run, written here for the benchmarks, and a switch that puts it into a model.

Two reference implementations of each piece the kernels replace:

* "I-JEPA-style eager" (the official code's choices): attention as an explicit ``softmax(q k^T * scale) v``,
  masks applied with ``torch.gather`` on an index repeated over the feature dim and ``torch.cat`` over blocks,
  the EMA as a Python loop over parameter pairs, and masks sampled on the CPU one sample at a time.
* stock PyTorch best practice: SDPA, ``torch.gather`` on an expanded (not copied) index, ``torch._foreach_lerp_``.

``use_implementation(model, impl)`` swaps them into an ``iwm_fast`` model (every ``Attention``'s ``backend``
and the gather functions the model modules call) for the duration of a ``with`` block, without editing them.
"""
import contextlib
import dataclasses
import math

import torch

# ---- attention ------------------------------------------------------------------------------------------


def naive_attention(q, k, v, scale):
    """softmax(q @ k^T * scale) @ v with the [B, H, N, N] score matrix materialised, as in I-JEPA."""
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    return attn @ v


# ---- masked gathers -------------------------------------------------------------------------------------


def _mask_list(masks):
    if torch.is_tensor(masks):
        return [masks] if masks.dim() == 2 else list(masks.unbind(0))
    return list(masks)


def _with_pos(x, pos):
    if pos is None:
        return x
    pos = pos if pos.dim() == 3 else pos[None]
    return x + pos.to(x.dtype)  # positions added to all N tokens first, as I-JEPA's encoder and predictor do


def gather_cat_apply_masks(x, masks, pos=None):
    """I-JEPA's ``apply_masks``: per mask, ``torch.gather`` on the index repeated D times; ``cat`` along batch."""
    x = _with_pos(x, pos)
    out = []
    for m in _mask_list(masks):
        index = m.unsqueeze(-1).repeat(1, 1, x.size(-1))
        out.append(torch.gather(x, dim=1, index=index))
    return torch.cat(out, dim=0)


def gather_cat_masked_gather(x, idx, pos=None):
    return gather_cat_apply_masks(x, [idx], pos)


def torch_gather_apply_masks(x, masks, pos=None):
    """Stock PyTorch: ``torch.gather`` with an expanded (stride-0) index, positions gathered from [N, D]."""
    D = x.size(-1)
    out = []
    for m in _mask_list(masks):
        g = torch.gather(x, 1, m.unsqueeze(-1).expand(-1, -1, D))
        if pos is not None:
            p = pos if pos.dim() == 3 else pos[None]
            if p.shape[0] == 1:
                g = g + p[0][m].to(g.dtype)
            else:
                g = g + torch.gather(p, 1, m.unsqueeze(-1).expand(-1, -1, D)).to(g.dtype)
        out.append(g)
    return out[0] if len(out) == 1 else torch.cat(out, dim=0)


def torch_gather_masked_gather(x, idx, pos=None):
    return torch_gather_apply_masks(x, [idx], pos)


# ---- EMA ------------------------------------------------------------------------------------------------


def _params(m):
    return list(m.parameters()) if isinstance(m, torch.nn.Module) else list(m)


@torch.no_grad()
def ema_loop_(target, online, momentum):
    """I-JEPA's EMA: one mul_ and one add_ (with a temporary) per parameter pair, in a Python loop."""
    m = float(momentum)
    for p_t, p_o in zip(_params(target), _params(online)):
        p_t.data.mul_(m).add_((1.0 - m) * p_o.detach().data)


@torch.no_grad()
def ema_foreach_(target, online, momentum):
    """Stock PyTorch: one multi-tensor ``lerp_`` over all pairs."""
    torch._foreach_lerp_([p.data for p in _params(target)], [p.data for p in _params(online)],
                         1.0 - float(momentum))


# ---- masks: I-JEPA's per-sample collator algorithm, on the CPU ----------------------------------------


def _block_size(u, scale, aspect, H, W):
    # One uniform sets both the scale and the aspect of every block of this kind in the batch.
    keep = int(H * W * (scale[0] + u * (scale[1] - scale[0])))
    ar = aspect[0] + u * (aspect[1] - aspect[0])
    h, w = int(round(math.sqrt(keep * ar))), int(round(math.sqrt(keep / ar)))
    return min(h, H - 1), min(w, W - 1)  # the official code shrinks sides that reach the grid edge


def _block(g, h, w, H, W, allowed, min_keep, patience=20, max_tries=10_000):
    """A block at a random corner, cut by ``allowed`` masks (one dropped after each ``patience`` failures)."""
    if h * w <= min_keep:
        raise ValueError(f"blocks of {h}x{w} tokens can never keep more than min_keep={min_keep} tokens")
    fails, drop = 0, 0
    for _ in range(max_tries):
        top = int(torch.randint(0, H - h, (1,), generator=g))
        left = int(torch.randint(0, W - w, (1,), generator=g))
        mask = torch.zeros(H, W, dtype=torch.int32)
        mask[top:top + h, left:left + w] = 1
        if allowed is not None:
            for region in allowed[:max(len(allowed) - drop, 0)]:
                mask *= region
        idx = torch.nonzero(mask.flatten()).squeeze(-1)
        if len(idx) > min_keep:
            comp = torch.ones(H, W, dtype=torch.int32)
            comp[top:top + h, left:left + w] = 0
            return idx, comp
        fails += 1
        if fails == patience:
            fails, drop = 0, drop + 1
    raise RuntimeError(f"no {h}x{w} block kept more than min_keep={min_keep} tokens in {max_tries} tries")


def ijepa_masks_cpu(batch_size, grid, *, seed=0, step=0):
    """I-JEPA's per-sample CPU mask algorithm: the mask benchmark's ``ijepa_loop_masks`` when it is there (one
    implementation for both benchmarks), else ``ijepa_masks_cpu_fallback``. Returns (context, targets)."""
    try:
        from .masks import ijepa_loop_masks
    except Exception:  # the mask benchmark missing or broken must not take the e2e baseline down with it
        return ijepa_masks_cpu_fallback(batch_size, grid, seed=seed, step=step)
    return ijepa_loop_masks(batch_size, grid, seed=seed, step=step)


def ijepa_masks_cpu_fallback(batch_size, grid, *, num_targets=4, target_scale=(0.15, 0.2),
                             target_aspect=(0.75, 1.5), context_scale=(0.85, 1.0), min_keep=10, seed=0, step=0):
    """I-JEPA's multi-block collator algorithm, one sample at a time in Python on the CPU.

    Returns ``(context [B, Nc], targets [B, M, Nt])`` int64 CPU tensors; every mask is cut to the batch
    minimum (its first tokens), as in the official collator.
    """
    H, W = grid
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(step))
    u = float(torch.rand(1, generator=g))
    th, tw = _block_size(u, target_scale, target_aspect, H, W)
    u = float(torch.rand(1, generator=g))
    ch, cw = _block_size(u, context_scale, (1.0, 1.0), H, W)
    ctx, tgt = [], []
    for _ in range(batch_size):
        blocks, comps = [], []
        for _ in range(num_targets):
            idx, comp = _block(g, th, tw, H, W, None, min_keep)
            blocks.append(idx)
            comps.append(comp)
        tgt.append(blocks)
        ctx.append(_block(g, ch, cw, H, W, comps, min_keep)[0])
    nt = min(len(b) for blocks in tgt for b in blocks)
    nc = min(len(c) for c in ctx)
    targets = torch.stack([torch.stack([b[:nt] for b in blocks]) for blocks in tgt])
    context = torch.stack([c[:nc] for c in ctx])
    return context, targets


# ---- switching implementations inside a model ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Implementation:
    """One benchmark configuration: which attention, gather, EMA and mask sampler a model step uses."""
    name: str
    label: str
    attention: str       # "naive", or a backend of iwm_fast.ops.attention ("sdpa", "triton", "auto")
    gather: str          # "gather_cat", "torch_gather" or "iwm_fast"
    ema: str             # "loop", "foreach" or "iwm_fast"
    masks: str           # "ijepa_cpu" (sampled in the step), "ijepa_cpu_prefetched" or "device"
    compile: bool = False


IMPLEMENTATIONS = {
    "a_ijepa_eager": Implementation("a_ijepa_eager", "(a) I-JEPA-style eager", "naive", "gather_cat", "loop",
                                    "ijepa_cpu"),
    "b_pytorch_compile": Implementation("b_pytorch_compile", "(b) PyTorch best practice + compile", "sdpa",
                                        "torch_gather", "foreach", "ijepa_cpu_prefetched", compile=True),
    "c_iwm_fast": Implementation("c_iwm_fast", "(c) iwm-fast kernels", "triton", "iwm_fast", "iwm_fast", "device"),
    "d_iwm_fast_compile": Implementation("d_iwm_fast_compile", "(d) iwm-fast kernels + compile", "triton",
                                         "iwm_fast", "iwm_fast", "device", compile=True),
}

_GATHERS = {
    "gather_cat": (gather_cat_apply_masks, gather_cat_masked_gather),
    "torch_gather": (torch_gather_apply_masks, torch_gather_masked_gather),
}


def ema_function(kind):
    if kind == "loop":
        return ema_loop_
    if kind == "foreach":
        return ema_foreach_
    if kind == "iwm_fast":
        from .. import ops
        return ops.ema_update_
    raise ValueError(f"unknown EMA implementation {kind!r}; choose loop, foreach or iwm_fast")


def _attention_modules(model):
    from ..layers.attention import Attention
    return [m for m in model.modules() if isinstance(m, Attention)]


@contextlib.contextmanager
def use_implementation(model, impl):
    """Within the block, ``model``'s attention layers and mask gathers run ``impl``'s implementations.

    Sets every ``iwm_fast.layers.Attention.backend`` and rebinds the gather functions that the model modules
    (vit, predictor, iwm) imported; everything is restored on exit.
    """
    import iwm_fast.layers.attention as attn_mod
    import iwm_fast.models.iwm as iwm_mod
    import iwm_fast.models.predictor as pred_mod
    import iwm_fast.models.vit as vit_mod

    saved_globals = []

    def rebind(module, name, value):
        saved_globals.append((module, name, getattr(module, name)))
        setattr(module, name, value)

    layers = _attention_modules(model)
    saved_backends = [m.backend for m in layers]
    try:
        if impl.attention == "naive":
            fused = attn_mod.attention

            def dispatch(q, k, v, *, scale=None, key_lengths=None, backend="auto"):
                if backend != "naive":
                    return fused(q, k, v, scale=scale, key_lengths=key_lengths, backend=backend)
                if key_lengths is not None:
                    raise ValueError("naive attention takes no key_lengths")
                return naive_attention(q, k, v, q.shape[-1] ** -0.5 if scale is None else scale)

            rebind(attn_mod, "attention", dispatch)
        for m in layers:
            m.backend = impl.attention
        if impl.gather != "iwm_fast":
            if impl.gather not in _GATHERS:
                raise ValueError(f"unknown gather implementation {impl.gather!r}")
            apply_fn, gather_fn = _GATHERS[impl.gather]
            for module in (iwm_mod, pred_mod, vit_mod):
                if hasattr(module, "apply_masks"):
                    rebind(module, "apply_masks", apply_fn)
                if hasattr(module, "masked_gather"):
                    rebind(module, "masked_gather", gather_fn)
        yield impl
    finally:
        for module, name, value in reversed(saved_globals):
            setattr(module, name, value)
        for m, b in zip(layers, saved_backends):
            m.backend = b
