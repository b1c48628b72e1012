"""FSDP2 wrapping of the IWM model: one unit per transformer block, then the root.

The same code path runs on one CPU process (gloo, world size 1), under torchrun, and on many GPU nodes.
"""
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .choices import PRECISIONS

# The parameter dtype of each precision but "auto" (fp32: the parameters' own).
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def resolve_precision(precision, device):
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if torch.device(device).type == "cuda" else "fp32"
    return precision


def _wrap_blocks(blocks, *, mesh, mp, compile_blocks, compile_backend, checkpoint_blocks):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for i in range(len(blocks)):
        block = blocks[i]
        if checkpoint_blocks:
            block = checkpoint_wrapper(block)
        if compile_blocks:
            block.compile(backend=compile_backend, dynamic=True)  # the masks change the token counts every step
        fully_shard(block, mesh=mesh, mp_policy=mp)
        blocks[i] = block


def parallelize(model, *, device, world_size, precision="fp32", compile_blocks=False, compile_backend="inductor",
                activation_checkpointing=False):
    """Shard ``model`` (an ``IWM``) with FSDP2 over all ranks.

    bf16/fp16 parameters for compute and fp32 gradient reduction; the target encoder is sharded exactly like the
    context encoder, so the EMA pairs up local shards. Activation checkpointing applies to the blocks that
    receive gradients (context encoder and predictor); the target encoder runs without autograd.
    """
    mesh = init_device_mesh(torch.device(device).type, (world_size,))
    dtype = DTYPES[precision]
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if dtype else MixedPrecisionPolicy()
    for blocks, ac in ((model.encoder.blocks, activation_checkpointing),
                       (model.target_encoder.blocks, False),
                       (model.predictor.predictor_blocks, activation_checkpointing)):
        _wrap_blocks(blocks, mesh=mesh, mp=mp, compile_blocks=compile_blocks, compile_backend=compile_backend,
                     checkpoint_blocks=ac)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model
