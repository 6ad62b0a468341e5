"""DDP on the CPU: two gloo processes give the loss and gradient of one process on the global batch.

One spawn of two processes runs every check (process start-up dominates the cost): the loss module
in both gather modes on a fixed batch, bare and behind a tuned image tail (a tiny DINOv2's last
block and norm, run on each rank's rows before the gather), and whole ``train`` runs (cache
sources; an image tail from a layer-K cache) compared with one-process runs.
"""
from __future__ import annotations

import importlib
import os
import socket
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cache.batch import TokenBatch
from heads.registry import build_head, list_heads
from heads.base import FeatureSpec, Progress
from heads.checkpoint import load_checkpoint
from heads.config import load_config
from heads.losses import build_loss
from heads.distributed import LossModule
from extract.tails import Tail
from heads.model import RetrievalModel
from heads.sources import TailTokens, TokenSource
from heads.train import train
from tests.heads.synthetic_caches import config_overrides, write_dataset
from tests.heads.tail_world import TailWorld, make_tail_world, tail_overrides

WORLD = 2
IMAGE_IDS = [0, 0, 1, 2, 3, 3, 4, 5]       # two captions of image 0 and of image 3

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch(lengths: list[int], dim: int, seed: int) -> TokenBatch:
    g = torch.Generator().manual_seed(seed)
    lengths_t = torch.tensor(lengths)
    mask = torch.arange(max(lengths)).unsqueeze(0) < lengths_t.unsqueeze(1)
    return TokenBatch(torch.randn(len(lengths), max(lengths), dim, generator=g)
                      * mask.unsqueeze(-1), mask)


# rank 0 takes rows 0-3, rank 1 rows 4-7: their token sets have different widths, so gathering
# token encodings pads them
IMAGE_LENGTHS = [3, 2, 3, 3, 5, 4, 2, 5]
TEXT_LENGTHS = [7, 4, 6, 2, 4, 3, 4, 2]


HEADS = ("linear", "scan")   # an embedding head and an interaction head (token-set encodings)
TAIL_DIM = 8                 # image tokens of the tail variant: 5 of 8 dims, no padding


def _image_tail() -> TokenSource:
    """The last block and final norm of a tiny random DINOv2 (no dropout), as a tuned source."""
    from transformers import Dinov2Config, Dinov2Model

    model = Dinov2Model(Dinov2Config(hidden_size=TAIL_DIM, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=16, image_size=16,
                                     patch_size=8))
    return TailTokens(Tail({1: model.encoder.layer[1]}, model.layernorm))


def _parts(name: str, tail: bool = False) -> tuple[LossModule, TokenBatch, TokenBatch,
                                                     torch.Tensor]:
    torch.manual_seed(0)
    image_dim = TAIL_DIM if tail else 6
    head = build_head(name, FeatureSpec("image", image_dim), FeatureSpec("text", 4), embed_dim=5)
    criterion = build_loss("infonce", temperature=0.1)    # a learnable temperature: DDP syncs it
    model = RetrievalModel(head, _image_tail() if tail else None)
    images = _batch([5] * 8, TAIL_DIM, 1) if tail else _batch(IMAGE_LENGTHS, 6, 1)
    return (LossModule(model, criterion), images, _batch(TEXT_LENGTHS, 4, 2),
            torch.tensor(IMAGE_IDS))


def _loss_and_grads(module: torch.nn.Module, images: TokenBatch, texts: TokenBatch,
                    ids: torch.Tensor) -> dict[str, Any]:
    loss, _ = module(images, texts, ids, Progress(1, 10, 10))
    loss.backward()
    params = module.module if isinstance(module, torch.nn.parallel.DistributedDataParallel) else module
    return {"loss": loss.detach(),
            "grads": {n: p.grad.clone() for n, p in params.named_parameters()}}


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
    rows = torch.arange(rank * 4, rank * 4 + 4)
    for name in HEADS:
        for mode in ("encodings", "inputs"):
            for tail in (False, True):
                module, images, texts, ids = _parts(name, tail)
                module.world_size, module.gather = WORLD, mode
                ddp = torch.nn.parallel.DistributedDataParallel(module)
                results[name, mode, tail] = _loss_and_grads(ddp, images.index(rows),
                                                            texts.index(rows), ids[rows])
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
    importlib.import_module("heads.eval.evaluate")   # imported once here, inherited by the children
    list_heads()
    # fork: the children inherit the imported modules (a spawn re-imports torch: ~10 s on a busy CPU)
    mp.start_processes(_worker, args=(_free_port(), str(features), world, str(out)),
                       nprocs=WORLD, join=True, start_method="fork")
    return (features, world, out,
            [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)])


@pytest.mark.parametrize("tail", [False, True], ids=["cache", "tail"])
@pytest.mark.parametrize("mode", ["encodings", "inputs"])
@pytest.mark.parametrize("name", HEADS)
def test_two_processes_give_the_global_batch_loss_and_gradient(
        runs: tuple[Path, TailWorld, Path, list[dict[str, Any]]], name: str, mode: str,
        tail: bool) -> None:
    module, images, texts, ids = _parts(name, tail)
    single = _loss_and_grads(module, images, texts, ids)
    if tail:
        assert any(n.startswith("model.image_source.tail.blocks.1.") for n in single["grads"])
    for rank_result in runs[3]:
        got = rank_result[name, mode, tail]
        assert torch.allclose(got["loss"], single["loss"], rtol=1e-5, atol=1e-6)
        assert got["grads"].keys() == single["grads"].keys()
        for param, grad in single["grads"].items():
            assert torch.allclose(got["grads"][param], grad, rtol=1e-4, atol=1e-6), param


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
