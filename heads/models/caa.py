"""CADR: context anchor attention + LAPS (anonymoususer-code/CADR), an interaction head on patch
tokens that lie on a grid (DINOv2 in the reference).

The projected patch tokens are put back on their H x W grid (``FeatureSpec.grid``; prefix tokens
from ``FeatureSpec.prefix_tokens``) and run through Context Anchor Attention (PKINet's CAA, as
CADR's copy defines it): AvgPool 7x7 (stride 1, pad 3) -> 1x1 conv + BN + SiLU -> depthwise 1xk and
kx1 strips -> 1x1 conv -> sigmoid, a gate A in (0, 1) per patch (one channel by default, or C
channels). k follows the grid: k = 2*floor(H/3)+1 (11 for a 16 x 16 grid, PKINet's value; the
methods note writes the rule with ceil, which gives 13 there), separately for the two strips.

How the gate is used (CADR's figure draws CAA inside the text-aware patch selection, but its
released code builds the module and never calls it):

* selection prior: s_j = a_j + b_j + ``gate_prior`` * A_j (A_j = channel mean for a C-channel gate);
* value path (``gate_values``): ``"scale"`` (default) p_j <- A_j * p_j, the tokens that LAPS then
  selects, fuses and aggregates; ``"residual"`` p_j <- p_j + p_j * A_j (PKINet's feature
  modulation). The top-K itself has no gradient, so this value path is what trains the gate.
  LAPS's saliency and relevance are measured on the gated tokens.

Then LAPS's calibration (aggregation) and word-patch max-mean alignment, reusing ``heads.models.laps``.

Option ``refiner`` (off by default): the gated cross-attention refiner of CADR's released code
(methods file section 4.2 item 2) after both projections: u = sigmoid(MLP_2C(X)),
r = sigmoid(MLP_3C(X)), shared Q/K/V, Z1 = Drop(softmax(Q(u)K(r)^T))V(r),
Z2 = Drop(softmax(Q(r)K(u)^T))V(u) (no 1/sqrt(d), as released), X <- X + 0.6*(Z1+Z2)/2.
Deviations: keys at padding positions are masked (the released text refiner attends over padding,
so a caption's score depended on its batch), and the image-side refiner is trained (the released
optimiser leaves it out, so it stays at its random initialisation).

Other differences from the released code: M = floor(N*kappa*rho) from the cache's real patch count
(the release hard-codes 28 patches per side, M = 13 instead of 122 for DINOv2-B/14 at 224 px); the
loss schedule (CADR as released: VSE0 throughout) is a config choice
(``loss.hardest_after_epochs``).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from cache.batch import TokenBatch
from cache.errors import InputError
from heads.registry import register_head
from heads.base import Encoded, FeatureSpec
from heads.models.laps import LapsHead


def anchor_kernel(side: int) -> int:
    """Strip length for a grid side: 2*floor(side/3)+1, at least 3 (16 -> 11, 14 -> 9, 7 -> 5)."""
    return max(3, 2 * (side // 3) + 1)


class ContextAnchorAttention(nn.Module):
    """CAA on token grids: ``forward(tokens [B, H*W, C], mask [B, H*W]) -> gate [B, H*W, out]``.

    Padding positions enter the grid as zeros. BatchNorm uses PKINet's momentum 0.03, eps 1e-3;
    in eval mode its running statistics."""

    def __init__(self, dim: int, grid: tuple[int, int], out_channels: int = 1,
                 kernel_size: int | None = None, count_include_pad: bool = True) -> None:
        super().__init__()
        if kernel_size is not None and (kernel_size < 1 or kernel_size % 2 == 0):
            raise InputError(f"CAA kernel_size must be a positive odd number, got {kernel_size}")
        self.grid = grid
        k_h = kernel_size or anchor_kernel(grid[0])
        k_w = kernel_size or anchor_kernel(grid[1])
        self.kernel = (k_h, k_w)
        self.pool = nn.AvgPool2d(7, stride=1, padding=3, count_include_pad=count_include_pad)
        self.conv1 = nn.Conv2d(dim, dim, 1, bias=False)
        self.norm = nn.BatchNorm2d(dim, eps=1e-3, momentum=0.03)
        self.act = nn.SiLU()
        self.h_conv = nn.Conv2d(dim, dim, (1, k_w), padding=(0, k_w // 2), groups=dim)
        self.v_conv = nn.Conv2d(dim, dim, (k_h, 1), padding=(k_h // 2, 0), groups=dim)
        self.conv2 = nn.Conv2d(dim, out_channels, 1)

    def forward(self, tokens: Tensor, mask: Tensor) -> Tensor:
        b, n, c = tokens.shape
        x = tokens.masked_fill(~mask.unsqueeze(-1), 0).transpose(1, 2).reshape(b, c, *self.grid)
        y = self.act(self.norm(self.conv1(self.pool(x))))
        y = self.conv2(self.v_conv(self.h_conv(y)))
        return torch.sigmoid(y).flatten(2).transpose(1, 2)


class GatedCrossAttention(nn.Module):
    """CADR's token refiner (option), with a key padding mask: ``forward(x [B, T, C], mask)``."""

    def __init__(self, dim: int, dropout: float = 0.5, weight: float = 0.6) -> None:
        super().__init__()
        self.u = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim),
                               nn.Sigmoid())
        self.r = nn.Sequential(nn.Linear(dim, 3 * dim), nn.ReLU(), nn.Linear(3 * dim, dim),
                               nn.Sigmoid())
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dropout = nn.Dropout(dropout)
        self.weight = weight

    def attend(self, query: Tensor, key: Tensor, mask: Tensor) -> Tensor:
        logits = self.q(query) @ self.k(key).transpose(1, 2)
        attn = torch.softmax(logits.masked_fill(~mask.unsqueeze(1), float("-inf")), dim=-1)
        return self.dropout(attn) @ self.v(key)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        u, r = self.u(x), self.r(x)
        refined = x + self.weight * (self.attend(u, r, mask) + self.attend(r, u, mask)) / 2
        return refined.masked_fill(~mask.unsqueeze(-1), 0)


GATE_VALUES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "scale": lambda tokens, gate: tokens * gate,
    "residual": lambda tokens, gate: tokens + tokens * gate,
}
GATE_CHANNELS = ("one", "all")


@register_head("caa")
class CaaHead(LapsHead):
    """LAPS with a context anchor attention gate in the patch selection (CADR)."""

    requires_grid = True

    def __init__(self, image_spec: FeatureSpec, text_spec: FeatureSpec, embed_dim: int = 512,
                 keep_ratio: float = 0.8, aggr_ratio: float = 0.6, keep_cls: bool = True,
                 gate_prior: float = 1.0, gate_values: str = "scale", gate_channels: str = "one",
                 kernel_size: int | None = None, count_include_pad: bool = True,
                 refiner: bool = False, refiner_dropout: float = 0.5, refiner_weight: float = 0.6,
                 score_net: bool = False, attention_weight: float = 0.8, gumbel_tau: float = 1.0,
                 ratio_weight: float = 2.0, negative_slope: float = 0.1,
                 chunk_elements: int = 1 << 25) -> None:
        super().__init__(image_spec, text_spec, embed_dim, keep_ratio, aggr_ratio, keep_cls,
                         score_net, attention_weight, gumbel_tau, ratio_weight, negative_slope,
                         chunk_elements)
        if gate_values not in GATE_VALUES:
            raise InputError(f"head 'caa': gate_values must be one of {sorted(GATE_VALUES)}, got "
                             f"{gate_values!r}")
        if gate_channels not in GATE_CHANNELS:
            raise InputError(f"head 'caa': gate_channels must be one of {GATE_CHANNELS}, got "
                             f"{gate_channels!r}")
        grid = image_spec.grid or (0, 0)     # check_inputs has required a grid
        self.caa = ContextAnchorAttention(embed_dim, grid,
                                          1 if gate_channels == "one" else embed_dim,
                                          kernel_size, count_include_pad)
        self.gate_prior, self.gate_values = gate_prior, gate_values
        self.image_refiner = GatedCrossAttention(embed_dim, refiner_dropout, refiner_weight) \
            if refiner else None
        self.text_refiner = GatedCrossAttention(embed_dim, refiner_dropout, refiner_weight) \
            if refiner else None

    def project_image_tokens(self, batch: TokenBatch) -> Tensor:
        tokens = super().project_image_tokens(batch)
        return tokens if self.image_refiner is None else self.image_refiner(tokens, batch.mask)

    def project_texts(self, batch: TokenBatch) -> tuple[Tensor, Tensor]:
        words, mask = super().project_texts(batch)
        return (words if self.text_refiner is None else self.text_refiner(words, mask)), mask

    def gate(self, patches: Tensor, mask: Tensor) -> Tensor:
        """The CAA gate of projected patches ``[I, N, C]`` -> ``[I, N, 1 or C]``."""
        return self.caa(patches, mask).to(patches.dtype)

    def encode_images(self, batch: TokenBatch) -> Encoded:
        cls, cls_mask, patches, mask = self.project_images(batch)
        if self.training and not bool(mask.all()):   # one check per training step
            raise InputError("head 'caa' needs every patch token at its grid position, but the "
                             "batch has dropped patch tokens; set data.image_token_drop: 0 (token "
                             "drop moves the remaining tokens, so the grid is lost)")
        gate = self.gate(patches, mask)
        values = GATE_VALUES[self.gate_values](patches, gate)
        prior = self.gate_prior * gate.mean(dim=-1) if self.gate_prior else None
        return self.image_encoding(cls, cls_mask, values, mask, prior)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, gate_prior={self.gate_prior}, "
                f"gate_values={self.gate_values!r}, kernel={self.caa.kernel}")


__all__ = ["CaaHead", "ContextAnchorAttention", "GatedCrossAttention", "anchor_kernel"]
