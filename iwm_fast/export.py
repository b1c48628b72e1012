"""Export a trained IWM: the target encoder for Hugging Face transformers, or our own safetensors / torch files.

``export_model(cfg, model, step, out, what, fmt, dtype)`` writes the directory ``out``:

- ``fmt="hf"`` (target encoder only): ``config.json`` and ``model.safetensors`` that
  ``transformers.IJepaModel.from_pretrained(out)`` loads, giving the target encoder's features (our ViT and
  transformers' I-JEPA are the same network: patch embedding, added position table, pre-norm blocks, final
  LayerNorm; ``qkv`` is split into ``q_proj``/``k_proj``/``v_proj``), and ``preprocessor_config.json`` for
  ``AutoImageProcessor`` (ImageNet mean and std, the training resolution). Needs transformers (``iwm-fast[hf]``).
- ``fmt="safetensors"``: ``target_encoder.safetensors`` (I-JEPA parameter names) or ``world_model.safetensors``
  (the whole IWM), with the run's config and step in its metadata and beside it as ``config.yaml``.
- ``fmt="pt"``: ``target_encoder.pt`` (a plain state dict, as ``RUN_DIR/target_encoder.pt``) or
  ``world_model.pt`` (``WorldModel.save``'s format, which ``WorldModel.load`` reads).

``dtype`` (fp32, bf16, fp16) casts the floating-point tensors; bf16 and fp16 halve the size. Everything is
written into a temporary sibling folder that is renamed to ``out`` only when complete, so an interrupted export
leaves no partial ``out``. ``iwm-export`` (``main``) is the command line; bad input is one line and exit 2.
"""
import argparse
import json
import os
import shutil
import sys

import torch

from .run_dir import RunDir

WHATS = ("target_encoder", "world_model")
FORMATS = ("hf", "safetensors", "pt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class ExportError(ValueError):
    """Input that cannot be exported; the message is one line naming the problem."""


def check_request(out, what, fmt, dtype):
    if what not in WHATS:
        raise ExportError(f"--what must be one of {', '.join(WHATS)}, got {what!r}")
    if fmt not in FORMATS:
        raise ExportError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if dtype not in DTYPES:
        raise ExportError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if fmt == "hf" and what != "target_encoder":
        raise ExportError("--format hf exports the target encoder only (transformers has no IWM predictor); use "
                          "--format safetensors or pt for the world model")
    if os.path.exists(out) and not (os.path.isdir(out) and not os.listdir(out)):
        raise ExportError(f"{out} already exists and is not an empty folder; choose a new output path")


def _cast(state, dtype):
    return {k: (v.detach().to("cpu", DTYPES[dtype]) if v.is_floating_point() else v.detach().cpu()).contiguous()
            for k, v in state.items()}


def hf_state_dict(encoder_state):
    """Our target-encoder keys (I-JEPA's names) -> transformers' ``IJepaModel`` keys."""
    out = {"embeddings.patch_embeddings.projection.weight": encoder_state["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": encoder_state["patch_embed.proj.bias"],
           "embeddings.position_embeddings": encoder_state["pos_embed"],
           "layernorm.weight": encoder_state["norm.weight"], "layernorm.bias": encoder_state["norm.bias"]}
    renames = {"norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
               "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    depth = 1 + max(int(k.split(".")[1]) for k in encoder_state if k.startswith("blocks."))
    for i in range(depth):
        for ours, theirs in renames.items():
            for p in ("weight", "bias"):
                out[f"layers.{i}.{theirs}.{p}"] = encoder_state[f"blocks.{i}.{ours}.{p}"]
        for p in ("weight", "bias"):
            key = f"blocks.{i}.attn.qkv.{p}"
            if key in encoder_state:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), encoder_state[key].chunk(3, 0)):
                    out[f"layers.{i}.attention.{name}.{p}"] = part
    return out


def hf_config(encoder, image_size):
    """transformers' ``IJepaConfig`` for our ViT encoder."""
    from transformers import IJepaConfig

    from .layers.block import LN_EPS

    block = encoder.blocks[0]
    return IJepaConfig(hidden_size=encoder.embed_dim, num_hidden_layers=len(encoder.blocks),
                       num_attention_heads=encoder.num_heads, intermediate_size=block.mlp.fc1.out_features,
                       hidden_act="gelu", layer_norm_eps=LN_EPS, image_size=image_size,
                       patch_size=encoder.patch_size, num_channels=encoder.in_chans,
                       qkv_bias=block.attn.qkv.bias is not None)


def _write_hf(model, cfg, tmp, dtype):
    try:
        from transformers import IJepaModel
    except ImportError:
        raise ExportError("--format hf needs transformers: pip install 'iwm-fast[hf]'") from None
    from .transforms import IMAGENET_MEAN, IMAGENET_STD

    encoder = model.target_encoder
    config = hf_config(encoder, cfg.data.image_size)
    hf_model = IJepaModel(config)
    hf_model.load_state_dict(hf_state_dict(encoder.state_dict()), strict=True)
    hf_model.to(DTYPES[dtype]).save_pretrained(tmp)
    size = {"height": cfg.data.image_size, "width": cfg.data.image_size}
    processor = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": size, "resample": 3,
                 "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
                 "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD)}
    with open(os.path.join(tmp, "preprocessor_config.json"), "w") as f:
        json.dump(processor, f, indent=2)


def _write_ours(cfg, model, step, tmp, what, fmt, dtype):
    from .config import to_dict

    state = model.target_encoder.state_dict() if what == "target_encoder" else model.state_dict()
    state = _cast(state, dtype)
    config = to_dict(cfg)
    if fmt == "pt" and what == "world_model":
        from .world_model import _FORMAT
        torch.save({"format": _FORMAT, "config": config, "step": step, "state_dict": state},
                   os.path.join(tmp, "world_model.pt"))
    elif fmt == "pt":
        torch.save(state, RunDir(tmp).export_path)  # the name and format of a run's own export
    else:
        import yaml
        from safetensors.torch import save_file

        meta = {"format": "iwm-fast", "what": what, "step": str(step), "config": json.dumps(config)}
        save_file(state, os.path.join(tmp, f"{what}.safetensors"), metadata=meta)
        with open(RunDir(tmp).config_path, "w") as f:  # named as in a run directory
            yaml.safe_dump(config, f, sort_keys=False)


def export_model(cfg, model, step, out, what="target_encoder", fmt="hf", dtype="fp32"):
    """Write ``model`` (an ``IWM`` built from ``cfg``, at training step ``step``) to the new folder ``out``."""
    check_request(out, what, fmt, dtype)
    out = os.path.abspath(out)
    tmp = f"{out}.tmp-export-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        if fmt == "hf":
            _write_hf(model, cfg, tmp, dtype)
        else:
            _write_ours(cfg, model, step, tmp, what, fmt, dtype)
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above); a folder cannot be renamed over
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_run(run_dir, device="cpu"):
    """(cfg, model, step) of a run directory: its config and the newest checkpoint that verifies."""
    if not os.path.isdir(run_dir):
        raise ExportError(f"{run_dir} is not a folder (expected a run directory)")
    loaded = RunDir(run_dir).load_model(device)
    return loaded.cfg, loaded.model.eval(), loaded.step


def main(argv=None):
    parser = argparse.ArgumentParser(prog="iwm-export", description="Export a trained run's target encoder "
                                     "(for transformers, or as safetensors/torch) or its whole world model.")
    parser.add_argument("run_dir")
    parser.add_argument("out", help="a new folder (or an empty one) to write")
    parser.add_argument("--what", default="target_encoder", help=" | ".join(WHATS))
    parser.add_argument("--format", dest="fmt", default="hf", help=" | ".join(FORMATS))
    parser.add_argument("--dtype", default="fp32", help=" | ".join(DTYPES))
    args = parser.parse_args(argv)
    from .train.checkpoint import CheckpointError
    from .config import ConfigError

    try:
        check_request(args.out, args.what, args.fmt, args.dtype)
        cfg, model, step = load_run(args.run_dir)
        out = export_model(cfg, model, step, args.out, args.what, args.fmt, args.dtype)
    except (ExportError, ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"iwm-export: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.what}, {args.fmt}, {args.dtype}, step {step})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
