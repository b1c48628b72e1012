"""World-model MRR (IWM paper): can the predictor turn a clean image's latent into the latent of a given view?

For each query image x, ``bank_size`` target-view transformations t_1..t_K of x are sampled (the source stays
clean). The predictor gets the clean image's context tokens at every position, every position as target and
the action a(x -> t_j(x)) of one of them, j drawn uniformly. Its prediction is ranked against the K target-
encoder embeddings t_1(x)..t_K(x); the score is the mean over queries of 1/rank of the true t_j(x).

A predictor that ignores the action ranks the true view uniformly at random, so its expected score is
H_K / K (``mrr_chance``; 0.0239 for K = 256). Some sampled views can coincide (colour jitter is applied with
p < 1), so ties are broken at random *in expectation*: the score of a query tied with t - 1 others and beaten by
g is the mean of 1/r over r = g+1 .. g+t. That keeps an action-blind predictor exactly at chance.
"""
import contextlib
from dataclasses import dataclass
from typing import Optional
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import transforms as tf
from .features import _module_device, _module_dtype, as_float_images, eval_mode

TIE_TOL = 1e-6  # cosine similarities this close count as a tie (identical views, float noise of batching)


@dataclass
class QueryBatch:
    """What a prediction hook sees for a chunk of queries."""
    source: torch.Tensor  # the source views (clean: no jitter, no destructive transforms), float [Q,3,H,W]
    action: torch.Tensor  # a(source -> true target view), [Q, ACTION_DIM]
    target: torch.Tensor  # the true target views, float [Q,3,H,W]; the answer: for oracles and baselines only


def harmonic(k: int) -> float:
    return float(sum(1.0 / r for r in range(1, k + 1)))


def mrr_chance(bank_size: int) -> float:
    """Expected MRR of a ranking that ignores the action: H_K / K."""
    if bank_size <= 0:
        raise ValueError(f"bank_size must be positive, got {bank_size}")
    return harmonic(bank_size) / bank_size


def mrr_chance_stderr(bank_size: int, num_queries: int) -> float:
    """Standard error of the MRR of an action-blind predictor (rank uniform on 1..K) over ``num_queries``.

    An MRR this many standard errors above ``mrr_chance`` is that unlikely to come from a predictor that
    ignores the action.
    """
    if bank_size <= 0 or num_queries <= 0:
        raise ValueError(f"bank_size and num_queries must be positive, got {bank_size} and {num_queries}")
    inv = [1.0 / r for r in range(1, bank_size + 1)]
    mean = sum(inv) / bank_size
    var = sum(x * x for x in inv) / bank_size - mean * mean
    return (var / num_queries) ** 0.5


def reciprocal_ranks(sims: torch.Tensor, true_idx: torch.Tensor, tie_tol: float = TIE_TOL) -> torch.Tensor:
    """Expected 1/rank of ``true_idx`` in each row of ``sims`` [Q, K] (higher is better), ties broken at random."""
    if sims.dim() != 2 or true_idx.shape != sims.shape[:1]:
        raise ValueError(f"sims must be [Q, K] and true_idx [Q], got {tuple(sims.shape)} and {tuple(true_idx.shape)}")
    sims = sims.double()
    true = sims.gather(1, true_idx.long()[:, None])
    beaten = (sims > true + tie_tol).sum(dim=1)
    tied = ((sims - true).abs() <= tie_tol).sum(dim=1)  # includes the true entry itself
    # Mean of 1/r over r = beaten+1 .. beaten+tied, via the harmonic-number table.
    K = sims.shape[1]
    steps = 1.0 / torch.arange(1, K + 1, dtype=torch.float64)
    h = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(steps, 0)])
    return (h[beaten + tied] - h[beaten]) / tied


def _pool(x, mode):
    """[Q, N, D] tokens (or [Q, F] features) -> L2-normalised [Q, F] in float32."""
    x = x.float()
    if x.dim() == 3:
        x = x.mean(dim=1) if mode == "mean" else x.flatten(1)
    elif x.dim() != 2:
        raise ValueError(f"embeddings must be [Q, N, D] tokens or [Q, F] features, got shape {tuple(x.shape)}")
    return F.normalize(x, dim=1)


def iwm_hooks(model):
    """``(predict_fn, target_fn)`` for an ``IWM`` model, as used in training.

    target_fn: the target encoder on normalised images, layer-normed without affine (the training targets).
    predict_fn: the context encoder on the whole clean image, then the predictor with every position as context
    and one target block covering the whole grid. Conditioning ``"none"`` (I-JEPA) gets no action.
    """
    dtype = _module_dtype(model.encoder)

    def target_fn(images):
        h = model.target_encoder(tf.normalize(images).to(dtype))
        return F.layer_norm(h.float(), (h.shape[-1],))

    def predict_fn(batch: QueryBatch):
        x = tf.normalize(batch.source).to(dtype)
        B = x.shape[0]
        N = model.encoder.num_patches
        ctx_idx = torch.arange(N, device=x.device)[None].expand(B, N)
        tgt_idx = torch.arange(N, device=x.device)[None, None].expand(B, 1, N)  # one block, all positions
        action = None if model.predictor.conditioning == "none" else batch.action.to(dtype)
        return model.predict(x, ctx_idx, tgt_idx, action)  # [B, N, D] in both target modes: a single block

    return predict_fn, target_fn


@dataclass(frozen=True)
class MrrSettings:
    """What ``world_model_mrr`` measures, and how.

    ``bank_size``: views K per query. ``num_queries``: the first images that are queries (all by default).
    ``views``: the ``TransformConfig`` of the target views (the training one by default). ``seed``: draws the
    views and the true view's place in each bank. ``batch_size``: images per encoder call; the views are drawn per
    chunk of ``min(num_queries, batch_size)`` queries, so the same ``seed`` and ``batch_size`` give the same
    result. ``tie_tol``: similarities this close are a tie. ``examples``: pictures of the first n queries."""
    bank_size: int = 256
    num_queries: Optional[int] = None
    views: Optional[tf.TransformConfig] = None
    seed: int = 0
    batch_size: int = 256
    tie_tol: float = TIE_TOL
    examples: int = 0

    def queries(self, num_images):
        """The number of queries among ``num_images`` images; a bad setting is a ValueError."""
        if self.bank_size < 1 or self.batch_size < 1:
            raise ValueError(f"bank_size and batch_size must be positive, got {self.bank_size} and {self.batch_size}")
        n = num_images if self.num_queries is None else int(self.num_queries)
        if not 0 < n <= num_images:
            raise ValueError(f"num_queries must be in [1, {num_images}] (the number of images), got {n}")
        return n


@torch.no_grad()
def world_model_mrr(model=None, images=None, settings: Optional[MrrSettings] = None, *,
                    hooks: Optional[tuple[Callable, Callable]] = None, device=None,
                    progress: Optional[Callable] = None) -> dict:
    """World-model MRR of ``model`` (an ``IWM``) on ``images`` (float [B,3,H,W] in [0,1], or uint8).

    ``settings`` (``MrrSettings``): the bank size, queries, views, seed and batch size. ``hooks``
    ``(predict_fn, target_fn)``, with ``predict_fn(QueryBatch) -> [Q, N, D]`` and ``target_fn(images) -> [Q, N, D]``,
    replace the model's own (``iwm_hooks``), e.g. for an oracle. Cost: ``num_queries * bank_size`` target-encoder
    images, ``num_queries`` predictor calls; memory is bounded by ``batch_size`` images per encoder call.

    Returns ``mrr`` (average-pooled, L2-normalised embeddings compared by cosine similarity), ``mrr_tokens`` (the
    same on token-wise flattened embeddings), ``mrr_identity`` (a baseline predicting the clean image's own
    target embedding, i.e. "no change"), ``mrr_chance`` = H_K / K, ``mrr_chance_stderr`` (the standard error of
    an action-blind predictor's MRR over these queries), ``mrr_bank_size`` and ``mrr_num_queries``.
    ``progress(n)`` is called after every target-encoder call with the number of images it encoded
    (``num_queries * bank_size`` in all). ``settings.examples=n`` adds ``"examples"``: for the first n queries,
    the clean image, the true view, the five best-ranked views and the true view's rank (``world_model_figure``).
    """
    settings = settings or MrrSettings()
    if images is None:
        raise ValueError("world_model_mrr needs query images")
    images = as_float_images(images)
    num_queries = settings.queries(images.shape[0])
    if hooks is None and model is None:
        raise ValueError("pass an IWM model, or hooks=(predict_fn, target_fn)")
    predict_fn, target_fn = hooks if hooks is not None else iwm_hooks(model)
    if device is None:
        device = _module_device(model) if model is not None else torch.device("cpu")
    device = torch.device(device)

    # The position of the true view in each bank: uniform, independent of the views and of the model.
    true_all = torch.randint(settings.bank_size, (num_queries,), generator=torch.Generator().manual_seed(settings.seed))
    chunk = max(1, min(num_queries, settings.batch_size))
    rr, shown = {name: [] for name in _SIMILARITIES}, None
    with eval_mode(model) if model is not None else contextlib.nullcontext():
        for c, start in enumerate(range(0, num_queries, chunk)):
            bank = _Bank(images[start:start + chunk].to(device=device, dtype=torch.float32),
                         true_all[start:start + chunk].to(device), c, settings)
            source, target, action = bank.queries()
            sims = bank.similarities(predict_fn(QueryBatch(source=source, action=action, target=target)),
                                     target_fn(source), target_fn, progress)
            if c == 0 and settings.examples > 0:
                shown = _examples(bank, sims["mean"], target, min(settings.examples, bank.size))
            for name in rr:
                rr[name].append(reciprocal_ranks(sims[name].cpu(), bank.true.cpu(), settings.tie_tol))

    mean_rr = {name: torch.cat(v).mean().item() for name, v in rr.items()}
    out = {"mrr": mean_rr["mean"], "mrr_tokens": mean_rr["tokens"], "mrr_identity": mean_rr["identity"],
           "mrr_chance": mrr_chance(settings.bank_size),
           "mrr_chance_stderr": mrr_chance_stderr(settings.bank_size, num_queries),
           "mrr_bank_size": settings.bank_size, "mrr_num_queries": num_queries}
    if shown is not None:
        out["examples"] = shown
    return out


_SIMILARITIES = ("mean", "tokens", "identity")


class _Bank:
    """One chunk of queries (clean images ``src``) and their banks of target views, drawn for chunk ``index``."""

    def __init__(self, src, true, index, settings):
        self.src, self.true, self.settings = src, true, settings
        self.size = src.shape[0]
        # Each (chunk, bank index) gets its own transformation draw, so every query has its own K views.
        self.params = [tf.sample_params(self.size, cfg=settings.views, seed=settings.seed,
                                        step=index * settings.bank_size + k, device=src.device, clean_source=True)
                       for k in range(settings.bank_size)]

    def view(self, k, which):
        return tf.apply(self.src, self.params[k], which)

    def queries(self):
        """(source, true target view, action source -> true view) of every query."""
        source, target, action = torch.empty_like(self.src), torch.empty_like(self.src), None
        for k in torch.unique(self.true).tolist():
            sel = self.true == k
            a = tf.action_vector(self.params[k])
            if action is None:
                action = torch.empty(self.size, a.shape[1], dtype=a.dtype, device=self.src.device)
            action[sel] = a[sel].to(self.src.device)
            source[sel] = self.view(k, "source")[sel]
            target[sel] = self.view(k, "target")[sel]
        return source, target, action

    def similarities(self, pred_tokens, identity_tokens, target_fn, progress):
        """{mean, tokens, identity: [Q, K] float64 cosine similarities to the bank's target embeddings}."""
        q, bank_size = self.size, self.settings.bank_size
        pred_mean, pred_flat = _pool(pred_tokens, "mean"), _pool(pred_tokens, "tokens")
        ident = _pool(identity_tokens, "mean")
        sims = {name: torch.empty(q, bank_size, dtype=torch.float64, device=self.src.device) for name in _SIMILARITIES}
        group = max(1, self.settings.batch_size // q)  # bank views per target-encoder call
        for k0 in range(0, bank_size, group):
            ks = range(k0, min(k0 + group, bank_size))
            emb = target_fn(torch.cat([self.view(k, "target") for k in ks]))
            for i, k in enumerate(ks):
                e = emb[i * q:(i + 1) * q]
                e_mean, e_flat = _pool(e, "mean"), _pool(e, "tokens")
                if pred_flat.shape != e_flat.shape:
                    raise ValueError(f"prediction {tuple(pred_tokens.shape)} and target embeddings "
                                     f"{tuple(e.shape)} do not match")
                sims["mean"][:, k] = (pred_mean * e_mean).sum(1).double()
                sims["tokens"][:, k] = (pred_flat * e_flat).sum(1).double()
                sims["identity"][:, k] = (ident * e_mean).sum(1).double()
            if progress is not None:
                progress(len(ks) * q)
        return sims


def _examples(bank, sims, target, n, top=5):
    """The first ``n`` queries of a chunk as pictures: clean image, true view, the ``top`` best-ranked views."""
    out, tie_tol = [], bank.settings.tie_tol
    for i in range(n):
        row = sims[i].cpu()
        best = row.argsort(descending=True, stable=True)[:top].tolist()
        views = torch.stack([tf.apply(bank.src[i:i + 1], bank.params[k][i], "target")[0] for k in best])
        t = int(bank.true[i])
        rank = int((row > row[t] + tie_tol).sum().item()) + 1  # best case among ties, as a person would read it
        out.append({"source": bank.src[i].cpu(), "target": target[i].cpu(), "retrieved": views.cpu(),
                    "retrieved_is_true": [k == t or abs(row[k].item() - row[t].item()) <= tie_tol for k in best],
                    "rank": rank, "tied": int(((row - row[t]).abs() <= tie_tol).sum().item()),
                    "bank_size": row.shape[0]})
    return out
