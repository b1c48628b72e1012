"""Every custom op of iwm-fast passes ``torch.library.opcheck`` (schema, fake implementation, autograd
registration, AOT dispatch), with its Triton path (under the interpreter) and its PyTorch path; every public op is
traced by ``torch.compile(fullgraph=True)`` without a graph break."""
import importlib

import pytest
import torch

from iwm_fast import ops
from iwm_fast.masks import _ops as mask_ops

# The modules (iwm_fast.ops exports functions of the same names).
attn_ops, ema_ops, gather_ops = (importlib.import_module(f"iwm_fast.ops.{m}") for m in ("attention", "ema", "gather"))


def _leaf(t):
    return t.detach().clone().requires_grad_(True)


def _attention_fwd():
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 9, 24, generator=g) for _ in range(3))
    return attn_ops.attention_fwd, (_leaf(q), _leaf(k), _leaf(v), 0.2, torch.tensor([7]))


def _attention_bwd():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 9, 24, generator=g) for _ in range(3))
    out, lse = attn_ops.attention_fwd(q, k, v, 0.2, None)
    return attn_ops.attention_bwd, (torch.randn_like(out), q, k, v, out, lse, 0.2, None)


def _gather(triton):
    def make():
        g = torch.Generator().manual_seed(2)
        x = torch.randn(2, 13, 24, generator=g)
        pos = torch.randn(1, 13, 24, generator=g)
        idx = torch.randint(0, 13, (4, 5), generator=g)  # two masks of the batch stacked: rows r read r % 2
        return gather_ops._gather_op, (_leaf(x), idx, _leaf(pos), triton)
    return make


def _scatter(triton):
    def make():
        g = torch.Generator().manual_seed(3)
        return gather_ops._scatter_op, (torch.randn(4, 5, 24, generator=g), torch.randint(0, 13, (4, 5), generator=g),
                                        2, 13, True, torch.float32, triton)
    return make


def _ema(triton):
    def make():
        g = torch.Generator().manual_seed(4)
        targets = [torch.randn(7, 3, generator=g), torch.randn(40, generator=g)]
        onlines = [torch.randn(7, 3, generator=g), torch.randn(40, generator=g)]
        return ema_ops._ema_op, (targets, onlines, torch.tensor(0.9), 0.0, triton)
    return make


def _masks():
    return torch.ops.iwm_fast.sample_block_masks.default, (
        torch.empty(0), 4, [8, 8], 2, 1, [0.15, 0.2], [0.75, 1.5], [0.85, 1.0], [1.0, 1.0], 4, False, 0, 3, 100, 1)


def _attention_qkv_fwd():
    g = torch.Generator().manual_seed(6)
    return attn_ops.attention_qkv_fwd, (_leaf(torch.randn(1, 9, 3, 2, 24, generator=g)), 0.2, torch.tensor([7]))


CASES = {
    "attention_fwd": _attention_fwd, "attention_bwd": _attention_bwd, "attention_qkv_fwd": _attention_qkv_fwd,
    "masked_gather[triton]": _gather(True), "masked_gather[torch]": _gather(False),
    "masked_gather_scatter[triton]": _scatter(True), "masked_gather_scatter[torch]": _scatter(False),
    "ema_update_[triton]": _ema(True), "ema_update_[torch]": _ema(False),
    "sample_block_masks": _masks,
}
# The Triton paths run on CPU tensors here, under the interpreter (the kernels' own tests cover them on a GPU).
ON_CPU_KERNELS = {"attention_fwd", "attention_bwd", "attention_qkv_fwd", "masked_gather[triton]",
                  "masked_gather_scatter[triton]", "ema_update_[triton]"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.interpreter) if n in ON_CPU_KERNELS else n
                                  for n in CASES])
def test_opcheck(name):
    if name == "sample_block_masks" and not mask_ops.HAS_EXT:
        pytest.skip("iwm_fast._C is not built")
    op, args = CASES[name]()
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    if name != "sample_block_masks":  # its output sizes are data-dependent: AOT dispatch needs real values
        utils += ("test_aot_dispatch_dynamic",)
    torch.library.opcheck(op, args, test_utils=utils)


def _compiled_matches(fn, *args):
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), fn(*args), rtol=0, atol=0)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "auto"])
def test_public_ops_compile_without_graph_breaks(backend):
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 2, 9, 24, generator=g) for _ in range(3))
    _compiled_matches(lambda a, b, c: ops.attention(a, b, c, backend=backend if backend == "triton" else "sdpa"),
                      q, k, v)
    x, pos = torch.randn(2, 13, 24, generator=g), torch.randn(13, 24, generator=g)
    masks = torch.randint(0, 13, (3, 2, 5), generator=g)
    _compiled_matches(lambda a, m, p: ops.apply_masks(a, m, pos=p, backend=backend), x, masks, pos)

    def ema(t, o, m):
        t = [p.clone() for p in t]
        ops.ema_update_(t, o, m, backend=backend)
        return t
    _compiled_matches(ema, [torch.randn(7, 3, generator=g)], [torch.randn(7, 3, generator=g)], torch.tensor(0.9))
