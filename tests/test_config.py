import pytest
import yaml

from iwm_fast.train.config import ConfigError, load_config, save_config
from iwm_fast.train.schedules import lr_at, momentum_at, weight_decay_at

DOCUMENTED_KEYS = {"train.steps": 7, "train.batch_size": 32, "train.seed": 3, "train.out_dir": "runs/x",
                   "train.checkpoint_every": 5, "model.size": "small", "model.patch_size": 8,
                   "data.image_size": 64, "predictor.depth": 3, "predictor.width": 96,
                   "predictor.conditioning": "sequence"}


def test_documented_overrides_apply(tmp_path):
    cfg = load_config("configs/demo_cpu.yaml", [f"{k}={v}" for k, v in DOCUMENTED_KEYS.items()])
    for key, value in DOCUMENTED_KEYS.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(None, ["train.stepz=5"])
    with pytest.raises(ConfigError, match="'modle'"):
        load_config(None, ["modle.size=base"])


def test_unknown_key_in_yaml_is_named(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump({"train": {"stpes": 3}}))
    with pytest.raises(ConfigError, match="train.stpes"):
        load_config(p)


def test_bad_values_are_named():
    with pytest.raises(ConfigError, match="train.steps must be an integer"):
        load_config(None, ["train.steps=ten"])
    with pytest.raises(ConfigError, match="masks.target_scale"):
        load_config(None, ["masks.target_scale=0.2"])
    with pytest.raises(ConfigError, match="augment"):
        load_config(None, ["augment.jitter_p=1.5"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.steps"])


def test_all_shipped_configs_load():
    import glob
    paths = glob.glob("configs/*.yaml")
    assert len(paths) >= 7
    for p in paths:
        load_config(p)


def test_schedules_endpoints():
    kw = dict(total=100, warmup=10, start_lr=0.1, peak_lr=1.0, final_lr=0.01)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(55, **kw) == pytest.approx(0.01 + 0.5 * 0.99)
    assert lr_at(100, **kw) == pytest.approx(0.01)
    assert momentum_at(0, total=100, start=0.996, end=1.0) == pytest.approx(0.996)
    assert momentum_at(50, total=100, start=0.996, end=1.0) == pytest.approx(0.998)
    assert momentum_at(100, total=100, start=0.996, end=1.0) == pytest.approx(1.0)
    assert weight_decay_at(0, total=100, start=0.04, end=0.4) == pytest.approx(0.04)
    assert weight_decay_at(100, total=100, start=0.04, end=0.4) == pytest.approx(0.4)
