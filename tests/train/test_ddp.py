"""DDP on the CPU: two gloo processes give the loss and gradient of one process on the global batch.

One spawn of two processes runs every check (process start-up dominates the cost): the loss module
of every registered head behind every kind of token source (``cache``, a ``tail`` from a layer-K
cache, an ``e2e`` backbone over the photos and word pieces; the same kind on both sides, built by
``build_source`` from the caches of tiny random DINOv2 / BERT backbones), in the gather mode its
training runs in (``gather_mode(head, "auto")``: "encodings" for heads whose loss derives from
their encodings, e.g. ``laps`` and ``tgdt`` declare it) and in "inputs"; and whole ``train`` runs
(cache sources; an image tail from a layer-K cache) compared with one-process runs. A new head or
source kind is covered by registering it.
"""
from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cache.batch import InputBatch
from cache.store import ImageCache, TextCache
from heads.base import FeatureSpec, Progress
from heads.checkpoint import load_checkpoint, load_pretrained_parts
from heads.losses import build_loss
from heads.model import RetrievalModel
from heads.registry import build_head, head_options, list_heads
from heads.sources import build_source, list_sources
from train.config import load_config
from train.distributed import LossModule, gather_mode
from train.trainer import train
from tests.heads.models.test_contract import CASES
from tests.heads.synthetic_caches import config_overrides, write_dataset
from tests.heads.tail_world import TailWorld, make_tail_world, split_caches, tail_overrides

WORLD = 2
IMAGE_IDS = [0, 0, 1, 2, 3, 3, 4, 5]       # two captions of image 0 and of image 3
GATHERS = ("auto", "inputs")               # auto: the mode training runs the head in

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _caches(world: TailWorld, kind: str) -> tuple[ImageCache, TextCache]:
    """The train caches a ``kind`` source reads: layer K for a tail, else the last layer (an e2e
    source reads the photos and word pieces its rows record)."""
    if kind == "tail":
        return split_caches(world, "train")
    return split_caches(world, "train", image_tag="dinov2", text_tag="bert")


def _rows(text: TextCache) -> tuple[np.ndarray, np.ndarray]:
    """The batch's image rows (``IMAGE_IDS``) and a caption row of each: the first caption of an
    image, the second where the image comes again."""
    image_index = np.asarray(text.image_index)
    seen: dict[int, int] = {}
    captions = []
    for image in IMAGE_IDS:
        captions.append(np.flatnonzero(image_index == image)[seen.get(image, 0)])
        seen[image] = seen.get(image, 0) + 1
    return np.array(IMAGE_IDS), np.array(captions)


def _inputs(source: torch.nn.Module, cache: ImageCache | TextCache,
            rows: np.ndarray) -> InputBatch:
    """What the source reads for ``rows`` (in order), as float32 on the CPU."""
    (_, batch), = source.batches(cache, len(rows), rows)
    return batch.to("cpu", torch.float32)


def _parts(name: str, kind: str, world: TailWorld, rank: int | None = None
           ) -> tuple[LossModule, InputBatch, InputBatch, torch.Tensor]:
    """Head ``name`` (its first contract case, seed 0) behind ``kind`` sources on both sides, the
    loss module over it and the batch: the whole of it, or rank ``rank``'s half."""
    images, texts = _caches(world, kind)
    sources = {side: build_source(kind, cache) for side, cache in (("image", images),
                                                                    ("text", texts))}
    specs = [sources[side].output_spec(FeatureSpec.from_cache(cache))
             for side, cache in (("image", images), ("text", texts))]
    options = dict(CASES[name][0])
    if "dropout" in head_options(name):
        options["dropout"] = 0.0            # its draws differ between one and two processes
    torch.manual_seed(0)
    head = build_head(name, *specs, **options)
    load_pretrained_parts(head)
    model = RetrievalModel(head, sources["image"], sources["text"])
    model.train()
    for source in sources.values():
        source.eval()       # BERT's dropout off: its draws differ between one and two processes
    for module in head.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            # a head's BatchNorm (CAA's gate) normalises over each rank's own rows on the CPU,
            # where DDP has no SyncBatchNorm (on CUDA run.sync_batchnorm syncs it): running
            # statistics here, so the comparison is of the gathering alone
            module.eval()
    criterion = build_loss("infonce", temperature=0.1)    # a learnable temperature: DDP syncs it
    image_rows, caption_rows = _rows(texts)
    part = slice(None) if rank is None else slice(rank * 4, rank * 4 + 4)
    return (LossModule(model, criterion), _inputs(sources["image"], images, image_rows[part]),
            _inputs(sources["text"], texts, caption_rows[part]),
            torch.tensor(IMAGE_IDS)[part])


def _loss_and_grads(module: torch.nn.Module, images: InputBatch, texts: InputBatch,
                    ids: torch.Tensor) -> dict[str, Any]:
    loss, _ = module(images, texts, ids, Progress(1, 10, 10))
    loss.backward()
    params = module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
    return {"loss": loss.detach(),
            "grads": {n: p.grad.clone() for n, p in params.named_parameters()
                      if p.grad is not None}}


def _config(features: Path) -> dict[str, Any]:
    return load_config(None, config_overrides(features, epochs=2, batch_size=40, lr=0.01,
                                              milestones="[]")
                       + ["loss.name=infonce", "head.embed_dim=16", "data.image_token_drop=0.2",
                          "data.text_token_drop=0.2"])


def _tail_config(world: TailWorld) -> dict[str, Any]:
    return load_config(None, tail_overrides(world, image="tail", lr=0.01))


def _worker(rank: int, port: int, features: str, world: TailWorld, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update({"WORLD_SIZE": str(WORLD), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    dist.init_process_group("gloo")
    results: dict[str, Any] = {}
    for name in list_heads():
        for kind in list_sources():
            for gather in GATHERS:
                module, images, texts, ids = _parts(name, kind, world, rank)
                module.world_size = WORLD
                module.gather = gather_mode(module.model.head, gather)
                # as training wraps it (run.find_unused_parameters): a DINOv2 backbone has a
                # mask token that retrieval never uses
                ddp = torch.nn.parallel.DistributedDataParallel(module,
                                                                find_unused_parameters=True)
                results[name, kind, gather] = _loss_and_grads(ddp, images, texts, ids)
    summary = train(_config(Path(features)), Path(out) / "ddp", show_progress=False)
    results["history"] = summary.history
    results["tail_history"] = train(_tail_config(world), Path(out) / "ddp_tail",
                                    show_progress=False).history
    torch.save(results, Path(out) / f"rank{rank}.pt")
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[Path, TailWorld, Path, list[dict[str, Any]]]:
    features = write_dataset(tmp_path_factory.mktemp("features"), train=40, dev=20, test=4)
    world = make_tail_world(tmp_path_factory.mktemp("tail"))
    out = tmp_path_factory.mktemp("runs")
    importlib.import_module("train.evaluate")   # imported once here, inherited by the children
    list_heads()
    # fork: the children inherit the imported modules (a spawn re-imports torch: ~10 s on a busy CPU)
    mp.start_processes(_worker, args=(_free_port(), str(features), world, str(out)),
                       nprocs=WORLD, join=True, start_method="fork")
    return (features, world, out,
            [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)])


@pytest.mark.parametrize("gather", GATHERS)
@pytest.mark.parametrize("kind", list_sources())
@pytest.mark.parametrize("name", list_heads())
def test_two_processes_give_the_global_batch_loss_and_gradient(
        runs: tuple[Path, TailWorld, Path, list[dict[str, Any]]], name: str, kind: str,
        gather: str) -> None:
    module, images, texts, ids = _parts(name, kind, runs[1])
    single = _loss_and_grads(module, images, texts, ids)
    if kind != "cache":                # the tuned sources train: their weights get a gradient
        for side in ("image", "text"):
            assert any(n.startswith(f"model.{side}_source.") for n in single["grads"]), side
    for rank_result in runs[3]:
        got = rank_result[name, kind, gather]
        assert torch.allclose(got["loss"], single["loss"], rtol=1e-5, atol=1e-6)
        assert got["grads"].keys() == single["grads"].keys()
        for param, grad in single["grads"].items():
            # summed in another order: rounding of the tensor's largest entries (e2e backbones
            # and TGDT's scaled alignment reach gradients of 100)
            atol = 1e-6 * max(1.0, float(grad.abs().max()))
            assert torch.allclose(got["grads"][param], grad, rtol=1e-4, atol=atol), param


def test_a_ddp_run_equals_a_one_process_run(
        runs: tuple[Path, TailWorld, Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    features, _, out, results = runs
    single = train(_config(features), tmp_path / "single", show_progress=False)
    ddp_history = results[0]["history"]
    for a, b in zip(ddp_history, single.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["dev"]["rsum"] == pytest.approx(b["dev"]["rsum"], abs=1.0)
    a = load_checkpoint(out / "ddp" / "last.pt")
    b = load_checkpoint(tmp_path / "single" / "last.pt")
    for name, value in b["model"].items():
        assert torch.allclose(a["model"][name], value, rtol=1e-3, atol=1e-5), name
    assert len(a["rng"]) == WORLD and a["step"] == b["step"]


def test_a_ddp_tail_run_equals_a_one_process_run(
        runs: tuple[Path, TailWorld, Path, list[dict[str, Any]]], tmp_path: Path) -> None:
    """An image tail (tiny DINOv2 block 1 + norm from a layer-1 cache) trained under DDP."""
    _, world, out, results = runs
    single = train(_tail_config(world), tmp_path / "single", show_progress=False)
    for a, b in zip(results[0]["tail_history"], single.history):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
    a = load_checkpoint(out / "ddp_tail" / "last.pt")
    b = load_checkpoint(tmp_path / "single" / "last.pt")
    assert list(b["sources"]) == ["image"] and a["sources"]["image"].keys() == b["sources"][
        "image"].keys()
    for name, value in b["sources"]["image"].items():
        # softmax ignores a shift shared by a query's logits, so a key bias gets a zero gradient
        # in exact arithmetic: Adam scales its rounding noise (1e-9) up to 1e-6 steps, different
        # on every reduction order; it is held to that noise's size
        atol = 1e-4 if name.endswith("k_proj.bias") else 1e-5
        assert torch.allclose(a["sources"]["image"][name], value, rtol=1e-3, atol=atol), name
    for name, value in b["model"].items():
        assert torch.allclose(a["model"][name], value, rtol=1e-3, atol=1e-5), name
