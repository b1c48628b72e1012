"""Fine-tuning of a pretrained run on a labelled dataset, through the training engine's pieces.

Process group and device (``train.distributed.init_distributed``), FSDP2 (``fully_shard`` per block, then the root),
atomic resumable checkpoints (``train.checkpoint``), metrics CSV and TensorBoard (``train.metrics.MetricsLogger``),
a tqdm bar per epoch. The data are the run's own evaluation splits (``train.evaluate.eval_splits``: the digits'
train/val split, or a seeded 80/20 split of an image folder).
"""
import dataclasses
import json
import logging
import math
import os
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..eval.progress import progress_bar
from ..models import build_iwm
from ..train import checkpoint as ckpt
from ..config import load_config
from ..train.metrics import MetricsLogger
from ..train.schedules import lr_at
from .models import EncoderClassifier, PredictorClassifier, trainable_params

log = logging.getLogger("iwm_fast")

PROTOCOLS = ("predictor", "encoder", "probe")
PREDICTOR_INITS = ("pretrained", "random")


@dataclasses.dataclass
class FinetuneArgs:
    protocol: str = "predictor"
    epochs: int = 5
    lr: float = 1e-3
    batch_size: int = 64
    seed: int = 0
    predictor_init: str = "pretrained"
    weight_decay: float = 0.05
    data_root: str = ""           # an image folder to fine-tune on instead of the run's own data

    def validate(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if self.predictor_init not in PREDICTOR_INITS:
            raise ValueError(f"unknown predictor init {self.predictor_init!r}; choose {' or '.join(PREDICTOR_INITS)}")
        if self.predictor_init == "random" and self.protocol != "predictor":
            raise ValueError("--predictor-init random applies to --protocol predictor only")
        for name in ("epochs", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight decay must be a finite number >= 0, got {self.weight_decay}")
        if self.data_root and not os.path.isdir(self.data_root):
            raise ValueError(f"data root {self.data_root} is not a folder")
        return self

    @property
    def name(self):
        """Output name: ``finetune_<protocol>``, with ``_random`` for the randomly initialised predictor."""
        return f"finetune_{self.protocol}" + ("_random" if self.predictor_init == "random" else "")


def _run_config(run_dir, args):
    path = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} is not a run directory: it has no config.yaml")
    overrides = ["data.dataset=imagefolder", f"data.root={args.data_root}"] if args.data_root else []
    return load_config(path, overrides)


def _pretrained(run_dir, cfg):
    path = ckpt.latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    if path is None:
        raise FileNotFoundError(f"{run_dir} holds no complete checkpoint to fine-tune (train it first)")
    model = build_iwm(cfg)
    meta = ckpt.load_checkpoint(path, model)  # also restores the pretraining RNG: seed only after this
    return model, meta["step"]


def _splits(cfg):
    from ..train.evaluate import eval_splits

    (xtr, ytr), (xva, yva) = eval_splits(cfg)
    return xtr.float().div_(255.0) if xtr.dtype == torch.uint8 else xtr, ytr, \
        xva.float().div_(255.0) if xva.dtype == torch.uint8 else xva, yva


def _build(args, cfg, model, num_classes):
    if args.protocol == "predictor":
        predictor = model.predictor
        if args.predictor_init == "random":  # the paper's control: same architecture, no world model learned
            predictor = build_iwm(cfg, seed=args.seed + 1).predictor
        return PredictorClassifier(model.target_encoder, predictor, num_classes)
    return EncoderClassifier(model.target_encoder.requires_grad_(True), num_classes)


def _shard(net, device, world):
    """FSDP2: one unit per transformer block (frozen or trained), then the root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    for module in net.modules():
        blocks = getattr(module, "blocks", None) or getattr(module, "predictor_blocks", None)
        if isinstance(blocks, torch.nn.ModuleList):
            for block in blocks:
                fully_shard(block, mesh=mesh)
    fully_shard(net, mesh=mesh)
    return net


def _optimizer(net, args):
    decay = [p for n, p in net.named_parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for n, p in net.named_parameters() if p.requires_grad and p.dim() <= 1]
    return torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)


@torch.no_grad()
def _recompute_norm_stats(net, x, batch_size, device, max_images=512):
    """Set the head's BatchNorm statistics from the current weights on the first ``max_images`` training images.

    Its running averages lag behind a network that is still changing, and after a short run they still hold
    much of their initial variance of 1 (0.9 ** 46 after two digits epochs), which swamps the ~1e-5 variance of
    a predictor's pooled output. Every rank uses the same images, so their statistics agree.
    """
    norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    was = net.training
    net.train()
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches below
    for s in range(0, min(max_images, x.shape[0]), batch_size):
        net(x[s:s + batch_size].to(device))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    net.train(was)


@torch.no_grad()
def _accuracy(net, x, y, batch_size, device):
    was = net.training
    net.eval()
    correct = 0
    for s in range(0, x.shape[0], batch_size):
        logits = net(x[s:s + batch_size].to(device))
        correct += (logits.argmax(1).cpu() == y[s:s + batch_size]).sum().item()
    net.train(was)
    return correct / x.shape[0]


def _write_json(path, results):
    fd, tmp = tempfile.mkstemp(prefix=".finetune.", suffix=".json.tmp", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _probe(run_dir, args, cfg, model, data):
    from ..eval.features import extract_features
    from ..eval.probe import fit_linear_probe

    xtr, ytr, xva, yva = data
    enc = model.target_encoder

    def features(x, bar):
        out = []
        for s in range(0, x.shape[0], 256):
            out.append(extract_features(enc, x[s:s + 256]))
            bar.update(out[-1].shape[0])
        return torch.cat(out)

    with progress_bar(xtr.shape[0] + xva.shape[0], "finetune_probe: features", "img") as bar:
        ftr, fva = features(xtr, bar), features(xva, bar)
    res = fit_linear_probe(ftr, ytr, fva, yva, epochs=cfg.eval.probe_epochs, seed=args.seed)
    classes = res.num_classes
    return res.accuracy, enc.embed_dim * classes + classes, None


def run_finetune(run_dir, args: FinetuneArgs):
    """Fine-tune ``run_dir``'s model by ``args.protocol``; returns ``(results, model)``; writes no JSON."""
    from ..train.distributed import init_distributed

    args.validate()
    cfg = _run_config(run_dir, args)
    t0 = time.perf_counter()
    rank, world, device = init_distributed(cfg.train.device)
    model, pre_step = _pretrained(run_dir, cfg)
    data = _splits(cfg)
    num_classes = int(max(data[1].max(), data[3].max())) + 1
    if args.protocol == "probe":
        acc, n_params, net = _probe(run_dir, args, cfg, model, data)
        steps = 0
    else:
        history, n_params, net, steps = _train(run_dir, args, cfg, model, data, num_classes, rank, world, device)
        acc = history[-1]
    results = {"accuracy": acc, "protocol": args.protocol, "predictor_init": args.predictor_init
               if args.protocol == "predictor" else None, "trainable_params": n_params,
               "seconds": time.perf_counter() - t0, "epochs": args.epochs if args.protocol != "probe" else None,
               "lr": args.lr, "batch_size": args.batch_size, "seed": args.seed, "steps": steps,
               "pretrain_step": pre_step, "num_classes": num_classes, "train_images": int(data[0].shape[0]),
               "val_images": int(data[2].shape[0]), "world_size": world}
    if args.protocol != "probe":
        results["val_accuracy_per_epoch"] = history
    return results, net


def _train(run_dir, args, cfg, model, data, num_classes, rank, world, device):
    xtr, ytr, xva, yva = data
    if args.batch_size % world:
        raise ValueError(f"batch size {args.batch_size} must be divisible by the {world} ranks")
    steps_per_epoch = xtr.shape[0] // args.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"batch size {args.batch_size} exceeds the {xtr.shape[0]} training images")
    total = steps_per_epoch * args.epochs
    out_dir = os.path.join(run_dir, args.name)
    ckpt_dir = os.path.join(out_dir, "checkpoints")
    torch.manual_seed(args.seed)  # the head's init (after the checkpoint load restored pretraining's RNG)
    net = _build(args, cfg, model, num_classes)
    n_params = trainable_params(net)
    net = _shard(net.to(device), device, world)
    opt = _optimizer(net, args)
    start_epoch, history = 0, []
    last = ckpt.latest_checkpoint(ckpt_dir)
    if last is not None:
        meta = ckpt.load_checkpoint(last, net, opt)
        if meta.get("args") != dataclasses.asdict(args):
            raise ValueError(f"{out_dir} holds a fine-tuning with other settings ({meta.get('args')}); "
                             "delete it or give the same options")
        start_epoch, history = meta["epoch"], meta["val_accuracy"]
        if rank == 0:
            log.info("resumed %s from %s (epoch %d)", args.name, last, start_epoch)
    os.makedirs(out_dir, exist_ok=True)
    logger = MetricsLogger(out_dir, enabled=rank == 0, resume_step=start_epoch * steps_per_epoch)
    micro = args.batch_size // world
    net.train()
    try:
        for epoch in range(start_epoch, args.epochs):
            perm = torch.randperm(xtr.shape[0], generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
            with progress_bar(steps_per_epoch, f"{args.name} epoch {epoch + 1}/{args.epochs}", "step",
                              enabled=rank == 0) as bar:
                for i in range(steps_per_epoch):
                    step = epoch * steps_per_epoch + i
                    t_start = time.perf_counter()
                    idx = perm[i * args.batch_size:(i + 1) * args.batch_size][rank::world]
                    lr = lr_at(step, total=total, warmup=max(1, total // 10), start_lr=0.0, peak_lr=args.lr,
                               final_lr=0.0)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    loss = F.cross_entropy(net(xtr[idx].to(device)), ytr[idx].to(device))
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    value = loss.detach()
                    if world > 1:
                        dist.all_reduce(value)
                        value /= world
                    dt = time.perf_counter() - t_start
                    logger.log({"step": step + 1, "loss": value.item(), "lr": lr, "step_time_s": dt,
                                "images_per_s": micro * world / dt})
                    bar.set_postfix(loss=f"{value.item():.3f}", refresh=False)
                    bar.update(1)
            _recompute_norm_stats(net, xtr, args.batch_size, device)
            val = _accuracy(net, xva, yva, args.batch_size, device)
            history.append(val)
            if rank == 0:
                log.info("%s epoch %d/%d: validation accuracy %.4f", args.name, epoch + 1, args.epochs, val)
            ckpt.save_checkpoint(ckpt_dir, (epoch + 1) * steps_per_epoch, net, opt,
                                 {"epoch": epoch + 1, "args": dataclasses.asdict(args), "val_accuracy": history},
                                 keep=1)
    finally:
        logger.close()
    return history, n_params, net, total


def finetune(run_dir, args: FinetuneArgs):
    """Run the protocol and write ``RUN_DIR/<args.name>.json`` (rank 0); returns the results dict."""
    results, _ = run_finetune(run_dir, args)
    if not dist.is_initialized() or dist.get_rank() == 0:
        _write_json(os.path.join(run_dir, f"{args.name}.json"), results)
    return results
