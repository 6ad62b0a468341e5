"""SCAN, text-to-image stacked cross attention (Lee et al., ECCV 2018), on cached tokens.

For a caption (words w) and an image (regions v), all L2-normalised:

1. s_rw = cos(v_r, w) ; clipped L2 norm: s̄_rw = leaky_relu(s_rw, 0.1) / ||leaky_relu(s_r., 0.1)||
   (normalised over the caption's valid words, per region);
2. alpha_wr = softmax_r(lambda_softmax * s̄_rw) over the image's valid regions;
3. a_w = sum_r alpha_wr v_r ; R(w) = cos(w, a_w);
4. score = log(sum_w exp(lambda_lse * R(w))) / lambda_lse (LSE) or mean_w R(w) (AVG), valid words.

Blocks are scored without materialising the attended vectors a_w: w·a_w = sum_r alpha_wr s_rw and
||a_w||^2 = alpha_w^T G alpha_w with G = V V^T the image's region Gram matrix, so the largest
intermediate is ``[images, captions, words, regions]`` (no embedding dimension). This is an exact
rewrite of step 3, not an approximation.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from cache.batch import TokenBatch
from cache.errors import InputError
from heads.registry import register_head
from heads.base import Encoded, FeatureSpec, InteractionHead
from heads.layers import (TokenProjection, l2norm, masked_logsumexp, masked_softmax,
                          strip_special)


def _lse_pool(lambda_lse: float) -> Callable[[Tensor, Tensor], Tensor]:
    def pool(relevance: Tensor, word_mask: Tensor) -> Tensor:
        return masked_logsumexp(lambda_lse * relevance, word_mask, dim=-1) / lambda_lse
    return pool


def _avg_pool(relevance: Tensor, word_mask: Tensor) -> Tensor:
    word_mask = word_mask.expand_as(relevance)
    count = word_mask.sum(dim=-1).clamp(min=1)
    return relevance.masked_fill(~word_mask, 0).sum(dim=-1) / count


POOLINGS = ("lse", "avg")


def scan_attention(sims: Tensor, word_mask: Tensor, region_mask: Tensor, lambda_softmax: float,
                   negative_slope: float) -> Tensor:
    """SCAN's word-to-region attention alpha ``[..., W, R]`` (steps 1-2) from word-region cosines
    ``sims [..., W, R]``; ``word_mask [..., W]`` and ``region_mask [..., R]`` broadcast against
    ``sims``'s leading dimensions. Each valid word's row sums to 1 over the valid regions."""
    clipped = F.leaky_relu(sims, negative_slope).masked_fill(~word_mask.unsqueeze(-1), 0)
    clipped = l2norm(clipped, dim=-2)                                    # over words, per region
    return masked_softmax(lambda_softmax * clipped, region_mask.unsqueeze(-2), dim=-1)


def scan_t2i(sims: Tensor, word_mask: Tensor, region_mask: Tensor, gram: Tensor,
             word_norm: Tensor, lambda_softmax: float, negative_slope: float,
             pool: Callable[[Tensor, Tensor], Tensor], eps: float = 1e-8) -> Tensor:
    """SCAN t2i scores from word-region cosines ``sims [..., W, R]`` (words x regions).

    ``word_mask [..., W]``, ``region_mask [..., R]`` and word norms ``word_norm [..., W]``
    broadcast against ``sims``'s leading dimensions; the region Gram matrices ``gram [n, R, R]``
    follow ``sims``'s first dimension (one per image). Returns ``[...]``.
    """
    alpha = scan_attention(sims, word_mask, region_mask, lambda_softmax, negative_slope)
    dot = (alpha * sims).sum(dim=-1)                                     # w · a_w
    spread = torch.bmm(alpha.flatten(1, -2), gram.to(alpha.dtype)).view(alpha.shape)
    sq_norm = (spread * alpha).sum(dim=-1)                               # ||a_w||^2 = a G a^T
    relevance = dot / (word_norm * sq_norm.clamp(min=0).sqrt()).clamp(min=eps)
    return pool(relevance, word_mask)


@register_head("scan")
class SCANHead(InteractionHead):
    """SCAN t2i on cached tokens: Linear(D -> ``embed_dim``) per side, L2-normalised tokens.

    Options: ``embed_dim`` (1024); ``pooling`` ("lse" or "avg" over words); ``lambda_softmax``
    (9.0, attention inverse temperature); ``lambda_lse`` (6.0); ``negative_slope`` (0.1, leaky ReLU
    of the clipped L2 norm); ``use_prefix`` (True: CLS/pooled prefix tokens of a cache count as
    regions / words); ``chunk_elements`` (2**24: most elements of one ``[images, captions, words,
    regions]`` intermediate when scoring a block; larger blocks are split over images).

    Deviations from the reference (kuanghuei/SCAN): the text side is a Linear on cached token
    states instead of a trainable word-embedding bi-GRU; regions may be variable in number and are
    masked (the reference assumes 36 regions, all valid); blocks are vectorised instead of a Python
    loop per caption.
    """

    def __init__(self, image_spec: FeatureSpec, text_spec: FeatureSpec, embed_dim: int = 1024,
                 pooling: str = "lse", lambda_softmax: float = 9.0, lambda_lse: float = 6.0,
                 negative_slope: float = 0.1, use_prefix: bool = True,
                 chunk_elements: int = 2 ** 24) -> None:
        super().__init__(image_spec, text_spec)
        if pooling not in POOLINGS:
            raise InputError(f"head 'scan': pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pool = _lse_pool(lambda_lse) if pooling == "lse" else _avg_pool
        self.lambda_softmax, self.negative_slope = lambda_softmax, negative_slope
        self.use_prefix, self.chunk_elements = use_prefix, chunk_elements
        self.image_proj = TokenProjection(image_spec.dim, embed_dim)
        self.text_proj = TokenProjection(text_spec.dim, embed_dim)

    def _encode(self, batch: TokenBatch, spec: FeatureSpec, proj: TokenProjection) -> Encoded:
        mask = strip_special(batch.mask, prefix=0 if self.use_prefix else spec.prefix_tokens)
        return {"tokens": proj(batch.tokens.to(proj.fc.weight.dtype), mask), "mask": mask}

    def encode_images(self, batch: TokenBatch) -> Encoded:
        return self._encode(batch, self.image_spec, self.image_proj)

    def encode_texts(self, batch: TokenBatch) -> Encoded:
        return self._encode(batch, self.text_spec, self.text_proj)

    def _score(self, sims: Tensor, word_mask: Tensor, region_mask: Tensor, gram: Tensor,
               word_norm: Tensor) -> Tensor:
        return scan_t2i(sims, word_mask, region_mask, gram, word_norm, self.lambda_softmax,
                        self.negative_slope, self.pool)

    def score(self, images: Encoded, texts: Encoded) -> Tensor:
        """Scores ``[n_img, n_txt]`` of two blocks, split over images to bound memory."""
        img, img_mask = images["tokens"], images["mask"]
        txt, txt_mask = texts["tokens"], texts["mask"]
        n_img, n_reg, dim = img.shape
        n_txt, n_word, _ = txt.shape
        word_norm = txt.norm(dim=-1).unsqueeze(0)                        # [1, T, W]
        step = max(1, self.chunk_elements // max(1, n_txt * n_word * n_reg))
        rows = []
        for start in range(0, n_img, step):
            part, part_mask = img[start:start + step], img_mask[start:start + step]
            sims = (part.reshape(-1, dim) @ txt.reshape(-1, dim).transpose(0, 1))
            sims = sims.view(part.shape[0], n_reg, n_txt, n_word).permute(0, 2, 3, 1)  # [i,T,W,R]
            gram = part @ part.transpose(1, 2)                           # [i, R, R]
            rows.append(self._score(sims, txt_mask.unsqueeze(0), part_mask.unsqueeze(1), gram,
                                    word_norm))
        return torch.cat(rows, dim=0)

    def score_pairs(self, images: Encoded, texts: Encoded) -> Tensor:
        img, txt = images["tokens"], texts["tokens"]
        sims = txt @ img.transpose(1, 2)                                 # [P, W, R]
        gram = img @ img.transpose(1, 2)
        return self._score(sims, texts["mask"], images["mask"], gram, txt.norm(dim=-1))

    def attention(self, images: Encoded, texts: Encoded) -> Tensor:
        """Word-to-region attention ``[P, W, R]`` of aligned pairs (``scan_attention``): what each
        word of caption p attends to in image p; rows of invalid words carry no meaning. For
        pictures (``cli explain``); scoring does not call it."""
        sims = texts["tokens"] @ images["tokens"].transpose(1, 2)
        return scan_attention(sims, texts["mask"], images["mask"], self.lambda_softmax,
                              self.negative_slope)
