"""The training objects of a run: the sharded model, its optimizer and (fp16) grad scaler.

The engine and the end-to-end benchmark both build them here, so the benchmark times the engine's own setup.
"""
import dataclasses

from ..backends import Backends
from ..models import build_iwm
from .parallel import parallelize, resolve_precision
from .step import build_optimizer


@dataclasses.dataclass
class Training:
    model: object
    optimizer: object
    scaler: object          # ShardedGradScaler for fp16, else None
    precision: str
    backends: Backends


def build_training(cfg, *, device, world_size, backends=None, compile_backend="inductor"):
    """FSDP2-sharded IWM of ``cfg`` on ``device`` (``train.compile`` compiles every block with
    ``compile_backend``), fused AdamW, and a grad scaler when the precision is fp16."""
    t = cfg.train
    backends = backends or Backends(attention=cfg.model.attn_backend)
    precision = resolve_precision(t.precision, device)
    model = build_iwm(cfg, backends).to(device)
    model = parallelize(model, device=device, world_size=world_size, precision=precision, compile_blocks=t.compile,
                        compile_backend=compile_backend, activation_checkpointing=t.activation_checkpointing)
    optimizer = build_optimizer(model, lr=t.lr)
    scaler = None
    if precision == "fp16":
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
        scaler = ShardedGradScaler()
    return Training(model, optimizer, scaler, precision, backends)
