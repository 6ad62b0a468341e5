"""Synthetic caches for the token-family head tests (TGDT, ALADIN): ``synthetic_pairs``' world with
captions framed like a BERT text cache, ``[CLS] words [SEP]`` (one prefix, one suffix token), so
the heads' token-drop rules and global [CLS] token are exercised. Padding holds garbage.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from cache.batch import TokenBatch
from heads.base import FeatureSpec, Progress
from heads.losses import HingeLoss
from heads.eval.metrics import recall_metrics
from tests.heads.synthetic_pairs import SyntheticWorld


class FramedWorld(SyntheticWorld):
    """Wider and less noisy than the base world (global embeddings learn it in ~100 steps).
    Captions get a [CLS] token (a fixed vector plus the mean of the words) and a fixed [SEP]."""

    def __init__(self, seed: int = 0, img_dim: int = 32, txt_dim: int = 32, noise: float = 0.1,
                 **options) -> None:
        super().__init__(seed=seed, img_dim=img_dim, txt_dim=txt_dim, noise=noise, **options)
        dim = self.txt_basis.shape[1]
        self.cls_token = torch.randn(dim, generator=self.g)
        self.sep_token = torch.randn(dim, generator=self.g)
        self.text_spec = FeatureSpec("text", dim, encoder="synthetic", prefix_tokens=1,
                                     suffix_tokens=1)

    def _caption(self, concepts: Tensor) -> Tensor:
        words = super()._caption(concepts)
        return torch.cat([(self.cls_token + words.mean(0)).unsqueeze(0), words,
                          self.sep_token.unsqueeze(0)])


@dataclass
class Split:
    images: TokenBatch
    texts: TokenBatch
    caption_image: Tensor

    def batch(self, caption_rows: Tensor) -> tuple[TokenBatch, TokenBatch, Tensor]:
        """Training pairs (images, texts, image_ids) of some caption rows."""
        image_rows = self.caption_image[caption_rows]
        return self.images.index(image_rows), self.texts.index(caption_rows), image_rows


def sample(world: FramedWorld, images: int, captions_per_image: int = 2) -> Split:
    return Split(*world.sample(images, captions_per_image))


def train_head(head: torch.nn.Module, split: Split, steps: int, batch_size: int = 32,
               lr: float = 3e-3, seed: int = 0) -> list[float]:
    """Adam on random caption batches with the hinge (margin 0.2, hardest negatives from step 0);
    returns the losses."""
    criterion = HingeLoss(margin=0.2, hardest_after_epochs=0)
    optimizer = torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    head.train()
    losses = []
    for step in range(steps):
        rows = torch.randperm(len(split.caption_image), generator=g)[:batch_size]
        loss, _ = head.training_loss(*split.batch(rows), criterion, Progress(step=step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


@torch.no_grad()
def recall_at_1(head, split: Split, mode: str | None = None) -> dict[str, float]:
    """i2t and t2i R@1 (percent) of ``head`` under inference ``mode`` over the whole split."""
    head.eval().set_mode(mode)
    sims = head.score(head.encode_images(split.images), head.encode_texts(split.texts))
    head.set_mode(None)
    metrics = recall_metrics(sims.float(), split.caption_image)
    return {"i2t_r1": metrics["i2t_r1"], "t2i_r1": metrics["t2i_r1"]}
