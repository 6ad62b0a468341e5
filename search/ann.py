"""The faiss indexes of `cli index --kind`: exact inner product, HNSW graph, IVF-PQ.

Every kind scores by inner product (the embedding heads' score: a dot product of L2-normalised
vectors, i.e. cosine) and is wrapped in ``IndexIDMap2``, so a search returns the caller's ids (the
rows of the index's image cache) whatever the kind:

* ``flat``: ``IndexFlatIP``, exact;
* ``hnsw``: ``IndexHNSWFlat`` (32 links per node, efConstruction 80, efSearch 64);
* ``ivf-pq``: ``IndexIVFPQ`` over about 4 sqrt(n) lists (at least 39 training points each),
  ``d / 4`` sub-quantisers (the largest divisor of d up to that) of up to 8 bits (fewer below
  10,000 photos: each of the 2^bits centroids gets 39 training points), 16 lists probed per query. Compressed: for
  millions of photos on little memory; recall is below 1 (see bench/index_kinds.py). Fewer than
  `MIN_IVF_PQ` photos cannot train it: `fitting_kind` gives ``flat`` for them (cli index notes it).
"""
from __future__ import annotations

import math

import numpy as np

from cache.errors import InputError

KINDS = ("flat", "hnsw", "ivf-pq")
MIN_IVF_PQ = 2 * 39


def _faiss():
    import faiss

    return faiss


def _pq_params(dim: int, count: int) -> tuple[int, int, int]:
    """(lists, sub-quantisers, bits) of an IVF-PQ index for ``count`` vectors of ``dim``."""
    lists = max(1, min(int(4 * math.sqrt(count)), count // 39))
    subs = max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)
    bits = max(1, min(8, int(math.log2(max(2.0, count / 39)))))
    return lists, subs, bits


def faiss_index(kind: str, vectors: np.ndarray, ids: np.ndarray):
    """A trained faiss index of ``kind`` holding ``vectors [n, d]`` (float32) under ``ids [n]``."""
    faiss = _faiss()
    vectors = np.ascontiguousarray(vectors, np.float32)
    count, dim = vectors.shape
    if kind == "flat":
        inner = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        inner = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
        inner.hnsw.efConstruction = 80
        inner.hnsw.efSearch = 64
    elif kind == "ivf-pq":
        lists, subs, bits = _pq_params(dim, count)
        inner = faiss.IndexIVFPQ(faiss.IndexFlatIP(dim), dim, lists, subs, bits,
                                 faiss.METRIC_INNER_PRODUCT)
        inner.train(vectors)
        inner.nprobe = min(lists, 16)
    else:
        raise InputError(f"unknown index kind {kind!r}; known: {', '.join(KINDS)}")
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(vectors, np.asarray(ids, np.int64))
    return index


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores and ids ``[q, k']`` of the top ``k`` (k' = min(k, size); id -1: no more results,
    as an IVF index can return when its probed lists hold fewer than k)."""
    k = min(k, index.ntotal)
    scores, ids = index.search(np.ascontiguousarray(queries, np.float32), k)
    return scores, ids


def save_index(index, path: str) -> None:
    _faiss().write_index(index, path)


def load_index(path: str):
    return _faiss().read_index(path)


def fitting_kind(kind: str, count: int) -> str:
    """``kind``, or ``flat`` when ``count`` vectors are too few to train it (IVF-PQ needs
    `MIN_IVF_PQ`: 39 training points for each of at least 2 centroids)."""
    return "flat" if kind == "ivf-pq" and count < MIN_IVF_PQ else kind


def fallback_note(kind: str, count: int) -> str:
    """The note of an index built as ``flat`` instead of ``kind``."""
    return (f"--kind {kind} needs at least {MIN_IVF_PQ} photos to train; the {count} photos are "
            "indexed with flat (exact search) instead")
