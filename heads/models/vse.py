"""VSE∞ (Chen et al., CVPR 2021): per-token projections pooled by GPO into one embedding per side.

Image side: ``ResidualMLPProjection`` (the region/"basic" variant) or a plain Linear (the grid
variant), then GPO, then L2. Text side: Linear(D -> embed) on the cached token states, GPO, L2.
Similarity = dot product of the L2-normalised embeddings.
"""
from __future__ import annotations

from torch import Tensor, nn

from cache.batch import TokenBatch
from heads.registry import register_head
from heads.base import EmbeddingHead, Encoded, FeatureSpec
from heads.layers import GPO, ResidualMLPProjection, l2norm, strip_special, xavier_linear


@register_head("vse")
class VSEInfinityHead(EmbeddingHead):
    """VSE∞ head on cached tokens.

    Options:
      ``embed_dim`` (1024) joint embedding size;
      ``image_mlp`` (None = auto: the residual MLP for region caches, i.e. caches without a
      patch grid, and a plain Linear for patch-grid caches, as VSE∞'s region vs grid variants;
      True/False force it);
      ``mlp_hidden`` (None = ``embed_dim // 2``, 512 in the paper);
      ``gpo_dim`` (32) size of GPO's positional codes and GRU hidden state;
      ``use_prefix`` (True: CLS/pooled prefix tokens of a cache are pooled like any other token).

    Deviations from woodfrog/vse_infty: the MLP's BatchNorm uses valid tokens only (the reference
    normalises zero padding too); GPO handles lengths by masking/reversal instead of packing (same
    values, no host sync); the text Linear is Xavier-initialised like the image one.
    """

    def __init__(self, image_spec: FeatureSpec, text_spec: FeatureSpec, embed_dim: int = 1024,
                 image_mlp: bool | None = None, mlp_hidden: int | None = None, gpo_dim: int = 32,
                 use_prefix: bool = True) -> None:
        super().__init__(image_spec, text_spec)
        self.use_prefix = use_prefix
        self.image_mlp = image_spec.grid is None if image_mlp is None else image_mlp
        self.image_proj: nn.Module = (
            ResidualMLPProjection(image_spec.dim, embed_dim, mlp_hidden) if self.image_mlp
            else xavier_linear(image_spec.dim, embed_dim))
        self.text_proj = xavier_linear(text_spec.dim, embed_dim)
        self.image_gpo = GPO(gpo_dim, gpo_dim)
        self.text_gpo = GPO(gpo_dim, gpo_dim)

    def _mask(self, batch: TokenBatch, spec: FeatureSpec) -> Tensor:
        return strip_special(batch.mask, prefix=0 if self.use_prefix else spec.prefix_tokens)

    def encode_images(self, batch: TokenBatch) -> Encoded:
        mask = self._mask(batch, self.image_spec)
        tokens = batch.tokens.to(self.text_proj.weight.dtype)
        feats = (self.image_proj(tokens, mask) if self.image_mlp else self.image_proj(tokens))
        return {"emb": l2norm(self.image_gpo(feats, mask))}

    def encode_texts(self, batch: TokenBatch) -> Encoded:
        mask = self._mask(batch, self.text_spec)
        feats = self.text_proj(batch.tokens.to(self.text_proj.weight.dtype))
        return {"emb": l2norm(self.text_gpo(feats, mask))}
