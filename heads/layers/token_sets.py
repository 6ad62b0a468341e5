"""Building blocks of the token-set heads (TGDT, ALADIN): a masked transformer over token sets,
the rule that picks which tokens enter a word-region alignment, and the choice of a global token.

Token sets are padded ``[B, T, D]`` with ``mask [B, T]`` (True = valid), as
``cache.batch.TokenBatch`` produces them; prefix tokens (CLS) sit at the first positions, suffix
tokens ([SEP]) are the last valid ones.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from cache.errors import InputError
from heads.base import FeatureSpec
from heads.layers.masked import l2norm, masked_mean, strip_special


class TokenTransformer(nn.Module):
    """A stack of post-norm transformer encoder layers (ReLU, dropout) over a padded token set.

    Padded positions are excluded from attention by a key-padding mask, so the output at a valid
    position does not depend on how much padding the batch has; padded outputs are set to zero.
    ``layers=0`` is the identity.
    """

    def __init__(self, dim: int, layers: int = 2, heads: int = 4, ff_dim: int | None = None,
                 dropout: float = 0.1) -> None:
        super().__init__()
        if layers < 0:
            raise InputError(f"transformer layers must be >= 0, got {layers}")
        if layers and dim % heads:
            raise InputError(f"transformer width {dim} is not divisible by {heads} heads")
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=ff_dim or dim, dropout=dropout,
                                       activation="relu", batch_first=True, norm_first=False)
            for _ in range(layers))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        """``x [B, T, D]``, ``mask [B, T]`` (True = valid) -> ``[B, T, D]``."""
        padding = ~mask
        for layer in self.layers:
            x = layer(x, src_key_padding_mask=padding)
        return x.masked_fill(padding.unsqueeze(-1), 0.0)


# ------------------------------------------------------------------------- alignment token choice

DROP_RULES = ("cls_sep", "teran")


def check_drop_rule(name: str) -> None:
    """InputError unless ``name`` is a known token-drop rule."""
    if name not in DROP_RULES:
        raise InputError(f"drop_tokens must be one of {DROP_RULES}, got {name!r}")


def alignment_set(tokens: Tensor, mask: Tensor, spec: FeatureSpec, drop_tokens: str,
                  is_text: bool) -> tuple[Tensor, Tensor]:
    """The L2-normalised tokens that enter the word-region alignment (MrSw) and their mask.

    ``"cls_sep"`` drops the cache's ``prefix_tokens`` leading tokens (image CLS/registers, text
    [CLS]; sliced off) and ``suffix_tokens`` trailing valid tokens (text [SEP]; masked);
    ``"teran"`` also drops the last remaining word piece of every caption, as TERAN/TGDT/ALADIN do
    (meant for the final "." but it removes a real word when a caption has no period). Images are
    treated alike by both rules.
    """
    check_drop_rule(drop_tokens)
    extra = 1 if drop_tokens == "teran" and is_text else 0
    keep = strip_special(mask, spec.prefix_tokens, spec.suffix_tokens + extra)
    start = spec.prefix_tokens
    return l2norm(tokens[:, start:]), keep[:, start:]


# ------------------------------------------------------------------------------- global token

def _first(tokens: Tensor, mask: Tensor) -> Tensor:
    return tokens[:, 0]


GLOBAL_POOLS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"first": _first, "mean": masked_mean}
GLOBAL_CHOICES = ("auto", *GLOBAL_POOLS)


def check_global_pool(name: str) -> None:
    """InputError unless ``name`` is a known global-token rule."""
    if name not in GLOBAL_CHOICES:
        raise InputError(f"global_pool must be one of {GLOBAL_CHOICES}, got {name!r}")


def resolve_global_pool(name: str, prefix_tokens: int) -> Callable[[Tensor, Tensor], Tensor]:
    """The pooling that makes one global vector of a side's output tokens.

    ``"first"`` takes position 0 (the CLS token when the cache has one, otherwise the first
    region/patch, ALADIN's quirk), ``"mean"`` the masked mean over valid tokens, and ``"auto"``
    position 0 when the side has a prefix token and the masked mean otherwise.
    """
    check_global_pool(name)
    if name == "auto":
        name = "first" if prefix_tokens > 0 else "mean"
    return GLOBAL_POOLS[name]


__all__ = ["TokenTransformer", "DROP_RULES", "check_drop_rule", "alignment_set", "GLOBAL_CHOICES",
           "check_global_pool", "resolve_global_pool"]
