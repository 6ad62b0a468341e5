"""TGDT: token-guided dual transformer with the consistent multimodal contrastive loss (TIP 2023).

Each side's cached tokens go through a projection ``Linear(D -> embed_dim)`` and ``local_layers``
transformer layers (TERAN's TE_1/TE_2): the **local** tokens. A second stack of ``global_layers``
transformer layers (TGDT's TE_text/TE_img) runs over the local tokens: its output at position 0 is
the **global** embedding (``global_pool``). Both branches are trained jointly from the cache with

    L = global_weight      * rank(S_global)                          (inter-modal, the criterion)
      + consistency_weight * sum_j [max_i |S_tt[i,j] - S_vv[i,j]| - consistency_margin]_+
      + alignment_weight   * rank(alignment_scale * MrSw(local tokens))   (token-guided)

where ``rank`` is the configured criterion (hinge, margin 0.2, hardest negative from the start in
the reference) and ``S_vv`` / ``S_tt`` are the image-image and caption-caption cosine matrices of
the global embeddings.

Inference branches: ``"global"`` (embedding: cosine of the global vectors, the coarse stage) and
``"local"`` (interaction: ``alignment_scale * MrSw`` on the L2-normalised local tokens, the fine
stage). The default (mode ``None``) is the local branch, the more accurate single-stage scorer;
every encoding carries both the global vector (``"emb"``) and the alignment token set, so the
evaluator can run the two-stage search (global shortlist, local re-rank) from one encoding pass.

Deviations from the released code (LCFractal/TGDT), all deliberate:

* the global transformers use key-padding masks (the release attends to padding, so a caption's
  global embedding depends on the batch it is in);
* the whole head trains jointly from the cache (the paper's joint training, minus the backbones);
  the release detaches the global branch from a frozen, pre-trained TERAN. ``detach_global_input``
  reproduces the detach (the global losses then do not reach the local layers);
* the token-alignment loss is computed on the local tokens, the same tokens the local branch scores
  at test time (the release trains it on the global-branch tokens and tests on TERAN's tokens);
* the loss weights and the consistency margin are read from the config (the release hard-codes the
  margin 0.3 and ignores its weight keys); the criterion (margin, hardest negatives) comes from the
  config's ``loss`` section and serves both ranking terms;
* MrSw masks padding with -inf (no hidden ReLU) and drops only [CLS]/[SEP] by default
  (``drop_tokens="teran"`` also drops the last word piece, as the release does);
* two options for a mean-reduced criterion such as InfoNCE (defaults: the paper's form):
  ``word_pool="mean"`` averages the per-word maxima instead of summing them (TERAN's MrAVGw, a
  score in [-1, 1] like the global cosine, so one temperature serves both ranking terms; use it
  with ``alignment_scale=1``), and ``consistency_reduction="mean"`` divides the consistency sum by
  the batch size;
* no spatial (box) encoding of regions and no learned CLS slot: the cached tokens already carry
  position, and the image global token is the cache's CLS token or, without one, the masked mean.
"""
from __future__ import annotations

from torch import Tensor, nn

from cache.batch import TokenBatch
from cache.errors import InputError
from heads.registry import register_head
from heads.base import Criterion, Encoded, FeatureSpec, Head, Progress
from heads.layers import WORD_POOLS, l2norm, mrsw, mrsw_block
from heads.layers.token_sets import (TokenTransformer, alignment_set, check_drop_rule,
                              resolve_global_pool)


REDUCTIONS = ("sum", "mean")


def consistency_loss(image_emb: Tensor, text_emb: Tensor, margin: float = 0.3,
                     reduction: str = "sum") -> Tensor:
    """TGDT's intra-modal consistency: ``sum_j [max_i |S_tt[i,j] - S_vv[i,j]| - margin]_+``
    (``reduction="mean"``: divided by B, the scale of a mean-reduced loss such as InfoNCE).

    ``image_emb``/``text_emb [B, d]`` are L2-normalised globals of the B pairs of a batch.
    """
    s_vv = image_emb @ image_emb.transpose(0, 1)
    s_tt = text_emb @ text_emb.transpose(0, 1)
    worst = (s_tt - s_vv).abs().amax(dim=0)
    hinged = (worst - margin).clamp(min=0)
    return hinged.sum() if reduction == "sum" else hinged.mean()


class _Side(nn.Module):
    """One modality: projection, local transformer, global transformer, global pooling."""

    def __init__(self, spec: FeatureSpec, embed_dim: int, local_layers: int, global_layers: int,
                 heads: int, ff_dim: int, dropout: float, global_pool: str) -> None:
        super().__init__()
        self.proj = nn.Linear(spec.dim, embed_dim)
        self.local = TokenTransformer(embed_dim, local_layers, heads, ff_dim, dropout)
        self.glob = TokenTransformer(embed_dim, global_layers, heads, ff_dim, dropout)
        self.pool = resolve_global_pool(global_pool, spec.prefix_tokens)

    def forward(self, batch: TokenBatch, detach_global_input: bool) -> tuple[Tensor, Tensor]:
        """-> (local tokens [B, T, E] before normalisation, L2-normalised global [B, E])."""
        mask = batch.mask
        local = self.local(self.proj(batch.tokens.to(self.proj.weight.dtype)), mask)
        tokens = self.glob(local.detach() if detach_global_input else local, mask)
        return local, l2norm(self.pool(tokens, mask))


@register_head("tgdt")
class TGDTHead(Head):
    """Token-guided dual transformer (global + local branches); see the module docstring."""

    kind = "interaction"
    modes = {"global": "embedding", "local": "interaction"}
    loss_from_encodings = True  # training_loss uses only encode_images/encode_texts (DDP gather)

    def __init__(self, image_spec: FeatureSpec, text_spec: FeatureSpec, embed_dim: int = 1024,
                 local_layers: int = 2, global_layers: int = 2, heads: int = 4,
                 ff_dim: int = 2048, dropout: float = 0.1, drop_tokens: str = "cls_sep",
                 global_pool: str = "auto", detach_global_input: bool = False,
                 alignment_scale: float = 10.0, global_weight: float = 1.0,
                 consistency_weight: float = 1.0, alignment_weight: float = 1.0,
                 consistency_margin: float = 0.3, consistency_reduction: str = "sum",
                 word_pool: str = "sum") -> None:
        super().__init__(image_spec, text_spec)
        check_drop_rule(drop_tokens)
        if consistency_reduction not in REDUCTIONS:
            raise InputError(f"tgdt: consistency_reduction must be one of {REDUCTIONS}, got "
                             f"{consistency_reduction!r}")
        if word_pool not in WORD_POOLS:
            raise InputError(f"tgdt: word_pool must be one of {WORD_POOLS}, got {word_pool!r}")
        if not (global_weight or consistency_weight or alignment_weight):
            raise InputError("tgdt: global_weight, consistency_weight and alignment_weight are all "
                             "zero; nothing would be trained")
        self.image = _Side(image_spec, embed_dim, local_layers, global_layers, heads, ff_dim,
                           dropout, global_pool)
        self.text = _Side(text_spec, embed_dim, local_layers, global_layers, heads, ff_dim,
                          dropout, global_pool)
        self.drop_tokens = drop_tokens
        self.detach_global_input = detach_global_input
        self.alignment_scale = alignment_scale
        self.global_weight = global_weight
        self.consistency_weight = consistency_weight
        self.alignment_weight = alignment_weight
        self.consistency_margin = consistency_margin
        self.consistency_reduction = consistency_reduction
        self.word_pool = word_pool

    # ------------------------------------------------------------------------------ encoding

    def _encode(self, side: _Side, spec: FeatureSpec, batch: TokenBatch, is_text: bool) -> Encoded:
        local, emb = side(batch, self.detach_global_input)
        tokens, mask = alignment_set(local, batch.mask, spec, self.drop_tokens, is_text)
        return {"emb": emb, "tokens": tokens, "mask": mask}

    def encode_images(self, batch: TokenBatch) -> Encoded:
        """``emb [B, E]`` (global) and the image alignment tokens ``tokens [B, R, E]``/``mask``."""
        return self._encode(self.image, self.image_spec, batch, is_text=False)

    def encode_texts(self, batch: TokenBatch) -> Encoded:
        """``emb [B, E]`` (global) and the word alignment tokens ``tokens [B, W, E]``/``mask``."""
        return self._encode(self.text, self.text_spec, batch, is_text=True)

    # ------------------------------------------------------------------------------- scoring

    def score(self, images: Encoded, texts: Encoded) -> Tensor:
        if self.mode == "global":
            return images["emb"] @ texts["emb"].transpose(0, 1)
        return self.alignment_scale * mrsw_block(images["tokens"], images["mask"],
                                                 texts["tokens"], texts["mask"], self.word_pool)

    def score_pairs(self, images: Encoded, texts: Encoded) -> Tensor:
        if self.mode == "global":
            return (images["emb"] * texts["emb"]).sum(dim=-1)
        return self.alignment_scale * mrsw(images["tokens"], images["mask"],
                                           texts["tokens"], texts["mask"], self.word_pool)

    # ------------------------------------------------------------------------------ training

    def training_loss(self, images: TokenBatch, texts: TokenBatch, image_ids: Tensor,
                      criterion: Criterion, progress: Progress) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted TGDT loss; the logged terms are detached tensors (no host sync)."""
        img, txt = self.encode_images(images), self.encode_texts(texts)
        terms: dict[str, Tensor] = {}
        if self.global_weight:
            scores = img["emb"] @ txt["emb"].transpose(0, 1)
            terms["global"] = self.global_weight * criterion(scores, image_ids, progress)
        if self.consistency_weight:
            terms["consistency"] = self.consistency_weight * consistency_loss(
                img["emb"], txt["emb"], self.consistency_margin, self.consistency_reduction)
        if self.alignment_weight:
            scores = self.alignment_scale * mrsw_block(img["tokens"], img["mask"],
                                                       txt["tokens"], txt["mask"], self.word_pool)
            terms["alignment"] = self.alignment_weight * criterion(scores, image_ids, progress)
        loss = sum(terms.values())
        return loss, {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()}}
