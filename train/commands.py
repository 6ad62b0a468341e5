"""Stage-two commands: ``cli train-head``, ``cli eval`` and ``cli export-backbone``.

The commands only parse options and print; the work is in ``train.trainer`` (training),
``train.evaluate`` (scoring and metrics), ``train.export`` (a tail or e2e run's tuned
backbone) and the helpers below (resolving configs, opening the caches of a checkpoint), which
other commands and options reuse.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch

from cache.device import resolve_device
from cache.errors import InputError
from cache.store import MODALITIES, ImageCache, TextCache, centre_view_note
from heads.checkpoint import load_checkpoint
from heads.eval.metrics import PROTOCOLS, describe_captions_per_image
from heads.model import RetrievalModel, create_model
from train.config import (cache_paths, config_without_file, flatten, load_config,
                          parse_override)

# ----------------------------------------------------------------------------------- train-head


def resolve_train_config(config_path: str | None, overrides: tuple[str, ...], head: str | None,
                         out: Path, resume: bool, features: str | None = None,
                         dataset: str | None = None) -> dict[str, Any]:
    """The config of a new run (file + ``--head`` + ``--set``; without a file, ``--head`` with
    ``--features``/``--dataset`` on the reference recipe) or of a resumed one (the checkpoint's
    config + ``--set``; a ``--config`` given with ``--resume`` must agree with it except for the
    keys that ``--set`` changes)."""
    data = {"features": features, "dataset": dataset}
    if not resume and config_path is None:
        if head is None or features is None or dataset is None:
            raise InputError("give --config FILE, or --head NAME --features DIR --dataset NAME "
                             "(or --resume to continue the run in --out)")
        return config_without_file(head, features, dataset, overrides)
    overrides = tuple(f"data.{k}={v}" for k, v in data.items() if v is not None) + overrides
    if not resume:
        return load_config(config_path, overrides, head)
    from train.trainer import LAST
    saved = load_checkpoint(out / LAST)["config"]
    config = load_config(None, overrides, head, base=saved)
    if config_path is not None:
        changed = {".".join(parse_override(o)[0]) for o in overrides}
        given = flatten(load_config(config_path, overrides, head))
        ran = flatten(config)
        diff = sorted(k for k in set(given) | set(ran)
                      if given.get(k) != ran.get(k) and k not in changed)
        if diff:
            raise InputError(f"{config_path}: differs from the config of the run in {out} "
                             f"({', '.join(diff[:5])}); change keys of a resumed run with --set")
    return config


@click.command("train-head")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML run config (see configs/).")
@click.option("--head", help="Head name (overrides head.name of the config; without --config: "
                             "the head's defaults on the reference recipe).")
@click.option("--features", type=click.Path(file_okay=False),
              help="Feature tree (data.features): <features>/<dataset>/<split>/*.h5.")
@click.option("--dataset", help="Dataset folder under --features (data.dataset), e.g. f8k.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set optim.lr=1e-4 (repeatable).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Run folder: best.pt, last.pt, log.jsonl, config.yaml.")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its last.pt.")
@click.option("--device", help="auto, cpu, cuda or cuda:N (overrides run.device).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def train_head(config_path: str | None, head: str | None, features: str | None,
               dataset: str | None, overrides: tuple[str, ...], out: str, resume: bool,
               device: str | None, no_progress: bool) -> None:
    """Train a retrieval head on cached features; keep the best checkpoint by dev rsum.

    \b
    cli train-head --config configs/f8k_vse.yaml --out runs/f8k_vse
    cli train-head --head caa --features features --dataset f8k --out runs/f8k_caa_defaults
    cli train-head --config configs/f8k_vse.yaml --head linear --set optim.epochs=5 --out runs/lin
    torchrun --nproc-per-node 4 cli.py train-head --config configs/coco_vse.yaml --out runs/coco
    """
    from train.trainer import NonFiniteLossError, train

    if device is not None:
        overrides = overrides + (f"run.device={device}",)
    config = resolve_train_config(config_path, overrides, head, Path(out), resume, features,
                                  dataset)
    try:
        summary = train(config, out, resume=resume, show_progress=not no_progress)
    except NonFiniteLossError as exc:
        raise click.ClickException(str(exc)) from exc
    if summary.best_epoch >= 0:
        click.echo(f"best dev rsum {summary.best_rsum:.2f} at epoch {summary.best_epoch}: "
                   f"{Path(out) / 'best.pt'}")


# ----------------------------------------------------------------------------------------- eval


def open_eval_caches(state: dict[str, Any], split: str | None, images: str | None,
                     texts: str | None) -> tuple[ImageCache, TextCache, str]:
    """The caches to evaluate a checkpoint on: ``--image-cache``/``--text-cache`` or the split's
    files under the checkpoint's feature tree (default split: its config's test split)."""
    config = state["config"]
    split = split or config["data"]["test_split"]
    default_images, default_texts = cache_paths(config, split)
    return (ImageCache(images or default_images), TextCache(texts or default_texts), split)


def format_table(metrics: dict[str, float], seconds: dict[str, float] | None = None) -> str:
    """The recall table: R@1/5/10, medr, meanr per direction, rsum and the seconds per stage."""
    lines = [f"{'':<14}{'R@1':>7}{'R@5':>7}{'R@10':>7}{'medr':>7}{'meanr':>8}"]
    for direction, label in (("i2t", "image->text"), ("t2i", "text->image")):
        m = {k: metrics[f"{direction}_{k}"] for k in ("r1", "r5", "r10", "medr", "meanr")}
        lines.append(f"{label:<14}{m['r1']:>7.2f}{m['r5']:>7.2f}{m['r10']:>7.2f}"
                     f"{m['medr']:>7.0f}{m['meanr']:>8.2f}")
    lines.append(f"{'rsum':<14}{metrics['rsum']:>7.2f}")
    if seconds:
        lines.append("seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in seconds.items()))
    return "\n".join(lines)


def write_report(path: Path, report: dict[str, Any]) -> None:
    """Write the JSON report (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")


@click.command("eval")
@click.option("--checkpoint", required=True, type=click.Path(dir_okay=False),
              help="A checkpoint of train-head (RUN/best.pt).")
@click.option("--split", help="Split under the checkpoint's feature tree (default: its test split).")
@click.option("--image-cache", "images", type=click.Path(dir_okay=False),
              help="Image cache file (instead of --split).")
@click.option("--text-cache", "texts", type=click.Path(dir_okay=False),
              help="Text cache file (instead of --split).")
@click.option("--photos", type=click.Path(file_okay=False),
              help="Folder of the split's photos, for a run whose image side is e2e (default: "
                   "the folder its image cache records).")
@click.option("--protocol", type=click.Choice(list(PROTOCOLS)),
              help="Evaluation protocol (default: the checkpoint's eval.protocol).")
@click.option("--save-sims", type=click.Path(dir_okay=False),
              help="Write the similarity matrices to this .npz file.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              help="Report file (default: eval-<split>.json beside the checkpoint).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--batch-size", type=int, help="Encoding batch (default: the checkpoint's).")
@click.option("--rerank-topk", "rerank_topk", metavar="K|K_I2T,K_T2I",
              help="Two-stage retrieval: shortlist the top K per query by the coarse branch, "
                   "re-rank them with the checkpoint's (fine) branch; misses stay misses.")
@click.option("--coarse-checkpoint", "coarse_checkpoint", type=click.Path(dir_okay=False),
              help="Coarse (embedding) head for --rerank-topk (default: --checkpoint itself, "
                   "in --coarse-mode).")
@click.option("--coarse-mode", help="Inference branch of the coarse head, e.g. tgdt 'global'.")
@click.option("--mode", "fine_mode",
              help="Inference branch of the checkpoint's head, e.g. tgdt 'global' or 'local', "
                   "aladin 'student' or 'teacher' (with --rerank-topk: the fine branch).")
@click.option("--fuse-weight", type=float, default=0.0, show_default=True,
              help="Re-rank the shortlist by fine + WEIGHT * coarse.")
@click.option("--max-images", type=click.IntRange(min=1), metavar="N",
              help="One gallery of the split's first N images and their captions (protocol "
                   "full): the gallery eval.dev_images selects on.")
def eval_command(checkpoint: str, split: str | None, images: str | None, texts: str | None,
             photos: str | None, protocol: str | None, save_sims: str | None, json_out: str | None, device: str,
             batch_size: int | None, rerank_topk: str | None, coarse_checkpoint: str | None,
             coarse_mode: str | None, fine_mode: str | None, fuse_weight: float,
             max_images: int | None) -> None:
    """Evaluate a trained head: i2t / t2i R@1/5/10, median and mean rank, rsum.

    \b
    cli eval --checkpoint runs/f8k_vse/best.pt --split test
    cli eval --checkpoint runs/coco_vse/best.pt --split testall --protocol coco1k
    cli eval --checkpoint runs/f30k_tgdt/best.pt --mode global
    cli eval --checkpoint runs/f30k_tgdt/best.pt --rerank-topk 50,100 --coarse-mode global \
        --mode local
    cli eval --checkpoint runs/f30k_scan/best.pt --rerank-topk 50 \
        --coarse-checkpoint runs/f30k_vse/best.pt
    """
    state = load_checkpoint(checkpoint)
    image_cache, text_cache, split = open_eval_caches(state, split, images, texts)
    note = centre_view_note(image_cache, "eval")
    if note:
        click.echo(note, err=True)
    torch_device = resolve_device(device)
    model = create_model(state, image_cache, text_cache, photos=photos).to(torch_device)
    eval_cfg = state["config"]["eval"]
    run = EvalRun(checkpoint=checkpoint, state=state, model=model, image_cache=image_cache,
                  text_cache=text_cache, split=split, device=torch_device,
                  protocol=protocol or eval_cfg["protocol"],
                  batch_size=batch_size or eval_cfg["batch_size"], json_out=json_out,
                  blocks={k: eval_cfg[k] for k in ("image_block", "caption_block")
                          if eval_cfg.get(k)})
    if rerank_topk is not None:
        _reject_given({"--save-sims": save_sims, "--max-images": max_images},
                      "do not apply to --rerank-topk (they score full matrices)")
        run_two_stage(run, TwoStageRequest(rerank_topk, coarse_checkpoint, coarse_mode, fine_mode,
                                           fuse_weight))
        return
    _reject_given({"--coarse-checkpoint": coarse_checkpoint, "--coarse-mode": coarse_mode,
                   "--fuse-weight": fuse_weight},
                  "only apply to two-stage retrieval; add --rerank-topk K")
    if fine_mode is not None:
        model.set_mode(fine_mode)
    run_full(run, save_sims, max_images)


@dataclass(frozen=True)
class EvalRun:
    """What one ``cli eval`` call evaluates: a checkpoint's model (its head behind its token
    sources, a tuned tail or e2e backbone included), the caches, where and how."""

    checkpoint: str
    state: dict[str, Any]
    model: RetrievalModel
    image_cache: ImageCache
    text_cache: TextCache
    split: str
    device: torch.device
    protocol: str
    batch_size: int
    json_out: str | None
    blocks: dict[str, int]       # image_block / caption_block of the run's eval config

    def report(self, result: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """The JSON report: what was evaluated, ``extra`` fields, then the result."""
        return {"checkpoint": str(self.checkpoint), "head": self.state["head_name"],
                "split": self.split, "images_cache": str(self.image_cache.path),
                "texts_cache": str(self.text_cache.path), "epoch": self.state["epoch"],
                **extra, **result}

    def report_path(self, default_name: str) -> Path:
        return Path(self.json_out) if self.json_out else Path(self.checkpoint).parent / default_name


@dataclass(frozen=True)
class TwoStageRequest:
    """The two-stage options of ``cli eval`` (``--rerank-topk`` and its companions)."""

    topk: str
    coarse_checkpoint: str | None = None
    coarse_mode: str | None = None
    fine_mode: str | None = None
    fuse_weight: float = 0.0


def _reject_given(options: dict[str, Any], reason: str) -> None:
    """InputError naming every option of ``options`` that was given (a set, non-zero value)."""
    given = [name for name, value in options.items() if value]
    if given:
        raise InputError(f"{', '.join(given)} {reason}")


def run_full(run: EvalRun, save_sims: str | None, max_images: int | None) -> None:
    """``cli eval``: score every pair of the protocol's galleries, print the table, write JSON."""
    from train.evaluate import evaluate

    result = evaluate(run.model, run.image_cache, run.text_cache, protocol=run.protocol,
                      device=run.device, batch_size=run.batch_size, save_sims=save_sims,
                      max_images=max_images, progress=True, **run.blocks)
    gallery = f", gallery of its first {max_images} images" if max_images else ""
    click.echo(f"{run.checkpoint} on {run.split} ({result['images']} images, "
               f"{result['captions']} captions, "
               f"{describe_captions_per_image(result['captions_per_image'])}, "
               f"protocol {result['protocol']}{gallery})")
    click.echo(format_table(result["metrics"], result["seconds"]))
    out = run.report_path(f"eval-{run.split}.json")
    write_report(out, run.report(result))
    click.echo(f"report: {out}")


def run_two_stage(run: EvalRun, request: TwoStageRequest) -> None:
    """``cli eval --rerank-topk``: two-stage retrieval (``train.evaluate.two_stage``), printed
    as the coarse-only and the final recall tables, and written to the JSON report."""
    from train.evaluate import two_stage
    from heads.eval.rerank import parse_topk

    coarse = run.model
    if request.coarse_checkpoint is not None:
        coarse = create_model(load_checkpoint(request.coarse_checkpoint), run.image_cache,
                              run.text_cache).to(run.device)
    result = two_stage(coarse, run.model, run.image_cache, run.text_cache,
                       parse_topk(request.topk), device=run.device, protocol=run.protocol,
                       coarse_mode=request.coarse_mode, fine_mode=request.fine_mode,
                       fuse_weight=request.fuse_weight, batch_size=run.batch_size,
                       progress=True, **run.blocks)
    k = result["topk"]
    click.echo(f"{run.checkpoint} on {run.split} ({result['images']} images, "
               f"{result['captions']} captions, "
               f"{describe_captions_per_image(result['captions_per_image'])}, "
               f"protocol {run.protocol}), two-stage k = "
               f"{k['i2t']} (i2t), {k['t2i']} (t2i)")
    click.echo("coarse only:\n" + format_table(result["coarse"]))
    click.echo("two-stage:\n" + format_table(result["final"], result["seconds"]))
    recall = result["coarse_recall_at_k"]
    click.echo(f"coarse recall at k: i2t {recall['i2t']:.2f} %, t2i {recall['t2i']:.2f} %; fine "
               f"pairs scored {result['pairs_scored']:,} of {result['pairs_full']:,}")
    out = run.report_path(f"eval-{run.split}-rerank{k['i2t']}_{k['t2i']}.json")
    write_report(out, run.report(result, coarse_checkpoint=request.coarse_checkpoint,
                                 coarse_mode=request.coarse_mode, fine_mode=request.fine_mode))
    click.echo(f"report: {out}")


# ------------------------------------------------------------------------------ export-backbone


@click.command("export-backbone")
@click.argument("checkpoint", type=click.Path(dir_okay=False))
@click.option("--side", required=True, type=click.Choice(list(MODALITIES)),
              help="The tuned (data.<side>_source: tail or e2e) side whose backbone to write.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Folder to write (refused if it exists and is not empty, unless --overwrite).")
@click.option("--overwrite", is_flag=True, help="Replace a non-empty --out once the new folder is "
                                                "complete.")
def export_backbone(checkpoint: str, side: str, out: str, overwrite: bool) -> None:
    """Write the backbone a tail or e2e run tuned as weights that cli extract --weights loads.

    The original weights with the run's tuned blocks after layer K and final norm, plus
    conversion.json, whose description becomes the weights note of caches extracted from it.

    \b
    cli export-backbone runs/f8k_linear_minilm_tail/best.pt --side text --out tuned/minilm
    cli extract --text-encoder minilm --text-weights tuned/minilm --text-tag minilm_tuned ...
    """
    from train.export import export_backbone as export

    result = export(checkpoint, side, out, overwrite=overwrite)
    click.echo(f"wrote {result.out}: the {side} backbone of {checkpoint} (epoch {result.epoch}), "
               f"{len(result.tuned)} tuned tensors")
    click.echo(f"extract with: cli extract {result.extract_options} ...")
