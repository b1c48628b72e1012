"""``world_model.png``: does the predictor follow the action? One row per query image.

Each row: the clean image the predictor starts from, the true transformed view it is asked to foresee, then the
five views of the bank that the prediction ranks highest, the true one framed in green. The row title gives the
true view's rank among the bank.
"""
from .report import save_png


def world_model_figure(examples, png_path, *, title=None) -> str:
    """Draw the ``examples`` of ``world_model_mrr`` (``MrrSettings(examples=n)``) into ``png_path``; its path."""
    if not examples:
        raise ValueError("no examples to draw")
    import matplotlib
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    top = max(len(e["retrieved"]) for e in examples)
    cols = 2 + top
    fig, axes = plt.subplots(len(examples), cols, figsize=(1.5 * cols, 1.75 * len(examples) + 0.5), dpi=100,
                             squeeze=False)
    try:
        for r, e in enumerate(examples):
            ax = axes[r]
            tiles = [("source (clean)", e["source"], None), ("true view", e["target"], "tab:blue")]
            for j, (view, hit) in enumerate(zip(e["retrieved"], e["retrieved_is_true"])):
                tiles.append((f"#{j + 1}" + (" = true" if hit else ""), view, "tab:green" if hit else None))
            for c in range(cols):
                ax[c].set_xticks([])
                ax[c].set_yticks([])
                if c >= len(tiles):
                    ax[c].axis("off")
                    continue
                label, img, frame = tiles[c]
                ax[c].imshow(img.permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
                ax[c].set_title(label, fontsize=8)
                for spine in ax[c].spines.values():
                    spine.set_visible(frame is not None)
                    if frame is not None:
                        spine.set_edgecolor(frame)
                        spine.set_linewidth(3)
            tie = f" (tied with {e['tied'] - 1})" if e.get("tied", 1) > 1 else ""
            ax[0].set_ylabel(f"rank {e['rank']}/{e['bank_size']}{tie}", fontsize=8)
        fig.suptitle(title or "world model: clean image + action -> predicted latent; top-5 views of the bank",
                     fontsize=9)
        return save_png(fig, png_path)
    finally:
        plt.close(fig)
