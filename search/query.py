"""Queries against an index folder: ``search.open_index(path)`` -> `Index`, whose ``query_text``
and ``query_image`` return ranked `Results` (``cli search`` and ``cli serve`` wrap them).

A text query is tokenised by the run's text encoder with its cached limit (``max_length``): a
longer query is truncated to the limit and `Results.notes` says so (the caches of training were
truncated the same way). Token states are rounded to fp16 as in a cache, encoded by the head's text
side and searched in the faiss index. An image query goes through the run's image backbone and the
head's image side. ``rerank`` re-scores the first K hits of a text query with an interaction head
(``--fine``) over the index's own image cache, which must hold that run's features.

The index needs only its folder; text and image queries also load the checkpoint named in its
manifest (or ``checkpoint=``), which must be the file the index was built with (same SHA-256), and
its photo folder must still be where it was indexed. `Index.refresh` re-reads the folder after a
``cli index`` rewrote it (``cli serve`` calls it before each request); `Index.check` loads
everything a query needs, so a bad checkpoint fails at once. In `Results.to_dict` (JSON) a path is
in its printable form (`search.folder.printable`); `Index.names` maps those back.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from backbones.encoders import ImageEncoder, TextEncoder
from cache.batch import IdsBatch, PixelBatch
from cache.errors import CacheMismatchError, InputError
from cache.store import ImageCache
from extract.datasets import load_rgb
from heads.base import Encoded
from heads.checkpoint import load_checkpoint
from heads.eval.scoring import encode_cache, inference, similarity_matrix
from heads.model import RetrievalModel
from search import ann
from search.folder import printable
from search.index import MANIFEST, read_manifest
from search.model import (
    checkpoint_sha256,
    image_encoder,
    interaction_mode,
    load_model,
    text_encoder,
)


@dataclass(frozen=True)
class Hit:
    """One result: 1-based rank, score, photo path relative to the images root, cache row; after a
    re-rank ``coarse`` holds the embedding score the shortlist was cut by."""

    rank: int
    score: float
    path: str
    row: int
    coarse: float | None = None


@dataclass
class Results:
    """The hits of one query, best first, and notes for the user (e.g. a truncated query)."""

    query: str
    hits: list[Hit]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The results as JSON-ready values (paths in their printable form)."""
        return {"query": self.query, "notes": self.notes,
                "hits": [{k: printable(v) if k == "path" else v
                          for k, v in asdict(hit).items() if v is not None}
                         for hit in self.hits]}

    def first(self, k: int) -> Results:
        """The results cut to their first ``k`` hits."""
        return Results(self.query, self.hits[:k], self.notes)


def encode_text(model: RetrievalModel, encoder: TextEncoder, text: str,
                device: torch.device) -> tuple[Encoded, list[str]]:
    """The head's encoding of a text query, and a note when the query was truncated."""
    if not text.strip():
        raise InputError("the text query is empty")
    length = len(encoder.tokenizer(text, add_special_tokens=True)["input_ids"])
    notes = []
    if length > encoder.max_length:
        notes.append(f"the query is {length} tokens, longer than the {encoder.max_length} of the "
                     f"text encoder {encoder.name}; only the first {encoder.max_length} are used")
    input_ids, mask = encoder.pad_batch(encoder.tokenize([text]))
    raw = IdsBatch(input_ids, mask.bool()).to(device)
    batch = model.text_source.encode_raw(raw, encoder)
    with inference(model.to(device), device):
        return model.encode_texts(batch), notes


class Index:
    """An index folder opened for queries (see the module docstring)."""

    def __init__(self, folder: str | Path, checkpoint: str | Path | None = None,
                 device: torch.device | None = None) -> None:
        self.folder = Path(folder)
        self.device = torch.device("cpu") if device is None else device
        self._given_checkpoint = checkpoint
        self._signature: tuple[int, int] | None = None
        self._read()

    def _read(self) -> None:
        """(Re-)read the manifest and what follows from it."""
        self._signature = self._manifest_signature()
        self.manifest = read_manifest(self.folder)
        self.root = Path(self.manifest["images_root"])
        self.follow_links = bool(self.manifest.get("follow_links", False))
        self._checkpoint = Path(self._given_checkpoint or self.manifest["checkpoint"]["path"])
        self.paths = {entry["row"]: entry["path"] for entry in self.manifest["photos"]}
        self.names = {printable(path): path for path in self.paths.values()}

    def _manifest_signature(self) -> tuple[int, int] | None:
        try:
            info = (self.folder / MANIFEST).stat()
        except OSError:
            return None
        return info.st_mtime_ns, info.st_ino

    def stale(self) -> bool:
        """Whether ``cli index`` rewrote the index since it was read (its manifest changed)."""
        return self._manifest_signature() != self._signature

    def refresh(self) -> bool:
        """Re-read the index if it is `stale`; whether it was. The backbones and the checkpoint
        are kept unless the index now names another run."""
        if not self.stale():
            return False
        old_run = self.manifest["checkpoint"]["sha256"]
        self._read()
        dropped = ["faiss", "cache", "model"]
        if self.manifest["checkpoint"]["sha256"] != old_run:
            dropped += ["state", "text_encoder", "image_encoder"]
        for name in dropped:
            self.__dict__.pop(name, None)
        return True

    def check(self) -> None:
        """Load what a text query needs (checkpoint, model, text encoder, faiss index) and check
        the photo folder, so that a problem is reported now rather than at the first query."""
        self._require_photos()
        for name in ("state", "model", "text_encoder", "faiss"):
            getattr(self, name)           # a cached property: loaded now, kept for the queries

    def _require_photos(self) -> None:
        if not self.root.is_dir():
            raise InputError(f"{printable(self.root)}: the photo folder of the index "
                             f"{printable(self.folder)} is not there (moved?); run cli index on "
                             f"its new place with --out {printable(self.folder)} to update it")

    def __len__(self) -> int:
        return len(self.paths)

    @cached_property
    def faiss(self) -> Any:
        return ann.load_index(str(self.folder / self.manifest["faiss"]))

    @cached_property
    def cache(self) -> ImageCache:
        return ImageCache(self.folder / self.manifest["cache"])

    @cached_property
    def state(self) -> dict[str, Any]:
        if not self._checkpoint.is_file():
            raise InputError(f"{printable(self._checkpoint)}: the checkpoint the index "
                             f"{printable(self.folder)} was built with is not there (moved?); "
                             "pass its new place with --checkpoint")
        state = load_checkpoint(self._checkpoint)
        if checkpoint_sha256(self._checkpoint) != self.manifest["checkpoint"]["sha256"]:
            raise InputError(f"{printable(self._checkpoint)}: not the checkpoint "
                             f"{printable(self.folder)} was built with (its SHA-256 differs); "
                             "pass that run with --checkpoint, or rebuild the index with cli "
                             "index")
        return state

    @cached_property
    def model(self) -> RetrievalModel:
        return load_model(self.state, self.cache, self.manifest["checkpoint"]["mode"])

    @cached_property
    def text_encoder(self) -> TextEncoder:
        return text_encoder(self.state["features"]["text"], str(self._checkpoint))

    @cached_property
    def image_encoder(self) -> ImageEncoder:
        return image_encoder(self.state["features"]["image"], str(self._checkpoint))

    def file(self, path: str) -> Path:
        """The photo file of a hit's relative path."""
        return self.root / path

    def search(self, embedding: torch.Tensor, k: int) -> list[Hit]:
        """The ``k`` nearest photos of one embedding ``[1, d]``."""
        if k < 1:
            raise InputError(f"-k must be >= 1, got {k}")
        self._require_photos()
        scores, ids = ann.search(self.faiss, embedding.float().cpu().numpy(), k)
        pairs = [(float(s), int(i)) for s, i in zip(scores[0], ids[0]) if i >= 0]
        return [Hit(rank, score, self.paths[row], row)
                for rank, (score, row) in enumerate(pairs, start=1)]

    def query_text(self, text: str, k: int = 20) -> Results:
        """The ``k`` photos that best match a text query."""
        encoded, notes = encode_text(self.model, self.text_encoder, text, self.device)
        return Results(text, self.search(encoded["emb"], k), notes)

    def query_image(self, path: str | Path, k: int = 20) -> Results:
        """The ``k`` photos most similar to the photo at ``path`` (InputError if it does not
        decode)."""
        encoder = self.image_encoder.to(self.device)
        raw = PixelBatch(encoder.transform(load_rgb(path)).unsqueeze(0).to(self.device))
        batch = self.model.image_source.encode_raw(raw, encoder)
        with inference(self.model.to(self.device), self.device):
            encoded = self.model.encode_images(batch)
        return Results(str(path), self.search(encoded["emb"], k))

    def rerank(self, results: Results, fine: str | Path, top: int) -> Results:
        """``results`` of a text query with its first ``top`` hits re-scored and re-ordered by the
        interaction branch of the run ``fine``; the other hits follow in their order."""
        if top < 1:
            raise InputError(f"--rerank-topk must be >= 1, got {top}")
        state = load_checkpoint(fine)
        try:
            model = load_model(state, self.cache, interaction_mode(state))
        except CacheMismatchError as err:
            raise InputError(f"--fine-checkpoint {fine}: it was trained on other image features "
                             f"than the index's cache ({err}); index with a run on its backbone"
                             ) from None
        encoder = (self.text_encoder if state["features"]["text"] == self.state["features"]["text"]
                   else text_encoder(state["features"]["text"], str(fine)))
        texts, notes = encode_text(model, encoder, results.query, self.device)
        head, tail = results.hits[:top], results.hits[top:]
        if not head:
            return results
        rows = np.array([hit.row for hit in head])
        images = encode_cache(model, self.cache, self.device, rows=rows)
        scores = similarity_matrix(model, images, texts, self.device)[:, 0].tolist()
        order = sorted(range(len(head)), key=lambda i: -scores[i])
        hits = [Hit(rank, scores[i], head[i].path, head[i].row, head[i].score)
                for rank, i in enumerate(order, start=1)]
        hits += [Hit(len(hits) + n, hit.score, hit.path, hit.row) for n, hit in
                 enumerate(tail, start=1)]
        return Results(results.query, hits, results.notes + notes)


def open_index(path: str | Path, checkpoint: str | Path | None = None,
               device: torch.device | None = None) -> Index:
    """Open an index folder written by ``cli index`` (checkpoint: override the manifest's)."""
    return Index(path, checkpoint, device)
