"""HREM: hierarchical relation modelling (Fu et al., CVPR 2023; CrossmodalGroup/HREM), an embedding
head at inference with a training-only instance-level relation graph.

Encoders (fragment level), for each side:
  fragments F = projection of every token (image: ``layers.ResidualMLPProjection`` = FC_MLP;
  text: Linear); v_res = max-2 pooling of F (``layers.masked_topk_mean``, k=2);
  v_rel = masked mean of one TransformerEncoderLayer(d=E, 16 heads, ff=E, dropout 0.1, key padding
  mask) over F; v = 0.8*v_res + 0.2*v_rel, L2-normalised. Inference is the cosine of the two
  embeddings, so retrieval costs what VSE costs.

Instance level (training only, after ``graph_warmup_steps`` iterations; 8000 in the reference):
the 2B images and captions of a batch are the nodes of one graph, processed by one
TransformerEncoderLayer whose float attention mask is
  mask_weight * [[R_i2i, R_i2t], [R_t2i, R_t2t]], -inf where the connection C is false.
* connection C (no gradient): per row the top floor(tau*B) entries (tau = ``connect_ratio``, ties
  kept) of V.V^T (i2i), T.T^T (t2t) and of the SCAN-style cross scores (t2i: words L2-normalised
  along the word axis, max over regions, mean over words; i2t: along the region axis, max over
  words, mean over regions; word-region cosines through leaky_relu(., 0.1); fragments detached);
* relevance R (with gradient): exp(-||a-b||/sigma) for i2i and t2t; for t2i / i2t an MLP
  (Linear(k->k) -> ReLU -> Linear(k->1), k = ``relevance_topk`` = 10) on the top-k per-word (per-
  region) maxima plus the mean score;
* a regulariser pulls softmax(R_i2t) rows (and R_t2i) towards the guide exp(-cdist(V, T)/sigma)
  (detached): KL(softmax(R) || softmax(G)) with batchmean reduction, weight ``reg_weight`` = 10,
  exactly as the reference computes it;
* loss = L(V, T) + L(V, T') + L(V', T) + L(V', T') + reg_weight * reg, V', T' the graph outputs
  (``cross_loss=False`` keeps only L(V', T')).

Base loss (``base_loss``): ``"criterion"`` (default) = the run config's ``loss`` section (the VSE0 ->
hardest-negative hinge shared by most heads here, or InfoNCE); ``"dws_triplet"`` = the reference
default, a distance-weighted-sampling triplet loss (``dws_triplet_loss``). The reference configs for
F30K/COCO choose ``dws_triplet``; the default is the run's criterion because that is the loss every
other head of this toolkit is compared with, and it needs no dataset-specific cut-off.

Option ``pooling`` (default ``"max2"`` = reference): ``"mean"`` replaces the max-2 pooling of the
fragments by their masked mean, on both sides. A deviation for mean-trained text encoders such as
MiniLM (its sentence embedding is the mean of its token states; the two largest values per channel
of projected MiniLM states discard what it was trained to carry).

Differences from the released code (fixes): padding words/regions never enter the top-k relevance
features, the normalisations or the means (the reference pads captions shorter than k with padding
positions and averages i2t over padding regions); the FC_MLP batch norm uses valid tokens only
(``layers.ResidualMLPProjection``); the warm-up counts optimisation steps (``Progress.step``, so it
survives a resume); the DWS triplet takes its weight maximum over valid negatives only and skips
rows without any candidate instead of returning 0 for the whole batch.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cache.batch import TokenBatch
from cache.errors import InputError
from heads.registry import register_head
from heads.base import Criterion, EmbeddingHead, Encoded, FeatureSpec, Progress
from heads.layers import (ResidualMLPProjection, TokenProjection, l2norm, masked_max, masked_mean,
                          masked_topk_mean)
from heads.layers.token_sets import TokenTransformer

NEG_INF = float("-inf")


# ----------------------------------------------------------------------------- fragment level


Pooling = Callable[[Tensor, Tensor], Tensor]
POOLINGS: dict[str, Pooling] = {
    "max2": lambda fragments, mask: masked_topk_mean(fragments, mask, 2),
    "mean": masked_mean,
}


class FragmentEncoder(nn.Module):
    """One side of HREM: fragments -> 0.8 * pool + 0.2 * mean(transformer(fragments)), pool = max-2
    (reference) or the masked mean (``POOLINGS``). ``projection(tokens, mask)`` makes the fragments
    (FC_MLP for images, a Linear for words)."""

    def __init__(self, projection: nn.Module, dim: int, heads: int, dropout: float,
                 residual_weight: float, pooling: str = "max2") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise InputError(f"head 'hrem': pooling must be one of {sorted(POOLINGS)}, got "
                             f"{pooling!r}")
        self.projection = projection
        self.relation = TokenTransformer(dim, layers=1, heads=heads, ff_dim=dim, dropout=dropout)
        self.residual_weight, self.pool = residual_weight, POOLINGS[pooling]

    def forward(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """``tokens [B, N, D]``, ``mask`` -> (unit embeddings ``[B, E]``, fragments
        ``[B, N, E]``)."""
        fragments = self.projection(tokens, mask).masked_fill(~mask.unsqueeze(-1), 0)
        pooled = self.pool(fragments, mask)
        related = masked_mean(self.relation(fragments, mask), mask)
        mixed = self.residual_weight * pooled + (1 - self.residual_weight) * related
        return l2norm(mixed), fragments


# ----------------------------------------------------------------------------- instance level


def unit_distance(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances of unit vectors, sqrt(2 - 2 a.b), with a finite gradient at 0."""
    return (2 - 2 * a @ b.transpose(0, 1)).clamp(min=1e-12).sqrt()


def top_fraction(sims: Tensor, ratio: float) -> Tensor:
    """Boolean ``[R, C]``: per row, the entries >= the floor(ratio*C)-th largest (ties kept)."""
    k = min(sims.shape[1], max(1, int(sims.shape[1] * ratio)))
    kth = sims.topk(k, dim=1).values[:, -1:]
    return sims >= kth


def masked_l2_normalise(x: Tensor, mask: Tensor, dim: int, eps: float = 1e-12) -> Tensor:
    """``x`` with masked entries zero, divided by the L2 norm of its valid entries along ``dim``."""
    x = x.masked_fill(~mask, 0)
    return x / x.norm(dim=dim, keepdim=True).clamp(min=eps)


def topk_features(values: Tensor, mask: Tensor, k: int) -> Tensor:
    """The ``k`` largest valid entries of the last axis (missing ones 0): ``[..., k]``."""
    width = values.shape[-1]
    top = values.masked_fill(~mask, NEG_INF).topk(min(k, width), dim=-1).values
    top = top.masked_fill(torch.isinf(top), 0)
    return F.pad(top, (0, k - top.shape[-1])) if top.shape[-1] < k else top


def relevance_mlp(k: int) -> nn.Sequential:
    """HREM's edge MLP: Linear(k->k) -> ReLU -> Linear(k->1)."""
    return nn.Sequential(nn.Linear(k, k), nn.ReLU(), nn.Linear(k, 1))


class InstanceGraph(nn.Module):
    """The instance-level relation module over the 2B nodes of a batch (training only)."""

    def __init__(self, dim: int, heads: int, dropout: float, connect_ratio: float,
                 relevance_topk: int, sigma: float, mask_weight: float,
                 negative_slope: float = 0.1) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=dim, dropout=dropout,
                                                batch_first=True)
        self.mlp_t2i, self.mlp_i2t = relevance_mlp(relevance_topk), relevance_mlp(relevance_topk)
        self.connect_ratio, self.topk, self.sigma = connect_ratio, relevance_topk, sigma
        self.mask_weight, self.negative_slope = mask_weight, negative_slope

    def cross_scores(self, regions: Tensor, region_mask: Tensor, words: Tensor,
                     word_mask: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """SCAN-style scores of every caption x image: ``(t2i_mean [T, I], t2i_top [T, I, k],
        i2t_mean [I, T], i2t_top [I, T, k])`` from detached fragments."""
        regions, words = l2norm(regions.detach().float()), l2norm(words.detach().float())
        sims = F.leaky_relu(torch.einsum("tld,ird->tilr", words, regions), self.negative_slope)
        valid = word_mask[:, None, :, None] & region_mask[None, :, None, :]        # [T, I, L, R]
        per_word = masked_max(masked_l2_normalise(sims, valid, dim=2), valid, dim=3)  # [T, I, L]
        per_region = masked_max(masked_l2_normalise(sims, valid, dim=3), valid, dim=2)  # [T, I, R]
        w_mask = word_mask[:, None, :].expand_as(per_word)
        r_mask = region_mask[None, :, :].expand_as(per_region)
        t2i_mean = masked_mean(per_word.flatten(0, 1).unsqueeze(-1), w_mask.flatten(0, 1))
        i2t_mean = masked_mean(per_region.flatten(0, 1).unsqueeze(-1), r_mask.flatten(0, 1))
        n_txt, n_img = per_word.shape[:2]
        return (t2i_mean.view(n_txt, n_img), topk_features(per_word, w_mask, self.topk),
                i2t_mean.view(n_txt, n_img).t(),
                topk_features(per_region, r_mask, self.topk).transpose(0, 1))

    def forward(self, img: Tensor, txt: Tensor, regions: Tensor, region_mask: Tensor,
                words: Tensor, word_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Unit embeddings ``img, txt [B, E]`` and fragments -> (img', txt', regulariser)."""
        t2i_mean, t2i_top, i2t_mean, i2t_top = self.cross_scores(regions, region_mask, words,
                                                                 word_mask)
        with torch.no_grad():
            connect = torch.cat([
                torch.cat([top_fraction(img @ img.t(), self.connect_ratio),
                           top_fraction(i2t_mean, self.connect_ratio)], dim=1),
                torch.cat([top_fraction(t2i_mean, self.connect_ratio),
                           top_fraction(txt @ txt.t(), self.connect_ratio)], dim=1)], dim=0)
        r_t2i = self.mlp_t2i(t2i_top).squeeze(-1) + t2i_mean
        r_i2t = self.mlp_i2t(i2t_top).squeeze(-1) + i2t_mean
        relevance = torch.cat([
            torch.cat([torch.exp(-unit_distance(img, img) / self.sigma), r_i2t], dim=1),
            torch.cat([r_t2i, torch.exp(-unit_distance(txt, txt) / self.sigma)], dim=1)], dim=0)
        attn_mask = (self.mask_weight * relevance).masked_fill(~connect, NEG_INF)
        nodes = self.layer(torch.cat([img, txt], dim=0).unsqueeze(0),
                           src_mask=attn_mask.to(img.dtype)).squeeze(0)
        img_out, txt_out = l2norm(nodes[:img.shape[0]]), l2norm(nodes[img.shape[0]:])

        guide = torch.exp(-unit_distance(img, txt) / self.sigma).detach()
        reg = kl_to_guide(guide, r_i2t) + kl_to_guide(guide.t(), r_t2i)
        return img_out, txt_out, reg


def kl_to_guide(guide: Tensor, relevance: Tensor) -> Tensor:
    """KL(softmax(relevance) || softmax(guide)) over rows, batch mean (the reference's kl_div call
    with the guide as input and the relevance as target)."""
    return F.kl_div(F.log_softmax(guide.float(), dim=-1), F.softmax(relevance.float(), dim=-1),
                    reduction="batchmean")


# ----------------------------------------------------------------------------- losses


def dws_triplet_loss(scores: Tensor, image_ids: Tensor, margin: float = 0.2,
                     cutoff: float = 0.5, nonzero_cutoff: float = 1.7, dim: int = 512) -> Tensor:
    """Distance-weighted-sampling triplet loss (Wu et al. 2017) as HREM uses it, both directions.

    For every positive pair (a, p) (same image id), one negative n of anchor a is drawn with
    probability proportional to 1/q(d_an), log q(d) = (dim-2) log d + (dim-3)/2 log(1 - d^2/4),
    d = sqrt(2 - 2 s) clamped at >= ``cutoff``, among the negatives with d < ``nonzero_cutoff``;
    loss = sum of [margin + s_an - s_ap]_+. ``dim`` is the reference's hard-coded 512."""
    positives = image_ids.unsqueeze(0) == image_ids.unsqueeze(1)
    return _dws_direction(scores.float(), positives, margin, cutoff, nonzero_cutoff, dim) + \
        _dws_direction(scores.float().t(), positives.t(), margin, cutoff, nonzero_cutoff, dim)


def _dws_direction(sims: Tensor, positives: Tensor, margin: float, cutoff: float,
                   nonzero_cutoff: float, dim: int) -> Tensor:
    dist = (2 - 2 * sims.detach()).clamp(min=0).sqrt().clamp(min=cutoff)
    log_weight = (2.0 - dim) * dist.log() \
        - ((dim - 3.0) / 2.0) * (1 - dist.pow(2) / 4).clamp(min=1e-8).log()
    candidate = ~positives & (dist < nonzero_cutoff)
    log_weight = log_weight.masked_fill(~candidate, NEG_INF)
    has_candidate = candidate.any(dim=1, keepdim=True)
    row_max = log_weight.amax(dim=1, keepdim=True).masked_fill(~has_candidate, 0)
    weight = torch.exp(log_weight - row_max)
    weight = torch.where(has_candidate, weight, torch.ones_like(weight))
    negatives = torch.multinomial(weight, sims.shape[1], replacement=True)   # one per (a, p) pair
    s_an = sims.gather(1, negatives)                                           # [B, B]: column p
    cost = (margin + s_an - sims).clamp(min=0)
    return cost.masked_fill(~(positives & has_candidate), 0).sum()


PairLoss = Callable[["HremHead", Tensor, Tensor, Criterion, Progress], Tensor]
BASE_LOSSES: dict[str, PairLoss] = {
    "criterion": lambda head, scores, ids, criterion, progress: criterion(scores, ids, progress),
    "dws_triplet": lambda head, scores, ids, criterion, progress: dws_triplet_loss(
        scores, ids, head.margin, nonzero_cutoff=head.dws_cutoff, dim=head.dws_dim),
}


# ----------------------------------------------------------------------------- the head


@register_head("hrem")
class HremHead(EmbeddingHead):
    """Fragment-level relation encoders; instance-level graph as a training regulariser."""

    def __init__(self, image_spec: FeatureSpec, text_spec: FeatureSpec, embed_dim: int = 1024,
                 heads: int = 16, dropout: float = 0.1, residual_weight: float = 0.8,
                 graph: bool = True, graph_warmup_steps: int = 8000, connect_ratio: float = 0.5,
                 relevance_topk: int = 10, sigma: float = 1.0, mask_weight: float = 1.0,
                 reg_weight: float = 10.0, cross_loss: bool = True, base_loss: str = "criterion",
                 margin: float = 0.2, dws_cutoff: float = 1.7, dws_dim: int = 512,
                 pooling: str = "max2") -> None:
        super().__init__(image_spec, text_spec)
        if embed_dim % heads:
            raise InputError(f"head 'hrem': embed_dim {embed_dim} is not divisible by {heads} "
                             "heads")
        if base_loss not in BASE_LOSSES:
            raise InputError(f"head 'hrem': base_loss must be one of {sorted(BASE_LOSSES)}, got "
                             f"{base_loss!r}")
        if not 0 < connect_ratio <= 1:
            raise InputError(f"head 'hrem': connect_ratio must be in (0, 1], got {connect_ratio}")
        self.image_encoder = FragmentEncoder(ResidualMLPProjection(image_spec.dim, embed_dim),
                                             embed_dim, heads, dropout, residual_weight, pooling)
        self.text_encoder = FragmentEncoder(
            TokenProjection(text_spec.dim, embed_dim, normalize=False), embed_dim, heads, dropout,
            residual_weight, pooling)
        self.graph = InstanceGraph(embed_dim, heads, dropout, connect_ratio, relevance_topk, sigma,
                                   mask_weight) if graph else None
        self.graph_warmup_steps, self.reg_weight = graph_warmup_steps, reg_weight
        self.cross_loss = cross_loss
        self.base_loss, self.margin = base_loss, margin
        self.dws_cutoff, self.dws_dim = dws_cutoff, dws_dim

    def _encode(self, encoder: FragmentEncoder, batch: TokenBatch) -> tuple[Tensor, Tensor]:
        dtype = next(encoder.parameters()).dtype
        return encoder(batch.tokens.to(dtype), batch.mask)

    def encode_images(self, batch: TokenBatch) -> Encoded:
        return {"emb": self._encode(self.image_encoder, batch)[0]}

    def encode_texts(self, batch: TokenBatch) -> Encoded:
        return {"emb": self._encode(self.text_encoder, batch)[0]}

    def graph_active(self, progress: Progress) -> bool:
        """Whether the instance-level graph takes part in the loss at ``progress``."""
        return self.graph is not None and progress.step >= self.graph_warmup_steps

    def pair_loss(self, img: Tensor, txt: Tensor, image_ids: Tensor, criterion: Criterion,
                  progress: Progress) -> Tensor:
        """The base loss of one pair of embedding sets (row i pairs with row i)."""
        return BASE_LOSSES[self.base_loss](self, img @ txt.t(), image_ids, criterion, progress)

    def training_loss(self, images: TokenBatch, texts: TokenBatch, image_ids: Tensor,
                      criterion: Criterion, progress: Progress) -> tuple[Tensor, dict[str, float]]:
        img, regions = self._encode(self.image_encoder, images)
        txt, words = self._encode(self.text_encoder, texts)
        base = self.pair_loss(img, txt, image_ids, criterion, progress)
        if not self.graph_active(progress):
            return base, {"loss": base.detach()}
        assert self.graph is not None
        img_g, txt_g, reg = self.graph(img, txt, regions, images.mask, words, texts.mask)
        graph_loss = self.pair_loss(img_g, txt_g, image_ids, criterion, progress)
        if self.cross_loss:
            graph_loss = graph_loss + self.pair_loss(img, txt_g, image_ids, criterion, progress) \
                + self.pair_loss(img_g, txt, image_ids, criterion, progress)
        loss = base + graph_loss + self.reg_weight * reg
        return loss, {"loss": loss.detach(), "base": base.detach(),
                      "graph": graph_loss.detach(), "reg": reg.detach()}


__all__ = ["HremHead", "FragmentEncoder", "InstanceGraph", "dws_triplet_loss"]
