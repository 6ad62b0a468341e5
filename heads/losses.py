"""Batch losses on an image x caption score matrix, and score distillation.

Every loss takes ``scores [B, B]`` whose row i (image) pairs with column i (caption), the
``image_ids [B]`` of the pairs and the training ``Progress``; pairs whose image ids are equal are
never negatives of each other (a batch indexed by caption may hold two captions of one image).
``build_loss(name, **options)`` builds one from the registry (``list_losses()``).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cache.errors import InputError
from heads.base import Progress

REDUCTIONS = ("sum", "mean")


def same_image_mask(image_ids: Tensor | None, size: int, device: torch.device,
                    mask_same_image: bool = True) -> Tensor:
    """``[B, B]`` True where row and column are the same pair, or (with ``mask_same_image``) show
    the same image. ``image_ids=None`` means every pair has its own image (diagonal only)."""
    eye = torch.eye(size, dtype=torch.bool, device=device)
    if image_ids is None or not mask_same_image:
        return eye
    return (image_ids.unsqueeze(0) == image_ids.unsqueeze(1)) | eye


def _check_square(scores: Tensor, image_ids: Tensor | None) -> None:
    if scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError(f"a batch loss needs square scores [B, B] (row i pairs with column i), "
                         f"got {tuple(scores.shape)}")
    if image_ids is not None and image_ids.shape != (scores.shape[0],):
        raise ValueError(f"image_ids must have shape [{scores.shape[0]}], "
                         f"got {tuple(image_ids.shape)}")


# ----------------------------------------------------------------------------- hinge (VSE0 / VSE++)


def hinge_loss(scores: Tensor, image_ids: Tensor | None, margin: float = 0.2, hardest: bool = True,
               mask_same_image: bool = True, reduction: str = "sum") -> Tensor:
    """Bidirectional triplet hinge loss of VSE++.

    cost_s(i, j) = [margin + S_ij - S_ii]_+ (image i retrieves caption j) and
    cost_im(i, j) = [margin + S_ij - S_jj]_+ (caption j retrieves image i), zero on masked pairs.
    ``hardest``: per positive pair, only the largest violation of each direction (VSE++);
    otherwise the sum over all negatives (VSE0). ``reduction``: "sum" over the batch (reference
    code; gradient scale grows with B) or "mean" = that sum divided by B."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_square(scores, image_ids)
    scores = scores.float()
    positive = scores.diagonal()
    masked = same_image_mask(image_ids, scores.shape[0], scores.device, mask_same_image)
    cost_s = (margin + scores - positive.unsqueeze(1)).clamp(min=0).masked_fill(masked, 0)
    cost_im = (margin + scores - positive.unsqueeze(0)).clamp(min=0).masked_fill(masked, 0)
    if hardest:
        total = cost_s.amax(dim=1).sum() + cost_im.amax(dim=0).sum()
    else:
        total = cost_s.sum() + cost_im.sum()
    return total if reduction == "sum" else total / scores.shape[0]


class HingeLoss(nn.Module):
    """Hinge loss with the VSE∞ schedule: the VSE0 sum over all negatives during the first
    ``hardest_after_epochs`` epochs, the hardest negative (VSE++) from then on. 0 = hardest from the
    start (TERAN/TGDT/ALADIN); None = never (CADR as released)."""

    def __init__(self, margin: float = 0.2, hardest_after_epochs: int | None = 1,
                 mask_same_image: bool = True, reduction: str = "sum") -> None:
        super().__init__()
        if reduction not in REDUCTIONS:
            raise InputError(f"loss 'hinge': reduction must be one of {REDUCTIONS}, "
                             f"got {reduction!r}")
        self.margin, self.hardest_after_epochs = margin, hardest_after_epochs
        self.mask_same_image, self.reduction = mask_same_image, reduction

    def hardest(self, progress: Progress | None) -> bool:
        """Whether the hardest-negative form is active at ``progress`` (None = epoch 0)."""
        if self.hardest_after_epochs is None:
            return False
        epoch = progress.epoch if progress is not None else 0
        return epoch >= self.hardest_after_epochs

    def forward(self, scores: Tensor, image_ids: Tensor | None,
                progress: Progress | None = None) -> Tensor:
        return hinge_loss(scores, image_ids, self.margin, self.hardest(progress),
                          self.mask_same_image, self.reduction)

    def extra_repr(self) -> str:
        return (f"margin={self.margin}, hardest_after_epochs={self.hardest_after_epochs}, "
                f"mask_same_image={self.mask_same_image}, reduction={self.reduction!r}")


# ----------------------------------------------------------------------------- InfoNCE


class InfoNCELoss(nn.Module):
    """Symmetric InfoNCE (CLIP form): the mean of the image->caption and caption->image
    cross-entropies of ``scores / temperature``, each averaged over the batch.

    The temperature is stored as log(1/T) (learnable unless ``learnable=False``) and clamped to
    T in [``min_temperature``, 1]. With ``mask_same_image`` the other captions of a query image
    (and, for a caption query, the other rows showing its image) are removed from the negatives."""

    def __init__(self, temperature: float = 0.07, learnable: bool = True,
                 mask_same_image: bool = True, min_temperature: float = 0.01) -> None:
        super().__init__()
        if not 0 < min_temperature <= temperature <= 1:
            raise InputError(f"loss 'infonce': need 0 < min_temperature <= temperature <= 1, got "
                             f"temperature={temperature}, min_temperature={min_temperature}")
        log_scale = torch.tensor(math.log(1.0 / temperature))
        if learnable:
            self.log_scale = nn.Parameter(log_scale)
        else:
            self.register_buffer("log_scale", log_scale)
        self.max_log_scale = math.log(1.0 / min_temperature)
        self.mask_same_image = mask_same_image

    @property
    def temperature(self) -> Tensor:
        """The current (clamped) temperature, detached (for logging)."""
        return torch.exp(-self.log_scale.detach().clamp(0.0, self.max_log_scale))

    def forward(self, scores: Tensor, image_ids: Tensor | None,
                progress: Progress | None = None) -> Tensor:
        _check_square(scores, image_ids)
        logits = scores.float() * self.log_scale.clamp(0.0, self.max_log_scale).exp()
        size = scores.shape[0]
        eye = torch.eye(size, dtype=torch.bool, device=scores.device)
        removed = same_image_mask(image_ids, size, scores.device, self.mask_same_image) & ~eye
        logits = logits.masked_fill(removed, float("-inf"))
        target = torch.arange(size, device=scores.device)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2


# ----------------------------------------------------------------------------- distillation


def listnet_distillation(teacher: Tensor, student: Tensor, student_scale: float = 6.0,
                         eps: float = 1e-10) -> Tensor:
    """ALADIN's ListNet score distillation, both retrieval directions.

    mean over rows of CE(softmax(T_i.), softmax(scale * S_i.)) plus the same over columns, where
    CE(p, q) = -sum p log(q + eps). The teacher ``[B, B]`` is detached here."""
    if teacher.shape != student.shape:
        raise ValueError(f"teacher {tuple(teacher.shape)} and student {tuple(student.shape)} "
                         "differ in shape")
    t = teacher.detach().float()
    s = student.float() * student_scale

    def directional(dim: int) -> Tensor:
        target = torch.softmax(t, dim=dim)
        log_pred = torch.log(torch.softmax(s, dim=dim) + eps)
        return -(target * log_pred).sum(dim=dim).mean()

    return directional(1) + directional(0)


# ----------------------------------------------------------------------------- registry

_LOSSES: dict[str, Callable[..., nn.Module]] = {"hinge": HingeLoss, "infonce": InfoNCELoss}


def list_losses() -> list[str]:
    """Names accepted by ``build_loss``."""
    return sorted(_LOSSES)


def loss_options(name: str) -> dict[str, Any]:
    """The options of loss ``name`` with their defaults."""
    if name not in _LOSSES:
        raise InputError(f"unknown loss {name!r}; available: {', '.join(list_losses())}")
    params = inspect.signature(_LOSSES[name]).parameters
    return {p.name: p.default for p in params.values() if p.name != "self"}


def build_loss(name: str, **options: Any) -> nn.Module:
    """Instantiate loss ``name``; an unknown name or option is an InputError."""
    unknown = sorted(set(options) - set(loss_options(name)))
    if unknown:
        raise InputError(f"loss {name!r} has no option(s) {unknown}; it accepts "
                         f"{sorted(loss_options(name))}")
    return _LOSSES[name](**options)


__all__ = ["hinge_loss", "HingeLoss", "InfoNCELoss", "listnet_distillation", "same_image_mask",
           "build_loss", "list_losses", "loss_options"]
