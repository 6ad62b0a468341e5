"""``cache``: the cached tokens as they are (no weights)."""
from __future__ import annotations

from cache.batch import TokenBatch
from cache.store import ImageCache, TextCache
from heads.sources.registry import SourceOptions, TokenSource, register_source


@register_source("cache")
class CachedTokens(TokenSource):
    """The cached tokens themselves."""

    @classmethod
    def from_cache(cls, cache: ImageCache | TextCache, options: SourceOptions) -> CachedTokens:
        return cls()

    def forward(self, batch: TokenBatch) -> TokenBatch:
        return batch
