"""Patch an I-JEPA-style training step with iwm-fast in a few lines, and run it on the CPU in seconds.

The encoder and predictor below are written in I-JEPA's style for this example (attention returning
``(x, attn)``, ``qkv``/``proj`` names, no class token); an existing I-JEPA or V-JEPA script needs only the
lines marked ``# iwm-fast``.

    .venv/bin/python examples/patch_ijepa_step.py [--steps 2] [--backend auto]
"""
import argparse
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from iwm_fast.compat import MultiBlockMaskCollator, apply_masks, ema_update_model  # iwm-fast
from iwm_fast.patch import patch_model                      # iwm-fast

IMG, PATCH, DIM, HEADS, DEPTH, PRED_DIM = 64, 8, 96, 4, 3, 48
GRID = IMG // PATCH


class SelfAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.scale = heads, (dim // heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * self.scale).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(B, N, C)), attn


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), SelfAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))[0]
        return x + self.mlp(self.norm2(x))


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, DIM, PATCH, PATCH)
        self.pos_embed = nn.Parameter(torch.randn(1, GRID * GRID, DIM) * 0.02, requires_grad=False)
        self.blocks = nn.ModuleList([Block(DIM, HEADS) for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(DIM, eps=1e-6)

    def forward(self, imgs, masks=None):
        x = self.patch_embed(imgs).flatten(2).transpose(1, 2) + self.pos_embed
        if masks is not None:
            x = apply_masks(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)


class Predictor(nn.Module):
    def __init__(self):
        super().__init__()
        self.predictor_embed = nn.Linear(DIM, PRED_DIM)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, PRED_DIM))
        self.pos_embed = nn.Parameter(torch.randn(1, GRID * GRID, PRED_DIM) * 0.02, requires_grad=False)
        self.blocks = nn.ModuleList([Block(PRED_DIM, HEADS) for _ in range(2)])
        self.norm, self.predictor_proj = nn.LayerNorm(PRED_DIM, eps=1e-6), nn.Linear(PRED_DIM, DIM)

    def forward(self, ctx, masks_enc, masks_pred):
        B = ctx.shape[0] // len(masks_enc)
        pos = self.pos_embed.expand(B, -1, -1)
        x = self.predictor_embed(ctx) + apply_masks(pos, masks_enc)
        n_ctx = x.shape[1]
        targets = apply_masks(pos, masks_pred).repeat(len(masks_enc), 1, 1) + self.mask_token
        x = torch.cat([x.repeat(len(masks_pred), 1, 1), targets], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.predictor_proj(self.norm(x[:, n_ctx:]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--backend", default="auto", choices=("auto", "sdpa", "triton"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    encoder, predictor = Encoder().to(device), Predictor().to(device)
    reference = copy.deepcopy(encoder)

    for name, model in (("encoder", encoder), ("predictor", predictor)):
        report = patch_model(model, backend=args.backend)  # iwm-fast: fused attention, same parameters
        print(f"[{name}] {report}")
    target_encoder = copy.deepcopy(encoder)  # as in I-JEPA: the target is a copy of the (patched) encoder
    for p in target_encoder.parameters():
        p.requires_grad_(False)

    collator = MultiBlockMaskCollator(input_size=(IMG, IMG), patch_size=PATCH, enc_mask_scale=(0.85, 1.0),
                                      pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4,
                                      min_keep=4, allow_overlap=False)
    optimizer = torch.optim.AdamW(list(encoder.parameters()) + list(predictor.parameters()), lr=1e-3)
    for step in range(args.steps):
        samples = [(torch.randn(3, IMG, IMG), 0) for _ in range(args.batch)]
        (imgs, _), masks_enc, masks_pred = collator(samples)
        imgs = imgs.to(device)
        masks_enc = [m.to(device) for m in masks_enc]
        masks_pred = [m.to(device) for m in masks_pred]
        with torch.no_grad():
            h = F.layer_norm(target_encoder(imgs), (DIM,))
            h = apply_masks(h, masks_pred).repeat(len(masks_enc), 1, 1)
        z = predictor(encoder(imgs, masks_enc), masks_enc, masks_pred)
        loss = F.smooth_l1_loss(z, h)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        ema_update_model(target_encoder, encoder, 0.996)  # iwm-fast: one fused call for the whole encoder
        print(f"step {step}: loss {loss.item():.5f}")  # timings: see benchmarks/, not this example

    with torch.no_grad():  # the patched encoder computes what the original did (before training moved it)
        x = torch.randn(2, 3, IMG, IMG, device=device)
        reference_out = reference(x)
        patched_copy = copy.deepcopy(reference)
        patch_model(patched_copy, backend=args.backend)
        diff = (patched_copy(x) - reference_out).abs().max().item()
    print(f"patched vs original encoder output: max abs diff {diff:.2e}")


if __name__ == "__main__":
    main()
