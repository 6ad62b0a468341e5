"""How far the e2e inputs move a trained head: its training loss on the same train batches, read
as the cache holds them and as an ``e2e`` source reads them, with and without augmentation.

A head trained on frozen caches saw one view of every photo (resized, no crop) and every caption
as written. An ``e2e`` run warm-started from it reads the same rows through the same (untuned)
backbones, but augmented: random resized crops and flips of the photos, 20 % of caption words
masked, replaced or deleted. The loss of the head on

* the cached tokens,
* the e2e inputs without augmentation (must equal the cached: the same model),
* photos augmented only, words perturbed only, both,

over the same ``--batches`` batches of an epoch over the photos tells how much of a first e2e
epoch goes to the augmentation rather than to tuning.

    python scripts/augmentation_shift.py --checkpoint runs/f8k_linear/best.pt --batches 3
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from cache.batch import InputBatch
from cache.datasets import PairBatches, caption_batches
from cache.store import ImageCache, TextCache
from heads.base import Progress
from heads.checkpoint import load_checkpoint
from heads.losses import build_loss
from heads.model import RetrievalModel, create_model
from heads.sources import BackboneTokens, build_source
from train.trainer import open_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="A run trained on cached tokens.")
    parser.add_argument("--batches", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    state = load_checkpoint(args.checkpoint)
    config = state["config"]
    images, texts = open_split(config, config["data"]["train_split"])
    cached_model = create_model(state, images, texts).eval()
    loss = build_loss(config["loss"]["name"],
                      **{k: v for k, v in config["loss"].items() if k != "name"})
    loss.load_state_dict(state["criterion"])
    caches = {"image": images, "text": texts}
    sources = {side: build_source("e2e", cache).eval() for side, cache in caches.items()}
    e2e_model = RetrievalModel(cached_model.head, sources["image"], sources["text"]).eval()

    def reader(side: str, augmented: bool) -> object:
        if augmented:
            return sources[side].training_reader(caches[side], 0)
        return _Plain(sources[side], caches[side])

    views = {
        "cached tokens": (cached_model, None),
        "e2e, no augmentation": (e2e_model, {"image": False, "text": False}),
        "e2e, photos augmented": (e2e_model, {"image": True, "text": False}),
        "e2e, words perturbed": (e2e_model, {"image": False, "text": True}),
        "e2e, both (the e2e recipe)": (e2e_model, {"image": True, "text": True}),
    }
    rows = caption_batches(len(texts), args.batch_size, 0, 0,
                           caption_image=np.asarray(texts.image_index))[:args.batches]
    print(f"{args.checkpoint}: {state['head_name']} head, {len(rows)} train batches of "
          f"{args.batch_size} (one caption per photo)")
    with torch.no_grad():
        for name, (model, augmented) in views.items():
            readers = None if augmented is None else {
                side: reader(side, flag) for side, flag in augmented.items()}
            data = PairBatches(images, texts, float32=True, readers=readers)
            values = []
            for batch_rows in rows:
                image_batch, text_batch, image_ids = data[(0, batch_rows)]
                encoded_images = model.image_source(image_batch.to("cpu", dtype=torch.float32))
                encoded_texts = model.text_source(text_batch.to("cpu", dtype=torch.float32))
                value, _ = model.head.training_loss(encoded_images, encoded_texts, image_ids,
                                                    loss, Progress(0, 0, 1))
                values.append(float(value))
            print(f"  {name:<28} loss {np.mean(values):.4f}")


class _Plain:
    """A side's e2e inputs as evaluation reads them (no augmentation), by row."""

    def __init__(self, source: BackboneTokens, cache: ImageCache | TextCache) -> None:
        self.source, self.cache = source, cache

    def read(self, rows: np.ndarray, epoch: int) -> InputBatch:
        (_, batch), = self.source.batches(self.cache, len(rows), np.asarray(rows))
        return batch


if __name__ == "__main__":
    main()
