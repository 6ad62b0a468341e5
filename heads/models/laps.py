"""LAPS: language-aware patch slimming (Fu et al., CVPR 2024; CrossmodalGroup/LAPS), an interaction
head trained from cached patch tokens and cached word states.

Pipeline per (image, caption) pair, see ``heads.layers.patch_slimming``: project every image token
(CLS included) and every word to C = ``embed_dim``; select the K = ceil(rho*N) patches with the
largest image saliency + caption relevance, fuse the rest into one token, aggregate the kept ones
into M = floor(N*kappa*rho) tokens; score with the bidirectional word-patch max-mean alignment
against the visual set [CLS; aggregated; fused] (``patch_slimming.block_max_mean``, for blocks of
captions x images and for aligned pairs).

N is the real number of spatial tokens of the cache (from its grid / token count), never a
constant; the CLS token is kept when the cache declares prefix tokens
(``FeatureSpec.prefix_tokens``, not guessed from a non-square token count; with register tokens
only the first prefix token, the CLS, is kept).

Differences from the released code (all explicit):

* ``score_net`` (default False = released code): the paper's learned score network with a Gumbel
  straight-through decision and a real ratio loss (weight ``ratio_weight``); see
  ``heads.layers.patch_slimming``. The released code's ratio loss is a constant (hard top-K of exactly K
  patches under no-grad) and is not implemented.
* No backbone fine-tuning and no image augmentation (cached frozen features); the released loss
  ramp over epoch 0 (warm_alpha) is not reproduced (``optim.warmup_steps`` is the nearest knob).
* The ``attention_weight`` argument of the release is unused there; here it is the score-network
  mixing weight (only read with ``score_net``).
* Scoring is vectorised over a block of captions x images (chunks of captions bound the memory)
  instead of a Python loop over captions; each image is encoded once.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from cache.batch import TokenBatch
from cache.errors import InputError
from heads.registry import register_head
from heads.base import (Criterion, Encoded, FeatureSpec, InteractionHead, Progress, index_encoded,
                        num_items)
from heads.layers import l2norm, masked_mean
from heads.layers.patch_slimming import (PatchSlimming, block_max_mean, caption_relevance, spatial_layout,
                                  spatial_tokens)


def last_word(word_mask: Tensor) -> Tensor:
    """Per caption, the position after its last valid word (0 for an empty caption)."""
    positions = torch.arange(1, word_mask.shape[1] + 1, device=word_mask.device)
    return (word_mask * positions).amax(dim=1)


def length_sorted_chunks(word_mask: Tensor, step: int) -> tuple[Tensor, list[tuple[slice, int]]]:
    """Captions ordered by length (last valid position, longest first) and chunks of ``step`` rows
    of that order, each with the width that holds its longest caption (one host round trip):
    scoring a chunk then costs its own captions' lengths, not the longest of the split."""
    last = last_word(word_mask)
    order = torch.argsort(last, descending=True, stable=True)
    widths = last[order][::step].tolist()
    return order, [(slice(s, s + step), int(w)) for s, w in zip(range(0, len(order), step), widths)]


def trim_words(texts: Encoded, width: int) -> Encoded:
    """The text encoding with its word axis cut to ``width`` positions."""
    return {**texts, "words": texts["words"][:, :width], "word_mask": texts["word_mask"][:, :width]}


def unsort(values: Tensor, order: Tensor, dim: int) -> Tensor:
    """Undo ``index_select(dim, order)``."""
    return values.index_select(dim, torch.argsort(order))


@register_head("laps")
class LapsHead(InteractionHead):
    """Language-aware patch selection + aggregation + word-patch max-mean alignment."""

    loss_from_encodings = True    # training_loss uses encode_images / encode_texts only (DDP)

    def __init__(self, image_spec: FeatureSpec, text_spec: FeatureSpec, embed_dim: int = 512,
                 keep_ratio: float = 0.5, aggr_ratio: float = 0.4, keep_cls: bool = True,
                 score_net: bool = False, attention_weight: float = 0.8, gumbel_tau: float = 1.0,
                 ratio_weight: float = 2.0, negative_slope: float = 0.1,
                 chunk_elements: int = 1 << 25) -> None:
        super().__init__(image_spec, text_spec)
        if embed_dim < 1 or chunk_elements < 1:
            raise InputError(f"head {self.name!r}: embed_dim and chunk_elements must be positive")
        self.patch_start, self.num_patches = spatial_layout(image_spec)
        self.num_prefix = 1 if keep_cls and image_spec.prefix_tokens > 0 else 0
        self.vision_proj = nn.Linear(image_spec.dim, embed_dim)
        self.text_proj = nn.Linear(text_spec.dim, embed_dim)
        self.slimming = PatchSlimming(embed_dim, self.num_patches, keep_ratio, aggr_ratio,
                                      score_net, attention_weight, gumbel_tau)
        self.ratio_weight, self.negative_slope = ratio_weight, negative_slope
        self.chunk_elements = chunk_elements

    # ------------------------------------------------------------------ encoders

    def project_image_tokens(self, batch: TokenBatch) -> Tensor:
        """Every image token projected to the joint width: ``[I, T, C]``."""
        return self.vision_proj(batch.tokens.to(self.vision_proj.weight.dtype))

    def project_images(self, batch: TokenBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Projected ``(cls [I, P, C], cls_mask [I, P], patches [I, N, C], patch_mask [I, N])``."""
        tokens = self.project_image_tokens(batch)
        patches, mask = spatial_tokens(tokens, batch.mask, self.patch_start, self.num_patches)
        return tokens[:, :self.num_prefix], batch.mask[:, :self.num_prefix], patches, mask

    def encode_images(self, batch: TokenBatch) -> Encoded:
        cls, cls_mask, patches, mask = self.project_images(batch)
        return self.image_encoding(cls, cls_mask, patches, mask)

    def image_encoding(self, cls: Tensor, cls_mask: Tensor, values: Tensor, mask: Tensor,
                       prior: Tensor | None = None) -> Encoded:
        """The image encoding from projected (and possibly gated) tokens."""
        out = self.slimming.encode(values, mask, prior)
        out["cls"] = l2norm(cls).masked_fill(~cls_mask.unsqueeze(-1), 0)
        out["cls_mask"] = cls_mask
        return out

    def project_texts(self, batch: TokenBatch) -> tuple[Tensor, Tensor]:
        """Projected word states ``[T, L, C]`` (padding zeroed) and their mask."""
        words = self.text_proj(batch.tokens.to(self.text_proj.weight.dtype))
        return words.masked_fill(~batch.mask.unsqueeze(-1), 0), batch.mask

    def encode_texts(self, batch: TokenBatch) -> Encoded:
        words, mask = self.project_texts(batch)
        return self.text_encoding(words, mask)

    @staticmethod
    def text_encoding(words: Tensor, mask: Tensor) -> Encoded:
        """Unit word vectors, their mask and the unit mean of the raw word vectors."""
        return {"words": l2norm(words).masked_fill(~mask.unsqueeze(-1), 0), "word_mask": mask,
                "caption": l2norm(masked_mean(words, mask))}

    # ------------------------------------------------------------------ scoring

    def _pair_grid(self, images: Encoded, texts: Encoded,
                   paired: bool) -> tuple[Tensor, Tensor | None]:
        """Scores of a grid of pairs: ``[c, I]`` for c captions x I images (``paired=False``) or
        ``[1, P]`` for aligned pairs; and the summed ratio-loss term (score network, training)."""
        relevance = caption_relevance(images["patches"], images["patch_norm"], texts["caption"],
                                      paired)
        sets = self.slimming.visual_sets(images, relevance)
        ratio = None if sets.ratio is None else sets.ratio.sum()
        return block_max_mean(images, sets, texts["words"], texts["word_mask"],
                              self.negative_slope, paired), ratio

    def caption_chunk(self, n_img: int, n_words: int, paired: bool = False) -> int:
        """Captions per step against ``n_img`` images (``paired``: pairs per step, ``n_img=1``) so
        that the largest per-step tensors stay near ``chunk_elements`` elements."""
        n, m = self.num_patches, self.slimming.num_aggregated
        size = self.slimming.set_size(self.num_prefix)
        # per pair: selection scores, aggregation logits / weights / Gram products, word x patch
        # and word x set similarities; paired, also the per-pair copies of words, patches, Gram
        per_pair = 4 * n + 3 * n * m + n_words * n + 3 * n_words * size
        if paired:
            per_pair += (n_words + n) * self.vision_proj.out_features + n * n
        return max(1, self.chunk_elements // max(1, n_img * per_pair))

    def _score_block(self, images: Encoded, texts: Encoded) -> tuple[Tensor, Tensor | None]:
        n_img, n_txt = num_items(images), num_items(texts)
        step = self.caption_chunk(n_img, texts["words"].shape[1])
        order = None
        if self.training:          # no host round trip in a training step: chunks in order
            chunks = [(slice(s, s + step), texts["words"].shape[1]) for s in range(0, n_txt, step)]
        else:                      # evaluation: captions by length, chunks trimmed
            order, chunks = length_sorted_chunks(texts["word_mask"], step)
            texts = index_encoded(texts, order)
        columns, ratio = [], None
        for rows, width in chunks:
            scores, r = self._pair_grid(images, trim_words(index_encoded(texts, rows), width),
                                        paired=False)
            columns.append(scores.transpose(0, 1))
            if r is not None:
                ratio = r if ratio is None else ratio + r
        scores = torch.cat(columns, dim=1)
        return (scores if order is None else unsort(scores, order, dim=1)), ratio

    def select(self, images: Encoded, texts: Encoded) -> Tensor:
        """The kept patches of every caption x image pair, bool ``[n_txt, n_img, N]``."""
        relevance = caption_relevance(images["patches"], images["patch_norm"], texts["caption"],
                                      paired=False)
        return self.slimming.selection(images, relevance)[0]

    def explain(self, images: Encoded, texts: Encoded) -> dict[str, Tensor]:
        """What the patch slimming did for every caption x image pair, each ``[n_txt, n_img, N]``
        over the spatial tokens: ``keep`` (bool, the top-K selection), ``scores`` (the selection
        score s_j, -inf at padding) and ``fuse`` (each dropped patch's weight in the fused token).
        For pictures (``cli explain``); scoring does not call it."""
        relevance = caption_relevance(images["patches"], images["patch_norm"], texts["caption"],
                                      paired=False)
        keep, scores, _ = self.slimming.selection(images, relevance)
        return {"keep": keep, "scores": scores,
                "fuse": self.slimming.visual_sets(images, relevance).fuse}

    def score(self, images: Encoded, texts: Encoded) -> Tensor:
        return self._score_block(images, texts)[0]

    def score_pairs(self, images: Encoded, texts: Encoded) -> Tensor:
        step = self.caption_chunk(1, texts["words"].shape[1], paired=True)
        scores = []
        for start in range(0, num_items(texts), step):
            rows = slice(start, start + step)
            chunk = index_encoded(texts, rows)
            width = int(last_word(chunk["word_mask"]).max())   # pairs stay in place: no copies
            scores.append(self._pair_grid(index_encoded(images, rows), trim_words(chunk, width),
                                          paired=True)[0].squeeze(0))
        return torch.cat(scores)

    def training_loss(self, images: TokenBatch, texts: TokenBatch, image_ids: Tensor,
                      criterion: Criterion, progress: Progress) -> tuple[Tensor, dict[str, float]]:
        scores, ratio = self._score_block(self.encode_images(images), self.encode_texts(texts))
        match = criterion(scores, image_ids, progress)
        if ratio is None:
            return match, {"loss": match.detach()}
        ratio = ratio / scores.numel()
        loss = match + self.ratio_weight * ratio
        return loss, {"loss": loss.detach(), "match": match.detach(),
                      "ratio": ratio.detach()}

    def extra_repr(self) -> str:
        return (f"patches={self.num_patches}, keep={self.slimming.num_keep}, "
                f"aggregated={self.slimming.num_aggregated}, prefix={self.num_prefix}")


__all__ = ["LapsHead"]
