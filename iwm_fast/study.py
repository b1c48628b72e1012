"""The IWM paper's study in miniature: I-JEPA, a small-predictor IWM and a large-predictor IWM, same budget.

    python -m iwm_fast.study [--out runs/study] [--steps 250] [--finetune-epochs 5] [--seed 0]

Each variant is the demo recipe (``configs/demo_cpu.yaml``) with only the predictor changed; each is trained and
evaluated by the engine (probe, MRR), then its predictor is fine-tuned on the frozen encoder (``iwm-finetune
--protocol predictor``) and, as the paper's control, the same predictor architecture is fine-tuned from random
initialisation. Writes ``OUT/study.csv``, ``OUT/study.md`` and ``OUT/study.png``. The paper's direction:
MRR at chance without conditioning, rising with predictor capacity; equivariant features probe worse but
fine-tune better through the predictor.
"""
import argparse
import csv
import json
import logging
import os
import sys

VARIANTS = (  # name, what it is, overrides of the demo config (whose predictor is the large one, 6x192)
    # as in the paper's table: I-JEPA and the small IWM share one predictor size, the large IWM is deeper
    ("ijepa", "I-JEPA (no conditioning), predictor 2x192", ["predictor.conditioning=none", "predictor.depth=2"]),
    ("iwm_small", "IWM, predictor 2x192", ["predictor.depth=2"]),
    ("iwm_large", "IWM, predictor 6x192", ["predictor.depth=6"]),
)
COLUMNS = ("variant", "description", "mrr", "mrr_chance", "probe_acc", "probe_acc_random", "finetune_predictor_acc",
           "finetune_predictor_random_acc", "finetune_predictor_params", "train_steps")


def run_variant(name, overrides, *, out, steps, seed, finetune_epochs, config="configs/demo_cpu.yaml",
                finetune_batch_size=64):
    from .finetune import FinetuneArgs, finetune
    from .config import load_config
    from .train.loop import train

    run_dir = os.path.join(out, name)
    cfg = load_config(config, overrides + [f"train.out_dir={run_dir}", f"train.steps={steps}",
                                           f"train.seed={seed}"])
    train(cfg)
    with open(os.path.join(run_dir, "eval.json")) as f:
        ev = json.load(f)
    ft = {init: finetune(run_dir, FinetuneArgs(protocol="predictor", epochs=finetune_epochs, seed=seed,
                                               batch_size=finetune_batch_size, predictor_init=init))
          for init in ("pretrained", "random")}
    return {"mrr": ev["mrr"], "mrr_chance": ev["mrr_chance"], "probe_acc": ev["probe_acc"],
            "probe_acc_random": ev["probe_acc_random"], "finetune_predictor_acc": ft["pretrained"]["accuracy"],
            "finetune_predictor_random_acc": ft["random"]["accuracy"],
            "finetune_predictor_params": ft["pretrained"]["trainable_params"], "train_steps": steps}


def write_table(rows, out):
    with open(os.path.join(out, "study.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    head = ("variant", "MRR (chance)", "probe (random init)", "predictor fine-tune (random init)")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['description']} | {r['mrr']:.3f} ({r['mrr_chance']:.3f}) | {r['probe_acc']:.3f} "
                     f"({r['probe_acc_random']:.3f}) | {r['finetune_predictor_acc']:.3f} "
                     f"({r['finetune_predictor_random_acc']:.3f}) |")
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def plot(rows, out):
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), dpi=100)
    try:
        for ax, (key, title, ref) in zip(axes, (("mrr", "world-model MRR", "mrr_chance"),
                                                  ("probe_acc", "linear probe", "probe_acc_random"),
                                                  ("finetune_predictor_acc", "predictor fine-tune",
                                                   "finetune_predictor_random_acc"))):
            ax.bar(names, [r[key] for r in rows], color=["tab:gray", "tab:blue", "tab:orange"][:len(rows)])
            if ref:
                for i, r in enumerate(rows):
                    ax.hlines(r[ref], i - 0.4, i + 0.4, colors="k", linestyles="dashed")
            ax.set_title(title + (" (dashed: chance)" if ref == "mrr_chance" else
                                  " (dashed: random init)" if ref else ""), fontsize=9)
            ax.tick_params(axis="x", labelsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(out, "study.png"))
    finally:
        plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m iwm_fast.study", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/study")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--finetune-epochs", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finetune-batch-size", type=int, default=64)
    p.add_argument("--only", nargs="*", choices=[v[0] for v in VARIANTS], help="run only these variants")
    p.add_argument("overrides", nargs="*", help="key=value config overrides applied to every variant")
    a = p.parse_args(argv)
    if a.steps < 1 or a.finetune_epochs < 1:
        p.error("--steps and --finetune-epochs must be positive")
    logging.basicConfig(level=logging.INFO, format="[iwm-fast] %(message)s", stream=sys.stderr)
    os.makedirs(a.out, exist_ok=True)
    rows = []
    for name, desc, overrides in VARIANTS:
        if a.only and name not in a.only:
            continue
        logging.getLogger("iwm_fast").info("study: %s (%s)", name, desc)
        res = run_variant(name, list(a.overrides) + overrides, out=a.out, steps=a.steps, seed=a.seed,
                          finetune_epochs=a.finetune_epochs, finetune_batch_size=a.finetune_batch_size)
        rows.append({"variant": name, "description": desc, **res})
        write_table(rows, a.out)  # after every variant, so an interrupted study keeps what it measured
    print(write_table(rows, a.out))
    plot(rows, a.out)
    print(f"study table: {a.out}/study.csv, {a.out}/study.md, {a.out}/study.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
