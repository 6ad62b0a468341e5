"""Token sources: what each side of a head reads. The contract and the registry are in
`heads.sources.registry`; each kind is one module here (``cache``, ``tail``, ``e2e``), registered
on import. `heads.model` puts the sources and the head together."""
from heads.sources.registry import (EPOCH_UNITS, SourceOptions, TokenSource, build_source,
                                    list_sources, register_source, source_class, source_kinds)
from heads.sources.cache import CachedTokens
from heads.sources.tail import TailTokens
from heads.sources.e2e import BackboneTokens

__all__ = ["EPOCH_UNITS", "BackboneTokens", "CachedTokens", "SourceOptions",
           "TailTokens", "TokenSource", "build_source", "list_sources", "register_source",
           "source_class", "source_kinds"]
