"""CPU smoke tests of the benchmark suite: the runner's files, its handling of missing or failing benchmarks,
and the end-to-end configurations as Backends values of the engine's own step."""
import csv
import os
import sys
import types

import pytest
import torch

from iwm_fast.bench import e2e, harness
from iwm_fast.bench import run as bench_run


def _read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.fixture
def tiny_e2e(monkeypatch):
    """The e2e benchmark cut to one tiny case and one step per phase, so the whole runner takes seconds."""
    monkeypatch.setattr(e2e, "CPU_CASES", [e2e.Case("vit_tiny8", "tiny", 8, "iwm-equi", 2, img=96, tiny=True)])
    monkeypatch.setattr(e2e, "steps", lambda device, quick: e2e.Steps(warmup=1, windows=1, window=1, breakdown=1))


def test_runner_writes_csv_summary_and_plots(tmp_path, tiny_e2e):
    out = tmp_path / "res"
    rc = bench_run.main(["--device", "cpu", "--quick", "--no-isolate", "--only", "masks,e2e", "--out", str(out)])
    assert rc == 0
    files = sorted(os.listdir(out))
    stem = bench_run.file_stem(harness.metadata("cpu"), "cpu", True)
    assert f"{stem}.csv" in files and f"{stem}_summary.md" in files
    assert f"{stem}_speedup.png" in files and f"{stem}_e2e.png" in files
    for png in (f"{stem}_speedup.png", f"{stem}_e2e.png"):
        with open(out / png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    cols, rows = _read_csv(out / f"{stem}.csv")
    assert cols == harness.COLUMNS
    e2e_rows = [r for r in rows if r["kernel"] == "e2e"]
    configs = {r["provider"] for r in e2e_rows}
    assert configs == set(e2e.CONFIGS)
    for r in rows:
        med, p20, p80 = float(r["median"]), float(r["p20"]), float(r["p80"])
        assert r["gpu"] == "cpu" and r["torch"] == torch.__version__ and r["date"] and r["commit"]
        if r["metric"] != "peak_mem_gib":  # NaN on the CPU
            assert med == med and med >= 0
            assert min(p20, p80) <= med <= max(p20, p80) + 1e-9
    ips = {r["provider"]: float(r["median"]) for r in e2e_rows if r["metric"] == "images_per_s"}
    steps = {r["provider"]: float(r["median"]) for r in e2e_rows if r["metric"] == "step_ms"}
    for k in ips:  # images/s is the batch over the median step time
        assert ips[k] == pytest.approx(2 / (steps[k] * 1e-3), rel=1e-6)
    phases = {r["metric"] for r in e2e_rows if r["metric"].startswith("phase_ms:")}
    assert phases == {f"phase_ms:{p}" for p in e2e.PHASES}
    sp = [r for r in e2e_rows if r["metric"] == "speedup_vs_a_ijepa_eager" and r["provider"] == "c_iwm_fast"]
    assert len(sp) == 1 and float(sp[0]["median"]) == pytest.approx(ips["c_iwm_fast"] / ips["a_ijepa_eager"])
    summary = (out / f"{stem}_summary.md").read_text()
    assert "**masks**: ok" in summary and "**e2e**: ok" in summary
    assert "| vit_tiny8/iwm-equi/B2 |" in summary and "(a) eager" in summary
    assert "block_masks" in summary  # the kernel speedup table
    assert "PASS" not in summary and "targets" not in summary.lower()  # measured values and ratios only


def test_runner_reports_missing_and_failing_benchmarks(tmp_path, monkeypatch):
    boom = types.ModuleType("iwm_fast.bench.boom")

    def explode(device, quick):
        raise RuntimeError("kernel exploded")

    boom.run = explode
    bad = types.ModuleType("iwm_fast.bench.bad")
    bad.run = lambda device, quick: [{"kernel": "x"}, harness.row("k", "p", "s", torch.float32, "ms", (1, 1, 1),
                                                                  harness.metadata("cpu"))]
    monkeypatch.setitem(sys.modules, "iwm_fast.bench.boom", boom)
    monkeypatch.setitem(sys.modules, "iwm_fast.bench.bad", bad)
    monkeypatch.setattr(bench_run, "BENCHMARKS", ("boom", "bad", "not_written_yet"))
    rc = bench_run.main(["--device", "cpu", "--quick", "--no-isolate", "--no-plots", "--out", str(tmp_path)])
    assert rc == 1  # a benchmark failed
    stem = bench_run.file_stem(harness.metadata("cpu"), "cpu", True)
    summary = (tmp_path / f"{stem}_summary.md").read_text()
    assert "**boom**: FAILED" in summary and "RuntimeError: kernel exploded" in summary
    assert "**not_written_yet**: skipped: iwm_fast.bench.not_written_yet module not found" in summary
    assert "**bad**: ok: 1 rows" in summary and "dropped 1 malformed rows" in summary
    _, rows = _read_csv(tmp_path / f"{stem}.csv")
    assert [r["kernel"] for r in rows] == ["k"]


def test_runner_rejects_unknown_names(tmp_path):
    with pytest.raises(SystemExit):
        bench_run.main(["--device", "cpu", "--only", "attention,nope", "--out", str(tmp_path)])


def test_rows_reach_the_csv_as_they_are_measured(tmp_path, monkeypatch):
    # A benchmark that dies after its first row (as one stopped from outside would) still leaves that row.
    meta = harness.metadata("cpu")

    def first_row_then_crash(device, quick):
        yield harness.row("k", "p", "first", torch.float32, "ms", (1.0, 1.0, 1.0), meta)
        assert (tmp_path / "x.csv").read_text().count("first") == 1  # on disk before the next row is made
        raise RuntimeError("died after one row")

    dying = types.ModuleType("iwm_fast.bench.dying")
    dying.run = first_row_then_crash
    monkeypatch.setitem(sys.modules, "iwm_fast.bench.dying", dying)
    res = bench_run.run_in_process("dying", "cpu", True, str(tmp_path / "x.csv"))
    assert res["status"].startswith("FAILED") and "died after one row" in res["status"] and res["rows"] == 1
    _, rows = _read_csv(tmp_path / "x.csv")
    assert [r["shape"] for r in rows] == ["first"]


def test_isolated_child_reports_missing_module(tmp_path):
    res = bench_run.run_isolated("not_a_benchmark", "cpu", True, str(tmp_path / "x.csv"))
    assert res["rows"] == 0 and res["status"] == "skipped: iwm_fast.bench.not_a_benchmark module not found"


def test_gather_traffic_counts_the_positional_table_once():
    from iwm_fast.bench.gather import traffic_bytes

    with_pos = traffic_bytes(B=128, N=256, D=1280, K=128, M=1, with_pos=True, expanded=False, element_size=2)
    without = traffic_bytes(B=128, N=256, D=1280, K=128, M=1, with_pos=False, expanded=False, element_size=2)
    assert with_pos[0] - without[0] == 256 * 1280 * 2  # one [N, D] table, not one row of it per gathered token
    assert without[0] == 2 * 128 * 128 * 1280 * 2 + 128 * 128 * 8  # rows read + written, indices read
    assert with_pos[1] == without[1] == (128 * 128 * 1280 + 128 * 256 * 1280) * 2


@pytest.mark.parametrize("name,tag", [("NVIDIA H200", "H200"), ("NVIDIA H100 80GB HBM3", "H100-80GB-HBM3"),
                                      ("NVIDIA A100-SXM4-80GB", "A100-SXM4-80GB")])
def test_file_names_carry_date_and_gpu(name, tag):
    assert bench_run.gpu_tag(name) == tag
    meta = {"gpu": name, "date": "2026-11-29"}
    assert bench_run.file_stem(meta, "cuda", True) == f"2026-11-29_{tag}_quick"
    assert bench_run.file_stem(meta, "cuda", False) == f"2026-11-29_{tag}"


# ---- the configurations are Backends values of the engine's own step -----------------------------------


def test_ijepa_loop_masks_follow_the_collator_rules():
    from iwm_fast.masks.ijepa_loop import ijepa_loop_masks

    H = W = 14
    ctx, tgt = ijepa_loop_masks(8, (H, W), seed=3, step=5)
    B, M, Nt = tgt.shape
    assert (B, M) == (8, 4) and ctx.shape[0] == 8 and ctx.dtype == tgt.dtype == torch.int64
    assert Nt > 10 and ctx.shape[1] > 10
    for b in range(B):
        assert torch.all(ctx[b][1:] > ctx[b][:-1])  # ascending, no duplicates
        assert not set(ctx[b].tolist()) & set(tgt[b].flatten().tolist())  # context avoids the targets
        assert 0 <= int(tgt[b].min()) and int(tgt[b].max()) < H * W
    again = ijepa_loop_masks(8, (H, W), seed=3, step=5)
    assert torch.equal(again[0], ctx) and torch.equal(again[1], tgt)


@pytest.mark.parametrize("mode", ["iwm-equi", "ijepa"])
def test_every_configuration_gives_the_same_loss(mode):
    """(a)-(d) differ only in Backends: the same model (same seed) gives the same loss under each."""
    from iwm_fast.masks.ijepa_loop import ijepa_loop_masks
    from iwm_fast.models import build_iwm
    from iwm_fast.transforms import ACTION_DIM

    case = e2e.Case("vit_tiny8", "tiny", 8, mode, 2, img=96, tiny=True)
    g = torch.Generator().manual_seed(4)
    src, tgt_img = (torch.randn(2, 3, 96, 96, generator=g, dtype=torch.float64) for _ in range(2))
    action = torch.randn(2, ACTION_DIM, generator=g, dtype=torch.float64)
    ref = None
    for name, config in e2e.CONFIGS.items():
        cfg = e2e.case_config(case, config)
        model = build_iwm(cfg, config.backends).double()
        ctx, tgt = ijepa_loop_masks(2, model.encoder.grid, seed=0, step=0, min_keep=4)
        loss = model(src, tgt_img, ctx, tgt, action)
        ref = loss if ref is None else ref
        torch.testing.assert_close(loss, ref, msg=name)


def test_eager_attention_backend_is_really_used(monkeypatch):
    import importlib

    from iwm_fast.models import build_iwm

    attn_ops = importlib.import_module("iwm_fast.ops.attention")  # the module, not the function it exports
    calls = []
    real = attn_ops._run_eager
    monkeypatch.setitem(attn_ops._RUNNERS, "eager", lambda *a: calls.append(1) or real(*a))
    config = e2e.CONFIGS["a_ijepa_eager"]
    model = build_iwm(e2e.case_config(e2e.Case("vit_tiny8", "tiny", 8, "ijepa", 2, img=96, tiny=True), config),
                      config.backends)
    model.encoder(torch.randn(2, 3, 96, 96))
    assert len(calls) == len(model.encoder.blocks)


def test_e2e_times_the_engines_step(monkeypatch):
    """The benchmark's step is iwm_fast.train.step.train_step on the model build_training makes."""
    from iwm_fast.train import build, step

    seen = {}
    real_step, real_build = step.train_step, build.build_training
    monkeypatch.setattr(step, "train_step", lambda *a, **k: seen.setdefault("step", True) and real_step(*a, **k))
    monkeypatch.setattr(build, "build_training",
                        lambda *a, **k: seen.setdefault("build", True) and real_build(*a, **k))
    case = e2e.Case("vit_tiny8", "tiny", 8, "iwm-equi", 2, img=96, tiny=True)
    m = e2e.measure(case, e2e.CONFIGS["c_iwm_fast"], "cpu", e2e.Steps(1, 1, 1, 1))
    assert seen == {"step": True, "build": True}
    assert m["loss"] == m["loss"] and set(m["phases"]) == set(e2e.PHASES)


def test_the_step_marks_every_phase_in_order_without_timing_code_in_the_model():
    """The model's phases come from hooks installed for the timed step only: marks in step order, none left."""
    import inspect

    from iwm_fast.models import IWM

    class Recorder:
        enabled = True

        def __init__(self):
            self.names = []

        def mark(self, name):
            self.names.append(name)

    assert "timer" not in inspect.signature(IWM.forward).parameters
    case = e2e.Case("vit_tiny8", "tiny", 8, "iwm-equi", 2, img=96, tiny=True)
    stepper = e2e.Stepper(case, e2e.CONFIGS["c_iwm_fast"], "cpu", total_steps=1)
    model = stepper.run.model

    def hooks():
        return [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in (model, model.encoder)]

    before = hooks()
    timer = Recorder()
    stepper.step(0, timer)
    assert timer.names == ["start", "data", "target_encoder", "context_fwd", "predictor_fwd", "predictor_bwd",
                           "context_bwd", "optimizer", "ema"]
    assert timer.names[1:] == list(e2e.PHASES)
    assert hooks() == before  # removed after the timed step
    stepper.step(1, None)
    assert len(timer.names) == 9


def test_attention_quick_set_rows_on_the_model_views(monkeypatch):
    from iwm_fast.bench import attention as bench_attention

    monkeypatch.setattr(bench_attention, "GOALS", [("vit_h14_256", None, (1, 1, 9, 80))])
    monkeypatch.setattr(bench_attention, "AB", [a for a in bench_attention.AB if a[0] == "vit_h14_256"])
    monkeypatch.setattr(bench_attention, "LAYER_SHAPES", ("vit_h14_256",))
    monkeypatch.setattr(bench_attention, "_compile_ahead", lambda *a: None)  # the interpreter compiles nothing
    rows = list(bench_attention.run("cpu", quick=True))
    by = {(r["kernel"], r["provider"], r["metric"]): r for r in rows}
    assert ("attention", "triton", "speedup_vs_best_sdpa") in by and ("attention", "triton", "tflops_fwdbwd") in by
    assert ("attention_layer", "triton", "speedup_vs_best_sdpa") in by
    for label in ("warps8", "padded_d", "autotuned"):  # each A/B switch timed against the pinned tiles
        ratio = by[("attention", f"triton[{label}]", "speedup_vs_pinned")]
        assert 0 < ratio["p20"] and 0 < ratio["median"] and 0 < ratio["p80"]
    assert not any(k.startswith("IWM_FAST_ATTN") for k in os.environ)  # the switches are put back


def test_attention_inputs_are_the_layers_views():
    from iwm_fast.bench.attention import model_inputs
    from iwm_fast.ops.attention import split_qkv

    qkv, (q, k, v), do = model_inputs(2, 3, 5, 8, torch.float32, "cpu")
    assert qkv.shape == (2, 5, 3, 3, 8) and all(t._base is qkv for t in (q, k, v))
    assert [t.shape for t in split_qkv(qkv)] == [q.shape] * 3 and do.shape == (2, 3, 5, 8)
    assert not q.is_contiguous() and do.stride(1) == 8  # [B, N, H, D] memory, as the projection leaves it


def test_compile_ahead_covers_every_tile_choice_the_autotuned_row_may_pick():
    from iwm_fast.bench import attention as bench_attention
    from iwm_fast.bench import warm
    from iwm_fast.kernels import attention_tiles as T

    goals = {name: gpu for name, gpu, _ in bench_attention.GOALS}
    tasks = warm.tasks(goals, bench_attention.AB, "vit_h14_256", device_is_cuda=True)
    pinned = [t for t in tasks if t[3] == {T.TILES_ENV: "pinned"}]
    assert {t[:3] for t in pinned} >= {(H, N, D) for _, H, N, D in goals.values()}
    picked = {kernel: set() for kernel in T.KERNELS}
    for H, N, D, env in tasks:
        if (H, N, D) == goals["vit_h14_256"][1:] and env[T.TILES_ENV] not in ("pinned", "autotune"):
            for kernel, tiles in T._parse_tiles(env[T.TILES_ENV]).items():
                picked[kernel].add(tiles)
    width = T.space_width(64 + 16)  # D = 80 split
    for kernel in T.KERNELS:
        assert set(T.SPACES[kernel][width]) <= picked[kernel], kernel
