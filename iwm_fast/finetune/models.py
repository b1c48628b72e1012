"""The three fine-tuning models of IWM's downstream protocols, each a frozen part, a trained part and a head.

``predictor``: the frozen target encoder reads the whole clean image; the predictor gets all of its tokens as
context, a mask token at every position and the identity ("no change") action, so it is asked to predict the
image's own latent, the task it already knows; its outputs are average-pooled into a LayerNorm + linear head.
``encoder``: the target encoder itself is trained, average-pooled into the same head.
"""
import torch
import torch.nn as nn

from ..transforms import ACTION_DIM, normalize


class PooledHead(nn.Module):
    """Average over tokens, LayerNorm, BatchNorm without affine, linear classifier (every protocol's head).

    The BatchNorm standardises each feature over the batch, as the linear probe standardises its features (and as
    MAE's probing head does): a pretrained predictor's pooled output is mostly the same vector for every image
    (its image-dependent part is ~10x smaller), and without it the head learns nothing in a few epochs.
    """

    def __init__(self, dim, num_classes):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.standardize = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, tokens):
        return self.fc(self.standardize(self.norm(tokens.mean(dim=1))))


class PredictorClassifier(nn.Module):
    """Frozen encoder -> (trainable) predictor with the identity action at every position -> head."""

    def __init__(self, encoder, predictor, num_classes):
        super().__init__()
        self.encoder = encoder.requires_grad_(False).eval()
        self.predictor = predictor
        self.predictor.predictor_pos_embed.requires_grad_(False)  # fixed sin-cos, as in pretraining
        self.head = PooledHead(encoder.embed_dim, num_classes)
        self.num_patches = encoder.num_patches

    def train(self, mode=True):
        super().train(mode)
        self.encoder.eval()  # frozen: always in eval mode
        return self

    def forward(self, images):
        with torch.no_grad():
            z = self.encoder(normalize(images))
        B, N = z.shape[:2]
        pos = torch.arange(N, device=z.device)
        action = None
        if self.predictor.conditioning != "none":
            action = torch.zeros(B, ACTION_DIM, device=z.device, dtype=z.dtype)  # identity: no transformation
        out = self.predictor(z, pos[None].expand(B, N), pos[None, None].expand(B, 1, N), action)
        return self.head(out)


class EncoderClassifier(nn.Module):
    """The (pretrained) encoder fine-tuned end to end with the head."""

    def __init__(self, encoder, num_classes):
        super().__init__()
        self.encoder = encoder
        self.encoder.pos_embed.requires_grad_(False)
        self.head = PooledHead(encoder.embed_dim, num_classes)

    def forward(self, images):
        return self.head(self.encoder(normalize(images)))


def trainable_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
