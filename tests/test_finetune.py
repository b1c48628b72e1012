"""iwm-finetune on a tiny pretrained run: each protocol, frozen parts stay frozen, a fixed seed repeats bitwise."""
import json
import os

import numpy as np
import pytest
import torch

from iwm_fast.finetune import FinetuneArgs, finetune, run_finetune
from iwm_fast.finetune.cli import main as finetune_main
from iwm_fast.train import checkpoint as ckpt
from iwm_fast.config import load_config
from iwm_fast.train.loop import train

TINY = ["model.size=tiny", "model.depth=1", "model.patch_size=4", "data.image_size=24", "data.num_workers=0",
        "predictor.depth=1", "predictor.width=48", "masks.min_keep=2", "masks.num_targets=2",
        "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1000", "train.device=cpu",
        "eval.enabled=false", "train.steps=2", "train.checkpoint_every=2", "eval.max_train_images=48",
        "eval.probe_epochs=10"]
QUICK = dict(epochs=2, batch_size=16, lr=1e-3)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "run"
    return str(train(load_config("configs/demo_cpu.yaml", TINY + [f"train.out_dir={out}"])))


def fresh(run_dir, tmp_path, name="copy"):
    """A copy of the pretrained run without fine-tuning outputs (a finished fine-tuning would be resumed)."""
    import shutil
    dst = tmp_path / name
    shutil.copytree(run_dir, dst, ignore=shutil.ignore_patterns("finetune_*"))
    return str(dst)


def pretrained_state(run_dir):
    from iwm_fast.models import build_iwm
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    model = build_iwm(cfg)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints")), model)
    return {k: v.clone() for k, v in model.state_dict().items()}


def final_state(net):
    return {k: v.clone() for k, v in ckpt.full_model_state(net).items()}


@pytest.mark.parametrize("protocol", ["predictor", "encoder", "probe"])
def test_each_protocol_writes_its_json(run_dir, protocol):
    res = finetune(run_dir, FinetuneArgs(protocol=protocol, **QUICK))
    with open(os.path.join(run_dir, f"finetune_{protocol}.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(res))
    assert 0.0 <= saved["accuracy"] <= 1.0 and saved["protocol"] == protocol
    assert saved["trainable_params"] > 0 and saved["seconds"] > 0
    if protocol != "probe":
        assert os.path.isfile(os.path.join(run_dir, f"finetune_{protocol}", "metrics.csv"))
        assert ckpt.latest_checkpoint(os.path.join(run_dir, f"finetune_{protocol}", "checkpoints")) is not None


def test_predictor_protocol_keeps_the_encoder_frozen_and_trains_the_predictor(run_dir, tmp_path):
    pre = pretrained_state(run_dir)
    res, net = run_finetune(fresh(run_dir, tmp_path), FinetuneArgs(protocol="predictor", **QUICK, seed=3))
    after = final_state(net)
    enc = {k[len("encoder."):]: v for k, v in after.items() if k.startswith("encoder.")}
    assert enc and all(torch.equal(v, pre[f"target_encoder.{k}"]) for k, v in enc.items())
    pred = {k: v for k, v in after.items() if k.startswith("predictor.")}
    changed = [k for k, v in pred.items() if not torch.equal(v, pre[k])]
    assert "predictor.predictor_embed.weight" in changed
    assert "predictor.predictor_pos_embed" not in changed  # fixed sin-cos stays fixed
    n_pred = sum(v.numel() for k, v in pre.items() if k.startswith("predictor.") and "pos_embed" not in k)
    head = sum(v.numel() for k, v in after.items()
               if k.startswith("head.") and not k.startswith("head.standardize."))  # BatchNorm: buffers only
    assert res["trainable_params"] == n_pred + head


def test_head_statistics_are_recomputed_from_the_current_weights(run_dir, tmp_path):
    """Before each validation the head's BatchNorm holds the mean and variance of the pooled, layer-normed
    features of the first training images under the final weights (not the lagging running averages)."""
    from iwm_fast.finetune.run import _splits

    res, net = run_finetune(fresh(run_dir, tmp_path), FinetuneArgs(protocol="predictor", **QUICK, seed=5))
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    xtr = _splits(cfg)[0][:512]
    pooled = []
    hook = net.head.norm.register_forward_hook(lambda m, i, o: pooled.append(o.detach().double()))
    with torch.no_grad():
        net.eval()
        net(xtr)
    hook.remove()
    feats = pooled[0]
    bn = net.head.standardize
    assert torch.allclose(bn.running_mean.double(), feats.mean(0), rtol=1e-4, atol=1e-6)
    # the mean of per-batch unbiased variances; batches of 16 share the features' mean closely enough
    var_batches = torch.stack([feats[s:s + 16].var(0) for s in range(0, feats.shape[0], 16)]).mean(0)
    assert torch.allclose(bn.running_var.double(), var_batches, rtol=1e-3, atol=1e-9)
    assert float(bn.running_var.max()) < 0.5  # no trace of the initial variance of 1


def test_encoder_protocol_trains_the_encoder(run_dir, tmp_path):
    pre = pretrained_state(run_dir)
    res, net = run_finetune(fresh(run_dir, tmp_path), FinetuneArgs(protocol="encoder", **QUICK, seed=4))
    after = final_state(net)
    assert not torch.equal(after["encoder.blocks.0.attn.qkv.weight"], pre["target_encoder.blocks.0.attn.qkv.weight"])
    assert torch.equal(after["encoder.pos_embed"], pre["target_encoder.pos_embed"])


def test_random_predictor_control_differs_from_pretrained(run_dir, tmp_path):
    pre = pretrained_state(run_dir)
    res, net = run_finetune(fresh(run_dir, tmp_path),
                            FinetuneArgs(protocol="predictor", predictor_init="random", epochs=1, batch_size=16))
    assert os.path.basename(FinetuneArgs(predictor_init="random").name) == "finetune_predictor_random"
    # The control starts elsewhere: its weights after one epoch are not the pretrained ones moved by training
    # (they share no init), and the frozen encoder is still the pretrained one.
    after = final_state(net)
    assert torch.equal(after["encoder.blocks.0.attn.qkv.weight"], pre["target_encoder.blocks.0.attn.qkv.weight"])
    assert 0.0 <= res["accuracy"] <= 1.0


def test_fixed_seed_is_bit_identical(run_dir, tmp_path):
    a_dir, b_dir = fresh(run_dir, tmp_path, "a"), fresh(run_dir, tmp_path, "b")
    ra, na = run_finetune(a_dir, FinetuneArgs(protocol="predictor", **QUICK, seed=7))
    rb, nb = run_finetune(b_dir, FinetuneArgs(protocol="predictor", **QUICK, seed=7))
    sa, sb = final_state(na), final_state(nb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ra["val_accuracy_per_epoch"] == rb["val_accuracy_per_epoch"]


def test_bad_options_exit_2_before_writing(run_dir, tmp_path, capsys):
    for argv in (["--protocol", "encoder", "--predictor-init", "random"], ["--epochs", "0"], ["--lr", "-1"],
                 ["--batch-size", "100000"]):
        with pytest.raises(SystemExit) as e:
            finetune_main([run_dir, *argv])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "error:" in err[-1]
    assert not os.path.exists(os.path.join(run_dir, "finetune_encoder_random"))
    with pytest.raises(SystemExit):
        finetune_main([str(tmp_path / "nowhere")])
    assert "no config.yaml" in capsys.readouterr().err


def test_imagefolder_data(run_dir, tmp_path):
    from PIL import Image
    root = tmp_path / "imgs"
    rng = np.random.default_rng(0)
    for c in range(2):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(20):
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8) // (1 + c)).save(
                root / f"class{c}" / f"{i}.png")
    res, _ = run_finetune(fresh(run_dir, tmp_path), FinetuneArgs(protocol="encoder", epochs=1, batch_size=8,
                                                                 data_root=str(root)))
    assert res["num_classes"] == 2 and res["train_images"] == 32 and res["val_images"] == 8
    assert 0.0 <= res["accuracy"] <= 1.0


def test_study_writes_its_table_and_figure(tmp_path):
    # The study's plumbing on a tiny model (the real study is ~30 minutes and not part of the suite).
    from iwm_fast.study import COLUMNS, main as study_main
    tiny = [t for t in TINY if not t.startswith(("train.steps", "train.checkpoint_every", "eval.enabled",
                                                   "predictor.depth"))]
    assert study_main(["--out", str(tmp_path), "--steps", "2", "--finetune-epochs", "1", "--finetune-batch-size",
                       "16", *tiny, "train.checkpoint_every=2", "eval.num_queries=4", "eval.bank_size=8"]) == 0
    import csv
    with open(tmp_path / "study.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == ["ijepa", "iwm_small", "iwm_large"]
    assert set(rows[0]) == set(COLUMNS) and all(0 <= float(r["mrr"]) <= 1 for r in rows)
    assert (tmp_path / "study.md").read_text().count("\n") == 5
    assert (tmp_path / "study.png").stat().st_size > 0
    assert (tmp_path / "iwm_small" / "world_model.png").stat().st_size > 0
    for r in rows:  # the paper's control: each variant's predictor architecture fine-tuned from random init
        saved = json.loads((tmp_path / r["variant"] / "finetune_predictor_random.json").read_text())
        assert saved["predictor_init"] == "random" and float(r["finetune_predictor_random_acc"]) == saved["accuracy"]
