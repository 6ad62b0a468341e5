"""Benchmark: two-stage retrieval (coarse embedding head + fine interaction head on the top k) vs
full interaction scoring of every pair, on the same split and device: speed ratio and rsum lost.

Synthetic mode (default) writes a correlated split to a temporary folder: images of
``--tokens`` patch tokens (+ a mean prefix token) drawn from a shared vocabulary of prototypes
plus noise, and captions whose words are noisy copies of some of their image's patches mixed with
distractor words. The coarse (default ``linear``) and fine (default ``scan``) heads are randomly
initialised with their image and text parameters tied (both sides live in one feature space here),
so both score token overlap without training: the numbers measure the pipeline, not a trained
model. (An untrained ``vse`` is a weak coarse scorer here: its random GPO weights pool arbitrarily;
pass ``--coarse vse`` to see it.)

Real mode: ``--image-cache``, ``--text-cache``, ``--coarse-checkpoint`` and ``--fine-checkpoint``
(checkpoints of ``train-head``; one checkpoint twice with ``--coarse-mode`` / ``--fine-mode`` for a
two-branch head).

    python bench/rerank.py --images 1000 --rerank-topk 50
    python bench/rerank.py --image-cache features/f30k/test/image-x.h5 \\
        --text-cache features/f30k/test/text-y.h5 --coarse-checkpoint vse.pt --fine-checkpoint scan.pt

Speed-up = T(full fine scoring) / T(coarse + shortlist + fine@k + ranking); encoding is the same
work in both and reported apart.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from machine import print_machine
from cache.store import (CacheAttrs, ImageCache, ImageCacheWriter, TextCache,
                         TextCacheWriter)
from heads.base import FeatureSpec, Head
from heads.checkpoint import load_checkpoint
from heads.eval.rerank import parse_topk
from heads.model import create_model
from heads.registry import build_head, head_options
from train.evaluate import evaluate, two_stage


def write_synthetic_split(root: Path, n_img: int, per_image: int, tokens: int, dim: int,
                          vocab: int, seed: int = 0) -> tuple[ImageCache, TextCache]:
    """A correlated synthetic split as an image cache (1 mean prefix + a square grid of
    ``tokens`` patches) and a text cache ([CLS] + 8-16 words + [SEP]), written through the
    store's writers."""
    rng = np.random.default_rng(seed)
    side = int(round(tokens ** 0.5))
    prototypes = rng.standard_normal((vocab, dim)).astype(np.float32)
    patch_ids = rng.integers(0, vocab, size=(n_img, side * side))
    patches = prototypes[patch_ids] + 0.5 * rng.standard_normal((n_img, side * side, dim),
                                                                dtype=np.float32)
    image_tokens = np.concatenate([patches.mean(1, keepdims=True), patches], axis=1)
    attrs = CacheAttrs(modality="image", encoder="synthetic", weights_id="none", weights_hash="0",
                       dim=dim, num_items=n_img, num_tokens=1 + side * side, prefix_tokens=1,
                       grid=(side, side), dataset="synthetic", split="test")
    with ImageCacheWriter(root / "image.h5", attrs, [str(i) for i in range(n_img)],
                          [f"{i}.jpg" for i in range(n_img)]) as writer:
        for start in range(0, n_img, 256):
            writer.append(image_tokens[start:start + 256].astype(np.float16))
        writer.finish()
    image_index = np.repeat(np.arange(n_img), per_image)
    states = []
    for i in image_index:
        words = int(rng.integers(8, 17))
        own = prototypes[patch_ids[i, rng.integers(0, side * side, size=words)]]
        other = prototypes[rng.integers(0, vocab, size=words)]
        pick = rng.random(words) < 0.6
        body = np.where(pick[:, None], own, other) + 0.8 * rng.standard_normal((words, dim))
        special = 0.3 * rng.standard_normal((2, dim))
        states.append(np.concatenate([special[:1], body, special[1:]]).astype(np.float32))
    attrs = CacheAttrs(modality="text", encoder="synthetic", weights_id="none", weights_hash="0",
                       dim=dim, num_items=len(image_index), prefix_tokens=1, suffix_tokens=1,
                       dataset="synthetic", split="test")
    with TextCacheWriter(root / "text.h5", attrs, [list(range(len(s))) for s in states],
                         [f"caption {c}" for c in range(len(states))], image_index) as writer:
        for start in range(0, len(states), 1024):
            writer.append(states[start:start + 1024])
        writer.finish()
    return ImageCache(root / "image.h5"), TextCache(root / "text.h5")


def tied_head(name: str, image: ImageCache, text: TextCache, embed_dim: int) -> Head:
    """A randomly initialised head whose ``text_*`` parameters copy the ``image_*`` ones."""
    options = {"embed_dim": embed_dim} if "embed_dim" in head_options(name) else {}
    head = build_head(name, FeatureSpec.from_cache(image), FeatureSpec.from_cache(text), **options)
    state = head.state_dict()
    for key, value in list(state.items()):
        twin = key.replace("image_", "text_", 1)
        if key.startswith("image_") and twin in state and state[twin].shape == value.shape:
            state[twin] = value.clone()
    head.load_state_dict(state)
    return head


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=49, help="synthetic patch tokens per image")
    parser.add_argument("--dim", type=int, default=384, help="synthetic feature size (both sides)")
    parser.add_argument("--vocab", type=int, default=300, help="synthetic prototype count")
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--coarse", default="linear", help="coarse head (synthetic mode)")
    parser.add_argument("--fine", default="scan", help="fine head (synthetic mode)")
    parser.add_argument("--rerank-topk", default="50", help="k, or k_i2t,k_t2i")
    parser.add_argument("--fuse-weight", type=float, default=0.0)
    parser.add_argument("--image-cache")
    parser.add_argument("--text-cache")
    parser.add_argument("--coarse-checkpoint")
    parser.add_argument("--fine-checkpoint")
    parser.add_argument("--coarse-mode")
    parser.add_argument("--fine-mode")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_machine()
    topk = parse_topk(args.rerank_topk)

    with tempfile.TemporaryDirectory() as tmp:
        if args.image_cache:
            image, text = ImageCache(args.image_cache), TextCache(args.text_cache)
            coarse = create_model(load_checkpoint(args.coarse_checkpoint), image, text)
            fine = (coarse if args.fine_checkpoint == args.coarse_checkpoint else
                    create_model(load_checkpoint(args.fine_checkpoint), image, text))
            source = f"{args.image_cache} + {args.text_cache}"
        else:
            image, text = write_synthetic_split(Path(tmp), args.images, args.captions_per_image,
                                                args.tokens, args.dim, args.vocab)
            torch.manual_seed(0)
            coarse = tied_head(args.coarse, image, text, args.embed_dim)
            fine = tied_head(args.fine, image, text, args.embed_dim)
            source = f"synthetic correlated split ({args.coarse} coarse, {args.fine} fine, tied sides)"
        print(f"{source}: {len(image)} images x {len(text)} captions on {args.device}, "
              f"{torch.get_num_threads()} CPU threads", flush=True)

        if args.fine_mode:
            fine.set_mode(args.fine_mode)
        start = time.perf_counter()
        full = evaluate(fine, image, text, device=args.device)
        full_total = time.perf_counter() - start
        fine.set_mode(None)
        start = time.perf_counter()
        staged = two_stage(coarse, fine, image, text, topk, device=args.device,
                           coarse_mode=args.coarse_mode, fine_mode=args.fine_mode,
                           fuse_weight=args.fuse_weight)
        staged_total = time.perf_counter() - start

    full_s = full["seconds"]["score"] + full["seconds"]["metrics"]
    stages = staged["seconds"]
    staged_s = sum(v for k, v in stages.items() if k != "encode")
    print(f"{'':<22}{'i2t R@1':>8}{'R@5':>7}{'R@10':>7}{'t2i R@1':>9}{'R@5':>7}{'R@10':>7}"
          f"{'rsum':>8}{'pairs':>11}{'seconds':>9}")
    for label, m, pairs, secs in (
            ("coarse only", staged["coarse"], 0, stages["coarse"]),
            (f"two-stage k={topk[0]},{topk[1]}", staged["final"], staged["pairs_scored"], staged_s),
            ("full fine", full["metrics"], full["pairs_scored"], full_s)):
        print(f"{label:<22}{m['i2t_r1']:>8.1f}{m['i2t_r5']:>7.1f}{m['i2t_r10']:>7.1f}"
              f"{m['t2i_r1']:>9.1f}{m['t2i_r5']:>7.1f}{m['t2i_r10']:>7.1f}{m['rsum']:>8.1f}"
              f"{pairs:>11,d}{secs:>9.2f}")
    print(f"coarse recall at k: i2t {staged['coarse_recall_at_k']['i2t']:.1f} %, "
          f"t2i {staged['coarse_recall_at_k']['t2i']:.1f} %")
    print("two-stage seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in stages.items())
          + f"; full: encode {full['seconds']['encode']:.2f}, score {full['seconds']['score']:.2f}")
    print(f"wall clock incl. encoding: full {full_total:.1f} s, two-stage {staged_total:.1f} s")
    print(f"speed-up (excluding encoding) {full_s / staged_s:.1f}x; rsum lost "
          f"{full['metrics']['rsum'] - staged['final']['rsum']:.2f} "
          f"(full {full['metrics']['rsum']:.2f}, two-stage {staged['final']['rsum']:.2f})")


if __name__ == "__main__":
    main()
    print_machine("end")
