"""Language-aware patch slimming (LAPS, Fu et al., CVPR 2024): the selection, fusion and aggregation
machinery shared by the ``laps`` and ``caa`` heads.

For one (image, caption) pair, with P the projected spatial tokens of the image and W the projected
words of the caption:

1. scores (no gradient): image saliency a_j = cos(p_j, mean_k p_k), text relevance
   b_j = cos(p_j, mean_l w_l), s_j = a_j + b_j (+ any caption-independent prior, e.g. CAA's gate);
2. selection: the K = ceil(rho*N) patches with the largest s_j; the N-K others are fused into one
   token f = sum_j softmax(s_dropped)_j p_j;
3. aggregation: with G = MLP(p) (LayerNorm -> Linear(C->0.2C) -> GELU -> Linear(->M)) times a
   learned scale, softmax over the K kept patches for each of the M outputs, Y_m = sum_k A_km p_k,
   M = floor(N*kappa*rho);
4. the visual set [CLS; Y; f], each row L2-normalised.

Everything caption-independent is computed once per image (``encode``): the saliency, the MLP logits
G of every patch (the MLP is per token, so gathering G at the kept patches equals running it on
them), the Gram matrix of the patches and the score network's log-probabilities. ``visual_sets``
then works on a grid of pairs ``[c captions, I images]`` with no Python loop and returns each pair's
set as mixing weights over the image's tokens (zero outside the kept / dropped patches);
``block_max_mean`` scores words against these mixtures by the cheaper of two exact routes
(``mixture_cosines``): building them, or word x patch products times the weights with norms from
the Gram matrix, which never materialises the ``[c, I, M, C]`` aggregated tokens.

Option ``score_net`` (off by default, as in the released code): the paper's learned score network
(the DynamicViT-style predictor the authors posted in CrossmodalGroup/LAPS#4: LayerNorm ->
Linear(C->C/4) -> GELU -> Linear(->2) -> log-softmax per patch) whose keep probability pi_j is mixed
with the attention scores, s_j = beta*(a_j + b_j) + (1-beta)*pi_j (beta = ``attention_weight``,
0.8 in the released arguments), with a differentiable decision: in training pi_j is a binary
Gumbel-softmax sample y_j (temperature ``gumbel_tau``) and the hard top-K decision D_j is made
differentiable by straight-through, D = hard + y - stop_grad(y); kept patches enter the aggregation
as D_j*p_j and dropped ones the fusion as (1-D_j)*p_j (both equal p_j in the forward pass). The
ratio loss (mean_j y_j - rho)^2 then has a real gradient. In evaluation the decision is the hard
top-K of the noiseless mix.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cache.errors import CacheMismatchError, InputError
from heads.base import Encoded, FeatureSpec
from heads.layers.masked import l2norm, masked_max, masked_mean

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- sizes and layout


def spatial_layout(spec: FeatureSpec) -> tuple[int, int]:
    """``(start, count)`` of the spatial tokens (patches or regions) in an image cache's rows.

    Prefix tokens (CLS, registers) come first, then the patches in raster order (``grid`` H x W),
    then ``suffix_tokens``. Without a grid (region features), every non-prefix, non-suffix position
    up to ``num_tokens`` is a (possibly padded) region."""
    start = spec.prefix_tokens
    if spec.grid is not None:
        count = spec.grid[0] * spec.grid[1]
        expected = start + count + spec.suffix_tokens
        if spec.num_tokens and spec.num_tokens != expected:
            raise CacheMismatchError(
                f"{spec.source}: grid {spec.grid} with {spec.prefix_tokens} prefix and "
                f"{spec.suffix_tokens} suffix tokens implies {expected} tokens, the cache has "
                f"{spec.num_tokens}")
    else:
        count = spec.num_tokens - start - spec.suffix_tokens
    if count <= 0:
        raise CacheMismatchError(f"{spec.source}: no spatial tokens to select from "
                                 f"(num_tokens={spec.num_tokens}, prefix={spec.prefix_tokens}, "
                                 f"suffix={spec.suffix_tokens})")
    return start, count


def slimming_sizes(num_patches: int, keep_ratio: float, aggr_ratio: float) -> tuple[int, int]:
    """LAPS's ``(K, M)``: K = ceil(rho*N) kept patches, M = floor(N*kappa*rho) aggregated tokens."""
    if not 0 < keep_ratio <= 1:
        raise InputError(f"keep_ratio (rho) must be in (0, 1], got {keep_ratio}")
    if not 0 < aggr_ratio <= 1:
        raise InputError(f"aggr_ratio (kappa) must be in (0, 1], got {aggr_ratio}")
    keep = math.ceil(keep_ratio * num_patches - 1e-9)
    aggregated = math.floor(num_patches * aggr_ratio * keep_ratio + 1e-9)
    if aggregated < 1:
        raise InputError(f"N={num_patches} patches x kappa={aggr_ratio} x rho={keep_ratio} leaves "
                         "no aggregated token; raise keep_ratio or aggr_ratio")
    return keep, aggregated


def spatial_tokens(tokens: Tensor, mask: Tensor, start: int, count: int) -> tuple[Tensor, Tensor]:
    """Columns ``start .. start+count`` of a padded batch, zero-padded to exactly ``count`` columns
    (region batches may be narrower than the cache's maximum)."""
    x, m = tokens[:, start:start + count], mask[:, start:start + count]
    short = count - x.shape[1]
    if short > 0:
        x = F.pad(x, (0, 0, 0, short))
        m = F.pad(m, (0, short), value=False)
    return x, m


# ----------------------------------------------------------------------------- learned parts


class PatchAggregator(nn.Module):
    """LAPS's semantic-spatial calibration weights: per-token logits ``[.., N, M]`` =
    (LayerNorm -> Linear(C->floor(0.2C)) -> GELU -> Linear(->M)) times a learned scale (init 1)."""

    def __init__(self, dim: int, num_out: int, hidden_ratio: float = 0.2) -> None:
        super().__init__()
        hidden = max(1, int(dim * hidden_ratio))
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.GELU(),
                                 nn.Linear(hidden, num_out))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x) * self.scale


class PatchScoreNet(nn.Module):
    """The paper's score-aware prediction network (option): per-patch log-probabilities ``[.., 2]``
    of (keep, drop) from LayerNorm -> Linear(C->C/4) -> GELU -> Linear(->2) -> log-softmax."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, max(1, dim // 4)), nn.GELU(),
                                 nn.Linear(max(1, dim // 4), 2))

    def forward(self, x: Tensor) -> Tensor:
        return F.log_softmax(self.net(x), dim=-1)


# ----------------------------------------------------------------------------- the slimming module


def caption_relevance(values: Tensor, norms: Tensor, caption: Tensor, paired: bool) -> Tensor:
    """b_j = cos(p_j, caption) without a gradient: ``values [I, N, C]``, ``norms [I, N]``,
    ``caption [c, C]`` (unit vectors). ``paired=False``: every caption against every image ->
    ``[c, I, N]``; ``paired=True``: caption p with image p -> ``[1, P, N]``."""
    with torch.no_grad():
        if paired:
            dots = torch.einsum("pnd,pd->pn", values, caption.to(values.dtype)).unsqueeze(0)
        else:
            dots = torch.einsum("ind,cd->cin", values, caption.to(values.dtype))
        return dots / norms.unsqueeze(0)


@dataclass
class VisualSets:
    """The caption-dependent part of LAPS's visual sets for a grid of pairs ``[c, I]`` as mixing
    weights over the image's spatial tokens: ``weights [c, I, N, M]`` (aggregated token m is
    sum_n weights[n, m] p_n), ``fuse [c, I, N]`` (the fused token is sum_n fuse[n] p_n),
    ``fused_mask [c, I]`` (False when nothing was dropped) and the score network's ratio-loss term
    ``[c, I]`` (or None). The full set of a pair is [CLS (from the image encoding); aggregated;
    fused], each token L2-normalised."""

    weights: Tensor
    fuse: Tensor
    fused_mask: Tensor
    ratio: Tensor | None


def _prefix(images: Encoded) -> tuple[Tensor, Tensor]:
    """The images' unit prefix tokens ``[I, P, C]`` and mask ``[I, P]`` (P = 0 or 1)."""
    cls = images.get("cls")
    if cls is None:
        n_img, dim = images["patches"].shape[0], images["patches"].shape[-1]
        return (images["patches"].new_zeros(n_img, 0, dim),
                images["patch_mask"].new_zeros(n_img, 0))
    return cls, images["cls_mask"]


def mixed_norms(gram: Tensor, mix: Tensor) -> Tensor:
    """Norms of mixtures of an image's tokens from their Gram matrix: ``gram [I, N, N]``,
    ``mix [c, I, N, K]`` (K mixtures of the N tokens) -> ``||sum_n mix[n, k] p_n|| + 1e-8``
    ``[c, I, K]``, the quadratic form in at least float32, also under autocast."""
    dtype = torch.promote_types(mix.dtype, torch.float32)
    with torch.autocast(device_type=mix.device.type, enabled=False):
        wide = mix.to(dtype)
        squared = (torch.einsum("inj,cijk->cink", gram.to(dtype), wide) * wide).sum(dim=-2)
    return (squared.clamp(min=0) + 1e-16).sqrt().to(mix.dtype) + 1e-8


def gram_is_cheaper(words: int, patches: int, mixtures: int, dim: int) -> bool:
    """Whether scoring ``mixtures`` mixtures of ``patches`` tokens against ``words`` words through
    word x patch products and the Gram matrix takes fewer multiply-adds per pair than building the
    mixtures; the ratio is about L/M + N/C (L words, N patches, M mixtures, C channels), so
    building wins when the mixtures are few against the words or the patches many against C)."""
    built = mixtures * (patches + words + 1) * dim
    via_gram = words * patches * (dim + mixtures) + patches * patches * mixtures
    return via_gram < built


def mixture_cosines(images: Encoded, mix: Tensor, words: Tensor, paired: bool) -> Tensor:
    """cos(word, sum_n mix[n, k] p_n) ``[c, I, L, K]`` for ``mix [c, I, N, K]`` (``paired``: c = 1
    and word set p goes with image p), by the cheaper of two exact routes: the mixtures built
    and normalised, or word x patch dot products times the weights over norms from the Gram
    matrix (no ``[c, I, K, C]`` tensor, nor its copy for the backward pass)."""
    values = images["patches"]
    if not gram_is_cheaper(words.shape[1], values.shape[1], mix.shape[-1], values.shape[-1]):
        if paired:
            built = torch.einsum("pnk,pnd->pkd", mix[0], values).unsqueeze(0)      # [1, P, K, C]
            dots = torch.einsum("pld,pkd->plk", words, built[0]).unsqueeze(0)
        else:
            built = torch.einsum("cink,ind->cikd", mix, values)                   # [c, I, K, C]
            dots = torch.einsum("cld,cikd->cilk", words, built)
        return dots / (built.norm(dim=-1) + 1e-8).unsqueeze(2)
    if paired:
        cross = torch.einsum("pld,pnd->pln", words, values).unsqueeze(0)          # [1, P, L, N]
    else:
        cross = torch.einsum("cld,ind->ciln", words, values)                      # [c, I, L, N]
    return (cross @ mix) / mixed_norms(images["patch_gram"], mix).unsqueeze(2)


def block_max_mean(images: Encoded, sets: VisualSets, words: Tensor, word_mask: Tensor,
                   negative_slope: float = 0.1, paired: bool = False) -> Tensor:
    """Bidirectional word-patch max-mean (``layers.max_mean_alignment``) against the visual sets:
    ``words [c, L, C]`` unit vectors, ``word_mask [c, L]``; every caption against every image ->
    ``[c, I]``, or (``paired``) caption p against image p -> ``[1, P]``. The aggregated and fused
    tokens are scored as mixtures of the patches (``mixture_cosines``)."""
    cls, cls_mask = _prefix(images)
    if paired:
        cls_sims = torch.einsum("pld,pqd->plq", words, cls).unsqueeze(0)
        word_mask = word_mask.unsqueeze(0)                                          # [1, P, L]
    else:
        cls_sims = torch.einsum("cld,iqd->cilq", words, cls)
        word_mask = word_mask.unsqueeze(1)                                          # [c, 1, L]
    mix = torch.cat([sets.weights, sets.fuse.unsqueeze(-1)], dim=-1)               # [c, I, N, M+1]
    sims = torch.cat([cls_sims, mixture_cosines(images, mix, words, paired)], dim=-1)
    c, n_img = sims.shape[:2]                                                       # [c, I, L, T]
    sims = F.leaky_relu(sims, negative_slope)
    set_mask = torch.cat([cls_mask.unsqueeze(0).expand(c, -1, -1),
                          sets.fused_mask.new_ones(c, n_img, sets.weights.shape[-1]),
                          sets.fused_mask.unsqueeze(-1)], dim=-1)                   # [c, I, T]
    w_mask = word_mask.expand(c, n_img, -1)                                         # [c, I, L]
    valid = w_mask.unsqueeze(-1) & set_mask.unsqueeze(2)
    word_best = masked_max(sims, valid, dim=3)                                      # [c, I, L]
    token_best = masked_max(sims, valid, dim=2)                                     # [c, I, T]
    word_term = masked_mean(word_best.flatten(0, 1).unsqueeze(-1), w_mask.flatten(0, 1))
    token_term = masked_mean(token_best.flatten(0, 1).unsqueeze(-1), set_mask.flatten(0, 1))
    return (word_term + token_term).view(c, n_img)


class PatchSlimming(nn.Module):
    """Selection + fusion + aggregation of LAPS over a grid of (caption, image) pairs.

    ``encode`` turns the projected spatial tokens of a batch of images into the caption-independent
    tensors (added to the head's image encoding); ``visual_sets`` builds the per-pair visual sets.
    """

    def __init__(self, dim: int, num_patches: int, keep_ratio: float, aggr_ratio: float,
                 score_net: bool = False, attention_weight: float = 0.8,
                 gumbel_tau: float = 1.0) -> None:
        super().__init__()
        self.num_patches = num_patches
        self.keep_ratio = keep_ratio
        self.num_keep, self.num_aggregated = slimming_sizes(num_patches, keep_ratio, aggr_ratio)
        if not 0 <= attention_weight <= 1:
            raise InputError(f"attention_weight must be in [0, 1], got {attention_weight}")
        if gumbel_tau <= 0:
            raise InputError(f"gumbel_tau must be > 0, got {gumbel_tau}")
        self.aggregator = PatchAggregator(dim, self.num_aggregated)
        self.score_net = PatchScoreNet(dim) if score_net else None
        self.attention_weight, self.gumbel_tau = attention_weight, gumbel_tau

    def encode(self, values: Tensor, mask: Tensor, prior: Tensor | None = None) -> Encoded:
        """Caption-independent tensors of images: ``values [I, N, C]`` (the tokens the visual set is
        built from), ``mask [I, N]``, optional ``prior [I, N]`` added to the selection score."""
        values = values.masked_fill(~mask.unsqueeze(-1), 0)
        with torch.no_grad():
            unit = l2norm(values)
            centre = l2norm(masked_mean(values, mask))
            saliency = torch.einsum("ind,id->in", unit, centre)
            if prior is not None:
                saliency = saliency + prior.detach()
        out = {"patches": values, "patch_norm": values.detach().norm(dim=-1) + 1e-8,
               "patch_gram": values @ values.transpose(1, 2), "patch_mask": mask,
               "prior": saliency, "agg_logits": self.aggregator(values)}
        if self.score_net is not None:
            out["keep_logp"] = self.score_net(values)
        return out

    def selection(self, images: Encoded, relevance: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """Hard top-K decision for every pair: ``(keep [c, I, N], scores [c, I, N], y)`` where ``y``
        is the score network's (Gumbel-sampled in training) keep probability or None."""
        mask = images["patch_mask"].unsqueeze(0)
        scores = images["prior"].unsqueeze(0) + relevance
        y = None
        if self.score_net is not None:
            logp = images["keep_logp"].unsqueeze(0).expand(*relevance.shape, 2)
            if self.training:
                y = F.gumbel_softmax(logp, tau=self.gumbel_tau, hard=False, dim=-1)[..., 0]
            else:
                y = logp[..., 0].exp()
            scores = self.attention_weight * scores + (1 - self.attention_weight) * y.detach()
        scores = scores.detach().masked_fill(~mask, NEG_INF)
        top = scores.topk(self.num_keep, dim=-1).indices
        keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, top, True) & mask
        return keep, scores, y

    def visual_sets(self, images: Encoded, relevance: Tensor) -> VisualSets:
        """Per-pair selection, fusion and aggregation weights from ``relevance [c, I|P, N]`` (see
        ``caption_relevance``)."""
        values = images["patches"]
        mask = images["patch_mask"].unsqueeze(0)
        keep, scores, y = self.selection(images, relevance)
        drop = mask & ~keep
        keep_w = drop_w = None
        if y is not None and self.training:
            decision = keep.to(y.dtype) + y - y.detach()        # straight-through top-K
            keep_w, drop_w = decision, 1 - decision

        # an image without any valid patch aggregates its (zero) padding instead of producing NaN
        pooled = keep | ~mask.any(dim=-1, keepdim=True)
        logits = images["agg_logits"].unsqueeze(0).masked_fill(~pooled.unsqueeze(-1), NEG_INF)
        weights = torch.softmax(logits.float(), dim=2).to(values.dtype)
        if keep_w is not None:
            weights = weights * keep_w.unsqueeze(-1).to(weights.dtype)

        fuse = torch.softmax(scores.masked_fill(~drop, NEG_INF), dim=-1)
        fuse = torch.where(drop, fuse, torch.zeros_like(fuse)).to(values.dtype)
        if drop_w is not None:
            fuse = fuse * drop_w.to(fuse.dtype)

        ratio = None
        if y is not None and self.training:
            kept_share = (y * mask).sum(-1) / mask.sum(-1).clamp(min=1)
            ratio = (kept_share - self.keep_ratio) ** 2
        return VisualSets(weights, fuse, drop.any(dim=-1), ratio)

    def set_size(self, prefix: int) -> int:
        """Number of tokens in a visual set (prefix + aggregated + fused)."""
        return prefix + self.num_aggregated + 1


__all__ = ["spatial_layout", "slimming_sizes", "spatial_tokens", "PatchAggregator", "PatchScoreNet",
           "caption_relevance", "VisualSets", "mixed_norms", "gram_is_cheaper", "mixture_cosines",
           "block_max_mean", "PatchSlimming"]
