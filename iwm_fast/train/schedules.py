"""Per-step schedules: learning rate (linear warmup, cosine decay), weight decay and EMA momentum.

Each is a pure function of the step, so a resumed run recomputes them exactly instead of storing them.
"""
import math


def lr_at(step, *, total, warmup, start_lr, peak_lr, final_lr):
    if step < warmup:
        return start_lr + (peak_lr - start_lr) * step / max(1, warmup)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return final_lr + 0.5 * (peak_lr - final_lr) * (1.0 + math.cos(math.pi * progress))


def weight_decay_at(step, *, total, start, end):
    """Cosine from ``start`` to ``end`` (I-JEPA raises it from 0.04 to 0.4)."""
    progress = min(1.0, step / max(1, total))
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def momentum_at(step, *, total, start, end):
    """Linear from ``start`` to ``end`` over training (EMA momentum 0.996 -> 1.0)."""
    progress = min(1.0, step / max(1, total))
    return start + (end - start) * progress


def schedules_at(step, train_cfg):
    t = train_cfg
    return {
        "lr": lr_at(step, total=t.steps, warmup=t.warmup_steps, start_lr=t.start_lr, peak_lr=t.lr,
                    final_lr=t.final_lr),
        "wd": weight_decay_at(step, total=t.steps, start=t.weight_decay[0], end=t.weight_decay[1]),
        "momentum": momentum_at(step, total=t.steps, start=t.ema_momentum[0], end=t.ema_momentum[1]),
    }
