"""Building blocks shared by the heads (``heads.models``).

``masked`` (normalisation, special-token masks, masked pooling), ``gpo`` (VSE∞'s pooling),
``projections`` (token projections, masked BatchNorm), ``alignment`` (max-mean and MrSw scores),
``token_sets`` (transformers over token sets, alignment sets, global pooling) and
``patch_slimming`` (LAPS's patch selection and aggregation). The common ones are re-exported here.
"""
from heads.layers.alignment import WORD_POOLS, max_mean_alignment, mrsw, mrsw_block
from heads.layers.gpo import GPO, sinusoid_codes
from heads.layers.masked import (l2norm, masked_logsumexp, masked_max, masked_mean, masked_softmax,
                                 masked_topk_mean, strip_special)
from heads.layers.projections import (MaskedBatchNorm1d, ResidualMLPProjection, TokenProjection,
                                      xavier_linear)

__all__ = ["l2norm", "strip_special", "masked_mean", "masked_max", "masked_softmax",
           "masked_logsumexp", "masked_topk_mean", "sinusoid_codes", "GPO", "xavier_linear",
           "MaskedBatchNorm1d", "ResidualMLPProjection", "TokenProjection", "max_mean_alignment",
           "mrsw", "mrsw_block", "WORD_POOLS"]
