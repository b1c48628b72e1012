"""iwm-export on a tiny trained run: transformers' IJepaModel loads the hf export and gives our target encoder's
features; our own formats load back; bad input is one line and exit 2 with nothing written."""
import os

import pytest
import torch

from iwm_fast import export
from iwm_fast.config import load_config
from iwm_fast.train.loop import train
from iwm_fast.transforms import normalize
from iwm_fast.world_model import WorldModel

TINY = ["model.size=tiny", "model.depth=2", "model.patch_size=4", "data.image_size=24", "data.num_workers=0",
        "predictor.depth=1", "predictor.width=48", "masks.min_keep=2", "masks.num_targets=2",
        "train.batch_size=8", "train.warmup_steps=1", "train.log_every=1000", "train.device=cpu",
        "eval.enabled=false", "train.steps=2", "train.checkpoint_every=2"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "run"
    return train(load_config("configs/demo_cpu.yaml", TINY + [f"train.out_dir={out}"]))


def _images():
    return normalize(torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(0)))


def _ours(run_dir):
    wm = WorldModel.from_run(run_dir)
    with torch.no_grad():
        return wm.model.target_encoder(_images())


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_hf_export_loads_in_transformers_with_our_features(run_dir, tmp_path, dtype, capsys):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "hf"
    assert export.main([str(run_dir), str(out), "--format", "hf", "--dtype", dtype]) == 0
    assert "step 2" in capsys.readouterr().out
    model = transformers.IJepaModel.from_pretrained(out).eval()
    assert model.dtype == export.DTYPES[dtype]
    with torch.no_grad():
        theirs = model(_images().to(model.dtype)).last_hidden_state.float()
    tol = 1e-5 if dtype == "fp32" else 6e-2  # bf16 weights and activations: a few bf16 ulps of the LayerNormed output
    torch.testing.assert_close(theirs, _ours(run_dir), rtol=tol, atol=tol)
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert processor.size == {"height": 24, "width": 24}
    import iwm_fast.integrations.hf  # noqa: F401  (registers "iwm_fast" with transformers)
    fused = transformers.IJepaModel.from_pretrained(out, attn_implementation="iwm_fast").eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(_images().to(fused.dtype)).last_hidden_state.float(), theirs)


def test_bf16_halves_the_size(run_dir, tmp_path):
    pytest.importorskip("safetensors")
    sizes = {}
    for dtype in ("fp32", "bf16"):
        out = tmp_path / dtype
        assert export.main([str(run_dir), str(out), "--format", "safetensors", "--dtype", dtype]) == 0
        sizes[dtype] = os.path.getsize(out / "target_encoder.safetensors")
    assert 0.49 < sizes["bf16"] / sizes["fp32"] < 0.51


def test_our_formats_load_back(run_dir, tmp_path):
    safetensors = pytest.importorskip("safetensors.torch")
    wm = WorldModel.from_run(run_dir)
    out = tmp_path / "pt"
    assert export.main([str(run_dir), str(out), "--format", "pt"]) == 0
    encoder = wm.model.target_encoder.state_dict()
    saved = torch.load(out / "target_encoder.pt", weights_only=True)
    assert saved.keys() == encoder.keys() and all(torch.equal(saved[k], encoder[k]) for k in saved)
    out = tmp_path / "wm_pt"
    assert export.main([str(run_dir), str(out), "--what", "world_model", "--format", "pt"]) == 0
    loaded = WorldModel.load(str(out / "world_model.pt"))
    assert loaded.step == 2
    x = torch.rand(2, 3, 24, 24, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(loaded.encode(x), wm.encode(x), rtol=0, atol=0)
    out = tmp_path / "wm_st"
    assert export.main([str(run_dir), str(out), "--what", "world_model", "--format", "safetensors"]) == 0
    state = safetensors.load_file(out / "world_model.safetensors")
    full = wm.model.state_dict()
    assert state.keys() == full.keys() and all(torch.equal(state[k], full[k]) for k in state)
    assert (out / "config.yaml").is_file()


def _bad(capsys, argv):
    assert export.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("iwm-export: ") and "\n" not in err
    return err


def test_bad_input_is_one_line_and_exit_2(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    assert "not a folder" in _bad(capsys, [str(tmp_path / "nowhere"), str(out)])
    (tmp_path / "empty_run").mkdir()
    assert "config.yaml" in _bad(capsys, [str(tmp_path / "empty_run"), str(out)])
    no_ckpt = tmp_path / "no_ckpt"
    no_ckpt.mkdir()
    (no_ckpt / "config.yaml").write_text(open(os.path.join(run_dir, "config.yaml")).read())
    assert "no complete checkpoint" in _bad(capsys, [str(no_ckpt), str(out)])
    assert "--dtype" in _bad(capsys, [str(run_dir), str(out), "--dtype", "int8"])
    assert "target encoder only" in _bad(capsys, [str(run_dir), str(out), "--what", "world_model"])
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert "already exists" in _bad(capsys, [str(run_dir), str(taken)])
    assert os.listdir(taken) == ["keep.txt"]
    assert not out.exists()


def test_a_failed_export_leaves_nothing(run_dir, tmp_path, monkeypatch):
    cfg, model, step = export.load_run(str(run_dir))

    def half_then_fail(cfg, model, step, tmp, *rest):
        open(os.path.join(tmp, "target_encoder.pt"), "wb").write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export, "_write_ours", half_then_fail)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="disk full"):
        export.export_model(cfg, model, step, str(out), fmt="pt")
    assert os.listdir(tmp_path) == []
