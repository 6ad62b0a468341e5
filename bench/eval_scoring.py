"""Benchmark: our blockwise evaluation scoring vs the reference repositories' per-caption loop.

Both score the same encodings of a synthetic split (default 1,000 images x 5,000 captions, the
Flickr 1K test shape) with the same head: image caches shaped like ``efficientnet_lite0``
(1 pooled + 7x7 patch tokens of 1280), captions like ``minilm`` ([CLS] + 10-20 words + [SEP], 384).

* ours: ``heads.eval.scoring.similarity_matrix`` (``head.score`` on blocks of images x captions);
* loop: the reference style (SCAN / LAPS / CADR ``evaluation.py``): the images in shards of 256,
  the captions in shards of 256, and inside a shard a Python loop scoring one caption (trimmed to
  its own length) against the image shard. For ``laps`` and ``caa`` the loop also computes a pair
  the way the references do (``materialised_slimming_scores``: build each pair's aggregated and
  fused tokens, normalise them, align), where ours scores the mixing weights through the patches'
  Gram matrix without building them.

The loop is timed on the first ``--loop-captions`` captions and extrapolated linearly to all
captions (it is linear in the caption count); both results are compared on those columns.

    python bench/eval_scoring.py --head scan,laps,caa --images 1000 --loop-captions 500

Heads that are not registered are skipped. The ratio printed is T(loop) / T(ours), measured in the
same run on the same device.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from machine import print_machine
from cache.batch import TokenBatch
from heads.registry import build_head, head_options, list_heads
from heads.base import Encoded, FeatureSpec, Head, cat_encoded, index_encoded
from heads.layers import l2norm, max_mean_alignment
from heads.layers.patch_slimming import caption_relevance
from heads.eval.scoring import (DEFAULT_CAPTION_BLOCK, DEFAULT_IMAGE_BLOCK, inference,
                           similarity_matrix, synchronize)

REFERENCE_SHARD = 256


def synthetic_specs(image_dim: int = 1280, grid: int = 7, text_dim: int = 384) -> tuple[FeatureSpec, FeatureSpec]:
    """Specs of an efficientnet_lite0-like image cache and a minilm-like text cache."""
    image = FeatureSpec(modality="image", dim=image_dim, encoder="synthetic",
                        num_tokens=1 + grid * grid, prefix_tokens=1, grid=(grid, grid),
                        source="synthetic image cache")
    text = FeatureSpec(modality="text", dim=text_dim, encoder="synthetic", prefix_tokens=1,
                       suffix_tokens=1, source="synthetic text cache")
    return image, text


def image_tokens(n: int, spec: FeatureSpec, generator: torch.Generator) -> TokenBatch:
    tokens = torch.randn(n, spec.num_tokens, spec.dim, generator=generator)
    return TokenBatch(tokens, torch.ones(n, spec.num_tokens, dtype=torch.bool))


def text_tokens(n: int, spec: FeatureSpec, generator: torch.Generator, words: tuple[int, int] = (10, 20)) -> TokenBatch:
    lengths = torch.randint(words[0], words[1] + 1, (n,), generator=generator) + 2  # [CLS], [SEP]
    width = int(lengths.max())
    tokens = torch.randn(n, width, spec.dim, generator=generator)
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)
    return TokenBatch(tokens * mask.unsqueeze(-1), mask)


def encode(head: Head, batch: TokenBatch, side: str, device: torch.device,
           batch_size: int = 256) -> Encoded:
    """Encode synthetic tokens in batches, as ``heads.eval.scoring.encode_cache`` does for a cache."""
    fn = head.encode_images if side == "image" else head.encode_texts
    head.to(device)
    with inference(head, device):
        return cat_encoded([fn(TokenBatch(batch.tokens[s:s + batch_size].to(device),
                                          batch.mask[s:s + batch_size].to(device)))
                            for s in range(0, len(batch), batch_size)])


def build(name: str, image_spec: FeatureSpec, text_spec: FeatureSpec, embed_dim: int) -> Head:
    """A registered head with its defaults, ``embed_dim`` where the head takes one."""
    options = {"embed_dim": embed_dim} if "embed_dim" in head_options(name) else {}
    return build_head(name, image_spec, text_spec, **options)


def one_caption(txt_enc: Encoded, row: int) -> Encoded:
    """Caption ``row`` alone, trimmed to its valid length when the encoding has a ``mask`` (the
    reference loops slice ``captions[i, :n_word]``)."""
    enc = index_encoded(txt_enc, slice(row, row + 1))
    key = next((k for k in ("mask", "word_mask") if k in enc), None)   # word_mask: laps, caa
    if key is None:
        return enc
    width = enc[key].shape[1]
    valid = int(enc[key].sum())
    return {k: (v[:, :valid] if v.dim() >= 2 and v.shape[1] == width else v) for k, v in enc.items()}


def materialised_slimming_scores(head: Head, images: Encoded, texts: Encoded) -> Tensor:
    """LAPS / CADR scores ``[I, 1]`` of one caption against an image shard as the references
    compute them: every pair's aggregated and fused tokens built, L2-normalised, then aligned."""
    relevance = caption_relevance(images["patches"], images["patch_norm"], texts["caption"],
                                  paired=False)
    sets = head.slimming.visual_sets(images, relevance)
    values = images["patches"]
    aggregated = torch.einsum("cinm,ind->cimd", sets.weights, values)[0]           # [I, M, C]
    fused = torch.einsum("cin,ind->cid", sets.fuse, values)[0]                     # [I, C]
    tokens = torch.cat([images["cls"], l2norm(aggregated), l2norm(fused).unsqueeze(1)], dim=1)
    mask = torch.cat([images["cls_mask"], sets.fused_mask.new_ones(aggregated.shape[:2]),
                      sets.fused_mask[0].unsqueeze(1)], dim=1)
    n_img = tokens.shape[0]
    words = texts["words"].expand(n_img, -1, -1)
    word_mask = texts["word_mask"].expand(n_img, -1)
    return max_mean_alignment(tokens, mask, words, word_mask, head.negative_slope).unsqueeze(1)


REFERENCE_SCORERS: dict[str, Callable[[Head, Encoded, Encoded], Tensor]] = {
    "laps": materialised_slimming_scores,
    "caa": materialised_slimming_scores,
}


def loop_scores(head: Head, img_enc: Encoded, txt_enc: Encoded, captions: int,
                device: torch.device, shard: int = REFERENCE_SHARD) -> Tensor:
    """The reference repositories' evaluation loop over the first ``captions`` captions."""
    n_img = next(iter(img_enc.values())).shape[0]
    out = torch.empty(n_img, captions)
    score = REFERENCE_SCORERS.get(head.name, type(head).score)
    with inference(head, device):
        for i0 in range(0, n_img, shard):
            images = index_encoded(img_enc, slice(i0, i0 + shard))
            for c0 in range(0, captions, shard):
                for c in range(c0, min(c0 + shard, captions)):
                    scores = score(head, images, one_caption(txt_enc, c))
                    out[i0:i0 + shard, c] = scores[:, 0].float().cpu()
    return out


def run_head(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    image_spec, text_spec = synthetic_specs()
    torch.manual_seed(0)
    head = build(name, image_spec, text_spec, args.embed_dim)
    gen = torch.Generator().manual_seed(1)
    n_cap = args.images * args.captions_per_image
    images = image_tokens(args.images, image_spec, gen)
    texts = text_tokens(n_cap, text_spec, gen)
    start = time.perf_counter()
    img_enc, txt_enc = encode(head, images, "image", device), encode(head, texts, "text", device)
    synchronize(device)
    encode_s = time.perf_counter() - start

    start = time.perf_counter()
    ours = similarity_matrix(head, img_enc, txt_enc, device, args.image_block, args.caption_block)
    ours_s = time.perf_counter() - start

    subset = min(args.loop_captions, n_cap)
    start = time.perf_counter()
    loop = loop_scores(head, img_enc, txt_enc, subset, device)
    synchronize(device)
    loop_subset_s = time.perf_counter() - start
    loop_s = loop_subset_s * n_cap / subset
    diff = (loop - ours[:, :subset]).abs().max().item()
    return {"encode_s": encode_s, "ours_s": ours_s, "loop_subset_s": loop_subset_s,
            "loop_s": loop_s, "subset": subset, "pairs": args.images * n_cap,
            "max_abs_diff": diff, "ratio": loop_s / ours_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head", default="scan,laps,caa", help="comma-separated head names")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--loop-captions", type=int, default=500,
                        help="captions the reference loop is timed on (extrapolated to all)")
    parser.add_argument("--image-block", type=int, default=DEFAULT_IMAGE_BLOCK)
    parser.add_argument("--caption-block", type=int, default=DEFAULT_CAPTION_BLOCK)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_machine()
    device = torch.device(args.device)
    available = set(list_heads())
    print(f"device {device}, {torch.get_num_threads()} CPU threads, {args.images} images x "
          f"{args.images * args.captions_per_image} captions, embed {args.embed_dim}")
    header = (f"{'head':<8}{'encode s':>10}{'ours s':>10}{'loop s':>12}{'loop on':>10}"
              f"{'Mpairs/s':>10}{'max|diff|':>11}{'ratio':>8}")
    rows = []
    for name in [n.strip() for n in args.head.split(",") if n.strip()]:
        if name not in available:
            print(f"skipping {name!r}: not registered (available: {', '.join(sorted(available))})")
            continue
        r = run_head(name, args, device)
        rows.append(f"{name:<8}{r['encode_s']:>10.2f}{r['ours_s']:>10.2f}{r['loop_s']:>12.1f}"
                    f"{r['subset']:>10d}{r['pairs'] / r['ours_s'] / 1e6:>10.3f}"
                    f"{r['max_abs_diff']:>11.2e}{r['ratio']:>7.1f}x")
        print(f"{name}: ours {r['ours_s']:.2f} s; loop {r['loop_subset_s']:.2f} s on "
              f"{r['subset']} captions -> {r['loop_s']:.1f} s extrapolated", flush=True)
    print(header)
    print("\n".join(rows))
    print("loop s: measured on the 'loop on' first captions, extrapolated linearly to all; "
          "ratio = loop s / ours s")


if __name__ == "__main__":
    main()
    print_machine("end")
