"""Evaluation: linear probe, random-init baseline, world-model MRR, eval.json, summary and loss plot."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from iwm_fast.eval import (MrrSettings, QueryBatch, evaluate, extract_features, format_summary, linear_probe,
                           mrr_chance, plot_loss_curve, probe_encoder, random_init_encoder, reciprocal_ranks,
                           world_model_mrr, write_eval)
from iwm_fast.eval.probe import fit_linear_probe
from iwm_fast.eval.rank import rankme
from iwm_fast.models import IWM, IWMPredictor, VisionTransformer
from iwm_fast.transforms import ACTION_DIM, TransformConfig, normalize

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def tiny_vit(seed=0, img=16, patch=4, dim=32, depth=2, heads=2):
    torch.manual_seed(seed)
    return VisionTransformer(img_size=img, patch_size=patch, embed_dim=dim, depth=depth, num_heads=heads,
                             attn_backend="sdpa")


def tiny_iwm(conditioning="feature", target_mode="union", seed=0):
    enc = tiny_vit(seed)
    torch.manual_seed(seed + 1)
    pred = IWMPredictor(enc.grid, embed_dim=32, predictor_embed_dim=24, depth=1, num_heads=2,
                        conditioning=conditioning, action_dim=ACTION_DIM if conditioning != "none" else 0,
                        target_mode=target_mode, attn_backend="sdpa")
    return IWM(enc, pred)


def images(n, seed=0, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def blobs(n_per_class, num_classes=5, dim=16, sep=4.0, seed=0, noise_seed=None):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(num_classes, dim, generator=g) * sep
    if noise_seed is not None:
        g = torch.Generator().manual_seed(noise_seed)
    y = torch.arange(num_classes).repeat_interleave(n_per_class)
    x = centers[y] + torch.randn(len(y), dim, generator=g)
    perm = torch.randperm(len(y), generator=g)
    return x[perm], y[perm]


def blind_sd(bank_size, queries):
    """Standard error of the MRR of a predictor whose rank is uniform on 1..K."""
    r = torch.arange(1, bank_size + 1, dtype=torch.float64)
    var = (1 / r ** 2).mean() - (1 / r).mean() ** 2
    return math.sqrt(var.item() / queries)


# ---------------------------------------------------------------- linear probe

def test_probe_separable_features_high_accuracy():
    xtr, ytr = blobs(40, seed=0)
    xva, yva = blobs(20, seed=0, noise_seed=100)  # same class centres, fresh samples
    acc = linear_probe(xtr, ytr, xva, yva, epochs=100, lr=1.0, wd=1e-3, seed=0)
    assert acc >= 0.97


def test_probe_random_labels_is_near_chance():
    g = torch.Generator().manual_seed(1)
    xtr, xva = torch.randn(400, 32, generator=g), torch.randn(1000, 32, generator=g)
    ytr, yva = torch.randint(10, (400,), generator=g), torch.randint(10, (1000,), generator=g)
    acc = linear_probe(xtr, ytr, xva, yva, epochs=100, lr=1.0, wd=(1e-3, 1e-1), seed=0)
    # chance 0.1; the binomial sd over 1000 samples is 0.0095
    assert abs(acc - 0.1) < 0.05


def test_probe_is_deterministic_and_standardises():
    xtr, ytr = blobs(30, seed=2)
    xva, yva = blobs(10, seed=2)
    a = fit_linear_probe(xtr, ytr, xva, yva, epochs=50, seed=3)
    b = fit_linear_probe(xtr.clone(), ytr.clone(), xva.clone(), yva.clone(), epochs=50, seed=3)
    assert a == b
    # standardisation: an affine rescaling of each feature leaves the accuracy unchanged
    scale, shift = torch.logspace(-3, 3, xtr.shape[1]), torch.randn(xtr.shape[1]) * 100
    c = fit_linear_probe(xtr * scale + shift, ytr, xva * scale + shift, yva, epochs=50, seed=3)
    assert c.accuracy == pytest.approx(a.accuracy, abs=0.02)
    assert a.wd in (1e-4, 1e-3, 1e-2, 1e-1)


def test_probe_rejects_bad_input():
    x, y = blobs(5)
    with pytest.raises(ValueError, match="labels"):
        linear_probe(x, y[:-1], x, y)
    with pytest.raises(TypeError, match="integers"):
        linear_probe(x, y.float(), x, y)
    with pytest.raises(ValueError, match="dims"):
        linear_probe(x, y, x[:, :3], y)
    with pytest.raises(ValueError, match="NaN"):
        linear_probe(x * float("nan"), y, x, y)


# ---------------------------------------------------------------- features and the random baseline

def test_extract_features_matches_manual_pooling_and_restores_mode():
    enc = tiny_vit().train()
    x = images(10)
    feats = extract_features(enc, x, batch_size=4)
    assert enc.training
    with torch.no_grad():
        ref = enc.eval()(normalize(x)).mean(dim=1)
    assert feats.shape == (10, 32) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-5)
    u8 = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(extract_features(enc, u8, 16), extract_features(enc, u8.float() / 255, 16))


def test_random_init_control_is_the_runs_encoder_at_initialisation():
    from iwm_fast.models import build_iwm
    from iwm_fast.models.vit import build_vit
    from iwm_fast.config import load_config

    cfg = load_config("configs/demo_cpu.yaml", ["model.depth=2", "predictor.depth=1", "train.seed=7"])
    state = torch.get_rng_state()
    r1, r2 = random_init_encoder(cfg, 7), random_init_encoder(cfg, 7)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    assert not any(p.requires_grad for p in r1.parameters())
    # the encoder's own constructor, seeded: what build_vit gives from the same seed
    torch.manual_seed(7)
    ref = build_vit("tiny", img_size=32, patch_size=4, depth=2, patch_init_std=0.06).state_dict()
    s1, s2 = r1.state_dict(), r2.state_dict()
    assert s1.keys() == ref.keys()
    for k in ref:
        assert torch.equal(s1[k], ref[k]) and torch.equal(s2[k], ref[k]), k
    # the run's model at step 0 is this control; another seed is another control
    assert torch.equal(build_iwm(cfg).target_encoder.blocks[0].attn.qkv.weight, s1["blocks.0.attn.qkv.weight"])
    assert not torch.equal(random_init_encoder(cfg, 8).state_dict()["blocks.0.attn.qkv.weight"],
                           s1["blocks.0.attn.qkv.weight"])
    # a non-default patch-embedding init is part of the run's initialisation too
    wide = load_config("configs/demo_cpu.yaml", ["model.depth=2", "predictor.depth=1", "model.patch_init_std=0.5"])
    assert abs(random_init_encoder(wide, 0).patch_embed.proj.weight.std().item() - 0.5) < 0.1


def test_probe_encoder_reports_both_accuracies():
    # colour classes: a random tiny ViT separates them, so both accuracies are well above chance
    g = torch.Generator().manual_seed(0)
    def make(n):
        y = torch.randint(3, (n,), generator=g)
        x = 0.15 * torch.rand(n, 3, 16, 16, generator=g)
        x[torch.arange(n), y] += 0.8
        return x, y
    (xtr, ytr), (xva, yva) = make(90), make(60)
    enc = tiny_vit(seed=1)
    out = probe_encoder(enc, xtr, ytr, xva, yva, batch_size=32, epochs=30, wd=(1e-3, 1e-1), seed=0,
                        random_encoder=tiny_vit(seed=2))
    assert set(out) == {"probe_acc", "probe_acc_random", "probe_wd", "probe_wd_random", "rankme", "rankme_random"}
    assert out["probe_acc"] > 0.9 and out["probe_acc_random"] > 0.9
    alone = probe_encoder(enc, xtr, ytr, xva, yva, batch_size=32, epochs=30, wd=(1e-3, 1e-1), seed=0)
    # no control, no control keys
    assert alone == {"probe_acc": out["probe_acc"], "probe_wd": out["probe_wd"], "rankme": out["rankme"]}
    ftr, fva = extract_features(enc, xtr, 32), extract_features(enc, xva, 32)
    assert alone["rankme"] == rankme(fva).item()
    assert alone["probe_acc"] == fit_linear_probe(ftr, ytr, fva, yva, epochs=30, wd=(1e-3, 1e-1)).accuracy
    same = probe_encoder(enc, xtr, ytr, xva, yva, batch_size=32, epochs=30, wd=1e-3, seed=0,
                         random_encoder=enc)
    assert same["probe_wd"] == same["probe_wd_random"] == 1e-3
    assert same["probe_acc_random"] == same["probe_acc"]


# ---------------------------------------------------------------- MRR

def test_mrr_chance_stderr_matches_simulated_blind_rankers():
    from iwm_fast.eval.mrr import mrr_chance_stderr
    g = torch.Generator().manual_seed(0)
    K, Q = 256, 128
    means = (1.0 / torch.randint(1, K + 1, (4000, Q), generator=g).double()).mean(1)
    assert mrr_chance_stderr(K, Q) == pytest.approx(means.std().item(), rel=0.05)
    assert mrr_chance_stderr(K, Q) == pytest.approx(blind_sd(K, Q))
    with pytest.raises(ValueError, match="positive"):
        mrr_chance_stderr(256, 0)


def test_mrr_chance_value():
    assert mrr_chance(1) == 1.0
    assert mrr_chance(256) == pytest.approx(sum(1 / r for r in range(1, 257)) / 256)
    assert mrr_chance(256) == pytest.approx(0.0239, abs=1e-4)
    with pytest.raises(ValueError):
        mrr_chance(0)


def test_reciprocal_ranks_with_ties():
    sims = torch.tensor([[0.5, 0.9, 0.5, 0.1],
                         [0.3, 0.2, 0.1, 0.0],
                         [0.1, 0.1, 0.1, 0.1]])
    rr = reciprocal_ranks(sims, torch.tensor([0, 0, 3]))
    expected = torch.tensor([(1 / 2 + 1 / 3) / 2, 1.0, (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4], dtype=torch.float64)
    torch.testing.assert_close(rr, expected)


def target_hook(encoder):
    def fn(x):
        h = encoder(normalize(x))
        return F.layer_norm(h, (h.shape[-1],))
    return fn


def test_mrr_oracle_is_one():
    enc = tiny_vit(seed=2).eval()
    tfn = target_hook(enc)
    cfg = TransformConfig(jitter_p=1.0)  # every view jittered: no two bank views coincide
    out = world_model_mrr(images=images(12), settings=MrrSettings(bank_size=16, views=cfg, seed=0, batch_size=64),
                          hooks=(lambda b: tfn(b.target), tfn))
    assert out["mrr"] == 1.0 and out["mrr_tokens"] == 1.0
    assert out["mrr_chance"] == mrr_chance(16) and out["mrr_num_queries"] == 12
    assert out["mrr_identity"] < 0.9


def test_mrr_identical_views_give_exact_chance():
    # jitter never applied: the K views are the same image, so every ranking is a K-way tie
    enc = tiny_vit(seed=2).eval()
    tfn = target_hook(enc)
    out = world_model_mrr(images=images(5), settings=MrrSettings(bank_size=8, views=TransformConfig(jitter_p=0.0)),
                          hooks=(lambda b: tfn(b.target), tfn))
    assert out["mrr"] == pytest.approx(mrr_chance(8), abs=1e-12)


def test_mrr_action_blind_predictor_is_near_chance():
    enc = tiny_vit(seed=3).eval()
    tfn = target_hook(enc)
    Q, K = 96, 32
    out = world_model_mrr(images=images(Q, seed=4), settings=MrrSettings(bank_size=K, seed=1, batch_size=256),
                          hooks=(lambda b: tfn(b.source) + 0.3, tfn))
    assert abs(out["mrr"] - mrr_chance(K)) < 4 * blind_sd(K, Q)
    assert abs(out["mrr_identity"] - mrr_chance(K)) < 4 * blind_sd(K, Q)


def test_mrr_hooks_see_clean_source_and_true_action():
    enc = tiny_vit(seed=2).eval()
    tfn = target_hook(enc)
    x = images(6)
    seen = {}

    def spy(b: QueryBatch):
        seen["b"] = b
        return tfn(b.target)

    world_model_mrr(images=x, settings=MrrSettings(bank_size=4), hooks=(spy, tfn))
    b = seen["b"]
    torch.testing.assert_close(b.source, x, rtol=0, atol=0)  # clean: no jitter, no destructive transforms
    assert b.action.shape == (6, ACTION_DIM)
    assert torch.all(b.action[:, :5] == 0) and torch.all(b.action[:, 10:] == 0)


def test_mrr_is_deterministic_with_a_seed():
    model = tiny_iwm()
    x = images(10, seed=6)
    a = world_model_mrr(model, x, MrrSettings(bank_size=8, seed=3, batch_size=64))
    b = world_model_mrr(model, x, MrrSettings(bank_size=8, seed=3, batch_size=64))
    assert a == b
    c = world_model_mrr(model, x, MrrSettings(bank_size=8, seed=4, batch_size=64))
    assert c != a


@pytest.mark.parametrize("conditioning,target_mode", [("feature", "union"), ("sequence", "union"),
                                                      ("none", "per_block")])
def test_mrr_real_iwm_model(conditioning, target_mode):
    model = tiny_iwm(conditioning, target_mode).train()
    out = world_model_mrr(model, images(8), MrrSettings(bank_size=16, num_queries=6, seed=0, batch_size=32))
    assert model.training  # the evaluation restores the mode
    for k in ("mrr", "mrr_tokens", "mrr_identity"):
        assert 0 < out[k] <= 1
    assert out["mrr_num_queries"] == 6 and out["mrr_bank_size"] == 16


def test_mrr_ijepa_predictor_ignores_action_so_near_chance():
    model = tiny_iwm("none", "per_block")
    Q, K = 64, 16
    out = world_model_mrr(model, images(Q, seed=8), MrrSettings(bank_size=K, seed=2, batch_size=256))
    assert abs(out["mrr"] - mrr_chance(K)) < 4 * blind_sd(K, Q)


def test_mrr_rejects_bad_arguments():
    model = tiny_iwm()
    with pytest.raises(ValueError, match="num_queries"):
        world_model_mrr(model, images(4), MrrSettings(bank_size=4, num_queries=5))
    with pytest.raises(ValueError, match="bank_size"):
        world_model_mrr(model, images(4), MrrSettings(bank_size=0))
    with pytest.raises(ValueError, match="model"):
        world_model_mrr(None, images(4), MrrSettings(bank_size=4))


# ---------------------------------------------------------------- outputs

def test_write_eval_and_summary(tmp_path):
    res = {"probe_acc": torch.tensor(0.91), "probe_acc_random": 0.5, "mrr": 0.123456, "mrr_chance": 0.0239,
           "mrr_bank_size": 256, "note": "x", "bad": float("nan")}
    path = write_eval(tmp_path / "run" / "eval.json", res)
    data = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert path.endswith("eval.json")
    assert data["probe_acc"] == pytest.approx(0.91) and data["mrr_bank_size"] == 256 and data["bad"] is None
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["eval.json"]  # no temp file left
    with pytest.raises(ValueError, match="mrr"):
        write_eval(tmp_path / "eval.json", {"probe_acc": 1.0, "probe_acc_random": 0.5})
    table = format_summary(res)
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "value"]
    assert lines[2].split()[0] == "probe_acc" and lines[4].split() == ["mrr", "0.1235"]
    assert len({len(l) for l in lines}) == 1  # aligned


def test_plot_loss_curve_from_csv_and_list(tmp_path):
    csv_path = tmp_path / "metrics.csv"
    rows = ["step,loss,lr"] + [f"{i},{1.0 / (i + 1)},0.1" for i in range(50)] + ["50,nan,0.1", "51,,0.1"]
    csv_path.write_text("\n".join(rows) + "\n")
    for src in (str(csv_path), [(0, 1.0), (1, 0.5), (2, 0.25)]):
        png = tmp_path / "sub" / "loss.png"
        plot_loss_curve(src, str(png))
        assert png.read_bytes()[:8] == PNG_MAGIC
        png.unlink()
    with pytest.raises(ValueError, match="loss"):
        plot_loss_curve([(0, float("nan"))], str(tmp_path / "x.png"))
    (tmp_path / "bad.csv").write_text("step,value\n1,2\n")
    with pytest.raises(ValueError, match="loss"):
        plot_loss_curve(str(tmp_path / "bad.csv"), str(tmp_path / "x.png"))


def test_evaluate_end_to_end(tmp_path):
    model = tiny_iwm()
    g = torch.Generator().manual_seed(0)
    xtr, ytr = images(40, seed=1), torch.randint(3, (40,), generator=g)
    xva, yva = images(20, seed=2), torch.randint(3, (20,), generator=g)
    res = evaluate(model, xtr, ytr, xva, yva, random_encoder=tiny_vit(seed=3), bank_size=8, num_queries=4,
                   batch_size=32, probe_epochs=20)
    write_eval(tmp_path / "eval.json", res)
    data = json.loads((tmp_path / "eval.json").read_text())
    for k in ("probe_acc", "probe_acc_random", "mrr", "mrr_chance"):
        assert 0 <= data[k] <= 1
    assert "probe_acc" in format_summary(res)


def test_evaluate_stages_give_the_same_numbers_as_the_parts():
    # The staged evaluation (with progress bars) must not change a number: compare with the plain building blocks.
    model = tiny_iwm()
    g = torch.Generator().manual_seed(0)
    xtr, ytr = images(40, seed=1), torch.randint(3, (40,), generator=g)
    xva, yva = images(20, seed=2), torch.randint(3, (20,), generator=g)
    res = evaluate(model, xtr, ytr, xva, yva, random_encoder=tiny_vit(seed=3), bank_size=8, num_queries=4,
                   batch_size=16, probe_epochs=20, show_progress=False)
    feats = [(extract_features(enc, xtr, 16), extract_features(enc, xva, 16)) for enc in (model.target_encoder,
                                                                                           tiny_vit(seed=3))]
    fits = [fit_linear_probe(ftr, ytr, fva, yva, epochs=20) for ftr, fva in feats]
    ref = {"probe_acc": fits[0].accuracy, "probe_wd": fits[0].wd, "probe_acc_random": fits[1].accuracy,
           "probe_wd_random": fits[1].wd}
    ref.update(world_model_mrr(model, xva, MrrSettings(bank_size=8, num_queries=4, batch_size=16)))
    for k, v in ref.items():
        assert res[k] == v, k


def test_evaluate_writes_the_world_model_picture_and_shows_progress(tmp_path, capsys, caplog):
    model = tiny_iwm()
    g = torch.Generator().manual_seed(0)
    xtr, ytr = images(24, seed=1), torch.randint(3, (24,), generator=g)
    xva, yva = images(12, seed=2), torch.randint(3, (12,), generator=g)
    png = tmp_path / "world_model.png"
    with caplog.at_level("INFO", logger="iwm_fast"):
        res = evaluate(model, xtr, ytr, xva, yva, random_encoder=tiny_vit(seed=3), bank_size=40, num_queries=3,
                       batch_size=16, probe_epochs=5,
                       picture=str(png), examples=2)
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5000
    ex = res["examples"]
    assert len(ex) == 2 and ex[0]["retrieved"].shape == (5, 3, 16, 16)
    assert 1 <= ex[0]["rank"] <= 40
    err = capsys.readouterr().err
    for stage in ("eval: features", "eval: linear probe", "eval: world-model MRR"):
        assert stage in err
    assert "120/120" in err  # the MRR bar counts every target-encoder image: 3 queries x 40 views
    # A bank larger than the evaluation set is allowed (views of each query) but said at once.
    assert any("larger than the 36 evaluation images" in r.getMessage() for r in caplog.records)


def test_picture_true_view_rank_matches_the_mrr_ranking():
    # With an oracle predictor (it returns the true view's own embedding) the true view is retrieved first.
    model = tiny_iwm()
    from iwm_fast.eval.mrr import iwm_hooks
    _, target_fn = iwm_hooks(model)
    res = world_model_mrr(model, images(3, seed=4), MrrSettings(bank_size=16, batch_size=8, examples=3),
                          hooks=(lambda b: target_fn(b.target), target_fn))
    for e in res["examples"]:
        assert e["rank"] == 1 and e["retrieved_is_true"][0]
        torch.testing.assert_close(e["retrieved"][0], e["target"])


def test_eval_json_has_the_usual_file_mode(tmp_path):
    import os
    import stat

    from iwm_fast.eval.report import REQUIRED_KEYS, write_eval

    umask = os.umask(0o022)
    try:
        path = write_eval(str(tmp_path / "eval.json"), {k: 0.5 for k in REQUIRED_KEYS})
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
