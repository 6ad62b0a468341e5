"""`cli index`: a folder of photos -> an index folder (image cache, embeddings, faiss index,
manifest), built incrementally and never left half-written.

An index folder holds

* ``images-<G>.h5``: the backbone tokens of every photo in the cache format of ``cli extract``
  (`cache.store.ImageCacheWriter`; row ids and paths are the photos' paths relative to the folder);
  ``G`` is a digest of its rows (path + content hash) and the backbone's identity, so a killed run
  resumes its ``.partial`` file when rerun on the same folder;
* ``embeddings-<B>.npy``: float32 ``[rows, d]``, the head's image embeddings of the cache rows
  (zeros for bad rows); ``index-<B>.faiss``: those rows in a faiss index of ``--kind``, the cache
  row as id (``B`` also covers the checkpoint and the kind);
* ``manifest.json``, written last (``os.replace``): the files above, the photos root, the
  checkpoint (path, SHA-256, head, mode), the backbone, and per photo its relative path, size,
  mtime, SHA-256 and cache row; the bad files with their reason. Readers go by the manifest only,
  so a folder is always the old index or the new one; files no manifest names are then removed.

A rerun extracts only new or changed photos: a file whose size and mtime match the manifest is
unchanged, one whose size matches but mtime differs is unchanged if its SHA-256 matches. Rows of
unchanged photos are copied from the previous cache (when it came from the same backbone), deleted
photos are dropped. A photo that cannot be decoded is written as an empty row (length 0), reported,
and left out of the embeddings and the faiss index.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from cache.errors import InputError
from cache.progress import progress_bar
from cache.store import ImageCache, ImageCacheWriter
from extract.datasets import SplitIndex
from extract.encoders import ImageEncoder
from extract.runner import image_attrs
from heads.checkpoint import feature_identity, load_checkpoint
from heads.eval.scoring import encode_cache
from search import ann
from search.folder import (
    EXTENSIONS,
    BadFile,
    FolderImages,
    Photo,
    decode_problem,
    header_problem,
    scan_folder,
    sha256_of,
)
from search.model import checkpoint_sha256, embedding_mode, image_encoder, load_model

INDEX_FORMAT = 1
MANIFEST = "manifest.json"
_OWN_FILES = ("images-*.h5", "images-*.h5.partial", "embeddings-*.npy", "index-*.faiss", ".*.tmp")


@dataclass
class BuildReport:
    """What one `build_index` call did."""

    index_dir: Path
    photos: int
    extracted: int
    copied: int
    removed: int
    bad: list[BadFile]
    seconds: float
    up_to_date: bool = False

    def summary(self) -> str:
        if self.up_to_date:
            return f"{self.index_dir}: up to date ({self.photos} photos)"
        rate = self.extracted / self.seconds if self.seconds > 0 else 0.0
        return (f"{self.index_dir}: {self.photos} photos indexed ({self.extracted} extracted, "
                f"{self.copied} unchanged, {self.removed} removed, {len(self.bad)} bad) in "
                f"{self.seconds:.1f} s ({rate:.1f} images/s)")


@dataclass
class _Plan:
    """The rows of the new cache: unchanged photos first (copied), then new ones (extracted)."""

    kept: list[tuple[Photo, str, int]] = field(default_factory=list)   # photo, sha, old row
    new: list[tuple[Photo, str]] = field(default_factory=list)         # photo, sha
    bad: list[tuple[Photo, str, str]] = field(default_factory=list)    # photo, sha, reason

    @property
    def rows(self) -> list[tuple[Photo, str]]:
        return [(p, sha) for p, sha, _ in self.kept] + self.new


def read_manifest(index_dir: str | Path) -> dict[str, Any]:
    """The manifest of an index folder; InputError when it is missing or unreadable."""
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise InputError(f"{index_dir}: not a photo index (no {MANIFEST}; build one with cli index)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: unreadable manifest ({err})") from None
    if manifest.get("format") != INDEX_FORMAT:
        raise InputError(f"{path}: index format {manifest.get('format')!r}, this tool reads "
                         f"{INDEX_FORMAT}")
    return manifest


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def _previous(out: Path, identity: dict[str, Any]) -> tuple[dict[str, Any] | None, ImageCache | None]:
    """The previous manifest of ``out`` and its cache when that came from the same backbone."""
    if not (out / MANIFEST).exists():
        return None, None
    manifest = read_manifest(out)
    try:
        cache = ImageCache(out / manifest["cache"])
    except InputError:
        return manifest, None
    return manifest, cache if feature_identity(cache) == identity else None


def _plan(root: Path, photos: list[Photo], manifest: dict[str, Any] | None,
          cache: ImageCache | None) -> _Plan:
    """Which photos are unchanged (by size + mtime, then content hash), new, or known bad."""
    known = {} if manifest is None else {e["path"]: e for e in manifest["photos"] + manifest["bad"]}
    plan = _Plan()
    for photo in photos:
        entry = known.get(photo.path)
        same = entry is not None and entry["size"] == photo.size
        if same and entry["mtime_ns"] == photo.mtime_ns:
            sha = entry["sha256"]
        else:
            sha = sha256_of(root / photo.path)
            same = same and entry["sha256"] == sha
        if same and "reason" in entry:
            plan.bad.append((photo, sha, entry["reason"]))
        elif same and cache is not None:
            plan.kept.append((photo, sha, entry["row"]))
        elif (problem := header_problem(root / photo.path)) is not None:
            plan.bad.append((photo, sha, problem))
        else:
            plan.new.append((photo, sha))
    return plan


def _write_cache(path: Path, encoder: ImageEncoder, root: Path, plan: _Plan,
                 old: ImageCache | None, device: torch.device, batch_size: int, workers: int,
                 progress: bool) -> None:
    """Write (or resume) the cache of the plan's rows (a photo that does not decode: length 0)."""
    rows = [photo.path for photo, _ in plan.rows]
    index = SplitIndex(dataset="photos", split="index", image_ids=rows, image_paths=rows,
                       captions=[], caption_image_index=np.zeros(0, np.int64), images_root=root)
    images = FolderImages(root, [photo.path for photo, _ in plan.new], encoder.transform)
    kept = len(plan.kept)
    with ImageCacheWriter(path, image_attrs(encoder, index), rows, rows) as writer:
        for lo in range(writer.rows_written, kept, batch_size):
            old_rows = [row for _, _, row in plan.kept[lo:lo + batch_size]]
            writer.append(*old.read(old_rows))
        first = writer.rows_written - kept
        loader = DataLoader(Subset(images, range(first, len(images))), batch_size=batch_size,
                            num_workers=workers, shuffle=False)
        encoder.to(device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
        with progress_bar(total=len(images), initial=first, unit="img", desc="extract",
                          disable=not progress) as bar, torch.inference_mode(), autocast:
            for _, pixels, reasons in loader:
                tokens = encoder(pixels.to(device)).float().cpu().numpy()
                bad = np.array([bool(reason) for reason in reasons])
                tokens[bad] = 0.0
                writer.append(tokens, np.where(bad, 0, tokens.shape[1]))
                bar.update(len(tokens))
        writer.finish()


def _save_atomic(path: Path, write: Any) -> None:
    """Write a file under a temporary name in the same folder, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _all_bad(root: Path, bad: list[BadFile]) -> None:
    raise InputError(f"{root}: none of the {len(bad)} files is a photo that decodes (first: "
                     f"{bad[0].path}: {bad[0].reason})")


def _remove_unlisted(out: Path, keep: set[str]) -> None:
    for pattern in _OWN_FILES:
        for path in out.glob(pattern):
            if path.name not in keep:
                path.unlink()


def build_index(images: str | Path, checkpoint: str | Path, out: str | Path, kind: str = "flat",
                device: torch.device | None = None, batch_size: int = 32,
                workers: int = 0, progress: bool = True) -> BuildReport:
    """Index the photos under ``images`` with the run of ``checkpoint`` into ``out`` (see the
    module docstring); a rerun updates the index incrementally."""
    began = time.perf_counter()
    device = torch.device("cpu") if device is None else device
    if kind not in ann.KINDS:
        raise InputError(f"unknown index kind {kind!r}; known: {', '.join(ann.KINDS)}")
    if batch_size < 1 or workers < 0:
        raise InputError(f"--batch-size must be >= 1 and --workers >= 0, got {batch_size}, "
                         f"{workers}")
    root, out = Path(images).resolve(), Path(out)
    state = load_checkpoint(checkpoint)
    mode = embedding_mode(state)
    identity = state["features"]["image"]
    photos = scan_folder(root)
    if not photos:
        raise InputError(f"{root}: no photos ({', '.join(e[1:] for e in EXTENSIONS)}) in this "
                         "folder or below it")
    out.mkdir(parents=True, exist_ok=True)
    manifest, old_cache = _previous(out, identity)
    plan = _plan(root, photos, manifest, old_cache)
    rows = plan.rows
    if not rows:
        _all_bad(root, [BadFile(p.path, reason) for p, _, reason in plan.bad])
    cache_name = f"images-{_digest([identity, [(p.path, sha) for p, sha in rows]])}.h5"
    ckpt = {"path": str(Path(checkpoint).resolve()), "sha256": checkpoint_sha256(checkpoint),
            "head": state["head_name"], "mode": mode, "epoch": state["epoch"]}
    build = _digest([cache_name, ckpt["sha256"], mode, kind])
    removed = 0 if manifest is None else len(
        {e["path"] for e in manifest["photos"] + manifest["bad"]} - {p.path for p in photos})
    if (manifest is not None and manifest["faiss"] == f"index-{build}.faiss"
            and manifest["images_root"] == str(root) and not plan.new and not removed
            and {e["path"] for e in manifest["bad"]} == {p.path for p, _, _ in plan.bad}):
        return BuildReport(out, len(manifest["photos"]), 0, len(plan.kept), 0,
                           [BadFile(e["path"], e["reason"]) for e in manifest["bad"]],
                           time.perf_counter() - began, up_to_date=True)

    cache_path = out / cache_name
    if not cache_path.exists():
        encoder = image_encoder(identity, str(checkpoint))
        _write_cache(cache_path, encoder, root, plan, old_cache, device, batch_size, workers,
                     progress)
    cache = ImageCache(cache_path)
    good = np.flatnonzero(cache.lengths > 0)
    bad = [BadFile(p.path, reason) for p, _, reason in plan.bad]
    bad += [BadFile(rows[row][0].path,  # decoded again for the reason: bad files are few
                    decode_problem(root / rows[row][0].path) or "cannot decode image")
            for row in np.flatnonzero(cache.lengths == 0)]
    if len(good) == 0:
        _all_bad(root, bad)

    model = load_model(state, cache, mode)
    encoded = encode_cache(model, cache, device, batch_size=max(batch_size, 64), rows=good)
    vectors = encoded["emb"].float().cpu().numpy()
    embeddings = np.zeros((len(cache), vectors.shape[1]), np.float32)
    embeddings[good] = vectors
    ann_index = ann.faiss_index(kind, vectors, good)
    _save_atomic(out / f"embeddings-{build}.npy", lambda tmp: _save_npy(tmp, embeddings))
    _save_atomic(out / f"index-{build}.faiss", lambda tmp: ann.save_index(ann_index, tmp))

    by_path = {p.path: (p, sha) for p, sha, _ in plan.bad} | {p.path: (p, sha) for p, sha in rows}
    norms = np.linalg.norm(vectors, axis=1)
    new_manifest = {
        "format": INDEX_FORMAT,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "images_root": str(root), "kind": kind, "checkpoint": ckpt, "image_features": identity,
        "cache": cache_name, "embeddings": f"embeddings-{build}.npy",
        "faiss": f"index-{build}.faiss", "dim": int(vectors.shape[1]),
        "normalised": bool(np.allclose(norms, 1.0, atol=1e-3)),
        "photos": [{**_entry(*rows[row]), "row": int(row)} for row in good],
        "bad": [{**_entry(*by_path[b.path]), "reason": b.reason} for b in bad],
    }
    _save_atomic(out / MANIFEST, lambda tmp: Path(tmp).write_text(
        json.dumps(new_manifest, indent=1) + "\n", encoding="utf-8"))
    _remove_unlisted(out, {cache_name, new_manifest["embeddings"], new_manifest["faiss"]})
    return BuildReport(out, len(good), len(plan.new), len(plan.kept), removed, bad,
                       time.perf_counter() - began)


def _entry(photo: Photo, sha: str) -> dict[str, Any]:
    return {"path": photo.path, "size": photo.size, "mtime_ns": photo.mtime_ns, "sha256": sha}


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
