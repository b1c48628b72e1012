"""The world-model API on a tiny trained run: round trip against the model's own modules, save/load, bad inputs."""
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from iwm_fast.config import load_config
from iwm_fast.train.loop import train
from iwm_fast.transforms import ACTION_DIM, action_vector, apply, normalize, sample_params
from iwm_fast.world_model import WorldModel, identity_action, transform_params

TINY = ["model.size=tiny", "model.depth=1", "model.patch_size=4", "data.image_size=24", "data.num_workers=0",
        "predictor.depth=1", "predictor.width=48", "masks.min_keep=2", "masks.num_targets=2",
        "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1000", "train.device=cpu",
        "eval.enabled=false", "train.steps=2", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("wm") / "run"
    return train(load_config("configs/demo_cpu.yaml", TINY + [f"train.out_dir={out}"]))


def images(n, seed=0):
    return torch.rand(n, 3, 24, 24, generator=torch.Generator().manual_seed(seed))


def test_round_trip_matches_the_model_used_in_training(run_dir):
    wm = WorldModel.from_run(run_dir)
    assert wm.step == 2
    x = images(3)
    params = sample_params(3, seed=5, step=0, clean_source=True)
    a = action_vector(params)
    z = wm.encode(x)
    assert z.shape == (3, 36, 192)
    z_hat = wm.predict(z, a)
    # Reference: the IWM's own predict path with every position as context and as the single target block.
    m = wm.model
    idx = torch.arange(36)
    with torch.no_grad():
        ref = m.predict(normalize(x), idx[None].expand(3, 36), idx[None, None].expand(3, 1, 36), a)
    torch.testing.assert_close(z_hat, ref, rtol=1e-5, atol=1e-5)
    # Candidates: the true views among others; the ranking agrees with an independent cosine computation.
    views = torch.stack([apply(x, sample_params(3, seed=5, step=k, clean_source=True), "target") for k in range(4)], 1)
    bank = torch.stack([wm.target_latents(views[:, k]) for k in range(4)], 1)  # [B, K, N, D]
    with torch.no_grad():
        h = m.target_encoder(normalize(views[:, 2]))
    torch.testing.assert_close(bank[:, 2], F.layer_norm(h, (h.shape[-1],)), rtol=1e-5, atol=1e-5)
    r = wm.rank(z_hat, bank)
    cos = F.cosine_similarity(z_hat.mean(1)[:, None], bank.mean(2), dim=-1)
    torch.testing.assert_close(r.scores, cos, rtol=1e-5, atol=1e-6)
    assert torch.equal(r.order[:, 0], cos.argmax(1))
    ranks = wm.rank_of(z_hat, bank, 2)
    assert torch.equal(ranks, (cos > cos[:, 2:3]).sum(1) + 1)
    # A shared bank [K, N, D] ranks like the same bank given per query.
    shared = wm.rank(z_hat, bank[0])
    assert torch.equal(shared.order[0], r.order[0])


def test_action_helpers_describe_the_rendered_view(run_dir):
    wm = WorldModel.from_run(run_dir)
    p = transform_params(2, target={"brightness": 1.5, "hue": 0.25})
    a = wm.action(2, target={"brightness": 1.5, "hue": 0.25})
    assert a.shape == (2, ACTION_DIM)
    assert a[0].tolist()[5:10] == [1.0, 0.5, 0.0, 0.0, 0.25]  # target_jitter, brightness - 1, ..., hue
    assert torch.equal(identity_action(2), torch.zeros(2, ACTION_DIM))
    x = images(2)
    torch.testing.assert_close(wm.render(x, p), apply(x, p, "target"))
    # No transformation renders the image unchanged.
    assert torch.equal(wm.render(x, transform_params(2)), x)
    # A blurred, grayscale source sets its flags.
    b = wm.action(source={"contrast": 0.5}, grayscale=True, blur_sigma=1.0, solarize=True)[0].tolist()
    assert b[:5] == [1.0, 0.0, -0.5, 0.0, 0.0] and b[10:] == [1.0, 1.0, 1.0, 1.0]


def test_predict_follows_the_action_and_defaults_to_identity(run_dir):
    wm = WorldModel.from_run(run_dir)
    z = wm.encode(images(2))
    ident = wm.predict(z)
    assert torch.equal(ident, wm.predict(z, identity_action(1)))
    moved = wm.predict(z, wm.action(target={"hue": 0.4}))
    assert not torch.equal(ident, moved)  # a feature-conditioned predictor reads the action


def test_save_and_load_give_the_same_predictions(run_dir, tmp_path):
    wm = WorldModel.from_run(run_dir)
    path = wm.save(str(tmp_path / "wm.pt"))
    again = WorldModel.load(path)
    x = images(2, seed=3)
    a = wm.action(target={"contrast": 1.4})
    assert torch.equal(wm.predict(wm.encode(x), a), again.predict(again.encode(x), a))
    assert again.step == 2
    torch.save({"x": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a world model"):
        WorldModel.load(str(tmp_path / "other.pt"))


def test_bad_inputs_get_clear_errors(run_dir, tmp_path):
    wm = WorldModel.from_run(run_dir)
    z = wm.encode(images(2))
    with pytest.raises(ValueError, match=f"action must have {ACTION_DIM} entries"):
        wm.predict(z, torch.zeros(2, ACTION_DIM - 1))
    with pytest.raises(ValueError, match="2 latents"):
        wm.predict(z, torch.zeros(3, ACTION_DIM))
    with pytest.raises(ValueError, match="24x24 pixels"):
        wm.encode(torch.rand(2, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        wm.encode(torch.rand(2, 1, 24, 24))
    with pytest.raises(ValueError, match="latents"):
        wm.predict(z[:, :5])
    with pytest.raises(ValueError, match="unknown keys"):
        wm.action(target={"brightnes": 1.2})
    with pytest.raises(ValueError, match="hue"):
        wm.action(target={"hue": 0.7})
    empty = tmp_path / "empty_run"
    empty.mkdir()
    shutil.copy(os.path.join(run_dir, "config.yaml"), empty / "config.yaml")
    with pytest.raises(FileNotFoundError, match="holds no weights"):
        WorldModel.from_run(str(empty))
    with pytest.raises(FileNotFoundError, match="no config.yaml"):
        WorldModel.from_run(str(tmp_path))


def test_an_ijepa_model_takes_no_action():
    from iwm_fast.models import build_iwm
    cfg = load_config("configs/demo_cpu.yaml", TINY + ["predictor.conditioning=none"])
    wm = WorldModel(build_iwm(cfg), cfg)
    z = wm.encode(images(2))
    assert wm.predict(z).shape == (2, 36, 192)
    with pytest.raises(ValueError, match="without conditioning"):
        wm.predict(z, identity_action(2))


def test_the_readme_example_runs_on_a_run(run_dir, capsys):
    # examples/world_model.py is the README's runnable example; its ranks must be ranks of the bank it builds.
    import importlib.util
    import re
    spec = importlib.util.spec_from_file_location("wm_example", os.path.join("examples", "world_model.py"))
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    example.main(str(run_dir), num_images=3, bank_size=5)
    out = capsys.readouterr().out
    ranks = [int(r) for line in out.splitlines() if "[" in line
             for r in re.search(r"\[(.*)\]", line).group(1).split(",")]
    assert len(ranks) == 6 and all(1 <= r <= 5 for r in ranks)
    assert "mean rank" in out and "(chance 3.0)" in out


def test_rank_of_refuses_an_index_outside_the_bank(run_dir):
    wm = WorldModel.from_run(run_dir)
    z_hat = wm.predict(wm.encode(images(2)))
    bank = torch.stack([wm.target_latents(images(2, seed=s)) for s in range(4)], 1)  # [2, 4, N, D]
    for bad in (99, 4, -1, [0, 4], torch.tensor([-2, 1])):
        with pytest.raises(ValueError, match=r"true_index must be in \[0, 4\)"):
            wm.rank_of(z_hat, bank, bad)
    with pytest.raises(ValueError, match="one int or 2"):
        wm.rank_of(z_hat, bank, [0, 1, 2])
    with pytest.raises(TypeError, match="integer"):
        wm.rank_of(z_hat, bank, 1.0)
    cos = F.cosine_similarity(z_hat.mean(1)[:, None], bank.mean(2), dim=-1)
    for true in (0, 3, [3, 1]):  # in range: the rank against an independent count
        t = torch.as_tensor(true).expand(2)
        want = (cos > cos.gather(1, t[:, None])).sum(1) + 1
        assert torch.equal(wm.rank_of(z_hat, bank, true), want)


def test_float_images_outside_0_1_are_refused_with_a_hint():
    from iwm_fast.models import build_iwm
    cfg = load_config("configs/demo_cpu.yaml", TINY)
    wm = WorldModel(build_iwm(cfg), cfg)
    x = images(2)
    cases = [(x * 255, "0-255 pixel values.*divide by 255"),
             ((x - 0.45) / 0.22, "normalised with a mean and std"),
             (x * 1.02, r"clamp them to \[0, 1\]"),
             (x.masked_fill(x > 0.9, float("nan")), "NaN or Inf")]
    for bad, hint in cases:
        for call in (wm.encode, wm.target_latents, lambda b: wm.render(b, transform_params(2))):
            with pytest.raises(ValueError, match=hint) as e:
                call(bad)
            assert "\n" not in str(e.value)
    u8 = (x * 255).round().to(torch.uint8)
    assert torch.equal(wm.encode(u8), wm.encode(u8.float() / 255))  # the fix the hint names
    wm.encode(x.double())  # any float dtype in range


def test_world_model_file_errors_are_clear_and_leave_no_tmp(tmp_path):
    from iwm_fast.models import build_iwm
    cfg = load_config("configs/demo_cpu.yaml", TINY)
    wm = WorldModel(build_iwm(cfg), cfg)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        wm.save(str(tmp_path / "missing" / "wm.pt"))
    (tmp_path / "dir").mkdir()
    with pytest.raises(IsADirectoryError, match="is a folder; give WorldModel.save a file path"):
        wm.save(str(tmp_path / "dir"))
    assert os.listdir(tmp_path / "dir") == [] and sorted(os.listdir(tmp_path)) == ["dir"]
    good = wm.save(str(tmp_path / "wm.pt"))
    (tmp_path / "text.pt").write_text("not a torch file at all\n")
    (tmp_path / "cut.pt").write_bytes(open(good, "rb").read()[:100_000])
    for name, pattern in (("text.pt", "is not a world model saved by WorldModel.save: not a torch file"),
                          ("cut.pt", "is truncated or damaged")):
        with pytest.raises(ValueError, match=pattern) as e:
            WorldModel.load(str(tmp_path / name))
        assert "\n" not in str(e.value)
    with pytest.raises(IsADirectoryError, match="is a folder, not a world-model file"):
        WorldModel.load(str(tmp_path / "dir"))
    with pytest.raises(FileNotFoundError, match="no world-model file"):
        WorldModel.load(str(tmp_path / "none.pt"))
    (tmp_path / "dir2").mkdir()  # a write that fails (for root too): a folder where the temporary file goes
    (tmp_path / "dir2" / "wm.pt.tmp").mkdir()
    with pytest.raises(OSError, match="could not write the world model"):
        wm.save(str(tmp_path / "dir2" / "wm.pt"))
    assert os.listdir(tmp_path / "dir2") == ["wm.pt.tmp"]  # the folder in the way is left alone, nothing added
    assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))
