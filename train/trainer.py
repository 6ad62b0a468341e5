"""Training a head from cached features: optimiser groups, schedule, checkpoints, resume, DDP.

``train(config, out_dir)`` runs a resolved config (``train.config.load_config``):

* caption-indexed batches from the train caches (``cache.datasets``), feature-level token drop;
* per side a token source (``heads.sources``, ``data.image_source`` / ``data.text_source``):
  ``cache`` feeds the cached tokens to the head, ``tail`` runs a layer-K cache through the
  backbone's blocks after K, ``e2e`` the photos / captions through the whole backbone (read by
  ``heads.raw_inputs`` in the loader, with the references' augmentations; with an e2e image side
  an epoch visits each photo once, ``data.epoch_over``); tuned backbones are rebuilt from the
  caches' weights (checked by hash, and against ``data.<side>_backbone``) before the seed is set,
  what they read is checked in the train and dev splits, and they train with the head (token drop
  off on that side, frozen for the first ``optim.backbone_frozen_epochs``, layer-wise lr decay
  ``optim.layer_decay``); the head and the sources form one ``RetrievalModel`` that the loss
  module, dev evaluation and checkpoints receive;
* AdamW (or Adam) with parameter groups whose lr is multiplied per parameter-name prefix
  (``optim.lr_mult``), step decay by ``gamma`` at the ``milestones`` (epochs, 0-based) and an
  optional linear warm-up over the first ``warmup_steps`` steps; gradient-norm clipping;
* bf16 autocast on CUDA, fp32 on the CPU; no host synchronisation per step (the loss is summed on
  the device and read every ``run.log_every`` steps, where a NaN/Inf loss stops the run naming the
  first bad step);
* dev evaluation after every epoch (``train.evaluate.evaluate``; dev split, never test); the best
  dev rsum is kept as ``best.pt`` (weights only), the last epoch as ``last.pt`` (with the optimiser,
  schedule and RNG states; atomic writes), ``log.jsonl``
  gets a record per epoch and every ``log_every`` steps, tensorboard when it is installed;
* ``init.checkpoint`` warm-starts a new run from another run's weights (``init.rename`` maps their
  names, e.g. a ``linear`` head's projections onto ``laps``'s); the caches must be the same;
* ``resume=True`` continues from ``last.pt`` with the exact state (model, optimiser, schedule,
  loss, RNGs of every rank), so the next epoch equals the one of an uninterrupted run;
* under ``torchrun`` (``WORLD_SIZE > 1``): DistributedDataParallel over ``train.distributed``'s
  loss module, so the averaged gradient equals the one-process gradient of the global batch.
  The head's BatchNorm layers become SyncBatchNorm on CUDA (``run.sync_batchnorm``; a tuned
  backbone's frozen BatchNorm never does); on the CPU (gloo) each
  rank normalises with its own slice's statistics. Dev evaluation and checkpoints run on rank 0.
"""
from __future__ import annotations

import importlib.util
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm import tqdm

from cache.datasets import EpochBatches, PairBatches, check_pairing, pair_loader, resolve_preload
from cache.errors import InputError
from cache.progress import progress_bar
from cache.store import MODALITIES, ImageCache, TextCache, centre_view_note
from heads.base import Progress
from heads.checkpoint import (FORMAT_VERSION, check_features, feature_identity, load_checkpoint,
                              load_pretrained_parts, save_checkpoint)
from heads.losses import build_loss
from heads.model import RetrievalModel, Retriever, create_model
from heads.sources import source_class
from train.config import BACKBONE_KEYS, cache_paths, longest_prefix, save_config
from train.distributed import Dist, LossModule, gather_mode, init_distributed
from train.warm_start import warm_start

LAST, BEST, LOG, CONFIG = "last.pt", "best.pt", "log.jsonl", "config.yaml"
RESUME_ONLY = ("optimizer", "scheduler", "rng")
"""What only ``last.pt`` keeps: ``best.pt`` is weights only (a tuned backbone's optimiser state is
twice its weights)."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or Inf."""


# ------------------------------------------------------------------------------------- optimiser


def param_groups(model: RetrievalModel, criterion: nn.Module, lr: float, weight_decay: float,
                 lr_mult: dict[str, float], layer_decay: float = 1.0) -> list[dict[str, Any]]:
    """Parameter groups: the lr of a parameter is ``lr`` times the multiplier of the longest
    ``lr_mult`` prefix of its name (head parameters by name, a tuned source's as
    ``image_source.<name>`` / ``text_source.<name>``, the loss's as ``loss.<name>``), times
    ``layer_decay ** depth`` in a tuned source when ``layer_decay`` < 1, the depth below its
    backbone's top as the source declares it (``layer_depths``); loss parameters (a
    temperature) get no weight decay. A prefix that matches nothing is an error."""
    named = [(n, p, weight_decay) for n, p in model.named_trainable()]
    named += [(f"loss.{n}", p, 0.0) for n, p in criterion.named_parameters() if p.requires_grad]
    scales: dict[str, float] = {}
    if layer_decay < 1.0:
        for side in model.tuned_sides():
            prefix = f"{side}_source."
            names = [n[len(prefix):] for n, _, _ in named if n.startswith(prefix)]
            depths = model.sources()[side].layer_depths(names)
            scales.update({prefix + n: layer_decay ** d for n, d in depths.items()})
    used: set[str] = set()
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for name, param, decay in named:
        prefix = longest_prefix(name, lr_mult)
        mult = (lr_mult[prefix] if prefix is not None else 1.0) * scales.get(name, 1.0)
        if prefix is not None:
            used.add(prefix)
        group = groups.setdefault((mult, decay), {"params": [], "names": [], "lr": lr * mult,
                                                  "lr_mult": mult, "weight_decay": decay})
        group["params"].append(param)
        group["names"].append(name)
    unused = sorted(set(lr_mult) - used)
    if unused:
        modules = sorted({n.split(".")[0] for n, _, _ in named if "." in n} |
                         {f"loss.{n.split('.')[0]}" for n, _ in criterion.named_parameters()})
        raise InputError(f"optim.lr_mult: prefix(es) {unused} match no parameter; top-level "
                         f"modules: {', '.join(modules)}")
    return list(groups.values())


def lr_factor(step: int, steps_per_epoch: int, milestones: list[int], gamma: float,
              warmup_steps: int) -> float:
    """Multiplier of the base lr at optimisation ``step``: linear warm-up, then step decay."""
    epoch = step // max(1, steps_per_epoch)
    decay = gamma ** sum(epoch >= m for m in milestones)
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return decay * warm


def make_optimizer(groups: list[dict[str, Any]], optim: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW (decoupled weight decay) or Adam (L2 in the gradient) over the groups."""
    kind = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[optim["name"]]
    return kind([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=optim["lr"])


# ------------------------------------------------------------------------------------- data


def open_split(config: dict[str, Any], split: str) -> tuple[ImageCache, TextCache]:
    """The image and text caches of a split, checked to belong together."""
    image_path, text_path = cache_paths(config, split)
    images, texts = ImageCache(image_path), TextCache(text_path)
    check_pairing(images, texts)
    return images, texts


def _note(message: str, dist_info: Dist) -> None:
    if dist_info.is_main:
        tqdm.write(message)


# ------------------------------------------------------------------------------------- dev eval


def evaluate_split(head: Retriever, images: ImageCache, texts: TextCache, eval_cfg: dict[str, Any],
                   device: torch.device, protocol: str | None = None) -> dict[str, Any]:
    """Metrics of ``head`` (a model or a bare head) on one split through
    ``train.evaluate.evaluate`` (eval mode, no grad); ``eval.dev_images`` limits the gallery
    to the split's first images (cheaper model selection for interaction heads, whose cost grows
    with images x captions)."""
    from train.evaluate import evaluate

    options = {k: eval_cfg[k] for k in ("batch_size", "image_block", "caption_block")
               if eval_cfg.get(k) is not None}
    return evaluate(head, images, texts, protocol=protocol or eval_cfg["protocol"], device=device,
                    max_images=eval_cfg.get("dev_images"), **options)


# ------------------------------------------------------------------------------------- RNG states


def rng_state() -> dict[str, Any]:
    """The RNG states of torch (CPU and CUDA), NumPy's global generator and ``random``."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                  float(np_state[4])],
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` saved."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


# ------------------------------------------------------------------------------------- the run


@dataclass
class TrainSummary:
    """What a finished run reports."""

    out_dir: Path
    epochs: int
    steps: int
    best_rsum: float
    best_epoch: int
    history: list[dict[str, Any]]


class _Log:
    """log.jsonl (main rank), tensorboard when installed."""

    def __init__(self, out_dir: Path, keep_until_step: int | None, tensorboard: bool,
                 active: bool) -> None:
        self.path, self.active = out_dir / LOG, active
        self.tb = None
        if not active:
            return
        if keep_until_step is not None and self.path.exists():  # drop records after the checkpoint
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line)["step"] <= keep_until_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        elif keep_until_step is None:
            self.path.write_text("")
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.active:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            step = record["step"]
            if "loss" in record:
                self.tb.add_scalar(f"{record['kind']}/loss", record["loss"], step)
            self.tb.add_scalar("train/lr", record["lr"], step)
            for key, value in record.get("dev", {}).items():
                if isinstance(value, (int, float)):
                    self.tb.add_scalar(f"dev/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


class Trainer:
    """One training run; ``run()`` trains the remaining epochs. See the module docstring."""

    def __init__(self, config: dict[str, Any], out_dir: str | Path, resume: bool = False,
                 show_progress: bool = True) -> None:
        self.config = config
        self.out_dir, self.show_progress = Path(out_dir), show_progress
        self.dist = init_distributed(config["run"]["device"])
        if config["run"]["threads"] > 0:
            torch.set_num_threads(config["run"]["threads"])
        last = self.out_dir / LAST
        if not resume and last.exists():
            raise InputError(f"{last}: a run already exists in {self.out_dir}; pass --resume to "
                             "continue it or choose another --out")
        state = load_checkpoint(last) if resume else None
        self._open_caches(state)
        self._build_model()
        self._build_data()
        self.epoch, self.step, self.best_rsum, self.best_epoch = 0, 0, -math.inf, -1
        if self.dist.rank > 0:
            torch.manual_seed(config["run"]["seed"] + self.dist.rank)  # own dropout noise per rank
        if state is not None:
            self._restore(state)
        else:
            if config["init"]["checkpoint"]:
                self._warm_start(config["init"])
            for name in load_pretrained_parts(self.head):
                _note(f"{name} of head {self.head.name!r} loaded from "
                      f"{self.head.pretrained_parts()[name]}", self.dist)
        self.module = self._wrap()
        amp = config["run"]["amp"] and self.dist.device.type == "cuda"
        self.autocast = lambda: torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(config, self.out_dir / CONFIG)
        self.log = _Log(self.out_dir, self.step if state is not None else None,
                        config["run"]["tensorboard"], self.dist.is_main)

    def _open_caches(self, state: dict[str, Any] | None) -> None:
        """Train and dev caches, checked to hold the same features (and those of a resumed run)."""
        data = self.config["data"]
        self.train_images, self.train_texts = open_split(self.config, data["train_split"])
        self.dev_images, self.dev_texts = open_split(self.config, data["dev_split"])
        if self.train_images.num_views > 1:
            use = ("the e2e image side reads the photos, not the views" if
                   data["image_source"] == "e2e" else "training reads another one of each photo "
                   "every epoch")
            _note(f"note: {self.train_images.path} holds {self.train_images.num_views} views "
                  f"per photo; {use}; dev reads the centre view", self.dist)
        dev_note = centre_view_note(self.dev_images, "dev evaluation")
        if dev_note:
            _note(dev_note, self.dist)
        for side, train_cache, dev_cache in (("image", self.train_images, self.dev_images),
                                             ("text", self.train_texts, self.dev_texts)):
            check_features(feature_identity(train_cache), dev_cache,
                           f"the train {side} cache {train_cache.path}")
            if state is not None:
                check_features(state["features"][side], train_cache,
                               f"the checkpoint {self.out_dir / LAST}")
            if source_class(data[f"{side}_source"]).tuned:
                data[f"{side}_backbone"] = _named_backbone(data[f"{side}_backbone"],
                                                           train_cache, side)

    def _build_model(self) -> None:
        """The run's model (`heads.model.create_model`: each side's source built for its train
        cache, a tail or e2e side loading its backbone, then the head for the sources' specs,
        seeded by ``run.seed``), the sources checked to find what they read in the train and dev
        splits; loss and optimiser groups."""
        config = self.config
        optim = config["optim"]
        self.head_options = {k: v for k, v in config["head"].items() if k != "name"}
        self.model = create_model(config, self.train_images, self.train_texts,
                                  seed=config["run"]["seed"])
        for source, caches in ((self.model.image_source, (self.train_images, self.dev_images)),
                               (self.model.text_source, (self.train_texts, self.dev_texts))):
            for cache in caches:
                source.check_inputs(cache)
        self.head = self.model.head
        self.criterion = build_loss(config["loss"]["name"],
                                    **{k: v for k, v in config["loss"].items() if k != "name"})
        self.model.to(self.dist.device)
        self.criterion.to(self.dist.device)
        groups = param_groups(self.model, self.criterion, optim["lr"], optim["weight_decay"],
                              optim["lr_mult"] or {}, optim["layer_decay"])
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = make_optimizer(groups, optim)

    def _build_data(self) -> None:
        """Pair dataset (token drop, preload), per-rank sampler, loader and the lr schedule."""
        data, optim, seed = self.config["data"], self.config["optim"], self.config["run"]["seed"]
        drop = {side: data[f"{side}_token_drop"] for side in MODALITIES}
        if drop["image"] > 0 and self.head.requires_grid:
            _note(f"note: head {self.head.name!r} needs the full patch grid; image token drop "
                  f"{drop['image']} is turned off", self.dist)
            drop["image"] = 0.0
        for side, source in self.model.sources().items():
            if drop[side] > 0 and not source.token_drop:
                _note(f"note: the {side} side tunes its backbone on all of its tokens; {side} "
                      f"token drop {drop[side]} is turned off", self.dist)
                drop[side] = 0.0
        readers = {side: source.training_reader(cache, seed) for side, source, cache in
                   zip(MODALITIES, self.model.sources().values(),
                       (self.train_images, self.train_texts))}
        if any(reader is not None for reader in readers.values()):
            preload = "none"        # an e2e side reads photos / word pieces, not cached tokens
        else:
            preload, why = resolve_preload(data["preload"], self.train_images, self.train_texts,
                                           self.dist.device)
            _note(why, self.dist)
        self.dataset = PairBatches(self.train_images, self.train_texts, seed=seed,
                                   image_drop=drop["image"], text_drop=drop["text"],
                                   preload=preload, device=self.dist.device,
                                   float32=self.dist.device.type == "cpu", readers=readers)
        over_images = data["epoch_over"] == "images" or (
            data["epoch_over"] == "auto" and self.model.image_source.epoch_unit == "images")
        self.sampler = EpochBatches(len(self.train_texts), optim["batch_size"], seed,
                                    self.dist.rank, self.dist.world_size,
                                    self.dataset.image_index if over_images else None)
        self.loader = pair_loader(self.dataset, self.sampler, data["num_workers"],
                                  pin_memory=self.dist.device.type == "cuda")
        self.steps_per_epoch = len(self.sampler)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.steps_per_epoch, optim["milestones"],
                                                   optim["gamma"], optim["warmup_steps"]))

    def _wrap(self) -> nn.Module:
        """The loss module, under DDP when there are several processes."""
        run = self.config["run"]
        module: nn.Module = LossModule(self.model, self.criterion, self.dist.world_size,
                                       gather_mode(self.head, run["ddp_gather"]))
        if self.dist.world_size == 1:
            return module
        cuda = self.dist.device.type == "cuda"
        if cuda and run["sync_batchnorm"]:
            sync_head_batchnorm(self.model)
        return nn.parallel.DistributedDataParallel(
            module, device_ids=[self.dist.device] if cuda else None,
            find_unused_parameters=run["find_unused_parameters"])

    # -------------------------------------------------------------------------------- state

    def _restore(self, state: dict[str, Any]) -> None:
        """Continue from a checkpoint of this run (the head/sources/loss/optimiser must still fit
        it)."""
        self.model.load_tuned_states(state.get("sources", {}), state["path"])
        try:
            self.head.load_state_dict(state["model"])
            self.criterion.load_state_dict(state["criterion"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise InputError(f"{state['path']}: the run's state does not fit the resolved config "
                             f"(changed head, loss or optimiser options?): "
                             f"{str(exc).splitlines()[0]}") from exc
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = state["epoch"] + 1, state["step"]
        self.best_rsum, self.best_epoch = state["best_rsum"], state["best_epoch"]
        rngs = state["rng"]
        set_rng_state(rngs[self.dist.rank] if self.dist.rank < len(rngs) else rngs[0])

    def _warm_start(self, init: dict[str, Any]) -> None:
        """Load the matching weights of ``init.checkpoint`` (trained on the same caches)."""
        source = load_checkpoint(init["checkpoint"])
        for side, cache in (("image", self.train_images), ("text", self.train_texts)):
            check_features(source["features"][side], cache, f"the warm-start checkpoint "
                           f"{init['checkpoint']}")
        names = warm_start(self.head, source, init["rename"] or {})
        _note(f"warm start from {init['checkpoint']}: {', '.join(names)}", self.dist)

    def _state(self, epoch: int, metrics: dict[str, Any], rngs: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "head_name": self.head.name,
            "head_options": self.head_options,
            "image_spec": self.head.image_spec.to_dict(),
            "text_spec": self.head.text_spec.to_dict(),
            "features": {"image": feature_identity(self.train_images),
                         "text": feature_identity(self.train_texts)},
            "image_views": self.train_images.num_views,
            "model": self.head.state_dict(),
            "sources": self.model.tuned_states(),
            "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rngs,
            "epoch": epoch,
            "step": self.step,
            "best_rsum": self.best_rsum,
            "best_epoch": self.best_epoch,
            "dev": metrics,
            "config": self.config,
        }

    def _all_rng_states(self) -> list[dict[str, Any]]:
        state = rng_state()
        if self.dist.world_size == 1:
            return [state]
        states: list[Any] = [None] * self.dist.world_size
        dist.all_gather_object(states, state)
        return states

    # -------------------------------------------------------------------------------- loop

    def _check_finite(self, first_bad: Tensor, epoch: int) -> None:
        bad = int(first_bad)
        if bad >= 0:
            raise NonFiniteLossError(
                f"the training loss became NaN/Inf at epoch {epoch}, step {bad} (global step); "
                f"the last good checkpoint is {self.out_dir / LAST}. Lower optim.lr, check "
                "optim.grad_clip, or inspect the caches for extreme values")

    def _freeze_backbones(self, epoch: int) -> None:
        """Tuned sides train from epoch ``optim.backbone_frozen_epochs`` on; before, they run
        without gradient (their weights stay in the optimiser, which skips them)."""
        frozen = epoch < self.config["optim"]["backbone_frozen_epochs"]
        for side in self.model.tuned_sides():
            self.model.sources()[side].requires_grad_(not frozen)
        if frozen and self.model.tuned_sides():
            _note(f"epoch {epoch}: tuned {' and '.join(self.model.tuned_sides())} backbone "
                  "frozen (optim.backbone_frozen_epochs)", self.dist)

    def train_epoch(self, epoch: int) -> dict[str, Any]:
        """One pass over the captions (or the images, see ``data.epoch_over``); returns the mean
        loss and scalars of the epoch."""
        self.model.train()
        self.criterion.train()
        self._freeze_backbones(epoch)
        self.sampler.set_epoch(epoch)
        device, log_every = self.dist.device, self.config["run"]["log_every"]
        loss_sum = torch.zeros((), device=device)
        first_bad = torch.full((), -1, dtype=torch.long, device=device)
        scalars: dict[str, Any] = {}
        bar = progress_bar(self.loader, total=self.steps_per_epoch, leave=False,
                           desc=f"epoch {epoch}",
                           disable=not (self.show_progress and self.dist.is_main))
        for i, (images, texts, image_ids) in enumerate(bar):
            images = images.to(device, dtype=torch.float32)    # ids stay integers
            texts = texts.to(device, dtype=torch.float32)
            image_ids = image_ids.to(device, non_blocking=True)
            progress = Progress(epoch, self.step, self.steps_per_epoch)
            with self.autocast():
                loss, extra = self.module(images, texts, image_ids, progress)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.config["optim"]["grad_clip"] > 0:
                nn.utils.clip_grad_norm_(self.params, self.config["optim"]["grad_clip"])
            self.optimizer.step()
            self.scheduler.step()
            loss = loss.detach().float()
            loss_sum += loss
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss),
                                    torch.full_like(first_bad, self.step), first_bad)
            for key, value in extra.items():
                scalars[key] = scalars.get(key, 0.0) + (value.detach() if isinstance(value, Tensor)
                                                        else value)
            self.step += 1
            if (i + 1) % log_every == 0:
                self._check_finite(first_bad, epoch)
                mean = float(loss_sum) / (i + 1)
                bar.set_postfix(loss=f"{mean:.4f}")
                self.log.write({"kind": "step", "epoch": epoch, "step": self.step, "loss": mean,
                                "lr": self.scheduler.get_last_lr()[0]})
        self._check_finite(first_bad, epoch)
        steps = max(1, self.steps_per_epoch)
        return {"loss": float(loss_sum) / steps,
                "scalars": {k: float(v) / steps for k, v in scalars.items()}}

    def run(self) -> TrainSummary:
        """Train from the current epoch to ``optim.epochs``; returns the summary."""
        epochs = self.config["optim"]["epochs"]
        history: list[dict[str, Any]] = []
        try:
            for epoch in range(self.epoch, epochs):
                start = time.perf_counter()
                lr = self.scheduler.get_last_lr()[0]
                result = self.train_epoch(epoch)
                train_seconds = time.perf_counter() - start
                record = self._end_epoch(epoch, lr, result, train_seconds)
                history.append(record)
        finally:
            self.log.close()
        return TrainSummary(self.out_dir, epochs, self.step, self.best_rsum, self.best_epoch,
                            history)

    def _end_epoch(self, epoch: int, lr: float, result: dict[str, Any],
                   train_seconds: float) -> dict[str, Any]:
        """Dev evaluation (main rank), checkpoints and the epoch record."""
        start = time.perf_counter()
        metrics: dict[str, Any] = {}
        if self.dist.is_main:
            metrics = evaluate_split(self.model, self.dev_images, self.dev_texts,
                                     self.config["eval"], self.dist.device)["metrics"]
        eval_seconds = time.perf_counter() - start
        rngs = self._all_rng_states()
        record = {"kind": "epoch", "epoch": epoch, "step": self.step, "loss": result["loss"],
                  "lr": lr, "dev": metrics, "scalars": result["scalars"],
                  "seconds": {"train": train_seconds, "eval": eval_seconds}, "best": False}
        if self.dist.is_main:
            rsum = float(metrics["rsum"])
            if rsum > self.best_rsum:
                self.best_rsum, self.best_epoch, record["best"] = rsum, epoch, True
            state = self._state(epoch, metrics, rngs)
            save_checkpoint(state, self.out_dir / LAST)
            if record["best"]:    # weights only: resuming reads last.pt
                save_checkpoint({k: v for k, v in state.items() if k not in RESUME_ONLY},
                                self.out_dir / BEST)
            self.log.write(record)
            tqdm.write(f"epoch {epoch}: loss {result['loss']:.4f}  dev rsum {rsum:.2f}"
                       f"{' (best)' if record['best'] else ''}  "
                       f"[{train_seconds:.1f} s train, {eval_seconds:.1f} s eval]")
        if self.dist.world_size > 1:
            dist.barrier()
        return record

    def close(self) -> None:
        """Leave the process group if this trainer joined it."""
        if self.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def sync_head_batchnorm(model: RetrievalModel) -> None:
    """The head's BatchNorm layers as SyncBatchNorm (statistics of the global batch, same
    parameters); the sources' BatchNorm layers, frozen in a tuned backbone, stay as they are."""
    model.head = nn.SyncBatchNorm.convert_sync_batchnorm(model.head)


def _named_backbone(named: dict[str, Any] | None, cache: ImageCache | TextCache,
                    side: str) -> dict[str, Any]:
    """The backbone of a tuned side as ``data.<side>_backbone`` records it, from its train
    cache; InputError when a key the config sets differs."""
    actual = {key: getattr(cache.attrs, key) for key in BACKBONE_KEYS}
    wrong = [f"{key} is {actual[key]!r}, the config names {value!r}"
             for key, value in (named or {}).items() if actual[key] != value]
    if wrong:
        raise InputError(f"{cache.path}: not the {side} backbone data.{side}_backbone names "
                         f"({'; '.join(wrong)})")
    return actual


def train(config: dict[str, Any], out_dir: str | Path, resume: bool = False,
          show_progress: bool = True) -> TrainSummary:
    """Train the head of a resolved config into ``out_dir`` (see the module docstring)."""
    trainer = Trainer(config, out_dir, resume=resume, show_progress=show_progress)
    try:
        return trainer.run()
    finally:
        trainer.close()


__all__ = ["train", "Trainer", "TrainSummary", "NonFiniteLossError", "param_groups", "lr_factor",
           "open_split", "evaluate_split"]
