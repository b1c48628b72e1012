import pytest
import yaml

from iwm_fast.config import ConfigError, load_config, save_config
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


# Every value the config takes is checked once, when it is loaded, with the key and the allowed range named.
INVALID = {
    "train.steps=0": "train.steps must be an integer >= 1",
    "train.steps=-5": "train.steps must be an integer >= 1",
    "train.checkpoint_every=0": "train.checkpoint_every must be an integer >= 1",
    "train.log_every=0": "train.log_every must be an integer >= 1",
    "train.accum_steps=0": "train.accum_steps must be an integer >= 1",
    "train.batch_size=0": "train.batch_size must be an integer >= 1",
    "train.max_bad_steps=0": "train.max_bad_steps must be an integer >= 1",
    "train.device=bogus": "train.device must be one of 'auto', 'cpu', 'cuda'",
    "train.precision=fp8": "train.precision must be one of",
    "train.loss=l1": "train.loss must be one of",
    "model.size=enormous": "model.size must be one of .*'tiny'",
    "model.depth=-1": "model.depth must be an integer >= 0",
    "model.patch_size=0": "model.patch_size must be an integer >= 1",
    "model.attn_backend=cudnn": "model.attn_backend must be one of",
    "train.ema_momentum=[1.5,2]": r"train.ema_momentum must be a pair \[lo, hi\] with lo <= hi, both in \[0, 1\]",
    "train.ema_momentum=[1.0,0.996]": "train.ema_momentum must be a pair",
    "train.ema_momentum=[nan,1]": "train.ema_momentum must be a pair",
    "data.crop_scale=[2,3]": r"data.crop_scale must be a pair \[lo, hi\] with lo <= hi, both in \(0, 1\]",
    "data.crop_scale=[0,1]": "data.crop_scale must be a pair",
    "data.crop_scale=[0.9,0.5]": "data.crop_scale must be a pair",
    "train.warmup_steps=-1": "train.warmup_steps must be an integer >= 0",
    "train.weight_decay=[-0.1,0.4]": "train.weight_decay must be a pair .* >= 0",
    "train.weight_decay=[0.04,inf]": "train.weight_decay must be a pair .* finite",
    "train.grad_clip=-1": "train.grad_clip must be a finite number >= 0",
    "train.lr=inf": "train.lr must be a finite number",
    "train.start_lr=nan": "train.start_lr must be a finite number",
    "train.final_lr=-1e-6": "train.final_lr must be a finite number >= 0",
    "train.keep_checkpoints=-1": "train.keep_checkpoints must be an integer >= 0",
    "train.seed=-1": "train.seed must be an integer in",
    "predictor.width=0 predictor.preset=": "predictor.width must be an integer >= 1 when predictor.preset is",
    "predictor.conditioning= predictor.preset=": "predictor.conditioning must be set when predictor.preset is",
    "predictor.num_heads=-1": "predictor.num_heads must be an integer >= 0",
    "predictor.num_heads=5": "predictor width 192 must be divisible by predictor.num_heads",
    "predictor.depth=-2": "predictor.depth must be an integer >= 0",
    "predictor.preset=huge": "predictor.preset must be one of",
    "predictor.conditioning=film": "predictor.conditioning must be one of",
    "predictor.target_mode=blocks": "predictor.target_mode must be one of",
    "data.image_size=30": "data.image_size must be divisible by model.patch_size=4",
    "data.dataset=imagenet": "data.dataset must be one of",
    "data.num_workers=-1": "data.num_workers must be an integer >= 0",
    "masks.num_targets=0": "masks.num_targets must be an integer >= 1",
    "masks.target_scale=[0.1,1.2]": "masks.target_scale must be a pair",
    "masks.context_scale=[0,0.5]": "masks.context_scale must be a pair",
    "masks.target_aspect=[2,1]": "masks.target_aspect must be a pair",
    "masks.min_keep=-1": "masks.min_keep must be an integer >= 0",
    "eval.bank_size=1": "eval.bank_size must be an integer >= 2",
    "eval.num_queries=0": "eval.num_queries must be an integer >= 1",
}


@pytest.mark.parametrize("override", sorted(INVALID))
def test_invalid_values_are_refused_naming_the_key_and_range(override):
    with pytest.raises(ConfigError, match=INVALID[override]):
        load_config("configs/demo_cpu.yaml", override.split())


def test_valid_edges_are_accepted():
    cfg = load_config("configs/demo_cpu.yaml", ["train.ema_momentum=[1,1]", "data.crop_scale=[1,1]",
                                                "train.warmup_steps=0", "train.grad_clip=0", "model.depth=1",
                                                "train.weight_decay=[0,0]", "predictor.num_heads=4"])
    assert cfg.train.ema_momentum == (1.0, 1.0) and cfg.model.depth == 1


def test_malformed_yaml_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  steps: 10\n  lr: [1e-3\nmodel:\n  size: tiny\n")
    with pytest.raises(ConfigError, match=r"bad.yaml is not valid YAML at line \d+, column \d+"):
        load_config(p)


def test_a_folder_or_a_binary_file_as_config_is_named(tmp_path):
    with pytest.raises(ConfigError, match="is a folder, not a YAML file"):
        load_config(tmp_path)
    p = tmp_path / "model.pt"
    p.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ConfigError, match="model.pt is not a text file"):
        load_config(p)
    q = tmp_path / "list.yaml"
    q.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections, not a list"):
        load_config(q)


def test_environment_checks(tmp_path, monkeypatch):
    import torch

    from iwm_fast.train.environment import check_environment
    cfg = load_config("configs/demo_cpu.yaml", ["data.dataset=imagefolder", f"data.root={tmp_path / 'none'}"])
    with pytest.raises(ConfigError, match="data.root .*none does not exist"):
        check_environment(cfg, 1)
    cfg = load_config("configs/demo_cpu.yaml", ["train.batch_size=10", "train.accum_steps=2"])
    check_environment(cfg, 1)
    with pytest.raises(ConfigError, match=r"train.batch_size=10 must be divisible by the world size 2 x "
                       r"train.accum_steps=2 = 4"):
        check_environment(cfg, 2)
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(ConfigError, match="world size 3"):
        check_environment(cfg)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="train.device=cuda but no CUDA device is visible"):
        check_environment(load_config("configs/demo_cpu.yaml", ["train.device=cuda"]), 1)


def test_a_key_given_twice_is_named_with_both_lines(tmp_path):
    p = tmp_path / "twice.yaml"
    p.write_text("train:\n  steps: 10\nmodel:\n  size: tiny\ntrain:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=r"twice.yaml gives 'train' twice \(lines 1 and 5\)"):
        load_config(p)
    p.write_text("train:\n  steps: 10\n  lr: 0.1\n  steps: 20\n")
    with pytest.raises(ConfigError, match=r"gives 'train.steps' twice \(lines 2 and 4\)"):
        load_config(p)
    p.write_text("train:\n  steps: 10\ntrain.steps: 20\n")  # the dotted form is the same key
    with pytest.raises(ConfigError, match=r"gives 'train.steps' twice \(lines 2 and 3\)"):
        load_config(p)
    p.write_text("train:\n  steps: 10\ntrain.lr: 0.5\nbase: &b {steps: 3}\n")  # distinct keys still merge
    with pytest.raises(ConfigError, match="unknown config key 'base.steps'"):
        load_config(p)
    p.write_text("train:\n  steps: 10\ntrain.lr: 0.5\n")
    cfg = load_config(p)
    assert (cfg.train.steps, cfg.train.lr) == (10, 0.5)


def test_the_config_imports_neither_torch_nor_a_heavy_module():
    import subprocess
    import sys

    code = ("import sys, iwm_fast.config\n"
            "print(' '.join(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', 'triton', 'PIL')"
            " or m.startswith('iwm_fast.'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    light = {"iwm_fast._lazy", "iwm_fast.backends", "iwm_fast.config", "iwm_fast.kernels", "iwm_fast.data",
             "iwm_fast.data.choices", "iwm_fast.models", "iwm_fast.models.choices", "iwm_fast.train",
             "iwm_fast.train.choices", "iwm_fast.transforms", "iwm_fast.transforms.config"}
    assert set(loaded) <= light, sorted(set(loaded) - light)


def test_the_lazy_packages_export_every_name_they_list():
    """Their names are imported on first use: a name mapped to the wrong submodule fails here, not in a user's
    script."""
    import importlib

    for package in ("iwm_fast.models", "iwm_fast.data", "iwm_fast.transforms"):
        module = importlib.import_module(package)
        namespace = {}
        exec(f"from {package} import *", namespace)
        assert set(module.__all__) <= set(namespace) and set(module.__all__) <= set(dir(module)), package
    from iwm_fast.models import VIT_SIZES, build_iwm, vit_tiny
    from iwm_fast.models.choices import VIT_SIZES as owned

    assert VIT_SIZES is owned and build_iwm.__module__ == "iwm_fast.models.factory" and callable(vit_tiny)


def test_each_section_validates_itself():
    from iwm_fast.config import DataConfig, MaskConfig, ModelConfig, PredictorConfig, TrainConfig

    ModelConfig().validate()
    with pytest.raises(ConfigError, match="model.size must be one of"):
        ModelConfig(size="enormous").validate()
    with pytest.raises(ConfigError, match="predictor.depth must be an integer >= 1 when predictor.preset is"):
        PredictorConfig(preset="").validate()
    with pytest.raises(ConfigError, match="data.decode must be one of 'cpu', 'gpu'"):
        DataConfig(decode="tpu").validate()
    with pytest.raises(ConfigError, match="masks.min_keep"):
        MaskConfig(min_keep=-1).validate()
    with pytest.raises(ConfigError, match="train.term_grace_s must be a finite number"):
        TrainConfig(term_grace_s=float("nan")).validate()


def test_every_name_the_config_accepts_is_one_its_owner_runs():
    """The config checks against the owners' tuples; each name in them works where it is used."""
    import importlib

    import torch

    from iwm_fast import backends
    from iwm_fast.data import registry
    from iwm_fast.data.choices import DATASETS
    from iwm_fast.models import IWMPredictor, jepa_loss
    from iwm_fast.models.choices import CONDITIONINGS, LOSSES, TARGET_MODES
    from iwm_fast.train.choices import PRECISIONS
    from iwm_fast.train.parallel import resolve_precision

    ops = [importlib.import_module(f"iwm_fast.ops.{name}") for name in ("attention", "ema", "gather", "rope")]
    assert [op.BACKENDS for op in ops] == [backends.ATTENTION, backends.EMA, backends.GATHER, backends.ROPE]
    assert registry.names()[:len(DATASETS)] == DATASETS
    assert {resolve_precision(p, "cpu") for p in PRECISIONS} == {"fp32", "bf16", "fp16"}
    x = torch.randn(2, 3)
    assert all(torch.isfinite(jepa_loss(x, x + 1, kind)) for kind in LOSSES)
    for conditioning in CONDITIONINGS:
        for mode in TARGET_MODES:
            load_config(None, [f"predictor.conditioning={conditioning}", f"predictor.target_mode={mode}"])
            IWMPredictor((2, 2), 8, 8, depth=1, num_heads=2, conditioning=conditioning, target_mode=mode,
                         action_dim=0 if conditioning == "none" else 4)


def test_a_dataset_registered_at_run_time_is_accepted(monkeypatch):
    from iwm_fast.data import choices, registry

    with pytest.raises(ConfigError, match="data.dataset must be one of 'digits', 'imagefolder', 'shards', got"):
        load_config(None, ["data.dataset=mine"])
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(choices, "_added", [])
    registry.register("mine", build=lambda data, **kw: None, eval_split=lambda data, **kw: None)
    assert load_config(None, ["data.dataset=mine"]).data.dataset == "mine"
