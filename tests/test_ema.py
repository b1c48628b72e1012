"""Fused EMA against I-JEPA's per-parameter loop (bitwise in fp32, same op order) and the fp32 formula.

The Triton kernel runs under the interpreter on the CPU (conftest sets TRITON_INTERPRET=1); the "torch"
path is the plain-PyTorch fallback used on the CPU without the interpreter.
"""
import pytest
import torch

from iwm_fast.ops import ema_update_

SIZES = [1, 3, 97, 2047, 2048, 2049, 16384, 16385, 40000]


@pytest.fixture(params=[pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
def path(request):
    # The op's backend on CPU tensors: the Triton kernel under the interpreter (a GPU machine runs the CUDA tests
    # below instead), or auto (PyTorch on the CPU).
    return "triton" if request.param == "triton" else "auto"


def ijepa_loop(targets, onlines, m):
    # I-JEPA's update, written out: for q, k in zip(online, target): k.mul_(m).add_((1 - m) * q.detach())
    for q, k in zip(onlines, targets):
        k.mul_(m).add_((1 - m) * q.detach())


def fp32_formula(t, o, m):
    """fl(fl(t*m) + fl(o*(1-m))) in fp32, rounded once to t's dtype (the documented op order)."""
    return (t.float() * m + o.float() * (1 - m)).to(t.dtype)


def make(sizes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dtype) for n in sizes]


def test_fp32_bitwise_matches_ijepa_loop(path):
    ts, os_ = make(SIZES, torch.float32, 0), make(SIZES, torch.float32, 1)
    ref = [t.clone() for t in ts]
    for m in (0.996, 0.9997, 0.5):  # a changing schedule
        ijepa_loop(ref, os_, m)
        ema_update_(ts, os_, m, backend=path)
    for a, b in zip(ts, ref):
        assert torch.equal(a, b)


def test_large_tensor_over_2_pow_20(path):
    n = (1 << 20) + 13
    ts, os_ = make([n, 5], torch.float32, 2), make([n, 5], torch.float32, 3)
    ref = [t.clone() for t in ts]
    ijepa_loop(ref, os_, 0.998)
    ema_update_(ts, os_, 0.998, backend=path)
    assert all(torch.equal(a, b) for a, b in zip(ts, ref))


@pytest.mark.parametrize("t_dtype,o_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                             (torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_low_precision_and_mixed(path, t_dtype, o_dtype):
    ts, os_ = make(SIZES, t_dtype, 4), make(SIZES, o_dtype, 5)
    ref = [fp32_formula(t, o, 0.99) for t, o in zip(ts, os_)]
    ema_update_(ts, os_, 0.99, backend=path)
    for a, b in zip(ts, ref):
        assert a.dtype == t_dtype
        assert torch.equal(a, b)
    # and the result is as close to the float64 value as one rounding allows
    t64 = [(t.double() * 0.99 + o.double() * 0.01) for t, o in zip(make(SIZES, t_dtype, 4), os_)]
    for a, b in zip(ts, t64):
        torch.testing.assert_close(a.double(), b, rtol=torch.finfo(t_dtype).eps, atol=1e-6)


def test_tensor_momentum_changes_without_host_values(path):
    ts, os_ = make(SIZES, torch.float32, 6), make(SIZES, torch.float32, 7)
    ref = [t.clone() for t in ts]
    m = torch.tensor(0.99)
    for step in range(3):
        m.fill_(0.99 + 0.004 * step)  # updated in place, as a schedule on the device would
        ijepa_loop(ref, os_, m)
        ema_update_(ts, os_, m, backend=path)
    assert all(torch.equal(a, b) for a, b in zip(ts, ref))
    ema_update_(ts, os_, torch.tensor(0.5, dtype=torch.float64), backend=path)  # any float dtype, 0-d
    ijepa_loop(ref, os_, torch.tensor(0.5, dtype=torch.float64).float())
    assert all(torch.equal(a, b) for a, b in zip(ts, ref))


def test_modules_and_dtype_groups_launch_once_each(path, monkeypatch):
    torch.manual_seed(0)
    online = torch.nn.Sequential(*[torch.nn.Linear(24, 24) for _ in range(30)], torch.nn.LayerNorm(24))
    target = torch.nn.Sequential(*[torch.nn.Linear(24, 24) for _ in range(30)], torch.nn.LayerNorm(24))
    target.requires_grad_(False)
    ref = [p.detach().clone() for p in target.parameters()]
    launches = []
    if path == "triton":
        import iwm_fast.kernels.ema as ke
        real = ke.ema_launch
        monkeypatch.setattr(ke, "ema_launch", lambda *a, **k: launches.append(a[1:3]) or real(*a, **k))
    ema_update_(target, online, 0.9, backend=path)
    ijepa_loop(ref, list(online.parameters()), 0.9)
    assert all(torch.equal(p, r) for p, r in zip(target.parameters(), ref))
    if path == "triton":
        assert len(launches) == 1, f"62 fp32 parameters must take one launch, took {len(launches)}"
        launches.clear()
        ts = make([5, 70, 3], torch.float32, 1) + make([9, 4000], torch.bfloat16, 2)
        ema_update_(ts, [t.clone() for t in ts], 0.5, backend=path)
        assert len(launches) == 2  # one per dtype group


def test_unaligned_noncontiguous_and_empty(path):
    g = torch.Generator().manual_seed(8)
    base_t, base_o = torch.randn(3 * 2050, generator=g), torch.randn(3 * 2050, generator=g)
    ts = [base_t[1:2050], base_t[2051:4100].view(-1), torch.randn(37, 19, generator=g).t(), torch.empty(0)]
    os_ = [base_o[1:2050], base_o[2051:4100], torch.randn(19, 37, generator=g), torch.empty(0)]
    ref = [t.clone() for t in ts]
    ijepa_loop(ref, os_, 0.97)
    ema_update_(ts, os_, 0.97, backend=path)
    assert all(torch.equal(a, b) for a, b in zip(ts, ref))


def test_bad_inputs_raise_clear_errors():
    a, b = make([3, 4], torch.float32, 0), make([3, 4], torch.float32, 1)
    with pytest.raises(ValueError, match="target has 2 parameters but online has 1"):
        ema_update_(a, b[:1], 0.9)
    with pytest.raises(ValueError, match=r"shape mismatch: target\[1\] is \(4,\) but online\[1\] is \(5,\)"):
        ema_update_(a, [b[0], torch.randn(5)], 0.9)
    with pytest.raises(ValueError, match="shape mismatch"):
        ema_update_(torch.nn.Linear(3, 4), torch.nn.Linear(3, 5), 0.9)
    with pytest.raises(TypeError, match="floating point"):
        ema_update_([torch.zeros(3, dtype=torch.long)], [torch.zeros(3, dtype=torch.long)], 0.9)
    with pytest.raises(ValueError, match="one floating-point value"):
        ema_update_(a, b, torch.tensor([0.9, 0.9]))
    with pytest.raises(TypeError, match="momentum must be"):
        ema_update_(a, b, "0.9")
    with pytest.raises(TypeError, match="not a tensor"):
        ema_update_(a, [b[0], 3.0], 0.9)


def test_torch_compile_no_recompile_on_momentum(path):
    torch._dynamo.reset()
    ts, os_ = make([5, 300], torch.float32, 9), make([5, 300], torch.float32, 10)
    ref = [t.clone() for t in ts]
    frames = []

    def backend(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    step = torch.compile(lambda t, o, m: ema_update_(t, o, m, backend=path), backend=backend, fullgraph=True)
    m = torch.tensor(0.9)
    for v in (0.9, 0.95, 0.99):
        m.fill_(v)
        step(ts, os_, m)
        ijepa_loop(ref, os_, m)
    assert len(frames) == 1, "a changing momentum tensor must not recompile"
    assert all(torch.equal(a, b) for a, b in zip(ts, ref))


@pytest.mark.parametrize("m", [float("nan"), 1.5, -1.0, float("inf")])
def test_momentum_out_of_range_is_refused(m):
    t, o = [torch.zeros(3)], [torch.ones(3)]
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        ema_update_(t, o, m)
    assert torch.equal(t[0], torch.zeros(3))


@pytest.mark.cuda
@pytest.mark.parametrize("t_dtype,o_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.float32, torch.bfloat16)])
def test_cuda_kernel_matches_the_formula(t_dtype, o_dtype):
    # The compiled kernel: fp32 bitwise equal to I-JEPA's loop, bf16 targets to the fp32 formula rounded once.
    ts = [t.cuda() for t in make(SIZES, t_dtype, 11)]
    os_ = [o.cuda() for o in make(SIZES, o_dtype, 12)]
    ref = [t.clone() for t in ts]
    for m in (0.996, torch.tensor(0.9997, device="cuda")):
        if t_dtype == o_dtype == torch.float32:
            ijepa_loop(ref, os_, m)
        else:
            ref = [fp32_formula(t, o, m) for t, o in zip(ref, os_)]
        ema_update_(ts, os_, m)
        assert all(torch.equal(a, b) for a, b in zip(ts, ref))


def _pair_of_models():
    torch.manual_seed(3)
    make = lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))  # noqa: E731
    return make().requires_grad_(False), make()


def _updated_like_the_loop(target, online, path, m=0.9):
    ref = [p.detach().clone() for p in target.parameters()]
    ijepa_loop(ref, [p.detach() for p in online.parameters()], m)
    ema_update_(target, online, m, backend=path)
    return all(torch.equal(p, r) for p, r in zip(target.parameters(), ref))


def _move_parameters_around(path, builds):
    """Updates a pair of models before and after each way their parameters can move; returns the plan's key."""
    t, o = _pair_of_models()
    assert _updated_like_the_loop(t, o, path) and _updated_like_the_loop(t, o, path)
    assert len(builds) == 1, "an unchanged pair of models reuses its plan"
    changes = [
        lambda: setattr(t[0].weight, "data", torch.randn(8, 8)),  # new storage under the same Parameter
        lambda: setattr(o[1], "bias", torch.nn.Parameter(torch.randn(8))),  # a Parameter assigned anew
        lambda: t[0]._parameters.__setitem__("bias", torch.nn.Parameter(torch.randn(8))),  # a slot written
        lambda: (t.append(torch.nn.Linear(8, 3)), o.append(torch.nn.Linear(8, 3))),  # a layer added
        lambda: (t.double(), o.double()),  # converted in place (each param.data swapped)
    ]
    for i, change in enumerate(changes):
        change()
        assert _updated_like_the_loop(t, o, path), f"change {i}: the update used a stale plan"
        assert len(builds) == 2 + i, f"change {i} did not rebuild the plan"
    return id(t), id(o), path


def test_plan_is_reused_and_rebuilt_whenever_the_parameters_move(path, monkeypatch):
    import gc

    from iwm_fast.ops import ema as ema_module
    from iwm_fast.ops import ema_plan

    builds = []
    real = ema_module._Work.__init__
    monkeypatch.setattr(ema_module._Work, "__init__", lambda self, *a: builds.append(1) or real(self, *a))
    key = _move_parameters_around(path, builds)
    gc.collect()
    assert key not in ema_plan._MODULE_PLANS, "the plan (and the parameters it holds) goes with the models"


def test_plan_for_tensor_lists_follows_their_storage(path):
    ts, os_ = make([5, 300], torch.float32, 13), make([5, 300], torch.float32, 14)
    ref = [t.clone() for t in ts]
    for step in range(3):
        if step == 2:
            ts[1].data = torch.randn(300)  # same list, same tensor objects, new storage
            ref[1] = ts[1].clone()
        ijepa_loop(ref, os_, 0.8)
        ema_update_(ts, os_, 0.8, backend=path)
        assert all(torch.equal(a, b) for a, b in zip(ts, ref)), step
