"""Several processes under ``torchrun``: process group, device, and a loss over the global batch.

``optim.batch_size`` is the global batch; each rank takes a slice of it (``cache.datasets``), and
``LossModule`` (the module DDP wraps) lets the head's loss see the whole global batch, either by
all-gathering the encodings with gradient (the head's compute is split over the ranks) or by
all-gathering the head's input token batches (any head; every rank computes the global batch).
Either way the gradient DDP averages equals the one-process gradient of the global batch. The token
sources (``heads.sources``: a tuned tail or whole backbone) run first, on each rank's own rows, before
anything is gathered; what they output is gathered with its gradient.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

from cache.batch import TokenBatch
from cache.device import resolve_device
from cache.errors import InputError
from heads.base import Encoded, Head, Progress
from heads.model import RetrievalModel


@dataclass(frozen=True)
class Dist:
    """Where this process runs: its rank among ``world_size`` processes and its device."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the torchrun process group when ``WORLD_SIZE > 1`` (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world <= 1:
        return Dist(device=device)
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), device, owns)


class _AllGather(torch.autograd.Function):
    """All-gather along dim 0 (equal sizes on every rank) whose backward sums the gradient over
    the ranks and returns this rank's slice (every rank computes the loss of the whole batch)."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor) -> Tensor:
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def all_gather_tensor(tensor: Tensor) -> Tensor:
    """Concatenate every rank's ``tensor`` along dim 0; differentiable for float tensors. Dim 1
    (token sets of different lengths) is zero/False-padded to the longest rank's."""
    if tensor.dim() >= 2:
        width = torch.tensor([tensor.shape[1]], device=tensor.device)
        dist.all_reduce(width, op=dist.ReduceOp.MAX)
        extra = int(width) - tensor.shape[1]
        if extra:
            tensor = nn.functional.pad(tensor, [0, 0] * (tensor.dim() - 2) + [0, extra])
    if tensor.is_floating_point():
        return _AllGather.apply(tensor)
    moved = tensor.to(torch.uint8) if tensor.dtype == torch.bool else tensor
    parts = [torch.empty_like(moved) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, moved.contiguous())
    return torch.cat(parts).to(tensor.dtype)


def all_gather_encoded(enc: Encoded) -> Encoded:
    """An encoding of the global batch from every rank's local encoding."""
    return {key: all_gather_tensor(value) for key, value in enc.items()}


@contextlib.contextmanager
def gathered_encodings(head: Head) -> Iterator[None]:
    """Within the block, ``head.encode_images`` / ``encode_texts`` return the encodings of the global
    batch (this rank's rows keep their gradient). A head's ``training_loss`` must therefore derive
    every batch-wide quantity from these encodings (all heads of this toolkit do)."""
    encode_images, encode_texts = head.encode_images, head.encode_texts
    head.encode_images = lambda batch: all_gather_encoded(encode_images(batch))  # type: ignore[method-assign]
    head.encode_texts = lambda batch: all_gather_encoded(encode_texts(batch))  # type: ignore[method-assign]
    try:
        yield
    finally:
        del head.encode_images, head.encode_texts


def all_gather_batch(batch: TokenBatch) -> TokenBatch:
    """The token batch of the global batch (with gradient: tokens of a tuned source)."""
    return TokenBatch(all_gather_tensor(batch.tokens), all_gather_tensor(batch.mask))


GATHER_MODES = ("auto", "encodings", "inputs")


def gather_mode(head: Head, mode: str) -> str:
    """How a DDP step lets the loss see the global batch.

    "encodings": each rank encodes its own rows and the encodings are all-gathered with gradient
    (the head's compute is split over the ranks); valid when ``training_loss`` derives every
    batch-wide quantity from ``encode_images`` / ``encode_texts``. "inputs": the head's
    token batches (the sources' outputs) are all-gathered and every rank computes the loss of the
    global batch (valid for any head; the head's compute is not split, the sources' still is).
    "auto": "encodings" for heads that keep the base ``training_loss`` or declare
    ``loss_from_encodings = True``, otherwise "inputs"."""
    if mode not in GATHER_MODES:
        raise InputError(f"run.ddp_gather must be one of {GATHER_MODES}, got {mode!r}")
    if mode != "auto":
        return mode
    default = type(head).training_loss is Head.training_loss
    return "encodings" if getattr(type(head), "loss_from_encodings", default) else "inputs"


class LossModule(nn.Module):
    """The module DDP wraps: the model (head and token sources) and the loss (whose temperature
    may be learnable); ``forward`` runs this rank's rows through the sources and returns the head's
    ``training_loss`` of the global batch (see ``gather_mode``)."""

    def __init__(self, model: RetrievalModel, criterion: nn.Module, world_size: int = 1,
                 gather: str = "encodings") -> None:
        super().__init__()
        self.model, self.criterion = model, criterion
        self.world_size, self.gather = world_size, gather

    def forward(self, images: TokenBatch, texts: TokenBatch, image_ids: Tensor,
                progress: Progress) -> tuple[Tensor, dict[str, Any]]:
        head = self.model.head
        images, texts = self.model.image_source(images), self.model.text_source(texts)
        if self.world_size == 1:
            return head.training_loss(images, texts, image_ids, self.criterion, progress)
        image_ids = all_gather_tensor(image_ids)
        if self.gather == "inputs":
            return head.training_loss(all_gather_batch(images), all_gather_batch(texts),
                                      image_ids, self.criterion, progress)
        with gathered_encodings(head):
            return head.training_loss(images, texts, image_ids, self.criterion, progress)
