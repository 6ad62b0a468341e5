"""Benchmark: head training steps per second from the feature cache vs running the frozen backbones
on the raw images and captions for every batch (what the reference repositories do each epoch).

Both runs train the same head (default ``vse``, same initialisation, loss, optimiser and batch
size) on the same caption batches of Flickr8k ``train`` (the first ``--images`` photos from
../shared/data): the cached run reads token features written once by ``extract`` (EfficientNet-Lite0
+ MiniLM, timed here as the one-off cost); the raw run decodes the JPEGs (DataLoader workers),
tokenises the captions and runs both frozen backbones (eval mode, no grad) before each step.

    python bench/train_from_cache.py --images 256 --batch-size 32 --steps 20

Ratio = (cached steps/s) / (raw steps/s), measured in the same run on the same device. Skips with
a message when ../shared/data is missing.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from backbones.registry import create_image_encoder, create_text_encoder
from cache.batch import TokenBatch
from cache.datasets import EpochBatches, PairBatches
from cache.store import ImageCache, TextCache
from extract.datasets import SplitIndex, load_rgb, load_split
from extract.runner import RunOptions, extract_images, extract_texts, limit_split
from heads.base import FeatureSpec, Head, Progress
from heads.losses import build_loss
from heads.registry import build_head, head_options
from machine import print_machine

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
Batch = tuple[TokenBatch, TokenBatch, Tensor]


class RawPairs(torch.utils.data.Dataset):
    """What a reference repository's loader yields per caption: the decoded, transformed image
    and the caption's token ids."""

    def __init__(self, index: SplitIndex, transform: Callable, token_ids: list[list[int]]) -> None:
        self.index, self.transform, self.token_ids = index, transform, token_ids

    def __len__(self) -> int:
        return self.index.num_captions

    def __getitem__(self, row: int) -> tuple[Tensor, list[int], int]:
        image = int(self.index.caption_image_index[row])
        return self.transform(load_rgb(self.index.image_file(image))), self.token_ids[row], image


def raw_batches(index: SplitIndex, image_encoder, text_encoder, batches: list[np.ndarray],
                workers: int) -> Iterator[Batch]:
    """Decode, tokenise and run both frozen backbones for every batch."""
    dataset = RawPairs(index, image_encoder.transform, text_encoder.tokenize(index.captions))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=workers,
                                         collate_fn=lambda items: list(zip(*items)))
    for pixels, token_ids, images in loader:
        with torch.inference_mode():
            tokens = image_encoder(torch.stack(pixels))
            input_ids, attention = text_encoder.pad_batch(token_ids)
            states = text_encoder(input_ids, attention)
        image_mask = torch.ones(tokens.shape[:2], dtype=torch.bool)
        yield (TokenBatch(tokens.clone(), image_mask),
               TokenBatch(states.clone(), attention.bool()), torch.tensor(images))


def cached_batches(images: ImageCache, texts: TextCache, batches: list[np.ndarray]) -> Iterator[Batch]:
    """The same batches read from the caches by the training loader (fp16 -> float32)."""
    dataset = PairBatches(images, texts)
    for image_batch, text_batch, ids in (dataset[(0, rows)] for rows in batches):
        yield (TokenBatch(image_batch.tokens.float(), image_batch.mask),
               TokenBatch(text_batch.tokens.float(), text_batch.mask), ids)


def train_steps(head: Head, batches: Iterator[Batch], steps: int) -> tuple[float, float]:
    """Run ``steps`` optimisation steps after one warm-up step; returns (steps/s, last loss)."""
    criterion = build_loss("hinge", hardest_after_epochs=0)
    optimizer = torch.optim.AdamW(head.parameters(), lr=2e-4)
    head.train()
    start, loss = 0.0, torch.zeros(())
    for step, (images, texts, ids) in enumerate(batches):
        if step == 1:
            start = time.perf_counter()
        loss, _ = head.training_loss(images, texts, ids, criterion, Progress(0, step, steps + 1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step == steps:
            break
    return steps / (time.perf_counter() - start), float(loss.detach())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="Flickr8k train photos used")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20, help="timed steps (after 1 warm-up)")
    parser.add_argument("--head", default="vse")
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--workers", type=int, default=1, help="JPEG decoding workers (both runs)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    if not (DATA / "f8k" / "train_caps.txt").exists():
        print(f"skipped: Flickr8k not found at {DATA} (../shared/data beside the repository)")
        return
    torch.set_num_threads(args.threads)
    print_machine()
    index = limit_split(load_split("f8k", DATA / "f8k", "train", DATA / "flickr8k-images"),
                        args.images)
    image_encoder = create_image_encoder("efficientnet_lite0")
    text_encoder = create_text_encoder("minilm")
    batches = EpochBatches(index.num_captions, args.batch_size, seed=0)
    batches.set_epoch(0)
    order = [rows for _, rows in batches][:args.steps + 1]
    if len(order) < args.steps + 1:
        raise SystemExit(f"{index.num_captions} captions give {len(order)} batches of "
                         f"{args.batch_size}; raise --images or lower --steps")
    print(f"Flickr8k train, first {index.num_images} images / {index.num_captions} captions; "
          f"head {args.head}, batch {args.batch_size}, {args.steps} timed steps, "
          f"{torch.get_num_threads()} CPU threads, {args.workers} decoding worker(s)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        options = RunOptions(batch_size=64, workers=args.workers, progress=False)
        start = time.perf_counter()
        image_report = extract_images(index, image_encoder, Path(tmp) / "image.h5", options)
        text_report = extract_texts(index, text_encoder, Path(tmp) / "text.h5", options)
        extract_s = time.perf_counter() - start
        images, texts = ImageCache(image_report.path), TextCache(text_report.path)

        def fresh_head() -> Head:
            torch.manual_seed(0)
            opts = {"embed_dim": args.embed_dim} if "embed_dim" in head_options(args.head) else {}
            return build_head(args.head, FeatureSpec.from_cache(images),
                              FeatureSpec.from_cache(texts), **opts)

        cached_rate, cached_loss = train_steps(fresh_head(), cached_batches(images, texts, order),
                                               args.steps)
        raw_rate, raw_loss = train_steps(
            fresh_head(), raw_batches(index, image_encoder, text_encoder, order, args.workers),
            args.steps)

    print(f"{'':<28}{'steps/s':>10}{'s/step':>10}{'last loss':>11}")
    print(f"{'from cache':<28}{cached_rate:>10.2f}{1 / cached_rate:>10.3f}{cached_loss:>11.3f}")
    print(f"{'raw images + backbones':<28}{raw_rate:>10.2f}{1 / raw_rate:>10.3f}{raw_loss:>11.3f}")
    print(f"one-off extraction of the {index.num_images} images + {index.num_captions} captions: "
          f"{extract_s:.1f} s ({image_report.items_per_s:.1f} img/s, "
          f"{text_report.items_per_s:.1f} captions/s)")
    epoch_steps = index.num_captions // args.batch_size
    saved = epoch_steps * (1 / raw_rate - 1 / cached_rate)
    print(f"ratio (cache / raw steps per second): {cached_rate / raw_rate:.1f}x; one epoch "
          f"({epoch_steps} steps) saves {saved:.0f} s, so the extraction pays for itself after "
          f"{extract_s / saved:.2f} epochs")


if __name__ == "__main__":
    main()
    print_machine("end")
