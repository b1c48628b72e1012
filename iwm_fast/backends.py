"""Which implementation of each swappable piece a model and its training step use, and the names of them all.

The tuples below are the one list of each op's backends: ``iwm_fast.ops`` and the run config import them.

One ``Backends`` value is passed down: to the model factory (attention and gather, kept by the layers, the
way ``attn_backend`` always was) and to the training step (EMA and mask sampler). The end-to-end benchmark's
configurations are only different ``Backends`` values, so nothing is rebound at run time.
"""
import dataclasses

ATTENTION = ("auto", "triton", "sdpa", "eager", "flash_attn", "xformers")
GATHER = ("auto", "triton", "torch", "ijepa")
EMA = ("auto", "triton", "foreach", "loop")
ROPE = ("auto", "triton", "torch")  # iwm_fast.ops.apply_rope's; a model's rotary layers follow its attention
MASKS = ("auto", "cpp", "cuda", "torch", "ijepa")  # iwm_fast.masks.sample_block_masks's (its docstring says which)


@dataclasses.dataclass(frozen=True)
class Backends:
    """``attention``: ``iwm_fast.ops.attention``'s backend (``eager`` = I-JEPA's softmax with the score matrix
    materialised). ``gather``: ``iwm_fast.ops.masked_gather``'s (``torch`` = ``torch.gather`` on an expanded
    index, ``ijepa`` = I-JEPA's repeated index and ``cat``). ``ema``: ``iwm_fast.ops.ema_update_``'s
    (``foreach`` = ``torch._foreach_lerp_``, ``loop`` = I-JEPA's per-parameter loop). ``masks``:
    ``iwm_fast.masks.sample_block_masks``'s; the training step samples on the training device with ``cuda`` (its
    CUDA kernels read the batch's token counts back: one host sync per step, opt-in) and on the host otherwise,
    copying the masks asynchronously (``auto``, the default: our C++ sampler; ``ijepa``: I-JEPA's per-sample
    loop). For the kernels, ``auto`` = the fused Triton kernel on CUDA and a PyTorch path elsewhere."""
    attention: str = "auto"
    gather: str = "auto"
    ema: str = "auto"
    masks: str = "auto"

    def __post_init__(self):
        for field, allowed in (("attention", ATTENTION), ("gather", GATHER), ("ema", EMA), ("masks", MASKS)):
            value = getattr(self, field)
            if value not in allowed:
                raise ValueError(f"Backends.{field}={value!r} is not one of {', '.join(allowed)}")


FUSED = Backends()
