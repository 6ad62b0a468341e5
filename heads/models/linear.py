"""The linear baseline: mean of the cached tokens of each side, one Linear projection per side.

This is the reference point of the shared data README (frozen EfficientNet-Lite0 mean feature +
frozen MiniLM mean feature, two linear projections trained with InfoNCE): every other head must beat
it on the same caches.
"""
from __future__ import annotations

from torch import nn

from cache.batch import TokenBatch
from heads.registry import register_head
from heads.base import EmbeddingHead, Encoded, FeatureSpec
from heads.layers import l2norm, masked_mean, strip_special, xavier_linear


@register_head("linear")
class LinearHead(EmbeddingHead):
    """Masked mean of each side's tokens -> Linear(D -> ``embed_dim``) -> L2 normalisation.

    Options: ``embed_dim`` (512), ``use_prefix`` (True: the mean covers every valid token, CLS /
    pooled prefix tokens included; False: the cache's ``prefix_tokens`` are left out).
    """

    def __init__(self, image_spec: FeatureSpec, text_spec: FeatureSpec, embed_dim: int = 512,
                 use_prefix: bool = True) -> None:
        super().__init__(image_spec, text_spec)
        self.use_prefix = use_prefix
        self.image_fc: nn.Linear = xavier_linear(image_spec.dim, embed_dim)
        self.text_fc: nn.Linear = xavier_linear(text_spec.dim, embed_dim)

    def _encode(self, batch: TokenBatch, spec: FeatureSpec, fc: nn.Linear) -> Encoded:
        tokens = batch.tokens.to(fc.weight.dtype)
        mask = strip_special(batch.mask, prefix=0 if self.use_prefix else spec.prefix_tokens)
        pooled = masked_mean(tokens, mask)
        return {"emb": l2norm(fc(pooled))}

    def encode_images(self, batch: TokenBatch) -> Encoded:
        return self._encode(batch, self.image_spec, self.image_fc)

    def encode_texts(self, batch: TokenBatch) -> Encoded:
        return self._encode(batch, self.text_spec, self.text_fc)
