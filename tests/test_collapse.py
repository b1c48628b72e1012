"""The collapse monitor: RankMe and the feature spread against float64 numpy, the warning on a run that collapses
(and none on a healthy one), the columns across a resume, and the pixel baseline and RankMe of the evaluation."""
import csv
import logging
import os

import numpy as np
import pytest
import torch
from test_engine import TINY
from test_eval import images, tiny_iwm, tiny_vit

from iwm_fast.eval import evaluate, extract_features
from iwm_fast.eval.pixels import pixel_features
from iwm_fast.eval.probe import fit_linear_probe
from iwm_fast.eval.rank import normalized_std, rankme
from iwm_fast.train import checkpoint as ckpt
from iwm_fast.train.collapse import FIELDS, WARN_FRACTION, CollapseMonitor, collapse_stats, first_logged_rank
from iwm_fast.config import load_config
from iwm_fast.train.loop import train


def np_rankme(x):
    """RankMe as Garrido et al. (2023) define it, in float64 numpy."""
    s = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    p = s / s.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


def np_normalized_std(x):
    x = np.asarray(x, dtype=np.float64)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return float(x.std(axis=0).mean())


@pytest.mark.parametrize("shape", [(197, 24), (13, 88), (64, 80), (8, 192)])
def test_rankme_and_std_match_float64_numpy(shape):
    g = torch.Generator().manual_seed(shape[0])
    x = torch.randn(*shape, generator=g) + 0.5  # a common mean, as pooled features have
    assert rankme(x).item() == pytest.approx(np_rankme(x.numpy()), rel=1e-10)
    assert normalized_std(x).item() == pytest.approx(np_normalized_std(x.numpy()), rel=1e-10)


def test_rankme_counts_equal_directions():
    # k orthonormal directions with equal weight: RankMe is k (up to its epsilon); one direction: 1.
    g = torch.Generator().manual_seed(0)
    left, _ = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(24, 24, generator=g, dtype=torch.float64))
    for k in (1, 5, 24):
        x = left[:, :k] @ right[:k]  # rank k, k equal singular values
        assert rankme(x).item() == pytest.approx(k, rel=1e-4)
    same = torch.ones(30, 16) * torch.arange(16.0)
    assert rankme(same).item() == pytest.approx(1.0, rel=1e-4)  # the epsilon adds ~1e-6 per direction
    assert normalized_std(same).item() == pytest.approx(0.0, abs=1e-12)
    assert rankme(torch.zeros(10, 8)).item() == pytest.approx(1.0, rel=1e-4)  # no NaN on all-zero features


def test_collapse_stats_are_nan_not_an_error_on_bad_features():
    good = torch.randn(12, 16, generator=torch.Generator().manual_seed(1))
    bad = good.clone()
    bad[3, 2] = float("nan")
    stats = collapse_stats(bad, good)
    assert stats.dtype == torch.float64 and stats.shape == (len(FIELDS),)
    assert torch.isnan(stats[0]) and torch.isnan(stats[2])
    assert stats[1].item() == pytest.approx(np_rankme(good.numpy()), rel=1e-10)
    assert torch.isnan(collapse_stats(good[:1], good)[0])  # one row has no spread to measure


def test_warning_fires_once_below_the_fraction(caplog):
    monitor = CollapseMonitor(model=None, reference=10.0)
    with caplog.at_level(logging.WARNING, logger="iwm_fast"):
        for step, rank in enumerate([9.0, WARN_FRACTION * 10 + 0.01, 4.0, 3.0, 8.0, 2.0], 1):
            monitor.observe(step, [rank, 1.0, 0.01])
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and warned[0].startswith("step 3: target_rankme 4.00 is below 50% of its first value")
    assert warned[1].startswith("step 6:")  # again only after recovering above the threshold


@pytest.fixture
def plain_pytorch_ops(monkeypatch):
    # As in test_engine: the loop is under test, not the kernels (the interpreter would take many minutes).
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _cfg(out, *extra):
    return load_config("configs/demo_cpu.yaml", TINY + [f"train.out_dir={out}", "train.checkpoint_every=1000",
                                                        *extra])


def _rows(run):
    with open(os.path.join(run, "metrics.csv"), newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture
def warnings_of_run(caplog):
    def run(out, *extra):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="iwm_fast"):
            train(_cfg(out, *extra))
        return [r.getMessage() for r in caplog.records if "target_rankme" in r.getMessage()]
    return run


def test_a_collapsing_run_warns_and_a_healthy_one_does_not(tmp_path, warnings_of_run, plain_pytorch_ops):
    steps = ["train.steps=30", "train.log_every=5"]
    # A predictor without blocks and a 100x learning rate: the loss falls towards 0 while the target
    # features fold onto a single direction.
    collapsing = warnings_of_run(tmp_path / "collapse", *steps, "predictor.depth=0", "train.lr=0.05")
    rows = _rows(tmp_path / "collapse")
    ranks = {int(r["step"]): float(r["target_rankme"]) for r in rows if r["target_rankme"]}
    assert sorted(ranks) == [1, 5, 10, 15, 20, 25, 30]  # step 1 (the reference) and every log step
    assert len(collapsing) == 1 and "below 50% of its first value" in collapsing[0]
    assert ranks[30] < WARN_FRACTION * ranks[1]
    assert float(rows[-1]["loss"]) < 0.1 * float(rows[0]["loss"])  # the loss alone looks like success
    healthy = warnings_of_run(tmp_path / "healthy", *steps)
    ranks = [float(r["target_rankme"]) for r in _rows(tmp_path / "healthy") if r["target_rankme"]]
    assert healthy == [] and min(ranks) > 0.75 * ranks[0]
    for r in _rows(tmp_path / "healthy"):
        if r["target_rankme"]:
            assert 1.0 <= float(r["pred_rankme"]) <= 8.0 and 0.0 < float(r["target_std"]) <= 1 / np.sqrt(192)


def test_the_columns_survive_a_resume(tmp_path, plain_pytorch_ops):
    steps = ["train.steps=6", "train.checkpoint_every=3", "train.keep_checkpoints=5", "train.log_every=2"]
    full = train(_cfg(tmp_path / "full", *steps))
    part = tmp_path / "part"
    train(_cfg(part, *steps), max_steps=4)
    assert ckpt.latest_checkpoint(part / "checkpoints").endswith("step_00000003")
    train(_cfg(part, *steps))
    want, got = _rows(full), _rows(part)
    assert [[r[k] for k in ("step", "loss", *FIELDS)] for r in got] == \
           [[r[k] for k in ("step", "loss", *FIELDS)] for r in want]
    assert [r["step"] for r in want if r["target_rankme"]] == ["1", "2", "3", "4", "6"]
    # the warning's reference after a resume is the run's first value, read back from metrics.csv
    assert first_logged_rank(part / "metrics.csv", 3) == float(want[0]["target_rankme"])
    assert first_logged_rank(tmp_path / "nowhere.csv", 3) is None


def test_the_monitor_sees_the_training_forward(tmp_path):
    # The statistics of a watched step are those of its first micro-batch's own target and predictor outputs.
    model = tiny_iwm()
    monitor = CollapseMonitor(model)
    x = images(6, seed=3)
    ctx = torch.arange(10).expand(6, 10)
    tgt = torch.arange(10, 16).view(1, 2, 3).expand(6, 2, 3)
    action = torch.zeros(6, model.predictor.action_dim)
    with monitor.watch(7, True):
        model(x, x, ctx, tgt, action)
        model(images(6, seed=4), x, ctx, tgt, action)  # a second micro-batch is not kept
    step, stats = monitor.pending()
    assert step == [7] and monitor.pending() is None
    with torch.no_grad():
        target = model.target_encoder(x).mean(dim=1)
        pred = model.predict(x, ctx, tgt, action).mean(dim=1)
    assert stats[0, 0].item() == pytest.approx(np_rankme(target.numpy()), rel=1e-6)
    assert stats[0, 1].item() == pytest.approx(np_rankme(pred.numpy()), rel=1e-6)
    assert stats[0, 2].item() == pytest.approx(np_normalized_std(target.numpy()), rel=1e-6)
    with monitor.watch(8, False):
        model(x, x, ctx, tgt, action)
    assert monitor.pending() is None
    assert not model.target_encoder._forward_hooks and not model.predictor._forward_hooks


def test_pixel_features_pool_large_images_only():
    small = torch.randint(0, 256, (3, 3, 24, 24), dtype=torch.uint8)
    assert torch.equal(pixel_features(small), small.float().div(255).flatten(1))
    big = torch.rand(2, 3, 64, 96)
    pooled = big.view(2, 3, 32, 2, 32, 3).mean(dim=(3, 5)).flatten(1)
    torch.testing.assert_close(pixel_features(big), pooled)


def test_evaluate_reports_the_pixel_probe_and_rankme():
    # Labels that the pixels give away (the brightest channel) but the random-init encoder need not.
    model = tiny_iwm()
    g = torch.Generator().manual_seed(0)
    ytr, yva = torch.randint(3, (45,), generator=g), torch.randint(3, (21,), generator=g)
    xtr, xva = images(45, seed=1) * 0.6, images(21, seed=2) * 0.6
    xtr[torch.arange(45), ytr] += 0.4
    xva[torch.arange(21), yva] += 0.4
    control = tiny_vit(seed=3)
    res = evaluate(model, xtr, ytr, xva, yva, random_encoder=control, bank_size=8, num_queries=2, batch_size=16,
                   probe_epochs=30, show_progress=False)
    ref = fit_linear_probe(xtr.reshape(45, -1), ytr, xva.reshape(21, -1), yva, epochs=30)
    assert res["probe_acc_pixels"] == ref.accuracy and res["probe_wd_pixels"] == ref.wd
    assert res["probe_acc_pixels"] == 1.0
    feats = extract_features(model.target_encoder, xva, 16)
    assert res["rankme"] == pytest.approx(np_rankme(feats.numpy()), rel=1e-10)
    feats = extract_features(control, xva, 16)
    assert res["rankme_random"] == pytest.approx(np_rankme(feats.numpy()), rel=1e-10)
