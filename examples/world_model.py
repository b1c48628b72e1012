"""The trained IWM as a world model: predict how an image's latent changes under a colour transformation.

    python examples/world_model.py [RUN_DIR]        # default runs/demo_cpu (made by bash scripts/demo.sh)

Encodes a few validation digits, asks the predictor what each one looks like after a given transformation
(brighter and hue-shifted), and ranks the true transformed image among other transformations of the same digit.
A world model that follows the action puts the true view near rank 1; one that ignores it, anywhere in 1..K.
"""
import sys

import torch

from iwm_fast.data import BundledDigits
from iwm_fast.transforms import action_vector, apply, sample_params
from iwm_fast.world_model import WorldModel, transform_params


def main(run_dir="runs/demo_cpu", num_images=8, bank_size=32):
    wm = WorldModel.from_run(run_dir)
    print(f"world model of {run_dir} (step {wm.step}): {wm.num_patches} tokens x {wm.embed_dim}, "
          f"conditioning {wm.conditioning}")
    size = wm.image_size[0]
    val = BundledDigits(split="val", image_size=size, crop=False)
    images = torch.stack([torch.as_tensor(val[i][0]) for i in range(num_images)]).float() / 255.0

    # One explicit transformation: 40% brighter, a quarter turn of the colour wheel.
    params = transform_params(num_images, target={"brightness": 1.4, "hue": 0.25})
    truth = wm.render(images, params)                      # the transformed images themselves
    z_hat = wm.predict(wm.encode(images), action_vector(params))

    # Candidates: the true view at index 0, then bank_size - 1 random transformations of the same images.
    others = [apply(images, sample_params(num_images, cfg=wm.cfg.augment, seed=1, step=k, clean_source=True),
                    "target") for k in range(bank_size - 1)]
    bank = torch.stack([wm.target_latents(v) for v in [truth] + others], dim=1)   # [B, K, N, D]
    ranks = wm.rank_of(z_hat, bank, 0)
    blind = wm.rank_of(wm.predict(wm.encode(images)), bank, 0)   # identity action: "nothing changes"
    print(f"rank of the true view among {bank_size} (1 = best), with the action:    {ranks.tolist()}")
    print(f"                                                 with no action:   {blind.tolist()}")
    # The mean rank says more than the MRR for a model that ranks the true view well but seldom first.
    print(f"mean rank: {ranks.float().mean():.1f} with the action, {blind.float().mean():.1f} without "
          f"(chance {(bank_size + 1) / 2:.1f})")
    chance = sum(1 / r for r in range(1, bank_size + 1)) / bank_size
    print(f"mean reciprocal rank: {(1.0 / ranks.float()).mean():.3f} with the action, "
          f"{(1.0 / blind.float()).mean():.3f} without (chance about {chance:.3f})")


if __name__ == "__main__":
    main(*sys.argv[1:2])
