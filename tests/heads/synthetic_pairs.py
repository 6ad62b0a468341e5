"""Synthetic structured image/caption token sets for head tests (learning checks, padding checks).

A fixed "world" has concepts with one random vector per modality. An image is a prefix token (the
mean of its regions), a token per concept it shows and a few distractor tokens, in random order; a
caption of it is a token per concept plus filler "stop word" tokens. Padding positions hold large
random values, so any head that reads them is caught.
"""
from __future__ import annotations

import torch
from torch import Tensor

from cache.batch import TokenBatch
from heads.base import FeatureSpec, Progress


def pad_sets(sets: list[Tensor], width: int | None = None, generator: torch.Generator | None = None
             ) -> TokenBatch:
    """Pad variable-length token sets ``[n_i, D]`` into a TokenBatch; padding is random garbage."""
    width = width or max(s.shape[0] for s in sets)
    dim = sets[0].shape[1]
    tokens = 5 * torch.randn(len(sets), width, dim, generator=generator)
    mask = torch.zeros(len(sets), width, dtype=torch.bool)
    for row, s in enumerate(sets):
        tokens[row, :s.shape[0]] = s
        mask[row, :s.shape[0]] = True
    return TokenBatch(tokens, mask)


def repad(batch: TokenBatch, extra: int, seed: int = 0) -> TokenBatch:
    """The same batch with ``extra`` more padding positions of garbage (and garbage re-drawn)."""
    g = torch.Generator().manual_seed(seed)
    tokens = 7 * torch.randn(batch.tokens.shape[0], batch.tokens.shape[1] + extra,
                             batch.tokens.shape[2], generator=g)
    mask = torch.zeros(tokens.shape[:2], dtype=torch.bool)
    mask[:, :batch.mask.shape[1]] = batch.mask
    tokens[mask] = batch.tokens[batch.mask]
    return TokenBatch(tokens, mask)


class SyntheticWorld:
    """Concept vectors shared by every sample drawn from this world."""

    def __init__(self, seed: int = 0, n_concepts: int = 16, img_dim: int = 32, txt_dim: int = 24,
                 per_item: int = 3, noise: float = 0.2) -> None:
        self.g = torch.Generator().manual_seed(seed)
        self.n_concepts, self.per_item, self.noise = n_concepts, per_item, noise
        self.img_basis = torch.randn(n_concepts, img_dim, generator=self.g)
        self.txt_basis = torch.randn(n_concepts, txt_dim, generator=self.g)
        self.stop_words = torch.randn(4, txt_dim, generator=self.g)
        self.image_spec = FeatureSpec("image", img_dim, encoder="synthetic", prefix_tokens=1)
        self.text_spec = FeatureSpec("text", txt_dim, encoder="synthetic")

    def _randint(self, low: int, high: int) -> int:
        return int(torch.randint(low, high, (1,), generator=self.g))

    def _image(self, concepts: Tensor) -> Tensor:
        n_distract = self._randint(1, 4)
        regions = torch.cat([self.img_basis[concepts],
                             0.5 * torch.randn(n_distract, self.img_basis.shape[1], generator=self.g)])
        regions = regions + self.noise * torch.randn(regions.shape, generator=self.g)
        regions = regions[torch.randperm(regions.shape[0], generator=self.g)]
        return torch.cat([regions.mean(0, keepdim=True), regions])

    def _caption(self, concepts: Tensor) -> Tensor:
        words = self.txt_basis[concepts[torch.randperm(len(concepts), generator=self.g)]]
        n_stop = self._randint(1, 4)
        stops = self.stop_words[torch.randint(0, 4, (n_stop,), generator=self.g)]
        words = torch.cat([words, stops])[torch.randperm(len(concepts) + n_stop, generator=self.g)]
        return words + self.noise * torch.randn(words.shape, generator=self.g)

    def sample(self, n_images: int, captions_per_image: int = 1
               ) -> tuple[TokenBatch, TokenBatch, Tensor]:
        """Images, captions and the image row of each caption (image-major order)."""
        images, captions, image_of = [], [], []
        for i in range(n_images):
            concepts = torch.randperm(self.n_concepts, generator=self.g)[:self.per_item]
            images.append(self._image(concepts))
            for _ in range(captions_per_image):
                captions.append(self._caption(concepts))
                image_of.append(i)
        return (pad_sets(images, generator=self.g), pad_sets(captions, generator=self.g),
                torch.tensor(image_of))


def train_and_recall(head: torch.nn.Module, criterion: torch.nn.Module, world: SyntheticWorld,
                     steps: int = 300, batch_size: int = 32, lr: float = 3e-3, seed: int = 0
                     ) -> float:
    """Train ``head`` on fresh pairs of ``world`` and return caption->image R@1 on 100 new images.

    Runs single-threaded (restored afterwards): tiny ops on a shared machine are many times faster
    without OpenMP worker threads spinning."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_and_recall(head, criterion, world, steps, batch_size, lr, seed)
    finally:
        torch.set_num_threads(threads)


def _train_and_recall(head: torch.nn.Module, criterion: torch.nn.Module, world: SyntheticWorld,
                      steps: int, batch_size: int, lr: float, seed: int) -> float:
    torch.manual_seed(seed)
    images, texts, image_of = world.sample(200, captions_per_image=2)
    params = list(head.parameters()) + list(criterion.parameters())
    opt = torch.optim.Adam(params, lr=lr)
    head.train()
    for step in range(steps):
        rows = torch.randperm(len(image_of))[:batch_size]
        loss, _ = head.training_loss(images.index(image_of[rows]), texts.index(rows),
                                     image_of[rows], criterion,
                                     Progress(epoch=step * 3 // steps, step=step,
                                              steps_per_epoch=max(1, steps // 3)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    head.eval()
    test_images, test_texts, test_of = world.sample(100)
    with torch.no_grad():
        sims = head.score(head.encode_images(test_images), head.encode_texts(test_texts))
    return float((sims.argmax(dim=0) == test_of).float().mean())
