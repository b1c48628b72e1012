"""The training engine end to end on the CPU: loss goes down, runs repeat, resume, atomic saves, NaN guard, FSDP2."""
import csv
import os
import subprocess
import sys

import pytest
import torch

from iwm_fast.train import checkpoint as ckpt
from iwm_fast.config import load_config
from iwm_fast.train.guard import NonFiniteLossError
from iwm_fast.train.loop import train

# ViT-tiny on 24-pixel digits with patch 4: a 6x6 grid, small enough for many CPU steps.
TINY = ["model.size=tiny", "model.depth=0", "model.patch_size=4", "data.image_size=24", "data.num_workers=0",
        "predictor.depth=1", "predictor.width=48", "masks.min_keep=2", "masks.num_targets=2",
        "train.batch_size=8", "train.warmup_steps=5", "train.lr=5e-4", "train.log_every=1000",
        "train.device=cpu", "eval.enabled=false"]


@pytest.fixture(autouse=True)
def plain_pytorch_ops(monkeypatch):
    # The engine's logic is under test here, not the kernels (their own tests run them under the interpreter):
    # the interpreter would make these hundreds of steps take many minutes.
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def tiny_cfg(out_dir, *extra):
    return load_config("configs/demo_cpu.yaml", TINY + [f"train.out_dir={out_dir}", *extra])


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_fifty_steps_lower_the_loss_and_repeat(tmp_path):
    a = train(tiny_cfg(tmp_path / "a", "train.steps=50", "train.checkpoint_every=50"))
    curve = losses(a)
    assert len(curve) == 50
    assert sum(curve[-10:]) / 10 < 0.8 * sum(curve[:5]) / 5
    b = train(tiny_cfg(tmp_path / "b", "train.steps=50", "train.checkpoint_every=50", "train.seed=0"))
    assert losses(b) == curve  # same seed, same curve, bit for bit
    assert os.path.exists(os.path.join(a, "target_encoder.pt"))
    from iwm_fast.models import vit_tiny
    vit_tiny(img_size=24, patch_size=4).load_state_dict(torch.load(os.path.join(a, "target_encoder.pt")),
                                                        strict=True)


def _final_state(run_dir):
    from iwm_fast.models import build_iwm
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    model = build_iwm(cfg)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints")), model)
    return model.state_dict()


def test_resume_is_bit_identical(tmp_path):
    steps = ["train.steps=6", "train.checkpoint_every=3", "train.keep_checkpoints=5"]
    full = train(tiny_cfg(tmp_path / "full", *steps))
    part = tmp_path / "part"
    train(tiny_cfg(part, *steps), max_steps=4)  # "killed" after step 4: the last checkpoint is step 3
    assert ckpt.latest_checkpoint(part / "checkpoints").endswith("step_00000003")
    train(tiny_cfg(part, *steps))
    assert losses(part) == losses(full)  # the CSV keeps each step once: 1-3 from before the kill, 4-6 after
    want, got = _final_state(full), _final_state(part)
    assert all(torch.equal(want[k], got[k]) for k in want)
    train(tiny_cfg(part, *steps))  # a finished run is not trained again
    assert losses(part) == losses(full)


def test_killed_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(tiny_cfg(run, "train.steps=4", "train.checkpoint_every=2"), max_steps=2)
    good = ckpt.latest_checkpoint(run / "checkpoints")
    assert good.endswith("step_00000002")

    def dies_midway(state, checkpoint_id):
        with open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb") as f:
            f.write(b"half a shard")
        raise KeyboardInterrupt("killed during save")

    real_save = ckpt.dcp.save
    monkeypatch.setattr(ckpt.dcp, "save", dies_midway)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_cfg(run, "train.steps=4", "train.checkpoint_every=2"))
    assert ckpt.latest_checkpoint(run / "checkpoints") == good
    monkeypatch.setattr(ckpt.dcp, "save", real_save)
    train(tiny_cfg(run, "train.steps=4", "train.checkpoint_every=2"))  # resumes from step 2, finishes
    assert ckpt.latest_checkpoint(run / "checkpoints").endswith("step_00000004")


def test_nan_guard_skips_then_stops(tmp_path):
    def nan_at(bad):
        return lambda step, loss: loss * float("nan") if step in bad else loss

    run = train(tiny_cfg(tmp_path / "one", "train.steps=4", "train.checkpoint_every=2"), loss_hook=nan_at({1}))
    with open(os.path.join(run, "metrics.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [r["nonfinite"] for r in rows] == ["0", "1", "0", "0"]
    assert ckpt.latest_checkpoint(os.path.join(run, "checkpoints")).endswith("step_00000004")

    stop = tmp_path / "stop"
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps"):
        train(tiny_cfg(stop, "train.steps=8", "train.checkpoint_every=2", "train.max_bad_steps=3"),
              loss_hook=nan_at({2, 3, 4}))
    assert ckpt.latest_checkpoint(stop / "checkpoints").endswith("step_00000002")


def _cli(args, nproc):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "0"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "iwm_fast.train.cli"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--standalone", "-m", "iwm_fast.train.cli"]
    out = subprocess.run(cmd + args, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def test_fsdp_two_processes_match_one(tmp_path):
    args = ["configs/demo_cpu.yaml", *TINY, "train.steps=5", "train.checkpoint_every=5"]
    _cli(args + [f"train.out_dir={tmp_path / 'w1'}"], 1)
    _cli(args + [f"train.out_dir={tmp_path / 'w2'}"], 2)
    one, two = losses(tmp_path / "w1"), losses(tmp_path / "w2")
    assert len(one) == len(two) == 5
    for a, b in zip(one, two):
        assert abs(a - b) <= 1e-5 * abs(a)


def test_accumulation_and_activation_checkpointing_keep_the_numbers(tmp_path):
    base = losses(train(tiny_cfg(tmp_path / "base", "train.steps=3", "train.checkpoint_every=3")))
    accum = losses(train(tiny_cfg(tmp_path / "accum", "train.steps=3", "train.checkpoint_every=3",
                                  "train.accum_steps=2")))
    ac = losses(train(tiny_cfg(tmp_path / "ac", "train.steps=3", "train.checkpoint_every=3",
                               "train.activation_checkpointing=true")))
    assert ac == base  # recomputation in backward changes nothing
    for a, b in zip(accum, base):  # two half-batches average to the full batch, up to rounding
        assert abs(a - b) <= 1e-5 * abs(b)


def test_iwm_eval_on_a_run_directory(tmp_path):
    import json

    from iwm_fast.train.cli import eval_main
    run = train(tiny_cfg(tmp_path / "run", "train.steps=2", "train.checkpoint_every=2"))
    assert eval_main([str(run), "eval.num_queries=4", "eval.bank_size=8", "eval.probe_epochs=5",
                      "eval.max_train_images=64"]) == 0
    with open(os.path.join(run, "eval.json")) as f:
        results = json.load(f)
    for key in ("probe_acc", "probe_acc_random", "mrr", "mrr_chance"):
        assert 0.0 <= results[key] <= 1.0
    assert os.path.getsize(os.path.join(run, "loss_curve.png")) > 0
    with pytest.raises(SystemExit):
        eval_main([str(tmp_path / "nowhere")])


def test_profile_writes_trace_and_kernel_table(tmp_path):
    import json

    run = train(tiny_cfg(tmp_path / "prof", "train.steps=6", "train.checkpoint_every=6", "profile=true"))
    with open(os.path.join(run, "profile_trace.json")) as f:
        assert json.load(f)["traceEvents"]
    with open(os.path.join(run, "profile_kernels.txt")) as f:
        table = f.read()
    assert "aten::" in table and "Self CPU" in table


def test_ijepa_mode_with_clipping_trains(tmp_path):
    run = train(tiny_cfg(tmp_path / "ijepa", "train.steps=4", "train.checkpoint_every=4", "train.grad_clip=1.0",
                         "predictor.conditioning=none", "predictor.target_mode=per_block", "train.loss=smooth_l1"))
    curve = losses(run)
    assert len(curve) == 4 and all(c == c for c in curve)
    from iwm_fast.config import load_config as load
    saved = load(os.path.join(run, "config.yaml"))  # the resolved config is saved with the run
    assert saved.predictor.conditioning == "none" and saved.train.grad_clip == 1.0


def _tiny_flop_model(target_mode):
    from iwm_fast.models import IWM, IWMPredictor, VisionTransformer
    enc = VisionTransformer(img_size=8, patch_size=4, embed_dim=8, depth=1, num_heads=2)  # N = 4 tokens
    return IWM(enc, IWMPredictor(enc.grid, 8, 4, depth=1, num_heads=2, conditioning="none",
                                 target_mode=target_mode))


def test_flop_estimate_matches_hand_count(monkeypatch):
    walks = []
    real_modules = torch.nn.Module.modules
    monkeypatch.setattr(torch.nn.Module, "modules", lambda self: walks.append(1) or real_modules(self))
    lin_enc = 8 * 24 + 8 * 8 + 8 * 32 + 32 * 8          # qkv, proj, fc1, fc2 weights
    lin_pred = 8 * 4 + 4 * 12 + 4 * 4 + 4 * 16 + 16 * 4 + 4 * 8  # embed, blocks, proj
    nc, m, nt = 2, 3, 1
    for mode, seqs, length in (("union", 1, nc + m * nt), ("per_block", m, nc + nt)):
        model = _tiny_flop_model(mode)
        want = (2 * lin_enc * 4 + 4 * 16 * 8) + 3 * (
            2 * lin_enc * nc + 4 * nc ** 2 * 8 + 2 * lin_pred * seqs * length + 4 * seqs * length ** 2 * 4)
        walks.clear()
        assert model.flops_per_image(nc, (m, nt)) == want
        assert model.flops_per_image(nc, (m, nt)) == want  # the cached value
        model.flops_per_image(nc + 1, (m, nt))
        assert len(walks) == 3  # the target encoder, encoder and predictor are walked once, at the first call


def _walked_step_flops(model, batch, num_ctx, pred_seqs, pred_seq_len):
    """The MFU's FLOP count as it was computed before the model counted its own: walking the modules per call."""
    def linear(module, tokens):
        return 2 * sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear)) * tokens
    enc, pred = model.encoder, model.predictor
    N, D, Dp = enc.num_patches, enc.embed_dim, pred.predictor_embed.out_features
    depth, pdepth = len(enc.blocks), len(pred.predictor_blocks)
    target = linear(model.target_encoder, batch * N) + depth * 4 * batch * N * N * D
    context = linear(enc, batch * num_ctx) + depth * 4 * batch * num_ctx ** 2 * D
    predictor = linear(pred, pred_seqs * pred_seq_len) + pdepth * 4 * pred_seqs * pred_seq_len ** 2 * Dp
    return target + 3 * (context + predictor)


@pytest.mark.parametrize("mode", ["union", "per_block"])
def test_mfu_column_is_unchanged_by_the_cached_flop_count(mode):
    from iwm_fast.train.log_window import LogWindow

    model, world, peak, elapsed = _tiny_flop_model(mode), 2, 7.5e12, 0.37
    window = LogWindow(logger=None, bar=None, guard=None, device=torch.device("cpu"), world_size=world,
                       peak_flops=peak, model=model)
    steps = [(8, 2, (3, 1)), (8, 3, (3, 1)), (5, 2, (2, 2)), (8, 2, (3, 1))]  # images, context tokens, targets
    for i, (images, nc, tgt_shape) in enumerate(steps):
        window.add(i + 1, None, None, {}, images=images, data_s=0.0, ctx_tokens=nc, tgt_shape=tgt_shape)
    flops = 0.0
    for images, nc, (m, nt) in steps:
        n_img = images * world
        if mode == "per_block":
            flops += _walked_step_flops(model, n_img, nc, n_img * m, nc + nt)
        else:
            flops += _walked_step_flops(model, n_img, nc, n_img, nc + m * nt)
    assert window._mfu(elapsed) == flops / elapsed / (peak * world)


def test_resuming_with_another_model_is_refused(tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(run, "train.steps=2", "train.checkpoint_every=1"), max_steps=1)
    with pytest.raises(ValueError, match="model: .*different run|different run.*model"):
        train(tiny_cfg(run, "train.steps=2", "train.checkpoint_every=1", "model.depth=2"))
    train(tiny_cfg(run, "train.steps=3", "train.checkpoint_every=1"))  # more steps is a continuation
    assert ckpt.latest_checkpoint(run / "checkpoints").endswith("step_00000003")


def test_eval_of_a_folder_run_decodes_only_its_subset(tmp_path, monkeypatch):
    import numpy as np
    from PIL import Image

    from iwm_fast.train.evaluate import eval_splits
    root = tmp_path / "imgs"
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(20):
            Image.fromarray(np.full((24, 24, 3), 40 * c + i, np.uint8)).save(root / f"class{c}" / f"{i}.png")
    cfg = tiny_cfg(tmp_path / "run", "data.dataset=imagefolder", f"data.root={root}", "eval.max_train_images=10")
    from iwm_fast import data
    read = []
    original = data.ImageFolder.__getitem__
    monkeypatch.setattr(data.ImageFolder, "__getitem__", lambda self, k: read.append(k) or original(self, k))
    (xtr, ytr), (xva, yva) = eval_splits(cfg)
    assert len(read) == 10 and len(set(read)) == 10
    assert xtr.shape == (8, 3, 24, 24) and xva.shape == (2, 3, 24, 24)
