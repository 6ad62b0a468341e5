"""Benchmark: ``cli index`` on a folder of photos vs ``cli extract`` on the same photos, and proof
that searching the index is the model ``cli eval`` scores.

The photos of one split of a dataset (the rows of its image cache, e.g. Flickr8k's 1K test split)
are copied into a plain folder, as a user's photos would be. Then, in the same run:

* ``cli extract`` writes that split's image cache (``--backbone`` of the checkpoint, images only);
* ``cli index`` indexes the folder with the checkpoint (extraction, head encoding, faiss);

both as whole processes (startup and model loading included), timed by wall clock; the ratio is
index images/s over extract images/s (goal >= 0.9). Then every caption of the split's text cache
is a text query through ``search.open_index`` (what ``cli search`` runs), and the rank of its
photo gives t2i R@1/5/10, printed beside the ``cli eval`` report of the same checkpoint on the same
split: the two must agree within 0.1.

    python bench/index.py --checkpoint runs/f8k_linear/best.pt --split test
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import print_machine
from cache.store import ImageCache, TextCache
from heads.checkpoint import load_checkpoint
from train.config import cache_paths

REPO = Path(__file__).resolve().parents[1]


def _timed(command: list[str]) -> float:
    """Wall seconds of a command (run from the repository root); exits with its output when it
    fails."""
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{done.stdout}{done.stderr}")
    return time.perf_counter() - start


def t2i_recall(index_dir: Path, texts: TextCache, images: ImageCache, limit: int | None) -> dict:
    """R@1/5/10 (percent) of each caption's photo among the index's text-query hits."""
    import search

    opened = search.open_index(index_dir)
    truth = [Path(images.paths[int(i)]).name for i in texts.image_index]
    captions = texts.captions[:limit]
    hits = {1: 0, 5: 0, 10: 0}
    for caption, photo in zip(captions, truth):
        ranked = [Path(h.path).name for h in opened.query_text(caption, k=10).hits]
        for k in hits:
            hits[k] += photo in ranked[:k]
    return {f"t2i_r{k}": 100.0 * n / len(captions) for k, n in hits.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="A run with an embedding branch.")
    parser.add_argument("--split", default="test", help="Split of the run's feature tree.")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--captions", type=int, help="Query only the first N captions.")
    parser.add_argument("--data-path", help="The dataset's caption files (default: "
                        "../shared/data/<dataset of the run>).")
    parser.add_argument("--keep", help="Work folder to keep (default: a temporary one).")
    args = parser.parse_args()
    print_machine()
    state = load_checkpoint(args.checkpoint)
    image_path, text_path = cache_paths(state["config"], args.split)
    images, texts = ImageCache(image_path), TextCache(text_path)
    root = Path(images.attrs.extra["images_root"])
    work = Path(args.keep or tempfile.mkdtemp(prefix="bench-index-"))
    photos = work / "photos"
    photos.mkdir(parents=True, exist_ok=True)
    for path in images.paths:
        shutil.copy(root / path, photos / Path(path).name)
    data = state["config"]["data"]
    dataset_dir = args.data_path or REPO.parent / "shared" / "data" / data["dataset"]
    run = [sys.executable, "cli.py"]
    common = ["--batch-size", str(args.batch_size), "--workers", str(args.workers)]
    recorded = state["features"]["image"]
    extract = _timed([*run, "extract", "--backbone", recorded["encoder"], "--weights",
                      recorded["weights_id"], "--layer", str(recorded["layer"]),
                      "--resolution", str(recorded["resolution"]), "--dataset", data["dataset"],
                      "--data-path",
                      str(dataset_dir), "--images", str(root), "--split", args.split,
                      "--out", str(work / "features"), *common])
    index = _timed([*run, "index", str(photos), "--checkpoint", args.checkpoint, "--out",
                    str(work / "index"), "--no-progress", *common])
    n = len(images)
    print(f"\n{n} photos ({data['dataset']} {args.split}, {recorded['encoder']})")
    print(f"  cli extract  {extract:8.1f} s  {n / extract:6.2f} images/s")
    print(f"  cli index    {index:8.1f} s  {n / index:6.2f} images/s")
    print(f"  ratio index / extract (images/s): {extract / index:.2f}")
    recall = t2i_recall(work / "index", texts, images, args.captions)
    report = Path(args.checkpoint).parent / f"eval-{args.split}.json"
    evaluated = json.loads(report.read_text())["metrics"] if report.exists() else {}
    print(f"\nt2i through the index ({args.captions or len(texts)} captions) vs {report.name}:")
    for key, value in recall.items():
        other = evaluated.get(key)
        print(f"  {key}: search {value:.2f}   eval {other if other is None else f'{other:.2f}'}")
    print_machine("end")
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
