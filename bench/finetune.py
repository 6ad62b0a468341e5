"""Benchmark: tuning a backbone's top blocks from a layer-K cache (``tail`` source) vs end to end.

Per side, at the same batch and with the same head (``linear``), four training steps are timed:

* ``cache``: the head on cached last-layer tokens (no backbone weights train);
* ``tail``: the backbone's modules after layer K (`backbones.tails.tail_of`, what
  ``data.<side>_source=tail`` trains) + the head, on cached layer-K tokens;
* ``e2e, lower frozen``: the whole backbone from token ids / pixels, its layers up to K under
  ``no_grad`` (the frozen part of an end-to-end run), then the same tail modules + the head: the
  same tuned blocks, trained end to end;
* ``e2e, all trainable``: every backbone weight trains with the head (``data.<side>_source=e2e``:
  `heads.sources.BackboneTokens`);
* ``e2e, checkpointed``: the same with gradient checkpointing (``run.grad_checkpointing``), which
  trades recomputation for activation memory.

The tail and e2e modes run the sources the trainer runs (`heads.sources.TailTokens`,
`heads.sources.BackboneTokens`).

Text: MiniLM (offline ``all-minilm-l6-v2``), K = ``--text-layer`` (4 of 6 layers). Image:
EfficientNet-Lite0 (packaged weights), K = ``--image-layer`` (stage 3: 14 x 14 x 112), 224 px.
Inputs are synthetic, so the benchmark runs anywhere: random token ids, 12-20 tokens with [CLS]
and [SEP]; random pixels in [-1, 1]. Cached tokens are the backbone's own outputs on them, rounded
to fp16 as a cache stores them; the head's other side reads fixed random tokens of its cached
shape. BatchNorm stays in eval mode wherever the image backbone trains (as in the tail); MiniLM's
dropout is on.

    python bench/finetune.py --side both --batch-size 32 --steps 5 --threads 2

Each mode runs ``--warmup`` untimed steps, then ``--steps`` timed ones. Peak memory comes from a
second pass after all timing (warm-up + 1 step per mode): the peak during the steps above what was
allocated before them (weights and inputs already loaded), from ``torch.cuda.max_memory_allocated``
on CUDA, else from the peak RSS (``resource.getrusage``, the high-water mark reset before each mode
through /proc/self/clear_refs where Linux allows it; glibc then maps blocks of 1 MiB and more on
their own so that each mode's memory goes back to the OS, which would slow the timed steps).
Ratios: tail / e2e (lower frozen) is the tail mode's gain for the same tuned blocks; cache / tail
is what tuning them costs over a frozen backbone. A side whose weights package is missing is
skipped.
"""
from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import gc
import resource
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from backbones.registry import create_image_encoder, create_text_encoder
from backbones.tails import tail_of
from cache.batch import IdsBatch, PixelBatch, TokenBatch, as_cached
from cache.device import resolve_device
from cache.errors import InputError
from heads.base import FeatureSpec, Progress
from heads.losses import build_loss
from heads.registry import build_head
from heads.sources import BackboneTokens, TailTokens
from machine import print_machine

Forward = Callable[[], TokenBatch]


@dataclass
class Mode:
    """One way to produce the side's tokens for the head: ``forward`` and the backbone weights that
    train with the head."""

    name: str
    forward: Forward
    trained: list[nn.Parameter]


@dataclass
class Side:
    """The specs the head is built for (image, text), the other side's fixed tokens, the modes."""

    name: str
    specs: tuple[FeatureSpec, FeatureSpec]
    other: TokenBatch
    modes: list[Mode]


IMAGE_SPEC = FeatureSpec("image", 1280, "efficientnet_lite0", 50, 1, grid=(7, 7))
TEXT_SPEC = FeatureSpec("text", 384, "minilm", 16, 1, 1)


def _other(spec: FeatureSpec, batch: int, device: torch.device) -> TokenBatch:
    """Fixed random cached tokens of the side that is not measured."""
    tokens = torch.randn(batch, spec.num_tokens, spec.dim, device=device)
    return TokenBatch(tokens, _ones(tokens))


def _ones(tokens: Tensor) -> Tensor:
    return torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)


def _trainable(source: nn.Module, checkpointing: bool = False) -> list[nn.Parameter]:
    """Put a source in train mode (its BatchNorm stays frozen); all its weights train."""
    source.train().requires_grad_(True)
    source.set_grad_checkpointing(checkpointing)
    return list(source.parameters())


def _e2e_modes(encoder: nn.Module, batch: IdsBatch | PixelBatch) -> list[Mode]:
    """The whole backbone trained with the head, without and with gradient checkpointing (two
    copies of the weights: one source each)."""
    modes = []
    for name, checkpointing in (("e2e, all trainable", False), ("e2e, checkpointed", True)):
        source = BackboneTokens(copy.deepcopy(encoder))
        modes.append(Mode(name, lambda source=source: source(batch),
                          _trainable(source, checkpointing)))
    return modes


def text_side(batch: int, layer: int, device: torch.device) -> Side:
    """MiniLM: random captions of 12-20 tokens; tail = layers K..5."""
    split = create_text_encoder("minilm", layer=layer)   # lower layers + tail: the model split
    tail = TailTokens(tail_of(split, "minilm")).to(device)
    lower = split.model.to(device)
    lower.encoder.layer = lower.encoder.layer[:layer]     # its last_hidden_state: layer K
    full = create_text_encoder("minilm").to(device)
    tokenizer = split.tokenizer
    words = [i for i in range(1000, tokenizer.vocab_size) if i not in tokenizer.all_special_ids]
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(12, 21, (batch,), generator=generator).tolist()
    captions = [[tokenizer.cls_token_id]
                + [words[int(i)] for i in torch.randint(len(words), (n - 2,), generator=generator)]
                + [tokenizer.sep_token_id] for n in lengths]
    ids, attention = (t.to(device) for t in full.pad_batch(captions))
    mask = attention.bool()
    with torch.no_grad():
        at_k = as_cached(lower(input_ids=ids, attention_mask=attention).last_hidden_state, mask)
        cached = as_cached(full(ids, attention), mask)

    def frozen_lower() -> TokenBatch:
        with torch.no_grad():
            states = lower(input_ids=ids, attention_mask=attention).last_hidden_state
        return tail(TokenBatch(states, mask))

    return Side("text", (IMAGE_SPEC, TEXT_SPEC), _other(IMAGE_SPEC, batch, device), [
        Mode("cache", lambda: cached, []),
        Mode(f"tail (layers {layer}..)", lambda: tail(at_k), _trainable(tail)),
        Mode("e2e, lower frozen", frozen_lower, list(tail.parameters())),
        *_e2e_modes(full, IdsBatch(ids, mask)),
    ])


def image_side(batch: int, layer: int, device: torch.device) -> Side:
    """EfficientNet-Lite0 at 224 px: random pixels; tail = what runs after stage K."""
    lower = create_image_encoder("efficientnet_lite0", layer=layer).to(device)
    tail = TailTokens(tail_of(lower, "efficientnet_lite0"))  # the modules after K of that model
    full = create_image_encoder("efficientnet_lite0").to(device)
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(batch, 3, 224, 224, generator=generator) * 2 - 1).to(device)
    with torch.no_grad():
        stage = lower(pixels)                       # forward_intermediates stops at stage K
        at_k = as_cached(stage, _ones(stage))
        tokens = full(pixels)
        cached = as_cached(tokens, _ones(tokens))

    def frozen_lower() -> TokenBatch:
        with torch.no_grad():
            states = lower(pixels)
        return tail(TokenBatch(states, _ones(states)))

    return Side("image", (IMAGE_SPEC, TEXT_SPEC), _other(TEXT_SPEC, batch, device), [
        Mode("cache", lambda: cached, []),
        Mode(f"tail (after stage {layer})", lambda: tail(at_k), _trainable(tail)),
        Mode("e2e, lower frozen", frozen_lower, list(tail.parameters())),
        *_e2e_modes(full, PixelBatch(pixels)),
    ])


SIDES: dict[str, Callable[[argparse.Namespace, torch.device], Side]] = {
    "text": lambda args, device: text_side(args.batch_size, args.text_layer, device),
    "image": lambda args, device: image_side(args.batch_size, args.image_layer, device),
}


class PeakMemory:
    """Peak memory of a stretch of work above what was allocated when it started, in MiB.

    On the CPU, glibc is told to map blocks of 1 MiB and more on their own (``mallopt``), so that
    what one mode frees goes back to the OS and the next mode's RSS growth is its own (this slows
    CPU steps: build it after the timing)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self.libc = None if self.cuda else _glibc()
        if self.libc is not None:
            self.libc.mallopt(M_MMAP_THRESHOLD, 2**20)
        self.resettable = self.cuda or _reset_peak_rss()
        self.base = 0.0

    @property
    def how(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated above the allocation before the steps"
        reset = ("high-water mark reset per mode" if self.resettable else
                 "high-water mark NOT resettable here: growth beyond earlier modes' peak")
        freed = "" if self.libc is not None else "; not glibc: freed memory may stay resident"
        return f"peak RSS (resource.getrusage) above the RSS before the steps; {reset}{freed}"

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            if self.libc is not None:
                self.libc.malloc_trim(0)
            _reset_peak_rss()
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    def peak(self) -> float:
        if self.cuda:
            return torch.cuda.max_memory_allocated(self.device) / 2**20 - self.base
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - self.base


M_MMAP_THRESHOLD = -3       # glibc's mallopt parameter


def _glibc() -> ctypes.CDLL | None:
    """The C library where it is glibc (``mallopt``, ``malloc_trim``), else None."""
    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    return libc if libc is not None and hasattr(libc, "malloc_trim") else None


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


def run_mode(side: Side, mode: Mode, args: argparse.Namespace, device: torch.device,
             memory: PeakMemory | None = None) -> float:
    """A fresh head trained with ``mode``: seconds per step over ``args.steps`` steps after the
    warm-up; with ``memory``, the peak MiB of the warm-up and one step more instead."""
    torch.manual_seed(0)
    head = build_head("linear", *side.specs, embed_dim=args.embed_dim).to(device).train()
    criterion = build_loss("infonce").to(device)
    optimizer = torch.optim.AdamW([*head.parameters(), *criterion.parameters(), *mode.trained],
                                  lr=1e-5)
    ids = torch.arange(args.batch_size, device=device)

    def step() -> None:
        tokens = mode.forward()
        images, texts = (tokens, side.other) if side.name == "image" else (side.other, tokens)
        loss, _ = head.training_loss(images, texts, ids, criterion, Progress())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if memory is not None:
        memory.start()
    for _ in range(args.warmup):
        step()
    if memory is not None:
        step()
        result = memory.peak()
    else:
        _sync(device)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        _sync(device)
        result = (time.perf_counter() - start) / args.steps
    optimizer.zero_grad(set_to_none=True)         # the next mode starts without these gradients
    return result


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def report(side: Side, results: list[tuple[Mode, float, float]]) -> None:
    """The side's table, then its ratios."""
    print(f"\n{side.name} side{'':<20}{'s/step':>9}{'steps/s':>9}{'peak MiB':>10}"
          f"{'trained weights':>17}")
    for mode, seconds, peak in results:
        weights = sum(p.numel() for p in mode.trained)
        print(f"  {mode.name:<27}{seconds:>9.3f}{1 / seconds:>9.2f}{peak:>10.1f}{weights:>17,}")
    ((_, cache, cache_mb), (_, tail, tail_mb), (_, lower, lower_mb), (_, full, full_mb),
     (_, checkpointed, checkpointed_mb)) = results
    print(f"  ratio tail / e2e (lower frozen, same tuned blocks): s/step {tail / lower:.2g} "
          f"(speed-up {lower / tail:.1f}x), peak memory {_ratio(tail_mb, lower_mb)}")
    print(f"  ratio tail / e2e (all trainable): s/step {tail / full:.2g} (speed-up "
          f"{full / tail:.1f}x), peak memory {_ratio(tail_mb, full_mb)}")
    print(f"  ratio cache / tail: s/step {cache / tail:.2g}, peak memory "
          f"{_ratio(cache_mb, tail_mb)}")
    print(f"  ratio e2e checkpointed / all trainable: s/step {checkpointed / full:.2g}, peak "
          f"memory {_ratio(checkpointed_mb, full_mb)}", flush=True)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2g}" if b > 0 else "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=("text", "image", "both"), default="both")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them")
    parser.add_argument("--text-layer", type=int, default=4, help="MiniLM layer K (0..5)")
    parser.add_argument("--image-layer", type=int, default=3,
                        help="EfficientNet-Lite0 stage K (0..4)")
    parser.add_argument("--embed-dim", type=int, default=64, help="the linear head's dim")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print_machine()
    device = resolve_device(args.device)
    print(f"batch {args.batch_size}, head linear (embed {args.embed_dim}), {args.warmup} warm-up "
          f"+ {args.steps} timed steps per mode, fp32 on {device}", flush=True)
    sides = []
    for name in ("text", "image") if args.side == "both" else (args.side,):
        try:
            sides.append(SIDES[name](args, device))
        except InputError as err:
            print(f"skipped the {name} side: {err}", flush=True)
    seconds = {side.name: [run_mode(side, mode, args, device) for mode in side.modes]
               for side in sides}
    memory = PeakMemory(device)         # after the timing: its allocator setting slows CPU steps
    peaks = {side.name: [run_mode(side, mode, args, device, memory) for mode in side.modes]
             for side in sides}
    if sides:
        print(f"peak memory: {memory.how}; a second pass of {args.warmup} warm-up + 1 step "
              "per mode")
    for side in sides:
        report(side, list(zip(side.modes, seconds[side.name], peaks[side.name])))


if __name__ == "__main__":
    main()
    print_machine("end")
