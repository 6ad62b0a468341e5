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
  mtime, SHA-256 and cache row; the bad files with their reason, the skipped entries. Readers go by
  the manifest only, so a folder is always the old index or the new one; then the files the old
  manifest named and the new one does not are removed (nothing else is ever deleted);
* ``index.lock``: held (``flock``) by the run writing the folder, so a second ``cli index`` on it
  stops with "another cli index is writing OUT (pid N)"; it names the partial cache the run is
  writing, so a later run removes a partial of a run killed before it changed its plan.

``--out`` must be new, empty, or an index folder (it holds ``manifest.json`` or ``index.lock``): a
folder with other files is refused. A rerun extracts only new or changed photos: a file whose size
and mtime match the manifest is unchanged, one whose size matches but mtime differs is unchanged if
its SHA-256 matches. Rows of unchanged photos keep their order and are copied from the previous
cache (when it came from the same backbone), new photos follow, deleted photos are dropped; so a
second run on an unchanged folder is "up to date" and writes nothing. A photo that cannot be decoded
is written as an empty row (length 0), reported, and left out of the embeddings and the faiss index.
A partial cache of this folder's own that cannot be resumed is discarded and rebuilt.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from backbones.encoders import ImageEncoder
from cache.errors import InputError
from cache.progress import progress_bar
from cache.store import ImageCache, ImageCacheWriter, partial_path
from extract.datasets import SplitIndex
from extract.runner import image_attrs
from heads.checkpoint import feature_identity, load_checkpoint, note_centre_view
from heads.eval.scoring import encode_cache
from search import ann
from search.folder import (
    EXTENSIONS,
    BadFile,
    FolderImages,
    Photo,
    Scan,
    decode_problem,
    header_problem,
    printable,
    scan_folder,
    sha256_of,
)
from search.model import checkpoint_sha256, embedding_mode, image_encoder, load_model

INDEX_FORMAT = 1
MANIFEST = "manifest.json"
LOCK = "index.lock"


@dataclass
class BuildReport:
    """What one `build_index` call did: photos indexed, extracted and copied by this run (a resumed
    run counts only what it extracted itself), removed, bad and skipped files, notes."""

    index_dir: Path
    photos: int
    extracted: int
    copied: int
    removed: int
    bad: list[BadFile]
    seconds: float
    up_to_date: bool = False
    skipped: list[BadFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        skipped = f", {len(self.skipped)} skipped" if self.skipped else ""
        if self.up_to_date:
            return (f"{printable(self.index_dir)}: up to date ({self.photos} photos, "
                    f"{len(self.bad)} bad{skipped})")
        rate = self.extracted / self.seconds if self.seconds > 0 else 0.0
        return (f"{printable(self.index_dir)}: {self.photos} photos indexed ({self.extracted} "
                f"extracted, {self.copied} unchanged, {self.removed} removed, {len(self.bad)} bad"
                f"{skipped}) in {self.seconds:.1f} s ({rate:.1f} images/s)")


@dataclass
class _Plan:
    """The rows of the new cache: unchanged photos first, in their old row order (copied), then
    new ones (extracted); known-bad files without a row."""

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
        raise InputError(f"{printable(index_dir)}: not a photo index (no {MANIFEST}; build one "
                         "with cli index)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{printable(path)}: unreadable manifest ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != INDEX_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise InputError(f"{printable(path)}: not a manifest of cli index (index format "
                         f"{found!r}, this tool reads {INDEX_FORMAT})")
    return manifest


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:12]


def check_out(out: Path) -> None:
    """Refuse an ``--out`` that is a file, or a non-empty folder that is no index of ours (it
    holds neither ``manifest.json`` nor ``index.lock``): its files are the user's."""
    if out.exists() and not out.is_dir():
        raise InputError(f"{printable(out)}: --out is a file, not a folder")
    if (out.is_dir() and not (out / MANIFEST).exists() and not (out / LOCK).exists()
            and any(out.iterdir())):
        raise InputError(f"{printable(out)}: --out is a folder with other files in it and no "
                         f"index of cli index ({MANIFEST}); give a new or empty folder")


@contextmanager
def _locked(out: Path) -> Iterator[tuple[IO[str], dict[str, Any]]]:
    """Hold ``out/index.lock`` for the block; yields the open lock file and what the previous
    holder wrote in it (``{"pid", "partial"}``). InputError when another run holds it."""
    handle = open(out / LOCK, "a+", encoding="utf-8")
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _ledger(handle).get("pid", "?")
            raise InputError(f"another cli index is writing {printable(out)} (pid {pid}); wait "
                             "for it to finish") from None
        previous = _ledger(handle)
        _write_ledger(handle, None)
        yield handle, previous


def _ledger(handle: IO[str]) -> dict[str, Any]:
    handle.seek(0)
    try:
        value = json.loads(handle.read() or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _write_ledger(handle: IO[str], partial: str | None) -> None:
    """Record this process and the partial cache it writes (None: none) in the lock file."""
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps({"pid": os.getpid(), "partial": partial}) + "\n")
    handle.flush()


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
    """Which photos are unchanged (by size + mtime, then content hash), new, or known bad; a file
    that cannot be read is bad."""
    known = {} if manifest is None else {e["path"]: e for e in manifest["photos"] + manifest["bad"]}
    plan = _Plan()
    for photo in photos:
        entry = known.get(photo.path)
        same = entry is not None and entry["size"] == photo.size
        if same and entry["mtime_ns"] == photo.mtime_ns and entry["sha256"]:
            sha = entry["sha256"]                 # ("": it could not be read last time)
        else:
            try:
                sha = sha256_of(root / photo.path)
            except OSError:
                plan.bad.append((photo, "", header_problem(root / photo.path) or "cannot read"))
                continue
            same = same and entry["sha256"] == sha
        if same and cache is not None and "row" in entry:    # decoded (or known not to decode)
            plan.kept.append((photo, sha, entry["row"]))
        elif same and "reason" in entry:
            plan.bad.append((photo, sha, entry["reason"]))
        elif (problem := header_problem(root / photo.path)) is not None:
            plan.bad.append((photo, sha, problem))
        else:
            plan.new.append((photo, sha))
    plan.kept.sort(key=lambda kept: kept[2])
    return plan


def _open_writer(path: Path, attrs: Any, rows: list[str], notes: list[str]) -> ImageCacheWriter:
    """The writer of the cache, resuming its partial; a partial that cannot be resumed is this
    folder's own (the lock is held): it is discarded, with a note."""
    try:
        return ImageCacheWriter(path, attrs, rows, rows)
    except (InputError, OSError, KeyError) as err:
        notes.append(f"discarded {printable(partial_path(path).name)}, an interrupted run's cache "
                     f"that cannot be resumed ({err}); extracting again")
        return ImageCacheWriter(path, attrs, rows, rows, overwrite=True)


def _write_cache(path: Path, encoder: ImageEncoder, root: Path, plan: _Plan,
                 old: ImageCache | None, device: torch.device, batch_size: int, workers: int,
                 progress: bool, notes: list[str]) -> int:
    """Write (or resume) the cache of the plan's rows (a photo that does not decode: length 0);
    the number of photos this call extracted."""
    rows = [printable(photo.path) for photo, _ in plan.rows]
    index = SplitIndex(dataset="photos", split="index", image_ids=rows, image_paths=rows,
                       captions=[], caption_image_index=np.zeros(0, np.int64), images_root=root)
    images = FolderImages(root, [photo.path for photo, _ in plan.new], encoder.transform)
    kept = len(plan.kept)
    with _open_writer(path, image_attrs(encoder, index), rows, notes) as writer:
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
    return len(images) - first


def _save_atomic(path: Path, write: Any) -> None:
    """Write a file under a temporary name in the same folder, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _all_bad(root: Path, bad: list[BadFile]) -> None:
    raise InputError(f"{printable(root)}: none of the {len(bad)} files is a photo that decodes "
                     f"(first: {printable(bad[0].path)}: {bad[0].reason})")


def _files_of(manifest: dict[str, Any] | None) -> set[str]:
    """The files of the folder a manifest names."""
    return set() if manifest is None else {manifest[key] for key in ("cache", "embeddings", "faiss")}


def _remove(out: Path, names: set[str]) -> None:
    """Delete these files of ``out`` (each one a file this tool wrote there)."""
    for name in names:
        (out / name).unlink(missing_ok=True)


def build_index(images: str | Path, checkpoint: str | Path, out: str | Path, kind: str = "flat",
                device: torch.device | None = None, batch_size: int = 32,
                workers: int = 0, progress: bool = True, follow_links: bool = False) -> BuildReport:
    """Index the photos under ``images`` with the run of ``checkpoint`` into ``out`` (see the
    module docstring); a rerun updates the index incrementally. ``follow_links``: also follow
    symbolic links that leave the folder."""
    began = time.perf_counter()
    device = torch.device("cpu") if device is None else device
    if kind not in ann.KINDS:
        raise InputError(f"unknown index kind {kind!r}; known: {', '.join(ann.KINDS)}")
    if batch_size < 1 or workers < 0:
        raise InputError(f"--batch-size must be >= 1 and --workers >= 0, got {batch_size}, "
                         f"{workers}")
    root, out = Path(images).resolve(), Path(out)
    check_out(out)
    state = load_checkpoint(checkpoint)
    note_centre_view(state, "cli index")
    mode = embedding_mode(state)
    scan = scan_folder(root, follow_links)
    if not scan.photos:
        raise InputError(f"{printable(root)}: no photos ({', '.join(e[1:] for e in EXTENSIONS)}) "
                         f"in this folder or below it{_skipped_note(scan.skipped)}")
    run = _Run(root, checkpoint, out, kind, device, batch_size, workers, progress,
               follow_links, state, mode, scan, began)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with _locked(out) as (lock, previous):
            return _build_locked(run, lock, previous)
    except InputError:
        if created and not (out / MANIFEST).exists():      # leave nothing of a failed first run
            _remove(out, {LOCK})
            if not any(out.iterdir()):
                out.rmdir()
        raise


def _skipped_note(skipped: list[BadFile]) -> str:
    if not skipped:
        return ""
    return (f" ({len(skipped)} skipped, first: {printable(skipped[0].path)}: "
            f"{skipped[0].reason})")


@dataclass(frozen=True)
class _Run:
    """One `build_index` call's arguments, checked, with the loaded run and the folder's scan."""

    root: Path
    checkpoint: str | Path
    out: Path
    kind: str
    device: torch.device
    batch_size: int
    workers: int
    progress: bool
    follow_links: bool
    state: dict[str, Any]
    mode: str | None
    scan: Scan
    began: float


def _build_locked(run: _Run, lock: IO[str], previous: dict[str, Any]) -> BuildReport:
    """`build_index` with the lock of ``run.out`` held (``previous``: what the last holder
    wrote in it)."""
    root, checkpoint, out, kind, device = run.root, run.checkpoint, run.out, run.kind, run.device
    state, mode, scan, began = run.state, run.mode, run.scan, run.began
    identity = state["features"]["image"]
    photos = scan.photos
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
    notes = []
    stale = previous.get("partial")
    if stale and stale != partial_path(out / cache_name).name and "/" not in stale:
        _remove(out, {stale})                 # a killed run's partial of another plan: ours
    if (manifest is not None and manifest["faiss"] == f"index-{build}.faiss"
            and manifest["images_root"] == str(root)
            and {e["path"] for e in manifest["bad"] if "row" not in e}
            == {p.path for p, _, _ in plan.bad}):
        if manifest["kind"] != kind:
            notes.append(ann.fallback_note(kind, len(manifest["photos"])))
        return BuildReport(out, len(manifest["photos"]), 0, len(plan.kept), 0,
                           [BadFile(e["path"], e["reason"]) for e in manifest["bad"]],
                           time.perf_counter() - began, up_to_date=True, skipped=scan.skipped,
                           notes=notes)

    cache_path = out / cache_name
    extracted = 0
    if not cache_path.exists():
        _write_ledger(lock, partial_path(cache_path).name)
        encoder = image_encoder(identity, str(checkpoint))
        extracted = _write_cache(cache_path, encoder, root, plan, old_cache, device,
                                 run.batch_size, run.workers, run.progress, notes)
        _write_ledger(lock, None)
    cache = ImageCache(cache_path)
    good = np.flatnonzero(cache.lengths > 0)
    known = {} if manifest is None else {e["path"]: e["reason"] for e in manifest["bad"]}
    bad_rows = {int(row): BadFile(rows[row][0].path,  # decoded again for the reason: few files
                                  known.get(rows[row][0].path)
                                  or decode_problem(root / rows[row][0].path)
                                  or "cannot decode image")
                for row in np.flatnonzero(cache.lengths == 0)}
    bad = [BadFile(p.path, reason) for p, _, reason in plan.bad] + list(bad_rows.values())
    if len(good) == 0:
        if cache_name not in _files_of(manifest):
            _remove(out, {cache_name})
        _all_bad(root, bad)

    model = load_model(state, cache, mode)
    encoded = encode_cache(model, cache, device, batch_size=max(run.batch_size, 64), rows=good)
    vectors = encoded["emb"].float().cpu().numpy()
    embeddings = np.zeros((len(cache), vectors.shape[1]), np.float32)
    embeddings[good] = vectors
    built_kind = ann.fitting_kind(kind, len(good))
    if built_kind != kind:
        notes.append(ann.fallback_note(kind, len(good)))
    ann_index = ann.faiss_index(built_kind, vectors, good)
    _save_atomic(out / f"embeddings-{build}.npy", lambda tmp: _save_npy(tmp, embeddings))
    _save_atomic(out / f"index-{build}.faiss", lambda tmp: ann.save_index(ann_index, tmp))

    norms = np.linalg.norm(vectors, axis=1)
    new_manifest = {
        "format": INDEX_FORMAT,
        "written": datetime.now(UTC).isoformat(timespec="seconds"),
        "images_root": str(root), "follow_links": run.follow_links, "kind": built_kind,
        "checkpoint": ckpt, "image_features": identity,
        "cache": cache_name, "embeddings": f"embeddings-{build}.npy",
        "faiss": f"index-{build}.faiss", "dim": int(vectors.shape[1]),
        "normalised": bool(np.allclose(norms, 1.0, atol=1e-3)),
        "photos": [{**_entry(*rows[row]), "row": int(row)} for row in good],
        "bad": [{**_entry(p, sha), "reason": reason} for p, sha, reason in plan.bad]
               + [{**_entry(*rows[row]), "reason": b.reason, "row": row}
                  for row, b in bad_rows.items()],
        "skipped": [{"path": s.path, "reason": s.reason} for s in scan.skipped],
    }
    _save_atomic(out / MANIFEST, lambda tmp: Path(tmp).write_text(
        json.dumps(new_manifest, indent=1) + "\n", encoding="utf-8"))
    _remove(out, _files_of(manifest) - _files_of(new_manifest))
    return BuildReport(out, len(good), extracted, len(plan.kept), removed, bad,
                       time.perf_counter() - began, skipped=scan.skipped, notes=notes)


def _entry(photo: Photo, sha: str) -> dict[str, Any]:
    return {"path": photo.path, "size": photo.size, "mtime_ns": photo.mtime_ns, "sha256": sha}


def _save_npy(path: str, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, array)
