"""Per-step metrics (CSV and TensorBoard, rank 0 only), a console progress bar, and an MFU estimate."""
import csv
import os
import sys

import torch

# Per step: loss, schedules and ``nonfinite`` (1: the loss was not finite and the update was skipped). Per log
# window, on its last step's row: throughput, step time, data wait, peak memory and MFU over the window.
FIELDS = ["step", "loss", "lr", "wd", "momentum", "images_per_s", "step_time_s", "data_wait_frac",
          "peak_mem_mb", "mfu", "nonfinite"]

# Dense bf16 tensor-core peaks (TFLOP/s) for the MFU estimate, by device-name fragment.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def peak_flops(device):
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def _linear_flops(module, tokens):
    """2 * weights * tokens for every Linear in ``module`` (attention scores are added separately)."""
    n = sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))
    return 2 * n * tokens


def step_flops(model, batch, num_ctx, pred_seqs, pred_seq_len):
    """Approximate training FLOPs of one IWM step: forward+backward (3x) for the context encoder and the
    predictor (``pred_seqs`` sequences of ``pred_seq_len`` tokens), forward only for the target encoder."""
    enc, pred = model.encoder, model.predictor
    N, D = enc.num_patches, enc.embed_dim
    Dp = pred.predictor_embed.out_features
    depth, pdepth = len(enc.blocks), len(pred.predictor_blocks)
    target = _linear_flops(model.target_encoder, batch * N) + depth * 4 * batch * N * N * D
    context = _linear_flops(enc, batch * num_ctx) + depth * 4 * batch * num_ctx ** 2 * D
    predictor = (_linear_flops(pred, pred_seqs * pred_seq_len)
                 + pdepth * 4 * pred_seqs * pred_seq_len ** 2 * Dp)
    return target + 3 * (context + predictor)


class MetricsLogger:
    def __init__(self, run_dir, enabled=True, resume_step=0):
        self.enabled = enabled
        self.path = os.path.join(run_dir, "metrics.csv")
        self._tb = None
        if not enabled:
            return
        kept = []
        if resume_step > 0 and os.path.exists(self.path):
            # Rows logged after the checkpoint we resume from are recomputed: drop them so each step appears once.
            with open(self.path, newline="") as f:
                kept = [r for r in csv.DictReader(f) if r.get("step") and int(r["step"]) <= resume_step]
        self._file = open(self.path, "w", newline="")
        self._csv = csv.DictWriter(self._file, fieldnames=FIELDS)
        self._csv.writeheader()
        self._csv.writerows(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except Exception as e:  # TensorBoard is optional for a run; the CSV is the record
            print(f"[iwm-fast] TensorBoard logging off: {e}", file=sys.stderr)

    def log(self, row):
        if not self.enabled:
            return
        self._csv.writerow({k: row.get(k, "") for k in FIELDS})
        self._file.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and v == v:
                    self._tb.add_scalar(f"train/{k}", v, row["step"])

    def close(self):
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def progress_bar(total, start=0, enabled=True):
    """tqdm over the run's steps, advanced at log steps (with the window's loss and images/s)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="train", mininterval=1.0)
